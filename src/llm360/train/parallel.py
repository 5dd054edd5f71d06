"""Parallelism, applied to the model from outside (the model has none), and the state it shards.

Process groups and collectives (:func:`init_distributed`, :func:`together`, ...); DDP, FSDP2 and
activation checkpointing (:func:`parallelize`); gathering sharded state into full tensors and
scattering it back (the consolidated checkpoint stays the one format); and the sharded copies
under ``checkpoints/dcp`` that let an FSDP run resume without a full-size copy anywhere.

Under ``torchrun`` each process reads RANK / WORLD_SIZE / LOCAL_RANK; gloo on CPU, NCCL on GPU.
Without torchrun everything here is a no-op with world size 1.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from llm360.errors import CheckpointError, ConfigError, DataError, Llm360Error, RunDirError
from llm360.model.load import resolve_device
from llm360.rundir.atomic import atomic_write_text, fsync_tree, install, is_leftover, remove_tree, staged

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the torchrun process group if there is one; pick the device.

    ``device`` as for :func:`llm360.model.load.resolve_device` (None: cuda when available); on
    CUDA each process takes the GPU of its LOCAL_RANK. Raises ConfigError for cuda without one.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, where="device")
    use_cuda = dev.type == "cuda"
    if use_cuda:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local, dev)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks (in place) and return it."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj, info: DistInfo) -> list:
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


@contextmanager
def together(info: DistInfo) -> Iterator[None]:
    """Run a block on every rank; an error raised in it on any rank is raised on all.

    A rank that failed alone (a checkpoint file it cannot read, a data folder missing on its node)
    would otherwise exit while the others wait in the next collective. Every rank must enter the
    block, and the block must hold no collective. The failing rank raises its own error; the others
    raise the same kind of user-facing error prefixed with its rank, or a RuntimeError naming it.
    """
    error: Exception | None = None
    try:
        yield
    except Exception as e:
        if not info.enabled:
            raise
        error = e
    if not info.enabled:
        return
    failed = _gather(None if error is None else (type(error).__name__, str(error)), info)
    if error is not None:
        raise error
    for rank, item in enumerate(failed):
        if item is not None:
            kinds = {c.__name__: c for c in (Llm360Error, ConfigError, DataError, RunDirError, CheckpointError)}
            if item[0] in kinds:
                raise kinds[item[0]](f"rank {rank}: {item[1]}")
            raise RuntimeError(f"rank {rank} failed with {item[0]}: {item[1]} (its traceback is in its log)")


def same_on_every_rank(value: object, what: str, info: DistInfo) -> None:
    """Raise RunDirError on every rank unless all ranks see the same `value` (collective)."""
    if not info.enabled:
        return
    seen = _gather(value, info)
    if any(v != seen[0] for v in seen):
        listed = "; ".join(f"rank {r}: {v}" for r, v in enumerate(seen))
        raise RunDirError(
            f"the ranks do not see the same {what} ({listed}); every rank must read the same run "
            "directory, on a file system shared by all nodes"
        )


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def parallelize(model: nn.Module, parallelism: str, info: DistInfo, activation_checkpointing: bool = False) -> nn.Module:
    """Apply activation checkpointing and DDP or FSDP2 (``fully_shard`` per block) to the model."""
    if activation_checkpointing:
        # Recompute each block in backward. The forward is wrapped in place (not the module), so
        # parameter names, and with them the Hugging Face state dict, stay unchanged.
        import functools

        from torch.utils.checkpoint import checkpoint

        for block in model.model.layers:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    if not info.enabled:
        return model
    if parallelism == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.local_rank] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and not hasattr(model, "lm_head") else model


# ------------------------------------------------------------------------ FSDP2 state dicts
# Checkpoints stay one consolidated format (safetensors keyed by parameter name) whatever the
# parallelism: FSDP shards are gathered to full tensors on save and scattered again on load. That
# keeps every file pickle-free (torch.distributed.checkpoint's .metadata is a pickle) and makes
# resuming on a different world size the ordinary case.


def is_sharded(model: nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """{"state": {name: state}, "param_groups": [{hyperparameters, "params": [names]}]} of a plain model."""
    names = {id(p): n for n, p in model.named_parameters()}
    state = {names[id(p)]: dict(st) for p, st in optimizer.state.items() if id(p) in names}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    return {"state": state, "param_groups": groups}


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, named: dict) -> None:
    """Scatter a full, name-keyed optimizer state into the optimizer of a sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not named["state"]:
        return
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))


def load_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, torch.Tensor], named: dict
) -> None:
    """Every rank: set full model state and a full, name-keyed optimizer state into a sharded model, in place.

    model_state maps parameter names to full tensors (on any device); named is
    :func:`named_optimizer_state`'s format. An empty optimizer state (a checkpoint saved before the
    first step) empties the optimizer's state; only the param groups' hyperparameters are taken.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if len(named["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(
            f"the optimizer state has {len(named['param_groups'])} param groups, the optimizer "
            f"{len(optimizer.param_groups)}"
        )
    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))
    if named["state"]:
        load_full_optimizer_state(model, optimizer, named)
        return
    optimizer.state.clear()
    for group, saved in zip(optimizer.param_groups, named["param_groups"], strict=True):
        group.update({k: v for k, v in saved.items() if k != "params"})


def gather_full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, torch.optim.Optimizer, dict]:
    """Full model state dict, and an AdamW over full CPU tensors holding the full optimizer state.

    Collective: every rank must call it; only rank 0's return values are complete.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    if optimizer.state:
        osd = get_optimizer_state_dict(model, optimizer, options=opts)
    else:
        # get_optimizer_state_dict would initialise an empty state with a zero-lr step, which
        # advances AdamW's step count and so changes every later update: save the empty state as is.
        names = {id(p): n for n, p in model.named_parameters()}
        osd = {"state": {}, "param_groups": [
            {**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
            for g in optimizer.param_groups]}
    if not msd:
        return {}, optimizer, {}
    params = {n: torch.nn.Parameter(t, requires_grad=False) for n, t in msd.items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [params[n] for n in g["params"]]}
              for g in osd["param_groups"]]
    full_opt = type(optimizer)(groups)
    for n, st in osd["state"].items():
        full_opt.state[params[n]] = st
    return msd, full_opt, {id(p): n for n, p in params.items()}


# ------------------------------------------------------------- sharded copies (resume accelerator)
# Beside the consolidated files, an FSDP run also writes its sharded state with
# torch.distributed.checkpoint to checkpoints/dcp/<name>/: each rank writes and later reads only its
# own shards, so resuming a large run needs no rank to hold the full optimizer state. These copies
# are not part of a release (DCP's .metadata is a pickle); the consolidated checkpoint stays the
# record, and is what a resume on another setup, or without the copy, reads.
DCP_MARKER = "llm360_dcp.json"


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path, step: int, info: DistInfo) -> None:
    """Every rank: write the sharded model + optimizer state to folder, complete or absent.

    Rank 0 stages a hidden folder beside ``folder`` (:func:`llm360.rundir.atomic.staged`) and tells
    the others its name; every rank writes its own shards there (DCP fsyncs each file); after a
    barrier rank 0 writes the marker, fsyncs the folders and renames it in
    (:func:`llm360.rundir.atomic.install`: an older copy of the same name is moved aside first and
    deleted only once the new one is in place). Collective: every rank must call it.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    with (staged(folder) if info.is_main else nullcontext(None)) as tmp:
        tmp = Path(broadcast_object(None if tmp is None else str(tmp), info))
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
        barrier(info)
        if info.is_main:
            atomic_write_text(tmp / DCP_MARKER, json.dumps({"step": step, "world_size": info.world_size}) + "\n")
            fsync_tree(tmp, files=False)
            install(tmp, folder)
        barrier(info)


def remove_sharded_leftovers(folder: Path) -> None:
    """Delete what interrupted sharded-copy writes left in folder (``checkpoints/dcp``).

    Call it from rank 0 while it holds the run directory's lock and before any save, so nothing
    there is being written. A copy moved aside by an interrupted replace is deleted, not restored: a
    copy only speeds a resume up, and one restored under a name whose consolidated checkpoint was
    saved again since could pass for the new one's.
    """
    if not folder.is_dir():
        return
    for e in sorted(folder.iterdir()):
        if is_leftover(e.name):
            logger.warning("removing %s, left by an interrupted save of a sharded copy", e)
            remove_tree(e)


def sharded_copy_step(folder: Path) -> int | None:
    """The optimizer step a complete sharded copy holds, or None."""
    try:
        return int(json.loads((folder / DCP_MARKER).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every rank: read its shards of model and optimizer state from a sharded copy."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
