"""AdamW construction (decay groups, kernel choice) and the warmup + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from llm360.config import TrainConfig
from llm360.train.optim import build_optimizer, decay_groups, lr_at, set_lr


class Tiny(nn.Module):
    def __init__(self, tie: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(13, 8)
        self.proj = nn.Linear(8, 8)  # weight decayed, bias not
        self.norm = nn.LayerNorm(8)  # weight and bias not decayed
        self.rms = nn.RMSNorm(8)
        self.head = nn.Linear(8, 13, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.rms(self.norm(torch.relu(self.proj(self.embed(ids))))))


def _names(model: nn.Module, params: list[nn.Parameter]) -> set[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in params}


def test_two_groups_decay_only_matrices() -> None:
    model = Tiny()
    cfg = TrainConfig(lr=1e-3, beta1=0.8, beta2=0.9, eps=1e-7, weight_decay=0.1)
    opt = build_optimizer(model, cfg)
    assert len(opt.param_groups) == 2
    decay, no_decay = opt.param_groups
    assert _names(model, decay["params"]) == {"embed.weight", "proj.weight", "head.weight"}
    assert _names(model, no_decay["params"]) == {"proj.bias", "norm.weight", "norm.bias", "rms.weight"}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    for g in opt.param_groups:
        assert g["lr"] == 1e-3 and g["betas"] == (0.8, 0.9) and g["eps"] == 1e-7
        assert g["fused"] is True  # CPU and CUDA: torch's fused kernel


def test_mup_gives_the_blocks_matrices_a_scaled_learning_rate() -> None:
    from llm360.config import ModelConfig, MupConfig
    from llm360.model.llama import Llama

    kw = {"vocab_size": 64, "hidden_size": 64, "intermediate_size": 96, "num_layers": 2, "num_heads": 4}
    model = Llama(ModelConfig(**kw, mup=MupConfig(base_width=16)))  # width multiplier 4
    opt = build_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.1))
    blocks, other, no_decay = opt.param_groups
    assert _names(model, blocks["params"]) == {n for n, p in model.named_parameters()
                                               if n.startswith("model.layers.") and p.ndim == 2}  # fmt: skip
    assert _names(model, other["params"]) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert all(p.ndim == 1 for p in no_decay["params"])
    assert blocks["weight_decay"] == other["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [g["lr"] for g in opt.param_groups] == [1e-3 / 4, 1e-3, 1e-3]
    set_lr(opt, 2e-4)
    assert [g["lr"] for g in opt.param_groups] == [2e-4 / 4, 2e-4, 2e-4]
    plain = build_optimizer(Llama(ModelConfig(**kw)), TrainConfig(lr=1e-3))
    assert len(plain.param_groups) == 2 and not any("lr_scale" in g for g in plain.param_groups)


def test_fused_kernel_is_reproducible_and_matches_the_reference() -> None:
    """Two runs give identical bits; the single-tensor reference path agrees to rounding."""

    def run(reference: bool = False) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = Tiny()
        opt = build_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.1))
        if reference:
            for g in opt.param_groups:
                g["fused"], g["foreach"] = False, False
        for _ in range(5):
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    first, second, reference = run(), run(), run(reference=True)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    for a, b in zip(first, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not all(torch.equal(a, b) for a, b in zip(first, first_init(), strict=True))  # it moved


def first_init() -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [p.detach().clone() for p in Tiny().parameters()]


def test_tied_and_frozen_parameters() -> None:
    model = Tiny(tie=True)
    model.rms.weight.requires_grad_(False)
    decay, no_decay = decay_groups(model)
    all_ids = [id(p) for p in decay + no_decay]
    assert len(all_ids) == len(set(all_ids))  # the tied embedding/head appears once
    assert id(model.rms.weight) not in all_ids
    opt = build_optimizer(model, TrainConfig())
    assert sum(len(g["params"]) for g in opt.param_groups) == len(all_ids)


def test_no_trainable_parameters_is_an_error() -> None:
    model = Tiny()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, TrainConfig())


def _train(seed: int, steps: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    model = Tiny()
    opt = build_optimizer(model, TrainConfig(lr=1e-2))
    for _ in range(steps):
        ids = torch.randint(0, 13, (4, 5))
        loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_training_is_bitwise_reproducible_on_cpu() -> None:
    a, b = _train(0, 4), _train(0, 4)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_weight_decay_is_decoupled_and_only_on_matrices() -> None:
    model = Tiny()
    opt = build_optimizer(model, TrainConfig(lr=0.5, weight_decay=0.1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # zero gradients: only weight decay can move a parameter
    opt.step()
    for n, p in model.named_parameters():
        if p.ndim >= 2:
            torch.testing.assert_close(p.detach(), before[n] * (1 - 0.5 * 0.1))
        else:
            assert torch.equal(p.detach(), before[n]), n


# -------------------------------------------------------------------------------- schedule


CFG = TrainConfig(lr=3e-4, min_lr=3e-5, warmup_steps=100)


def test_warmup_is_linear_from_zero() -> None:
    assert lr_at(0, CFG, 1000) == 0.0
    assert lr_at(50, CFG, 1000) == pytest.approx(1.5e-4)
    assert lr_at(99, CFG, 1000) == pytest.approx(3e-4 * 99 / 100)
    assert lr_at(100, CFG, 1000) == pytest.approx(3e-4)


def test_cosine_known_points() -> None:
    total = 1100  # cosine runs over steps 100..1100 (1000 steps)
    assert lr_at(100, CFG, total) == pytest.approx(3e-4)
    assert lr_at(600, CFG, total) == pytest.approx((3e-4 + 3e-5) / 2)  # halfway
    quarter = 3e-5 + (3e-4 - 3e-5) * 0.5 * (1 + math.cos(math.pi / 4))
    assert lr_at(350, CFG, total) == pytest.approx(quarter)
    assert lr_at(total, CFG, total) == pytest.approx(3e-5)  # ends exactly at total_steps
    assert lr_at(total - 1, CFG, total) > 3e-5
    assert lr_at(total + 1, CFG, total) == 3e-5
    assert lr_at(10 * total, CFG, total) == 3e-5


def test_schedule_is_continuous_and_monotone() -> None:
    total = 2000
    lrs = [lr_at(s, CFG, total) for s in range(total + 50)]
    steps = [abs(b - a) for a, b in zip(lrs, lrs[1:], strict=False)]
    # the largest jump between consecutive steps is the warmup slope: no discontinuity anywhere
    assert max(steps) <= CFG.lr / CFG.warmup_steps * (1 + 1e-9)
    assert all(b >= a for a, b in zip(lrs[:100], lrs[1:101], strict=True))
    assert all(b <= a for a, b in zip(lrs[100:], lrs[101:], strict=False))
    assert min(lrs) == 0.0 and max(lrs) == pytest.approx(CFG.lr)


def test_no_warmup_and_degenerate_configs() -> None:
    cfg = TrainConfig(lr=1e-3, min_lr=0.0, warmup_steps=0)
    assert lr_at(0, cfg, 10) == pytest.approx(1e-3)
    assert lr_at(10, cfg, 10) == 0.0
    short = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert lr_at(5, short, 4) == pytest.approx(5e-4)  # the warmup runs to its end
    assert lr_at(10, short, 4) == 1e-4
    assert lr_at(0, short, 0) == 0.0
    with pytest.raises(ValueError):
        lr_at(-1, CFG, 10)
    with pytest.raises(ValueError):
        lr_at(0, CFG, -1)


def test_set_lr_every_group_float_and_tensor() -> None:
    model = Tiny()
    opt = build_optimizer(model, TrainConfig())
    set_lr(opt, 1.25e-4)
    assert [g["lr"] for g in opt.param_groups] == [1.25e-4, 1.25e-4]
    opt.param_groups[0]["lr"] = torch.tensor(0.0)
    set_lr(opt, 2e-4)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    assert opt.param_groups[0]["lr"].item() == pytest.approx(2e-4)
    assert opt.param_groups[1]["lr"] == 2e-4
