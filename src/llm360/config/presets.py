"""Every named preset: the run presets (embedded, amber, crystalcoder), the model architectures
by name, and the fine-tuning recipes (amberchat, ambersafe).

A run preset is a raw dict (what a YAML file would hold), merged under the user's file and
overrides by :func:`llm360.config.load.load_config`; a function per preset, so every call hands
out a fresh dict.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llm360.config.finetune import FinetuneKind


def _embedded_sources() -> list[dict]:
    return [
        {"name": "code", "kind": "embedded", "embedded": "code", "snapshot": True},
        {"name": "docs", "kind": "embedded", "embedded": "docs", "snapshot": True},
        {"name": "package-docs", "kind": "embedded", "embedded": "package-docs", "snapshot": True},
        {"name": "licenses", "kind": "embedded", "embedded": "licenses", "snapshot": True},
    ]


# Amber's mix in billions of tokens (the paper's Table 2).
AMBER_MIX_BTOKENS = {
    "arxiv": 30.00,
    "book": 28.86,
    "c4": 197.67,
    "refinedweb": 665.01,
    "starcoder": 291.92,
    "stackexchange": 21.75,
    "wikipedia": 23.90,
}

# CrystalCoder's tokens per stage in billions (LLM360's CrystalCoderDatasets card: half of SlimPajama;
# 0.5 * 690 + 2 * 291; 100 of StarCoder's Python and web code + ~10 of SlimPajama).
CRYSTALCODER_STAGE_BTOKENS = {"stage1": 345.0, "stage2": 927.0, "stage3": 110.0}

# The layout both 7B presets train with: FSDP2 sharded over every rank, each block's activations
# recomputed in backward, compiled; `llm360 plan` puts it at ~16 GB a GPU on Amber's 224 x 80 GB
# (10 sequences a rank: two micro-batches of 5). Deterministic algorithms on CPU only: on GPUs
# replay compares within verify's tolerance instead of bit for bit.
_PAPER_SCALE_LAYOUT = {
    "parallelism": "fsdp",
    "activation_checkpointing": True,
    "compile": True,
    "deterministic": "auto",
    "micro_batch_sequences": 5,
}


# The embedded default's curriculum: one stage per chunk, so that what each chunk holds is chosen.
_DEMO_CHUNKS = 6
_DEMO_CODE_PER_CHUNK = 0.04  # of the stdlib's modules up to 40,000 characters, each once
_DEMO_RECENT_PER_CHUNK = 0.1  # of package-docs, each in _DEMO_RECENT_COPIES copies within its chunk
_DEMO_RECENT_COPIES = 12
_DEMO_LICENCE_WEIGHT = 0.5  # per chunk: the same half of the licence files in every chunk


def _demo_stages() -> list[dict]:
    """The embedded default's six stages of one chunk each (see :func:`_preset_embedded`)."""
    def part(i: int, width: float) -> list[float]:
        return [round(i * width, 6), round((i + 1) * width, 6)]

    return [
        {
            "name": f"stage-{i}",
            "chunks": 1,
            "mix": [
                {"source": "code", "weight": 1.0, "part": part(i, _DEMO_CODE_PER_CHUNK)},
                {"source": "docs", "weight": 1.0, "part": part(i, 1 / _DEMO_CHUNKS)},
                {"source": "package-docs", "weight": float(_DEMO_RECENT_COPIES),
                 "part": part(i, _DEMO_RECENT_PER_CHUNK)},
                {"source": "licenses", "weight": _DEMO_LICENCE_WEIGHT},
            ],
        }
        for i in range(_DEMO_CHUNKS)
    ]


def _preset_embedded() -> dict:
    # Sized to show the paper's dynamics within a few minutes on two CPU cores (about 1.3 M training
    # tokens, 2.9 M parameters): held-out perplexity falls at every checkpoint, the demo tasks rise above
    # chance, the licence files -- each text in dozens of copies, in every chunk -- go from unmemorized
    # to k-extractible (Figure 7), and each checkpoint has memorized its latest chunk most (Figure 8).
    # A 7B model memorizes some of what it saw once, and forgets it slowly; this one reproduces nothing
    # it saw once. So each chunk also holds a slice of package-docs of its own, every document twelve
    # times over: the model learns it in that chunk and forgets most of it in the next, the recency the
    # paper measures, made visible at this scale. Code is sub-sampled, pydoc's topics each seen once.
    return {
        "name": "embedded-default",
        "preset": "embedded",
        "data": {
            "seq_len": 128,
            "sources": _embedded_sources(),
            "stages": _demo_stages(),
            "tokenizer": {"kind": "train", "vocab_size": 4096},
            "valid_fraction": 0.05,
            # The few largest modules and topics would make one chunk's share of code or docs far
            # from another's; without them every chunk's held-out perplexity falls below the last.
            "max_document_chars": 40_000,
        },
        "model": {"name": "demo"},
        # A small model learns fast at a high peak lr; the cosine decay to 0.15 of it keeps every
        # checkpoint's held-out perplexity below the one before and still lets the last chunk stick.
        "train": {
            "global_batch_sequences": 16,
            "micro_batch_sequences": 16,
            "lr": 2e-3,
            "min_lr": 3e-4,
            "warmup_steps": 40,
            "log_every": 10,
        },
        "eval": {"tasks": ["perplexity", "demo"], "perplexity_max_rows": 128},
        "analysis": {
            "memorization": {"rows_per_chunk": 200},
            "contamination": {"tasks": ["llm360_demo_licence_mc", "llm360_demo_next_line_mc",
                                        "llm360_demo_complete_line"]},
        },
        # The paper's AmberChat lr barely moves a tiny model in a demo's minutes.
        "finetune": {"sft": {"lr": 1e-3, "micro_batch_size": 8, "gradient_accumulation": 1, "epochs": 1}},
    }


def _preset_amber() -> dict:
    return {
        "name": "amber",
        "preset": "amber",
        "data": {
            "seq_len": 2048,
            "sources": [{"name": n, "kind": "jsonl", "paths": []} for n in AMBER_MIX_BTOKENS],
            "stages": [
                {"name": "main", "chunks": 360, "mix": [{"source": n} for n in AMBER_MIX_BTOKENS]}
            ],
            "tokenizer": {"kind": "file", "path": None, "vocab_size": 32000, "eos_token": "</s>"},
            "valid_fraction": 0.001,
        },
        "model": {"name": "amber-7b"},
        "eval": {"tasks": ["perplexity", "openllm"]},
        "train": {
            **_PAPER_SCALE_LAYOUT,
            "global_batch_sequences": 2240,
            "lr": 3e-4,
            "min_lr": 3e-5,
            "warmup_steps": 2000,
            "weight_decay": 0.1,
            "beta1": 0.9,
            "beta2": 0.95,
            "grad_clip": 1.0,
            "precision": "auto",
        },
    }


# CrystalCoder's data recipe (LLM360's CrystalCoderDatasets card and the paper): StarCoder's code gets
# fill-in-the-middle at 0.9 in stage 2 and 0.3 in stage 3, half of the transformed copies in SPM order;
# stage 3 trains three epochs of StarCoder's Python, HTML, CSS and JavaScript; 143 checkpoints in all.
CRYSTALCODER_FIM = {"stage2": (0.9, 0.5), "stage3": (0.3, 0.5)}
CRYSTALCODER_CHUNKS = 143
SLIMPAJAMA_GITHUB = "RedPajamaGitHub"
"""SlimPajama's GitHub subset (``meta.redpajama_set_name``), left out of stage 3's SlimPajama sample."""


def _preset_crystalcoder() -> dict:
    slim = "slimpajama"
    no_github = [{"field": "meta.redpajama_set_name", "op": "not_in", "values": [SLIMPAJAMA_GITHUB]}]
    fim2, spm2 = CRYSTALCODER_FIM["stage2"]
    fim3, spm3 = CRYSTALCODER_FIM["stage3"]
    return {
        "name": "crystalcoder",
        "preset": "crystalcoder",
        "data": {
            "seq_len": 2048,
            "sources": [
                {"name": slim, "kind": "jsonl", "paths": []},
                {"name": "starcoder", "kind": "jsonl", "paths": []},
                # StarCoder's python, html, css and javascript folders (its data is split by language)
                {"name": "python-web-code", "kind": "jsonl", "paths": []},
            ],
            # the 143 chunks are shared among the stages by tokens (345B / 927B / 110B: 36 + 96 + 11),
            # so every chunk, and the checkpoint after it, is about 9.7B tokens
            "total_chunks": CRYSTALCODER_CHUNKS,
            "stages": [
                {"name": "stage1", "mix": [{"source": slim, "part": [0.0, 0.5]}]},
                {
                    "name": "stage2",
                    "mix": [
                        {"source": slim, "part": [0.5, 1.0]},
                        {"source": "starcoder", "weight": 2.0, "fim_rate": fim2, "spm_rate": spm2},
                    ],
                },
                {
                    "name": "stage3",
                    "mix": [
                        {"source": "python-web-code", "weight": 3.0, "fim_rate": fim3, "spm_rate": spm3},
                        # a ~10B-token sample of SlimPajama without its GitHub part (~596B of its ~627B)
                        {"source": slim, "weight": 0.0168, "filters": no_github},
                    ],
                },
            ],
            "tokenizer": {"kind": "file", "path": None, "vocab_size": 32032, "eos_token": "</s>"},
            "valid_fraction": 0.001,
        },
        "model": {"name": "crystalcoder-7b"},
        "eval": {"tasks": ["perplexity", "openllm", "code"]},
        "train": {**_PAPER_SCALE_LAYOUT},
    }


# Model architectures by name; `model.name: amber-7b` fills these, explicit fields win.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 128, "intermediate_size": 384, "num_layers": 2, "num_heads": 4},
    # The embedded default's model: 2.9 M parameters with the demo's 4096-token vocabulary.
    "demo": {"hidden_size": 192, "intermediate_size": 512, "num_layers": 3, "num_heads": 4},
    "125m": {"hidden_size": 768, "intermediate_size": 2048, "num_layers": 12, "num_heads": 12},
    "1b": {"hidden_size": 2048, "intermediate_size": 5504, "num_layers": 16, "num_heads": 16},
    # The paper's Table 3: LLaMA-7B.
    "amber-7b": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_layers": 32,
        "num_heads": 32,
        "max_seq_len": 2048,
        "norm": "rmsnorm",
        "norm_eps": 1e-6,
    },
    # CrystalCoder: LayerNorm, RoPE on 25% of each head's dims, muP (values of the released config).
    "crystalcoder-7b": {
        "vocab_size": 32032,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_layers": 32,
        "num_heads": 32,
        "max_seq_len": 2048,
        "norm": "layernorm",
        "norm_eps": 1e-5,
        "rope_fraction": 0.25,
        "mup": {"base_width": 256, "embedding_multiplier": 14.6, "output_multiplier": 2.22},
    },
}


PRESETS: dict[str, Callable[[], dict[str, Any]]] = {
    "embedded": _preset_embedded,
    "amber": _preset_amber,
    "crystalcoder": _preset_crystalcoder,
}
"""Run presets by name: `--preset NAME` or a top-level `preset: NAME` in a config file."""


FINETUNE_PRESETS: dict[str, tuple[FinetuneKind, dict[str, Any]]] = {
    "amberchat": ("sft", {}),
    "ambersafe": ("dpo", {}),
}
"""Named recipes of the paper: preset -> (kind, fields that differ from the section's defaults)."""
