"""Names inside a run directory, in one place.

Chunk ``i`` is trained into checkpoint ``ckpt_i``; indices are zero-padded to 3 digits (more when
needed) everywhere: files, folders, metrics and docs. The checkpoints of a run::

    checkpoints/init/                   the weights before step 0 (for replaying chunk 0)
    checkpoints/ckpt_000/ ...           one per chunk (:meth:`RunDir.ckpt_dir`, :func:`ckpt_name`)
    checkpoints/steps/step_00000100/    intra-chunk ones, by global optimizer step (:func:`step_name`)

and the files of each checkpoint folder (what they hold: :mod:`llm360.rundir.checkpoint`). The rest of a
run directory (:class:`RunDir`)::

    config.yaml                         the resolved config (a copy in every checkpoint too)
    data/                               manifest.json, chunk_NNN.npy, provenance_NNN.npy, tokenizer/,
                                        documents/<source>.jsonl.gz, sources/<source>.jsonl.gz
    metrics/                            train.jsonl, events.jsonl
    eval/<ckpt>/<task>.json             one result per (checkpoint, task); eval/summary.json, summary.csv
    analysis/memorization/              <ckpt>.json + <ckpt>.npz, samples.*, summary.json
    analysis/contamination/<task>.json  one result per evaluation set
    finetune/<name>/                    fine-tuned models, each a checkpoint folder with lineage.json
    report/index.html                   the report page
    release/                            the default place of ``llm360 release``

A release folder has the same layout, plus ``SHA256SUMS``, ``MODEL_CARD.md`` and ``code.json`` at its
top. Nothing here reads a file's content or imports torch, so the report can list a run cheaply.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
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
MODEL_INDEX = "model.safetensors.index.json"
"""The index of a model sharded into several safetensors files, as transformers writes it."""
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_INDEX = "optimizer.safetensors.index.json"
"""The index of an optimizer state split into several files, in the model index's format."""
OPTIMIZER_META = "optimizer.json"
TRAINER_STATE = "trainer_state.json"
RNG_FILE = "rng_state.safetensors"
RNG_META = "rng_state.json"
CHECKPOINT_FILES = frozenset({
    MARKER, MODEL_FILE, MODEL_INDEX, OPTIMIZER_FILE, OPTIMIZER_INDEX, OPTIMIZER_META, TRAINER_STATE, RNG_FILE, RNG_META,
})  # fmt: skip
"""The names a checkpoint's state uses; extra files (config.json, ...) take other names."""
_SHARD_RE = re.compile(r"(model|optimizer)-\d{5}-of-\d{5}\.safetensors")


def is_checkpoint_file(name: str) -> bool:
    """Whether ``name`` is one of a checkpoint's state files (:data:`CHECKPOINT_FILES` or a shard of them)."""
    return name in CHECKPOINT_FILES or _SHARD_RE.fullmatch(name) is not None
HF_CONFIG = "config.json"
"""The Hugging Face config beside the weights (every checkpoint and fine-tuned model has one)."""
MODEL_META = "llm360_model.json"
"""llm360's exact model config beside ``config.json`` (muP and what transformers' config cannot hold)."""

INIT = "init"
"""Checkpoint folder of the weights before the first step."""
STEPS_DIR = "steps"
"""Sub-folder of ``checkpoints/`` holding the intra-chunk (``checkpoint_every_steps``) checkpoints."""

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


# ------------------------------------------------------------------------------ run directory

CONFIG = "config.yaml"
"""The resolved config, every default written out: at the top of a run and in every checkpoint."""
DATA_DIR = "data"
MANIFEST = "manifest.json"
"""The data manifest, at the top of a data directory."""
TOKENIZER_DIR = "tokenizer"
DOCUMENTS_DIR = "documents"
"""Folder of a data directory with every input document's fate, one ``<source>.jsonl.gz`` per documents table."""
SOURCES_DIR = "sources"
"""Folder of a data directory with the raw documents of the sources marked ``snapshot: true``."""
CHECKPOINTS_DIR = "checkpoints"
METRICS_DIR = "metrics"
TRAIN_METRICS = "train.jsonl"
EVENTS = "events.jsonl"
EVAL_DIR = "eval"
SUMMARY = "summary.json"
"""The table over every checkpoint, in ``eval/`` and in each ``analysis/<name>/`` folder."""
SUMMARY_CSV = "summary.csv"
ANALYSIS_DIR = "analysis"
MEMORIZATION = "memorization"
CONTAMINATION = "contamination"
FINETUNE_DIR = "finetune"
LINEAGE = "lineage.json"
"""What a fine-tuned model was made from (base checkpoint, data, config, versions), in its folder."""
FINETUNE_METRICS = "metrics.jsonl"
FINETUNE_CONFIG = "finetune.yaml"
FINETUNE_BUILTIN_DATA = "train_data.jsonl"
"""The exact records a fine-tuned model trained on, when they were a built-in set."""
REPORT_DIR = "report"
REPORT_PAGE = "index.html"
RELEASE_DIR = "release"
"""Where ``llm360 release`` (and ``llm360 run``) put a run's release by default, inside the run."""
EXPORT_DIR = "export"
"""Where ``llm360 export-data`` writes by default, inside the run (``export/llm360-jsonl/``)."""
PIPELINE_STATE = "pipeline.json"
"""What ``llm360 run`` last did (a fingerprint of the run's files per stage), so it redoes only what changed."""
RUN_CONTENT = (CONFIG, DATA_DIR, CHECKPOINTS_DIR, METRICS_DIR, EVAL_DIR, ANALYSIS_DIR, FINETUNE_DIR, REPORT_DIR)
"""What the stages write at the top of a run directory, in stage order: what a release carries."""


class RunDir:
    """The layout of one run directory, or of a release folder (same layout; see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def lock(self) -> Path:
        return self.root / RUN_LOCK

    @property
    def data(self) -> Path:
        return self.root / DATA_DIR

    @property
    def manifest(self) -> Path:
        return data_manifest(self.data)

    @property
    def tokenizer(self) -> Path:
        return self.data / TOKENIZER_DIR

    @property
    def prepare_scratch(self) -> Path:
        """``.prepare``: a prepare's finished tasks while it runs (:data:`PREPARE_DIR`)."""
        return self.root / PREPARE_DIR

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_DIR

    @property
    def train_metrics(self) -> Path:
        """``metrics/train.jsonl``: one line per optimizer step."""
        return self.metrics / TRAIN_METRICS

    @property
    def events(self) -> Path:
        """``metrics/events.jsonl``: NaNs, skips, rollbacks, spikes, resumes."""
        return self.metrics / EVENTS

    def chunk(self, i: int) -> Path:
        return self.data / chunk_file(i)

    def provenance(self, i: int) -> Path:
        return self.data / provenance_file(i)

    def source_snapshot(self, source: str) -> Path:
        """The raw documents of a source with ``snapshot: true`` (a run's or a release's)."""
        return self.data / SOURCES_DIR / f"{source}.jsonl.gz"

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

    # ----------------------------------------------------------------- what the later stages write

    @property
    def eval_dir(self) -> Path:
        """``eval/``: one folder per evaluated model, named as the model (``ckpt_012``, a fine-tuned name)."""
        return self.root / EVAL_DIR

    def eval_result(self, model: str, task: str) -> Path:
        """``eval/<model>/<task>.json``: one (model, task) result."""
        return self.eval_dir / model / f"{task}.json"

    def eval_samples(self, model: str, task: str) -> Path:
        """``eval/<model>/<task>.samples.jsonl``: the per-example outputs of that result."""
        return self.eval_dir / model / f"{task}.samples.jsonl"

    @property
    def eval_summary(self) -> Path:
        """``eval/summary.json``: every result in one table (``eval_summary_csv`` the same as CSV)."""
        return self.eval_dir / SUMMARY

    @property
    def eval_summary_csv(self) -> Path:
        return self.eval_dir / SUMMARY_CSV

    def eval_claim(self, model: str, task: str | None = None) -> Path:
        """``eval/.claims/<model>[.<task>].lock``: held (flock) by the process evaluating that model (or
        pair), so two evaluators never take the same one; removed when done, hidden (never released)."""
        return self.eval_dir / ".claims" / (f"{model}.{task}.lock" if task else f"{model}.lock")

    def analysis_dir(self, name: str) -> Path:
        """``analysis/<name>/``: the results of one analysis (memorization, contamination)."""
        return self.root / ANALYSIS_DIR / name

    @property
    def memorization_dir(self) -> Path:
        return self.analysis_dir(MEMORIZATION)

    def memorization_result(self, ckpt: str) -> Path:
        """``analysis/memorization/<ckpt>.json``: a checkpoint's settings and timing, written after its arrays
        (:meth:`memorization_scores`), so the result exists when this file does."""
        return self.memorization_dir / f"{ckpt}.json"

    def memorization_scores(self, ckpt: str) -> Path:
        """``analysis/memorization/<ckpt>.npz``: a checkpoint's per-row scores."""
        return self.memorization_dir / f"{ckpt}.npz"

    @property
    def memorization_samples(self) -> Path:
        """``analysis/memorization/samples.json``: how the rows were drawn (the rows: ``samples.npz`` beside it)."""
        return self.memorization_dir / "samples.json"

    @property
    def memorization_sample_rows(self) -> Path:
        return self.memorization_dir / "samples.npz"

    @property
    def memorization_summary(self) -> Path:
        return self.memorization_dir / SUMMARY

    @property
    def contamination_dir(self) -> Path:
        return self.analysis_dir(CONTAMINATION)

    def contamination_result(self, task: str) -> Path:
        """``analysis/contamination/<task>.json``: one evaluation set's overlap with the training data."""
        return self.contamination_dir / f"{task}.json"

    @property
    def finetune_dir(self) -> Path:
        """``finetune/``: fine-tuned models, one checkpoint folder each (hidden names are work in progress)."""
        return self.root / FINETUNE_DIR

    def finetune_model(self, name: str) -> Path:
        return self.finetune_dir / name

    @property
    def report_page(self) -> Path:
        """``report/index.html``: the report."""
        return self.root / REPORT_DIR / REPORT_PAGE

    @property
    def llm360_export(self) -> Path:
        """``export/llm360-jsonl/``: the data in LLM360's released chunk format, unless told otherwise."""
        return self.root / EXPORT_DIR / "llm360-jsonl"

    @property
    def pipeline_state(self) -> Path:
        return self.root / PIPELINE_STATE

    @property
    def release_default(self) -> Path:
        """``release/``: where a release of this run goes unless told otherwise."""
        return self.root / RELEASE_DIR

    # ----------------------------------------------------------------- the top of a release

    @property
    def sums(self) -> Path:
        """``SHA256SUMS``: a release's list of every file with its sha256."""
        return self.root / RELEASE_SUMS

    @property
    def model_card(self) -> Path:
        return self.root / MODEL_CARD

    @property
    def code_info(self) -> Path:
        """``code.json``: the llm360 version, git commit and package versions a release was made with."""
        return self.root / CODE_INFO


def data_manifest(data_dir: str | Path) -> Path:
    """The manifest of a data directory (a run's ``data/`` or a data directory elsewhere)."""
    return Path(data_dir) / MANIFEST


def documents_file(data_dir: str | Path, table: str) -> Path:
    """``<data>/documents/<table>.jsonl.gz``: every document of one documents table, used or not, and why."""
    return Path(data_dir) / DOCUMENTS_DIR / f"{table}.jsonl.gz"


def list_checkpoint_files(folder: str | Path, suffix: str = ".json") -> list[tuple[int, Path]]:
    """``(chunk index, path)`` of every ``ckpt_NNN<suffix>`` file directly in folder (an analysis's
    per-checkpoint results), sorted by index; a missing folder lists nothing."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        if p.name.endswith(suffix) and (i := parse_ckpt_name(p.name[: -len(suffix)])) is not None and p.is_file():
            found.append((i, p))
    return sorted(found)


def chunk_file(i: int) -> str:
    return f"chunk_{index_name(i)}.npy"


CHUNK_GLOB = "chunk_*.npy"
PROVENANCE_GLOB = "provenance_*.npy"


PREPARE_DIR = ".prepare"
"""Hidden folder of a run directory holding a prepare's finished tasks while it runs (map outputs, the plan,
scattered rows, the data set being built); a killed prepare resumes from it, and it is deleted when the data
set is installed as ``data/``."""

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
MODEL_CARD = "MODEL_CARD.md"
"""A release's model card, generated from its files."""
CODE_INFO = "code.json"
"""A release's code provenance: llm360's version, the git commit (and whether it was dirty), package versions."""
CODE_SNAPSHOT_DIRS = ("code", "source", "src")
"""Folders at the top of a release that hold a copy of the training code, when its publisher added one."""
CODE_SNAPSHOT_ARCHIVES = ("code*.tar*", "code*.zip")
"""The same as one archive file at the top of a release (glob patterns)."""


def provenance_file(i: int) -> str:
    return f"provenance_{index_name(i)}.npy"


# ------------------------------------------------------------------------------ what is there


@dataclass
class Listing:
    """A folder's entries, found without following symlinks; paths '/'-separated, relative to it."""

    files: set[str] = field(default_factory=set)
    """Regular files reached through real folders only: the ones that are safe to open."""
    links: dict[str, str] = field(default_factory=dict)
    """Symlinks (to files or folders; never followed) -> what they point to."""
    other: set[str] = field(default_factory=set)
    """Entries that are neither: FIFOs, sockets, devices (never opened: a FIFO would block)."""


def walk(root: Path) -> Listing:
    """Every entry under root (see :class:`Listing`); symlinked folders are listed, not entered."""
    out = Listing()
    stack: list[tuple[str, str]] = [(str(root), "")]
    while stack:
        cur, prefix = stack.pop()
        with os.scandir(cur) as it:
            for e in it:
                rel = prefix + e.name
                if e.is_symlink():
                    try:
                        out.links[rel] = os.readlink(e.path)
                    except OSError:
                        out.links[rel] = "?"
                elif e.is_dir(follow_symlinks=False):
                    stack.append((e.path, rel + "/"))
                elif e.is_file(follow_symlinks=False):
                    out.files.add(rel)
                else:
                    out.other.add(rel)
    return out
