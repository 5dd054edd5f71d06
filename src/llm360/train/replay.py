"""Re-train one chunk of a run or a release from its previous checkpoint (DESIGN.md promise 5).

:func:`replay_chunk` copies ``ckpt_{i-1}`` into a fresh run directory beside the original data,
trains chunk ``i`` with the original config and the original run's guard decisions (as
``ckpt_i``'s ``trainer_state.json`` recorded them: the reseeded order of the chunk, its skipped
steps, or the whole chunk skipped), and returns the re-trained checkpoint's tensors, for a caller
(``llm360 verify --replay``) to compare with ``ckpt_i``'s. In deterministic mode on CPU the two
must be bitwise equal.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from llm360.config import load_config
from llm360.errors import CheckpointError
from llm360.rundir.checkpoint import read_tensors, read_trainer_state
from llm360.rundir.data import TrainingRecord
from llm360.rundir.layout import RunDir, ckpt_name, index_name
from llm360.train.loop import Trainer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplayResult:
    """What re-training a chunk produced, and which recorded decisions it followed."""

    chunk: int
    model_state: dict[str, torch.Tensor]
    """The re-trained checkpoint's weights (every model file), on CPU."""
    optimizer_state: dict[str, torch.Tensor]
    """Its optimizer state (``<state>/<parameter name>``, every optimizer file), on CPU."""
    init_state: dict[str, torch.Tensor] | None
    """Chunk 0 only: the weights the seed gave before any step, to compare with the run's ``init``."""
    bitwise: bool
    """Whether the replay ran where it must match bit for bit (deterministic mode on CPU)."""
    device: str
    record: TrainingRecord
    """The original run's decisions, read from the target checkpoint's trainer_state.json."""
    skipped_steps: tuple[int, ...]
    """Steps of the chunk skipped again because the original run skipped them."""
    reseeds: int
    """How many times the original run reseeded the chunk (its rows were replayed in that order)."""
    checkpoint: Path | None = None
    """The re-trained checkpoint folder, when ``work_dir`` was given (else it was deleted)."""

    @property
    def skipped_chunk(self) -> bool:
        """Whether the original run skipped the whole chunk (its checkpoint holds the previous state)."""
        return self.chunk in self.record.skipped_chunks


def replay_chunk(
    run_dir: str | Path, chunk: int, *, work_dir: str | Path | None = None, device: str | None = None
) -> ReplayResult:
    """Re-train chunk ``chunk`` of a run directory or release from its previous checkpoint.

    Uses the run's ``config.yaml`` (step checkpoints, TensorBoard and W&B off), its ``data/`` and
    ``checkpoints/ckpt_{chunk-1}`` (none for chunk 0: the seed's weights). The re-trained run is
    built in ``work_dir`` (an empty or missing folder, kept) or in a temporary folder (deleted
    before returning). ``device``: None runs on CPU when ``train.deterministic`` is true, else
    where training would (with ``auto``, deterministic there only on CPU). Raises CheckpointError
    when ``ckpt_{chunk}`` or ``ckpt_{chunk-1}`` is missing, and the trainer's errors (ConfigError,
    CheckpointError, DataError) when re-training fails.
    """
    rd = RunDir(run_dir)
    target = rd.ckpt_dir(chunk)
    prev = rd.ckpt_dir(chunk - 1) if chunk > 0 else None
    for need in (target, prev):
        if need is not None and not need.is_dir():
            raise CheckpointError(f"replay of chunk {index_name(chunk)}: {need.name} is not in {rd.root}")
    cfg = load_config(rd.config)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={
        "max_chunks": chunk + 1, "checkpoint_every_steps": None, "tensorboard": False, "wandb": "off"})})
    record = TrainingRecord.from_trainer_state(read_trainer_state(target), checkpoint=target)
    if device is None:
        device = "cpu" if cfg.train.deterministic is True else None  # auto: where training would run
    keep = work_dir is not None
    work = Path(work_dir) if keep else Path(tempfile.mkdtemp(prefix=f"llm360-replay-{index_name(chunk)}-"))
    try:
        RunDir(work).checkpoints.mkdir(parents=True)
        os.symlink(rd.data.resolve(), work / "data")
        if prev is not None:
            shutil.copytree(prev, RunDir(work).checkpoints / prev.name)
        init_state = None
        with Trainer(cfg, work, device=device, recorded=record) as trainer:
            trainer.setup()
            if chunk == 0:
                init_state = {k: v.detach().to("cpu", copy=True) for k, v in trainer.model.state_dict().items()}
            if chunk in record.skipped_chunks:
                # skipped by a guard: the chunk's checkpoint holds the previous state
                trainer.save(ckpt_name(chunk), chunk=chunk)
                skipped: frozenset[int] = frozenset()
            else:
                skipped = trainer.guard.recorded_skips
                trainer.fit()
            on = trainer.info.device
        replayed = RunDir(work).checkpoints / target.name
        logger.info("replayed chunk %s on %s", index_name(chunk), on)
        return ReplayResult(
            chunk=chunk,
            model_state=read_tensors(replayed),
            optimizer_state=read_tensors(replayed, "optimizer"),
            init_state=init_state,
            bitwise=cfg.train.deterministic_on(on.type) and on.type == "cpu",
            device=str(on),
            record=record,
            skipped_steps=tuple(sorted(skipped)),
            reseeds=record.reseeds(chunk),
            checkpoint=replayed if keep else None,
        )
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
