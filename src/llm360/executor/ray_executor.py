"""The Ray executor: each task a Ray remote function, retried when its worker or node is lost.

Ray is an optional extra (``pip install 'llm360[ray]'``) and is imported only when a
:class:`RayExecutor` is made. Every node must run the same llm360 (the tasks are pickled by
reference to their functions) and see the run directory at the same path.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llm360.executor.base import (
    SINGLE_THREAD_ENV,
    Executor,
    ExecutorError,
    Task,
    TaskError,
    TaskFailed,
    check_keys,
    raise_failure,
    task_error,
)
from llm360.log import progress

logger = logging.getLogger(__name__)


def _call(task: Task) -> Any:
    return task()


def _sees(folder: str, token: str) -> tuple[str, bool]:
    return socket.gethostname(), (Path(folder) / token).is_file()


def _check_reachable(address: str, timeout_s: float) -> None:
    """A TCP connect to HOST:PORT, so an unreachable address fails in seconds and says so."""
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ExecutorError(
            f"--ray-address {address!r}: expected HOST:PORT (the head's GCS address, port 6379 by default, "
            "printed by `ray start --head`), ray://HOST:PORT, or auto"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise ExecutorError(
            f"cannot reach the Ray cluster at {address} ({e.strerror or e}); start it with "
            "`ray start --head` on the head node (and `ray start --address HEAD:6379` on the others), "
            "or fix --ray-address. Nothing was run."
        ) from None


class RayExecutor(Executor):
    """Runs tasks on a Ray cluster.

    ``address``: None starts a local Ray instance on this machine (and stops it at :meth:`close`);
    ``"auto"`` joins the cluster this node is part of (``ray start`` ran here); ``HOST:PORT`` or
    ``ray://HOST:PORT`` a cluster elsewhere. ``max_retries``: how often a task whose worker process
    or node died is run again (the task is deterministic, so the retry's output is the same).
    ``max_in_flight``: at most this many tasks submitted at once (default: twice the cluster's
    CPUs), which bounds the driver's memory for plans of millions of tasks. Raises
    :class:`ExecutorError` when Ray is not installed or the cluster cannot be reached.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        *,
        max_retries: int = 3,
        max_in_flight: int | None = None,
        num_cpus: int | None = None,
        connect_timeout_s: float = 10.0,
        single_thread: bool = True,
    ) -> None:
        try:
            import ray
        except ImportError:
            raise ExecutorError(
                "--executor ray needs Ray: pip install 'llm360[ray]' (on every node of the cluster)"
            ) from None
        self._ray = ray
        self.address = address
        self.max_retries = max_retries
        if address not in (None, "auto", "local"):
            _check_reachable(address, connect_timeout_s)
        env = dict(SINGLE_THREAD_ENV) if single_thread else {}
        kwargs: dict[str, Any] = {
            "runtime_env": {"env_vars": env},
            "log_to_driver": True,
            "configure_logging": False,
        }
        if address in (None, "local"):
            kwargs["include_dashboard"] = False
            if num_cpus is not None:
                kwargs["num_cpus"] = num_cpus
        self._owns_ray = not ray.is_initialized()
        try:
            if self._owns_ray:
                ray.init(address=None if address == "local" else address, **kwargs)
        except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
            raise ExecutorError(
                f"cannot connect to the Ray cluster at {address or 'a new local instance'}: {e}; start it "
                "with `ray start --head` (see the README's cluster recipe) or fix --ray-address. Nothing was run."
            ) from None
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.max_in_flight = max_in_flight or max(2 * cpus, 4)
        self._remote = ray.remote(_call)
        logger.info("running on Ray: %d nodes, %d CPUs", len([n for n in ray.nodes() if n["Alive"]]), cpus)

    @property
    def parallelism(self) -> int:
        return int(self._ray.cluster_resources().get("CPU", 1))

    def _slots(self, task: Task) -> int:
        """How many tasks like ``task`` the cluster's CPUs and GPUs run at once."""
        res = self._ray.cluster_resources()
        n = self.max_in_flight
        for need, have in ((task.num_cpus, res.get("CPU", 0)), (task.num_gpus, res.get("GPU", 0))):
            if need > 0:
                n = min(n, int(have // need))
        return max(1, n)

    def _submit(self, task: Task) -> Any:
        opts: dict[str, Any] = {
            "num_cpus": task.num_cpus,
            "num_gpus": task.num_gpus,
            "max_retries": self.max_retries,
            "retry_exceptions": False,
            "name": task.key[:200],
        }
        if task.memory:
            opts["memory"] = int(task.memory)
        return self._remote.options(**opts).remote(task)

    def _lost_reason(self, e: BaseException) -> str:
        """Why Ray returned no result for a task: its worker or node died on every attempt, or it could not run."""
        lost = self._ray.exceptions
        if not isinstance(e, (lost.WorkerCrashedError, lost.NodeDiedError, lost.LocalRayletDiedError,
                              lost.ObjectLostError, lost.OutOfMemoryError)):
            return f"Ray could not run it: {type(e).__name__}: {e}"
        n = self.max_retries
        retried = ("it was not retried" if n == 0 else "so did its retry" if n == 1
                   else f"so did all {n} retries" if n > 0 else "so did every retry")
        return (f"lost: the worker process or node running it died, and {retried} (max_retries={n}; "
                f"out of memory? the Ray logs say why): {type(e).__name__}: {e}")

    def run(
        self, tasks: Sequence[Task], *, progress_label: str, unit: str = "tasks", keep_going: bool = False
    ) -> list[Any]:
        ray = self._ray
        check_keys(tasks)
        results: list[Any] = [None] * len(tasks)
        queue = list(range(len(tasks)))[::-1]
        in_flight: dict[Any, int] = {}
        failure: tuple[str, BaseException] | None = None
        failed = 0
        slots = self._slots(tasks[0]) if tasks else 1
        with progress(progress_label, total=len(tasks), unit=unit) as bar:
            try:
                while queue or in_flight:
                    while queue and len(in_flight) < self.max_in_flight and failure is None:
                        i = queue.pop()
                        in_flight[self._submit(tasks[i])] = i
                    if not in_flight:
                        break
                    # submitted tasks beyond what the cluster's resources hold at once are waiting
                    bar.tasks(running=min(len(in_flight), slots), failed=failed)
                    done, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
                    for ref in done:
                        i = in_flight.pop(ref)
                        try:
                            results[i] = ray.get(ref)
                        except ray.exceptions.RayTaskError as e:
                            cause = e.cause if isinstance(e.cause, BaseException) else e
                            if not keep_going:
                                failure = failure or (tasks[i].key, cause)
                                continue
                            logger.warning("task %s failed: %s", tasks[i].key, cause)
                            results[i] = task_error(tasks[i].key, cause)
                            failed += 1
                        except ray.exceptions.RayError as e:  # lost beyond the retries, or Ray could not run it
                            reason = self._lost_reason(e)
                            lost = TaskFailed(tasks[i].key, reason)
                            if not keep_going:
                                failure = failure or (tasks[i].key, lost)
                                continue
                            logger.warning("%s", lost)
                            results[i] = TaskError(tasks[i].key, type(lost).__name__, reason, exception=lost)
                            failed += 1
                        bar.advance(1)
                bar.tasks(running=0, failed=failed)
            except BaseException:
                for ref in in_flight:
                    ray.cancel(ref, force=True)
                raise
        if failure is not None:
            raise_failure(*failure)
        return results

    def check_visible(self, folder: Path) -> None:
        """Run one task on every alive node that looks for a file written here; raise naming the blind nodes."""
        ray = self._ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        folder = Path(folder).resolve()
        token = f".visible-{uuid.uuid4().hex}"
        probe = folder / token
        probe.write_text(str(os.getpid()))
        try:
            nodes = [n for n in ray.nodes() if n["Alive"] and n.get("Resources", {}).get("CPU", 0) > 0]
            fn = ray.remote(_sees)
            refs = [
                fn.options(
                    num_cpus=0,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
                ).remote(str(folder), token)
                for n in nodes
            ]
            seen = ray.get(refs, timeout=120)
        finally:
            probe.unlink(missing_ok=True)
        blind = sorted({host for host, ok in seen if not ok})
        if blind:
            raise ExecutorError(
                f"{folder} is not visible from Ray node(s) {', '.join(blind)}: the run directory and the "
                "scratch folder must be on a file system every node mounts at the same path. Nothing was run."
            )

    def close(self) -> None:
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()
