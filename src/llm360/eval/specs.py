"""What one evaluation task is, and how names on the command line become tasks.

A task name is one of

* ``perplexity`` -- mean token NLL on the held-out rows of every source (llm360's own);
* a preset -- ``openllm`` (the Open LLM Leaderboard settings the LLM360 paper reports), ``code``
  (HumanEval and MBPP greedy pass@1, for code models), ``code_sampled`` (the same pass@1 from 20
  samples per problem at the CrystalCoder card's temperatures) or ``demo`` (small local tasks
  written for the embedded corpus, shipped with llm360);
* an lm-eval task, tag or group name, optionally with a shot count: ``arc_easy``, ``arc_easy:5``;
* an lm-eval task YAML file (``path/to/task.yaml``).

Each task has a ``key``: the name of its result file (``eval/<checkpoint>/<key>.json``) and the
prefix of its summary columns. A shot count is part of the key (``arc_challenge_25shot``), so
the same task at two shot counts keeps two results.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llm360.errors import ConfigError

TaskKind = Literal["perplexity", "lm-eval"]


@dataclass(frozen=True)
class TaskSpec:
    """One evaluation task as the runner sees it."""

    key: str
    """Result file stem and summary column prefix, e.g. ``arc_challenge_25shot``."""
    kind: TaskKind
    name: str
    """The lm-eval task/group/tag name or YAML path (``perplexity`` for perplexity)."""
    num_fewshot: int | None = None
    """Few-shot examples; None keeps the task's own default (0 when it has none)."""
    primary_metric: str | None = None
    """The metric a summary shows first (the preset's headline number)."""
    preset: str | None = None
    """The preset this task came from, if any."""
    hub_dataset: tuple[str, str | None] | None = None
    """(path, config) of the Hugging Face dataset the task reads, for a fast offline check."""

    def signature(self) -> dict:
        """What, besides the checkpoint, determines this task's result (stored in the result file)."""
        return {"task": self.name, "num_fewshot": self.num_fewshot}


PERPLEXITY = TaskSpec("perplexity", "perplexity", "perplexity", primary_metric="overall")

OPENLLM: tuple[TaskSpec, ...] = (
    TaskSpec("arc_challenge_25shot", "lm-eval", "arc_challenge", 25, "acc_norm", "openllm",
             ("allenai/ai2_arc", "ARC-Challenge")),
    TaskSpec("hellaswag_10shot", "lm-eval", "hellaswag", 10, "acc_norm", "openllm", ("Rowan/hellaswag", None)),
    # one of MMLU's 57 subject configs stands for all of them in the fast offline check
    TaskSpec("mmlu_5shot", "lm-eval", "mmlu", 5, "acc", "openllm", ("cais/mmlu", "abstract_algebra")),
    TaskSpec("truthfulqa_mc2_0shot", "lm-eval", "truthfulqa_mc2", 0, "acc", "openllm",
             ("truthfulqa/truthful_qa", "multiple_choice")),
)  # fmt: skip
"""The Open LLM Leaderboard (v1) settings: ARC 25-shot acc_norm, HellaSwag 10-shot acc_norm,
MMLU 5-shot acc, TruthfulQA 0-shot mc2 (reported as ``acc`` by lm-eval's truthfulqa_mc2)."""

DEMO: tuple[TaskSpec, ...] = (
    TaskSpec("llm360_demo_licence_mc", "lm-eval", "llm360_demo_licence_mc", 0, "acc_norm", "demo"),
    TaskSpec("llm360_demo_next_line_mc", "lm-eval", "llm360_demo_next_line_mc", 0, "acc_norm", "demo"),
    TaskSpec("llm360_demo_complete_line", "lm-eval", "llm360_demo_complete_line", 0, "exact_match", "demo"),
)
"""Local tasks for the embedded corpus (see :mod:`llm360.eval.demo`): 40, 100 and 40 examples."""

CODE: tuple[TaskSpec, ...] = (
    TaskSpec("humaneval_0shot", "lm-eval", "humaneval", 0, None, "code", ("openai/openai_humaneval", None)),
    TaskSpec("mbpp_3shot", "lm-eval", "mbpp", 3, None, "code", ("google-research-datasets/mbpp", "full")),
)
"""Code models (CrystalCoder in the paper): HumanEval and MBPP, greedy pass@1. These run the
model's code, so they need ``eval.allow_code_execution`` (use a sandbox)."""

CODE_SAMPLED: tuple[TaskSpec, ...] = (
    TaskSpec("llm360_humaneval_sampled_n20", "lm-eval", "llm360_humaneval_sampled_n20", 0, "pass@1[create_test]",
             "code_sampled", ("openai/openai_humaneval", None)),
    TaskSpec("llm360_mbpp_sampled_n20", "lm-eval", "llm360_mbpp_sampled_n20", 3, "pass_at_1[all_samples]",
             "code_sampled", ("google-research-datasets/mbpp", "full")),
)  # fmt: skip
"""Code evaluation as the CrystalCoder model card reports it: pass@1 estimated from n = 20 samples
per problem (mean over problems of c / n, c samples passing), HumanEval 0-shot at temperature 0.2
and top_p 0.95 (the Codex setting), MBPP 3-shot at temperature 0.1 (top_p 0.95). Prompts, stop
strings and scoring are those of ``code`` (lm-eval's ``humaneval`` and ``mbpp``); the task files
are ``llm360/eval/tasks/llm360_{humaneval,mbpp}_sampled_n20.yaml``. Twenty times the generation
of ``code``. Samples are seeded per request (the lm-eval model's ``seed``, default 1234), so a
rerun gives the same texts. Another n: a YAML file that ``include``s one of these, sets its own
``task:`` name and ``repeats: N``, passed as a task path. Runs the model's code like ``code``."""

PRESETS: dict[str, tuple[TaskSpec, ...]] = {"openllm": OPENLLM, "demo": DEMO, "code": CODE,
                                            "code_sampled": CODE_SAMPLED}  # fmt: skip

_SHOTS = re.compile(r"^(?P<name>.+?):(?P<shots>\d+)$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def _key(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("._") or "task"


def parse_task(name: str) -> list[TaskSpec]:
    """The task(s) one name stands for (a preset gives several). Raises ConfigError for bad syntax."""
    name = name.strip()
    if name == "perplexity":
        return [PERPLEXITY]
    if name in PRESETS:
        return list(PRESETS[name])
    if name.endswith((".yaml", ".yml")):
        return [TaskSpec(_key(Path(name).stem), "lm-eval", str(Path(name).expanduser()))]
    m = _SHOTS.match(name)
    if m:
        task, shots = m["name"], int(m["shots"])
        if task in PRESETS or task == "perplexity":
            raise ConfigError(f"task {name!r}: {task} has fixed settings; a shot count is only for lm-eval tasks")
        return [TaskSpec(_key(f"{task}_{shots}shot"), "lm-eval", task, shots)]
    if not name or ":" in name:
        raise ConfigError(f"task {name!r}: expected a task name, `name:N` (N-shot) or a .yaml file")
    return [TaskSpec(_key(name), "lm-eval", name)]


def resolve_tasks(names: list[str]) -> list[TaskSpec]:
    """Every task the names stand for, in order, each key once."""
    out: dict[str, TaskSpec] = {}
    for name in names:
        for spec in parse_task(name):
            out.setdefault(spec.key, spec)
    if not out:
        raise ConfigError("no tasks to evaluate; name at least one (e.g. --tasks perplexity demo)")
    return list(out.values())
