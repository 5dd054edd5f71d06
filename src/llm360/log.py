"""Logging and progress display, on stderr.

Library code logs through ``logging.getLogger(__name__)`` and shows long work with
:func:`progress`; the CLI decides whether that becomes a rich display (a terminal) or stays quiet
(tests, pipes). Both go to stderr, and so do the CLI's error messages (:data:`console`); a
command's results go to stdout (:mod:`llm360.console`), so a pipe or a redirect gets them alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)
"""stderr: logs, progress bars and error messages (never a command's result)."""
_progress_enabled = False


def setup_logging(verbose: bool = False, show_progress: bool = True) -> None:
    """Route llm360's logs to a rich handler on stderr; enable progress bars."""
    global _progress_enabled
    _progress_enabled = show_progress
    logger = logging.getLogger("llm360")
    logger.handlers.clear()
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=False, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    # lm-eval warns about every task that builds its data in code, as llm360's demo tasks do
    logging.getLogger("lm_eval.api.task").addFilter(
        lambda rec: "Custom kwargs can be passed" not in rec.getMessage()
    )


class ProgressTask(Protocol):
    def advance(self, n: float = 1) -> None: ...

    def update(self, *, total: float | None = None, description: str | None = None) -> None: ...

    def tasks(self, *, running: int, failed: int) -> None:
        """Show how many units are running now and how many have failed (an executor's bar)."""


class _NullTask:
    def advance(self, n: float = 1) -> None:
        pass

    def update(self, *, total: float | None = None, description: str | None = None) -> None:
        pass

    def tasks(self, *, running: int, failed: int) -> None:
        pass


def task_counts(running: int, failed: int) -> str:
    """The text beside an executor's bar: ``2 running, 1 failed`` (a rich markup string)."""
    text = f"{running} running"
    if failed:
        text += f", [bold red]{failed} failed[/]"
    return text


class _RichTask:
    def __init__(self, progress: Progress, task_id: int) -> None:
        self._progress = progress
        self._id = task_id

    def advance(self, n: float = 1) -> None:
        self._progress.advance(self._id, n)

    def update(self, *, total: float | None = None, description: str | None = None) -> None:
        kwargs: dict = {}
        if total is not None:
            kwargs["total"] = total
        if description is not None:
            kwargs["description"] = description
        self._progress.update(self._id, **kwargs)

    def tasks(self, *, running: int, failed: int) -> None:
        self._progress.update(self._id, counts=task_counts(running, failed))


@contextmanager
def progress(description: str, total: float | None = None, unit: str = "") -> Iterator[ProgressTask]:
    """One progress bar for one long piece of work; a no-op unless the CLI enabled progress."""
    if not _progress_enabled or not console.is_terminal:
        yield _NullTask()
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TextColumn("{task.fields[counts]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as bar:
        yield _RichTask(bar, bar.add_task(description, total=total, counts=""))
