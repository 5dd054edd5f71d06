"""LLaMA in one readable file (nanoGPT style), with CrystalCoder's options.

Parameter names are those of transformers' ``LlamaForCausalLM``, so ``Llama.state_dict()`` *is* a
Hugging Face state dict (``model.embed_tokens.weight``, ``model.layers.0.self_attn.q_proj.weight``,
..., ``lm_head.weight``). No parallelism, checkpointing or logging lives here: those are applied
from outside.

CrystalCoder options (from :class:`~llm360.config.ModelConfig`):

* ``norm: layernorm`` -- LayerNorm (weight and bias) instead of RMSNorm everywhere.
* ``rope_fraction`` -- rotary embeddings on the first ``rope_fraction`` of each head's dims
  (GPT-NeoX / StableLM layout); the remaining dims pass through unrotated.
* ``mup`` -- muP as Cerebras implements it (CrystalCoder was trained with it), with the width
  multiplier ``m = hidden_size / base_width``: the embedding output is multiplied by
  ``embedding_multiplier``, the logits by ``output_multiplier / m``, attention scores are scaled by
  ``1 / head_dim`` instead of ``1 / sqrt(head_dim)``, the blocks' matrices are initialised with
  ``init_std / sqrt(m)`` (embedding and output head with ``init_std``), and they train with the
  learning rate divided by ``m`` (:func:`lr_multiplier`, applied by the optimizer).

Speed, without parallelism code: q/k/v and gate/up each run as one matmul (weights concatenated on
the fly), the rotary embedding is one autograd node, and the training loss never materialises the
N x V logits (chunked fused cross-entropy). All of it traces into one graph under torch.compile.

Shape suffixes on tensors that get reshaped:

    B batch           T query positions    S key/value positions (T plus cached ones)
    D hidden_size     H attention heads    K key/value heads (K < H: grouped-query attention)
    E head dim (D/H)  R rotary dims/head   F MLP inner width    V vocab    N tokens (B*T)
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from llm360.config import ModelConfig
from llm360.errors import ConfigError

Reduction = Literal["mean", "sum", "none"]
IGNORE_INDEX = -100
"""Targets equal to this are not scored (the PyTorch / Hugging Face convention)."""


# ----------------------------------------------------------------------------------- config


def resolve_model_config(cfg: ModelConfig, vocab_size: int, seq_len: int) -> ModelConfig:
    """A copy of cfg with ``vocab_size`` and ``max_seq_len`` filled from the data when null.

    Raises ConfigError when an explicit value cannot serve the data: a vocabulary smaller than
    the tokenizer's, a ``max_seq_len`` shorter than the training sequences, or a ``rope_fraction``
    that does not give an even whole number of rotary dims per head.
    """
    vocab = cfg.vocab_size if cfg.vocab_size is not None else vocab_size
    if vocab < vocab_size:
        raise ConfigError(
            f"model.vocab_size = {vocab} is smaller than the tokenizer's vocabulary ({vocab_size}); "
            "set it to null (take the tokenizer's) or to a larger, padded size"
        )
    max_len = cfg.max_seq_len if cfg.max_seq_len is not None else seq_len
    if max_len < seq_len:
        raise ConfigError(
            f"model.max_seq_len = {max_len} is shorter than data.seq_len = {seq_len}; "
            "set it to null or to at least the sequence length"
        )
    out = cfg.model_copy(update={"vocab_size": vocab, "max_seq_len": max_len})
    rotary_dims(out)
    return out


def rotary_dims(cfg: ModelConfig) -> int:
    """R, the rotated dims per head: head_dim * rope_fraction, which must be a positive even integer."""
    head_dim = cfg.hidden_size // cfg.num_heads
    r = head_dim * cfg.rope_fraction
    if r != int(r) or int(r) % 2 or r < 2:
        raise ConfigError(
            f"model.rope_fraction = {cfg.rope_fraction} gives {r} rotary dims of head_dim {head_dim}; "
            "it must be a positive even integer"
        )
    return int(r)


def num_parameters(cfg: ModelConfig, exclude_embedding: bool = False) -> int:
    """Parameter count of the model cfg describes (vocab_size must be set).

    With exclude_embedding, the input embedding table is left out; with tied embeddings that
    table is also the output head, which does matmul work, so it is then kept.
    """
    if cfg.vocab_size is None:
        raise ConfigError("model.vocab_size is null; resolve the config first (resolve_model_config)")
    d, v = cfg.hidden_size, cfg.vocab_size
    e = d // cfg.num_heads
    kv = cfg.num_kv_heads or cfg.num_heads
    norm = 2 * d if cfg.norm == "layernorm" else d
    attn = d * cfg.num_heads * e + 2 * d * kv * e + cfg.num_heads * e * d
    layer = attn + 3 * d * cfg.intermediate_size + 2 * norm
    total = v * d + cfg.num_layers * layer + norm + (0 if cfg.tie_embeddings else v * d)
    if exclude_embedding and not cfg.tie_embeddings:
        total -= v * d
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward): 6*N + 12*L*D*T, N without the input embedding.

    The PaLM appendix-B estimate: 6N for the weight matmuls, 12*L*D*T for attention scores and
    values at sequence length T (causal masking not discounted, as usual for MFU).
    """
    n = num_parameters(cfg, exclude_embedding=True)
    return 6 * n + 12 * cfg.num_layers * cfg.hidden_size * seq_len


# ----------------------------------------------------------------------------------- blocks


class RMSNorm(nn.Module):
    """Root-mean-square norm (LLaMA): normalised in fp32, cast back, then scaled (as HF does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "layernorm":
        return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
    return RMSNorm(cfg.hidden_size, cfg.norm_eps)


def rope_cos_sin(cfg: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * inverse frequency, each ``positions.shape + (R/2,)``, in fp32.

    ``positions`` is (T,) when every row is at the same positions, (B, T) when each has its own.

    The inverse-frequency table and the angles are computed here, in fp32, on every call rather
    than kept as a buffer: ``model.to(torch.bfloat16)`` would round a buffer to 8 mantissa bits,
    and position * inv_freq at position 2000 would then be off by whole radians. The table is
    tiny (R/2 numbers), so recomputing it costs nothing.
    """
    r = rotary_dims(cfg)
    inv_freq_R2 = 1.0 / (
        cfg.rope_theta ** (torch.arange(0, r, 2, device=positions.device, dtype=torch.float32) / r)
    )
    angles = positions.float()[..., None] * inv_freq_R2
    return angles.cos(), angles.sin()


def _rotate(x_BTHE: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (x1*cos - x2*sin, x2*cos + x1*sin) on dims [0, R), dims [R, E) copied."""
    half = cos.shape[-1]
    x1, x2, x_pass = x_BTHE[..., :half], x_BTHE[..., half : 2 * half], x_BTHE[..., 2 * half :]
    o1 = torch.addcmul(x1 * cos, x2, sin, value=-1.0)
    o2 = torch.addcmul(x2 * cos, x1, sin)
    return torch.cat((o1, o2, x_pass), dim=-1)


class _Rope(torch.autograd.Function):
    """Rotary embedding as one autograd node: a rotation's gradient is the rotation by -angle.

    Autograd through the plain formula would save x, and its backward would run through a
    dozen slice/mul/cat nodes; this saves nothing but cos and sin and costs one pass each way.
    """

    @staticmethod
    def forward(ctx, x_BTHE, cos_T1R2, sin_T1R2):  # type: ignore[override]
        ctx.save_for_backward(cos_T1R2, sin_T1R2)
        return _rotate(x_BTHE, cos_T1R2, sin_T1R2)

    @staticmethod
    def backward(ctx, grad_BTHE):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        return _rotate(grad_BTHE, cos, -sin), None, None


def apply_rope(x_BTHE: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first R dims of each head by position (half-split pairing, as in HF Llama).

    cos and sin are (T, R/2) or (B, T, R/2) (:func:`rope_cos_sin`). Dims i and i + R/2 form a
    pair; dims R..E pass through (partial rotary, rope_fraction < 1).
    """
    cos, sin = cos[..., None, :].to(x_BTHE.dtype), sin[..., None, :].to(x_BTHE.dtype)  # over heads
    return _Rope.apply(x_BTHE, cos, sin)


FUSE_MIN_TOKENS = 256
"""Without autograd, q/k/v and gate/up run as one matmul only from this many tokens on.

Concatenating the weights copies them, which costs about as much as a matmul over a few dozen
tokens; the larger matmul gains a few percent. Measured on CPU (125M model): decoding 16 rows at
a time runs ~20% faster apart, scoring 256 x 32-token rows ~5% faster fused.
"""


def _fuse(x_BTD: torch.Tensor) -> bool:
    return torch.is_grad_enabled() or x_BTD.numel() >= FUSE_MIN_TOKENS * x_BTD.shape[-1]


class KVCache:
    """Keys and values of the positions seen so far, one preallocated (B, K, S, E) buffer per layer.

    Batch-wide (``positions_B`` None): the T new tokens of every row go at ``length ..
    length + T - 1``, causally (a prefill, :meth:`Llama.generate_greedy`). Ragged (:meth:`ragged`,
    one token per row): row b's token goes at ``positions_B[b]`` and sees ``0 .. positions_B[b]``
    only, in the first B rows of the buffers; what lies beyond is stale (padding, an abandoned
    continuation).
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype):
        kv, e = cfg.num_kv_heads or cfg.num_heads, cfg.hidden_size // cfg.num_heads
        shape = (batch, kv, max_len, e)
        self.k_BKSE = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v_BKSE = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.length = 0
        """Positions already stored (the position of the next token), batch-wide."""
        self.positions_B: torch.Tensor | None = None
        """Ragged: the position of each row's next token."""

    @classmethod
    def ragged(cls, k_BKSE: list[torch.Tensor], v_BKSE: list[torch.Tensor], positions_B: torch.Tensor) -> KVCache:
        """A ragged cache over existing per-layer buffers (written in place), row b at ``positions_B[b]``."""
        cache = cls.__new__(cls)  # over the given buffers: nothing to allocate
        cache.k_BKSE, cache.v_BKSE = list(k_BKSE), list(v_BKSE)
        cache.length, cache.positions_B = 0, positions_B
        return cache

    def positions(self, T: int, device: torch.device) -> torch.Tensor:
        """Positions of the next T tokens: (T,) batch-wide, (B, 1) ragged."""
        if self.positions_B is None:
            return torch.arange(self.length, self.length + T, device=device)
        if T != 1:
            raise ValueError(f"a ragged KV cache takes one token per row, got {T}")
        return self.positions_B[:, None]

    def advance(self, T: int) -> None:
        """Move past the T tokens just stored (once per forward, after every layer)."""
        if self.positions_B is None:
            self.length += T
        else:  # not in place: the caller's tensor
            self.positions_B = self.positions_B + T

    def update(
        self, layer: int, k_BKTE: torch.Tensor, v_BKTE: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        """Store a layer's new keys and values; return (keys, values, mask, is_causal) to attend with.

        The mask is boolean (True: attend), over heads; None where is_causal or all is visible.
        """
        B, T, dev = k_BKTE.shape[0], k_BKTE.shape[2], k_BKTE.device
        k_buf, v_buf = self.k_BKSE[layer], self.v_BKSE[layer]
        if self.positions_B is not None:
            rows_B = torch.arange(B, device=dev)
            k_buf[rows_B, :, self.positions_B] = k_BKTE[:, :, 0]
            v_buf[rows_B, :, self.positions_B] = v_BKTE[:, :, 0]
            mask_BS = torch.arange(k_buf.shape[2], device=dev) <= self.positions_B[:, None]
            return k_buf[:B], v_buf[:B], mask_BS[:, None, None, :], False
        start = self.length
        k_buf[:, :, start : start + T], v_buf[:, :, start : start + T] = k_BKTE, v_BKTE
        k_BKSE, v_BKSE = k_buf[:, :, : start + T], v_buf[:, :, : start + T]
        if start == 0 or T == 1:
            return k_BKSE, v_BKSE, None, start == 0
        # queries at start..start+T-1 see keys 0..their own position
        return k_BKSE, v_BKSE, torch.ones(T, start + T, dtype=torch.bool, device=dev).tril(start), False


def _attend_one_query(
    q_BH1E: torch.Tensor, k_BKSE: torch.Tensor, v_BKSE: torch.Tensor, mask_B11S: torch.Tensor, scale: float
) -> torch.Tensor:
    """Masked attention of one query per row, (B, H, 1, E): plain matmuls, ~3x CPU SDPA's speed here."""
    B, H, _, E = q_BH1E.shape
    K = k_BKSE.shape[1]
    q_BKGE = q_BH1E.reshape(B, K, H // K, E)  # G = H / K query heads share a key/value head
    s_BKGS = (q_BKGE @ k_BKSE.transpose(2, 3)) * scale
    p_BKGS = torch.softmax(s_BKGS.masked_fill(~mask_B11S, -math.inf), dim=-1)
    return (p_BKGS.to(q_BKGE.dtype) @ v_BKSE).reshape(B, H, 1, E)


class Attention(nn.Module):
    """Causal self-attention with rotary embeddings and optional grouped-query attention."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv = cfg.num_heads, cfg.num_kv_heads or cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        # muP: 1/E keeps attention logits O(1) as width grows (q and k become correlated in training).
        self.scale = 1.0 / self.head_dim if cfg.mup is not None else 1.0 / math.sqrt(self.head_dim)
        d, e = cfg.hidden_size, self.head_dim
        self.q_proj = nn.Linear(d, self.n_head * e, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * e, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * e, bias=False)
        self.o_proj = nn.Linear(self.n_head * e, d, bias=False)
        # False under tensor parallelism (llm360.train.tensor_parallel): the three weights are then
        # shards of three tensors, and this rank's n_head / n_kv its own heads only.
        self.fuse_qkv = True

    def forward(
        self, x_BTD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache | None = None
    ) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        H, K, E = self.n_head, self.n_kv, self.head_dim
        # One matmul for q, k and v (weights concatenated on the fly, parameters keep HF's names):
        # one large matmul runs faster than three small ones, and backward needs no sum of three.
        # For a few tokens without autograd (decoding) the copy of the weights costs more than it
        # saves, so the three run apart.
        if self.fuse_qkv and _fuse(x_BTD):
            w_XD = torch.cat((self.q_proj.weight, self.k_proj.weight, self.v_proj.weight))
            qkv_BTX = F.linear(x_BTD, w_XD)
        else:
            qkv_BTX = torch.cat((self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)), dim=-1)
        qk_BTXE = apply_rope(qkv_BTX[..., : (H + K) * E].view(B, T, H + K, E), *rope)
        q_BTHE, k_BTKE = qk_BTXE.split((H, K), dim=2)
        v_BTKE = qkv_BTX[..., (H + K) * E :].view(B, T, K, E)
        q_BHTE, k_BKSE, v_BKSE = q_BTHE.transpose(1, 2), k_BTKE.transpose(1, 2), v_BTKE.transpose(1, 2)
        mask, causal = None, True
        if cache is not None:
            k_BKSE, v_BKSE, mask, causal = cache.update(self.layer_idx, k_BKSE, v_BKSE)
        if cache is not None and cache.positions_B is not None and x_BTD.device.type == "cpu":
            y_BHTE = _attend_one_query(q_BHTE, k_BKSE, v_BKSE, mask, self.scale)
        else:
            y_BHTE = F.scaled_dot_product_attention(
                q_BHTE, k_BKSE, v_BKSE, attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=K != H
            )
        return self.o_proj(y_BHTE.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.fuse_gate_up = True  # False under tensor parallelism, as Attention.fuse_qkv

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        if self.fuse_gate_up and _fuse(x_BTD):  # one matmul, as for q, k, v in Attention.forward
            w_2FD = torch.cat((self.gate_proj.weight, self.up_proj.weight))
            gate_BTF, up_BTF = F.linear(x_BTD, w_2FD).chunk(2, dim=-1)
        else:
            gate_BTF, up_BTF = self.gate_proj(x_BTD), self.up_proj(x_BTD)
        return self.down_proj(F.silu(gate_BTF) * up_BTF)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(
        self, x_BTD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache | None = None
    ) -> torch.Tensor:
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), rope, cache)
        return x_BTD + self.mlp(self.post_attention_layernorm(x_BTD))


class Decoder(nn.Module):
    """Embedding, blocks and final norm: HF's ``LlamaModel`` (the ``model.`` prefix)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = make_norm(cfg)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (times muP's embedding multiplier)."""
        x = self.embed_tokens(ids)
        return x * self.cfg.mup.embedding_multiplier if self.cfg.mup is not None else x

    def forward(self, input_ids_BT: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final hidden states (B, T, D); with a cache, the tokens continue (and are stored in) it."""
        x_BTD = self.embed(input_ids_BT)
        T, device = input_ids_BT.shape[1], input_ids_BT.device
        positions = cache.positions(T, device) if cache is not None else torch.arange(T, device=device)
        rope = rope_cos_sin(self.cfg, positions)
        for block in self.layers:
            x_BTD = block(x_BTD, rope, cache)
        if cache is not None:
            cache.advance(T)
        return self.norm(x_BTD)


# ------------------------------------------------------------------------------------ loss


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of (h @ W^T) against targets, never holding all N x V logits.

    The forward walks over row chunks: logits of a chunk, their logsumexp in fp32, and at once the
    chunk's gradients (softmax - onehot) @ W and its share of W's gradient. Backward only scales
    those by the incoming gradient. This saves the N x V logits, their gradient and several passes
    over them -- the largest tensors of a small-model training step.
    """

    @staticmethod
    def forward(ctx, h_ND, w_VD, targets_N, chunk: int, want_grad: bool):  # type: ignore[override]
        if torch.is_autocast_enabled(h_ND.device.type):
            dtype = torch.get_autocast_dtype(h_ND.device.type)
        else:
            dtype = h_ND.dtype
        h, w = h_ND.to(dtype), w_VD.to(dtype)
        grad_h_ND = torch.empty_like(h_ND) if want_grad and ctx.needs_input_grad[0] else None
        need_w = want_grad and ctx.needs_input_grad[1]
        grad_w_VD: torch.Tensor | None = None  # summed over chunks in fp32
        loss = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        for i in range(0, h.shape[0], chunk):
            h_cD, t_c = h[i : i + chunk], targets_N[i : i + chunk]
            valid_c1 = (t_c != IGNORE_INDEX).unsqueeze(1)
            t_c1 = t_c.clamp(min=0).unsqueeze(1)
            logp_cV = torch.log_softmax((h_cD @ w.T).float(), dim=-1)
            loss -= (logp_cV.gather(1, t_c1) * valid_c1).sum()
            if grad_h_ND is None and not need_w:
                continue
            # d(sum loss)/d(logits) = softmax - onehot (in place, over logp's buffer); ignored rows
            # are zeroed on the narrow (c x D) side of the matmuls, not on the wide c x V one.
            g_cV = logp_cV.exp_().scatter_add_(1, t_c1, torch.full(t_c1.shape, -1.0, device=h.device))
            g_cV = g_cV.to(dtype)
            if grad_h_ND is not None:
                grad_h_ND[i : i + chunk] = (g_cV @ w) * valid_c1
            if need_w:
                part_VD = g_cV.T @ (h_cD * valid_c1)
                grad_w_VD = part_VD.float() if grad_w_VD is None else grad_w_VD.add_(part_VD)
        ctx.save_for_backward(grad_h_ND, grad_w_VD.to(w_VD.dtype) if grad_w_VD is not None else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        grad_h_ND, grad_w_VD = ctx.saved_tensors
        grad_h = grad_h_ND * grad_loss if grad_h_ND is not None else None
        grad_w = grad_w_VD * grad_loss if grad_w_VD is not None else None
        return grad_h, grad_w, None, None, None


def linear_cross_entropy(
    h_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor, chunk_rows: int | None = None
) -> torch.Tensor:
    """Summed fp32 cross-entropy of logits h @ W^T, computed chunk by chunk (see _LinearCrossEntropy).

    By default a chunk's fp32 logits take ~8 MB on CPU (they stay in cache between the matmul,
    the softmax and the gradient matmuls) and ~128 MB on GPUs (few, large matmuls).
    """
    if chunk_rows is None:
        chunk_rows = max(1, (2**21 if h_ND.device.type == "cpu" else 2**25) // w_VD.shape[0])
    want_grad = torch.is_grad_enabled() and (h_ND.requires_grad or w_VD.requires_grad)
    return _LinearCrossEntropy.apply(h_ND, w_VD, targets_N, chunk_rows, want_grad)


# ----------------------------------------------------------------------------------- model


def width_multiplier(cfg: ModelConfig) -> float:
    """muP's width multiplier ``hidden_size / base_width`` (1.0 without muP)."""
    return cfg.hidden_size / cfg.mup.base_width if cfg.mup is not None else 1.0


def is_block_matrix(name: str, p: torch.Tensor) -> bool:
    """A matrix inside a transformer block (attention and MLP projections): muP's hidden weights."""
    return p.ndim >= 2 and name.startswith("model.layers.")


def lr_multiplier(cfg: ModelConfig, name: str, p: torch.Tensor) -> float:
    """Factor on the learning rate of parameter ``name``: 1 / width multiplier for the blocks'
    matrices under muP (Adam's update size then stays the same per coordinate as width grows), else 1."""
    return 1.0 / width_multiplier(cfg) if cfg.mup is not None and is_block_matrix(name, p) else 1.0


class Llama(nn.Module):
    """LLaMA decoder-only language model; ``state_dict()`` equals Hugging Face's LlamaForCausalLM's.

    Built from a ModelConfig whose vocab_size is set (see :func:`resolve_model_config`). Weights
    are initialised by :meth:`init_weights`, deterministic under ``torch.manual_seed``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ConfigError("model.vocab_size is null; resolve the config first (resolve_model_config)")
        rotary_dims(cfg)
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # muP: the head's output shrinks with width so logits stay O(1) (applied to its input: same product).
        self.logit_scale = (
            cfg.mup.output_multiplier * cfg.mup.base_width / cfg.hidden_size if cfg.mup else 1.0
        )
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) for every matrix; o_proj and down_proj get init_std / sqrt(2 * num_layers).

        Each block adds two residual branches (attention, MLP) ending in o_proj / down_proj; shrinking
        those keeps the residual stream's variance from growing with depth (GPT-2's scheme). Under
        muP the blocks' matrices are further divided by sqrt(hidden_size / base_width).
        Norm weights are ones, LayerNorm biases zeros. Call again after ``to_empty()`` from meta.
        """
        std = self.cfg.init_std
        block_std = std / math.sqrt(width_multiplier(self.cfg))
        residual_std = block_std / math.sqrt(2 * max(1, self.cfg.num_layers))
        for name, p in self.named_parameters():
            if "layernorm" in name or name.startswith("model.norm"):
                nn.init.zeros_(p) if name.endswith(".bias") else nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=residual_std)
            elif is_block_matrix(name, p):
                nn.init.normal_(p, mean=0.0, std=block_std)
            else:  # embedding, output head
                nn.init.normal_(p, mean=0.0, std=std)

    def _head(self, h_BTD: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h_BTD * self.logit_scale if self.logit_scale != 1.0 else h_BTD)

    def forward(
        self,
        input_ids_BT: torch.Tensor,
        targets_BT: torch.Tensor | None = None,
        *,
        reduction: Reduction = "mean",
        return_logits: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor | None, torch.Tensor]:
        """Logits (B, T, V) without targets; with targets, ``(logits or None, loss)``.

        The loss is fp32 cross-entropy over every target that is not -100: ``mean`` over them,
        ``sum`` (for a trainer that normalises by the global token count) or ``none`` (B, T).
        For mean and sum the logits are not materialised (chunked fused loss) and None is returned
        in their place unless ``return_logits=True``. Logits come in the compute dtype (bf16 under
        autocast); call ``.float()`` where precision matters.
        """
        h_BTD = self.model(input_ids_BT)
        if targets_BT is None:
            return self._head(h_BTD)
        B, T, D = h_BTD.shape
        if return_logits or reduction == "none":
            logits_BTV = self._head(h_BTD)
            loss = F.cross_entropy(
                logits_BTV.float().view(B * T, -1), targets_BT.reshape(B * T),
                ignore_index=IGNORE_INDEX, reduction=reduction,
            )  # fmt: skip
            return (logits_BTV if return_logits else None), (loss.view(B, T) if reduction == "none" else loss)
        h_ND = h_BTD.reshape(B * T, D)
        if self.logit_scale != 1.0:
            h_ND = h_ND * self.logit_scale
        targets_N = targets_BT.reshape(B * T)
        loss = linear_cross_entropy(h_ND, self.lm_head.weight, targets_N)
        if reduction == "mean":
            loss = loss / (targets_N != IGNORE_INDEX).sum().clamp(min=1)
        return None, loss

    @torch.no_grad()
    def generate_greedy(self, prompt_ids_BT: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation with a KV cache: (B, T + max_new_tokens) ids, the prompt included.

        All prompts in the batch have the same length T (no padding); no early stop at EOS, so
        every row gets exactly max_new_tokens new ids. Runs in eval mode, restores the mode after.
        """
        was_training = self.training
        self.eval()
        B, T = prompt_ids_BT.shape
        p = next(self.parameters())
        on = torch.is_autocast_enabled(p.device.type)
        dtype = torch.get_autocast_dtype(p.device.type) if on else p.dtype
        cache = KVCache(self.cfg, B, T + max_new_tokens, p.device, dtype)
        ids_BT, next_B1 = prompt_ids_BT, prompt_ids_BT
        for _ in range(max_new_tokens):
            logits_BV = self._head(self.model(next_B1, cache)[:, -1])
            next_B1 = logits_BV.argmax(dim=-1, keepdim=True)
            ids_BT = torch.cat((ids_BT, next_B1), dim=1)
        self.train(was_training)
        return ids_BT


# ------------------------------------------------------------------------ ragged decoding


def decode_step(
    model: Llama, tok_n: torch.Tensor, pos_n: torch.Tensor, k_cache: list[torch.Tensor], v_cache: list[torch.Tensor]
) -> torch.Tensor:
    """One greedy step for n rows, each at its own position: logits (n, V).

    Row r feeds token ``tok_n[r]`` at position ``pos_n[r]``, writes its key and value there and
    attends to cache positions ``0..pos_n[r]`` only (:meth:`KVCache.ragged`). The cache tensors
    are (n_total, K, S, E) per layer, e.g. a :class:`KVCache`'s ``k_BKSE`` / ``v_BKSE``; rows
    0..n-1 are used. Prompts of different lengths so share a batch without a padding mask
    (memorization scoring, the lm-eval adapter).
    """
    h_n1D = model.model(tok_n[:, None], KVCache.ragged(k_cache, v_cache, pos_n))
    return model._head(h_n1D)[:, 0]
