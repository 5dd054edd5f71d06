"""Parallelism, applied to the model from outside (the model has none), and the state it shards.

Process groups and collectives (:func:`init_distributed`, :func:`together`, ...); DDP, FSDP2, tensor
parallelism and activation checkpointing (:func:`parallelize`), and gradient clipping over all of
them; and, for checkpoints, gathering a sharded tensor's full value and finding the block of a
tensor a rank holds.

Under ``torchrun`` each process reads RANK / WORLD_SIZE / LOCAL_RANK; gloo on CPU, NCCL on GPU.
Without torchrun everything here is a no-op with world size 1.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from llm360.errors import CheckpointError, ConfigError, DataError, Llm360Error, RunDirError
from llm360.model.load import resolve_device

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


def launched_rank() -> tuple[int, int]:
    """(rank, world size) that torchrun set in this process's environment; (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the torchrun process group if there is one; pick the device.

    ``device`` as for :func:`llm360.model.load.resolve_device` (None: cuda when available); on
    CUDA each process takes the GPU of its LOCAL_RANK. Raises ConfigError for cuda without one.
    """
    rank, world = launched_rank()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, where="device")
    use_cuda = dev.type == "cuda"
    if use_cuda:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        _join_process_group("nccl" if use_cuda else "gloo", rank, world)
    return DistInfo(rank, world, local, dev)


_groups_joined = 0
"""Process groups this process has joined through :func:`init_distributed` (each rank alike)."""


def _join_process_group(backend: str, rank: int, world: int) -> None:
    """``init_process_group`` from torchrun's environment, in a key space of its own for each group joined.

    torchrun's store outlives a process group, and after ``destroy_process_group`` the next default
    group takes the same name: its ranks would read the addresses the previous group's ranks left
    there, and a rank that reads a peer's before the peer has published its new one connects to a
    closed port until gloo's 30-minute timeout (two replays in one ``verify`` hung so). Every rank
    joins and leaves the same groups in the same order, so the count names the same space on all.
    """
    global _groups_joined
    n = _groups_joined
    _groups_joined += 1
    store, rank, world = next(dist.rendezvous("env://", rank, world))
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"llm360_pg{n}", store), rank=rank,
                            world_size=world)


def destroy_distributed() -> None:
    _groups_by_ranks.clear()
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


def data_parallel_rank(info: DistInfo, tensor_parallel: int = 1) -> tuple[int, int]:
    """(this rank's index among the data-parallel ranks, their number).

    The ``tensor_parallel`` consecutive ranks of one tensor-parallel group (the inner dimension of
    the (data x tensor) mesh) hold one model between them and read the same rows.
    """
    return info.rank // tensor_parallel, info.world_size // tensor_parallel


def parallelize(
    model: nn.Module, parallelism: str, info: DistInfo, activation_checkpointing: bool = False,
    shard_group_size: int | None = None, bf16: bool = False, tensor_parallel: int = 1,
) -> nn.Module:
    """Apply activation checkpointing, tensor parallelism, and DDP, FSDP2 or HSDP (``fully_shard`` per block).

    HSDP shards every parameter inside groups of ``shard_group_size`` consecutive data-parallel
    ranks (a node's GPUs) and replicates it across the groups: FSDP2 over a 2-D mesh (replicate x
    shard), whose gradients are reduce-scattered inside a group and all-reduced across groups.
    ``tensor_parallel`` t > 1 adds an inner mesh dimension of t consecutive ranks that split every
    block between them (:mod:`llm360.train.tensor_parallel`); FSDP or HSDP then shard over the
    data-parallel dimension only (DDP with several data-parallel ranks is refused before this, by
    :func:`llm360.train.plan.check_trainer_supports`). With ``bf16``, FSDP and HSDP use FSDP's
    mixed-precision policy: the fp32 shards are the master weights, a block's parameters are
    all-gathered in bf16 (half the bytes on the wire and in memory) and its gradients reduced in fp32.
    """
    if activation_checkpointing:
        # Recompute each block in backward. The forward is wrapped in place (not the module), so
        # parameter names, and with them the Hugging Face state dict, stay unchanged.
        import functools

        from torch.utils.checkpoint import checkpoint

        for block in model.model.layers:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    if not info.enabled:
        return model
    t = tensor_parallel
    dp = info.world_size // t
    mesh = None  # fsdp without tensor parallelism: fully_shard's own 1-D mesh over every rank
    if parallelism == "hsdp" or t > 1:
        from torch.distributed.device_mesh import init_device_mesh

        dims = {"replicate": dp // (shard_group_size or dp), "shard": shard_group_size or dp} \
            if parallelism == "hsdp" else {"dp": dp}
        if t > 1:
            dims["tp"] = t
        full = init_device_mesh(info.device.type, tuple(dims.values()), mesh_dim_names=tuple(dims))
        if t > 1:
            from llm360.train.tensor_parallel import apply_tensor_parallel

            apply_tensor_parallel(model, full["tp"])
            if info.is_main:
                logger.info("tensor parallel: every block split over %d ranks, %d data-parallel", t, dp)
            if dp == 1:
                return model
        mesh = full if t == 1 else full["replicate", "shard"] if parallelism == "hsdp" else full["dp"]
    if parallelism in ("fsdp", "hsdp"):
        from torch.distributed.fsdp import fully_shard

        kwargs: dict = {}
        if bf16:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if info.is_main:
                logger.info("FSDP mixed precision: parameters all-gathered in bf16, gradients reduced in fp32, "
                            "fp32 master weights")
        for block in model.model.layers:
            fully_shard(block, mesh=mesh, **kwargs)
        fully_shard(model, mesh=mesh, **kwargs)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.local_rank] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def shards_parameters(parallelism: str, tensor_parallel: int, info: DistInfo) -> bool:
    """Whether :func:`parallelize` makes the parameters DTensors (each rank then reads its own blocks)."""
    return info.enabled and (parallelism in ("fsdp", "hsdp") or tensor_parallel > 1)


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the gradients' global 2-norm to ``max_norm``; returns the norm before clipping (a plain tensor).

    ``torch.nn.utils.clip_grad_norm_`` over one kind of gradient. Under tensor parallelism with
    FSDP the gradients live on different meshes (a block's matrices on data x tensor, its norms and
    the embedding on data only, replicated ones on none); each group's norm is reduced over its own
    mesh, and the groups' norms combined.
    """
    groups: dict[object, list[nn.Parameter]] = {}
    for p in params:
        if p.grad is not None:
            key = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
            groups.setdefault(key, []).append(p)
    if len(groups) <= 1:
        norm = torch.nn.utils.clip_grad_norm_(next(iter(groups.values()), []), max_norm, foreach=True)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm
    norms = []
    for ps in groups.values():
        n = torch.nn.utils.get_total_norm([p.grad for p in ps], 2.0, foreach=True)
        norms.append((n.full_tensor() if isinstance(n, DTensor) else n).float())
    total = torch.linalg.vector_norm(torch.stack(norms))
    for ps in groups.values():
        torch.nn.utils.clip_grads_with_norm_(ps, max_norm, total, foreach=True)
    return total


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and not hasattr(model, "lm_head") else model


# ------------------------------------------------------------------------ sharded tensors
# A checkpoint holds full tensors under their parameter names whatever the layout
# (:mod:`llm360.rundir.shards`): a save gathers, tensor by tensor, the full value of what each rank
# writes; a load copies into each rank's block of a tensor the same block of the file's.


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


_groups_by_ranks: dict[tuple[int, ...], object] = {}
"""Process groups over the ranks of a mesh, made once per process group joined (:func:`destroy_distributed` forgets them)."""


def _groups_over(meshes: list[tuple[int, ...]]) -> dict[tuple[int, ...], object]:
    for r in meshes:  # new_group is collective over the world: every rank makes every group, in one order
        if r not in _groups_by_ranks:
            _groups_by_ranks[r] = dist.new_group(list(r))
    return _groups_by_ranks


def gather_to_owners(tensors: Mapping[str, torch.Tensor], owner: Mapping[str, int],
                     info: DistInfo) -> dict[str, torch.Tensor]:
    """The full value (in host memory) of each tensor whose ``owner`` is this rank; the others dropped.

    Collective when ``tensors`` holds DTensors: every rank passes the same names in the same order.
    A sharded tensor's blocks go to its owner only -- one ``gather`` over the ranks of its mesh
    that include the owner (a tensor replicated over another mesh dimension has a copy on each of
    several sub-meshes; the owner's gathers it) -- so each rank receives about the bytes it writes,
    not the whole model as an all-gather would give every rank. A plain tensor is returned as it
    is, not copied.
    """
    sharded = {n: t for n, t in tensors.items() if isinstance(t, DTensor)}
    mine = {n: t.detach() for n, t in tensors.items() if n not in sharded and owner[n] == info.rank}
    if not sharded:
        return mine
    meta = {n: (tuple(t.device_mesh.mesh.flatten().tolist()), *local_block(t)[1:]) for n, t in sharded.items()}
    every = gather_objects(meta, info)  # every rank's mesh and block (offsets, shape) of every sharded tensor
    groups = _groups_over(sorted({m[n][0] for m in every for n in m}))
    for name, t in sharded.items():
        ranks, dst = meta[name][0], owner[name]
        if dst not in ranks:
            continue  # this rank's copy is not the owner's
        local = t.to_local().detach().contiguous().reshape(-1)
        if len(ranks) == 1:  # a mesh of one rank holds the whole tensor
            mine[name] = local.view(tuple(t.shape)).cpu()
            continue
        blocks = [every[r][name] for r in ranks]
        width = max(math.prod(shape) for _, _, shape in blocks)
        send = local
        if local.numel() < width:  # uneven blocks: gather takes equal sizes
            send = torch.zeros(width, dtype=local.dtype, device=local.device)
            send[: local.numel()] = local
        recv = [torch.empty_like(send) for _ in ranks] if dst == info.rank else None
        dist.gather(send, recv, dst=dst, group=groups[ranks])
        if recv is None:
            continue
        full = torch.empty(tuple(t.shape), dtype=local.dtype)
        for got, (_, offsets, shape) in zip(recv, blocks, strict=True):
            where = tuple(slice(o, o + n) for o, n in zip(offsets, shape, strict=True))
            full[where] = got[: math.prod(shape)].view(shape).cpu()
        mine[name] = full
    return mine


def local_block(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """(this rank's local tensor, its offset in the full tensor, its shape): the whole of a plain tensor."""
    if isinstance(t, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return t.to_local(), tuple(offsets), tuple(shape)
    return t, (0,) * t.ndim, tuple(t.shape)


def gather_objects(obj: object, info: DistInfo) -> list:
    """Every rank's ``obj``, in rank order, on every rank (collective); ``[obj]`` without torchrun."""
    return _gather(obj, info) if info.enabled else [obj]
