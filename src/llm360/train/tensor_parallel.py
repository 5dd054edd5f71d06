"""Tensor parallelism for :class:`~llm360.model.llama.Llama`: its parallelize plan, kept beside the model.

Megatron's split of each block over the ``t`` GPUs of a tensor-parallel group (DTensor's
``parallelize_module``):

- ``q_proj``, ``k_proj``, ``v_proj``, ``gate_proj`` and ``up_proj`` are split by output rows
  (``ColwiseParallel``): each GPU computes its own ``num_heads / t`` query heads, ``num_kv_heads / t``
  key/value heads and ``intermediate_size / t`` of the MLP's width, from the whole input;
- ``o_proj`` and ``down_proj`` are split by input columns (``RowwiseParallel``): each GPU multiplies
  its own heads' (its own width's) activations, and one all-reduce sums the partial products.

That is two all-reduces per block forward and two backward (the backward of a split layer's
input sums the group's partial gradients). Embedding, norms and the output head stay whole on
every GPU of the group: the residual stream between sub-layers is the same on all of them, and so
are those parameters' gradients. The model file holds no parallel code; this plan sets each
attention's local head counts and turns off the fused projections (whose weights would be shards
of different tensors).

A checkpoint holds full tensors whatever the split (each save gathers them, each restore reads a
GPU's block back: :mod:`llm360.train.checkpointing`).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

# parameter-holding submodules of a block and how each is split
_COLWISE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
_ROWWISE = ("self_attn.o_proj", "mlp.down_proj")


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Split every block of ``model`` (a Llama) over ``tp_mesh``, in place.

    The degree must divide the heads, key/value heads and MLP width (``llm360.train.plan.check_layout``
    says so as a ConfigError before anything is built).
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    t = tp_mesh.size()
    plan = {**{name: ColwiseParallel() for name in _COLWISE}, **{name: RowwiseParallel() for name in _ROWWISE}}
    for block in model.model.layers:
        attn = block.self_attn
        if attn.n_head % t or attn.n_kv % t:
            raise ValueError(f"tensor parallel degree {t} does not divide {attn.n_head} heads / {attn.n_kv} kv heads")
        parallelize_module(block, tp_mesh, plan)
        attn.n_head, attn.n_kv = attn.n_head // t, attn.n_kv // t
        attn.fuse_qkv = False
        block.mlp.fuse_gate_up = False
