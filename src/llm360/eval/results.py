"""The results of `llm360 eval` on disk: one JSON file per (checkpoint, task) pair, and the summary.

::

    <run>/eval/
      ckpt_000/perplexity.json              one file per (checkpoint, task), written atomically
      ckpt_000/arc_challenge_25shot.json
      ckpt_000/<task>.samples.jsonl         per-example outputs (eval.log_samples)
      summary.json  summary.csv             one table over every checkpoint, rebuilt from the files

The summary is rebuilt from whatever result files are there, by any call: shards of one
evaluation (``--shard I/N``) and retries merge without talking to each other.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llm360.eval.specs import TaskSpec
from llm360.rundir.atomic import atomic_write_text
from llm360.rundir.layout import RunDir, parse_ckpt_name
from llm360.utils import read_json

logger = logging.getLogger(__name__)

RESULT_FORMAT = "llm360-eval-result"
SUMMARY_FORMAT = "llm360-eval-summary"
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


def json_safe(obj: Any) -> Any:
    """obj with non-finite floats as None, and numpy scalars, dtypes, devices and paths as JSON values."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [json_safe(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return json_safe(obj.item())
    except ImportError:
        pass
    if isinstance(obj, torch.dtype | torch.device | Path):
        return str(obj)
    return str(obj)


def _dump(obj: Any) -> str:
    return json.dumps(json_safe(obj), indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"


class ResultFiles:
    """The eval/ folder of a run: result files, their validity, the summary."""

    def __init__(self, rd: RunDir) -> None:
        self.rd = rd
        self.root = rd.eval_dir

    def path(self, ckpt: str, key: str) -> Path:
        return self.rd.eval_result(ckpt, key)

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

    def done(self, ckpt: str, spec: TaskSpec, marker_sha: str, signature: dict[str, Any], *, quiet: bool = False) -> bool:
        """Whether the pair's result is there for this checkpoint content (marker) and these settings."""
        data = self.read(ckpt, spec.key)
        if data is None:
            return False
        if quiet:
            return data.get("checkpoint_marker_sha256") == marker_sha and data.get("signature") == json_safe(signature)
        if data.get("checkpoint_marker_sha256") != marker_sha:
            logger.info("%s/%s: the checkpoint changed since it was evaluated; evaluating again", ckpt, spec.key)
            return False
        if data.get("signature") != json_safe(signature):
            logger.info("%s/%s: the task's settings changed (%s -> %s); evaluating again",
                        ckpt, spec.key, data.get("signature"), json_safe(signature))
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
                lines.append(json.dumps(json_safe({"task": task, **row}), sort_keys=True, ensure_ascii=False))
        atomic_write_text(self.rd.eval_samples(ckpt, key), "".join(x + "\n" for x in lines))

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
        atomic_write_text(self.rd.eval_summary, _dump(summary))
        atomic_write_text(self.rd.eval_summary_csv, table.to_csv())
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
