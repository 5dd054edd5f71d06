"""Tasks, the executor interface, task errors and ``--shard I/N`` (see :mod:`llm360.executor`)."""

from __future__ import annotations

import logging
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm360.errors import ConfigError, Llm360Error

logger = logging.getLogger(__name__)

# Worker processes compute on one thread each: the executor provides the parallelism, and N
# workers that each spawn one thread per core would oversubscribe the machine.
SINGLE_THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "RAYON_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class ExecutorError(Llm360Error):
    """An executor cannot run here: Ray is missing, an address cannot be reached, a folder a node cannot see."""


@dataclass(frozen=True)
class Task:
    """One deterministic unit of a plan: ``fn(*args, **kwargs)``, run anywhere, any number of times.

    ``fn`` must be a module-level function (pickled by reference) and everything in ``args`` and
    ``kwargs`` picklable. The result should be small (a summary, a path): large outputs go to files
    the task writes under a temporary name and renames. ``key`` is unique within a plan and names
    the task in progress, errors and on Ray's dashboard.
    """

    key: str
    fn: Callable[..., Any]
    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    num_cpus: float = 1.0
    """CPU cores the task keeps busy (Ray schedules by it)."""
    num_gpus: float = 0.0
    """GPUs the task needs (Ray schedules by it; in-process runs ignore it)."""
    memory: int | None = None
    """Bytes of memory the task may use at its peak (Ray schedules by it), None: not declared."""

    def __call__(self) -> Any:
        return self.fn(*self.args, **dict(self.kwargs))


@dataclass(frozen=True)
class TaskError:
    """What :meth:`Executor.run` returns for a failed task with ``keep_going=True``."""

    key: str
    error_type: str
    message: str
    traceback: str = field(default="", repr=False)
    exception: BaseException | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return f"task {self.key} failed: {self.error_type}: {self.message}"


class TaskFailed(RuntimeError):
    """A task raised something other than an :class:`~llm360.errors.Llm360Error` (a bug), or was lost for good."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"task {key} failed: {message}")
        self.key = key


def task_error(key: str, exc: BaseException) -> TaskError:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return TaskError(key, type(exc).__name__, str(exc), tb, exc)


def raise_failure(key: str, exc: BaseException) -> None:
    """Raise what a failed task means for the caller (see :meth:`Executor.run`)."""
    if isinstance(exc, Llm360Error):
        # The user's problem (bad input): the same error, which says what and where, plus the task.
        if not getattr(exc, "task_key", None):
            exc.task_key = key  # type: ignore[attr-defined]
            exc.args = (f"{exc.args[0] if exc.args else exc} (task {key})", *exc.args[1:])
        raise exc
    if isinstance(exc, TaskFailed) and exc.key == key:  # already says what happened to this task
        raise exc
    raise TaskFailed(key, f"{type(exc).__name__}: {exc}") from exc


class Executor(ABC):
    """Runs a list of tasks and returns their results in task order. Use as a context manager."""

    name: str = "executor"

    @abstractmethod
    def run(
        self, tasks: Sequence[Task], *, progress_label: str, unit: str = "tasks", keep_going: bool = False
    ) -> list[Any]:
        """Run every task; results in the order of ``tasks``.

        Raises the task's own :class:`~llm360.errors.Llm360Error` (with the task's key in its
        message) or :class:`TaskFailed` for the first task that fails, after the tasks already
        running have ended; with ``keep_going``, a :class:`TaskError` takes each failed task's place.
        """

    @property
    def parallelism(self) -> int:
        """How many tasks run at once (a hint for sizing plans)."""
        return 1

    def check_visible(self, folder: Path) -> None:
        """Raise ExecutorError unless every worker sees ``folder`` (a no-op on one machine)."""
        return None

    def close(self) -> None:
        """Release workers; the executor cannot run tasks after this."""
        return None

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_keys(tasks: Sequence[Task]) -> None:
    seen: set[str] = set()
    for t in tasks:
        if t.key in seen:
            raise ValueError(f"two tasks of one plan share the key {t.key!r}")
        seen.add(t.key)


# ---------------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: the tasks whose position in the plan is ``index`` modulo ``count``."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str | None) -> Shard | None:
    """``"I/N"`` -> Shard(I, N) with 0 <= I < N; None -> None. Raises ConfigError for anything else."""
    if text is None:
        return None
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected I/N, e.g. 0/4 (shard I of N, I from 0 to N-1)") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard {text}: need 0 <= I < N, e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT")
    return Shard(i, n)


def shard_tasks(tasks: Sequence[Task], shard: Shard | None) -> list[Task]:
    """Every ``shard.count``-th task starting at ``shard.index`` (all of them for None).

    The split is by position in the plan, which is a function of the plan's inputs, so N jobs
    with shards 0/N .. N-1/N run every task exactly once whatever machines they land on.
    """
    if shard is None:
        return list(tasks)
    return [t for i, t in enumerate(tasks) if i % shard.count == shard.index]
