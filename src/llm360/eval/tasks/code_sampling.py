"""Filters of llm360's sampled code tasks (``llm360_humaneval_sampled_n20``, ``llm360_mbpp_sampled_n20``).

lm-eval keeps only the first response of a request unless a task names a filter; with
``repeats: n`` a task that scores pass@1 over all n samples needs one that keeps them all. The
metrics themselves are lm-eval's own (``lm_eval.tasks.humaneval.utils``, ``lm_eval.tasks.mbpp.utils``,
named in the YAML files), which run the generated code through Hugging Face's ``code_eval``.
"""

from __future__ import annotations

from collections.abc import Iterable


def all_samples(resps: Iterable[list[str]], docs: Iterable[dict]) -> list[list[str]]:
    """Every response of every request, in order (lm-eval's default filter keeps only the first)."""
    return [list(r) for r in resps]
