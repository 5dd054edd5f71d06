"""The in-process executor: tasks inline (one worker) or in a pool of local worker processes."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from llm360.executor.base import (
    SINGLE_THREAD_ENV,
    Executor,
    Task,
    TaskFailed,
    check_keys,
    raise_failure,
    task_error,
)
from llm360.log import progress

logger = logging.getLogger(__name__)


def _init_worker(env: dict[str, str]) -> None:
    os.environ.update(env)


def _call(task: Task) -> Any:
    return task()


class InProcessExecutor(Executor):
    """Runs tasks on this machine: inline for ``workers=1``, else in ``workers`` spawned processes.

    Worker processes start on first use and are kept for later :meth:`run` calls until
    :meth:`close`; each computes on one thread (``OMP_NUM_THREADS=1``, ``RAYON_NUM_THREADS=1``
    ...) unless ``single_thread=False``. A worker that dies mid-task (SIGKILL, the out-of-memory
    killer) breaks the pool: it is started again and the unfinished tasks are resubmitted, at most
    ``max_restarts`` times per run, after which :class:`TaskFailed` names the tasks in flight; with
    ``keep_going`` the unfinished tasks then run one at a time, and only a task whose worker dies
    again gets a :class:`TaskError`.
    """

    name = "local"

    def __init__(self, workers: int = 1, *, single_thread: bool = True, max_restarts: int = 2) -> None:
        self.workers = max(1, int(workers))
        self.max_restarts = max_restarts
        self._env = dict(SINGLE_THREAD_ENV) if single_thread else {}
        self._pool: ProcessPoolExecutor | None = None

    @property
    def parallelism(self) -> int:
        return self.workers

    # ---------------------------------------------------------------------------- inline
    def _run_inline(self, tasks: Sequence[Task], label: str, unit: str, keep_going: bool) -> list[Any]:
        results: list[Any] = []
        with progress(label, total=len(tasks), unit=unit) as bar:
            for t in tasks:
                try:
                    results.append(t())
                except Exception as e:
                    if not keep_going:
                        raise_failure(t.key, e)
                    logger.warning("task %s failed: %s", t.key, e)
                    results.append(task_error(t.key, e))
                bar.advance(1)
        return results

    # ------------------------------------------------------------------------------ pool
    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: the parent may hold threads (tokenizers, torch) that fork would break
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=mp.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self._env,),
            )
        return self._pool

    def _kill_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        procs = list(getattr(pool, "_processes", {}).values())
        for p in procs:  # our own workers, by process handle
            if p.is_alive():
                p.kill()
        pool.shutdown(wait=True, cancel_futures=True)

    def run(
        self, tasks: Sequence[Task], *, progress_label: str, unit: str = "tasks", keep_going: bool = False
    ) -> list[Any]:
        check_keys(tasks)
        if not tasks:
            return []
        if self.workers == 1:
            return self._run_inline(tasks, progress_label, unit, keep_going)
        results: list[Any] = [None] * len(tasks)
        todo = list(range(len(tasks)))
        restarts = 0
        failure: tuple[str, BaseException] | None = None
        with progress(progress_label, total=len(tasks), unit=unit) as bar:
            while todo:
                pool = self._get_pool()
                futures: dict[Future, int] = {}
                try:
                    for i in todo:
                        futures[pool.submit(_call, tasks[i])] = i
                    pending = set(futures)
                    broken: list[int] = []
                    while pending:
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for f in done:
                            i = futures[f]
                            if f.cancelled():  # after a failure: never started
                                continue
                            try:
                                results[i] = f.result()
                            except BrokenProcessPool:
                                broken.append(i)
                                continue
                            except Exception as e:
                                if not keep_going:
                                    if failure is None:
                                        failure = (tasks[i].key, e)
                                        for other in pending:  # not started yet: never start them
                                            other.cancel()
                                    continue
                                logger.warning("task %s failed: %s", tasks[i].key, e)
                                results[i] = task_error(tasks[i].key, e)
                            bar.advance(1)
                except BaseException:
                    self._kill_pool()  # interrupted: stop our workers now
                    raise
                if failure is not None:
                    raise_failure(*failure)
                todo = sorted(broken)
                if todo:
                    self._kill_pool()
                    restarts += 1
                    keys = ", ".join(tasks[i].key for i in todo[:5])
                    if restarts > self.max_restarts and keep_going:
                        self._isolate(tasks, todo, results)  # only the tasks that kill their worker fail
                        break
                    if restarts > self.max_restarts:
                        raise TaskFailed(
                            tasks[todo[0]].key,
                            f"a worker process died {restarts} times while running {keys}"
                            f"{' ...' if len(todo) > 5 else ''}; see the system log (out of memory?)",
                        )
                    logger.warning("a worker process died; running %d unfinished task(s) again (%s)", len(todo), keys)
        return results

    def _isolate(self, tasks: Sequence[Task], todo: list[int], results: list[Any]) -> None:
        """Run each of ``todo`` alone in a fresh worker: a task whose worker dies again gets a TaskError
        (the others in flight with it when the pool broke are not blamed)."""
        for i in todo:
            try:
                results[i] = self._get_pool().submit(_call, tasks[i]).result()
            except BrokenProcessPool:
                self._kill_pool()
                lost = TaskFailed(tasks[i].key, "its worker process died each time it ran it; see the system "
                                                "log (out of memory?)")
                logger.warning("%s", lost)
                results[i] = task_error(tasks[i].key, lost)
            except Exception as e:
                logger.warning("task %s failed: %s", tasks[i].key, e)
                results[i] = task_error(tasks[i].key, e)

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
