"""Names inside a run directory, in one place.

Chunk ``i`` is trained into checkpoint ``ckpt_i``; indices are zero-padded to 3 digits (more when
needed) everywhere: files, folders, metrics and docs. The checkpoints of a run::

    checkpoints/init/                   the weights before step 0 (for replaying chunk 0)
    checkpoints/ckpt_000/ ...           one per chunk (:meth:`RunDir.ckpt_dir`, :func:`ckpt_name`)
    checkpoints/steps/step_00000100/    intra-chunk ones, by global optimizer step (:func:`step_name`)

and the files of each checkpoint folder (what they hold: :mod:`llm360.rundir.checkpoint`). Nothing
here reads a file's content or imports torch, so the report can list a run cheaply.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path


def index_name(i: int) -> str:
    """Zero-padded index used in every chunk and checkpoint name: 0 -> '000', 1234 -> '1234'."""
    if i < 0:
        raise ValueError(f"index must be >= 0, got {i}")
    return f"{i:03d}"


RUN_LOCK = ".run.lock"
"""Held (flock) by the process preparing or training a run directory, with who it is; released when it
exits (:func:`llm360.rundir.atomic.hold_lock`)."""

# ------------------------------------------------------------------------------ checkpoints

MARKER = "COMPLETE.json"
"""A checkpoint's marker: the sha256 and size of every other file; written last, so a folder without
it is a save that did not finish and is never loaded."""
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
TRAINER_STATE = "trainer_state.json"
RNG_FILE = "rng_state.safetensors"
RNG_META = "rng_state.json"
CHECKPOINT_FILES = frozenset({MARKER, MODEL_FILE, OPTIMIZER_FILE, OPTIMIZER_META, TRAINER_STATE, RNG_FILE, RNG_META})
"""The names a checkpoint's state uses; extra files (config.json, ...) take other names."""

INIT = "init"
"""Checkpoint folder of the weights before the first step."""
STEPS_DIR = "steps"
"""Sub-folder of ``checkpoints/`` holding the intra-chunk (``checkpoint_every_steps``) checkpoints."""
DCP_DIR = "dcp"
"""Sub-folder of ``checkpoints/`` holding each checkpoint's sharded copy (FSDP runs; never released)."""

_CKPT_RE = re.compile(r"ckpt_(\d{3,})")
_STEP_RE = re.compile(r"step_(\d{8,})")


def ckpt_name(i: int) -> str:
    """Name of chunk i's checkpoint folder: 7 -> 'ckpt_007'."""
    return f"ckpt_{index_name(i)}"


def parse_ckpt_name(name: str) -> int | None:
    """The chunk index of a checkpoint folder's name ('ckpt_012' -> 12); None for any other name."""
    m = _CKPT_RE.fullmatch(name)
    return int(m.group(1)) if m else None


def step_name(step: int) -> str:
    """Name of the intra-chunk checkpoint after ``step`` optimizer steps: 100 -> 'step_00000100'."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step_{step:08d}"


def parse_step_name(name: str) -> int | None:
    """The step of an intra-chunk checkpoint folder's name ('step_00000100' -> 100); None for any other."""
    m = _STEP_RE.fullmatch(name)
    return int(m.group(1)) if m else None


def has_marker(folder: str | Path) -> bool:
    """Whether a checkpoint folder's marker is there: its save finished (the hashes are not checked here)."""
    return (Path(folder) / MARKER).is_file()


def _listed(folder: Path, parse: Callable[[str], int | None], complete_only: bool) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        i = parse(p.name)
        if i is not None and p.is_dir() and (not complete_only or has_marker(p)):
            found.append((i, p))
    return sorted(found)


def list_checkpoints(folder: str | Path, *, complete_only: bool = False) -> list[tuple[int, Path]]:
    """``(chunk index, path)`` of every ``ckpt_NNN`` folder directly in folder (a run's ``checkpoints/``,
    or ``eval/``), sorted by index; with complete_only, only those whose marker is there.

    Hidden temporary folders of a save in progress, ``init`` and ``steps`` are not listed; a missing
    folder lists nothing.
    """
    return _listed(Path(folder), parse_ckpt_name, complete_only)


def list_step_checkpoints(folder: str | Path, *, complete_only: bool = False) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step_XXXXXXXX`` folder directly in folder (``checkpoints/steps``), by step."""
    return _listed(Path(folder), parse_step_name, complete_only)


class RunDir:
    """The layout of one run directory (see DESIGN.md)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def lock(self) -> Path:
        return self.root / RUN_LOCK

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def manifest(self) -> Path:
        return self.data / "manifest.json"

    @property
    def tokenizer(self) -> Path:
        return self.data / "tokenizer"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    def chunk(self, i: int) -> Path:
        return self.data / chunk_file(i)

    def provenance(self, i: int) -> Path:
        return self.data / provenance_file(i)

    def source_snapshot(self, source: str) -> Path:
        """The raw documents of a source with ``snapshot: true`` (a run's or a release's)."""
        return self.data / "sources" / f"{source}.jsonl.gz"

    def ckpt_dir(self, i: int) -> Path:
        return self.checkpoints / ckpt_name(i)

    @property
    def init_checkpoint(self) -> Path:
        """``checkpoints/init``: the weights before step 0."""
        return self.checkpoints / INIT

    @property
    def step_checkpoints(self) -> Path:
        """``checkpoints/steps``: the folder of the intra-chunk checkpoints."""
        return self.checkpoints / STEPS_DIR

    @property
    def sharded_copies(self) -> Path:
        """``checkpoints/dcp``: the sharded copy of each checkpoint, under the checkpoint's name (FSDP runs)."""
        return self.checkpoints / DCP_DIR


def chunk_file(i: int) -> str:
    return f"chunk_{index_name(i)}.npy"


DOC_INDEX_DIR = ".doc_index"
"""Folder of a data directory caching, per documents table, where each document's tokens lie in the chunks
(``llm360 inspect doc`` builds it on first use); hidden, so a release leaves it out, and replaced with the
data directory when the data is prepared again."""


def doc_index_file(data_dir: str | Path, source: str) -> Path:
    """The cached document index of one documents table: ``<data>/.doc_index/<source>.npy``."""
    return Path(data_dir) / DOC_INDEX_DIR / f"{source}.npy"


RELEASE_SUMS = "SHA256SUMS"
"""The sha256 list at the top of a release folder; every file of a release is in it, so readers of a
release write nothing into it."""


def provenance_file(i: int) -> str:
    return f"provenance_{index_name(i)}.npy"
