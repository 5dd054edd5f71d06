"""Analysis360: what a model memorized from its training data, and which evaluation data it saw.

* :mod:`llm360.analysis.memorization` -- the LLM360 memorization score of every checkpoint on
  rows sampled from every chunk (seen and not yet seen), with the paper's figures as JSON.
* :mod:`llm360.analysis.contamination` -- n-gram overlap between evaluation sets (JSONL files,
  lm-eval tasks) and the training chunks, with the Llama 2 clean/dirty buckets and the chunks (and
  so the checkpoints) that hold the hits.

Both write under ``<run>/analysis/`` and are incremental: what is already there and still valid
is never recomputed, and one bad item (a checkpoint being written, a task file that does not
parse) is reported and skipped while the others run.

This module is light on purpose (no torch, no numpy): it holds the config sections and the
result type that the CLI and the config import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field

from llm360.errors import Llm360Error
from llm360.section import Section

__all__ = [
    "AnalysisConfig",
    "AnalysisError",
    "AnalysisResult",
    "ContaminationConfig",
    "MemorizationConfig",
]


class AnalysisError(Llm360Error):
    """An analysis input (checkpoint, task file, task name, earlier results) cannot be used."""


class MemorizationConfig(Section):
    prompt_tokens: int = Field(32, ge=1)
    """k: tokens at the start of a training row given as the prompt (the paper: 32)."""
    continuation_tokens: int = Field(32, ge=1)
    """l: greedy tokens generated and compared with the row's true next l tokens (the paper: 32)."""
    rows_per_chunk: int = Field(1000, ge=1)
    """Rows sampled from every chunk (all of them if a chunk has fewer); the paper: 1000."""
    seed: int = 0
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


@dataclass
class AnalysisResult:
    """What one analysis call did, item by item (an item is a checkpoint or a task)."""

    analysis: str
    """memorization or contamination."""
    out_dir: Path
    """Folder the results are in (``<run>/analysis/<analysis>``)."""
    computed: list[str] = field(default_factory=list)
    """Items computed by this call."""
    reused: list[str] = field(default_factory=list)
    """Items already up to date, left as they were."""
    failed: dict[str, str] = field(default_factory=dict)
    """Items that could not be analysed -> why (and what to do)."""
    summary: Path | None = None
    """The summary file written (None when there is nothing to summarise)."""

    @property
    def ok(self) -> bool:
        return not self.failed
