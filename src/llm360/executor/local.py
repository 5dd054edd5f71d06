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
from llm360.log import ProgressTask, progress

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
        failed = 0
        with progress(label, total=len(tasks), unit=unit) as bar:
            for t in tasks:
                bar.tasks(running=1, failed=failed)
                try:
                    results.append(t())
                except Exception as e:
                    if not keep_going:
                        raise_failure(t.key, e)
                    logger.warning("task %s failed: %s", t.key, e)
                    results.append(task_error(t.key, e))
                    failed += 1
                bar.advance(1)
            bar.tasks(running=0, failed=failed)
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
        failed = 0
        failure: tuple[str, BaseException] | None = None
        # At most twice the workers submitted at once: the driver's bookkeeping per event stays
        # proportional to the workers, not to the plan (plans can hold many thousands of tasks).
        window = 2 * self.workers
        with progress(progress_label, total=len(tasks), unit=unit) as bar:
            while todo:
                pool = self._get_pool()
                queue = todo[::-1]
                futures: dict[Future, int] = {}
                broken: list[int] = []
                try:
                    while queue or futures:
                        while queue and len(futures) < window and failure is None and not broken:
                            i = queue.pop()
                            futures[pool.submit(_call, tasks[i])] = i
                        if not futures:
                            break
                        # futures the pool handed to a worker count as running
                        bar.tasks(running=min(self.workers, sum(f.running() for f in futures)), failed=failed)
                        done, _ = wait(list(futures), return_when=FIRST_COMPLETED, timeout=1.0)
                        for f in done:
                            i = futures.pop(f)
                            if f.cancelled():  # after a failure: never started
                                continue
                            try:
                                results[i] = f.result()
                            except BrokenProcessPool:
                                broken.append(i)
                                continue
                            except Exception as e:
                                if not keep_going:
                                    failure = failure or (tasks[i].key, e)
                                    for other in futures:  # not started yet: never start them
                                        other.cancel()
                                    continue
                                logger.warning("task %s failed: %s", tasks[i].key, e)
                                results[i] = task_error(tasks[i].key, e)
                                failed += 1
                            bar.advance(1)
                    bar.tasks(running=0, failed=failed)
                except BaseException:
                    self._kill_pool()  # interrupted: stop our workers now
                    raise
                if failure is not None:
                    raise_failure(*failure)
                todo = sorted(broken + queue)  # a broken pool: what it lost and what was never submitted
                if todo:
                    self._kill_pool()
                    restarts += 1
                    keys = ", ".join(tasks[i].key for i in sorted(broken)[:5])
                    if restarts > self.max_restarts and keep_going:
                        self._isolate(tasks, todo, results, bar, failed)  # only the tasks that kill their worker fail
                        break
                    if restarts > self.max_restarts:
                        raise TaskFailed(
                            tasks[min(broken)].key,
                            f"a worker process died {restarts} times while running {keys}"
                            f"{' ...' if len(broken) > 5 else ''}; see the system log (out of memory?)",
                        )
                    logger.warning("a worker process died; running %d unfinished task(s) again (%s)",
                                   len(broken), keys)
        return results

    def _isolate(self, tasks: Sequence[Task], todo: list[int], results: list[Any], bar: ProgressTask,
                 failed: int) -> None:  # fmt: skip
        """Run each of ``todo`` alone in a fresh worker: a task whose worker dies again gets a TaskError
        (the others in flight with it when the pool broke are not blamed)."""
        for i in todo:
            bar.tasks(running=1, failed=failed)
            try:
                results[i] = self._get_pool().submit(_call, tasks[i]).result()
            except BrokenProcessPool:
                self._kill_pool()
                lost = TaskFailed(tasks[i].key, "its worker process died each time it ran it; see the system "
                                                "log (out of memory?)")
                logger.warning("%s", lost)
                results[i] = task_error(tasks[i].key, lost)
                failed += 1
            except Exception as e:
                logger.warning("task %s failed: %s", tasks[i].key, e)
                results[i] = task_error(tasks[i].key, e)
                failed += 1
            bar.advance(1)
        bar.tasks(running=0, failed=failed)

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
