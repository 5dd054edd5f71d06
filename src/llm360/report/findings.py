"""What each figure shows on this run, in one sentence computed from its results.

The report prints a finding under its figure and the model card lists them all, so a reader sees
what the curves say without reading them off (e.g. "the 32-extractible share of rows of seen chunks
grew from 0.0% at ckpt_000 to 21% at ckpt_005"). Every function takes
:class:`~llm360.report.collect.RunFacts` and returns None when its results are not there; nothing
here raises on a malformed file (a value of an unexpected type leaves its sentence out).
"""

from __future__ import annotations

import math
from typing import Any

from llm360.eval.demo import chance_level
from llm360.report.collect import RunFacts, read_json
from llm360.report.svg import esc
from llm360.rundir.layout import RunDir, parse_ckpt_name

ABOVE_CHANCE_STDERRS = 2.0
"""A score counts as above chance when it exceeds chance by more than this many standard errors."""


def finding_html(text: str | None) -> str:
    """A finding as the paragraph the report prints under its figure ("" when there is none)."""
    return f'<p class="finding"><b>On this run:</b> {esc(text)}</p>' if text else ""


def _num(x: Any) -> float | None:
    """x as a finite float, else None (bools, strings, huge ints, NaN and inf are not numbers here)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except OverflowError:
        return None
    return v if math.isfinite(v) else None


def _dict(x: Any) -> dict[str, Any]:
    return x if isinstance(x, dict) else {}


def _list(x: Any) -> list[Any]:
    return x if isinstance(x, list) else []


def _names(s: dict[str, Any]) -> list[str]:
    return [n for n in _list(s.get("checkpoints")) if isinstance(n, str)]


def _g(x: float) -> str:
    return f"{x:.3g}"


def _pct(x: float) -> str:
    return f"{x:.1%}" if x < 0.1 else f"{x:.0%}"


def _ckpt_rows(facts: RunFacts) -> list[tuple[int, dict[str, Any]]]:
    """(chunk, row) of the eval summary's rows of chunk checkpoints (fine-tuned models left out), in order."""
    if facts.eval is None:
        return []
    rows = [(i, r) for r in _list(facts.eval.rows) if isinstance(r, dict)
            and isinstance(r.get("checkpoint"), str) and (i := parse_ckpt_name(r["checkpoint"])) is not None]  # fmt: skip
    return sorted(rows, key=lambda t: t[0])


def _series(facts: RunFacts, column: str) -> list[tuple[str, float]]:
    return [(r["checkpoint"], v) for _, r in _ckpt_rows(facts) if (v := _num(r.get(column))) is not None]


# --------------------------------------------------------------------------------- evaluation


def perplexity_finding(facts: RunFacts, column: str = "perplexity/overall") -> str | None:
    """Whether held-out perplexity fell at every checkpoint, and from what to what."""
    pts = _series(facts, column)
    if len(pts) < 2:
        return None
    what = "Held-out perplexity" + ("" if column.endswith("/overall") else f" on {column.split('/', 1)[1]}")
    rises = [b[0] for a, b in zip(pts, pts[1:], strict=False) if b[1] >= a[1]]
    how = "fell at every checkpoint" if not rises else f"fell overall but not at {', '.join(rises)}"
    if pts[-1][1] >= pts[0][1]:
        how = "did not fall"
    return f"{what} {how}, from {_g(pts[0][1])} at {pts[0][0]} to {_g(pts[-1][1])} at {pts[-1][0]}."


def task_result(facts: RunFacts, checkpoint: str, task: str) -> dict[str, Any]:
    """The parsed ``eval/<checkpoint>/<task>.json`` ({} when missing or not an object)."""
    data, _ = read_json(RunDir(facts.root).eval_dir / checkpoint / f"{task}.json", facts)
    return _dict(data)


def _primary(result: dict[str, Any], metric: Any) -> tuple[float | None, float | None]:
    """(value, stderr) of one metric of a result file."""
    if not isinstance(metric, str):
        return None, None
    return _num(_dict(result.get("metrics")).get(metric)), _num(_dict(result.get("stderr")).get(metric))


def task_finding(facts: RunFacts, task: str) -> str | None:
    """How a task's headline metric moved over the checkpoints, and where its last score stands against
    chance (when the task declares it) in standard errors."""
    if facts.eval is None:
        return None
    metric = _dict(_dict(facts.eval.tasks).get(task)).get("primary_metric")
    if not isinstance(metric, str):
        return None
    pts = _series(facts, f"{task}/{metric}")
    if not pts:
        return None
    (c0, v0), (c1, v1) = pts[0], pts[-1]
    moved = "rose" if v1 > v0 else "fell" if v1 < v0 else "stayed"
    text = f"{task} {metric} {moved} from {_g(v0)} at {c0} to {_g(v1)} at {c1}" if len(pts) > 1 else \
        f"{task} {metric} is {_g(v1)} at {c1}"  # fmt: skip
    result = task_result(facts, c1, task)
    chance = chance_level(result)
    _, stderr = _primary(result, metric)
    if chance is not None:
        if stderr is not None and stderr > 0:
            z = (v1 - chance) / stderr
            verdict = (f"{z:.1f} standard errors above chance ({_g(chance)})" if z > ABOVE_CHANCE_STDERRS
                       else f"within {ABOVE_CHANCE_STDERRS:g} standard errors of chance ({_g(chance)})"
                       if z > -ABOVE_CHANCE_STDERRS else f"below chance ({_g(chance)})")  # fmt: skip
        else:
            verdict = f"chance is {_g(chance)}"
        text += f": {verdict}"
    return text + "."


def above_chance(facts: RunFacts, task: str, checkpoint: str) -> bool | None:
    """True when the task's headline score at that checkpoint beats its chance level by more than
    :data:`ABOVE_CHANCE_STDERRS` standard errors; None when the result, its stderr or chance is unknown."""
    result = task_result(facts, checkpoint, task)
    value, stderr = _primary(result, result.get("primary_metric"))
    chance = chance_level(result)
    if value is None or stderr is None or chance is None:
        return None
    return value - chance > ABOVE_CHANCE_STDERRS * stderr


# ------------------------------------------------------------------------------- memorization


def _mem_series(facts: RunFacts, table: str, key: str) -> list[tuple[str, float]]:
    s = _dict(facts.memorization)
    dist = _dict(s.get(table))
    return [(n, v) for n in _names(s) if (v := _num(_dict(dist.get(n)).get(key))) is not None]


def memorization_finding(facts: RunFacts) -> str | None:
    """How the k-extractible share and the mean score of seen rows changed from the first checkpoint to the last."""
    share = _mem_series(facts, "distribution", "extractible_share")
    if not share:
        return None
    mean = dict(_mem_series(facts, "distribution", "mean"))
    k = _dict(_dict(facts.memorization).get("settings")).get("prompt_tokens")
    k = f"{k}-extractible" if isinstance(k, int) and not isinstance(k, bool) else "k-extractible"
    (c0, s0), (c1, s1) = share[0], share[-1]
    if len(share) == 1:
        return f"At {c1}, {_pct(s1)} of the rows of seen chunks are {k}."
    moved = "grew" if s1 > s0 else "fell" if s1 < s0 else "stayed"
    text = f"The {k} share of rows of seen chunks {moved} from {_pct(s0)} at {c0} to {_pct(s1)} at {c1}"
    if c0 in mean and c1 in mean:
        text += f" (mean score {mean[c0]:.3f} to {mean[c1]:.3f})"
    unseen = dict(_mem_series(facts, "distribution_unseen", "mean"))
    both = [n for n, _ in share[:-1] if n in unseen and n in mean]
    if both:
        n = both[-1]
        text += f"; rows of chunks not trained on yet score {unseen[n]:.3f} at {n}, against {mean[n]:.3f} for seen ones"
        if unseen[n] >= 0.8 * mean[n] > 0:
            text += " (duplicated texts are memorized before their own copy is seen)"
    return text + "."


def distribution_finding(facts: RunFacts) -> str | None:
    """The shape of the last checkpoint's score distribution: the share at 1 and the share under 1/4."""
    s = _dict(facts.memorization)
    names = _names(s)
    if not names:
        return None
    counts = [v for c in _list(_dict(_dict(s.get("distribution")).get(names[-1])).get("counts"))
              if (v := _num(c)) is not None]  # fmt: skip
    total = sum(counts)
    if len(counts) < 2 or total <= 0:
        return None
    low = sum(counts[: max(1, len(counts) // 4)]) / total
    return (f"At {names[-1]}, {_pct(counts[-1] / total)} of the rows of seen chunks score 1 and {_pct(low)} score "
            "under 1/4: a row is mostly either reproduced whole or barely at all.")  # fmt: skip


def per_chunk_finding(facts: RunFacts) -> str | None:
    """Whether the latest chunk each checkpoint has seen scores above the chunks it saw before (Figure 8)."""
    s = _dict(facts.memorization)
    per_chunk = _dict(s.get("per_chunk"))
    skipped = {c for c in _list(s.get("skipped_chunks")) if isinstance(c, int)}
    checked, highest = [], 0
    for name in _names(s):
        pc = _dict(per_chunk.get(name))
        means = [_num(x) for x in _list(pc.get("mean"))]
        latest = pc.get("latest_seen_chunk")
        if not isinstance(latest, int) or isinstance(latest, bool) or not 0 < latest < len(means):
            continue
        here = means[latest]
        earlier = [v for c, v in enumerate(means[:latest]) if c not in skipped and v is not None]
        if here is None or not earlier:
            continue
        checked.append((name, latest, here, sum(earlier) / len(earlier)))
        highest += here >= max(earlier)
    if not checked:
        return None
    name, latest, v, avg = checked[-1]
    above = sum(1 for c in checked if c[2] > c[3])
    return (f"At {name}, its latest chunk ({latest:03d}) has mean score {v:.3f}, "
            f"{'above' if v > avg else 'below'} the {avg:.3f} of the chunks before it; the latest chunk scores "
            f"above the earlier ones' mean at {above} of {len(checked)} checkpoints and highest of all at "
            f"{highest}.")  # fmt: skip


def correlation_finding(facts: RunFacts) -> str | None:
    """How alike the per-row scores of the last checkpoint are to those of the one before and the first."""
    s = _dict(facts.memorization)
    names = _names(s)
    corr = _list(_dict(s.get("correlation")).get("score_pearson"))
    if len(names) < 3 or len(corr) != len(names):
        return None
    last = _list(corr[-1])
    if len(last) != len(names):
        return None
    prev, first = _num(last[-2]), _num(last[0])
    if prev is None or first is None:
        return None
    text = (f"Per-row scores of {names[-1]} correlate with {names[-2]} at r = {prev:.2f} and with {names[0]} at "
            f"r = {first:.2f}")  # fmt: skip
    if prev > first + 0.2:
        text += ": neighbouring checkpoints memorize much the same rows, and that set builds up over training"
    return text + "."


# ------------------------------------------------------------------------------------ training


def loss_finding(facts: RunFacts, window: int = 20) -> str | None:
    """Mean training loss of the first and the last ``window`` logged steps."""
    losses = [v for r in facts.train.records if isinstance(r, dict) and (v := _num(r.get("loss"))) is not None]
    if len(losses) < 2 * window:
        return None
    a, b = sum(losses[:window]) / window, sum(losses[-window:]) / window
    return f"Training loss went from {a:.2f} (mean of the first {window} steps) to {b:.2f} (the last {window})."


def all_findings(facts: RunFacts) -> list[tuple[str, str]]:
    """(figure, sentence) for every figure whose results are there, in the report's order."""
    out: list[tuple[str, str | None]] = [("Training loss", loss_finding(facts)),
                                         ("Held-out perplexity", perplexity_finding(facts))]  # fmt: skip
    if facts.eval is not None:
        out += [(t, task_finding(facts, t)) for t in _dict(facts.eval.tasks) if t != "perplexity"]
    out += [("Memorization over checkpoints", memorization_finding(facts)),
            ("Score distribution", distribution_finding(facts)),
            ("Mean score per chunk", per_chunk_finding(facts)),
            ("Correlation between checkpoints", correlation_finding(facts))]  # fmt: skip
    return [(k, v) for k, v in out if v]
