"""Complete-or-absent checkpoints (DESIGN.md promises 3, 4 and 7).

A checkpoint is one folder; nothing in it is a pickle::

    ckpt_007/
      model.safetensors        fp32 weights under their Hugging Face names (the model's state_dict keys)
      optimizer.safetensors    optimizer state per parameter, keyed "<state>/<parameter name>",
                               e.g. exp_avg/model.layers.0.self_attn.q_proj.weight, exp_avg_sq/..., step/...
      optimizer.json           optimizer class and param groups: hyperparameters + parameter names
      trainer_state.json       what the trainer needs to resume (step, chunk, data cursor, tokens, ...)
      rng_state.safetensors    torch CPU generator state ("torch"), the CUDA one ("cuda") if used
      rng_state.json           numpy and python `random` states, and where each tensor went
      config.json, ...         extra files given by the caller (HF config, config.yaml, tokenizer)
      COMPLETE.json            the marker: sha256 and size of every other file; written last

Chunk checkpoints are ``checkpoints/ckpt_NNN`` (see :meth:`llm360.rundir.layout.RunDir.ckpt_dir`);
intra-chunk ones (``train.checkpoint_every_steps``) are ``checkpoints/steps/step_XXXXXXXX``
(:func:`step_checkpoint_dir`, the global optimizer step, 8 digits or more).

How a save stays complete-or-absent: every file is written into a hidden sibling
``.<name>.tmp-<pid>``, hashed while it is written, and fsynced; the marker is written last, into
that same folder; the folder is fsynced and only then renamed to its final name, and the parent is
fsynced. The final name therefore only ever points at a folder whose files, marker included, are
already on disk. A kill before the rename leaves a hidden temporary folder that no loader looks at
(:func:`latest_complete_checkpoint` removes it); a kill after it leaves a complete checkpoint. A
re-save of an existing name moves the old folder aside (``.<name>.old-<pid>``), renames the new one
in, then deletes the old; a kill between the two renames leaves the old folder aside, and
:func:`latest_complete_checkpoint` renames it back. Loading always checks the marker and every
hash first, so a folder without its marker, or one damaged after the fact (a disk error, a partial
copy, a hand edit), is refused with an error that names the file.

Speed: safetensors files are written by a small streaming writer of the safetensors format, straight
from the tensors' memory (no serialised copy). Each large file's sha256 is computed on a thread of
its own from the same memory, starting before the writing does, so the hashes of the optimizer and
model files run in parallel with each other and with the writes; another thread fsyncs each
finished file while the next is written. Large files (>= 64 MiB) are written and read with O_DIRECT
where the file system allows it (else through the page cache, as small files always are): a
buffered write or read copies every byte through the kernel, which on a machine with few cores
costs about as much as the hashing, while O_DIRECT moves the data between the disk and page-aligned
buffers with no copy (writes go through three 16 MiB staging buffers, a plain memcpy; reads land in
the final buffer). Loading reads each file once into one buffer while it is hashed, and builds the
tensors as views of that buffer (no second read, no copy for the optimizer state on CPU). sha256
runs at ~1.8 GB/s per core, close to what a fast disk writes, so on a machine with busy cores the
hashing, not the disk, sets the speed. The price of O_DIRECT: a checkpoint just written is not in
the page cache, so reading it back comes from the disk.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import logging
import mmap
import os
import random
import re
import shutil
import struct
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from llm360.errors import CheckpointError
from llm360.rundir.atomic import fsync_dir

logger = logging.getLogger(__name__)

MARKER = "COMPLETE.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
TRAINER_STATE = "trainer_state.json"
RNG_FILE = "rng_state.safetensors"
RNG_META = "rng_state.json"
RESERVED = frozenset({MARKER, MODEL_FILE, OPTIMIZER_FILE, OPTIMIZER_META, TRAINER_STATE, RNG_FILE, RNG_META})

STEPS_DIR = "steps"
"""Sub-folder of ``checkpoints/`` holding the intra-chunk (``checkpoint_every_steps``) checkpoints."""

_FORMAT = "llm360-checkpoint"
_VERSION = 1
_CKPT_RE = re.compile(r"ckpt_(\d{3,})")
_STEP_RE = re.compile(r"step_(\d{8,})")
_LEFTOVER_RE = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)")
_SHA_RE = re.compile(r"[0-9a-f]{64}")

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
# Param-group keys that describe how the optimizer runs on this machine, not the training state:
# they are kept from the live optimizer on load.
_IMPL_KEYS = frozenset({"foreach", "fused", "capturable", "differentiable"})

_DTYPES: dict[str, torch.dtype] = {
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
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}

_in_progress: set[str] = set()  # temporary folders this process is writing right now
_in_progress_lock = threading.Lock()


# ------------------------------------------------------------------------------------- names


def step_checkpoint_dir(checkpoints_dir: str | Path, step: int) -> Path:
    """Folder of the intra-chunk checkpoint taken after ``step`` optimizer steps (global, 0-based count)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return Path(checkpoints_dir) / STEPS_DIR / f"step_{step:08d}"


def param_name_map(model: nn.Module) -> dict[int, str]:
    """``id(parameter) -> name`` for every parameter of model (tied ones under their first name).

    Wrapper prefixes (``module.`` from DDP, ``_orig_mod.`` from torch.compile) are dropped, so the
    names equal the unwrapped model's state_dict keys.
    """
    out: dict[int, str] = {}
    for name, p in model.named_parameters():
        while True:
            for prefix in ("module.", "_orig_mod."):
                if name.startswith(prefix):
                    name = name[len(prefix) :]
                    break
            else:
                break
        out[id(p)] = name
    return out


def _names_by_id(param_names: nn.Module | Mapping[Any, str]) -> dict[int, str]:
    if isinstance(param_names, nn.Module):
        return param_name_map(param_names)
    return {k if isinstance(k, int) else id(k): v for k, v in param_names.items()}


# ------------------------------------------------------------------------------ I/O machinery


class _Sha256:
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


class _Pipeline:
    """The hashing lanes of one save/load, and a thread that fsyncs finished files."""

    def __init__(self) -> None:
        self.sync_pool = ThreadPoolExecutor(1, thread_name_prefix="llm360-fsync")
        self.syncs: list[Future[None]] = []
        self._hashers: list[_Sha256] = []
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

    def hasher(self, *, bounded: bool = True) -> _Sha256:
        h = _Sha256(bounded=bounded)
        self._hashers.append(h)
        return h

    def __enter__(self) -> _Pipeline:
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
        for f in self.syncs:
            f.result()
        self.syncs.clear()


def _tensor_bytes(t: Tensor) -> memoryview:
    """The raw bytes of t (row-major, native little-endian) as a memoryview, copied only if needed."""
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


def _write_file(
    path: Path, pieces: Iterable[bytes | memoryview], pipe: _Pipeline, hasher: _Sha256 | None, size: int = 0
) -> None:
    """Write pieces to a new file (hashing them with hasher, if given) and queue its fsync.

    A file of ``size`` >= _DIRECT_MIN bytes goes through :func:`_write_direct` (no page-cache copy)
    where the file system supports O_DIRECT; otherwise, and for small files, plain buffered writes.
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


def _write_direct(path: Path, pieces: Iterable[bytes | memoryview], pipe: _Pipeline, hasher: _Sha256 | None) -> bool:
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


def _hash_file(path: Path, size: int, pipe: _Pipeline) -> _Sha256:
    """Start hashing a file, reading the next block while earlier ones are hashed; returns the lane."""
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


def _read_file(path: Path, size: int, pipe: _Pipeline) -> tuple[Tensor, _Sha256]:
    """Read a whole file of ``size`` bytes into one uint8 tensor, hashing it as it arrives.

    Files of at least _DIRECT_MIN bytes are read with O_DIRECT where the file system allows it:
    the disk fills the (page-aligned) buffer itself, without a copy through the page cache.
    """
    if size >= _DIRECT_MIN and _direct_ok:
        got = _read_direct(path, size, pipe)
        if got is not None:
            return got
    return _read_into(open(path, "rb", buffering=0), torch.empty(size, dtype=torch.uint8), size, pipe)


def _read_direct(path: Path, size: int, pipe: _Pipeline) -> tuple[Tensor, _Sha256] | None:
    """:func:`_read_file` with O_DIRECT; None, having read nothing, where the file system refuses it.

    Reads cover whole blocks, so the buffer is ``size`` rounded up to the alignment (the file ends
    inside its last block); whether O_DIRECT reads work is checked with one block first.
    """
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


def _read_into(f: Any, buf: Tensor, size: int, pipe: _Pipeline, block: int = 1) -> tuple[Tensor, _Sha256]:
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


def _canonical_json(obj: Any, *, allow_nan: bool = False) -> bytes:
    """Indented, key-sorted JSON: equal content gives equal bytes."""
    return (
        json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=allow_nan) + "\n"
    ).encode()


def _json_payload(obj: Any, what: str) -> bytes:
    try:
        return _canonical_json(obj, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serialisable (no pickle in checkpoints): {e}") from None


# -------------------------------------------------------------------------------- safetensors


_Plan = tuple[Iterable[bytes | memoryview], _Sha256 | None, _Sha256, int]
"""How to write one file: (pieces, hasher to feed while writing or None, the file's hash, its size)."""


def _plan_safetensors(
    tensors: Mapping[str, Tensor], pipe: _Pipeline, metadata: Mapping[str, str] | None = None
) -> _Plan:
    """The safetensors serialisation of tensors, piece by piece, without copying tensor data.

    Tensors are laid out by decreasing element size, then name, so every tensor starts at an
    offset aligned to its element size (the data section starts 8-aligned) and loads as a view.
    When every tensor is in CPU memory, hashing starts at once on the file's own lane, so it runs
    in parallel with the writing of this and the other files; otherwise (GPU tensors) each piece is
    copied to the host, hashed and written in turn.
    """
    items = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    off = 0
    for name, t in items:
        if t.dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in safetensors")
        n = t.numel() * t.element_size()
        header[name] = {
            "dtype": _DTYPE_NAMES[t.dtype],
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
        return pieces, None, h, len(head) + off
    h = pipe.hasher()
    return itertools.chain([head], (_tensor_bytes(t) for _, t in items)), h, h, len(head) + off


def _plan_bytes(data: bytes, pipe: _Pipeline) -> _Plan:
    h = pipe.hasher(bounded=False)
    h.update(data)
    return [data], None, h, len(data)


def _parse_safetensors(buf: Tensor, what: str) -> dict[str, Tensor]:
    """Tensors of a safetensors file held in a uint8 buffer, as views of it (copied if misaligned)."""
    total = buf.numel()
    raw = buf.numpy()
    try:
        if total < 8:
            raise ValueError("shorter than its 8-byte header length")
        n = int.from_bytes(raw[:8].tobytes(), "little")
        if n > total - 8:
            raise ValueError(f"header length {n} exceeds the file")
        header = json.loads(raw[8 : 8 + n].tobytes())
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        base = 8 + n
        out: dict[str, Tensor] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            b, e = (int(x) for x in info["data_offsets"])
            itemsize = torch.empty((), dtype=dtype).element_size()
            if not 0 <= b <= e <= total - base or (e - b) != int(np.prod(shape, dtype=np.int64)) * itemsize:
                raise ValueError(f"tensor {name!r}: data offsets {b}..{e} do not fit its shape {shape}")
            part = buf[base + b : base + e]
            if (base + b) % itemsize:
                part = part.clone()
            out[name] = part.view(dtype).reshape(shape)
        return out
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{what} is not a valid safetensors file: {e}") from None


# ------------------------------------------------------------------------------------ marker


def _marker_bytes(files: Mapping[str, Mapping[str, Any]]) -> bytes:
    # The marker carries a hash of its own file list, and its bytes must be canonical, so any change
    # to it (even one hex digit of another file's hash) is reported as a damaged COMPLETE.json.
    body = {
        "format": _FORMAT,
        "version": _VERSION,
        "files": {k: dict(v) for k, v in files.items()},
        "files_sha256": hashlib.sha256(_canonical_json(files)).hexdigest(),
    }
    return _canonical_json(body)


def _read_marker(d: Path) -> dict[str, dict[str, Any]]:
    """The file list of a checkpoint's marker; CheckpointError if the folder or marker is unusable."""
    if not d.is_dir():
        raise CheckpointError(f"checkpoint {d} does not exist (or is not a folder)")
    p = d / MARKER
    if not p.is_file():
        raise CheckpointError(
            f"checkpoint {d} is incomplete: no {MARKER} — it was being written when the run stopped; "
            "it will not be loaded"
        )
    raw = p.read_bytes()
    try:
        obj = json.loads(raw.decode("utf-8"))
        if not isinstance(obj, dict) or obj.get("format") != _FORMAT:
            raise ValueError(f"not an {_FORMAT} marker")
        if obj.get("version") != _VERSION:
            raise ValueError(f"unsupported version {obj.get('version')!r} (this llm360 reads {_VERSION})")
        files = obj["files"]
        if not isinstance(files, dict):
            raise ValueError("'files' is not an object")
        for name, rec in files.items():
            _check_rel_name(name)
            if not (
                isinstance(rec, dict)
                and set(rec) == {"sha256", "size"}
                and isinstance(rec["sha256"], str)
                and _SHA_RE.fullmatch(rec["sha256"])
                and isinstance(rec["size"], int)
                and rec["size"] >= 0
            ):
                raise ValueError(f"bad entry for {name!r}")
        if _marker_bytes(files) != raw:
            if obj.get("files_sha256") != hashlib.sha256(_canonical_json(files)).hexdigest():
                raise ValueError("its own checksum does not match its file list")
            raise ValueError("its bytes are not the canonical encoding of its content")
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"checkpoint {d}: {MARKER} is damaged ({e}); the checkpoint cannot be trusted and will not be loaded"
        ) from None
    return files


def _check_rel_name(name: str) -> str:
    """A file name inside a checkpoint: relative, '/'-separated, no '.', '..' or empty parts."""
    parts = name.split("/")
    if not name or "\\" in name or "\x00" in name or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid file name {name!r} (must be a relative path inside the checkpoint)")
    return name


def _list_files(d: Path) -> tuple[set[str], list[str]]:
    """(regular files, other entries) under d, as '/'-separated relative names; the marker excluded."""
    files: set[str] = set()
    odd: list[str] = []
    stack: list[tuple[str, str]] = [(str(d), "")]
    while stack:
        cur, prefix = stack.pop()
        with os.scandir(cur) as it:
            for e in it:
                rel = prefix + e.name
                if e.is_symlink():
                    odd.append(rel)
                elif e.is_dir(follow_symlinks=False):
                    stack.append((e.path, rel + "/"))
                elif e.is_file(follow_symlinks=False):
                    files.add(rel)
                else:
                    odd.append(rel)
    files.discard(MARKER)
    return files, odd


def _listing_problems(d: Path, files: Mapping[str, Mapping[str, Any]]) -> list[str]:
    present, odd = _list_files(d)
    problems = [f"{n} is listed in {MARKER} but missing" for n in sorted(set(files) - present)]
    problems += [
        f"{n} is not listed in {MARKER} (unexpected extra file)" for n in sorted(present - set(files))
    ]
    problems += [f"{n} is not a regular file" for n in sorted(odd)]
    for n in sorted(set(files) & present):
        size = os.stat(d / n).st_size
        if size != files[n]["size"]:
            problems.append(
                f"{n} has {size} bytes but {MARKER} lists {files[n]['size']} (truncated or changed)"
            )
    return problems


def _hash_problem(name: str, expected: str, actual: str) -> str:
    return f"{name} is corrupt: its sha256 {actual} does not match {MARKER} ({expected})"


def _fail(d: Path, problems: list[str]) -> None:
    if len(problems) == 1:
        raise CheckpointError(f"checkpoint {d}: {problems[0]}; it will not be loaded")
    lines = "\n".join(f"  - {p}" for p in problems)
    raise CheckpointError(f"checkpoint {d} failed verification; it will not be loaded:\n{lines}")


# ---------------------------------------------------------------------------------------- rng


def capture_rng() -> dict[str, Any]:
    """Every global RNG state the trainer may touch.

    ``{"torch": uint8 tensor, "cuda": uint8 tensor (only once this process has initialised CUDA),
    "numpy": {...}, "python": {...}}``; the numpy and python states are plain JSON-able dicts.
    The CUDA state is the current device's: under torchrun each rank owns one device, and reading
    every device's state would create a CUDA context on each of them.
    """
    np_state = np.random.get_state(legacy=False)
    assert isinstance(np_state, dict)
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": np.asarray(np_state["state"]["key"]).tolist(),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": {"version": version, "internal_state": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(rng_state: Mapping[str, Any]) -> None:
    """Set the global RNGs from a :func:`capture_rng` dict (as returned by :func:`load_checkpoint`).

    Keys that are absent are left alone. The CUDA state goes to the current CUDA device; without
    CUDA it is skipped with a warning.
    """
    if "torch" in rng_state:
        torch.set_rng_state(rng_state["torch"].detach().to("cpu", torch.uint8).contiguous().clone())
    cuda = rng_state.get("cuda")
    if isinstance(cuda, Tensor):
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda.detach().to("cpu", torch.uint8).contiguous().clone())
        else:
            logger.warning("checkpoint has a CUDA RNG state but CUDA is not available; it is not restored")
    if "numpy" in rng_state:
        s = rng_state["numpy"]
        np.random.set_state(
            {
                "bit_generator": s["bit_generator"],
                "state": {"key": np.asarray(s["key"], dtype=np.uint32), "pos": int(s["pos"])},
                "has_gauss": int(s["has_gauss"]),
                "gauss": float(s["gauss"]),
            }
        )
    if "python" in rng_state:
        s = rng_state["python"]
        random.setstate((s["version"], tuple(s["internal_state"]), s["gauss_next"]))


def _rng_payload(rng_state: Mapping[str, Any]) -> tuple[dict[str, Tensor], bytes]:
    tensors: dict[str, Tensor] = {}
    layout: dict[str, Any] = {}
    values: dict[str, Any] = {}
    for key, v in rng_state.items():
        if "/" in key:
            raise ValueError(f"rng_state key {key!r} must not contain '/'")
        if isinstance(v, Tensor):
            tensors[key] = v
            layout[key] = "tensor"
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, Tensor) for x in v):
            for i, x in enumerate(v):
                tensors[f"{key}/{i}"] = x
            layout[key] = {"tensor_list": len(v)}
        else:
            values[key] = v
    meta = {"format": "llm360-rng", "version": _VERSION, "tensors": layout, "values": values}
    return tensors, _json_payload(meta, "rng_state")


def _rng_from(tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = dict(meta["values"])
    for key, kind in meta["tensors"].items():
        if kind == "tensor":
            out[key] = tensors[key].clone()
        else:
            out[key] = [tensors[f"{key}/{i}"].clone() for i in range(int(kind["tensor_list"]))]
    return out


# ---------------------------------------------------------------------------------- optimizer


def _hparam_to_json(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.item()
    if isinstance(v, tuple):
        return [_hparam_to_json(x) for x in v]
    return v


def _hparam_from_json(v: Any, current: Any) -> Any:
    if isinstance(current, Tensor):
        return torch.tensor(v, dtype=current.dtype, device=current.device)
    if isinstance(current, tuple) and isinstance(v, list):
        return tuple(v)
    return v


def _optimizer_payload(
    optimizer: torch.optim.Optimizer, names: Mapping[int, str]
) -> tuple[dict[str, Tensor], bytes]:
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    groups: list[dict[str, Any]] = []
    unnamed = 0
    seen: set[str] = set()
    for g in optimizer.param_groups:
        gnames: list[str] = []
        for p in g["params"]:
            name = names.get(id(p))
            if name is None:
                unnamed += 1
                continue
            if name in seen:
                raise ValueError(f"parameter name {name!r} is used for two optimizer parameters")
            seen.add(name)
            gnames.append(name)
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, Tensor):
                    tensors[f"{key}/{name}"] = value
                else:
                    scalars.setdefault(name, {})[key] = value
        hp = {k: _hparam_to_json(v) for k, v in g.items() if k != "params"}
        groups.append({"hyperparameters": hp, "params": gnames})
    if unnamed:
        raise ValueError(
            f"{unnamed} optimizer parameter(s) have no name in param_names; pass the model itself "
            "(param_names=model) or a dict covering every parameter the optimizer holds"
        )
    meta = {
        "format": "llm360-optimizer",
        "version": _VERSION,
        "optimizer": type(optimizer).__name__,
        "param_groups": groups,
        "scalar_state": scalars,
    }
    return tensors, _json_payload(meta, "optimizer hyperparameters/state")


def _name_mismatch(what: str, a_label: str, a: list[str], b_label: str, b: list[str]) -> str:
    """'what: a_label: x, y; b_label: z' for two lists of names, either possibly empty."""
    parts = [f"{label}: {_some(names)}" for label, names in ((a_label, a), (b_label, b)) if names]
    return f"{what}: " + "; ".join(parts)


def _optimizer_state_dict(
    optimizer: torch.optim.Optimizer,
    names: Mapping[int, str],
    tensors: Mapping[str, Tensor],
    meta: Mapping[str, Any],
    strict: bool,
    problems: list[str],
) -> dict[str, Any]:
    """A torch optimizer state_dict for *this* optimizer's parameter order, built by parameter name."""
    if meta.get("optimizer") != type(optimizer).__name__:
        problems.append(
            f"optimizer state is for {meta.get('optimizer')}, the optimizer is {type(optimizer).__name__}"
        )
    by_name: dict[str, dict[str, Any]] = {}
    for k, t in tensors.items():
        key, _, name = k.partition("/")
        by_name.setdefault(name, {})[key] = t
    for name, vals in meta.get("scalar_state", {}).items():
        by_name.setdefault(name, {}).update(vals)
    saved_groups = meta["param_groups"]
    saved_sets = [frozenset(g["params"]) for g in saved_groups]
    saved_all = frozenset().union(*saved_sets) if saved_sets else frozenset()
    used: set[int] = set()
    state: dict[int, dict[str, Any]] = {}
    groups: list[dict[str, Any]] = []
    ours: set[str] = set()
    index = 0
    for gi, g in enumerate(optimizer.param_groups):
        gnames = [names.get(id(p)) for p in g["params"]]
        if any(n is None for n in gnames):
            problems.append(
                f"{sum(n is None for n in gnames)} optimizer parameter(s) in group {gi} have no name; "
                "pass param_names covering every parameter"
            )
            continue
        gset = frozenset(n for n in gnames if n is not None)
        ours |= gset
        match = [j for j, s in enumerate(saved_sets) if s == gset and j not in used]
        hp = {k: v for k, v in g.items() if k != "params"}
        if match:
            j = gi if gi in match else match[0]
            used.add(j)
            for k, v in saved_groups[j]["hyperparameters"].items():
                if k not in _IMPL_KEYS:
                    hp[k] = _hparam_from_json(v, g.get(k))
        elif strict:
            problems.append(f"optimizer param group {gi} holds parameters that no saved group holds exactly")
        ids = []
        for p, name in zip(g["params"], gnames, strict=True):
            ids.append(index)
            st = by_name.get(name or "", {})
            for key, value in st.items():
                if isinstance(value, Tensor) and value.ndim > 0 and tuple(value.shape) != tuple(p.shape):
                    problems.append(
                        f"optimizer state {key}/{name} has shape {list(value.shape)}, the parameter {list(p.shape)}"
                    )
            if st:
                state[index] = dict(st)
            index += 1
        groups.append({**hp, "params": ids})
    missing = sorted(saved_all - ours)
    extra = sorted(ours - saved_all)
    if strict and (missing or extra):
        problems.append(_name_mismatch("optimizer parameters differ by name", "in the checkpoint only", missing,
                                       "in the optimizer only", extra))
    elif missing or extra:
        logger.warning(
            "optimizer state loaded by name; %d names only in checkpoint, %d only in optimizer",
            len(missing),
            len(extra),
        )
    return {"state": state, "param_groups": groups}


def _some(names: list[str], k: int = 10) -> str:
    shown = ", ".join(names[:k])
    return shown + (f" (+{len(names) - k} more)" if len(names) > k else "")


# ---------------------------------------------------------------------------------------- save


def _extra_payload(extra_files: Mapping[str, Any] | None) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for name, v in (extra_files or {}).items():
        _check_rel_name(name)
        if name in RESERVED or name.split("/")[0] in RESERVED:
            raise ValueError(f"extra file {name!r} collides with a checkpoint file ({sorted(RESERVED)})")
        if isinstance(v, (bytes, bytearray, memoryview)):
            out[name] = bytes(v)
        elif isinstance(v, str):
            out[name] = v.encode("utf-8")
        elif isinstance(v, os.PathLike):
            out[name] = Path(v).read_bytes()
        else:
            raise TypeError(
                f"extra file {name!r}: expected bytes, str (text) or a Path, got {type(v).__name__}"
            )
    return out


def save_checkpoint(
    final_dir: str | Path,
    *,
    model_state: Mapping[str, Tensor],
    trainer_state: Mapping[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    param_names: nn.Module | Mapping[Any, str] | None = None,
    rng_state: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, bytes | str | os.PathLike[str]] | None = None,
) -> Path:
    """Write a complete checkpoint to ``final_dir`` (replacing one that is there), or nothing.

    - ``model_state``: name -> tensor (the model's state_dict: Hugging Face names); floating-point
      tensors must be fp32 (the master weights). Any device; written contiguous, little-endian.
    - ``trainer_state``: JSON-able dict with at least ``step`` (optimizer steps done, int); also the
      chunk, data cursor, tokens seen, config hash, metrics summary, ... as the trainer needs.
    - ``optimizer`` + ``param_names`` (the model, or ``{parameter or id(parameter): name}``): the
      optimizer state is stored by parameter name, so it loads into any parameter order.
    - ``rng_state``: a :func:`capture_rng` dict (default: captured now).
    - ``extra_files``: ``{relative name: bytes | text | Path to copy}``, e.g. ``config.json``.

    Returns the final folder. Raises ValueError/TypeError for bad arguments before anything is
    written; on any error the temporary folder is removed and an existing checkpoint is untouched.
    """
    final_dir = Path(final_dir)
    t0 = time.perf_counter()
    # Everything that can be checked or serialised in memory is, before the disk is touched.
    step = trainer_state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(
            f"trainer_state['step'] must be the number of optimizer steps done (int >= 0), got {step!r}"
        )
    trainer_json = _json_payload(dict(trainer_state), "trainer_state")
    for name, t in model_state.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"model_state[{name!r}] is a {type(t).__name__}, not a tensor")
        if t.is_floating_point() and t.dtype != torch.float32:
            raise ValueError(
                f"model_state[{name!r}] is {t.dtype}; checkpoints hold the fp32 master weights "
                "(pass the fp32 model's state_dict, not a low-precision copy)"
            )
    opt_payload = None
    if optimizer is not None:
        if param_names is None:
            raise ValueError(
                "save_checkpoint: with an optimizer, pass param_names (the model, or {param: name})"
            )
        opt_payload = _optimizer_payload(optimizer, _names_by_id(param_names))
    rng_tensors, rng_json = _rng_payload(capture_rng() if rng_state is None else rng_state)
    extras = _extra_payload(extra_files)

    parent = final_dir.parent
    created = [q for q in (parent, *parent.parents) if not q.exists()]
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for q in created:  # make the new folders' own names durable too
            fsync_dir(q.parent)
    except OSError as e:
        raise _write_error(final_dir, e) from e
    tmp = parent / f".{final_dir.name}.tmp-{os.getpid()}"
    with _in_progress_lock:
        _in_progress.add(str(tmp))
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        subdirs: set[Path] = set()
        with _Pipeline() as pipe:
            # Largest file first: its hash (the longest one) starts first, and its fsync runs while
            # the others are written.
            plans: dict[str, _Plan] = {}
            if opt_payload is not None:
                plans[OPTIMIZER_FILE] = _plan_safetensors(opt_payload[0], pipe)
                plans[OPTIMIZER_META] = _plan_bytes(opt_payload[1], pipe)
            plans[MODEL_FILE] = _plan_safetensors(model_state, pipe)
            plans[TRAINER_STATE] = _plan_bytes(trainer_json, pipe)
            plans[RNG_FILE] = _plan_safetensors(rng_tensors, pipe)
            plans[RNG_META] = _plan_bytes(rng_json, pipe)
            for name, data in extras.items():
                plans[name] = _plan_bytes(data, pipe)
                parent_rel = Path(name).parent
                if str(parent_rel) != ".":
                    (tmp / parent_rel).mkdir(parents=True, exist_ok=True)
                    subdirs.update(q for q in [parent_rel, *parent_rel.parents] if str(q) != ".")
            for name, (pieces, hash_while_writing, _, size) in plans.items():
                _write_file(tmp / name, pieces, pipe, hash_while_writing, size)
            files = {n: {"sha256": h.hexdigest(), "size": h.size} for n, (_, _, h, _) in sorted(plans.items())}
            pipe.wait_syncs()  # every data file is on disk before the marker exists
            _write_file(tmp / MARKER, [_marker_bytes(files)], pipe, None)
            pipe.wait_syncs()
        for sub in sorted(subdirs, key=lambda p: -len(p.parts)):
            fsync_dir(tmp / sub)
        fsync_dir(tmp)
        _install(tmp, final_dir)
    except OSError as e:  # disk full, permissions, I/O error: a clear message, nothing half-written
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(final_dir, e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        with _in_progress_lock:
            _in_progress.discard(str(tmp))
    total = sum(r["size"] for r in files.values())
    dt = time.perf_counter() - t0
    logger.debug(
        "saved checkpoint %s (%.2f GB in %.1f s, %.2f GB/s)", final_dir, total / 1e9, dt, total / 1e9 / dt
    )
    return final_dir


def _write_error(final_dir: Path, e: OSError) -> CheckpointError:
    where = f" ({e.filename})" if e.filename else ""
    return CheckpointError(
        f"cannot write checkpoint {final_dir}: {e.strerror or e}{where}. Nothing was replaced: the "
        "checkpoints already on disk are intact. Free space (or fix permissions), then run the same "
        "command again to resume from the latest complete checkpoint."
    )


def _install(tmp: Path, final: Path) -> None:
    """Rename the finished temporary folder to its final name; an existing folder is replaced."""
    parent = final.parent
    if not final.exists():
        os.rename(tmp, final)
        fsync_dir(parent)
        return
    old = parent / f".{final.name}.old-{os.getpid()}"
    if old.exists():
        shutil.rmtree(old)
    os.rename(final, old)
    # A kill here leaves no `final`, the old checkpoint at `old` and the new one at `tmp`;
    # latest_complete_checkpoint renames `old` back.
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(old, final)
        raise
    fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)


def remove_checkpoint(ckpt_dir: str | Path) -> None:
    """Delete a checkpoint folder; it is renamed aside first, so a kill never leaves half of it under its name."""
    d = Path(ckpt_dir)
    if not d.exists():
        return
    aside = d.parent / f".{d.name}.tmp-{os.getpid()}"
    if aside.exists():
        shutil.rmtree(aside)
    os.rename(d, aside)
    fsync_dir(d.parent)
    shutil.rmtree(aside, ignore_errors=True)


# -------------------------------------------------------------------------------- verify, load


def verify_checkpoint(ckpt_dir: str | Path, *, known_sha256: Mapping[str, str] | None = None) -> None:
    """Check that a checkpoint is complete and intact; raise CheckpointError naming what is wrong.

    Problems reported: no marker (the save did not finish), a damaged marker, a listed file that is
    missing, a file of the wrong size or sha256, a file that is not listed. ``known_sha256``
    ({file name: sha256}) holds digests the caller has just computed from these very files (e.g.
    a release's SHA256SUMS check): those files are compared with the marker, not hashed again.
    """
    d = Path(ckpt_dir)
    _read_verified(d, _read_marker(d), wanted=set(), known=known_sha256 or {})


def _read_verified(
    d: Path, files: Mapping[str, Mapping[str, Any]], wanted: set[str], known: Mapping[str, str] | None = None
) -> dict[str, Tensor]:
    """Hash every listed file (but the ``known`` ones), keeping the bytes of the wanted ones.

    Raises CheckpointError on any mismatch.
    """
    problems = _listing_problems(d, files)
    if problems:
        _fail(d, problems)
    known = known or {}
    for name in sorted(set(files) & set(known) - wanted):
        if known[name] != files[name]["sha256"]:
            problems.append(_hash_problem(name, files[name]["sha256"], known[name]))
    out: dict[str, Tensor] = {}
    with _Pipeline() as pipe:
        lanes: dict[str, _Sha256] = {}
        for name in sorted(files):
            if name in known and name not in wanted:
                continue
            if name in wanted:
                out[name], lanes[name] = _read_file(d / name, files[name]["size"], pipe)
            else:
                lanes[name] = _hash_file(d / name, files[name]["size"], pipe)
        for name, h in lanes.items():
            digest = h.hexdigest()
            if digest != files[name]["sha256"]:
                problems.append(_hash_problem(name, files[name]["sha256"], digest))
    if problems:
        _fail(d, problems)
    return out


def _read_wanted(d: Path, files: Mapping[str, Mapping[str, Any]], wanted: set[str]) -> dict[str, Tensor]:
    """:func:`_read_verified`, after checking that the marker lists every wanted file."""
    absent = sorted(wanted - set(files))
    if absent:
        raise CheckpointError(f"checkpoint {d} has no {', '.join(absent)}; it cannot be loaded here")
    return _read_verified(d, files, wanted)


def _json_of(buf: Tensor, what: str) -> Any:
    try:
        return json.loads(buf.numpy().tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{what} is not valid JSON: {e}") from None


def load_model_state(ckpt_dir: str | Path) -> dict[str, Tensor]:
    """The weights of a checkpoint (name -> fp32 tensor on CPU), e.g. for evaluation or comparison.

    Requires the marker and checks the weights file's sha256; the other files are not read (use
    :func:`verify_checkpoint` to check the whole folder).
    """
    d = Path(ckpt_dir)
    files = _read_marker(d)
    if MODEL_FILE not in files:
        raise CheckpointError(f"checkpoint {d}: {MODEL_FILE} is not listed in {MARKER}")
    with _Pipeline() as pipe:
        buf, h = _read_file(d / MODEL_FILE, files[MODEL_FILE]["size"], pipe)
        digest = h.hexdigest()
    if digest != files[MODEL_FILE]["sha256"]:
        _fail(d, [_hash_problem(MODEL_FILE, files[MODEL_FILE]["sha256"], digest)])
    return _parse_safetensors(buf, f"{d / MODEL_FILE}")


def load_checkpoint(
    ckpt_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    strict: bool = True,
    param_names: nn.Module | Mapping[Any, str] | None = None,
) -> dict[str, Any]:
    """Verify a checkpoint, then load its weights into model and its state into optimizer.

    Every file's sha256 is checked (reading each file once) and every name and shape is matched
    before model or optimizer is touched: on CheckpointError both are unchanged. The optimizer state
    is matched by parameter name (``param_names`` defaults to the model's), so the optimizer's
    parameter order may differ from the saving one. With ``strict=False`` names present on one side
    only are skipped (and logged) instead of being errors; shape mismatches are always errors.

    Returns ``{"trainer_state": dict, "rng_state": dict}``; call :func:`restore_rng` on the latter
    to continue the random streams.
    """
    d = Path(ckpt_dir)
    t0 = time.perf_counter()
    files = _read_marker(d)
    wanted = {MODEL_FILE, TRAINER_STATE, RNG_FILE, RNG_META}
    if optimizer is not None:
        if strict or {OPTIMIZER_FILE, OPTIMIZER_META} <= set(files):
            wanted |= {OPTIMIZER_FILE, OPTIMIZER_META}
        else:
            logger.warning("checkpoint %s has no optimizer state; the optimizer is left as it is", d)
            optimizer = None
    bufs = _read_wanted(d, files, wanted)

    problems: list[str] = []
    weights = _parse_safetensors(bufs.pop(MODEL_FILE), f"{d / MODEL_FILE}")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if strict and (missing or unexpected):
        problems.append(_name_mismatch("weight names do not match the model", "missing from the checkpoint",
                                       missing, "not in the model", unexpected))
    elif missing or unexpected:
        logger.warning(
            "loading %s non-strictly: %d weights missing, %d unexpected", d, len(missing), len(unexpected)
        )
    for name in sorted(set(expected) & set(weights)):
        if tuple(expected[name].shape) != tuple(weights[name].shape):
            problems.append(
                f"weight {name} has shape {list(weights[name].shape)}, the model {list(expected[name].shape)}"
            )
    opt_sd = None
    try:  # the files verified, so a malformed structure means they were written by something else
        if optimizer is not None:
            names = _names_by_id(model if param_names is None else param_names)
            opt_tensors = _parse_safetensors(bufs.pop(OPTIMIZER_FILE), f"{d / OPTIMIZER_FILE}")
            opt_meta = _json_of(bufs.pop(OPTIMIZER_META), f"{d / OPTIMIZER_META}")
            opt_sd = _optimizer_state_dict(optimizer, names, opt_tensors, opt_meta, strict, problems)
        trainer_state, rng_state = _training_state(d, bufs)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(
            f"checkpoint {d}: {OPTIMIZER_META} or {RNG_META} does not have the expected structure ({e!r})"
        ) from None
    if problems:
        _fail(d, problems)

    model.load_state_dict({k: v for k, v in weights.items() if k in expected}, strict=False)
    if optimizer is not None and opt_sd is not None:
        optimizer.load_state_dict(opt_sd)
    logger.debug(
        "loaded checkpoint %s (step %s) in %.1f s", d, trainer_state.get("step"), time.perf_counter() - t0
    )
    return {"trainer_state": trainer_state, "rng_state": rng_state}


def _training_state(d: Path, bufs: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Any]]:
    trainer_state = _json_of(bufs.pop(TRAINER_STATE), f"{d / TRAINER_STATE}")
    rng_state = _rng_from(
        _parse_safetensors(bufs.pop(RNG_FILE), f"{d / RNG_FILE}"), _json_of(bufs.pop(RNG_META), f"{d / RNG_META}")
    )
    return trainer_state, rng_state


def load_training_state(ckpt_dir: str | Path) -> dict[str, Any]:
    """Verify a checkpoint (every file hashed) and return its trainer and RNG state, not its tensors.

    For a caller that restores weights and optimizer state from elsewhere (a sharded copy) and must
    not hold a full-size copy of the model to do so. Returns :func:`load_checkpoint`'s dict.
    """
    d = Path(ckpt_dir)
    files = _read_marker(d)
    wanted = {TRAINER_STATE, RNG_FILE, RNG_META}
    bufs = _read_wanted(d, files, wanted)
    try:
        trainer_state, rng_state = _training_state(d, bufs)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {d}: {RNG_META} does not have the expected structure ({e!r})") from None
    return {"trainer_state": trainer_state, "rng_state": rng_state}


# ------------------------------------------------------------------------------------- latest


def _writer_alive(pid: int, path: Path) -> bool:
    if pid == os.getpid():
        with _in_progress_lock:
            return str(path) in _in_progress
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_leftovers(folder: Path) -> None:
    """Finish what interrupted saves left in folder: restore moved-aside checkpoints, drop temp folders."""
    for e in sorted(folder.iterdir(), key=lambda p: ".old-" not in p.name):  # `.old-` ones first
        m = _LEFTOVER_RE.fullmatch(e.name)
        if not m or not e.is_dir() or e.is_symlink():
            continue
        pid = int(m["pid"])
        if _writer_alive(pid, e):
            logger.warning("leaving %s: process %d may still be writing it", e, pid)
            continue
        final = folder / m["name"]
        if m["kind"] == "old" and not final.exists():
            try:
                verify_checkpoint(e)
            except CheckpointError as err:
                logger.warning(
                    "leaving %s in place: a save replacing %s was interrupted and it does not verify: %s",
                    e,
                    final.name,
                    err,
                )
                continue
            os.rename(e, final)
            fsync_dir(folder)
            logger.warning("restored %s: a save replacing it was interrupted", final)
            continue
        logger.warning("removing %s, left by an interrupted save (pid %d)", e, pid)
        shutil.rmtree(e, ignore_errors=True)


def latest_complete_checkpoint(
    checkpoints_dir: str | Path, *, include_steps: bool = True, cleanup: bool = True, verify: bool = True
) -> Path | None:
    """The newest checkpoint under checkpoints_dir that verifies, or None.

    Candidates are ``ckpt_NNN`` and (with include_steps) ``steps/step_XXXXXXXX``, ordered by the
    ``step`` in their trainer_state.json (a chunk checkpoint wins a tie); the first one that passes
    :func:`verify_checkpoint` is returned. Folders without a marker or that fail verification are
    skipped with a warning. ``verify=False`` checks the marker and the files' names and sizes but
    does not hash them: use it when the result goes straight to :func:`load_checkpoint`, which
    hashes every file anyway (and raises if one is corrupt). With cleanup, leftovers of interrupted saves (``.<name>.tmp-<pid>`` /
    ``.<name>.old-<pid>`` of processes that are gone) are resolved first: a moved-aside checkpoint
    whose replacement never arrived is renamed back, temporary folders are deleted. Call it from one
    process (rank 0) while no save is running.
    """
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return None
    folders = [(root, _CKPT_RE, True)]
    if include_steps and (root / STEPS_DIR).is_dir():
        folders.append((root / STEPS_DIR, _STEP_RE, False))
    candidates: list[tuple[int, bool, int, Path]] = []
    for folder, regex, is_chunk in folders:
        if cleanup:
            _clean_leftovers(folder)
        for e in sorted(folder.iterdir()):
            if _LEFTOVER_RE.fullmatch(e.name) and not cleanup:
                logger.warning("ignoring %s, left by an interrupted save", e)
                continue
            m = regex.fullmatch(e.name)
            if not m or not e.is_dir():
                continue
            if not (e / MARKER).is_file():
                logger.warning("skipping %s: incomplete (no %s), it will not be loaded", e, MARKER)
                continue
            try:
                with open(e / TRAINER_STATE, encoding="utf-8") as f:
                    step = int(json.load(f)["step"])
            except (OSError, ValueError, KeyError, TypeError) as err:
                logger.warning("skipping %s: cannot read its step from %s: %s", e, TRAINER_STATE, err)
                continue
            candidates.append((step, is_chunk, int(m.group(1)), e))
    for _, _, _, path in sorted(candidates, key=lambda c: c[:3], reverse=True):
        try:
            if verify:
                verify_checkpoint(path)
            else:
                problems = _listing_problems(path, _read_marker(path))
                if problems:
                    _fail(path, problems)
        except CheckpointError as err:
            logger.warning("skipping %s: %s", path, err)
            continue
        return path
    return None
