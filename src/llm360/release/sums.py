"""A release's ``SHA256SUMS``: its format, hashing files in parallel, and what may be read.

``SHA256SUMS`` is in ``sha256sum`` format (``<64 hex>  <path>``, one line per file, sorted by
path), so ``sha256sum -c SHA256SUMS`` checks a release without llm360. Paths are relative to the
release folder, '/'-separated.

Reading a release never leaves it: :func:`walk` lists its entries without following a symlink,
:func:`entry_problem` refuses an entry that is absolute, contains ``..`` or goes through a
symlink, and :func:`hash_files` opens files with ``O_NOFOLLOW``. A release holds regular files
only; a symlink in one is itself a problem (``llm360 release`` never writes one).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path, PurePosixPath

from llm360.errors import Llm360Error
from llm360.rundir.layout import RELEASE_SUMS, Listing

SUMS = RELEASE_SUMS
_BLOCK = 4 << 20  # bytes per read: large enough that syscalls cost nothing next to sha256
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


class ReleaseError(Llm360Error):
    """The run cannot be released as it is, or a release cannot be read."""


def default_threads() -> int:
    """Hashing threads when none are asked for: min(4, the CPU cores this process may use)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


# ------------------------------------------------------------------------------------ format


def format_sums(sums: Mapping[str, str]) -> str:
    """The text of a SHA256SUMS file for ``{path: sha256}``, sorted by path."""
    return "".join(f"{sums[rel]}  {rel}\n" for rel in sorted(sums))


def read_sums(root: Path) -> dict[str, str]:
    """``{path: sha256}`` of ``root/SHA256SUMS``, as written (entries are not checked for safety
    here: :func:`entry_problem`). Raises ReleaseError naming the first malformed line."""
    path = root / SUMS
    out: dict[str, str] = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        h, sep, rel = line.partition("  ")
        if not sep or len(h) != 64:
            raise ReleaseError(f"{path}:{i}: not a sha256sum line: {line[:80]!r}")
        out[rel] = h
    return out


# ------------------------------------------------------------------------------ what is there


def link_target(root: Path, rel: str, listing: Listing) -> str:
    """Where the symlink ``rel`` points, and whether that is inside root (resolved without opening it)."""
    real_root = os.path.realpath(root)
    resolved = os.path.realpath(root / rel)
    inside = resolved == real_root or resolved.startswith(real_root.rstrip(os.sep) + os.sep)
    return f"{listing.links[rel]}, {'inside' if inside else 'outside'} the release"


def entry_problem(root: Path, rel: str, listing: Listing) -> str | None:
    """Why the SHA256SUMS entry ``rel`` must not be opened (None: it is a path inside the release).

    Refused, without touching the path: absolute paths, any ``..`` part, and paths that are, or
    go through, a symlink (whether it resolves inside the release or outside).
    """
    what = f"refused {SUMS} entry {rel!r}"
    p = PurePosixPath(rel)
    if p.is_absolute():
        return f"{what}: an absolute path, outside the release; it was not opened"
    if ".." in p.parts:
        return f"{what}: it contains '..' and so may point outside the release; it was not opened"
    if "\x00" in rel or not rel or any(part in ("", ".") for part in rel.split("/")):
        return f"{what}: not a plain relative path inside the release; it was not opened"
    parts = rel.split("/")
    for n in range(1, len(parts) + 1):
        prefix = "/".join(parts[:n])
        if prefix in listing.links:
            where = "it is a symlink" if n == len(parts) else f"it lies under the symlink {prefix}"
            return (f"{what}: {where} (-> {link_target(root, prefix, listing)}); a release holds regular "
                    "files only, so it was not opened")
    if rel in listing.other:
        return f"{what}: not a regular file (a FIFO, socket or device); it was not opened"
    return None


# ---------------------------------------------------------------------------------- hashing


def sha256_nofollow(path: str | Path, buf: bytearray | None = None) -> str:
    """sha256 of a regular file, opened with O_NOFOLLOW (a symlink raises OSError, ELOOP).

    ``buf``: a reusable read buffer (one per thread); reads go straight into it, and hashlib
    releases the GIL while it hashes, so threads hash files in parallel.
    """
    h = hashlib.sha256()
    view = memoryview(buf if buf is not None else bytearray(_BLOCK))
    fd = os.open(path, _OPEN_FLAGS)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        with open(fd, "rb", buffering=0, closefd=False) as f:
            while n := f.readinto(view):
                h.update(view[:n])
    finally:
        os.close(fd)
    return h.hexdigest()


def hash_files(
    paths: Iterable[tuple[str, Path]],
    threads: int | None = None,
    *,
    done: Callable[[str], None] | None = None,
) -> dict[str, str | OSError]:
    """sha256 of each ``(key, path)``, on a pool of ``threads`` threads (default :func:`default_threads`).

    Larger files start first, so one big file does not end the run alone. Returns ``{key: hex
    digest}``, or the OSError that prevented reading that file (the others are still hashed).
    ``done(key)`` is called on the calling thread as each file finishes (a progress bar).
    Memory: one read buffer of 4 MiB per thread.
    """
    items = list(paths)
    n = max(1, threads or default_threads())

    def size(p: Path) -> int:
        try:
            return os.lstat(p).st_size
        except OSError:
            return 0

    items.sort(key=lambda kp: -size(kp[1]))
    out: dict[str, str | OSError] = {}
    if n == 1 or len(items) <= 1:
        buf = bytearray(_BLOCK)
        for key, p in items:
            out[key] = _hash_or_error(p, buf)
            if done is not None:
                done(key)
        return out
    import threading

    local = threading.local()

    def task(p: Path) -> str | OSError:
        if not hasattr(local, "buf"):
            local.buf = bytearray(_BLOCK)
        return _hash_or_error(p, local.buf)

    with ThreadPoolExecutor(min(n, len(items)), thread_name_prefix="llm360-sha256") as pool:
        futures = {pool.submit(task, p): key for key, p in items}
        for fut in as_completed(futures):
            out[futures[fut]] = fut.result()
            if done is not None:
                done(futures[fut])
    return out


def _hash_or_error(p: Path, buf: bytearray) -> str | OSError:
    try:
        return sha256_nofollow(p, buf)
    except OSError as e:
        return e
