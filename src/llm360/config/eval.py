"""The `eval` section: which tasks, on what device, how incremental and watch runs behave."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from llm360.config.base import Section, seed_field


class EvalConfig(Section):
    tasks: list[str] = Field(default_factory=lambda: ["perplexity", "demo"])
    """What to evaluate: `perplexity` (held-out, per source), presets `openllm`, `code` (greedy pass@1), `code_sampled` (pass@1 over 20 samples at the CrystalCoder card's temperatures) and `demo`, lm-eval task names (`name:N` for N-shot) or task YAML files."""
    task_paths: list[str] = Field(default_factory=list)
    """Extra folders of lm-eval task YAML files; their tasks can then be named in `tasks`."""
    checkpoints: list[str] | None = None
    """Only these checkpoints (names such as ckpt_003, or chunk indices such as 3); null: every complete checkpoint."""
    batch_size: int = Field(16, ge=1)
    """Sequences per forward pass, for perplexity, loglikelihood requests and generation."""
    device: str | None = None
    """Device to evaluate on (cpu, cuda, cuda:1); null: cuda when available, else cpu."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Dtype of weights and activations while evaluating; fp32 is exact, bf16 halves memory (GPU)."""
    perplexity_max_rows: int | None = Field(512, ge=1)
    """Held-out rows per source used for perplexity (the first N, always the same ones); null: all."""
    limit: int | None = Field(None, ge=1)
    """Only the first N examples of each lm-eval task (quick checks); results record the limit."""
    fewshot_seed: int = seed_field(1234)
    """Seed of lm-eval's few-shot example sampling (the Open LLM Leaderboard used 1234)."""
    generation_seed: int = seed_field(1234)
    """Seed of sampled generations (tasks with do_sample, e.g. the `code_sampled` preset): each request draws from its own generator seeded by it, its context and its repeat number; greedy tasks ignore it."""
    bootstrap_iters: int = Field(1000, ge=0)
    """Bootstrap resamples for the standard error of metrics that are not means (0: none)."""
    log_samples: bool = False
    """Also write every example's prompt, output and score to eval/<checkpoint>/<task>.samples.jsonl."""
    allow_downloads: bool = False
    """Let lm-eval download datasets from the Hugging Face Hub; off: offline, tasks whose data is not cached locally are reported and skipped."""
    allow_code_execution: bool = False
    """Run tasks that execute the model's generated code (HumanEval, MBPP: the `code` and `code_sampled` presets); only in a sandbox."""
    watch_interval_s: float = Field(30.0, gt=0)
    """With --watch: seconds between two looks for new checkpoints."""
    watch_idle_timeout_s: float | None = Field(None, gt=0)
    """With --watch: also stop after this many seconds without a new checkpoint; null: wait until training is finished."""

    @field_validator("checkpoints", mode="before")
    @classmethod
    def _names(cls, v: object) -> object:
        # `--set eval.checkpoints=[3,5]` gives ints: kept as chunk indices ("3"), which the evaluation
        # turns into checkpoint names (the run directory's format spells them, not the config)
        if isinstance(v, list):
            return [str(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in v]
        return v

    @field_validator("tasks")
    @classmethod
    def _check_tasks(cls, v: list[str]) -> list[str]:
        if not v or any(not t.strip() for t in v):
            raise ValueError("give at least one task, and no empty names (e.g. [perplexity, demo])")
        return [t.strip() for t in v]
