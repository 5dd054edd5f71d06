"""The training section of the report: loss and the other per-step curves with chunk boundaries and
events, a summary of the run, and the table of every event (NaNs, skips, rollbacks, spikes, resumes).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from llm360.report.charts import line_chart
from llm360.report.collect import RunFacts
from llm360.report.findings import finding_html, loss_finding
from llm360.report.html import (
    Ids,
    Section,
    as_dict,
    as_int,
    as_list,
    as_num,
    as_text,
    duration,
    figure,
    get_in,
    kv,
    na,
    table,
)
from llm360.report.svg import (
    MAX_POINTS,
    Legend,
    Mark,
    Series,
    VLine,
    color,
    esc,
    finite,
    fmt_si,
    fmt_value,
    to_float,
)
from llm360.rundir.layout import index_name

MAX_EVENT_ROWS = 500
"""Events listed in the table (all are counted; a run with more shows the first ones and says so)."""
SMALL = 500
"""viewBox width of the charts shown two to a row (smaller than the full width, so their text stays legible)."""
EVENT_STYLE = {
    "resume": ("#59a14f", "circle"), "init_from": ("#76b7b2", "circle"), "skip_step": ("#f28e2b", "triangle"),
    "rollback_skip_chunk": ("#e15759", "diamond"), "rollback_reseed": ("#b07aa1", "diamond"),
    "loss_spike": ("#edc948", "triangle"), "stop": ("#1f2328", "square"), "rows_unused": ("#bab0ac", "circle"),
}  # fmt: skip
_QUIET_EVENTS = {"rows_unused"}
"""Events listed in the table but not marked on the chart (one at the end of nearly every chunk)."""


def _event_text(e: dict[str, Any]) -> str:
    skip = {"event", "step", "chunk", "time", "reason"}
    extra = ", ".join(f"{k}={fmt_value(v) if not isinstance(v, str) else v}" for k, v in e.items() if k not in skip)
    reason = as_text(e.get("reason"))
    return "; ".join(x for x in (reason, extra) if x)


def _ema(values: Sequence[float], window: float) -> list[float]:
    a = 2 / (window + 1)
    out, acc = [], None
    for v in values:
        if finite(v):
            acc = v if acc is None else acc + a * (v - acc)
        out.append(acc if acc is not None else math.nan)
    return out


def training_section(facts: RunFacts, ids: Ids) -> Section:
    t = facts.train
    if not t.records:
        why = t.error or "metrics/train.jsonl holds no step records"
        if t.bad_lines:
            why += f" ({t.bad_lines} malformed lines skipped)"
        return Section("training", "Training", na(why), False)
    by_step: dict[int, dict[str, Any]] = {}
    for r in t.records:
        step = as_num(r.get("step"))
        if step is not None and step == int(step) and step >= 0:
            by_step[int(step)] = r  # a step logged twice (trained again after a resume): the last one counts
    recs = [by_step[s] for s in sorted(by_step)]
    if not recs:
        return Section("training", "Training", na("no record in metrics/train.jsonl has a step"), False)
    steps = sorted(by_step)

    def col(key: str) -> list[float]:
        return [to_float(r.get(key)) for r in recs]

    loss, gnorm, lr = col("loss"), col("grad_norm"), col("lr")
    tps, rss, mfu, stime = col("tokens_per_s"), col("rss_mb"), col("mfu"), col("step_time_s")
    slowest, fastest, mem_max = col("step_time_max_s"), col("step_time_min_s"), col("memory_max_mb")
    tokens = {s: as_num(r.get("tokens_seen")) for s, r in zip(steps, recs, strict=True)}
    chunk_of = {s: as_int(r.get("chunk")) for s, r in zip(steps, recs, strict=True)}

    def extra(x: float) -> str | None:
        s = int(x)
        parts = []
        if chunk_of.get(s) is not None:
            parts.append(f"chunk {chunk_of[s]}")
        if tokens.get(s) is not None:
            parts.append(f"{fmt_si(tokens[s])} tokens")
        return " · ".join(parts) or None

    # Chunk boundaries where the logged chunk changes; stage starts stronger.
    vlines: list[VLine] = []
    stage_first: dict[int, str] = {}
    for st in as_list(get_in(facts.manifest, "stages")):
        first = as_int(as_dict(st).get("first_chunk"))
        if first is not None and first > 0:
            stage_first[first] = as_text(st.get("name"))
    prev = None
    for step in steps:
        c = chunk_of[step]
        if c != prev and prev is not None and c is not None:
            name = index_name(c) if c >= 0 else str(c)
            if c in stage_first:
                vlines.append(VLine(step, f"stage {stage_first[c]}", f"stage {stage_first[c]} starts at step "
                                    f"{step} (chunk {name})", "var(--fg)", "6 3", strong=True))  # fmt: skip
            else:
                vlines.append(VLine(step, name, f"chunk {name} starts at step {step}"))
        prev = c

    events = [e for e in facts.events.records if isinstance(e.get("event"), str)]
    marks = []
    for e in events:
        kind, step = e["event"], as_num(e.get("step"))
        if kind in _QUIET_EVENTS or step is None:
            continue
        col_, shape = EVENT_STYLE.get(kind, ("#9c755f", "circle"))
        y = as_num(e.get("loss")) if kind in ("loss_spike", "skip_step") else None
        title = f"{kind} at step {fmt_value(e['step'])}" + (f", chunk {fmt_value(e['chunk'])}"
                                                            if e.get("chunk") is not None else "")  # fmt: skip
        text = _event_text(e)
        marks.append(Mark(step, y, title + (f": {text}" if text else ""), col_, shape))

    n = len(recs)
    nonfinite = sum(1 for v in loss if not math.isfinite(v))
    finite_loss = [v for v in loss if math.isfinite(v)]
    last_step, last_tokens = steps[-1], tokens[steps[-1]]
    world_sizes = sorted({w for w in (as_int(r.get("world_size")) for r in recs) if w is not None})
    total_time = sum(v for v in stime if math.isfinite(v))
    tps_f = [v for v in tps if math.isfinite(v)]
    mfu_f = [v for v in mfu if math.isfinite(v)]
    rss_f = [v for v in rss if math.isfinite(v)]
    mem_f = [v for v in mem_max if math.isfinite(v)]
    summary = kv([
        ("steps logged", n), ("last step", last_step),
        ("tokens seen", f"{fmt_si(last_tokens)} ({last_tokens:,.0f})" if last_tokens is not None else None),
        ("final loss (mean of last 10)", statistics.fmean(finite_loss[-10:]) if finite_loss else None),
        ("lowest loss", min(finite_loss) if finite_loss else None),
        ("non-finite losses", nonfinite),
        ("median tokens/s", statistics.median(tps_f) if tps_f else None),
        ("mean MFU", f"{statistics.fmean(mfu_f):.1%}" if mfu_f else None),
        ("time in steps", duration(total_time) if total_time else None),
        ("peak RSS", f"{max(rss_f):,.0f} MB" if rss_f else None),
        ("largest rank's memory", f"{max(mem_f):,.0f} MB" if mem_f else None),
        ("world sizes", ", ".join(str(w) for w in world_sizes) or None),
        ("chunks trained", len({c for c in chunk_of.values() if c is not None})),
    ])  # fmt: skip
    parts = [summary]
    smooth = 200 <= n <= MAX_POINTS  # longer series are drawn as range means with a min-max band
    loss_series = [Series("loss", steps, loss, color(0), 1.2 if n <= MAX_POINTS else 1.6,
                          opacity=0.5 if smooth else 1.0)]  # fmt: skip
    if smooth:
        loss_series.append(Series("loss (EMA)", steps, _ema(loss, max(5.0, n / 100)), color(0), 2.0))
    kinds = sorted({e["event"] for e in events})
    legend_items = [("loss", color(0))] + [(k, EVENT_STYLE.get(k, ("#9c755f", ""))[0]) for k in kinds
                                           if k not in _QUIET_EVENTS]  # fmt: skip
    chart = line_chart(ids("loss"), loss_series, xlabel="step", ylabel="loss", vlines=vlines, marks=marks,
                       robust=True, x_format="int", x_extra=extra, height=320, aria="training loss by step")  # fmt: skip
    sub = "dashed lines: chunk boundaries (a checkpoint after each); marks: events"
    if n > MAX_POINTS:
        sub += f"; {n:,} steps drawn as {MAX_POINTS:,} range means with their min-max band"
    if nonfinite:
        sub += f"; {nonfinite} non-finite loss{'es' if nonfinite != 1 else ''} left as gaps"
    parts.append(figure(chart, "Training loss", sub, Legend(legend_items).html()))
    parts.append(finding_html(loss_finding(facts)))
    small = []
    if any(math.isfinite(v) for v in gnorm):
        pos = [v for v in gnorm if math.isfinite(v) and v > 0]
        log = bool(pos) and max(pos) / max(min(pos), 1e-30) > 30
        clip = as_num(get_in(facts.config, "train", "grad_clip"))
        hl = [(clip, f"clip {fmt_value(clip)}")] if clip is not None and clip > 0 else []
        ch = line_chart(ids("gnorm"), [Series("grad norm", steps, gnorm, color(1), 1.2)], xlabel="step",
                        ylabel="grad norm", vlines=vlines, log_y=log, robust=True, x_format="int",
                        x_extra=extra, hlines=hl, height=240, width=SMALL, aria="gradient norm by step")  # fmt: skip
        small.append(figure(ch, "Gradient norm", "before clipping" + (", log scale" if log else ""), cls="card"))
    if any(math.isfinite(v) for v in lr):
        ch = line_chart(ids("lr"), [Series("learning rate", steps, lr, color(2), 1.6)], xlabel="step",
                        ylabel="learning rate", vlines=vlines, y_min=0.0, x_format="int", x_extra=extra,
                        height=240, width=SMALL, aria="learning rate by step")  # fmt: skip
        small.append(figure(ch, "Learning rate", cls="card"))
    if tps_f:
        series = [Series("tokens/s", steps, tps, color(4), 1.2, opacity=0.5 if smooth else 1.0)]
        if smooth:
            series.append(Series("tokens/s (EMA)", steps, _ema(tps, max(5.0, n / 100)), color(4), 2.0))
        ch = line_chart(ids("tps"), series, xlabel="step", ylabel="tokens / s", vlines=vlines, robust=True,
                        y_min=0.0, x_format="int", x_extra=extra, height=240, width=SMALL,
                        aria="throughput by step")  # fmt: skip
        small.append(figure(ch, "Throughput", "tokens per second, all ranks", cls="card"))
    if mfu_f:
        ch = line_chart(ids("mfu"), [Series("MFU", steps, mfu, color(6), 1.2)], xlabel="step", ylabel="MFU",
                        y_min=0.0, x_format="int", x_extra=extra, height=240, width=SMALL,
                        aria="model FLOPs utilisation")  # fmt: skip
        small.append(figure(ch, "Model FLOPs utilisation", cls="card"))
    if any(math.isfinite(v) for v in slowest):
        ch = line_chart(ids("ranktime"), [Series("slowest rank", steps, slowest, color(3), 1.2),
                                          Series("fastest rank", steps, fastest, color(5), 1.2)],
                        xlabel="step", ylabel="step time (s)", robust=True, y_min=0.0, x_format="int",
                        x_extra=extra, height=240, width=SMALL, aria="slowest and fastest rank's step time")  # fmt: skip
        small.append(figure(ch, "Step time across ranks", "the slowest and the fastest rank of each step",
                            Legend([("slowest rank", color(3)), ("fastest rank", color(5))]).html(), cls="card"))
    if mem_f:
        ch = line_chart(ids("rankmem"), [Series("MB", steps, mem_max, color(7), 1.2)], xlabel="step",
                        ylabel="memory (MB)", y_min=0.0, x_format="int", height=240, width=SMALL,
                        aria="largest rank's peak memory by step")  # fmt: skip
        small.append(figure(ch, "Memory, largest rank", "peak so far: CUDA allocated on GPUs, resident set on CPU",
                            cls="card"))
    if rss_f:
        ch = line_chart(ids("rss"), [Series("RSS MB", steps, rss, color(8), 1.2)], xlabel="step",
                        ylabel="resident memory (MB)", x_format="int", height=240, width=SMALL,
                        aria="host memory by step")  # fmt: skip
        small.append(figure(ch, "Host memory", "resident set size of the main process", cls="card"))
    if small:
        parts.append('<div class="grid two">' + "".join(small) + "</div>")
    parts.append(events_block(facts, events))
    return Section("training", "Training", "".join(parts), True)


def events_block(facts: RunFacts, events: list[dict[str, Any]]) -> str:
    ev = facts.events
    if not ev.present:
        return "<h3>Events</h3>" + na(ev.error or "no metrics/events.jsonl")
    if not events:
        bad = f" ({ev.bad_lines} malformed lines skipped)" if ev.bad_lines else ""
        return (f'<h3>Events</h3><p class="small">No events: no resume, skip, rollback, spike or stop'
                f"{esc(bad)}.</p>")  # fmt: skip
    counts: dict[str, int] = {}
    for e in events:
        counts[e["event"]] = counts.get(e["event"], 0) + 1
    keys = Legend([(f"{k}: {v}", EVENT_STYLE.get(k, ("#9c755f", ""))[0]) for k, v in sorted(counts.items())]).html()
    def order(e: dict[str, Any]) -> tuple[float, float]:
        step, when = as_num(e.get("step")), as_num(e.get("time"))
        return (step if step is not None else math.inf, when if when is not None else 0.0)

    ordered = sorted(events, key=order)
    rows = []
    for e in ordered[:MAX_EVENT_ROWS]:
        when = ""
        if (t := as_num(e.get("time"))) is not None:
            try:
                when = datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
            except (OverflowError, OSError, ValueError):
                when = fmt_value(t)
        c = e.get("chunk")
        rows.append((e.get("step") if as_num(e.get("step")) is not None else "—", e["event"],
                     index_name(c) if as_int(c) is not None and c >= 0 else ("—" if c is None else fmt_value(c)), _event_text(e),
                     when))  # fmt: skip
    more = (f'<p class="small">{len(ordered) - MAX_EVENT_ROWS:,} more events not listed; all are in '
            "metrics/events.jsonl.</p>") if len(ordered) > MAX_EVENT_ROWS else ""  # fmt: skip
    quiet = [k for k in counts if k in _QUIET_EVENTS]
    note = f' <span class="small">({", ".join(quiet)} not marked on the chart)</span>' if quiet else ""
    return (f"<h3>Events{note}</h3>{keys}<details{' open' if len(ordered) <= 30 else ''}><summary>"
            f"{len(ordered):,} event{'s' if len(ordered) != 1 else ''}</summary>"
            + table(("step", "event", "chunk", "details", "time (UTC)"), rows, numeric=(0,)) + more + "</details>")
