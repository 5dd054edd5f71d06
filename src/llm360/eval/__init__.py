"""Evaluation of every checkpoint: held-out perplexity and lm-eval tasks, incrementally.

Front door: :func:`evaluate` (``llm360 eval``). Pieces:

* :mod:`llm360.eval.runner` -- checkpoints x tasks as a plan of pairs on an executor, shards, watch mode;
* :mod:`llm360.eval.pairs` -- one (checkpoint, task) pair, the unit every executor runs;
* :mod:`llm360.eval.results` -- one result file per pair, the summary rebuilt from them;
* :mod:`llm360.eval.perplexity` -- mean token NLL on each source's held-out rows;
* :mod:`llm360.eval.adapter` -- :class:`LLM360LM`, lm-eval's ``llm360`` model running our Llama;
* :mod:`llm360.eval.harness` -- lm-eval task discovery, offline checks, running one task;
* :mod:`llm360.eval.specs` -- task names, the ``openllm``, ``code``, ``code_sampled`` and ``demo`` presets;
* ``llm360/eval/tasks/`` -- the demo tasks (lm-eval YAML + JSONL), made by :mod:`llm360.eval.demo`.

lm-eval is imported only when an lm-eval task runs, so ``perplexity`` alone does not need it.
"""

from __future__ import annotations

from typing import Any

from llm360.config import EvalConfig

# Everything else is imported on first use: every process that imports this package for a name
# must not pay for torch, lm-eval and the runner.
_LAZY = {
    "TASKS_DIR": "llm360.eval.demo",
    "EvalTable": "llm360.eval.runner",
    "ItemError": "llm360.eval.runner",
    "evaluate": "llm360.eval.runner",
    "list_checkpoints": "llm360.eval.runner",
    "training_finished": "llm360.eval.runner",
    "PRESETS": "llm360.eval.specs",
    "TaskSpec": "llm360.eval.specs",
    "resolve_tasks": "llm360.eval.specs",
    "LLM360LM": "llm360.eval.adapter",  # imports lm-eval (and registers the `llm360` model type)
}

__all__ = [
    "PRESETS",
    "TASKS_DIR",
    "EvalConfig",
    "EvalTable",
    "ItemError",
    "LLM360LM",
    "TaskSpec",
    "evaluate",
    "list_checkpoints",
    "resolve_tasks",
    "training_finished",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
