"""The model against its reference: transformers' LlamaForCausalLM (and StableLM for CrystalCoder's layout)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llm360.config import MODEL_PRESETS, ModelConfig, MupConfig
from llm360.errors import ConfigError
from llm360.model.llama import (
    KVCache,
    Llama,
    decode_step,
    flops_per_token,
    linear_cross_entropy,
    num_parameters,
    resolve_model_config,
)

transformers = pytest.importorskip("transformers")

V = 97


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=80, num_layers=2, num_heads=4, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


def hf_llama(cfg: ModelConfig, model: Llama) -> transformers.LlamaForCausalLM:
    hc = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
    )  # fmt: skip
    ref = transformers.LlamaForCausalLM(hc).eval()
    ref.load_state_dict(model.state_dict())
    return ref


def ids(b: int = 3, t: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def model_of(cfg: ModelConfig, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(cfg).eval()


@pytest.mark.parametrize(
    "kw",
    [{}, {"num_kv_heads": 2}, {"num_kv_heads": 1}, {"tie_embeddings": True}],
    ids=["mha", "gqa", "mqa", "tied"],
)
def test_logits_match_hf_llama(kw):
    cfg = tiny(**kw)
    model = model_of(cfg)
    ref = hf_llama(cfg, model)
    assert {k: v.shape for k, v in ref.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    x = ids()
    with torch.no_grad():
        ours, theirs = model(x), ref(x).logits
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_layernorm_and_partial_rotary_match_hf_stablelm():
    """CrystalCoder's layout (LayerNorm with bias, rotary on 25% of each head) is StableLM's."""
    cfg = tiny(hidden_size=64, norm="layernorm", norm_eps=1e-5, rope_fraction=0.25, num_kv_heads=2)
    model = model_of(cfg)
    with torch.no_grad():  # non-trivial norm weights and biases
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hc = transformers.StableLmConfig(
        vocab_size=V, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, layer_norm_eps=1e-5, partial_rotary_factor=0.25,
    )  # fmt: skip
    ref = transformers.StableLmForCausalLM(hc).eval()
    ref.load_state_dict(model.state_dict())
    x = ids()
    with torch.no_grad():
        assert (model(x) - ref(x).logits).abs().max().item() <= 1e-5


def test_loss_is_cross_entropy_of_logits_and_fused_grads_match():
    cfg = tiny(num_kv_heads=2)
    model = model_of(cfg).train()
    x, y = ids(), ids(seed=2)
    y[0, :5] = -100  # ignored targets
    logits = model(x)
    ref_mean = F.cross_entropy(logits.view(-1, V), y.view(-1), ignore_index=-100)
    ref_sum = F.cross_entropy(logits.view(-1, V), y.view(-1), ignore_index=-100, reduction="sum")
    ref_none = F.cross_entropy(logits.view(-1, V), y.view(-1), ignore_index=-100, reduction="none")
    _, mean = model(x, y)
    none_logits, s = model(x, y, reduction="sum")
    with_logits, m2 = model(x, y, return_logits=True)
    _, per_token = model(x, y, reduction="none")
    assert none_logits is None and torch.allclose(with_logits, logits)
    assert mean.dtype == torch.float32
    torch.testing.assert_close(mean, ref_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(m2, ref_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(s, ref_sum, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(per_token, ref_none.view(3, -1), atol=1e-6, rtol=1e-6)

    grads = []
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        _, loss = model(x, y, return_logits=not fused)
        (loss * 3.0).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5, msg=n)


def test_chunked_cross_entropy_any_chunk_size():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (37,), generator=g)
    ref = F.cross_entropy(h @ w.T, t, reduction="sum")
    gh, gw = torch.autograd.grad(ref, (h, w))
    for chunk in (1, 5, 37, 64):
        loss = linear_cross_entropy(h, w, t, chunk)
        torch.testing.assert_close(loss, ref)
        ch, cw = torch.autograd.grad(loss, (h, w))
        torch.testing.assert_close(ch, gh)
        torch.testing.assert_close(cw, gw)


@pytest.mark.parametrize("kw", [{}, {"num_kv_heads": 2}], ids=["mha", "gqa"])
def test_greedy_generation_matches_hf_and_no_cache_loop(kw):
    cfg = tiny(**kw)
    model = model_of(cfg)
    prompt = ids(b=2, t=7)
    out = model.generate_greedy(prompt, 12)
    assert out.shape == (2, 19) and torch.equal(out[:, :7], prompt)
    ref = hf_llama(cfg, model)
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 0
    theirs = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    assert torch.equal(out, theirs)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat((seq, model(seq)[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(out, seq)


def test_greedy_generation_crystalcoder_options_and_training_mode_restored():
    cfg = tiny(hidden_size=64, norm="layernorm", rope_fraction=0.25, mup=MupConfig(base_width=16))
    model = model_of(cfg).train()
    prompt = ids(b=2, t=5)
    out = model.generate_greedy(prompt, 6)
    assert model.training
    seq = prompt
    with torch.no_grad():
        model.eval()
        for _ in range(6):
            seq = torch.cat((seq, model(seq)[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize(
    "kw",
    [{}, {"num_kv_heads": 2, "norm": "layernorm", "rope_fraction": 0.25, "mup": MupConfig(base_width=16)}],
    ids=["llama", "crystalcoder-gqa"],
)
def test_ragged_decode_step_matches_full_forward(kw):
    """Rows at different positions, prefilled with padding past their end, decode as the full forward."""
    cfg = tiny(**kw)
    model = model_of(cfg)
    seq = ids(b=3, t=12)
    pos_n = torch.tensor([3, 7, 5])
    with torch.no_grad():
        full_BTV = model(seq)
        cache = KVCache(cfg, 3, 12, torch.device("cpu"), torch.float32)
        model.model(torch.where(torch.arange(7) < pos_n[:, None], seq[:, :7], 0), cache)  # padded prefill
        for _ in range(4):
            logits_nV = decode_step(model, seq[torch.arange(3), pos_n], pos_n, cache.k_BKSE, cache.v_BKSE)
            torch.testing.assert_close(logits_nV, full_BTV[torch.arange(3), pos_n], rtol=0, atol=1e-5)
            pos_n = pos_n + 1
        rows_n, pos_n = torch.arange(2), pos_n[:2]  # a batch of fewer rows uses the cache's first rows
        two_nV = decode_step(model, seq[rows_n, pos_n], pos_n, cache.k_BKSE, cache.v_BKSE)
        torch.testing.assert_close(two_nV, full_BTV[rows_n, pos_n], rtol=0, atol=1e-5)


def test_amber_7b_parameter_count_on_meta():
    cfg = ModelConfig(**MODEL_PRESETS["amber-7b"])
    with torch.device("meta"):
        model = Llama(cfg)
    count = sum(p.numel() for p in model.parameters())
    assert count == 6_738_415_616 == num_parameters(cfg)
    assert num_parameters(cfg, exclude_embedding=True) == count - 32000 * 4096
    assert flops_per_token(cfg, 2048) == 6 * (count - 32000 * 4096) + 12 * 32 * 4096 * 2048


@pytest.mark.parametrize(
    "kw",
    [
        {"num_kv_heads": 2},
        {"tie_embeddings": True},
        {"norm": "layernorm"},
        dict(MODEL_PRESETS["crystalcoder-7b"]),
    ],
)
def test_num_parameters_matches_module(kw):
    cfg = tiny(**kw)
    with torch.device("meta"):
        model = Llama(cfg)
    assert sum(p.numel() for p in model.parameters()) == num_parameters(cfg)


def test_init_is_deterministic_and_scaled():
    cfg = tiny(num_layers=8, hidden_size=128, intermediate_size=256, vocab_size=1000)
    a, b = model_of(cfg, seed=3).state_dict(), model_of(cfg, seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], model_of(cfg, seed=4).state_dict()["lm_head.weight"])
    std = cfg.init_std
    assert a["model.layers.0.self_attn.q_proj.weight"].std().item() == pytest.approx(std, rel=0.05)
    assert a["model.layers.0.mlp.down_proj.weight"].std().item() == pytest.approx(std / 4, rel=0.05)
    assert a["model.layers.3.self_attn.o_proj.weight"].std().item() == pytest.approx(std / 4, rel=0.05)
    assert torch.equal(a["model.norm.weight"], torch.ones(128))


def test_mup_init_scales_the_blocks_matrices():
    # width multiplier 128 / 32 = 4: the blocks' matrices at init_std / 2, embedding and head at init_std
    cfg = tiny(num_layers=8, hidden_size=128, intermediate_size=256, vocab_size=1000, mup=MupConfig(base_width=32))
    a = model_of(cfg, seed=3).state_dict()
    std = cfg.init_std
    assert a["model.layers.0.self_attn.q_proj.weight"].std().item() == pytest.approx(std / 2, rel=0.05)
    assert a["model.layers.5.mlp.gate_proj.weight"].std().item() == pytest.approx(std / 2, rel=0.05)
    assert a["model.layers.0.mlp.down_proj.weight"].std().item() == pytest.approx(std / 2 / 4, rel=0.05)
    assert a["model.embed_tokens.weight"].std().item() == pytest.approx(std, rel=0.05)
    assert a["lm_head.weight"].std().item() == pytest.approx(std, rel=0.05)


def _logit_change_after_training(width: int, mup: bool, steps: int = 10, lr: float = 1e-2) -> float:
    from llm360.config import TrainConfig
    from llm360.train.optim import build_optimizer, set_lr

    cfg = tiny(vocab_size=256, hidden_size=width, intermediate_size=2 * width, num_layers=2, num_heads=2,
               mup=MupConfig(base_width=32, embedding_multiplier=1.0) if mup else None)  # fmt: skip
    model = model_of(cfg).train()
    opt = build_optimizer(model, TrainConfig(lr=lr, weight_decay=0.0))
    x = ids(b=8, t=33, seed=7) % 256
    with torch.no_grad():
        before = model(x[:, :-1])
    for _ in range(steps):
        set_lr(opt, lr)
        model(x[:, :-1], x[:, 1:])[1].backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        return (model(x[:, :-1]) - before).abs().mean().item()


def test_mup_keeps_the_update_size_as_width_grows():
    """muP's coordinate check: at one learning rate, how much training moves the logits does not grow
    with width under muP (multipliers, init and per-layer learning rates), and does under the standard
    parametrization. Measured: muP 0.51 -> 0.38 from width 32 to 256, standard 0.53 -> 2.5."""
    mup = _logit_change_after_training(256, True) / _logit_change_after_training(32, True)
    standard = _logit_change_after_training(256, False) / _logit_change_after_training(32, False)
    assert mup < 1.5 and standard > 3.0, (mup, standard)


def test_crystalcoder_options_forward_backward():
    cfg = tiny(
        hidden_size=64, norm="layernorm", norm_eps=1e-5, rope_fraction=0.25, mup=MupConfig(base_width=16)
    )
    model = model_of(cfg).train()
    _, loss = model(ids(), ids(seed=5))
    loss.backward()
    assert torch.isfinite(loss)
    names = {n for n, _ in model.named_parameters()}
    assert "model.layers.0.input_layernorm.bias" in names and "model.norm.bias" in names
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


def test_mup_changes_logits_the_documented_way():
    """muP == the standard model with embed x m_emb, lm_head x m_out*base/D and q_proj x 1/sqrt(E)."""
    mup = MupConfig(base_width=8, embedding_multiplier=3.0, output_multiplier=1.5)
    cfg_mup = tiny(mup=mup)
    cfg_std = tiny()
    model = model_of(cfg_mup)
    folded = {}
    for name, t in model.state_dict().items():
        if name == "model.embed_tokens.weight":
            t = t * 3.0
        elif name == "lm_head.weight":
            t = t * 1.5 * 8 / 32
        elif name.endswith("q_proj.weight"):
            t = t / math.sqrt(32 // 4)
        folded[name] = t
    std = Llama(cfg_std).eval()
    std.load_state_dict(folded)
    x = ids()
    with torch.no_grad():
        a, b = model(x), std(x)
        assert (a - b).abs().max().item() <= 1e-5
        assert (a - model_of(cfg_std)(x)).abs().max().item() > 1e-2  # muP does change the logits
    # No blocks: the logits are the standard model's (embedding x m_emb) times m_out * base / D.
    cfg0_mup, cfg0 = tiny(num_layers=0, mup=mup), tiny(num_layers=0)
    m0 = model_of(cfg0_mup)
    s0 = Llama(cfg0).eval()
    sd0 = m0.state_dict()
    s0.load_state_dict({**sd0, "model.embed_tokens.weight": sd0["model.embed_tokens.weight"] * 3.0})
    with torch.no_grad():
        torch.testing.assert_close(m0(x), s0(x) * (1.5 * 8 / 32), atol=1e-5, rtol=1e-4)


def test_resolve_model_config():
    cfg = resolve_model_config(ModelConfig(), vocab_size=4096, seq_len=128)
    assert (cfg.vocab_size, cfg.max_seq_len) == (4096, 128)
    padded = resolve_model_config(ModelConfig(vocab_size=32032), vocab_size=32000, seq_len=128)
    assert padded.vocab_size == 32032
    with pytest.raises(ConfigError, match="vocab_size"):
        resolve_model_config(ModelConfig(vocab_size=100), vocab_size=4096, seq_len=128)
    with pytest.raises(ConfigError, match="max_seq_len"):
        resolve_model_config(ModelConfig(max_seq_len=64), vocab_size=4096, seq_len=128)
    with pytest.raises(ConfigError, match="rope_fraction"):
        resolve_model_config(ModelConfig(rope_fraction=0.3), vocab_size=4096, seq_len=128)
    with pytest.raises(ConfigError, match="resolve"):
        Llama(ModelConfig())


def test_bf16_autocast_training_step():
    cfg = tiny(num_kv_heads=2)
    model = model_of(cfg).train()
    x, y = ids(), ids(seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(x, y)
        logits = model(x)
    loss.backward()
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert model.lm_head.weight.grad.dtype == torch.float32
    ref = F.cross_entropy(logits.float().view(-1, V), y.view(-1))
    assert abs(loss.item() - ref.item()) < 0.05
