"""How a training run's live state reaches a checkpoint and comes back, on any parallel layout.

The loop decides *when* to checkpoint and builds the trainer state; the folder format is
:mod:`llm360.rundir.checkpoint`'s; gathering and scattering shards is :mod:`llm360.train.parallel`'s.
Here they meet: a save gathers an FSDP model to full tensors, rank 0 writes the consolidated
checkpoint, and every rank adds its shards to the sharded copy ``checkpoints/dcp/<name>``; a restore
(a rollback) reads the sharded copy when it holds the checkpoint's step, else the consolidated files.
"""

from __future__ import annotations

import logging
import time
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llm360.config import ModelConfig, RunConfig, to_yaml
from llm360.model.hf import hf_metadata_files
from llm360.model.llama import Llama
from llm360.rundir import checkpoint as ckpt
from llm360.rundir.checkpoint import read_trainer_state
from llm360.rundir.data import DataStore
from llm360.rundir.layout import CONFIG, TOKENIZER_DIR, RunDir
from llm360.train.optim import build_optimizer
from llm360.train.parallel import (
    DistInfo,
    broadcast_object,
    gather_full_state,
    is_sharded,
    load_full_state,
    load_sharded,
    named_optimizer_state,
    save_sharded,
    sharded_copy_step,
    together,
)

logger = logging.getLogger(__name__)


class Checkpointer:
    """Saves and restores one run's model and optimizer; every rank makes the same calls (they hold collectives).

    ``mcfg`` is the resolved model config (vocabulary and sequence length filled in), ``store`` the
    data trained on (its tokenizer goes into every checkpoint).
    """

    def __init__(self, rd: RunDir, info: DistInfo, cfg: RunConfig, mcfg: ModelConfig, store: DataStore) -> None:
        self.rd = rd
        self.info = info
        self.cfg = cfg
        self.mcfg = mcfg
        self.store = store

    @cached_property
    def extra_files(self) -> dict[str, bytes]:
        """Files every checkpoint of this run carries besides the state (constant for the run)."""
        eos = self.store.manifest.get("eos_id")
        # config.json for transformers, llm360_model.json for what it cannot hold (muP, unfolded here)
        files = {**hf_metadata_files(self.mcfg, eos_token_id=eos), CONFIG: to_yaml(self.cfg).encode()}
        tok_dir = self.store.dir / TOKENIZER_DIR
        if tok_dir.is_dir():
            for f in sorted(tok_dir.iterdir()):
                if f.is_file():
                    files[f.name] = f.read_bytes()
        return files

    def dcp_dir(self, name: str) -> Path:
        """checkpoints/dcp/<name>: the sharded copy of checkpoint <name> (FSDP runs)."""
        return self.rd.sharded_copies / name

    def has_sharded_copy(self, name: str, step: int) -> bool:
        """Whether a complete sharded copy of checkpoint <name>, taken at ``step``, exists."""
        return sharded_copy_step(self.dcp_dir(name)) == step

    def save(
        self, target: Path, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any]
    ) -> None:
        """Write checkpoint folder ``target`` (rank 0 writes; every rank waits for it), then its sharded copy.

        A failed write raises on every rank (a CheckpointError names the file).
        """
        if is_sharded(model):
            model_state, full_opt, names = gather_full_state(model, optimizer)
        else:
            model_state, full_opt, names = model.state_dict(), optimizer, model
        with together(self.info):  # every rank waits for it; a failed write stops every rank
            if self.info.is_main:
                t0 = time.perf_counter()
                ckpt.save_checkpoint(
                    target,
                    model_state=model_state,
                    optimizer=full_opt,
                    param_names=names,
                    trainer_state=trainer_state,
                    rng_state=ckpt.capture_rng(),
                    extra_files=self.extra_files,
                )
                logger.info("saved %s (%.1fs)", target.relative_to(self.rd.root), time.perf_counter() - t0)
        if is_sharded(model) and optimizer.state:
            save_sharded(model, optimizer, self.dcp_dir(target.name), int(trainer_state["step"]), self.info)

    def restore(self, target: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, bool]:
        """Load checkpoint `target`'s weights and optimizer state into the live model and optimizer.

        Unsharded, the checkpoint loads straight into them. Under FSDP every rank restores its own
        shards in place: from the sharded copy checkpoints/dcp/<name> when one holds the target's
        step (after verifying the consolidated checkpoint, which holds the trainer and RNG state),
        otherwise from the consolidated files, read into a full-size CPU copy of the model and its
        optimizer state and scattered. The consolidated checkpoint is verified (every file hashed)
        either way, before the live state is touched. Returns :func:`~llm360.rundir.checkpoint.load_checkpoint`'s
        dict (trainer and RNG state) and whether the state came from the sharded copy.
        """
        if not is_sharded(model):
            with together(self.info):
                res = ckpt.load_checkpoint(target, model, optimizer)
            return res, False
        # every rank must take the same path (rank 0's): the loads below are collectives
        with together(self.info):
            has_copy = self.has_sharded_copy(target.name, int(read_trainer_state(target).get("step", -1)))
        from_copy = broadcast_object(has_copy, self.info)
        if from_copy:  # verified, then each rank reads its own shards: no full-size copy anywhere
            with together(self.info):
                res = ckpt.load_training_state(target)
            load_sharded(model, optimizer, self.dcp_dir(target.name))
        else:
            with torch.device("meta"):  # no initialisation: every value is overwritten by the load
                full = Llama(self.mcfg)
            full.to_empty(device="cpu")
            full_opt = build_optimizer(full, self.cfg.train)
            with together(self.info):
                res = ckpt.load_checkpoint(target, full, full_opt)
            load_full_state(model, optimizer, full.state_dict(), named_optimizer_state(full, full_opt))
        logger.info("restored %s in place on every rank (%s)", target.relative_to(self.rd.root),
                    "sharded copy" if from_copy else "consolidated files")
        return res, from_copy
