"""Build the executor the CLI's ``--executor``, ``--workers`` and ``--ray-address`` ask for."""

from __future__ import annotations

from llm360.errors import ConfigError
from llm360.executor.base import Executor
from llm360.executor.local import InProcessExecutor
from llm360.executor.ray_executor import RayExecutor

EXECUTORS = ("local", "ray")
"""Names :func:`make_executor` accepts."""


def make_executor(name: str = "local", workers: int | None = 1, ray_address: str | None = None) -> Executor:
    """``local``: :class:`InProcessExecutor` with ``workers`` processes (1: inline).
    ``ray``: :class:`RayExecutor` on ``ray_address`` (None: a local Ray instance, ``auto``: the
    cluster this node belongs to), with at most ``workers`` tasks at once when given (None: as many
    as the cluster has CPUs).

    Raises ConfigError for an unknown name or a Ray address with the local executor, and
    ExecutorError when Ray is not installed or the address cannot be reached.
    """
    if name in ("local", "inprocess", "in-process"):
        if ray_address:
            raise ConfigError(f"--ray-address {ray_address} needs --executor ray")
        return InProcessExecutor(workers=workers or 1)
    if name == "ray":
        return RayExecutor(ray_address, max_in_flight=workers if workers and workers > 1 else None)
    raise ConfigError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")
