"""How a training run's live state reaches a checkpoint and comes back, on any parallel layout.

The loop decides *when* to checkpoint and builds the trainer state; the folder format, and how its
tensors split into files, are :mod:`llm360.rundir.checkpoint`'s and :mod:`llm360.rundir.shards`'s;
gathering shards is :mod:`llm360.train.parallel`'s. Here they meet:

- a save: every rank computes the same content and file layout; each gathers the full tensors of
  the files dealt to it (for a sharded model, one gather per tensor, to its owner only) and writes and hashes them
  at once with the others, into the folder rank 0 staged; rank 0 adds the small files, then the
  marker over every rank's records, last, and renames the folder in. The bytes are those a
  single process writes (:func:`~llm360.rundir.checkpoint.save_checkpoint`).
- a restore: for a sharded model every rank hashes its share of the files
  (:func:`~llm360.rundir.checkpoint.verify_share`) and reads, of each tensor, only the block it
  holds, whatever the world size that wrote it; an unsharded model loads the whole checkpoint.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llm360.config import ModelConfig, RunConfig, to_yaml
from llm360.errors import CheckpointError
from llm360.model.hf import hf_metadata_files
from llm360.rundir import atomic
from llm360.rundir import checkpoint as ckpt
from llm360.rundir.data import DataStore
from llm360.rundir.layout import CONFIG, TOKENIZER_DIR, RunDir
from llm360.rundir.optimizer_state import names_by_id, optimizer_state_dict
from llm360.rundir.shards import MB, SliceReader
from llm360.train.parallel import (
    DistInfo,
    broadcast_object,
    gather_objects,
    gather_to_owners,
    is_sharded,
    local_block,
    together,
    unwrap,
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

    @property
    def shard_bytes(self) -> int:
        return int(self.cfg.train.checkpoint_shard_mb * MB)

    def save(
        self, target: Path, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any]
    ) -> None:
        """Write checkpoint folder ``target`` (:func:`save_together`); every rank calls it."""
        t0 = time.perf_counter()
        written = save_together(target, model, optimizer, trainer_state, self.info, extra_files=self.extra_files,
                                shard_bytes=self.shard_bytes)
        if self.info.is_main:
            logger.info("saved %s (%.1fs; %d tensor files, rank 0 wrote %.2f GB)", target.relative_to(self.rd.root),
                        time.perf_counter() - t0, len(written), sum(written.values()) / 1e9)

    def restore(
        self, target: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, *, strict: bool = True
    ) -> dict[str, Any]:
        """Load checkpoint ``target`` into the live model and optimizer (:func:`restore_together`)."""
        res = restore_together(target, model, optimizer, self.info, strict=strict)
        logger.info("restored %s%s", target.relative_to(self.rd.root),
                    " on every rank, each reading its own blocks" if is_sharded(unwrap(model)) else "")
        return res


def save_together(
    target: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    trainer_state: dict[str, Any],
    info: DistInfo,
    *,
    extra_files: dict[str, bytes] | None = None,
    shard_bytes: int,
) -> dict[str, int]:
    """Write checkpoint folder ``target`` from every rank at once; collective (every rank calls it).

    Every rank builds the same content and file layout; gathers the full tensors of the files
    dealt to it (:meth:`~llm360.rundir.shards.ShardLayout.files_of`), and writes and hashes those
    files only, into the hidden folder rank 0 staged; rank 0 also writes the small files and, once
    every rank has finished, the marker over all their records, then renames the folder in. A
    failed write raises on every rank (a CheckpointError names the file) and replaces nothing; a
    rank killed mid-save leaves the staged folder unsealed (no marker), which the next start
    removes. Returns ``{file: bytes}`` of the tensor files this rank wrote.
    """
    model = unwrap(model)
    content = ckpt.checkpoint_content(
        model_state=model.state_dict(), trainer_state=trainer_state, optimizer=optimizer, param_names=model,
        rng_state=ckpt.capture_rng(), extra_files=extra_files, shard_bytes=shard_bytes,
    )
    mine = content.layout.files_of(info.rank, info.world_size)
    owner = content.layout.owners(info.world_size)
    with torch.no_grad():  # collectives, in the same order on every rank
        full = gather_to_owners({**content.model_state, **content.optimizer_tensors}, owner, info)
    files: dict[str, ckpt.FileContent] = {f: content.tensor_file(f, full) for f in mine}
    if info.is_main:
        files.update(content.small_files)
    records: dict[str, dict[str, Any]] = {}
    with atomic.staged(target) if info.is_main else nullcontext(None) as staged:
        tmp = Path(broadcast_object(None if staged is None else str(staged), info))
        with together(info):  # a failed write on any rank stops every rank, before the marker
            try:
                records = ckpt.write_checkpoint_files(tmp, files)
            except OSError as e:
                raise ckpt.write_error(target, e) from e
        everyone = gather_objects(records, info)
        with together(info):
            if info.is_main:
                try:
                    ckpt.seal_checkpoint(tmp, target, {k: v for r in everyone for k, v in r.items()})
                except OSError as e:
                    raise ckpt.write_error(target, e) from e
    return {f: int(records[f]["size"]) for f in mine}


def restore_together(
    target: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, info: DistInfo, *, strict: bool = True
) -> dict[str, Any]:
    """Load checkpoint ``target``'s weights, and its optimizer state unless ``optimizer`` is None; collective.

    Unsharded, every rank verifies and loads the whole checkpoint. Sharded, the ranks verify it
    together (each hashes its share of the files) and each reads only the block of every tensor
    it holds, whatever the world size that saved it; no rank holds a full-size copy. Every name
    and shape is checked before the live state is touched (on CheckpointError it is unchanged,
    on every rank). ``strict=False`` skips names present on one side only (logged). Returns
    :func:`~llm360.rundir.checkpoint.load_checkpoint`'s dict (trainer and RNG state).
    """
    model = unwrap(model)
    if not is_sharded(model):
        with together(info):
            return ckpt.load_checkpoint(target, model, optimizer, strict=strict)
    with together(info):
        ckpt.verify_share(target, info.rank, info.world_size)
    with together(info):
        res = ckpt.load_training_state(target, verified=True)
        load_blocks(target, model, optimizer, strict=strict)
    return res


def load_blocks(target: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, *, strict: bool) -> None:
    """Read, of checkpoint ``target``, the block of every tensor this rank holds into model and optimizer.

    No collective. The checkpoint must be verified (:func:`~llm360.rundir.checkpoint.verify_share`).
    Raises CheckpointError listing every mismatch before anything is changed.
    """
    weights, opt_reader, meta = ckpt.open_slices(target)
    problems: list[str] = []
    state = model.state_dict()
    names = ckpt.match_weights(target, {n: list(t.shape) for n, t in state.items()},
                               {n: weights.shape(n) for n in weights.weight_map}, strict, problems)
    opt_sd = None
    if optimizer is not None:
        if opt_reader is None or meta is None:
            if strict:
                problems.append("it holds no optimizer state")
            else:
                logger.warning("checkpoint %s has no optimizer state; the optimizer is left as it is", target)
        else:
            by_id = names_by_id(model)
            params = {by_id[id(p)]: p for p in model.parameters() if id(p) in by_id}
            try:
                tensors = _optimizer_blocks(opt_reader, params)
                opt_sd = optimizer_state_dict(optimizer, by_id, tensors, meta, strict, problems)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise CheckpointError(f"checkpoint {target}: optimizer.json does not have the expected structure "
                                      f"({e!r})") from None
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise CheckpointError(f"checkpoint {target} does not fit this model; nothing was loaded:\n{lines}")
    with torch.no_grad(), weights:
        for name in names:
            local, offsets, shape = local_block(state[name])
            local.copy_(weights.read(name, offsets, shape))
    if optimizer is not None and opt_sd is not None:
        optimizer.load_state_dict(opt_sd)


def _optimizer_blocks(reader: SliceReader, params: dict[str, Tensor]) -> dict[str, Tensor]:
    """``{"<state>/<name>": tensor}``: of each state shaped like its parameter, this rank's block of it,
    sharded as the parameter is; scalars (``step``) whole. A state of another shape is given as an
    empty tensor of its shape (on the meta device), for the mismatch to be reported."""
    out: dict[str, Tensor] = {}
    with torch.no_grad(), reader:
        for key in reader.weight_map:
            name = key.partition("/")[2]
            shape = reader.shape(key)
            p = params.get(name)
            if not shape:
                out[key] = reader.read(key)
            elif p is not None and shape == list(p.shape):
                t = torch.zeros_like(p, requires_grad=False)
                local, offsets, block = local_block(t)
                local.copy_(reader.read(key, offsets, block))
                out[key] = t
            else:
                out[key] = torch.empty(shape, device="meta")
    return out
