"""The tensor I/O engine: safetensors files streamed to and from disk, hashed as they go.

What it does, for :mod:`llm360.rundir.checkpoint` (which decides what goes into which file):

- **write**: :func:`plan_safetensors` lays out a safetensors file piece by piece straight from the
  tensors' memory (no serialised copy) and starts its sha256; :func:`write_file` writes the pieces
  and queues the file's fsync on :class:`Pipeline`'s sync thread while the next file is written.
- **read**: :func:`read_file` reads a whole file once into one buffer while it is hashed;
  :func:`parse_safetensors` builds the tensors as views of that buffer (no second read, no copy);
  :func:`hash_file` only hashes; :func:`read_header` reads just the header (no data, no torch).

Speed: each large file's sha256 runs on a thread of its own (a lane, :class:`Sha256`) from the same
memory, starting before the writing does, so the hashes of several files run in parallel with each
other and with the I/O (hashlib and file I/O release the GIL). Large files (>= 64 MiB) are written
and read with O_DIRECT where the file system allows it (else through the page cache, as small files
always are): a buffered write or read copies every byte through the kernel, which on a machine with
few cores costs about as much as the hashing, while O_DIRECT moves the data between the disk and
page-aligned buffers with no copy (writes go through three 16 MiB staging buffers, a plain memcpy;
reads land in the final buffer). sha256 runs at ~1.8 GB/s per core, close to what a fast disk
writes, so on a machine with busy cores the hashing, not the disk, sets the speed. The price of
O_DIRECT: a file just written is not in the page cache, so reading it back comes from the disk.

torch is imported on first use, so reading a header (the report does, for every checkpoint) does
not load it.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import logging
import math
import mmap
import os
import struct
from collections import deque
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from llm360.errors import CheckpointError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

logger = logging.getLogger(__name__)

# Bytes per write/read call: the unit in which hashing overlaps with I/O.
_SLICE = 32 << 20
# Bytes of host copies (of GPU tensors) queued for hashing before the writer waits: bounds memory.
_MAX_PENDING = 512 << 20
# Pieces smaller than this are hashed on the calling thread (until a larger one starts a lane).
_INLINE = 1 << 20
# Files of at least this many bytes are written with O_DIRECT where the file system allows it.
_DIRECT_MIN = 64 << 20
# O_DIRECT staging: page-aligned buffers of this size (a multiple of _ALIGN), filled in turn.
_STAGE = 16 << 20
_STAGES = 3
# Memory address, length and file offset alignment of O_DIRECT writes (a multiple of every
# common logical block size: 512 and 4096 bytes).
_ALIGN = 4096
# Set to False for the rest of the process after a file system refuses O_DIRECT.
_direct_ok = bool(getattr(os, "O_DIRECT", 0))

HEADER_MAX = 100 << 20
"""Largest safetensors header accepted, in bytes (the format's own limit)."""


@cache
def _dtypes() -> dict[str, torch.dtype]:
    """safetensors dtype name -> torch dtype."""
    import torch

    return {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
        "U16": torch.uint16,
        "U32": torch.uint32,
        "U64": torch.uint64,
    }


@cache
def _dtype_names() -> dict[torch.dtype, str]:
    return {v: k for k, v in _dtypes().items()}


# ------------------------------------------------------------------------------ I/O machinery


class Sha256:
    """sha256 of a byte stream, computed on a worker thread of its own (a lane).

    Each file gets its own lane, so several files hash in parallel and hashing overlaps with the
    reads and writes (hashlib and file I/O release the GIL). Updates apply in submission order;
    the data must stay unchanged until hashed (queued memoryviews keep their buffers alive). With
    ``bounded``, at most _MAX_PENDING bytes wait, which bounds memory when the data are copies.
    Small streams are hashed inline, without a thread.
    """

    def __init__(self, *, bounded: bool = True) -> None:
        self._h = hashlib.sha256()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[Future[None], int]] = deque()
        self._pending_bytes = 0
        self._bounded = bounded
        self.size = 0

    def update(self, data: memoryview | bytes) -> Future[None] | None:
        n = len(data)
        self.size += n
        if self._pool is None:
            if n < _INLINE:
                self._h.update(data)
                return None
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="llm360-sha256")
        while self._bounded and self._pending and self._pending_bytes + n > _MAX_PENDING:
            fut, m = self._pending.popleft()
            fut.result()
            self._pending_bytes -= m
        fut = self._pool.submit(self._h.update, data)
        self._pending.append((fut, n))
        self._pending_bytes += n
        return fut

    def hexdigest(self) -> str:
        while self._pending:
            self._pending.popleft()[0].result()
        self._pending_bytes = 0
        self.close()
        return self._h.hexdigest()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


class Pipeline:
    """The hashing lanes of one save or load, and a thread that fsyncs finished files.

    Use it as a context manager around the writes and reads of one checkpoint: on exit every lane
    and thread is shut down. :meth:`wait_syncs` waits until every file written so far is on disk.
    """

    def __init__(self) -> None:
        self.sync_pool = ThreadPoolExecutor(1, thread_name_prefix="llm360-fsync")
        self.syncs: list[Future[None]] = []
        self._hashers: list[Sha256] = []
        self._stages: list[mmap.mmap] = []
        self._write_pool: ThreadPoolExecutor | None = None

    @property
    def write_pool(self) -> ThreadPoolExecutor:
        """The thread that sends O_DIRECT staging buffers to the disk."""
        if self._write_pool is None:
            self._write_pool = ThreadPoolExecutor(1, thread_name_prefix="llm360-write")
        return self._write_pool

    def stages(self) -> list[mmap.mmap]:
        """The page-aligned O_DIRECT staging buffers (anonymous maps), made on first use."""
        if not self._stages:
            self._stages = [mmap.mmap(-1, _STAGE) for _ in range(_STAGES)]
        return self._stages

    def hasher(self, *, bounded: bool = True) -> Sha256:
        """A new hashing lane, shut down with the pipeline."""
        h = Sha256(bounded=bounded)
        self._hashers.append(h)
        return h

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._hashers:
            h.close()
        if self._write_pool is not None:
            self._write_pool.shutdown(wait=True)
        self.sync_pool.shutdown(wait=True)
        for m in self._stages:
            try:
                m.close()
            except BufferError:  # a view is still held (e.g. by a traceback): the GC frees it later
                pass

    def wait_syncs(self) -> None:
        """Wait until every file queued by :func:`write_file` is fsynced (and closed); re-raises an error."""
        for f in self.syncs:
            f.result()
        self.syncs.clear()


def _tensor_bytes(t: Tensor) -> memoryview:
    """The raw bytes of t (row-major, native little-endian) as a memoryview, copied only if needed."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _in_host_memory(t: Tensor) -> bool:
    return t.device.type == "cpu"


def _write_all(f: Any, mv: memoryview) -> None:
    while len(mv):
        n = f.write(mv)
        mv = mv[n:]


def write_file(
    path: Path, pieces: Iterable[bytes | memoryview], pipe: Pipeline, hasher: Sha256 | None, size: int = 0
) -> None:
    """Write pieces to a new file (hashing them with hasher, if given) and queue its fsync on pipe.

    The file must not exist (FileExistsError). A file of ``size`` >= _DIRECT_MIN bytes goes through
    :func:`_write_direct` (no page-cache copy) where the file system supports O_DIRECT; otherwise,
    and for small files, plain buffered writes. The file is on disk once ``pipe.wait_syncs()``
    returns; OSError (disk full, ...) is raised here or there.
    """
    if size >= _DIRECT_MIN and _direct_ok and _write_direct(path, pieces, pipe, hasher):
        return
    f = open(path, "xb", buffering=0)  # noqa: SIM115 - closed by _fsync_close on the sync thread
    try:
        for part in _slices(pieces):
            if hasher is not None:
                hasher.update(part)
            _write_all(f, part)
    except BaseException:
        f.close()
        raise
    # Flushing this file to disk overlaps with writing the next one. (Flushing a file while it is
    # still being written, with periodic fdatasync, was measured to slow the writes down.)
    pipe.syncs.append(pipe.sync_pool.submit(_fsync_close, f))


def _slices(pieces: Iterable[bytes | memoryview]) -> Iterable[memoryview]:
    for piece in pieces:
        mv = memoryview(piece).cast("B")
        for off in range(0, len(mv), _SLICE):
            yield mv[off : off + _SLICE]


def _write_direct(path: Path, pieces: Iterable[bytes | memoryview], pipe: Pipeline, hasher: Sha256 | None) -> bool:
    """Write a file with O_DIRECT: the data go from page-aligned staging buffers straight to the disk.

    A buffered write copies every byte into the page cache, which costs as much CPU as a third of
    the sha256 of the same bytes; here the calling thread copies each slice into one of _STAGES
    aligned buffers (a plain memcpy, several times faster) while the pipeline's writer thread sends
    the previous ones to the disk. The last block is padded to the alignment and the file then
    truncated to its size. Returns False, having consumed nothing and left nothing behind, when the
    file system refuses O_DIRECT (checked with one aligned block before any data); then, and for the
    rest of the process, files are written the buffered way.
    """
    global _direct_ok
    stages = pipe.stages()
    fd = -1
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o666)
        os.write(fd, memoryview(stages[0])[:_ALIGN])  # the probe: overwritten by the data below
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError as e:
        if fd >= 0:
            os.close(fd)
            os.unlink(path)
        if e.errno != errno.EINVAL:
            raise
        _direct_ok = False
        logger.debug("O_DIRECT refused for %s (%s); checkpoints are written through the page cache", path, e)
        return False
    busy: list[Future[None] | None] = [None] * len(stages)

    def send(buf: mmap.mmap, n: int) -> None:
        with memoryview(buf) as whole:  # released even when a write fails (the buffer can close)
            done = 0
            while done < n:
                with whole[done:n] as rest:
                    done += os.write(fd, rest)

    try:
        i, fill, total = 0, 0, 0
        for part in _slices(pieces):
            if hasher is not None:
                hasher.update(part)
            total += len(part)
            while len(part):
                fut = busy[i]
                if fill == 0 and fut is not None:
                    busy[i] = None
                    fut.result()  # this buffer's previous contents are on the disk: reuse it
                k = min(_STAGE - fill, len(part))
                stages[i][fill : fill + k] = part[:k]
                fill, part = fill + k, part[k:]
                if fill == _STAGE:
                    busy[i] = pipe.write_pool.submit(send, stages[i], fill)
                    i, fill = (i + 1) % len(stages), 0
        for j in range(len(busy)):  # in submission order, oldest first
            fut = busy[(i + j) % len(busy)]
            if fut is not None:
                fut.result()
        if fill:
            padded = -(-fill // _ALIGN) * _ALIGN
            stages[i][fill:padded] = bytes(padded - fill)
            send(stages[i], padded)
        os.ftruncate(fd, total)
    except BaseException:
        for fut in busy:
            if fut is not None:
                fut.exception()  # wait: no write may still use fd or the buffers
        os.close(fd)
        raise
    pipe.syncs.append(pipe.sync_pool.submit(_fsync_close, open(fd, "wb", buffering=0)))  # noqa: SIM115
    return True


def _fsync_close(f: Any) -> None:
    try:
        os.fsync(f.fileno())
    finally:
        f.close()


def hash_file(path: Path, size: int, pipe: Pipeline) -> Sha256:
    """Start hashing a file of ``size`` bytes, reading the next block while earlier ones are hashed.

    Returns the file's lane: its :meth:`Sha256.hexdigest` waits for the end.
    """
    import torch

    h = pipe.hasher()
    block = max(1, min(_SLICE, size))
    views = [
        memoryview(torch.empty(block, dtype=torch.uint8).numpy()) for _ in range(3 if size > block else 1)
    ]
    futs: list[Future[None] | None] = [None] * len(views)
    with open(path, "rb", buffering=0) as f:
        i = 0
        while True:
            fut = futs[i]
            if fut is not None:
                fut.result()  # this buffer's previous block is hashed; safe to overwrite
            n = f.readinto(views[i])
            if not n:
                break
            futs[i] = h.update(views[i][:n])
            i = (i + 1) % len(views)
    return h


def read_file(path: Path, size: int, pipe: Pipeline) -> tuple[Tensor, Sha256]:
    """Read a whole file of ``size`` bytes into one uint8 tensor, hashing it as it arrives.

    Files of at least _DIRECT_MIN bytes are read with O_DIRECT where the file system allows it:
    the disk fills the (page-aligned) buffer itself, without a copy through the page cache. The
    digest of the returned lane covers what was read; a file of another size than ``size`` gets a
    digest that matches nothing.
    """
    import torch

    if size >= _DIRECT_MIN and _direct_ok:
        got = _read_direct(path, size, pipe)
        if got is not None:
            return got
    return _read_into(open(path, "rb", buffering=0), torch.empty(size, dtype=torch.uint8), size, pipe)


def _read_direct(path: Path, size: int, pipe: Pipeline) -> tuple[Tensor, Sha256] | None:
    """:func:`read_file` with O_DIRECT; None, having read nothing, where the file system refuses it.

    Reads cover whole blocks, so the buffer is ``size`` rounded up to the alignment (the file ends
    inside its last block); whether O_DIRECT reads work is checked with one block first.
    """
    import torch

    global _direct_ok
    span = -(-size // _ALIGN) * _ALIGN
    raw = torch.empty(span + _ALIGN, dtype=torch.uint8)
    start = -raw.data_ptr() % _ALIGN
    buf = raw[start : start + span]
    f = None
    try:
        f = open(os.open(path, os.O_RDONLY | os.O_DIRECT), "rb", buffering=0)  # noqa: SIM115
        f.readinto(memoryview(buf.numpy())[:_ALIGN])  # the probe: read again by _read_into
        f.seek(0)
    except OSError as e:
        if f is not None:
            f.close()
        if e.errno != errno.EINVAL:
            raise
        _direct_ok = False
        logger.debug("O_DIRECT reads refused for %s (%s); reading through the page cache", path, e)
        return None
    return _read_into(f, buf, size, pipe, block=_ALIGN)


def _read_into(f: Any, buf: Tensor, size: int, pipe: Pipeline, block: int = 1) -> tuple[Tensor, Sha256]:
    """Read the unbuffered file f into buf (``size`` bytes, or more for whole O_DIRECT blocks) and
    close it, in reads of a multiple of ``block`` bytes; the first ``size`` bytes are hashed as
    they arrive. Returns them and their hash lane."""
    mv = memoryview(buf.numpy())
    span = len(mv)
    step = max(block, _SLICE - _SLICE % block)
    h = pipe.hasher(bounded=False)  # the buffer is kept anyway: no need to hold the reader back
    with f:
        off = 0
        while off < span:
            n = f.readinto(mv[off : min(off + step, span)])
            if not n:
                break
            h.update(mv[off : off + min(n, max(0, size - off))])
            off += n
        if off != size or os.fstat(f.fileno()).st_size != size:
            h.update(b"(the file changed size while it was read)")
    return buf[:size], h


# -------------------------------------------------------------------------------- safetensors


class Plan(NamedTuple):
    """How to write one file (:func:`write_plan`)."""

    pieces: Iterable[bytes | memoryview]
    feed: Sha256 | None
    """The lane to feed the pieces to while they are written; None: hashing already started."""
    lane: Sha256
    """The file's hash (and size, once :meth:`Sha256.hexdigest` returned)."""
    size: int
    """Bytes of the file."""


def write_plan(path: Path, plan: Plan, pipe: Pipeline) -> None:
    """Write a planned file to a new path (:func:`write_file`)."""
    write_file(path, plan.pieces, pipe, plan.feed, plan.size)


def plan_safetensors(
    tensors: Mapping[str, Tensor], pipe: Pipeline, metadata: Mapping[str, str] | None = None
) -> Plan:
    """The safetensors serialisation of tensors, piece by piece, without copying tensor data.

    Tensors are laid out by decreasing element size, then name, so every tensor starts at an
    offset aligned to its element size (the data section starts 8-aligned) and loads as a view.
    When every tensor is in CPU memory, hashing starts at once on the file's own lane, so it runs
    in parallel with the writing of this and the other files; otherwise (GPU tensors) each piece is
    copied to the host, hashed and written in turn.
    """
    names = _dtype_names()
    items = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    off = 0
    for name, t in items:
        if t.dtype not in names:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in safetensors")
        n = t.numel() * t.element_size()
        header[name] = {
            "dtype": names[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [off, off + n],
        }
        off += n
    hb = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    hb += b" " * (-len(hb) % 8)
    head = struct.pack("<Q", len(hb)) + hb
    if all(_in_host_memory(t) for _, t in items):
        pieces: list[bytes | memoryview] = [head] + [_tensor_bytes(t) for _, t in items]
        h = pipe.hasher(bounded=False)
        for piece in pieces:
            h.update(piece)
        return Plan(pieces, None, h, len(head) + off)
    h = pipe.hasher()
    return Plan(itertools.chain([head], (_tensor_bytes(t) for _, t in items)), h, h, len(head) + off)


def plan_bytes(data: bytes, pipe: Pipeline) -> Plan:
    """A file holding data as it is; its hash starts at once."""
    h = pipe.hasher(bounded=False)
    h.update(data)
    return Plan([data], None, h, len(data))


def _header_length(first8: bytes, total: int) -> int:
    """The header length a safetensors file of ``total`` bytes declares in its first 8 bytes; ValueError if impossible."""
    if total < 8 or len(first8) < 8:
        raise ValueError("shorter than its 8-byte header length")
    n = int.from_bytes(first8[:8], "little")
    if n > total - 8:
        raise ValueError(f"header length {n} exceeds the file")
    if n > HEADER_MAX:
        raise ValueError(f"header length {n} exceeds the format's limit ({HEADER_MAX} bytes)")
    return n


def _decode_header(raw: bytes) -> dict[str, Any]:
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, read without its data (and without torch).

    ``{tensor name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...}``, plus
    ``"__metadata__"`` when the file has one; the entries are not checked here. Raises OSError when
    the file cannot be read, CheckpointError (naming the file) when it is not a safetensors file.
    """
    path = Path(path)
    with open(path, "rb") as f:
        try:
            n = _header_length(f.read(8), os.fstat(f.fileno()).st_size)
            return _decode_header(f.read(n))
        except ValueError as e:  # UnicodeDecodeError and JSONDecodeError included
            raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from None


def parse_safetensors(buf: Tensor, what: str) -> dict[str, Tensor]:
    """Tensors of a safetensors file held in a uint8 buffer, as views of it (copied if misaligned).

    Every entry is checked against the buffer; CheckpointError (naming ``what``) if one does not fit.
    """
    import torch

    dtypes = _dtypes()
    total = buf.numel()
    raw = buf.numpy()
    try:
        n = _header_length(raw[:8].tobytes(), total)
        header = _decode_header(raw[8 : 8 + n].tobytes())
        base = 8 + n
        out: dict[str, Tensor] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = dtypes[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            b, e = (int(x) for x in info["data_offsets"])
            itemsize = torch.empty((), dtype=dtype).element_size()
            if not 0 <= b <= e <= total - base or (e - b) != math.prod(shape) * itemsize:
                raise ValueError(f"tensor {name!r}: data offsets {b}..{e} do not fit its shape {shape}")
            part = buf[base + b : base + e]
            if (base + b) % itemsize:
                part = part.clone()
            out[name] = part.view(dtype).reshape(shape)
        return out
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{what} is not a valid safetensors file: {e}") from None

