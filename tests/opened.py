"""Which files a piece of code opens: every ``open`` audit event (builtins.open, io.open, os.open).

An audit hook sees every open, whatever the function that asks for it, on every thread; it cannot
be removed, so one hook is installed per process and records only while a recorder is active.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_active: list[list[str]] = []
_lock = threading.Lock()
_installed = False


def _hook(event: str, args: tuple) -> None:
    if event != "open" or not _active or not args:
        return
    path = args[0]
    if isinstance(path, int):
        return  # an already open descriptor
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    with _lock:
        for rec in _active:
            rec.append(os.path.realpath(os.fspath(path)))


@contextmanager
def recording() -> Iterator[list[str]]:
    """The real paths (symlinks resolved) of every file opened inside the block, in order."""
    global _installed
    if not _installed:
        sys.addaudithook(_hook)
        _installed = True
    rec: list[str] = []
    with _lock:
        _active.append(rec)
    try:
        yield rec
    finally:
        with _lock:
            _active.remove(rec)


def under(paths: list[str], folder: str | Path) -> list[str]:
    """The recorded paths that are folder or lie under it (both taken with symlinks resolved)."""
    root = os.path.realpath(folder)
    return [p for p in paths if p == root or p.startswith(root.rstrip(os.sep) + os.sep)]
