"""Complete-or-absent checkpoints (DESIGN.md promises 3, 4 and 7): the checkpoint folder format.

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

The names (of these files and of the folders: ``ckpt_NNN``, ``init``, ``steps/step_XXXXXXXX``) are
:mod:`llm360.rundir.layout`'s, which also lists the checkpoints of a run; the optimizer files are
:mod:`llm360.rundir.optimizer_state`'s, the RNG files :mod:`llm360.rundir.rng_state`'s; the bytes
reach the disk through :mod:`llm360.rundir.tensorio` (streaming safetensors, hashing while writing
and reading, O_DIRECT for large files).

How a save stays complete-or-absent: every file is written into a hidden sibling
``.<name>.tmp-<pid>`` (:func:`llm360.rundir.atomic.staged`), hashed while it is written, and
fsynced; the marker is written last, into that same folder; the folder is fsynced and only then
renamed to its final name, and the parent is fsynced. The final name therefore only ever points at
a folder whose files, marker included, are already on disk. A kill before the rename leaves a
hidden temporary folder that no loader looks at (:func:`latest_complete_checkpoint` removes it); a
kill after it leaves a complete checkpoint. A re-save of an existing name moves the old folder
aside (``.<name>.old-<pid>``), renames the new one in, then deletes the old; a kill between the two
renames leaves the old folder aside, and :func:`latest_complete_checkpoint` renames it back
(:func:`clean_leftovers`). Loading always checks the marker and every hash first, so a folder
without its marker, or one damaged after the fact (a disk error, a partial copy, a hand edit), is
refused with an error that names the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llm360.errors import CheckpointError
from llm360.rundir import atomic, tensorio
from llm360.rundir.layout import (
    CHECKPOINT_FILES,
    MARKER,
    MODEL_FILE,
    MODEL_INDEX,
    OPTIMIZER_FILE,
    OPTIMIZER_INDEX,
    OPTIMIZER_META,
    RNG_FILE,
    RNG_META,
    STEPS_DIR,
    TRAINER_STATE,
    has_marker,
    is_checkpoint_file,
    list_checkpoints,
    list_step_checkpoints,
    step_name,
    walk,
)
from llm360.rundir.optimizer_state import name_mismatch, names_by_id, optimizer_payload, optimizer_state_dict
from llm360.rundir.rng_state import capture_rng, restore_rng, rng_from, rng_payload
from llm360.rundir.shards import (
    DEFAULT_SHARD_BYTES,
    ShardLayout,
    SliceReader,
    part_files,
    tensor_bytes,
    tensor_files,
)
from llm360.utils import read_json, sha256_file

__all__ = [  # the file names are layout's, the RNG helpers rng_state's: here, with the format they belong to
    "CHECKPOINT_FILES", "MARKER", "MODEL_FILE", "OPTIMIZER_FILE", "OPTIMIZER_META", "RNG_FILE", "RNG_META",
    "TRAINER_STATE", "capture_rng", "clean_leftovers", "latest_complete_checkpoint", "load_checkpoint",
    "load_model_state", "load_training_state", "marker_sha256", "read_marker", "read_trainer_state", "remove_checkpoint",
    "restore_rng", "save_checkpoint", "step_checkpoint_dir", "verify_checkpoint", "verify_model_files",
    "RESUME_ONLY_FILES", "CheckpointContent", "checkpoint_content", "write_checkpoint_files", "seal_checkpoint",
    "write_error", "verify_share", "open_slices", "read_tensors", "is_resume_only", "model_sha256", "match_weights",
]  # fmt: skip

logger = logging.getLogger(__name__)

_FORMAT = "llm360-checkpoint"
_VERSION = 1
_SHA_RE = re.compile(r"[0-9a-f]{64}")


def step_checkpoint_dir(checkpoints_dir: str | Path, step: int) -> Path:
    """Folder of the intra-chunk checkpoint taken after ``step`` optimizer steps (global, 0-based count)."""
    return Path(checkpoints_dir) / STEPS_DIR / step_name(step)


def _json_payload(obj: Any, what: str) -> bytes:
    try:
        return atomic.json_bytes(obj)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serialisable (no pickle in checkpoints): {e}") from None


# ------------------------------------------------------------------------------------ marker


def _marker_bytes(files: Mapping[str, Mapping[str, Any]]) -> bytes:
    # The marker carries a hash of its own file list, and its bytes must be canonical, so any change
    # to it (even one hex digit of another file's hash) is reported as a damaged COMPLETE.json.
    body = {
        "format": _FORMAT,
        "version": _VERSION,
        "files": {k: dict(v) for k, v in files.items()},
        "files_sha256": hashlib.sha256(atomic.json_bytes(files, allow_nan=False)).hexdigest(),
    }
    return atomic.json_bytes(body, allow_nan=False)


def read_marker(ckpt_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The file list of a checkpoint's marker: ``{file name: {"sha256": hex, "size": bytes}}``.

    The marker itself is checked (its format, its entries, its own checksum), not the files it
    lists (that is :func:`verify_checkpoint`). CheckpointError if the folder or marker is unusable.
    """
    d = Path(ckpt_dir)
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
            if obj.get("files_sha256") != hashlib.sha256(atomic.json_bytes(files, allow_nan=False)).hexdigest():
                raise ValueError("its own checksum does not match its file list")
            raise ValueError("its bytes are not the canonical encoding of its content")
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"checkpoint {d}: {MARKER} is damaged ({e}); the checkpoint cannot be trusted and will not be loaded"
        ) from None
    return files


def marker_sha256(ckpt_dir: str | Path) -> str:
    """sha256 of a checkpoint's marker: names the checkpoint's exact content (the marker lists every
    file's sha256), for results that record what they were computed from.

    Raises CheckpointError when the checkpoint has no marker (it is incomplete). The files are not
    hashed here: verify the checkpoint before trusting it.
    """
    d = Path(ckpt_dir)
    if not has_marker(d):
        raise CheckpointError(
            f"checkpoint {d} is incomplete or not an llm360 checkpoint: it has no {MARKER} (written last, "
            "when a save finishes)"
        )
    return sha256_file(d / MARKER)


def _check_rel_name(name: str) -> str:
    """A file name inside a checkpoint: relative, '/'-separated, no '.', '..' or empty parts."""
    parts = name.split("/")
    if not name or "\\" in name or "\x00" in name or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid file name {name!r} (must be a relative path inside the checkpoint)")
    return name


def _list_files(d: Path) -> tuple[set[str], list[str]]:
    """(regular files, other entries: symlinks, FIFOs ...) under d, '/'-separated; the marker excluded."""
    listing = walk(d)
    return listing.files - {MARKER}, [*listing.links, *listing.other]


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


# ---------------------------------------------------------------------------------------- save


def _extra_payload(extra_files: Mapping[str, Any] | None) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for name, v in (extra_files or {}).items():
        _check_rel_name(name)
        if is_checkpoint_file(name) or is_checkpoint_file(name.split("/")[0]):
            raise ValueError(f"extra file {name!r} collides with a checkpoint file ({sorted(CHECKPOINT_FILES)})")
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


FileContent = Mapping[str, Tensor] | bytes
"""What one checkpoint file holds: tensors (a safetensors file) or bytes as they are."""


@dataclass
class CheckpointContent:
    """Everything one checkpoint holds, checked and serialised in memory before a byte is written.

    ``model_state`` and ``optimizer_tensors`` may hold sharded tensors (DTensors: their global
    shape is what :attr:`layout` plans with); :meth:`tensor_file` needs the full tensors of that
    file. ``small_files`` are the rest (trainer and RNG state, ``optimizer.json``, the indexes,
    the extra files): the writer of the checkpoint's first rank writes them.
    """

    model_state: Mapping[str, Tensor]
    optimizer_tensors: Mapping[str, Tensor]
    layout: ShardLayout
    small_files: dict[str, FileContent]

    def tensor_file(self, file: str, tensors: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The tensors of one of :attr:`layout`'s files, from ``tensors`` (default: the content's own)."""
        if tensors is None:
            tensors = {**self.model_state, **self.optimizer_tensors}
        return {name: tensors[name] for name in self.layout.names_in(file)}


def checkpoint_content(
    *,
    model_state: Mapping[str, Tensor],
    trainer_state: Mapping[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    param_names: nn.Module | Mapping[Any, str] | None = None,
    rng_state: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, bytes | str | os.PathLike[str]] | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> CheckpointContent:
    """Check and serialise a checkpoint's content (:func:`save_checkpoint`'s arguments); nothing is written.

    Raises ValueError/TypeError for bad arguments.
    """
    step = trainer_state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(
            f"trainer_state['step'] must be the number of optimizer steps done (int >= 0), got {step!r}"
        )
    small: dict[str, FileContent] = {TRAINER_STATE: _json_payload(dict(trainer_state), "trainer_state")}
    for name, t in model_state.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"model_state[{name!r}] is a {type(t).__name__}, not a tensor")
        if t.is_floating_point() and t.dtype != torch.float32:
            raise ValueError(
                f"model_state[{name!r}] is {t.dtype}; checkpoints hold the fp32 master weights "
                "(pass the fp32 model's state_dict, not a low-precision copy)"
            )
    opt_tensors: dict[str, Tensor] = {}
    if optimizer is not None:
        if param_names is None:
            raise ValueError(
                "save_checkpoint: with an optimizer, pass param_names (the model, or {param: name})"
            )
        opt_tensors, meta = optimizer_payload(optimizer, names_by_id(param_names))
        small[OPTIMIZER_META] = _json_payload(meta, "optimizer hyperparameters/state")
    rng_tensors, rng_meta = rng_payload(capture_rng() if rng_state is None else rng_state)
    small[RNG_FILE] = rng_tensors
    small[RNG_META] = _json_payload(rng_meta, "rng_state")
    sizes = {n: tensor_bytes(t) for n, t in (*model_state.items(), *opt_tensors.items())}
    layout = ShardLayout.plan(
        [(n, sizes[n]) for n in model_state],
        [] if optimizer is None else [(n, sizes[n]) for n in opt_tensors],
        shard_bytes,
    )
    if optimizer is None:  # no optimizer: no optimizer file
        layout = ShardLayout(layout.model, ())
    small.update(layout.index_files(sizes))
    small.update(_extra_payload(extra_files))
    return CheckpointContent(model_state, opt_tensors, layout, small)


def write_checkpoint_files(tmp: Path, files: Mapping[str, FileContent]) -> dict[str, dict[str, Any]]:
    """Write files into a checkpoint's staging folder, hashing while writing and fsyncing each.

    Returns ``{file name: {"sha256", "size"}}`` (the marker's entries). Any rank may write its own
    files into the same folder; raises OSError as the disk does.
    """
    with tensorio.Pipeline() as pipe:
        # Largest file first: its hash (the longest one) starts first, and its fsync runs while the
        # others are written.
        plans: dict[str, tensorio.Plan] = {}
        for name, content in files.items():
            if isinstance(content, bytes):
                plans[name] = tensorio.plan_bytes(content, pipe)
            else:
                plans[name] = tensorio.plan_safetensors(content, pipe)
        for name, plan in sorted(plans.items(), key=lambda kv: -kv[1].size):
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            tensorio.write_plan(tmp / name, plan, pipe)
        records = {n: {"sha256": p.lane.hexdigest(), "size": p.lane.size} for n, p in sorted(plans.items())}
        pipe.wait_syncs()  # every file is on disk before the caller may write the marker
    return records


def seal_checkpoint(tmp: Path, final_dir: Path, records: Mapping[str, Mapping[str, Any]]) -> None:
    """Write the marker over ``records`` (every file's entry, from every writer), fsync, rename in.

    Call it once, after every file is written and synced (:func:`write_checkpoint_files` returned
    on every writer). Raises ValueError if the records miss a file present in ``tmp`` or list one
    that is not; OSError as the disk does.
    """
    present = walk(tmp).files
    if set(records) != present:
        raise ValueError(
            f"checkpoint {final_dir}: the records of its writers ({len(records)} files) do not match the "
            f"files written ({len(present)}): {sorted(set(records) ^ present)[:5]}"
        )
    files = {n: dict(records[n]) for n in sorted(records)}
    with tensorio.Pipeline() as pipe:
        tensorio.write_file(tmp / MARKER, [_marker_bytes(files)], pipe, None)
        pipe.wait_syncs()
    atomic.fsync_tree(tmp, files=False)  # the files are synced; their folders' entries now
    atomic.install(tmp, final_dir)


def save_checkpoint(
    final_dir: str | Path,
    *,
    model_state: Mapping[str, Tensor],
    trainer_state: Mapping[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    param_names: nn.Module | Mapping[Any, str] | None = None,
    rng_state: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, bytes | str | os.PathLike[str]] | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write a complete checkpoint to ``final_dir`` (replacing one that is there), or nothing; one process.

    - ``model_state``: name -> tensor (the model's state_dict: Hugging Face names); floating-point
      tensors must be fp32 (the master weights). Any device; written contiguous, little-endian.
    - ``trainer_state``: JSON-able dict with at least ``step`` (optimizer steps done, int); also the
      chunk, data cursor, tokens seen, config hash, metrics summary, ... as the trainer needs.
    - ``optimizer`` + ``param_names`` (the model, or ``{parameter or id(parameter): name}``): the
      optimizer state is stored by parameter name, so it loads into any parameter order.
    - ``rng_state``: a :func:`capture_rng` dict (default: captured now).
    - ``extra_files``: ``{relative name: bytes | text | Path to copy}``, e.g. ``config.json``.
    - ``shard_bytes``: largest tensor file (:mod:`llm360.rundir.shards`); above it, several files.

    Several processes write one checkpoint together through :func:`checkpoint_content`,
    :func:`write_checkpoint_files` and :func:`seal_checkpoint` (``llm360.train.checkpointing``);
    the bytes are the same. Returns the final folder. Raises ValueError/TypeError for bad arguments
    before anything is written; on any error the temporary folder is removed and an existing
    checkpoint is untouched.
    """
    final_dir = Path(final_dir)
    t0 = time.perf_counter()
    content = checkpoint_content(
        model_state=model_state, trainer_state=trainer_state, optimizer=optimizer, param_names=param_names,
        rng_state=rng_state, extra_files=extra_files, shard_bytes=shard_bytes,
    )
    files = {**{f: content.tensor_file(f) for f in content.layout.files}, **content.small_files}
    try:
        with atomic.staged(final_dir) as tmp:
            records = write_checkpoint_files(tmp, files)
            seal_checkpoint(tmp, final_dir, records)
    except OSError as e:  # disk full, permissions, I/O error: a clear message, nothing half-written
        raise write_error(final_dir, e) from e
    total = sum(r["size"] for r in records.values())
    dt = time.perf_counter() - t0
    logger.debug(
        "saved checkpoint %s (%.2f GB in %.1f s, %.2f GB/s)", final_dir, total / 1e9, dt, total / 1e9 / dt
    )
    return final_dir


def write_error(final_dir: Path, e: OSError) -> CheckpointError:
    where = f" ({e.filename})" if e.filename else ""
    return CheckpointError(
        f"cannot write checkpoint {final_dir}: {e.strerror or e}{where}. Nothing was replaced: the "
        "checkpoints already on disk are intact. Free space (or fix permissions), then run the same "
        "command again to resume from the latest complete checkpoint."
    )


def remove_checkpoint(ckpt_dir: str | Path) -> None:
    """Delete a checkpoint folder; it is renamed aside first, so a kill never leaves half of it under its name."""
    atomic.remove_folder(ckpt_dir)


# -------------------------------------------------------------------------------- verify, load


def verify_checkpoint(
    ckpt_dir: str | Path, *, known_sha256: Mapping[str, str] | None = None, only: Collection[str] | None = None
) -> None:
    """Check that a checkpoint is complete and intact; raise CheckpointError naming what is wrong.

    Problems reported: no marker (the save did not finish), a damaged marker, a listed file that is
    missing, a file of the wrong size or sha256, a file that is not listed. ``known_sha256``
    ({file name: sha256}) holds digests the caller has just computed from these very files (e.g.
    a release's SHA256SUMS check): those files are compared with the marker, not hashed again.
    ``only``: hash just these files (what a reader is about to use); the marker, the listing and
    every file's size are still checked.
    """
    d = Path(ckpt_dir)
    files = read_marker(d)
    known = {n: rec["sha256"] for n, rec in files.items() if only is not None and n not in only}
    _read_verified(d, files, wanted=set(), known={**known, **(known_sha256 or {})})


RESUME_ONLY_FILES = frozenset({OPTIMIZER_FILE, OPTIMIZER_INDEX, OPTIMIZER_META, RNG_FILE, RNG_META})
"""Files of a checkpoint that only resuming training reads (evaluating or analysing a model does not);
the optimizer's shards (``optimizer-0000k-of-0000n.safetensors``) too: :func:`is_resume_only`."""
_verified_for_reading: set[tuple[str, str]] = set()


def is_resume_only(name: str) -> bool:
    """Whether only resuming training reads this file of a checkpoint (:data:`RESUME_ONLY_FILES`)."""
    return name in RESUME_ONLY_FILES or (is_checkpoint_file(name) and name.startswith("optimizer-"))


def verify_model_files(ckpt_dir: str | Path) -> str:
    """Verify, once per process, the files of a checkpoint that reading its model uses: every file
    but the resume-only ones (:func:`is_resume_only`: the weights, configs, tokenizer, trainer state)
    against the marker.

    Returns the marker's sha256 (which names the checkpoint's content). A checkpoint already
    verified by this process with the same marker is not hashed again; a re-saved one is.
    Raises CheckpointError as :func:`verify_checkpoint`.
    """
    d = Path(ckpt_dir)
    key = (os.path.realpath(d), marker_sha256(d))
    if key not in _verified_for_reading:
        verify_checkpoint(d, only={n for n in read_marker(d) if not is_resume_only(n)})
        _verified_for_reading.add(key)
    return key[1]


def verify_share(ckpt_dir: str | Path, rank: int, world: int) -> None:
    """Rank ``rank``'s share of verifying a checkpoint that ``world`` ranks read together.

    Every rank checks the marker, the listing and every file's size; the hashing is dealt out:
    the marker's files, sorted, go round-robin (file j to rank ``j % world``), so the ranks hash
    the checkpoint once between them. Raises CheckpointError as :func:`verify_checkpoint`: the
    caller makes a failure on one rank a failure on all.
    """
    names = sorted(read_marker(ckpt_dir))
    verify_checkpoint(ckpt_dir, only=names[rank::world])


def _read_verified(
    d: Path, files: Mapping[str, Mapping[str, Any]], wanted: set[str], known: Mapping[str, str] | None = None,
    listing: bool = True,
) -> dict[str, Tensor]:
    """Hash every listed file (but the ``known`` ones), keeping the bytes of the wanted ones.

    ``listing``: also check that the folder holds exactly the listed files (off when ``files`` is a
    part of the marker). Raises CheckpointError on any mismatch.
    """
    problems = _listing_problems(d, files) if listing else []
    if problems:
        _fail(d, problems)
    known = known or {}
    for name in sorted(set(files) & set(known) - wanted):
        if known[name] != files[name]["sha256"]:
            problems.append(_hash_problem(name, files[name]["sha256"], known[name]))
    out: dict[str, Tensor] = {}
    with tensorio.Pipeline() as pipe:
        lanes: dict[str, tensorio.Sha256] = {}
        for name in sorted(files):
            if name in known and name not in wanted:
                continue
            if name in wanted:
                out[name], lanes[name] = tensorio.read_file(d / name, files[name]["size"], pipe)
            else:
                lanes[name] = tensorio.hash_file(d / name, files[name]["size"], pipe)
        for name, h in lanes.items():
            digest = h.hexdigest()
            if digest != files[name]["sha256"]:
                problems.append(_hash_problem(name, files[name]["sha256"], digest))
    if problems:
        _fail(d, problems)
    return out


def _read_wanted(
    d: Path, files: Mapping[str, Mapping[str, Any]], wanted: set[str], listing: bool = True
) -> dict[str, Tensor]:
    """:func:`_read_verified`, after checking that the marker lists every wanted file."""
    absent = sorted(wanted - set(files))
    if absent:
        raise CheckpointError(f"checkpoint {d} has no {', '.join(absent)}; it cannot be loaded here")
    return _read_verified(d, files, wanted, listing=listing)


def _json_of(buf: Tensor, what: str) -> Any:
    try:
        return json.loads(buf.numpy().tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{what} is not valid JSON: {e}") from None


def _model_files(d: Path, files: Mapping[str, Any]) -> list[str]:
    names = part_files(files, d, MODEL_FILE, MODEL_INDEX)
    if not names:
        raise CheckpointError(f"checkpoint {d}: neither {MODEL_FILE} nor {MODEL_INDEX} is listed in {MARKER}")
    return names


def _optimizer_files(d: Path, files: Mapping[str, Any]) -> list[str]:
    return part_files(files, d, OPTIMIZER_FILE, OPTIMIZER_INDEX)


def _tensors_of(d: Path, bufs: dict[str, Tensor], names: list[str]) -> dict[str, Tensor]:
    """The tensors of one part of a checkpoint, read into ``bufs`` (the index, if any, is popped)."""
    out: dict[str, Tensor] = {}
    for name in names:
        buf = bufs.pop(name)
        if name.endswith(".safetensors"):
            out.update(tensorio.parse_safetensors(buf, f"{d / name}"))
    return out


def load_model_state(ckpt_dir: str | Path) -> dict[str, Tensor]:
    """The weights of a checkpoint (name -> fp32 tensor on CPU), e.g. for evaluation or comparison.

    Requires the marker and checks the weights files' sha256 (one file, or the shards and their
    index); the other files are not read (use :func:`verify_checkpoint` to check the whole folder).
    """
    d = Path(ckpt_dir)
    files = read_marker(d)
    names = _model_files(d, files)
    bufs = _read_wanted(d, {n: files[n] for n in names}, set(names), listing=False)
    return _tensors_of(d, bufs, names)


def read_tensors(ckpt_dir: str | Path, part: str = "model") -> dict[str, Tensor]:
    """Every tensor of one part (``"model"`` or ``"optimizer"``) of a checkpoint, its files *not* hashed.

    For comparing a checkpoint just written by this process (a replay) with another; use
    :func:`load_model_state` to read one that must be trusted. Raises CheckpointError.
    """
    d = Path(ckpt_dir)
    files = read_marker(d)
    names = _model_files(d, files) if part == "model" else _optimizer_files(d, files)
    out: dict[str, Tensor] = {}
    with tensorio.Pipeline() as pipe:
        for name in names:
            if name.endswith(".safetensors"):
                buf, _ = tensorio.read_file(d / name, files[name]["size"], pipe)
                out.update(tensorio.parse_safetensors(buf, f"{d / name}"))
    return out


def model_sha256(ckpt_dir: str | Path) -> str:
    """What names a checkpoint's weights, from its marker: the weights file's sha256 when it is one
    file, else the sha256 of the sorted ``<sha256>  <file>`` lines of its shards and index.

    Raises CheckpointError without a (valid) marker.
    """
    d = Path(ckpt_dir)
    files = read_marker(d)
    names = _model_files(d, files)
    if names == [MODEL_FILE]:
        return str(files[MODEL_FILE]["sha256"])
    lines = "".join(f"{files[n]['sha256']}  {n}\n" for n in sorted(names))
    return hashlib.sha256(lines.encode()).hexdigest()


def open_slices(ckpt_dir: str | Path) -> tuple[SliceReader, SliceReader | None, dict[str, Any] | None]:
    """Readers of a checkpoint's weights and optimizer state (None without one) and its ``optimizer.json``.

    For ranks that each read only the slices they hold. Nothing is hashed: verify first
    (:func:`verify_share`). Raises CheckpointError naming what is missing or unreadable.
    """
    d = Path(ckpt_dir)
    files = read_marker(d)
    weights = SliceReader(d, tensor_files(files, d, MODEL_FILE, MODEL_INDEX))
    if OPTIMIZER_META not in files:
        return weights, None, None
    try:
        meta = read_json(d / OPTIMIZER_META)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{d / OPTIMIZER_META} is unreadable: {e}") from None
    return weights, SliceReader(d, tensor_files(files, d, OPTIMIZER_FILE, OPTIMIZER_INDEX)), meta


def match_weights(
    d: Path, model_shapes: Mapping[str, list[int]], saved_shapes: Mapping[str, list[int]], strict: bool,
    problems: list[str],
) -> list[str]:
    """The weight names both the model and checkpoint ``d`` hold, sorted; every mismatch appended to ``problems``.

    Names on one side only are a problem with ``strict``, else logged; a shape that differs always is.
    """
    missing = sorted(set(model_shapes) - set(saved_shapes))
    unexpected = sorted(set(saved_shapes) - set(model_shapes))
    if strict and (missing or unexpected):
        problems.append(name_mismatch("weight names do not match the model", "missing from the checkpoint",
                                       missing, "not in the model", unexpected))
    elif missing or unexpected:
        logger.warning(
            "loading %s non-strictly: %d weights missing, %d unexpected", d, len(missing), len(unexpected)
        )
    common = sorted(set(model_shapes) & set(saved_shapes))
    for name in common:
        if list(model_shapes[name]) != list(saved_shapes[name]):
            problems.append(f"weight {name} has shape {list(saved_shapes[name])}, the model {list(model_shapes[name])}")
    return common


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
    files = read_marker(d)
    model_files = _model_files(d, files)
    wanted = {*model_files, TRAINER_STATE, RNG_FILE, RNG_META}
    opt_files: list[str] = []
    if optimizer is not None:
        if strict or OPTIMIZER_META in files:
            opt_files = _optimizer_files(d, files) or [OPTIMIZER_FILE]
            wanted |= {*opt_files, OPTIMIZER_META}
        else:
            logger.warning("checkpoint %s has no optimizer state; the optimizer is left as it is", d)
            optimizer = None
    bufs = _read_wanted(d, files, wanted)

    problems: list[str] = []
    weights = _tensors_of(d, bufs, model_files)
    expected = model.state_dict()
    match_weights(d, {n: list(t.shape) for n, t in expected.items()}, {n: list(t.shape) for n, t in weights.items()},
                  strict, problems)
    opt_sd = None
    try:  # the files verified, so a malformed structure means they were written by something else
        if optimizer is not None:
            names = names_by_id(model if param_names is None else param_names)
            opt_tensors = _tensors_of(d, bufs, opt_files)
            opt_meta = _json_of(bufs.pop(OPTIMIZER_META), f"{d / OPTIMIZER_META}")
            opt_sd = optimizer_state_dict(optimizer, names, opt_tensors, opt_meta, strict, problems)
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
    rng_state = rng_from(
        tensorio.parse_safetensors(bufs.pop(RNG_FILE), f"{d / RNG_FILE}"), _json_of(bufs.pop(RNG_META), f"{d / RNG_META}")
    )
    return trainer_state, rng_state


def load_training_state(ckpt_dir: str | Path, *, verified: bool = False) -> dict[str, Any]:
    """Verify a checkpoint (every file hashed) and return its trainer and RNG state, not its tensors.

    For a caller that reads the tensors block by block itself (:func:`open_slices`) and must not
    hold a full-size copy of the model to do so. ``verified``: the folder was just verified (each
    rank its share, :func:`verify_share`); only the files read here are hashed. Returns
    :func:`load_checkpoint`'s dict.
    """
    d = Path(ckpt_dir)
    files = read_marker(d)
    wanted = {TRAINER_STATE, RNG_FILE, RNG_META}
    if verified:
        files = {n: files[n] for n in wanted if n in files}
    bufs = _read_wanted(d, files, wanted, listing=not verified)
    try:
        trainer_state, rng_state = _training_state(d, bufs)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {d}: {RNG_META} does not have the expected structure ({e!r})") from None
    return {"trainer_state": trainer_state, "rng_state": rng_state}


def read_trainer_state(folder: str | Path) -> dict[str, Any]:
    """trainer_state.json of a checkpoint folder, as a dict; its hash is not checked (verify the folder first).

    Raises CheckpointError when the file is missing, unreadable or not a JSON object.
    """
    path = Path(folder) / TRAINER_STATE
    try:
        state = read_json(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a JSON object; the checkpoint is corrupt")
    return state


def clean_leftovers(folder: str | Path) -> None:
    """Resolve what interrupted saves left in a folder of checkpoints (``checkpoints/``, ``steps/``, ``finetune/``).

    :func:`llm360.rundir.atomic.clean_leftovers`' rule, where a moved-aside checkpoint is renamed
    back only if it verifies. Call it from one process (rank 0) while no save is running there.
    """
    atomic.clean_leftovers(Path(folder), check_old=verify_checkpoint)


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
    folders = [(root, list_checkpoints, True)]
    if include_steps and (root / STEPS_DIR).is_dir():
        folders.append((root / STEPS_DIR, list_step_checkpoints, False))
    candidates: list[tuple[int, bool, int, Path]] = []
    for folder, listed, is_chunk in folders:
        if cleanup:
            clean_leftovers(folder)
        else:
            for e in sorted(folder.iterdir()):
                if atomic.is_leftover(e.name):
                    logger.warning("ignoring %s, left by an interrupted save", e)
        for i, e in listed(folder):
            if not has_marker(e):
                logger.warning("skipping %s: incomplete (no %s), it will not be loaded", e, MARKER)
                continue
            try:
                step = int(read_trainer_state(e)["step"])
            except (CheckpointError, ValueError, KeyError, TypeError) as err:
                logger.warning("skipping %s: cannot read its step: %s", e, err)
                continue
            candidates.append((step, is_chunk, i, e))
    for _, _, _, path in sorted(candidates, key=lambda c: c[:3], reverse=True):
        try:
            if verify:
                verify_checkpoint(path)
            else:
                problems = _listing_problems(path, read_marker(path))
                if problems:
                    _fail(path, problems)
        except CheckpointError as err:
            logger.warning("skipping %s: %s", path, err)
            continue
        return path
    return None
