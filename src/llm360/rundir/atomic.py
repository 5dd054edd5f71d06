"""Writes that readers see whole or not at all, and the run directory's lock.

Every file a stage writes into a run directory goes through here: written under a hidden temporary
name, fsynced, renamed, and the parent folder fsynced, so a reader (or a resumed run) never sees
half a file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import IO, Any

_SAME_CHECK_MAX = 16 << 20  # files up to this size are compared before being rewritten


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so a rename inside it is durable (no-op where unsupported)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write data to path via a temporary file, fsync, then rename: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # the same bytes are already there: leave the file (and its mtime) alone
        if path.stat().st_size == len(data) and len(data) <= _SAME_CHECK_MAX and path.read_bytes() == data:
            return
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any, *, atomic: bool = True) -> None:
    """Write obj as indented, key-sorted JSON (stable bytes for equal content)."""
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    if atomic:
        atomic_write_text(Path(path), text)
    else:
        Path(path).write_text(text, encoding="utf-8")


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def hold_lock(path: Path, doing: str) -> IO[str]:
    """Take an exclusive lock on ``path`` for as long as the returned file stays open.

    ``flock``: the kernel releases it when the file is closed or the process dies, SIGKILL included,
    so a lock is never stale. The file says who holds it and for what (``doing``, e.g. "being
    trained"). Raises RunDirError when another process holds it; where the file system has no flock
    (some network mounts), goes on unlocked with a warning.
    """
    import fcntl
    import logging
    import socket
    import time

    from llm360.errors import RunDirError

    f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 -- held until the caller closes it
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "in use by another process"
        f.close()
        raise RunDirError(
            f"{path.parent} is already {holder} ({path} is locked); wait for it to finish or stop it: "
            "a run directory is prepared or trained by one process at a time"
        ) from None
    except OSError as e:
        logging.getLogger(__name__).warning("%s: cannot lock (%s); two processes could write here at once", path, e)
        return f
    f.seek(0)
    f.truncate()
    f.write(f"{doing} by pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
    f.flush()
    return f
