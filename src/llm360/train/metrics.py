"""Where training numbers go: metrics/train.jsonl, metrics/events.jsonl, and optional sinks.

Rank 0 writes; every number it writes was reduced over all ranks first (the step time and memory
of the slowest, fastest and largest rank: :func:`rank_extremes`). TensorBoard and W&B are
optional extras: asking for them without the package installed is a clear error, not a crash
half-way through a run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from llm360.config import TrainConfig
from llm360.errors import ConfigError
from llm360.rundir.atomic import atomic_write_text
from llm360.rundir.layout import EVENTS, TRAIN_METRICS
from llm360.train.parallel import DistInfo

logger = logging.getLogger(__name__)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return str(v)  # JSON has no NaN/inf; keep them visible as strings
    return v


class JsonlWriter:
    """Append-only JSON lines, flushed (and fsynced) per line so a kill loses at most the current one."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, rec: dict) -> None:
        self._f.write(json.dumps({k: _jsonable(v) for k, v in rec.items()}, sort_keys=True) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def truncate_jsonl_from_step(path: Path, step: int) -> int:
    """Drop lines with "step" >= step (they will be trained again after a resume); returns dropped count.

    Lines a kill cut short are dropped too. The file is rewritten atomically, and only when
    something was dropped.
    """
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1  # a line cut by a kill
                continue
            if isinstance(rec.get("step"), int) and rec["step"] >= step:
                dropped += 1
                continue
            keep.append(line if line.endswith("\n") else line + "\n")
    if not dropped:
        return 0  # nothing to drop: leave the file untouched
    atomic_write_text(path, "".join(keep))  # a kill leaves the old file or the new one, never half
    return dropped


def rank_extremes(step_time_s: float, memory_mb: float, info: DistInfo) -> dict[str, float]:
    """The slowest and the fastest rank's step time (s) and the largest rank's peak memory (MB).

    One all-reduce (MAX) over the ranks -- a collective: every rank calls it at the same step. The
    memory is what the caller measures (CUDA's max allocated, else the process's peak RSS).
    """
    if not info.enabled:
        return {"step_time_max_s": step_time_s, "step_time_min_s": step_time_s, "memory_max_mb": memory_mb}
    import torch
    import torch.distributed as dist

    x = torch.tensor([step_time_s, -step_time_s, memory_mb], dtype=torch.float64, device=info.device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    slowest, fastest, memory = x.tolist()
    return {"step_time_max_s": slowest, "step_time_min_s": -fastest, "memory_max_mb": memory}


_ROUTINE_EVENTS = {"resume", "init_from", "rows_unused"}
"""Events that are part of normal operation (logged at INFO); every other kind is a warning."""


class MetricsLogger:
    """train.jsonl + events.jsonl (+ TensorBoard, W&B) for the main rank; a no-op elsewhere."""

    def __init__(self, metrics_dir: Path, cfg: TrainConfig, *, enabled: bool, run_name: str, config: dict) -> None:
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        self.train = JsonlWriter(metrics_dir / TRAIN_METRICS)
        self.events = JsonlWriter(metrics_dir / EVENTS)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "train.tensorboard is on but the tensorboard package is not installed: "
                    "pip install tensorboard (or set train.tensorboard=false)"
                ) from None
            self.tb = SummaryWriter(str(metrics_dir / "tensorboard"))
        if cfg.wandb != "off":
            try:
                import wandb
            except ImportError:
                raise ConfigError(
                    f"train.wandb = {cfg.wandb} but the wandb package is not installed: pip install wandb"
                ) from None
            self.wandb = wandb.init(project=cfg.wandb_project, name=run_name, mode=cfg.wandb,
                                    dir=str(metrics_dir), config=config, resume="allow")

    def log_step(self, rec: dict) -> None:
        if not self.enabled:
            return
        self.train.write(rec)
        step = int(rec["step"])
        scalars = {k: v for k, v in rec.items() if isinstance(v, int | float) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=step)

    def event(self, kind: str, **fields: Any) -> None:
        if not self.enabled:
            return
        rec = {"event": kind, "time": time.time(), **fields}
        self.events.write(rec)
        level = logging.INFO if kind in _ROUTINE_EVENTS else logging.WARNING
        logger.log(level, "event %s: %s", kind, {k: v for k, v in fields.items()})
        if self.wandb is not None:
            self.wandb.log({"events/" + kind: 1}, step=int(fields.get("step", 0)))

    def close(self) -> None:
        if not self.enabled:
            return
        self.train.close()
        self.events.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
