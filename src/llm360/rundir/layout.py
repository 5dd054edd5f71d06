"""Names inside a run directory, in one place.

Chunk ``i`` is trained into checkpoint ``ckpt_i``; indices are zero-padded to 3 digits (more when
needed) everywhere: files, folders, metrics and docs.
"""

from __future__ import annotations

from pathlib import Path


def index_name(i: int) -> str:
    """Zero-padded index used in every chunk and checkpoint name: 0 -> '000', 1234 -> '1234'."""
    if i < 0:
        raise ValueError(f"index must be >= 0, got {i}")
    return f"{i:03d}"


RUN_LOCK = ".run.lock"
"""Held (flock) by the process preparing or training a run directory, with who it is; released when it
exits (:func:`llm360.rundir.atomic.hold_lock`)."""


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
        return self.checkpoints / f"ckpt_{index_name(i)}"


def chunk_file(i: int) -> str:
    return f"chunk_{index_name(i)}.npy"


def provenance_file(i: int) -> str:
    return f"provenance_{index_name(i)}.npy"
