"""The result sections of the report: evaluations over checkpoints, memorization (the paper's figures
7-9) and contamination of the evaluation sets.
"""

from __future__ import annotations

import math
from typing import Any

from llm360.report.charts import bar_chart, heatmap, line_chart, share_bars
from llm360.report.collect import RunFacts
from llm360.report.findings import (
    correlation_finding,
    distribution_finding,
    finding_html,
    memorization_finding,
    per_chunk_finding,
    perplexity_finding,
    task_finding,
)
from llm360.report.html import (
    Ids,
    Raw,
    Section,
    as_dict,
    as_int,
    as_list,
    as_num,
    as_text,
    figure,
    get_in,
    na,
    pct,
    pick,
    table,
)
from llm360.report.svg import (
    Legend,
    Mark,
    Series,
    color,
    esc,
    fmt_si,
    fmt_value,
    sequential,
)
from llm360.rundir.layout import parse_ckpt_name

MAX_HISTOGRAMS = 6
MAX_CHUNK_LINES = 8
MAX_HEATMAP = 40
EVAL_W = 340
"""viewBox width of the evaluation charts, several to a row."""


def eval_section(facts: RunFacts, ids: Ids) -> Section:
    e = facts.eval
    if e is None:
        return Section("evaluations", "Evaluations", na(facts.eval_error or "no evaluation results"), False)
    # chunk checkpoints by index, then the other models (fine-tuned ones), which are not on the x axis
    rows = sorted(e.rows, key=lambda r: (parse_ckpt_name(r["checkpoint"]) is None,
                                         parse_ckpt_name(r["checkpoint"]) or 0))  # fmt: skip
    by_x = {i: r for r in rows if (i := parse_ckpt_name(r["checkpoint"])) is not None}

    def extra(x: float) -> str | None:
        r = by_x.get(int(x))
        if r is None:
            return None
        bits = [r["checkpoint"]]
        if (step := as_int(r.get("step"))) is not None:
            bits.append(f"step {step:,}")
        if (seen := as_num(r.get("tokens_seen"))) is not None:
            bits.append(f"{fmt_si(seen)} tokens")
        return " · ".join(bits)

    tasks = {str(k): as_dict(v) for k, v in as_dict(e.tasks).items()}
    primary = {f"{k}/{v.get('primary_metric')}" for k, v in tasks.items()} | {"openllm/average"}
    ordered = [c for c in e.columns if c in primary] + [c for c in e.columns if c not in primary]
    figs = []
    for i, col_name in enumerate(ordered):
        xs = [x for x in by_x if as_num(by_x[x].get(col_name)) is not None]
        if not xs:
            continue
        ys = [float(by_x[x][col_name]) for x in xs]
        task, _, metric = col_name.partition("/")
        shots = as_int(tasks.get(task, {}).get("num_fewshot"))
        sub = " · ".join(x for x in (metric, f"{shots}-shot" if shots is not None else "",
                                     "headline" if col_name in primary else "") if x)  # fmt: skip
        ch = line_chart(ids("eval"), [Series(metric or col_name, xs, ys, color(i), 1.8, markers=True)],
                        xlabel="checkpoint (chunk)", ylabel=metric, x_format="int", x_extra=extra, height=230,
                        width=EVAL_W, aria=f"{col_name} over checkpoints")  # fmt: skip
        figs.append(figure(ch, task, sub, cls="card"))
    head = [c for c in ordered if c in primary]
    trows = [(r["checkpoint"], r.get("step"), r.get("tokens_seen"), *[r.get(c) for c in head]) for r in rows]
    full = [(r["checkpoint"], r.get("step"), r.get("tokens_seen"), *[r.get(c) for c in ordered]) for r in rows]
    n_ck = len(rows)
    n_tasks = len(tasks) or len({c.split("/")[0] for c in e.columns})
    body = (f'<p class="lead">{n_tasks} task{"s" if n_tasks != 1 else ""} on {n_ck} '
            f"checkpoint{'s' if n_ck != 1 else ''}, from {esc(e.source)}.</p>"
            + (f'<div class="grid">{"".join(figs)}</div>' if figs else na("no numeric results"))
            + finding_html(perplexity_finding(facts))
            + "".join(finding_html(task_finding(facts, t)) for t in tasks if t != "perplexity")
            + f"<details{' open' if len(rows) <= 20 else ''}><summary>headline numbers by checkpoint</summary>"
            + table(("checkpoint", "step", "tokens seen", *head), trows, numeric=range(1, 3 + len(head)))
            + "</details><details><summary>every metric</summary>"
            + table(("checkpoint", "step", "tokens seen", *ordered), full, numeric=range(1, 3 + len(ordered)))
            + "</details>")  # fmt: skip
    return Section("evaluations", "Evaluations", body, True)


# ------------------------------------------------------------------------------ memorization


def memorization_section(facts: RunFacts, ids: Ids) -> Section:
    title = "Memorization"
    s = facts.memorization
    if s is None and not facts.memorization_metas:
        return Section("memorization", title, na(facts.memorization_error or "no memorization results"), False)
    if s is None:
        return Section("memorization", title, _memorization_metas_only(facts, ids), True)
    names = [as_text(n) for n in as_list(s.get("checkpoints"))]
    chunk_of = [as_int(c) for c in as_list(s.get("checkpoint_chunk"))] or [parse_ckpt_name(n) for n in names]
    settings = as_dict(s.get("settings"))
    k, L = as_int(settings.get("prompt_tokens")), as_int(settings.get("continuation_tokens"))
    dist, dist_u = as_dict(s.get("distribution")), as_dict(s.get("distribution_unseen"))
    parts = [f'<p class="lead">Memorization score (k={esc(fmt_value(k))}, l={esc(fmt_value(L))}): the share of l '
             "greedily generated tokens equal to the training row's true continuation after its first k tokens; "
             f"score 1 means the row is k-extractible. {esc(fmt_value(settings.get('rows_per_chunk')))} rows "
             f"sampled per chunk, {esc(as_text(settings.get('dtype')))}.</p>"]  # fmt: skip
    xs = [c for c in chunk_of if c is not None]
    if names and len(xs) == len(names):

        def line(d: dict[str, Any], key: str) -> list[float]:
            return [v if (v := as_num(get_in(d, n, key))) is not None else math.nan for n in names]

        series = [Series("mean score, seen chunks", xs, line(dist, "mean"), color(0), 2, markers=True),
                  Series("k-extractible share, seen chunks", xs, line(dist, "extractible_share"), color(3), 2,
                         markers=True),
                  Series("mean score, unseen chunks", xs, line(dist_u, "mean"), color(4), 1.5, dash="5 4",
                         markers=True)]  # fmt: skip
        ch = line_chart(ids("mem"), series, xlabel="checkpoint (chunk)", ylabel="score / share", y_min=0.0,
                        x_format="int", height=260, aria="memorization over checkpoints")  # fmt: skip
        legend = Legend([(x.name, x.color) for x in series]).html()
        parts.append(figure(ch, "Memorization over checkpoints", "", legend))
        parts.append(finding_html(memorization_finding(facts)))
    # Score distributions (fig. 7 of the paper).
    values = [v for v in as_list(s.get("score_values")) if as_num(v) is not None]
    if not values and L is not None and 0 < L <= 4096:  # l is 32 in the paper; anything huge is not a setting
        values = [j / L for j in range(L + 1)]
    hists = []
    for i in pick(len(names), MAX_HISTOGRAMS):
        d = as_dict(dist.get(names[i]))
        counts = [as_num(c) or 0.0 for c in as_list(d.get("counts"))]
        if not counts:
            continue
        rows = as_num(d.get("rows")) or sum(counts)
        labels = [f"{v:.2g}" for v in values[: len(counts)]]
        labels += [str(j) for j in range(len(labels), len(counts))]
        cols = [color(3) if j == len(counts) - 1 else color(0) for j in range(len(counts))]
        titles = [f"score {labels[j]}: {counts[j]:,.0f} rows" + (f" ({counts[j] / rows:.1%})" if rows else "")
                  for j in range(len(counts))]  # fmt: skip
        share = as_num(d.get("extractible_share"))
        ann = {len(counts) - 1: f"score 1: {share:.1%}" if share is not None else "score 1"}
        ch = bar_chart(ids("hist"), labels, counts, titles=titles, colors=cols, xlabel="memorization score",
                       ylabel="rows", annotate=ann, width=360, height=230,
                       aria=f"score distribution {names[i]}")  # fmt: skip
        hists.append(figure(ch, names[i], f"{rows:,.0f} rows of seen chunks · mean {fmt_value(d.get('mean'))}",
                            cls="card"))  # fmt: skip
    if hists:
        shown = f"{len(hists)} of {len(names)} checkpoints" if len(names) > len(hists) else "every checkpoint"
        parts.append(f"<h3>Score distribution <span class=\"small\">({shown}; red: score 1, k-extractible)</span>"
                     f"</h3><div class=\"grid\">{''.join(hists)}</div>")  # fmt: skip
        parts.append(finding_html(distribution_finding(facts)))
    # Mean score per chunk (fig. 8).
    per_chunk = as_dict(s.get("per_chunk"))
    sel = pick(len(names), MAX_CHUNK_LINES)
    series, marks = [], []
    for j, i in enumerate(sel):
        pc = as_dict(per_chunk.get(names[i]))
        means = [v if (v := as_num(x)) is not None else math.nan for x in as_list(pc.get("mean"))]
        if not any(math.isfinite(v) for v in means):
            continue
        c = sequential(j / max(len(sel) - 1, 1))
        series.append(Series(names[i], list(range(len(means))), means, c, 1.8))
        latest = as_int(pc.get("latest_seen_chunk"))
        if latest is not None and 0 <= latest < len(means) and math.isfinite(means[latest]):
            marks.append(Mark(latest, means[latest], f"{names[i]}: latest chunk seen is {latest}", c, "diamond"))
    if series:
        ch = line_chart(ids("perchunk"), series, xlabel="chunk", ylabel="mean score", marks=marks,
                        x_format="int", height=280, aria="mean memorization score per chunk")  # fmt: skip
        legend = Legend([(x.name, x.color) for x in series]).html()
        parts.append(figure(ch, "Mean score per chunk", "diamond: the latest chunk the checkpoint has seen; "
                            "chunks after it are not trained on yet", legend))  # fmt: skip
        parts.append(finding_html(per_chunk_finding(facts)))
    # Correlation between checkpoints (fig. 9).
    corr = as_list(get_in(s, "correlation", "score_pearson"))
    if len(corr) == len(names) and len(names) >= 2:
        idx = pick(len(names), MAX_HEATMAP)
        sub_m = [[as_num(as_list(corr[a])[b]) if b < len(as_list(corr[a])) else None for b in idx] for a in idx]
        ch = heatmap(ids("corr"), [names[i] for i in idx], sub_m, what="Pearson r of per-row scores",
                     aria="correlation of memorization scores between checkpoints")  # fmt: skip
        note = f"; {len(idx)} of {len(names)} checkpoints shown" if len(idx) < len(names) else ""
        parts.append(figure(ch, "Correlation of per-row scores between checkpoints",
                            f"Pearson r over the rows of chunks both have seen{note}"))  # fmt: skip
        parts.append(finding_html(correlation_finding(facts)))
    return Section("memorization", title, "".join(parts), True)


def _memorization_metas_only(facts: RunFacts, ids: Ids) -> str:
    metas = sorted(facts.memorization_metas, key=lambda m: as_int(m.get("chunk")) or 0)
    rows = [(as_text(m.get("checkpoint")), m.get("rows"), m.get("mean_score_seen"), m.get("mean_score_unseen"),
             m.get("extractible_seen")) for m in metas]  # fmt: skip
    pts = [(x, y) for m in metas if (x := as_int(m.get("chunk"))) is not None
           and (y := as_num(m.get("mean_score_seen"))) is not None]  # fmt: skip
    out = na("analysis/memorization/summary.json is missing: distributions and correlations need it "
             "(run `llm360 analyze memorization` to rebuild it)")  # fmt: skip
    if pts:
        ch = line_chart(ids("mem"), [Series("mean score, seen chunks", [p[0] for p in pts], [p[1] for p in pts],
                                            color(0), 2, markers=True)], xlabel="checkpoint (chunk)",
                        ylabel="mean score", y_min=0.0, x_format="int", height=220)  # fmt: skip
        out += figure(ch, "Mean memorization score over checkpoints")
    return out + table(("checkpoint", "rows", "mean score (seen)", "mean score (unseen)", "k-extractible (seen)"),
                       rows, numeric=(1, 2, 3, 4))  # fmt: skip


# ------------------------------------------------------------------------------ contamination


def contamination_section(facts: RunFacts, ids: Ids) -> Section:
    title = "Contamination"
    tasks = facts.contamination
    if not tasks:
        return Section("contamination", title, na(facts.contamination_error or "no contamination results"), False)
    names = list(tasks)
    rows = []
    for n in names:
        t = tasks[n]
        b = as_dict(t.get("buckets"))

        def bucket(key: str, b: dict[str, Any] = b) -> str:
            x = as_dict(b.get(key))
            count, share = as_num(x.get("examples")), as_num(x.get("share"))
            if count is None:
                return "—"
            return f"{count:,.0f}" + (f" ({share:.1%})" if share is not None else "")

        rows.append((n, t.get("ngram"), t.get("examples"), t.get("contaminated_examples"),
                     pct(t.get("contaminated_share")), pct(t.get("contaminated_tokens_share")),
                     bucket("clean"), bucket("not_clean"), bucket("not_dirty"), bucket("dirty"),
                     as_text(t.get("first_checkpoint_that_saw_it")) or "—"))  # fmt: skip
    th = next((d for n in names if (d := as_dict(tasks[n].get("thresholds")))), {})
    clean_below = as_num(th.get("clean_below"))
    dirty_at = as_num(th.get("dirty_at_least"))
    clean_below = 0.2 if clean_below is None else clean_below
    dirty_at = 0.8 if dirty_at is None else dirty_at
    parts = [f'<p class="lead">n-gram overlap of evaluation sets with the training rows. An example is '
             f"contaminated when one of its n-grams occurs in the training data; by the Llama 2 buckets it is "
             f"clean below {clean_below:.0%} contaminated tokens and dirty from {dirty_at:.0%}.</p>",
             table(("task", "n", "examples", "contaminated", "share", "token share", "clean", "not clean",
                    "not dirty", "dirty", "first seen by"), rows, numeric=range(1, 10))]  # fmt: skip
    # One bar per task: clean | between | dirty shares.
    cats, clean, mid, dirty = [], [], [], []
    for n in names:
        b = as_dict(tasks[n].get("buckets"))
        ex = as_num(tasks[n].get("examples"))
        c_, d_ = as_num(get_in(b, "clean", "examples")), as_num(get_in(b, "dirty", "examples"))
        if not ex or ex <= 0 or c_ is None or d_ is None:
            continue
        cats.append(n)
        clean.append(min(max(c_ / ex, 0.0), 1.0))
        dirty.append(min(max(d_ / ex, 0.0), 1.0 - clean[-1]))
        mid.append(max(0.0, 1 - clean[-1] - dirty[-1]))
    if cats:
        ch = share_bars(ids("contam"), cats, [("clean", clean, color(2)), ("between", mid, color(5)),
                                              ("dirty", dirty, color(3))], aria="contamination buckets")  # fmt: skip
        legend = Legend([(f"clean (< {clean_below:.0%})", color(2)), ("between", color(5)),
                         (f"dirty (≥ {dirty_at:.0%})", color(3))]).html()  # fmt: skip
        parts.append(figure(ch, "Examples by contamination bucket", "", legend))
    series = []
    for i, n in enumerate(names):
        seen = [v if (v := as_num(x)) is not None else math.nan
                for x in as_list(tasks[n].get("contaminated_examples_seen_by_checkpoint"))]
        if any(math.isfinite(v) and v > 0 for v in seen):
            series.append(Series(n, list(range(len(seen))), seen, color(i), 1.8, markers=len(seen) <= 40))
    if series:
        ch = line_chart(ids("contam-seen"), series, xlabel="checkpoint (chunk)", ylabel="contaminated examples seen",
                        y_min=0.0, x_format="int", height=240,
                        aria="contaminated examples seen by checkpoint")  # fmt: skip
        parts.append(figure(ch, "Contaminated examples the model has seen, by checkpoint", "",
                            Legend([(x.name, x.color) for x in series]).html()))  # fmt: skip
    for n in names:
        top = [x for x in as_list(tasks[n].get("top_examples")) if isinstance(x, dict)]
        if not top:
            continue
        trs = [(x.get("contamination"), _first_seen_in(x),
                Raw(f"<code>{esc(as_text(x.get('matched_ngram')))}</code>"), as_text(x.get("text"))[:300])
               for x in top]  # fmt: skip
        parts.append(f"<details><summary>{esc(n)}: most contaminated examples</summary>"
                     + table(("contamination", "first seen in", "matched n-gram", "example"), trs, numeric=(0,))
                     + "</details>")  # fmt: skip
    return Section("contamination", title, "".join(parts), True)


def _first_seen_in(example: dict[str, Any]) -> str:
    """The first checkpoint trained on an example's n-grams (chunks a guard skipped left out), or "—"."""
    if "first_seen_by" in example:
        return as_text(example["first_seen_by"]) or "—"
    return as_text(get_in(example, "first_occurrence", "checkpoint")) or "—"  # a result file without first_seen_by
