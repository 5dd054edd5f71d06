"""Typed run configuration: one place that says what every field means.

Every field carries a one-line docstring. Those strings are the documentation: they become the
comments of the resolved ``config.yaml`` written into each run directory, the text of
``llm360 config show``, and part of every validation error.

A config comes from (in order) a preset, a YAML file, and ``--set a.b.c=value`` overrides. List
items can be addressed by index or, where they have a ``name`` (sources, stages) or ``source``
(mix entries), by that name: ``--set data.sources.code.paths=[a.jsonl]``.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from llm360.analysis import AnalysisConfig
from llm360.errors import ConfigError
from llm360.eval.config import EvalConfig
from llm360.finetune.config import FinetuneConfig
from llm360.section import Section

# --------------------------------------------------------------------------------------- data


SourceKind = Literal["jsonl", "parquet", "text", "hf_dataset", "llm360", "embedded", "snapshot"]
EmbeddedPart = Literal["code", "docs", "package-docs", "licenses"]


class SourceConfig(Section):
    name: str
    """Source name used in the manifest, provenance, metrics and mix (e.g. `code`, `c4`)."""
    kind: SourceKind = "jsonl"
    """Reader: jsonl (.jsonl, .jsonl.gz, .jsonl.zst), parquet, text (one document per file), hf_dataset (a `save_to_disk` folder), llm360 (pre-tokenized `{"token_ids": [...], "source": ...}` rows, order kept) embedded (the built-in corpus) or snapshot (data/sources/<name>.jsonl.gz of a run or release)."""
    paths: list[str] = Field(default_factory=list)
    """Files, folders or glob patterns, read in sorted order; relative paths are relative to the working directory."""
    text_field: str = "text"
    """Field (JSONL key, Parquet or dataset column) holding the document text."""
    embedded: EmbeddedPart | None = None
    """For kind=embedded: which part of the built-in corpus (code, docs, package-docs, licenses)."""
    snapshot: bool = False
    """Write the raw documents into the run directory (data/sources/<name>.jsonl.gz) so a release carries them."""

    @model_validator(mode="after")
    def _check_kind(self) -> SourceConfig:
        if self.kind == "embedded" and self.embedded is None:
            raise ValueError(
                f"source '{self.name}': kind=embedded needs `embedded` set to one of "
                "code, docs, package-docs, licenses"
            )
        if self.kind != "embedded" and self.embedded is not None:
            raise ValueError(f"source '{self.name}': `embedded` is only allowed with kind=embedded")
        return self


class MixEntry(Section):
    source: str
    """Name of a source in data.sources."""
    weight: float = Field(1.0, ge=0.0)
    """Documents used per document available: <1 sub-samples (by document hash), >1 repeats (2.0 = two epochs)."""
    part: tuple[float, float] = (0.0, 1.0)
    """Slice [lo, hi) of the source's documents (by document hash) this entry draws from, e.g. [0, 0.5] for one half."""

    @field_validator("part")
    @classmethod
    def _check_part(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not (0.0 <= lo < hi <= 1.0):
            raise ValueError(f"part must satisfy 0 <= lo < hi <= 1, got [{lo}, {hi}]")
        return v


class StageConfig(Section):
    name: str
    """Stage name (e.g. `stage1`); stages are trained in the order listed."""
    chunks: int = Field(ge=1)
    """Number of equal-size chunks this stage's rows are split into; one checkpoint per chunk."""
    mix: list[MixEntry]
    """Which sources, in what proportion, make up this stage."""
    shuffle: bool = True
    """Globally permute the stage's rows with the data seed (off keeps file order, e.g. for imported LLM360 chunks)."""


class TokenizerConfig(Section):
    kind: Literal["train", "file", "none"] = "train"
    """train: a byte-level BPE trained on the training documents; file: load `path`; none: only for pre-tokenized sources."""
    path: str | None = None
    """For kind=file: a tokenizer.json, a Hugging Face tokenizer folder, or a SentencePiece .model file."""
    vocab_size: int = Field(4096, ge=260)
    """Vocabulary size when training (special tokens included); with kind=none, the vocabulary of the pre-tokenized ids."""
    eos_token: str = "<|endoftext|>"
    """Token appended after every document (its id is the EOS id); for loaded tokenizers, used if it exists there."""
    train_max_chars: int = Field(20_000_000, ge=1)
    """At most this many characters of training text are used to train the tokenizer (streamed, in document order)."""


class DataConfig(Section):
    seq_len: int = Field(256, ge=8)
    """Tokens per training sequence; each stored row holds seq_len + 1 tokens (inputs and shifted targets)."""
    seed: int = 1234
    """Seed of the data order: document sampling, validation split and the global permutation."""
    sources: list[SourceConfig]
    """Where documents come from."""
    stages: list[StageConfig] = Field(default_factory=list)
    """Ordered curriculum; empty means one stage `main` with every source at weight 1 and data.chunks chunks."""
    chunks: int = Field(8, ge=1)
    """Number of chunks when `stages` is empty."""
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    """How text becomes token ids."""
    valid_fraction: float = Field(0.02, ge=0.0, lt=1.0)
    """Share of each source's documents held out for validation (chosen by document hash, before packing)."""
    max_document_chars: int = Field(2_000_000, ge=1)
    """Documents longer than this are rejected (counted in the manifest with the reason)."""
    min_document_chars: int = Field(1, ge=0)
    """Documents shorter than this (after stripping) are rejected as empty."""
    token_dtype: Literal["auto", "uint16", "uint32"] = "auto"
    """On-disk dtype of chunks: auto picks uint16 when the vocabulary fits, else uint32."""
    docs_per_batch: int = Field(512, ge=1)
    """Documents tokenized together in one batch (affects speed and memory, never the result)."""

    @model_validator(mode="after")
    def _check_refs(self) -> DataConfig:
        names = [s.name for s in self.sources]
        if not names:
            raise ValueError("data.sources is empty: give at least one source")
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"source names must be unique, repeated: {sorted(dup)}")
        for st in self.stages:
            for m in st.mix:
                if m.source not in names:
                    raise ValueError(
                        f"stage '{st.name}' mixes unknown source '{m.source}'; sources are {names}"
                    )
        snames = [s.name for s in self.stages]
        if len(set(snames)) != len(snames):
            raise ValueError(f"stage names must be unique, got {snames}")
        return self

    def resolved_stages(self) -> list[StageConfig]:
        """The stages to build: the configured ones, or one `main` stage over every source."""
        if self.stages:
            return list(self.stages)
        shuffle = not all(s.kind == "llm360" for s in self.sources)
        return [
            StageConfig(
                name="main",
                chunks=self.chunks,
                mix=[MixEntry(source=s.name) for s in self.sources],
                shuffle=shuffle,
            )
        ]


# -------------------------------------------------------------------------------------- model


class MupConfig(Section):
    """muP (Cerebras' form, as CrystalCoder): with m = hidden_size / base_width, the blocks' matrices are
    initialised with init_std / sqrt(m) and train at lr / m; embedding and output head keep init_std and lr."""

    base_width: int = Field(256, ge=1)
    """Width at which the muP multipliers equal 1 (the proxy model's hidden size, whose tuned lr and init_std transfer)."""
    embedding_multiplier: float = 10.0
    """Scale applied to the token embeddings' output."""
    output_multiplier: float = 1.0
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
    vocab_size: int | None = None
    """Vocabulary size; null takes it from the prepared data's tokenizer."""
    hidden_size: int = 128
    """Model width d."""
    intermediate_size: int = 384
    """SwiGLU MLP inner width."""
    num_layers: int = 2
    """Number of transformer blocks."""
    num_heads: int = 4
    """Attention heads."""
    num_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; null means num_heads."""
    max_seq_len: int | None = None
    """Longest sequence the model is built for; null takes data.seq_len."""
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    """Normalization layer (CrystalCoder uses layernorm)."""
    norm_eps: float = 1e-6
    """Epsilon of the normalization layers."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_fraction: float = Field(1.0, gt=0.0, le=1.0)
    """Fraction of each head's dims that get rotary embeddings (CrystalCoder: 0.25)."""
    mup: MupConfig | None = None
    """muP (CrystalCoder): multipliers, width-scaled init and per-layer learning rates; null for standard parametrization."""
    init_std: float = 0.02
    """Standard deviation of the normal weight init."""
    tie_embeddings: bool = False
    """Share the input embedding and output head (LLaMA/Amber: untied)."""

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


# -------------------------------------------------------------------------------------- train


class GuardConfig(Section):
    nonfinite_policy: Literal["skip_step", "rollback_skip_chunk", "rollback_reseed", "stop"] = "skip_step"
    """What to do on a non-finite loss or gradient: skip the step, roll back to the last checkpoint and skip (or reseed) the chunk, or stop."""
    spike_factor: float | None = 3.0
    """A loss above spike_factor x the running median of the last spike_window losses is a spike; null disables."""
    spike_window: int = Field(50, ge=2)
    """Steps in the running window used to detect loss spikes."""
    spike_policy: Literal["record", "skip_step", "rollback_skip_chunk", "rollback_reseed", "stop"] = "record"
    """What to do on a loss spike (record only logs the event)."""
    max_rollbacks: int = Field(3, ge=0)
    """Give up (stop) after this many rollbacks in one run."""


class TrainConfig(Section):
    seed: int = 42
    """Seed of model init and every RNG the trainer uses."""
    global_batch_sequences: int = Field(8, ge=1)
    """Sequences per optimizer step across all ranks (the paper: 2240)."""
    micro_batch_sequences: int = Field(4, ge=1)
    """Sequences per forward pass on one rank; gradient accumulation is derived from it and the world size."""
    lr: float = Field(3e-4, gt=0)
    """Peak learning rate."""
    min_lr: float = Field(3e-5, ge=0)
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = Field(10, ge=0)
    """Linear warmup steps from 0 to lr."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to norms and biases)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this value; null disables."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast with fp32 master weights on GPU, fp32 on CPU."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass to save memory."""
    deterministic: bool = True
    """Deterministic algorithms, so resume and replay are bitwise on CPU."""
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    """Data parallelism under torchrun: DDP, or FSDP2 (fully_shard per block) with sharded checkpoints."""
    checkpoint_every_steps: int | None = None
    """Also checkpoint every N steps inside a chunk (resumable, not a release checkpoint); null: only per chunk."""
    max_chunks: int | None = None
    """Stop after this many chunks (null: all)."""
    log_every: int = Field(1, ge=1)
    """Print one summary line every N steps (every step goes to metrics/train.jsonl)."""
    tensorboard: bool = False
    """Also write TensorBoard event files under metrics/tensorboard."""
    wandb: Literal["off", "online", "offline"] = "off"
    """Also log to Weights & Biases."""
    wandb_project: str = "llm360"
    """W&B project name."""
    guards: GuardConfig = Field(default_factory=GuardConfig)
    """Policies for non-finite values and loss spikes."""


# ---------------------------------------------------------------------------------------- run



class RunConfig(Section):
    name: str = "llm360-run"
    """Run name, used in the release and the model card."""
    preset: str | None = None
    """Preset this config started from (informational)."""
    data: DataConfig
    """Data preparation: sources, tokenizer, mix, stages and chunking."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """Model architecture."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Optimizer, schedule, precision, checkpointing and guards."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Evaluation of every checkpoint: tasks, batch size, device, watch mode."""
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    """Analysis360: memorization over checkpoints and chunks, contamination of evaluation sets."""
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    """Fine-tuning of checkpoints (`llm360 finetune sft|dpo`): AmberChat's SFT and AmberSafe's DPO recipes."""

    def data_hash(self) -> str:
        """sha256 of the data section: two configs with the same hash prepare the same data."""
        return stable_hash(self.data.model_dump(mode="json"))


def stable_hash(obj: Any) -> str:
    """sha256 hex of the canonical JSON encoding of obj."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# ------------------------------------------------------------------------------------ presets


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


def _preset_embedded() -> dict:
    return {
        "name": "embedded-default",
        "preset": "embedded",
        "data": {
            "seq_len": 128,
            "sources": _embedded_sources(),
            "stages": [
                {
                    "name": "main",
                    "chunks": 6,
                    # ~0.7M tokens: a few minutes of CPU training; every licence text is kept
                    # (with its natural duplicates, memorization shows), the rest sub-sampled.
                    "mix": [
                        {"source": "code", "weight": 0.03},
                        {"source": "docs", "weight": 1.0},
                        {"source": "package-docs", "weight": 0.3},
                        {"source": "licenses", "weight": 1.0},
                    ],
                }
            ],
            "tokenizer": {"kind": "train", "vocab_size": 4096},
        },
        "model": {"name": "tiny"},
        "eval": {"tasks": ["perplexity", "demo"]},
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
            "global_batch_sequences": 2240,
            "micro_batch_sequences": 4,
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


def _preset_crystalcoder() -> dict:
    slim = "slimpajama"
    return {
        "name": "crystalcoder",
        "preset": "crystalcoder",
        "data": {
            "seq_len": 2048,
            "sources": [
                {"name": slim, "kind": "jsonl", "paths": []},
                {"name": "starcoder", "kind": "jsonl", "paths": []},
                {"name": "python-web-code", "kind": "jsonl", "paths": []},
            ],
            "stages": [
                {"name": "stage1", "chunks": 143, "mix": [{"source": slim, "part": [0.0, 0.5]}]},
                {
                    "name": "stage2",
                    "chunks": 143,
                    "mix": [
                        {"source": slim, "part": [0.5, 1.0]},
                        {"source": "starcoder", "weight": 2.0},
                    ],
                },
                {
                    "name": "stage3",
                    "chunks": 29,
                    "mix": [
                        {"source": "python-web-code"},
                        # a ~10B-token sample of SlimPajama (~627B tokens in all)
                        {"source": slim, "weight": 0.016},
                    ],
                },
            ],
            "tokenizer": {"kind": "file", "path": None, "vocab_size": 32032, "eos_token": "</s>"},
            "valid_fraction": 0.001,
        },
        "model": {"name": "crystalcoder-7b"},
        "eval": {"tasks": ["perplexity", "openllm", "code"]},
    }


# Model architectures by name; `model.name: amber-7b` fills these, explicit fields win.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 128, "intermediate_size": 384, "num_layers": 2, "num_heads": 4},
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


PRESETS: dict[str, Any] = {
    "embedded": _preset_embedded,
    "amber": _preset_amber,
    "crystalcoder": _preset_crystalcoder,
}


# ---------------------------------------------------------------------------------- loading


def _format_validation_error(err: ValidationError, root: type[BaseModel], raw: dict) -> str:
    lines = ["invalid config:"]
    for e in err.errors():
        loc = list(e["loc"])
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        value = _lookup(raw, loc)
        doc = _field_doc(root, raw, loc)
        got = f" = {value!r}" if value is not _MISSING else ""
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `llm360 config show` lists every field)"
        line = f"  {dotted}{got}: {msg}"
        if doc:
            line += f"\n      ({doc})"
        lines.append(line)
    return "\n".join(lines)


_MISSING = object()


def _lookup(raw: Any, loc: list) -> Any:
    cur = raw
    for p in loc:
        if isinstance(cur, dict) and p in cur:
            cur = cur[p]
        elif isinstance(cur, list) and isinstance(p, int) and p < len(cur):
            cur = cur[p]
        else:
            return _MISSING
    return cur


def _field_doc(root: type[BaseModel], raw: dict, loc: list) -> str | None:
    """The docstring of the field at loc, walking nested models and lists."""
    model: Any = root
    doc = None
    for p in loc:
        if isinstance(p, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return doc
        field = model.model_fields.get(str(p))
        if field is None:
            return None
        doc = field.description
        model = _inner_model(field.annotation)
    return doc


def _inner_model(annotation: Any) -> Any:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        inner = _inner_model(arg)
        if inner is not None:
            return inner
    return None


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into a path and a YAML-parsed value."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set data.seq_len=512")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: value is not valid YAML: {e}") from None
    return key.split("."), value


def apply_override(raw: dict, path: list[str], value: Any) -> None:
    """Set raw[path] = value; list items by index or by their `name` / `source`."""
    cur: Any = raw
    dotted = ".".join(path)
    for i, p in enumerate(path):
        last = i == len(path) - 1
        if isinstance(cur, list):
            idx = _list_index(cur, p, dotted)
            if last:
                cur[idx] = value
                return
            cur = cur[idx]
            continue
        if not isinstance(cur, dict):
            raise ConfigError(f"--set {dotted}: '{'.'.join(path[:i])}' is not a section or list")
        if last:
            cur[p] = value
            return
        if p not in cur or cur[p] is None:
            cur[p] = {}
        cur = cur[p]


def _list_index(items: list, key: str, dotted: str) -> int:
    if key.lstrip("-").isdigit():
        idx = int(key)
        if not -len(items) <= idx < len(items):
            raise ConfigError(f"--set {dotted}: index {idx} out of range (list has {len(items)} items)")
        return idx
    for j, item in enumerate(items):
        if isinstance(item, dict) and key in (item.get("name"), item.get("source")):
            return j
    names = [it.get("name") or it.get("source") for it in items if isinstance(it, dict)]
    raise ConfigError(f"--set {dotted}: no list item named '{key}' (have {names})")


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def preset_dict(name: str) -> dict:
    """The raw dict of a named preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; presets are {sorted(PRESETS)}")
    return PRESETS[name]()


def load_config(
    path: str | Path | None = None,
    *,
    preset: str | None = None,
    overrides: list[str] | None = None,
) -> RunConfig:
    """Build a validated RunConfig from a preset, a YAML file and dotted overrides.

    With neither path nor preset, the embedded default is used. A YAML file may name its own
    base with a top-level ``preset:`` key; the file's values override the preset's.
    """
    raw: dict = {}
    file_raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: expected a mapping at the top level, got {type(loaded).__name__}")
        file_raw = loaded
    base = preset or file_raw.get("preset") or (None if file_raw else "embedded")
    if base is not None:
        raw = preset_dict(base)
    raw = _deep_merge(raw, file_raw)
    if base is not None:
        raw["preset"] = base
    for item in overrides or []:
        keys, value = parse_override(item)
        apply_override(raw, keys, value)
    return validate_config(_expand_model_preset(raw))


def _expand_model_preset(raw: dict) -> dict:
    model = raw.get("model")
    if not isinstance(model, dict):
        return raw
    name = model.get("name", "tiny")
    if name not in MODEL_PRESETS:
        raise ConfigError(f"model.name = {name!r}: unknown architecture; known are {sorted(MODEL_PRESETS)}")
    out = dict(raw)
    out["model"] = _deep_merge(MODEL_PRESETS[name], model)
    return out


def validate_config(raw: dict) -> RunConfig:
    """Validate a raw dict into a RunConfig, with errors that name field, value and meaning."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, RunConfig, raw)) from None


# ---------------------------------------------------------------------------------- writing


def to_yaml(cfg: BaseModel) -> str:
    """The resolved config as YAML, every default written out, each field preceded by its doc."""
    lines: list[str] = []
    _emit(cfg, 0, lines)
    return "\n".join(lines) + "\n"


def _scalar(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _emit(model: BaseModel, indent: int, lines: list[str]) -> None:
    pad = " " * indent
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if field.description:
            lines.append(f"{pad}# {field.description}")
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:")
            _emit(value, indent + 2, lines)
        elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
            lines.append(f"{pad}{name}:")
            for item in value:
                sub: list[str] = []
                _emit(item, 0, sub)
                sub = [s for s in sub if not s.lstrip().startswith("#")]
                for j, s in enumerate(sub):
                    prefix = "- " if j == 0 else "  "
                    lines.append(f"{pad}  {prefix}{s}")
        else:
            dumped = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
            if isinstance(dumped, tuple):
                dumped = list(dumped)
            lines.append(f"{pad}{name}: {_scalar(dumped)}")


def field_docs(model: type[BaseModel] = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) of every config field, sections expanded."""
    model = model or RunConfig
    rows: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        inner = _inner_model(field.annotation)
        if inner is not None and not _is_list(field.annotation):
            rows.extend(field_docs(inner, key + "."))
            continue
        if field.is_required():
            default = "(required)"
        else:
            value = field.get_default(call_default_factory=True)
            if isinstance(value, BaseModel):
                value = value.model_dump(mode="json")
            elif isinstance(value, list):
                value = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
            default = _scalar(list(value) if isinstance(value, tuple) else value)
        rows.append((key, default, field.description or ""))
    return rows


def _is_list(annotation: Any) -> bool:
    import typing

    return typing.get_origin(annotation) is list or any(
        typing.get_origin(a) is list for a in typing.get_args(annotation)
    )


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config (atomically) to path."""
    from llm360.rundir.atomic import atomic_write_text

    text, path = to_yaml(cfg), Path(path)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return  # unchanged: keep the file (and its mtime) as it is
    atomic_write_text(path, text)
