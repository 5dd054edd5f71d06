"""Analysis360: what a model memorized from its training data, and which evaluation data it saw.

* :mod:`llm360.analysis.memorization` -- the LLM360 memorization score of every checkpoint on
  rows sampled from every chunk (seen and not yet seen), with the paper's figures as JSON.
* :mod:`llm360.analysis.contamination` -- n-gram overlap between evaluation sets (JSONL files,
  lm-eval tasks) and the training chunks, with the Llama 2 clean/dirty buckets and the chunks (and
  so the checkpoints) that hold the hits.
* :mod:`llm360.analysis.find` -- one text against the training chunks (``llm360 inspect find``):
  the rows that hold it, or its longest run of tokens, with steps, documents and checkpoints.

The first two write under ``<run>/analysis/`` and are incremental: what is already there and still valid
is never recomputed, and one bad item (a checkpoint being written, a task file that does not
parse) is reported and skipped while the others run.

This module is light on purpose (no torch, no numpy): it holds the error and result types the
CLI imports, and names the config sections (defined in :mod:`llm360.config.analysis`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llm360.config import AnalysisConfig, ContaminationConfig, MemorizationConfig
from llm360.errors import Llm360Error

__all__ = [
    "AnalysisConfig",
    "AnalysisError",
    "AnalysisResult",
    "ContaminationConfig",
    "MemorizationConfig",
]


class AnalysisError(Llm360Error):
    """An analysis input (checkpoint, task file, task name, earlier results) cannot be used."""


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
