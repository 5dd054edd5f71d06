"""AdamW with decoupled weight decay on matrices only, and the warmup + cosine learning-rate schedule.

Units: a *step* is one optimizer step (one global batch), counted from 0. ``lr_at(step, ...)`` is the
learning rate used by optimizer step ``step``; the trainer calls ``set_lr(opt, lr_at(step, ...))``
before ``opt.step()``. The schedule is a pure function of (step, config, total_steps), so a resumed
run only needs the step count from the checkpoint to be back on the same curve.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from llm360.config import TrainConfig

logger = logging.getLogger(__name__)


def decay_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split trainable parameters into (decayed, not decayed).

    Matrices (``ndim >= 2``: linear weights, embeddings, the output head) get weight decay;
    1-D and scalar parameters (norm gains, biases) do not. Shared (tied) parameters appear once.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in model.named_parameters():  # deduplicates tied parameters
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return decay, no_decay


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW(lr, betas, eps) with the decayed parameters (group 0) and the others (group 1).

    Under muP (a :class:`~llm360.model.llama.Llama` whose config has ``mup``) the blocks' matrices get
    a group of their own first, with ``lr_scale`` = 1 / width multiplier
    (:func:`~llm360.model.llama.lr_multiplier`); :func:`set_lr` multiplies the schedule's rate by it.

    The kernel is torch's fused one on CUDA and on CPU: elementwise, hence deterministic (identical
    bits run after run, whatever the thread count), and the fastest (on CPU ~5x the single-tensor
    path: 9 ms against 50 ms a step for a 10M-parameter model on one thread). Other devices, and
    parameters that mix DTensors and plain tensors, get the single-tensor reference path. The lr set here is the peak; the trainer overwrites it every step
    with :func:`set_lr`.
    """
    from llm360.config import ModelConfig
    from llm360.model.llama import lr_multiplier

    mcfg = getattr(model, "cfg", None)
    decay, no_decay = decay_groups(model)
    params = decay + no_decay
    if not params:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    # Tensor parallelism without FSDP leaves the embedding, norms and head plain tensors beside the
    # blocks' DTensors; the fused and foreach kernels take one kind only, so those runs step one tensor
    # at a time.
    sharded = [isinstance(p, DTensor) for p in params]
    fused = all(p.device.type in ("cuda", "cpu") for p in params) and (all(sharded) or not any(sharded))
    kernel = {"fused": True} if fused else {"foreach": False, "fused": False}
    groups: list[dict] = []
    if isinstance(mcfg, ModelConfig) and mcfg.mup is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        scale = {id(p): lr_multiplier(mcfg, names[id(p)], p) for p in decay}
        for factor in sorted({f for f in scale.values() if f != 1.0}):
            groups.append({"params": [p for p in decay if scale[id(p)] == factor],
                           "weight_decay": cfg.weight_decay, "lr_scale": factor})  # fmt: skip
        decay = [p for p in decay if scale[id(p)] == 1.0]
    groups += [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kernel)
    set_lr(opt, cfg.lr)
    logger.debug(
        "AdamW: %s; %s",
        ", ".join(f"{len(g['params'])} tensors ({sum(p.numel() for p in g['params'])} params) with weight decay "
                  f"{g['weight_decay']:g} and lr x {g.get('lr_scale', 1.0):g}" for g in opt.param_groups),
        "fused" if fused else "single-tensor",
    )  # fmt: skip
    return opt


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of a run of ``total_steps`` steps.

    - warmup: ``lr * step / warmup_steps`` for ``step < warmup_steps`` (0 at step 0, linear);
    - cosine: from ``lr`` at ``step == warmup_steps`` to ``min_lr`` at ``step == total_steps``:
      ``min_lr + (lr - min_lr) * (1 + cos(pi * t)) / 2`` with
      ``t = (step - warmup_steps) / (total_steps - warmup_steps)``;
    - ``step >= total_steps``: ``min_lr``.

    The curve is continuous. The last step actually taken, ``total_steps - 1``, is one cosine step
    above ``min_lr``. If ``warmup_steps >= total_steps`` the warmup runs to its end regardless and
    is followed by ``min_lr`` (a degenerate config, not an error).
    """
    if step < 0:
        raise ValueError(f"lr_at: step must be >= 0, got {step}")
    if total_steps < 0:
        raise ValueError(f"lr_at: total_steps must be >= 0, got {total_steps}")
    warmup = cfg.warmup_steps
    if step < warmup:
        return cfg.lr * step / warmup
    if step >= total_steps:
        return cfg.min_lr
    t = (step - warmup) / (total_steps - warmup)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every param group's learning rate to ``lr`` times its ``lr_scale`` (1 if absent; muP sets it),
    in place, also for tensor-valued lr."""
    for group in optimizer.param_groups:
        value = lr * group.get("lr_scale", 1.0)
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value
