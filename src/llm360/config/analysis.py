"""The `analysis` section (Analysis360): the memorization score over checkpoints and chunks, and the
n-gram contamination of evaluation sets by the training data."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llm360.config.base import Section, seed_field


class MemorizationConfig(Section):
    prompt_tokens: int = Field(32, ge=1)
    """k: tokens at the start of a training row given as the prompt (the paper: 32)."""
    continuation_tokens: int = Field(32, ge=1)
    """l: greedy tokens generated and compared with the row's true next l tokens (the paper: 32)."""
    rows_per_chunk: int = Field(1000, ge=1)
    """Rows sampled from every chunk (all of them if a chunk has fewer); the paper: 1000."""
    seed: int = seed_field(0)
    """Seed of the row sample; the sampled rows are recorded in analysis/memorization/samples.npz."""
    batch_size: int = Field(64, ge=1)
    """Rows per forward pass (memory and speed only, never the result)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of weights and activations; float32 keeps greedy decoding comparable with fp32 references."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to run the model: auto picks cuda when available."""
    suppress_eos: bool = False
    """Never generate the EOS token (what transformers' min_new_tokens does); off: plain greedy, EOS is an ordinary token that never stops generation."""
    save_generated: bool = False
    """Also store the l generated token ids of every sampled row in each checkpoint's .npz (rows x l)."""


class ContaminationConfig(Section):
    tasks: list[str] = Field(default_factory=list)
    """Evaluation sets: JSONL files (one example per line), lm-eval task or group names, or lm-eval task YAML files."""
    ngram: int = Field(13, ge=1)
    """n: a token of an example is contaminated when it lies in an n-token sequence that also occurs in a training row."""
    text_field: str = "text"
    """For JSONL tasks: the field holding an example's text."""
    limit: int | None = Field(None, ge=1)
    """Use at most this many examples per task (null: all)."""
    workers: int | None = Field(None, ge=1)
    """Processes scanning the training chunks (null: one per CPU core)."""
    block_tokens: int = Field(4_194_304, ge=1024)
    """Training tokens one worker hashes at a time; its memory is about 40 bytes per token."""
    examples: int = Field(5, ge=0)
    """Most contaminated examples shown per task, each with where it occurs in the training data."""
    lm_eval_include_path: str | None = None
    """Extra folder of lm-eval task YAML files (searched before lm-eval's own tasks)."""


class AnalysisConfig(Section):
    memorization: MemorizationConfig = Field(default_factory=MemorizationConfig)
    """`llm360 analyze memorization`: memorization score of every checkpoint on every chunk."""
    contamination: ContaminationConfig = Field(default_factory=ContaminationConfig)
    """`llm360 analyze contamination`: n-gram overlap of evaluation sets with the training data."""


