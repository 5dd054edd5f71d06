"""`llm360 eval`: every complete checkpoint x every task, incrementally, one result file per pair.

::

    <run>/eval/
      ckpt_000/perplexity.json              one file per (checkpoint, task), written atomically
      ckpt_000/arc_challenge_25shot.json
      ckpt_000/<task>.samples.jsonl         per-example outputs (eval.log_samples)
      summary.json  summary.csv             one table over every checkpoint, rebuilt after each pass

A result file records the sha256 of the checkpoint's ``COMPLETE.json`` marker (which itself lists
the sha256 of every file), the task's settings, the metrics and lm-eval's details. A (checkpoint,
task) pair whose result file matches the checkpoint's marker and the task's settings is never
computed again; a checkpoint that was re-saved, or a task whose settings changed, is.

Only complete checkpoints are read: a ``ckpt_NNN`` folder without its marker is still being
written and is skipped with a message; one that fails verification is skipped with the reason.
A task that fails on a checkpoint writes nothing, logs what went wrong, and the others still run.
With ``watch`` the runner keeps looking for new checkpoints until training is finished (the last
chunk's checkpoint is complete), ``eval.watch_idle_timeout_s`` passes without a new one, or Ctrl-C.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from llm360 import __version__
from llm360.config import EvalConfig
from llm360.errors import CheckpointError, Llm360Error
from llm360.eval.specs import TaskSpec, resolve_tasks
from llm360.rundir import layout
from llm360.rundir.atomic import atomic_write_text
from llm360.rundir.checkpoint import marker_sha256
from llm360.rundir.layout import MARKER, RunDir, ckpt_name, has_marker, parse_ckpt_name
from llm360.utils import read_json

logger = logging.getLogger(__name__)

RESULT_FORMAT = "llm360-eval-result"
SUMMARY_FORMAT = "llm360-eval-summary"
SUMMARY_JSON = "summary.json"
SUMMARY_CSV = "summary.csv"
_ROW_KEYS = ("checkpoint", "step", "tokens_seen")


@dataclass
class ItemError:
    """A (checkpoint, task) pair that could not be evaluated, and why."""

    checkpoint: str
    task: str
    message: str


@dataclass
class EvalTable:
    """What `evaluate` returns: the summary over all checkpoints and what this call did."""

    columns: list[str] = field(default_factory=list)
    """Metric columns, ``<task>/<metric>`` (e.g. ``perplexity/overall``, ``arc_challenge_25shot/acc_norm``)."""
    rows: list[dict[str, Any]] = field(default_factory=list)
    """One per checkpoint with any result: checkpoint, step, tokens_seen and the columns (None: not evaluated)."""
    computed: list[tuple[str, str]] = field(default_factory=list)
    """(checkpoint, task) pairs evaluated by this call."""
    failed: list[ItemError] = field(default_factory=list)
    """Pairs that failed in this call (nothing was written for them)."""
    unavailable: dict[str, str] = field(default_factory=dict)
    """Tasks that could not run at all in this call (missing data, unknown name, broken file): why."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Checkpoints skipped in this call (incomplete, failed verification): why."""
    interrupted: bool = False
    """True when Ctrl-C ended the call; every result written before it is kept."""
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per task key: kind, lm-eval task, shots, preset and primary metric (as in summary.json)."""

    def headline_columns(self) -> list[str]:
        """One column per task, its primary metric (plus the Open LLM average): what a console shows."""
        out = [f"{k}/{m['primary_metric']}" for k, m in self.tasks.items() if m.get("primary_metric")]
        out = [c for c in out if c in self.columns]
        return out + [c for c in self.columns if c == "openllm/average"]

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow([*_ROW_KEYS, *self.columns])
        for row in self.rows:
            writer.writerow(["" if row.get(k) is None else row[k] for k in (*_ROW_KEYS, *self.columns)])
        return buf.getvalue()


# ------------------------------------------------------------------------------ checkpoints


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The chunk checkpoint folders ``checkpoints/ckpt_NNN`` in chunk order (complete or not)."""
    return [p for _, p in layout.list_checkpoints(RunDir(run_dir).checkpoints)]


def list_models(run_dir: str | Path) -> list[Path]:
    """Every model to evaluate: the chunk checkpoints in order, then fine-tuned models (finetune/<name>)."""
    ft = RunDir(run_dir).root / "finetune"
    tuned = sorted(p for p in ft.iterdir() if p.is_dir() and not p.name.startswith(".")) if ft.is_dir() else []
    return list_checkpoints(run_dir) + tuned


def _verify(folder: Path) -> None:
    """Full check of a checkpoint: its marker and every listed file's size and sha256."""
    from llm360.rundir.checkpoint import verify_checkpoint

    verify_checkpoint(folder)


def _trainer_state(folder: Path) -> dict[str, Any]:
    try:
        state = read_json(folder / "trainer_state.json")
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def training_finished(run_dir: str | Path) -> bool:
    """Whether the trainer has written its last checkpoint (the last chunk, or train.max_chunks')."""
    rd = RunDir(run_dir)
    ckpts = [p for _, p in layout.list_checkpoints(rd.checkpoints, complete_only=True)]
    if ckpts:
        cursor = _trainer_state(ckpts[-1]).get("data_cursor") or {}
        if "chunk" in cursor and cursor["chunk"] is None:  # the cursor is past the last step
            return True
    try:
        chunks = int(read_json(rd.manifest)["num_chunks"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    max_chunks = None
    if rd.config.is_file():
        import yaml

        try:
            max_chunks = ((yaml.safe_load(rd.config.read_text(encoding="utf-8")) or {}).get("train") or {}).get(
                "max_chunks"
            )
        except (yaml.YAMLError, OSError, AttributeError):
            max_chunks = None
    last = (min(chunks, int(max_chunks)) if isinstance(max_chunks, int) and max_chunks > 0 else chunks) - 1
    return has_marker(rd.ckpt_dir(last))


def _selected(folders: list[Path], wanted: list[str] | None) -> list[Path]:
    if not wanted:
        return folders
    names = set()
    for w in wanted:
        w = w.strip()
        names.add(ckpt_name(int(w)) if w.isdigit() else w)
    chosen = [p for p in folders if p.name in names]
    missing = names - {p.name for p in folders}
    if missing:
        logger.warning("eval.checkpoints: %s not found (yet) in checkpoints/", ", ".join(sorted(missing)))
    return chosen


# ------------------------------------------------------------------------------ results


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_json_safe(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return _json_safe(obj.item())
    except ImportError:
        pass
    if isinstance(obj, torch.dtype | torch.device | Path):
        return str(obj)
    return str(obj)


def _dump(obj: Any) -> str:
    return json.dumps(_json_safe(obj), indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"


class _Results:
    """The eval/ folder of a run: result files, their validity, the summary."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, ckpt: str, key: str) -> Path:
        return self.root / ckpt / f"{key}.json"

    def read(self, ckpt: str, key: str) -> dict[str, Any] | None:
        p = self.path(ckpt, key)
        if not p.is_file():
            return None
        try:
            data = read_json(p)
        except (OSError, ValueError) as e:
            logger.warning("%s is unreadable (%s); it will be computed again", p, e)
            return None
        return data if isinstance(data, dict) and data.get("format") == RESULT_FORMAT else None

    def done(self, ckpt: str, spec: TaskSpec, marker_sha: str, signature: dict[str, Any]) -> bool:
        data = self.read(ckpt, spec.key)
        if data is None:
            return False
        if data.get("checkpoint_marker_sha256") != marker_sha:
            logger.info("%s/%s: the checkpoint changed since it was evaluated; evaluating again", ckpt, spec.key)
            return False
        if data.get("signature") != _json_safe(signature):
            logger.info("%s/%s: the task's settings changed (%s -> %s); evaluating again",
                        ckpt, spec.key, data.get("signature"), _json_safe(signature))
            return False
        return True

    def write(self, ckpt: str, key: str, payload: dict[str, Any]) -> Path:
        p = self.path(ckpt, key)
        atomic_write_text(p, _dump(payload))
        return p

    def write_samples(self, ckpt: str, key: str, samples: dict[str, list[dict]]) -> None:
        lines = []
        for task, rows in samples.items():
            for row in rows:
                lines.append(json.dumps(_json_safe({"task": task, **row}), sort_keys=True, ensure_ascii=False))
        atomic_write_text(self.root / ckpt / f"{key}.samples.jsonl", "".join(x + "\n" for x in lines))

    def summary(self, order: list[str], table: EvalTable) -> EvalTable:
        """Rebuild the table from every result file; write summary.json and summary.csv."""
        rows: dict[str, dict[str, Any]] = {}
        columns: dict[str, None] = {}
        keyed: dict[str, list[str]] = {}
        tasks_meta: dict[str, dict[str, Any]] = {}
        if self.root.is_dir():
            # chunk checkpoints in chunk order, then fine-tuned models by name
            ckpt_dirs = sorted(
                ((0, i, p.name) if (i := parse_ckpt_name(p.name)) is not None else (1, 0, p.name), p)
                for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
            )
            for _, d in ckpt_dirs:
                for f in sorted(d.glob("*.json")):
                    data = self.read(d.name, f.stem)
                    if data is None:
                        continue
                    key = str(data.get("task", f.stem))
                    row = rows.setdefault(d.name, {"checkpoint": d.name, "step": None, "tokens_seen": None})
                    row["step"] = row["step"] if row["step"] is not None else data.get("step")
                    row["tokens_seen"] = row["tokens_seen"] if row["tokens_seen"] is not None else data.get("tokens_seen")
                    metrics = dict(data.get("metrics") or {})
                    primary = data.get("primary_metric")
                    if primary in metrics:  # the headline number first (the file's keys are sorted)
                        metrics = {primary: metrics[primary], **metrics}
                    for metric, value in metrics.items():
                        col = f"{key}/{metric}"
                        keyed.setdefault(key, [])
                        if col not in keyed[key]:
                            keyed[key].append(col)
                        row[col] = value
                    tasks_meta.setdefault(key, {
                        "kind": data.get("kind"), "lm_eval_task": data.get("signature", {}).get("task"),
                        "num_fewshot": data.get("signature", {}).get("num_fewshot"),
                        "primary_metric": data.get("primary_metric"), "preset": data.get("preset"),
                    })  # fmt: skip
        for key in [k for k in order if k in keyed] + sorted(k for k in keyed if k not in order):
            for col in keyed[key]:
                columns[col] = None
        _add_openllm_average(rows, columns)
        table.columns = list(columns)
        table.tasks = {k: tasks_meta[k] for k in [k for k in order if k in keyed] + sorted(set(keyed) - set(order))}
        table.rows = [{k: row.get(k) for k in (*_ROW_KEYS, *table.columns)} for row in rows.values()]
        summary = {
            "format": SUMMARY_FORMAT,
            "version": 1,
            "columns": table.columns,
            "rows": table.rows,
            "tasks": tasks_meta,
        }
        atomic_write_text(self.root / SUMMARY_JSON, _dump(summary))
        atomic_write_text(self.root / SUMMARY_CSV, table.to_csv())
        return table


_OPENLLM_COLUMNS = (
    "arc_challenge_25shot/acc_norm", "hellaswag_10shot/acc_norm", "mmlu_5shot/acc", "truthfulqa_mc2_0shot/acc",
)  # fmt: skip


def _add_openllm_average(rows: dict[str, dict[str, Any]], columns: dict[str, None]) -> None:
    """The Open LLM Leaderboard average, where a checkpoint has all four of its numbers."""
    if not all(c in columns for c in _OPENLLM_COLUMNS):
        return
    columns["openllm/average"] = None
    for row in rows.values():
        values = [row.get(c) for c in _OPENLLM_COLUMNS]
        row["openllm/average"] = sum(values) / 4 if all(isinstance(v, (int, float)) for v in values) else None


# ------------------------------------------------------------------------------ the runner


class _Evaluator:
    def __init__(self, run_dir: Path, specs: list[TaskSpec], cfg: EvalConfig) -> None:
        from llm360.eval.harness import TaskRunner

        self.rd = RunDir(run_dir)
        self.specs = specs
        self.cfg = cfg
        self.results = _Results(self.rd.root / "eval")
        self.table = EvalTable()
        self.tasks = TaskRunner(cfg) if any(s.kind == "lm-eval" for s in specs) else None
        self.store: Any = None
        self.sources: list[str] = []
        self._announced: set[str] = set()
        self._unverified: dict[str, str] = {}
        """Checkpoints that failed verification -> their marker's sha256 (watch mode does not re-hash them)."""
        self._failed: set[tuple[str, str, str]] = set()
        """(checkpoint, task, marker sha256) that failed in this call: not retried until the next call."""
        self.runnable: list[TaskSpec] = []
        self._marker_sha = ""

    def signature(self, spec: TaskSpec) -> dict[str, Any]:
        if spec.kind == "perplexity":
            return {"task": "perplexity", "max_rows": self.cfg.perplexity_max_rows}
        return {**spec.signature(), "limit": self.cfg.limit, "fewshot_seed": self.cfg.fewshot_seed}

    def check_tasks(self) -> None:
        """Find out up front which tasks can run at all; say clearly why the others cannot."""
        from llm360.eval.perplexity import validation_sources

        problems: dict[str, str] = {}
        if any(s.kind == "perplexity" for s in self.specs):
            self.store, self.sources, why = validation_sources(self.rd.data)
            if why:
                problems["perplexity"] = why
        if self.tasks is not None:
            problems.update(self.tasks.check([s for s in self.specs if s.kind == "lm-eval"]))
        for spec in self.specs:
            if spec.key in problems:
                origin = f" (preset {spec.preset})" if spec.preset else ""
                logger.warning("task %s%s cannot run: %s", spec.key, origin, problems[spec.key])
        by_preset: dict[str, list[str]] = {}
        for spec in self.specs:
            if spec.key in problems and spec.preset:
                by_preset.setdefault(spec.preset, []).append(spec.name)
        for preset, names in by_preset.items():
            total = sum(1 for s in self.specs if s.preset == preset)
            logger.warning("preset %s: %d of %d tasks cannot run here: %s", preset, len(names), total, ", ".join(names))
        self.table.unavailable = problems
        self.runnable = [s for s in self.specs if s.key not in problems]

    def _announce(self, name: str, reason: str, level: int = logging.INFO) -> None:
        self.table.skipped[name] = reason
        if name not in self._announced:
            self._announced.add(name)
            logger.log(level, "skipping %s: %s", name, reason)

    def one_pass(self) -> set[str]:
        """Evaluate what is pending on every complete checkpoint; returns the complete checkpoints seen."""
        complete: set[str] = set()
        for folder in _selected(list_models(self.rd.root), self.cfg.checkpoints):
            name = folder.name
            if not has_marker(folder):
                self._announce(name, f"still being written (no {MARKER} yet); it is evaluated once complete")
                continue
            complete.add(name)
            marker_sha = marker_sha256(folder)
            pending = [
                s for s in self.runnable
                if (name, s.key, marker_sha) not in self._failed
                and not self.results.done(name, s, marker_sha, self.signature(s))
            ]  # fmt: skip
            if not pending or self._unverified.get(name) == marker_sha:
                continue
            try:
                _verify(folder)
            except CheckpointError as e:
                self._unverified[name] = marker_sha  # not hashed again until its marker changes
                self._announce(name, f"it does not verify: {e}", logging.WARNING)
                continue
            self.table.skipped.pop(name, None)
            self._evaluate_checkpoint(folder, marker_sha, pending)
        return complete

    def _evaluate_checkpoint(self, folder: Path, marker_sha: str, pending: list[TaskSpec]) -> None:
        from llm360.model.load import load_model, resolve_device

        name = folder.name
        self._marker_sha = marker_sha
        device = resolve_device(self.cfg.device, where="eval.device")
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float32
        logger.info("evaluating %s on %s: %s", name, device, ", ".join(s.key for s in pending))
        try:
            model = load_model(folder, dtype, device)
        except Exception as e:
            for spec in pending:
                self._fail(name, spec, f"cannot load the checkpoint: {_message(e)}")
            return
        state = _trainer_state(folder)
        lm = None
        for spec in pending:
            t0 = time.perf_counter()
            try:
                if spec.kind == "perplexity":
                    payload = self._perplexity(model)
                else:
                    if lm is None:
                        lm = self._lm(folder, model, device, dtype)
                    payload = self._lm_eval(lm, spec, name)
            except torch.OutOfMemoryError:
                self._fail(name, spec, f"out of memory on {device}; lower eval.batch_size (now {self.cfg.batch_size})")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            except Exception as e:
                logger.debug("%s/%s failed", name, spec.key, exc_info=True)
                self._fail(name, spec, _message(e))
                continue
            seconds = time.perf_counter() - t0
            payload.update({
                "format": RESULT_FORMAT, "version": 1, "checkpoint": name, "task": spec.key,
                "kind": spec.kind, "preset": spec.preset, "signature": self.signature(spec),
                "checkpoint_marker_sha256": marker_sha, "step": state.get("step"),
                "tokens_seen": state.get("tokens_seen"), "chunk": state.get("checkpoint_chunk"),
                "seconds": round(seconds, 3), "device": str(device), "precision": self.cfg.precision,
                "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "llm360_version": __version__,
            })  # fmt: skip
            path = self.results.write(name, spec.key, payload)
            self.table.computed.append((name, spec.key))
            primary = payload.get("primary_metric")
            value = (payload.get("metrics") or {}).get(primary)
            shown = f"{primary} = {value:.4g}" if isinstance(value, (int, float)) else "done"
            logger.info("%s / %s: %s (%.1fs) -> %s", name, spec.key, shown, seconds, path.relative_to(self.rd.root))
        del model, lm
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def _fail(self, ckpt: str, spec: TaskSpec, message: str) -> None:
        self._failed.add((ckpt, spec.key, self._marker_sha))
        self.table.failed.append(ItemError(ckpt, spec.key, message))
        logger.error("%s / %s failed, nothing written for it: %s", ckpt, spec.key, message)

    def _lm(self, folder: Path, model: Any, device: torch.device, dtype: torch.dtype) -> Any:
        from llm360.eval.adapter import LLM360LM

        tok_dir = folder
        if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            tok_dir = self.rd.tokenizer  # a folder without tokenizer files: the run's own tokenizer
        lm = LLM360LM(model=model, tokenizer=tok_dir, batch_size=self.cfg.batch_size, device=str(device), dtype=dtype)
        lm.pretrained = str(folder)
        return lm

    def _perplexity(self, model: Any) -> dict[str, Any]:
        from llm360.eval.perplexity import heldout_perplexity

        stats = heldout_perplexity(model, self.store, self.sources, max_rows=self.cfg.perplexity_max_rows,
                                   batch_size=self.cfg.batch_size)  # fmt: skip
        metrics = {"overall": stats["overall"]["perplexity"]}
        metrics.update({src: s["perplexity"] for src, s in stats["sources"].items()})
        return {"metrics": metrics, "primary_metric": "overall", "details": stats}

    def _lm_eval(self, lm: Any, spec: TaskSpec, ckpt: str) -> dict[str, Any]:
        from llm360.eval.harness import details_of, extract_metrics, lm_eval_version

        assert self.tasks is not None
        results = self.tasks.run(lm, spec)
        metrics, stderr = extract_metrics(results, spec)
        if not metrics:
            raise RuntimeError(f"lm-eval returned no metrics for {spec.name!r}")
        if self.cfg.log_samples and results.get("samples"):
            self.results.write_samples(ckpt, spec.key, results["samples"])
        primary = spec.primary_metric if spec.primary_metric in metrics else next(iter(metrics))
        return {
            "metrics": metrics, "stderr": stderr, "primary_metric": primary,
            "details": details_of(results), "lm_eval_version": lm_eval_version(),
        }  # fmt: skip

    def write_summary(self) -> None:
        self.results.summary([s.key for s in self.specs], self.table)


def _message(e: BaseException) -> str:
    if isinstance(e, Llm360Error):
        return str(e)
    from llm360.eval.harness import describe_error

    return describe_error(e)


def evaluate(
    run_dir: str | Path,
    tasks: list[str] | None = None,
    cfg: EvalConfig | None = None,
    watch: bool = False,
) -> EvalTable:
    """Evaluate every complete checkpoint of run_dir on every task that has no result yet.

    ``tasks`` overrides ``cfg.tasks`` (names as in :mod:`llm360.eval.specs`). Results go to
    ``run_dir/eval/<checkpoint>/<task>.json``; the summary to ``eval/summary.json`` and ``.csv``.
    With ``watch``, keeps evaluating new checkpoints as training writes them, until training is
    finished, ``cfg.watch_idle_timeout_s`` passes without a new checkpoint, or Ctrl-C. Returns the
    summary table and what this call computed, skipped or failed. Raises ConfigError for task names
    that are malformed; tasks that cannot run (missing data, unknown name) are reported in the table.
    """
    from llm360.eval.harness import hub_access

    cfg = cfg or EvalConfig()
    specs = resolve_tasks(list(tasks) if tasks else cfg.tasks)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise Llm360Error(f"run directory {run_dir} does not exist")
    from llm360.model.load import resolve_device

    resolve_device(cfg.device, where="eval.device")  # a device that cannot work fails before any task runs
    ev = _Evaluator(run_dir, specs, cfg)
    with hub_access(cfg.allow_downloads):
        try:
            ev.check_tasks()
            if not ev.runnable:
                logger.warning("none of the tasks can run here; nothing to evaluate")
            if not list_checkpoints(run_dir) and not watch:
                logger.warning("no checkpoints in %s yet; train first (or use --watch)", RunDir(run_dir).checkpoints)
            seen: set[str] = set()
            last_new = time.monotonic()
            while True:
                finished_before = watch and training_finished(run_dir)
                complete = ev.one_pass() if ev.runnable else set()
                ev.write_summary()
                if not watch:
                    break
                if complete - seen:
                    seen |= complete
                    last_new = time.monotonic()
                if finished_before:
                    logger.info("training is finished and every checkpoint is evaluated")
                    break
                idle = cfg.watch_idle_timeout_s
                if idle is not None and time.monotonic() - last_new >= idle:
                    logger.info("no new checkpoint for %.0fs (eval.watch_idle_timeout_s); stopping", idle)
                    break
                logger.debug("waiting %.0fs for new checkpoints", cfg.watch_interval_s)
                time.sleep(cfg.watch_interval_s)
        except KeyboardInterrupt:
            ev.table.interrupted = True
            logger.warning("interrupted: every result written so far is kept in %s", ev.results.root)
            ev.write_summary()
    n = len(ev.table.computed)
    logger.info("evaluated %d (checkpoint, task) pair%s; summary in %s", n, "" if n == 1 else "s",
                ev.results.root / SUMMARY_JSON)  # fmt: skip
    return ev.table
