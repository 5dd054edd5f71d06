"""Read what a run directory (or a release folder with the same layout) holds, never failing on it.

Every reader here returns what it could read plus a note for what it could not: a missing file is
"not available", a malformed file is a note with the reason, and a malformed line of a JSONL file
is skipped and counted. Nothing here writes, hashes big files or imports torch: a report of a
360-checkpoint run reads small JSON files and the headers of the safetensors files only
(:func:`llm360.rundir.tensorio.read_header`). Names and listings are :mod:`llm360.rundir.layout`'s.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm360.errors import CheckpointError
from llm360.rundir.layout import (
    CHUNK_GLOB,
    CODE_SNAPSHOT_ARCHIVES,
    CODE_SNAPSHOT_DIRS,
    DOCUMENTS_DIR,
    HF_CONFIG,
    PROVENANCE_GLOB,
    SOURCES_DIR,
    TRAINER_STATE,
    RunDir,
    has_marker,
    list_checkpoint_files,
    list_checkpoints,
    parse_ckpt_name,
)
from llm360.rundir.shards import part_paths
from llm360.rundir.tensorio import read_header

logger = logging.getLogger(__name__)


@dataclass
class Checkpoint:
    """One checkpoint folder: what it holds, from its file names and safetensors headers."""

    name: str
    index: int | None
    """Chunk index (``ckpt_012`` -> 12); None for other folders such as ``init``."""
    path: Path
    has_model: bool
    has_optimizer: bool
    complete: bool
    """Its ``COMPLETE.json`` marker is there (the hashes are not checked here: that is `llm360 verify`)."""
    model_dtypes: list[str] = field(default_factory=list)
    parameters: int | None = None
    """Parameters stored in the weights files (from their headers)."""
    optimizer_tensors: int | None = None


@dataclass
class Jsonl:
    """The records of a JSONL file, and how many lines could not be read."""

    records: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: int = 0
    error: str | None = None
    """Why the file could not be read at all (None: it was read)."""
    present: bool = False


@dataclass
class EvalData:
    """Evaluation results over checkpoints, from eval/summary.json or the per-file results."""

    columns: list[str]
    """``<task>/<metric>`` in display order."""
    rows: list[dict[str, Any]]
    """One per checkpoint: checkpoint, step, tokens_seen and the columns."""
    tasks: dict[str, dict[str, Any]]
    source: str
    """Which files the numbers came from."""


@dataclass
class RunFacts:
    """Everything the report shows, as read from the folder."""

    root: Path
    notes: list[str] = field(default_factory=list)
    """Problems met while reading (malformed files or lines), shown on the page."""
    config: dict[str, Any] | None = None
    config_text: str | None = None
    config_error: str | None = None
    manifest: dict[str, Any] | None = None
    manifest_error: str | None = None
    checkpoints: list[Checkpoint] = field(default_factory=list)
    model_config: dict[str, Any] | None = None
    model_config_from: str | None = None
    trainer_state: dict[str, Any] | None = None
    train: Jsonl = field(default_factory=Jsonl)
    events: Jsonl = field(default_factory=Jsonl)
    eval: EvalData | None = None
    eval_error: str | None = None
    memorization: dict[str, Any] | None = None
    memorization_metas: list[dict[str, Any]] = field(default_factory=list)
    memorization_error: str | None = None
    contamination: dict[str, dict[str, Any]] = field(default_factory=dict)
    contamination_error: str | None = None
    chunk_files: list[str] = field(default_factory=list)
    provenance_files: list[str] = field(default_factory=list)
    source_text_files: list[str] = field(default_factory=list)
    """data/sources/*.jsonl.gz: a snapshot of the source documents' text (sources with snapshot: true)."""
    document_tables: list[str] = field(default_factory=list)
    """data/documents/*.jsonl.gz: every document's fate (used, held out, rejected and why)."""
    code_snapshot: str | None = None
    code_info: dict[str, Any] | None = None
    """code.json (written by `llm360 release`): llm360 version, git commit and dirty flag, package versions."""

    @property
    def chunk_checkpoints(self) -> list[Checkpoint]:
        return [c for c in self.checkpoints if c.index is not None]


# ------------------------------------------------------------------------------------ readers


def _rel(root: Path, p: Path) -> str:
    try:
        return str(p.relative_to(root))
    except ValueError:
        return str(p)


def read_json(path: Path, facts: RunFacts, *, what: str = "") -> tuple[Any, str | None]:
    """(content, None), or (None, why) when the file is missing or malformed (malformed: also a note)."""
    if not path.is_file():
        return None, f"no {_rel(facts.root, path)}"
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f), None
    except (OSError, ValueError) as e:
        why = f"{_rel(facts.root, path)} is unreadable ({type(e).__name__}: {e})"
        facts.notes.append(why + (f"; {what} left out" if what else ""))
        return None, why


def _number(v: Any) -> Any:
    """JSONL metrics write NaN/inf as strings ("nan"); turn them back into floats."""
    if isinstance(v, str) and v.strip().lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(v)
    return v


def read_jsonl(path: Path, facts: RunFacts) -> Jsonl:
    """Records of a JSONL file; a line that is not a JSON object is skipped, counted and noted."""
    out = Jsonl()
    if not path.is_file():
        out.error = f"no {_rel(facts.root, path)}"
        return out
    out.present = True
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                line_l = line.lower()
                try:
                    rec = json.loads(line)
                except ValueError:
                    out.bad_lines += 1
                    continue
                if not isinstance(rec, dict):
                    out.bad_lines += 1
                    continue
                if "nan" in line_l or "inf" in line_l:  # rare: only then look for "nan"/"inf" strings
                    rec = {k: _number(v) for k, v in rec.items()}
                out.records.append(rec)
    except OSError as e:
        out.error = f"{_rel(facts.root, path)} is unreadable ({e})"
        facts.notes.append(out.error)
        return out
    if out.bad_lines:
        facts.notes.append(f"{_rel(facts.root, path)}: {out.bad_lines} malformed line"
                           f"{'' if out.bad_lines == 1 else 's'} skipped")  # fmt: skip
    return out


def _safetensors_header(path: Path) -> dict[str, Any] | None:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes); None if it cannot be read."""
    try:
        return read_header(path)
    except (OSError, CheckpointError):
        return None


def _ckpt(path: Path, facts: RunFacts) -> Checkpoint:
    try:
        model_files, opt_files = part_paths(path, "model"), part_paths(path, "optimizer")
    except CheckpointError as e:
        facts.notes.append(f"{_rel(facts.root, path)}: {e}")
        model_files, opt_files = [], []
    ck = Checkpoint(
        name=path.name, index=parse_ckpt_name(path.name), path=path,
        has_model=bool(model_files), has_optimizer=bool(opt_files), complete=has_marker(path),
    )  # fmt: skip
    if ck.has_model:
        tensors: list[dict] = []
        for f in model_files:
            header = _safetensors_header(f)
            if header is None:
                facts.notes.append(f"{_rel(facts.root, f)}: header unreadable")
                tensors = []
                break
            tensors += [v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
        if tensors:
            ck.model_dtypes = sorted({str(v.get("dtype")) for v in tensors})
            try:
                ck.parameters = sum(math.prod(int(d) for d in v.get("shape", [])) for v in tensors)
            except (TypeError, ValueError):
                facts.notes.append(f"{_rel(facts.root, model_files[0])}: header has malformed shapes")
    if ck.has_optimizer:
        headers = [_safetensors_header(f) for f in opt_files]
        ck.optimizer_tensors = None if None in headers else sum(
            1 for h in headers for k in h if k != "__metadata__")
    return ck


def _checkpoints(facts: RunFacts, root: Path) -> None:
    rd = RunDir(root)
    init = [rd.init_checkpoint] if rd.init_checkpoint.is_dir() else []
    for p in init + [p for _, p in list_checkpoints(rd.checkpoints)]:
        facts.checkpoints.append(_ckpt(p, facts))


def _model_config(facts: RunFacts) -> None:
    for ck in reversed(facts.checkpoints):  # the latest first: the architecture of the released model
        if not (ck.path / HF_CONFIG).is_file():
            continue
        data, _ = read_json(ck.path / HF_CONFIG, facts, what="architecture")
        if isinstance(data, dict):
            facts.model_config = data
            facts.model_config_from = ck.name
            state, _ = read_json(ck.path / TRAINER_STATE, facts)
            facts.trainer_state = state if isinstance(state, dict) else None
            return


def _config(facts: RunFacts, root: Path) -> None:
    path = RunDir(root).config
    if not path.is_file():
        facts.config_error = "no config.yaml"
        return
    import yaml

    try:
        facts.config_text = path.read_text(encoding="utf-8", errors="replace")
        data = yaml.safe_load(facts.config_text)
    except (OSError, yaml.YAMLError) as e:
        facts.config_error = f"config.yaml is unreadable ({type(e).__name__})"
        facts.notes.append(facts.config_error)
        return
    if not isinstance(data, dict):
        facts.config_error = "config.yaml does not hold a mapping"
        facts.notes.append(facts.config_error)
        return
    facts.config = data


def _manifest(facts: RunFacts, root: Path) -> None:
    rd = RunDir(root)
    data, why = read_json(rd.manifest, facts, what="data section")
    if isinstance(data, dict):
        facts.manifest = data
    elif data is not None:
        facts.manifest_error = "data/manifest.json does not hold an object"
        facts.notes.append(facts.manifest_error)
    else:
        facts.manifest_error = why
    if rd.data.is_dir():
        facts.chunk_files = sorted(p.name for p in rd.data.glob(CHUNK_GLOB))
        facts.provenance_files = sorted(p.name for p in rd.data.glob(PROVENANCE_GLOB))
        facts.source_text_files = sorted(_rel(root, p) for p in (rd.data / SOURCES_DIR).glob("*.jsonl*"))
        facts.document_tables = sorted(_rel(root, p) for p in (rd.data / DOCUMENTS_DIR).glob("*.jsonl*"))


def _eval(facts: RunFacts, root: Path) -> None:
    rd = RunDir(root)
    folder = rd.eval_dir
    if not folder.is_dir():
        facts.eval_error = "no eval/ folder (run `llm360 eval`)"
        return
    summary, why = read_json(rd.eval_summary, facts, what="eval summary")
    if isinstance(summary, dict) and all(isinstance(summary.get(k), list) for k in ("rows", "columns")):
        rows = [r for r in summary["rows"] if isinstance(r, dict) and isinstance(r.get("checkpoint"), str)]
        columns = [str(c) for c in summary["columns"]]
        tasks = summary.get("tasks") if isinstance(summary.get("tasks"), dict) else {}
        if rows and columns:
            facts.eval = EvalData(columns, rows, tasks, _rel(root, rd.eval_summary))
            return
    elif summary is not None:
        facts.notes.append(f"{_rel(root, rd.eval_summary)} is not an llm360 eval summary; using the per-checkpoint files")
    # Per-file results: eval/<ckpt>/<task>.json with a "metrics" object.
    rows_by: dict[str, dict[str, Any]] = {}
    columns: dict[str, None] = {}
    tasks: dict[str, dict[str, Any]] = {}
    for _, d in list_checkpoints(folder):
        for f in sorted(d.glob("*.json")):
            data, _ = read_json(f, facts, what="this result")
            if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
                continue
            key = str(data.get("task") or f.stem)
            row = rows_by.setdefault(d.name, {"checkpoint": d.name, "step": _number(data.get("step")),
                                              "tokens_seen": _number(data.get("tokens_seen"))})  # fmt: skip
            metrics = data["metrics"]
            primary = data.get("primary_metric") if isinstance(data.get("primary_metric"), str) else None
            names = ([primary] if primary in metrics else []) + sorted(k for k in metrics if k != primary)
            for metric in names:
                value = _number(metrics[metric])
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    columns[f"{key}/{metric}"] = None
                    row[f"{key}/{metric}"] = value
            tasks.setdefault(key, {"primary_metric": primary, "kind": data.get("kind")})
    if rows_by:
        facts.eval = EvalData(list(columns), list(rows_by.values()), tasks, "eval/ckpt_*/<task>.json")
    else:
        facts.eval_error = why if why and "unreadable" in why else "no evaluation results in eval/ yet"


def _memorization(facts: RunFacts, root: Path) -> None:
    rd = RunDir(root)
    folder = rd.memorization_dir
    if not folder.is_dir():
        facts.memorization_error = "no analysis/memorization/ folder (run `llm360 analyze memorization`)"
        return
    summary, why = read_json(rd.memorization_summary, facts, what="memorization summary")
    if isinstance(summary, dict) and isinstance(summary.get("checkpoints"), list):
        facts.memorization = summary
    elif summary is not None:
        facts.notes.append(f"{_rel(root, rd.memorization_summary)} has an unexpected shape; left out")
    for _, p in list_checkpoint_files(folder, ".json"):
        data, _ = read_json(p, facts)
        if isinstance(data, dict) and "checkpoint" in data:
            facts.memorization_metas.append(data)
    if facts.memorization is None and not facts.memorization_metas:
        facts.memorization_error = why or "no memorization results yet"


def _contamination(facts: RunFacts, root: Path) -> None:
    folder = RunDir(root).contamination_dir
    if not folder.is_dir():
        facts.contamination_error = "no analysis/contamination/ folder (run `llm360 analyze contamination`)"
        return
    for p in sorted(folder.glob("*.json")):
        data, _ = read_json(p, facts, what="this task")
        if isinstance(data, dict) and isinstance(data.get("examples"), int):
            facts.contamination[str(data.get("task") or p.stem)] = data
        elif data is not None:
            facts.notes.append(f"{_rel(root, p)} is not a contamination result; left out")
    if not facts.contamination:
        facts.contamination_error = "no contamination results in analysis/contamination/ yet"


def collect(run_dir: str | Path) -> RunFacts:
    """Read everything the report needs from run_dir; problems become notes, never exceptions."""
    root = Path(run_dir)
    facts = RunFacts(root=root)
    rd = RunDir(root)

    def train() -> None:
        facts.train = read_jsonl(rd.train_metrics, facts)

    def events() -> None:
        facts.events = read_jsonl(rd.events, facts)

    steps = [("config", lambda: _config(facts, root)), ("data manifest", lambda: _manifest(facts, root)),
             ("checkpoints", lambda: _checkpoints(facts, root)), ("architecture", lambda: _model_config(facts)),
             ("training metrics", train), ("events", events), ("evaluations", lambda: _eval(facts, root)),
             ("memorization", lambda: _memorization(facts, root)),
             ("contamination", lambda: _contamination(facts, root)), ("code", lambda: _code(facts, root))]  # fmt: skip
    for what, step in steps:
        try:
            step()
        except (OSError, ValueError, TypeError, AttributeError, KeyError) as e:  # never let one file stop the page
            logger.debug("reading the %s failed", what, exc_info=True)
            facts.notes.append(f"the {what} could not be read: {type(e).__name__}: {e}")
    return facts


def _code(facts: RunFacts, root: Path) -> None:
    info, _ = read_json(RunDir(root).code_info, facts, what="code provenance")
    facts.code_info = info if isinstance(info, dict) else None
    for name in CODE_SNAPSHOT_DIRS:
        if (root / name).is_dir() and any((root / name).iterdir()):
            facts.code_snapshot = f"{name}/"
            return
    archives = [name for pattern in CODE_SNAPSHOT_ARCHIVES for name in sorted(p.name for p in root.glob(pattern))]
    facts.code_snapshot = archives[0] if archives else None
