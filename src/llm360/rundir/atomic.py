"""Writes that readers see whole or not at all, leftover recovery, and the run directory's lock.

Every file or folder a stage writes into a run directory goes through here. A file is written under
a hidden temporary name beside it, fsynced, renamed, and the parent folder fsynced
(:func:`atomic_path`, :func:`atomic_write_bytes`); a folder is staged the same way as a whole
(:func:`staged`, :func:`install`, :func:`atomic_folder`). So a reader, or a resumed run, never sees
half a file or half a folder.

Hidden names, all spelled by :func:`temp_name`: ``.<name>.tmp-<pid>`` (being written, or being
deleted), ``.<name>.old-<pid>`` (the previous ``<name>``, moved aside while a new one is renamed
in) and ``.<name>.work-<pid>`` (scratch space of a running stage). A kill leaves at most these
behind; :func:`clean_leftovers` applies the one recovery rule to them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Literal

from llm360.errors import Llm360Error, RunDirError

logger = logging.getLogger(__name__)

_SAME_CHECK_MAX = 16 << 20  # files up to this size are compared before being rewritten

TempKind = Literal["tmp", "old", "work"]
_LEFTOVER_RE = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old|work)-(?P<pid>\d+)")

_in_progress: set[str] = set()  # hidden files and folders this process is writing right now
_in_progress_lock = threading.Lock()


@contextmanager
def _writing(tmp: Path) -> Iterator[None]:
    """Register tmp as being written by this process while the block runs (see :func:`clean_leftovers`)."""
    key = os.path.realpath(tmp)  # the same entry whichever path (relative, via a link) names it
    with _in_progress_lock:
        _in_progress.add(key)
    try:
        yield
    finally:
        with _in_progress_lock:
            _in_progress.discard(key)


def temp_name(name: str, kind: TempKind = "tmp", pid: int | None = None) -> str:
    """The hidden name ``.<name>.<kind>-<pid>`` (this process's pid by default) of a temporary sibling."""
    return f".{name}.{kind}-{os.getpid() if pid is None else pid}"


def is_leftover(name: str) -> bool:
    """Whether a folder entry's name is one of :func:`temp_name`'s (a save in progress or a leftover)."""
    return _LEFTOVER_RE.fullmatch(name) is not None


# ------------------------------------------------------------------------------------ fsync


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


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path, *, files: bool = True) -> None:
    """fsync every file (unless ``files`` is False: the caller synced them) and folder under folder.

    Folders go deepest first, so each one's entries are durable before its own name is.
    """
    dirs: list[Path] = []
    for top, _, names in os.walk(folder):
        dirs.append(Path(top))
        if files:
            for n in names:
                p = Path(top) / n
                if not p.is_symlink():
                    _fsync_file(p)
    for d in sorted(dirs, key=lambda p: -len(p.parts)):
        fsync_dir(d)


def make_dirs(folder: Path) -> None:
    """``mkdir -p`` whose new folders' names are durable too (each new one's parent is fsynced)."""
    folder = Path(folder)
    created = [q for q in (folder, *folder.parents) if not q.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    for q in reversed(created):
        fsync_dir(q.parent)


# ------------------------------------------------------------------------------------ files


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A hidden temporary path beside ``path`` for the block to write; renamed over ``path`` at its end.

    When the block ends without an error the file is fsynced and renamed to ``path`` (replacing
    what was there), and the folder fsynced: readers see the old file or the new one, never half.
    On an error the temporary file is removed and ``path`` is untouched. The parent folder is
    created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(temp_name(path.name))
    with _writing(tmp):
        try:
            yield tmp
            _fsync_file(tmp)  # the data are on disk before the name points at them
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write data to path via a temporary file, fsync, then rename: readers see old or new, never half."""
    path = Path(path)
    try:  # the same bytes are already there: leave the file (and its mtime) alone
        if path.stat().st_size == len(data) and len(data) <= _SAME_CHECK_MAX and path.read_bytes() == data:
            return
    except OSError:
        pass
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_bytes(obj: Any, *, allow_nan: bool = True) -> bytes:
    """Indented, key-sorted UTF-8 JSON ending in a newline: equal content gives equal bytes.

    Raises TypeError/ValueError for what JSON cannot hold (NaN and infinities too, unless allow_nan).
    """
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=allow_nan) + "\n").encode()


def write_json(path: Path, obj: Any, *, atomic: bool = True) -> None:
    """Write obj as :func:`json_bytes` (stable bytes for equal content)."""
    if atomic:
        atomic_write_bytes(Path(path), json_bytes(obj))
    else:
        Path(path).write_bytes(json_bytes(obj))


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------- folders


@contextmanager
def staged(final: str | Path, kind: TempKind = "tmp") -> Iterator[Path]:
    """A new, empty hidden folder ``.<final's name>.<kind>-<pid>`` beside ``final``, for the block.

    It is registered as being written by this process (so :func:`clean_leftovers` leaves it alone)
    and deleted when the block ends, however it ends: call :func:`install` inside the block to
    rename it to ``final`` (with ``kind="work"``: scratch space that is never installed). The
    parent folders are created durably. A stale folder of the same name (a previous attempt of
    this process) is replaced.
    """
    final = Path(final)
    make_dirs(final.parent)
    tmp = final.parent / temp_name(final.name, kind)
    with _writing(tmp):
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def install(tmp: Path, final: Path) -> None:
    """Rename the finished folder tmp to final (already fsynced by the caller); an existing final is replaced.

    A replaced folder is first moved aside to ``.<name>.old-<pid>``, the new one renamed in, the
    parent fsynced, and only then the old one deleted. A kill between the two renames leaves no
    ``final`` and the old folder aside, which :func:`clean_leftovers` renames back.
    """
    parent = final.parent
    if not final.exists():
        os.rename(tmp, final)
        fsync_dir(parent)
        return
    old = parent / temp_name(final.name, "old")
    if old.exists():
        shutil.rmtree(old)
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(old, final)
        raise
    fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_folder(final: str | Path) -> Iterator[Path]:
    """Build a folder in :func:`staged`; when the block ends without error, fsync all of it and :func:`install` it.

    Readers see the old ``final``, or the new one with every file on disk; never a part of it.
    """
    final = Path(final)
    with staged(final) as tmp:
        yield tmp
        fsync_tree(tmp)
        install(tmp, final)


def remove_folder(folder: str | Path) -> None:
    """Delete a folder; it is renamed to a hidden name first, so a kill never leaves half of it under its name."""
    d = Path(folder)
    if not d.exists():
        return
    aside = d.parent / temp_name(d.name)
    if aside.exists():
        shutil.rmtree(aside)
    os.rename(d, aside)
    fsync_dir(d.parent)
    shutil.rmtree(aside, ignore_errors=True)


# -------------------------------------------------------------------------------- leftovers


def _writer_alive(pid: int, path: Path) -> bool:
    if pid == os.getpid():
        with _in_progress_lock:
            return os.path.realpath(path) in _in_progress
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """Whether a process has exited but is not reaped yet (Linux: its /proc state is Z or X). A worker
    killed with its parent stays so until init reaps it; ``kill(pid, 0)`` still finds it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # no /proc (not Linux), or the process is gone now: kill() has the last word
    return stat.rpartition(")")[2][1:2] in ("Z", "X")  # the state follows the parenthesised command name


def clean_leftovers(
    folder: Path, *, check_old: Callable[[Path], object] | None = None, only: str | None = None,
    writers_done: bool = False,
) -> None:
    """Finish what interrupted writes left in folder (one level): the one recovery rule.

    For each hidden ``.<name>.<kind>-<pid>`` entry (:func:`temp_name`) whose process is gone, or is
    this one but no longer writing it: an ``old`` one (a replace interrupted between its two
    renames) is renamed back to ``<name>`` when nothing has that name, once ``check_old`` (e.g. a
    verification that raises an llm360 error) accepts it; every other one is deleted. Entries of
    live processes are left alone, unless ``writers_done``: the caller knows that nothing writes
    into folder any more (a stage that holds the run's lock, with all its own tasks finished), so a
    pid that still answers is a dying or reused one. ``only``: just the entries of that name. Call it
    while no other process of this machine may be writing into folder under the same names it is
    about to reuse.
    """
    if not folder.is_dir():
        return
    for e in sorted(folder.iterdir(), key=lambda p: ".old-" not in p.name):  # `.old-` ones first
        m = _LEFTOVER_RE.fullmatch(e.name)
        if not m or e.is_symlink() or (only is not None and m["name"] != only):
            continue
        pid = int(m["pid"])
        if not writers_done and _writer_alive(pid, e):
            logger.warning("leaving %s: process %d may still be writing it", e, pid)
            continue
        final = folder / m["name"]
        if m["kind"] == "old" and not final.exists():
            try:
                if check_old is not None:
                    check_old(e)
            except Llm360Error as err:
                logger.warning(
                    "leaving %s in place: a write replacing %s was interrupted and it does not verify: %s",
                    e, final.name, err,
                )  # fmt: skip
                continue
            os.rename(e, final)
            fsync_dir(folder)
            logger.warning("restored %s: a write replacing it was interrupted", final)
            continue
        logger.warning("removing %s, left by an interrupted write (pid %d)", e, pid)
        if e.is_dir():
            shutil.rmtree(e, ignore_errors=True)
        else:
            e.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------- lock


def hold_lock(path: Path, doing: str) -> IO[str]:
    """Take an exclusive lock on ``path`` for as long as the returned file stays open.

    ``flock``: the kernel releases it when the file is closed or the process dies, SIGKILL included,
    so a lock is never stale. The file says who holds it and for what (``doing``, e.g. "being
    trained"). Raises RunDirError when another process holds it; where the file system has no flock
    (some network mounts), goes on unlocked with a warning.
    """
    import fcntl
    import socket
    import time

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
        logger.warning("%s: cannot lock (%s); two processes could write here at once", path, e)
        return f
    f.seek(0)
    f.truncate()
    f.write(f"{doing} by pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
    f.flush()
    return f
