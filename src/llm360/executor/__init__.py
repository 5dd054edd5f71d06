"""The one executor for plans of deterministic tasks: prepare, eval and analysis all run through it.

A plan is a list of :class:`Task` s, each split by its *input* (a piece of a source file, a chunk,
a ``(checkpoint, task)`` pair), never by worker, and each writing its own output under a temporary
name that it renames when done. So any executor, any number of workers or nodes, and any retry
give the same bytes, and a killed run redoes only the tasks whose output is missing.

API (stable; what stages use)::

    from llm360.executor import Task, make_executor

    tasks = [Task(key=f"map:{p.key}", fn=map_piece, args=(spec,)) for p in pieces]
    with make_executor("local", workers=4) as ex:          # or "ray", ray_address="auto"
        results = ex.run(tasks, progress_label="mapping pieces", unit="pieces")

* :class:`Task` -- ``key`` (unique, names the task in errors and progress), ``fn`` (a module-level
  function, so it pickles by reference), ``args``/``kwargs`` (picklable), resources ``num_cpus``,
  ``num_gpus``, ``memory`` (bytes; Ray schedules by them, in-process ignores them).
* :meth:`Executor.run` ``(tasks, *, progress_label, unit="tasks", keep_going=False)`` -> the
  results in task order. A task that raises stops the run: an :class:`~llm360.errors.Llm360Error`
  (bad input: a corrupt file, say) is re-raised as itself with the task's key added to its message;
  anything else (a bug) raises :class:`TaskFailed` naming the task, chained to the original.
  ``keep_going=True`` runs every task and returns a :class:`TaskError` in place of each failure.
  One progress bar per call.
* :class:`InProcessExecutor` ``(workers=N)`` -- a pool of N local worker processes (spawned, one
  compute thread each); ``workers=1`` runs the tasks inline in this process. A worker that dies
  (killed, out of memory) is replaced and its tasks are run again.
* :class:`RayExecutor` ``(address=None | "auto" | "HOST:PORT" | "ray://HOST:PORT")`` -- each task a
  Ray remote function with its resources, retried when its worker or node is lost. ``None`` starts a
  local Ray instance; an address that cannot be reached is an :class:`ExecutorError` before any work.
* :func:`make_executor` ``(name, workers, ray_address)`` -- what the CLI's ``--executor local|ray``,
  ``--workers`` and ``--ray-address`` build.
* :func:`parse_shard` / :func:`shard_tasks` -- ``--shard I/N``: every N-th task starting at I, for
  running one plan as N independent jobs (a Slurm array).
* :meth:`Executor.check_visible` ``(folder)`` -- raises :class:`ExecutorError` unless every node
  sees ``folder`` (a run directory or scratch folder must be on a file system all nodes share).

Executors know nothing of what the tasks do; stages decide which tasks are already done (their
outputs exist) and submit only the rest.
"""

from llm360.executor.base import (
    Executor,
    ExecutorError,
    Shard,
    Task,
    TaskError,
    TaskFailed,
    parse_shard,
    raise_failure,
    shard_tasks,
)
from llm360.executor.factory import make_executor
from llm360.executor.local import InProcessExecutor
from llm360.executor.ray_executor import RayExecutor

__all__ = [
    "Executor",
    "ExecutorError",
    "InProcessExecutor",
    "RayExecutor",
    "Shard",
    "Task",
    "TaskError",
    "TaskFailed",
    "make_executor",
    "parse_shard",
    "raise_failure",
    "shard_tasks",
]
