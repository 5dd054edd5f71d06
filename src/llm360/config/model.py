"""The `model` section: the LLaMA-style architecture, muP, and a one-line description of its
parametrization for the model card and report."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, model_validator

from llm360.config.base import Section


class MupConfig(Section):
    """muP (Cerebras' form, as CrystalCoder): with m = hidden_size / base_width, the blocks' matrices are
    initialised with init_std / sqrt(m) and train at lr / m; embedding and output head keep init_std and lr."""

    base_width: int = Field(256, ge=1)
    """Width at which the muP multipliers equal 1 (the proxy model's hidden size, whose tuned lr and init_std transfer)."""
    embedding_multiplier: float = Field(10.0, gt=0.0)
    """Scale applied to the token embeddings' output."""
    output_multiplier: float = Field(1.0, gt=0.0)
    """Logits are multiplied by output_multiplier * base_width / hidden_size."""


def parametrization_text(model: Mapping[str, Any]) -> str:
    """One line saying how a model config (a dict, as read from a file) is parametrized: standard or muP
    with its multipliers, width multiplier and what follows from it (for the model card and report)."""
    mup, std = model.get("mup"), model.get("init_std")
    if not isinstance(mup, Mapping):
        return "standard" + (f" (init std {std})" if std is not None else "")
    std = "init_std" if std is None else std
    try:
        m = f"{float(model['hidden_size']) / float(mup['base_width']):g}"
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        m = "m"
    return (f"muP: base width {mup.get('base_width')} (width multiplier {m}), embedding x "
            f"{mup.get('embedding_multiplier')}, logits x {mup.get('output_multiplier')}/{m}, attention 1/d; "
            f"blocks' matrices: init std {std}/√{m}, lr / {m}")


class ModelConfig(Section):
    name: str = "tiny"
    """Preset this architecture came from (informational once resolved)."""
    vocab_size: int | None = Field(None, ge=1, le=2**32)
    """Vocabulary size; null takes it from the prepared data's tokenizer."""
    hidden_size: int = Field(128, ge=1)
    """Model width d."""
    intermediate_size: int = Field(384, ge=1)
    """SwiGLU MLP inner width."""
    num_layers: int = Field(2, ge=0)
    """Number of transformer blocks (0: embedding and output head only)."""
    num_heads: int = Field(4, ge=1)
    """Attention heads."""
    num_kv_heads: int | None = Field(None, ge=1)
    """Key/value heads for grouped-query attention; null means num_heads."""
    max_seq_len: int | None = Field(None, ge=1)
    """Longest sequence the model is built for; null takes data.seq_len."""
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    """Normalization layer (CrystalCoder uses layernorm)."""
    norm_eps: float = Field(1e-6, gt=0.0)
    """Epsilon of the normalization layers."""
    rope_theta: float = Field(10000.0, gt=1.0)
    """RoPE base (above 1: the rotary frequencies fall along a head's dims)."""
    rope_fraction: float = Field(1.0, gt=0.0, le=1.0)
    """Fraction of each head's dims that get rotary embeddings (CrystalCoder: 0.25)."""
    mup: MupConfig | None = None
    """muP (CrystalCoder): multipliers, width-scaled init and per-layer learning rates; null for standard parametrization."""
    init_std: float = Field(0.02, ge=0.0)
    """Standard deviation of the normal weight init."""
    tie_embeddings: bool = False
    """Share the input embedding and output head (LLaMA/Amber: untied)."""

    def rotary_dims_per_head(self) -> float:
        """head_dim * rope_fraction: the rotated dims of each head (a usable model needs a positive even integer)."""
        return self.hidden_size // self.num_heads * self.rope_fraction

    @model_validator(mode="after")
    def _check_heads(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {kv}")
        return self
