"""Conversion between llm360 models and Hugging Face model folders.

:class:`~llm360.model.llama.Llama` already uses transformers' parameter names, so a state dict
needs no renaming: conversion is writing (and reading) ``config.json`` and safetensors files.

What transformers can express:

* ``LlamaForCausalLM``: RMSNorm, full rotary, GQA, tied or untied head -- Amber exactly.
* ``StableLmForCausalLM``: the same blocks and parameter names with LayerNorm (weight and bias)
  and rotary on a fraction of each head (``partial_rotary_factor``) -- CrystalCoder's layout.
  ``architecture="auto"`` picks it for ``norm: layernorm``. It has no RMSNorm.
* muP has no config field anywhere, but all three multipliers are linear and fold into weights
  (embedding table x embedding_multiplier, lm_head x output_multiplier*base_width/hidden_size,
  q_proj x 1/sqrt(head_dim) so that q.k/sqrt(head_dim) = q.k/head_dim): the folded folder gives
  the same logits. With tied embeddings the two multipliers would have to share one matrix, so
  muP then cannot be expressed.
* Partial rotary with RMSNorm has no transformers architecture.

What cannot be expressed makes :func:`hf_config_dict` raise (``strict=True``) or log a warning;
the folder is still written, and ``llm360_model.json`` beside ``config.json`` keeps the exact
llm360 ModelConfig so :func:`load_hf_folder` restores it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ValidationError
from torch import nn

from llm360.config import MODEL_PRESETS, ModelConfig
from llm360.errors import CheckpointError, ConfigError
from llm360.rundir.atomic import atomic_path, atomic_write_bytes
from llm360.rundir.layout import HF_CONFIG, MODEL_FILE, MODEL_INDEX, MODEL_META

log = logging.getLogger(__name__)

Architecture = Literal["auto", "llama", "stablelm"]
CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE, LLM360_FILE = HF_CONFIG, MODEL_FILE, MODEL_INDEX, MODEL_META
"""Our exact ModelConfig (and whether muP was folded), written beside config.json."""
_HF_CLASS = {"llama": "LlamaForCausalLM", "stablelm": "StableLmForCausalLM"}


def _pick_architecture(cfg: ModelConfig, architecture: Architecture) -> Literal["llama", "stablelm"]:
    if architecture == "auto":
        return "stablelm" if cfg.norm == "layernorm" else "llama"
    return architecture


def unexpressible(
    cfg: ModelConfig, architecture: Architecture = "auto", mup_folded: bool = False
) -> list[str]:
    """The options of cfg that the transformers architecture cannot express (empty: exact)."""
    arch = _pick_architecture(cfg, architecture)
    problems = []
    if arch == "llama" and cfg.norm == "layernorm":
        problems.append("norm=layernorm: LlamaForCausalLM has only RMSNorm (use architecture='stablelm')")
    if arch == "llama" and cfg.rope_fraction != 1.0:
        problems.append(
            f"rope_fraction={cfg.rope_fraction}: LlamaForCausalLM rotates every head dim"
            " (its config ignores partial_rotary_factor)"
        )
    if arch == "stablelm" and cfg.norm == "rmsnorm":
        problems.append("norm=rmsnorm: StableLmForCausalLM has only LayerNorm")
    if cfg.mup is not None and not mup_folded:
        if cfg.tie_embeddings:
            problems.append(
                "mup with tie_embeddings: the multipliers cannot be folded into one shared matrix"
            )
        else:
            problems.append("mup: no transformers config field; fold the multipliers into the weights")
    return problems


def hf_config_dict(
    cfg: ModelConfig,
    *,
    eos_token_id: int | None = None,
    bos_token_id: int | None = None,
    architecture: Architecture = "auto",
    mup_folded: bool = False,
    strict: bool = False,
) -> dict[str, Any]:
    """The ``config.json`` dict of cfg for transformers (LlamaConfig, or StableLmConfig, see above).

    ``mup_folded`` says the weights this config goes with have muP folded in (see
    :func:`fold_mup`). Options transformers cannot express raise ConfigError if strict, else
    are logged as a warning (the default): the folder then loads in transformers but gives
    different logits from ours.
    """
    if cfg.vocab_size is None or cfg.max_seq_len is None:
        raise ConfigError("model.vocab_size / max_seq_len are null; resolve the config first")
    arch = _pick_architecture(cfg, architecture)
    problems = unexpressible(cfg, arch, mup_folded)
    if problems:
        msg = f"transformers' {_HF_CLASS[arch]} cannot express: " + "; ".join(problems)
        if strict:
            raise ConfigError(msg + " (pass strict=False to export anyway, with different logits)")
        log.warning("%s -- the exported folder loads in transformers but its logits differ from ours", msg)
    out: dict[str, Any] = {
        "architectures": [_HF_CLASS[arch]],
        "model_type": arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads or cfg.num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    if arch == "llama":
        out.update(rms_norm_eps=cfg.norm_eps, attention_bias=False, mlp_bias=False, pretraining_tp=1)
        out["head_dim"] = cfg.hidden_size // cfg.num_heads
    else:
        out.update(
            layer_norm_eps=cfg.norm_eps, partial_rotary_factor=cfg.rope_fraction, use_qkv_bias=False,
            qk_layernorm=False, use_parallel_residual=False, hidden_dropout=0.0,
        )  # fmt: skip
    return out


def _mup_factors(cfg: ModelConfig) -> dict[str, float]:
    assert cfg.mup is not None
    return {
        "model.embed_tokens.weight": cfg.mup.embedding_multiplier,
        "lm_head.weight": cfg.mup.output_multiplier * cfg.mup.base_width / cfg.hidden_size,
        "q_proj.weight": 1.0 / math.sqrt(cfg.hidden_size // cfg.num_heads),
    }


def fold_mup(
    state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig, *, inverse: bool = False
) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Multiply muP's multipliers into the weights: (state dict, cfg without mup), same logits.

    ``inverse=True`` undoes it (given the cfg *with* mup), up to fp32 rounding. Raises ConfigError
    for tied embeddings, where the two multipliers would land on one matrix.
    """
    if cfg.mup is None:
        return dict(state_dict), cfg
    if cfg.tie_embeddings:
        raise ConfigError("cannot fold muP into tied embeddings (embedding and output multipliers differ)")
    factors = _mup_factors(cfg)
    out = {}
    for name, t in state_dict.items():
        key = "q_proj.weight" if name.endswith("self_attn.q_proj.weight") else name
        f = factors.get(key)
        out[name] = t if f is None else (t / f if inverse else t * f)
    return out, cfg.model_copy(update={"mup": None})


def hf_metadata_files(
    cfg: ModelConfig,
    *,
    eos_token_id: int | None,
    bos_token_id: int | None = None,
    architecture: Architecture = "auto",
    mup_folded: bool = False,
    strict: bool = False,
) -> dict[str, bytes]:
    """``config.json`` and ``llm360_model.json`` (name -> bytes) for weights stored beside them.

    For a training checkpoint that writes its own ``model.safetensors`` (unfolded weights: keep
    ``mup_folded=False``); ``llm360_model.json`` is what lets :func:`load_hf_folder` restore
    options config.json cannot hold (muP above all).
    """
    hf_cfg = hf_config_dict(
        cfg, eos_token_id=eos_token_id, bos_token_id=bos_token_id, architecture=architecture,
        mup_folded=mup_folded, strict=strict,
    )  # fmt: skip
    ours = {"model": cfg.model_dump(mode="json"), "mup_folded": mup_folded}
    return {
        CONFIG_FILE: (json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n").encode(),
        LLM360_FILE: (json.dumps(ours, indent=2, sort_keys=True) + "\n").encode(),
    }


def _plain_state_dict(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new dict of the state, without the prefixes torch.compile and DDP add to every name."""
    if isinstance(model_or_state_dict, nn.Module):
        model_or_state_dict = model_or_state_dict.state_dict()
    out = {}
    for name, t in model_or_state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            name = name.removeprefix(prefix)
        out[name] = t
    return out


def save_hf_folder(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    folder: str | Path,
    eos_token_id: int | None,
    bos_token_id: int | None = None,
    *,
    architecture: Architecture = "auto",
    fold: bool = True,
    strict: bool = False,
) -> Path:
    """Write ``config.json``, ``model.safetensors`` (fp32, contiguous) and ``llm360_model.json``.

    Takes a model or a full (unsharded) state dict. The folder loads with ``AutoModelForCausalLM.from_pretrained``. With ``fold`` (default) muP
    is folded into the weights so transformers reproduces our logits; options transformers cannot
    express are warned about (or raise ConfigError if strict) but the folder is still written.
    Each file is written atomically; the folder itself is not (write it to a temporary name).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    sd = _plain_state_dict(model_or_state_dict)
    _check_keys(sd, cfg, folder, what="the model config given")
    mup_folded = bool(fold and cfg.mup is not None and not cfg.tie_embeddings)
    if mup_folded:
        sd, _ = fold_mup(sd, cfg)
    meta = hf_metadata_files(
        cfg, eos_token_id=eos_token_id, bos_token_id=bos_token_id, architecture=architecture,
        mup_folded=mup_folded, strict=strict,
    )  # fmt: skip
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)  # one matrix, stored once (as transformers does)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    for name, data in meta.items():
        atomic_write_bytes(folder / name, data)
    return folder


# ------------------------------------------------------------------------------------ import


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found (a Hugging Face model folder needs it)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _model_config_from_hf(hf: dict[str, Any], path: Path) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in _HF_CLASS:
        raise CheckpointError(
            f"{path}: model_type {model_type!r} is not supported; llm360 imports llama and stablelm folders"
        )

    def unsupported(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {what} is not supported by llm360's Llama")

    if hf.get("hidden_act", "silu") != "silu":
        raise unsupported(f"hidden_act={hf['hidden_act']!r}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise unsupported(f"rope scaling {rope!r}")
    flags = ("attention_bias", "mlp_bias", "use_qkv_bias", "qk_layernorm", "use_parallel_residual")
    for flag in flags:
        if hf.get(flag):
            raise unsupported(f"{flag}=true")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hidden // heads):
        raise unsupported(f"head_dim={hf['head_dim']} (not hidden_size / num_attention_heads)")
    if model_type == "llama":
        norm, eps, fraction = "rmsnorm", hf.get("rms_norm_eps", 1e-6), 1.0
    else:
        norm, eps = "layernorm", hf.get("layer_norm_eps", 1e-5)
        fraction = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.25))
    fields = {
        "vocab_size": hf["vocab_size"],
        "hidden_size": hidden,
        "intermediate_size": hf["intermediate_size"],
        "num_layers": hf["num_hidden_layers"],
        "num_heads": heads,
        "num_kv_heads": hf.get("num_key_value_heads") or heads,
        "max_seq_len": hf.get("max_position_embeddings", 2048),
        "norm": norm,
        "norm_eps": eps,
        "rope_theta": rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        "rope_fraction": fraction,
        "init_std": hf.get("initializer_range", 0.02),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }
    name = next((n for n, p in MODEL_PRESETS.items() if all(fields.get(k) == v for k, v in p.items())), None)
    if name is not None:
        fields["name"] = name
    try:
        return ModelConfig(**fields)
    except ValidationError as e:
        raise CheckpointError(f"{path}: config does not describe a valid model: {e}") from None


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = folder / INDEX_FILE
    if (folder / WEIGHTS_FILE).is_file():
        files = [folder / WEIGHTS_FILE]
    elif index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        files = [folder / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: shard named in {index.name} is missing")
    else:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            raise CheckpointError(
                f"{folder}: only pickle weight files ({', '.join(pickles)}); llm360 loads safetensors only, "
                "because unpickling runs arbitrary code. Convert them first, e.g. "
                "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out, safe_serialization=True) "
                "on a machine where you trust the files."
            )
        raise CheckpointError(f"{folder}: no {WEIGHTS_FILE} or {INDEX_FILE}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            sd.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from None
    return sd


def load_hf_folder(folder: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Import a Hugging Face Llama (or StableLM-layout) folder: (ModelConfig, state dict for Llama).

    Reads ``config.json`` and ``model.safetensors`` or the shards of
    ``model.safetensors.index.json``; pickle ``.bin`` files are refused. Tensors keep their stored
    dtype. A folder written by :func:`save_hf_folder` gives back the exact ModelConfig (muP
    unfolded again, up to fp32 rounding). Raises CheckpointError naming the file at fault.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    hf = _read_json(folder / CONFIG_FILE)
    cfg = _model_config_from_hf(hf, folder / CONFIG_FILE)
    sd = _load_weights(folder)
    sd.pop("model.rotary_emb.inv_freq", None)  # a buffer some old exports carry; recomputed here
    if cfg.tie_embeddings and "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    if (folder / LLM360_FILE).is_file():
        ours = _read_json(folder / LLM360_FILE)
        try:
            exact = ModelConfig.model_validate(ours["model"])
        except (KeyError, ValidationError) as e:
            raise CheckpointError(f"{folder / LLM360_FILE}: not a valid llm360 model config ({e})") from None
        shape_fields = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads")
        differ = [f for f in shape_fields if getattr(exact, f) != getattr(cfg, f)]
        if differ or (exact.num_kv_heads or exact.num_heads) != cfg.num_kv_heads:
            raise CheckpointError(
                f"{folder / LLM360_FILE} disagrees with {CONFIG_FILE} on {differ or ['num_kv_heads']}; "
                f"delete {LLM360_FILE} if {CONFIG_FILE} is the one to trust"
            )
        if ours.get("mup_folded") and exact.mup is not None:
            sd, _ = fold_mup(sd, exact, inverse=True)
        cfg = exact
    _check_keys(sd, cfg, folder)
    return cfg, sd


def _check_keys(
    sd: Mapping[str, torch.Tensor], cfg: ModelConfig, folder: Path, what: str = CONFIG_FILE
) -> None:
    from llm360.model.llama import Llama

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Llama(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(k for k in expected if k in sd and tuple(sd[k].shape) != expected[k])
    if missing or unexpected or wrong:
        parts = [
            f"{label} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        ]
        raise CheckpointError(f"{folder}: weights do not match {what}: " + "; ".join(parts))


def reference_model(cfg: ModelConfig, **config_overrides: Any) -> torch.nn.Module:
    """transformers' own model for cfg (LlamaForCausalLM, or StableLM for LayerNorm), randomly initialised.

    The baseline of parity tests and benchmarks: same architecture, HF's implementation.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    d = hf_config_dict(cfg, eos_token_id=None)
    d.pop("architectures", None)
    d.pop("torch_dtype", None)
    model_type = d.pop("model_type")
    hc = AutoConfig.for_model(model_type, **{**d, **config_overrides})
    return AutoModelForCausalLM.from_config(hc)
