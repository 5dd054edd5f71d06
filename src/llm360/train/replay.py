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
from llm360.errors import CheckpointError, ConfigError
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

    Under torchrun every rank calls it: the chunk is re-trained with the run's layout (DDP, FSDP,
    HSDP) on the ranks torchrun started, so a run trained on N ranks replays bit for bit on N ranks
    (CPU, deterministic). Rank 0 stages the work folder (on several nodes ``work_dir`` must be on a
    file system every node sees) and alone returns the tensors; the other ranks' results hold none.
    """
    from llm360.train.parallel import destroy_distributed, gather_to_owners, init_distributed, launched_rank

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
    rank, world = launched_rank()
    if world > 1 and not keep and int(os.environ.get("LOCAL_WORLD_SIZE", world)) < world:
        raise ConfigError(f"a replay on {world} ranks over several nodes needs a work folder every node sees "
                          "(verify --replay-dir DIR on a shared file system); a temporary folder is one node's")
    import torch.distributed as dist

    owned = world > 1 and not dist.is_initialized()
    if world > 1:  # under torchrun: the replay trains with the run's layout; rank 0 stages the work folder
        init_distributed(device)
    work: Path | None = None
    failed: str | None = None
    if rank == 0:
        try:
            work = Path(work_dir) if keep else Path(tempfile.mkdtemp(prefix=f"llm360-replay-{index_name(chunk)}-"))
            RunDir(work).checkpoints.mkdir(parents=True)
            os.symlink(rd.data.resolve(), work / "data")
            if prev is not None:
                shutil.copytree(prev, RunDir(work).checkpoints / prev.name)
        except OSError as e:
            failed = f"replay of chunk {index_name(chunk)}: cannot stage its work folder {work}: {e}"
    if world > 1:  # every rank learns the folder, or that rank 0 could not make it
        box = [failed or str(work)]
        dist.broadcast_object_list(box, src=0)
        failed = box[0] if str(box[0]).startswith("replay of chunk") else None
        work = Path(str(box[0]))
    if failed:
        if owned:
            destroy_distributed()
        raise CheckpointError(failed)
    assert work is not None
    done = False
    try:
        init_state = None
        with Trainer(cfg, work, device=device, recorded=record) as trainer:
            trainer.setup()
            if chunk == 0:  # to rank 0, which compares (sharded: every rank takes part in the gathers)
                sd = trainer.model.state_dict()
                seed = gather_to_owners(sd, dict.fromkeys(sd, 0), trainer.info)
                init_state = {k: v.to("cpu", copy=True) for k, v in seed.items()} if rank == 0 else None
            if chunk in record.skipped_chunks:
                # skipped by a guard: the chunk's checkpoint holds the previous state
                trainer.save(ckpt_name(chunk), chunk=chunk)
                skipped: frozenset[int] = frozenset()
            else:
                skipped = trainer.guard.recorded_skips
                trainer.fit()
            on = trainer.info.device
        replayed = RunDir(work).checkpoints / target.name
        done = True
        logger.info("replayed chunk %s on %s", index_name(chunk), on)
        bitwise = cfg.train.deterministic_on(on.type) and on.type == "cpu"
        if rank != 0:  # rank 0 reads the re-trained checkpoint and compares
            return ReplayResult(chunk=chunk, model_state={}, optimizer_state={}, init_state=None, bitwise=bitwise,
                                device=str(on), record=record, skipped_steps=tuple(sorted(skipped)),
                                reseeds=record.reseeds(chunk), checkpoint=None)
        return ReplayResult(
            chunk=chunk,
            model_state=read_tensors(replayed),
            optimizer_state=read_tensors(replayed, "optimizer"),
            init_state=init_state,
            bitwise=bitwise,
            device=str(on),
            record=record,
            skipped_steps=tuple(sorted(skipped)),
            reseeds=record.reseeds(chunk),
            checkpoint=replayed if keep else None,
        )
    finally:
        if owned:  # the group this call joined goes before the interpreter exits (gloo aborts otherwise)
            if done:
                dist.barrier()
            destroy_distributed()
        if not keep and rank == 0:
            shutil.rmtree(work, ignore_errors=True)
