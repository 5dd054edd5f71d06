"""The sections of the report page, each built from :class:`~llm360.report.collect.RunFacts`.

A section function returns a :class:`Section`: its HTML, or a one-line "not available: <why>" when
its data is not there. Every text that comes from a file goes through :func:`esc`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from llm360.config import parametrization_text
from llm360.report.collect import RunFacts
from llm360.report.svg import (
    MAX_POINTS,
    Legend,
    Mark,
    Series,
    VLine,
    bar_chart,
    color,
    esc,
    finite,
    fmt_si,
    fmt_value,
    heatmap,
    line_chart,
    sequential,
    share_bars,
    stacked_bars,
    to_float,
)
from llm360.report.transparency import transparency_rows
from llm360.rundir.layout import parse_ckpt_name

MAX_EVENT_ROWS = 500
"""Events listed in the table (all are counted; a run with more shows the first ones and says so)."""
MAX_HISTOGRAMS = 6
MAX_CHUNK_LINES = 8
MAX_HEATMAP = 40
SMALL = 500
"""viewBox width of the charts shown two to a row (smaller than the full width, so their text stays legible)."""
EVAL_W = 340


@dataclass
class Section:
    id: str
    title: str
    body: str
    available: bool
    failed: bool = False
    """Its files parsed but held the wrong shapes (marked ``data-failed`` on the page)."""

    def html(self) -> str:
        failed = ' data-failed="yes"' if self.failed else ""
        return (f'<section id="{esc(self.id)}" data-available="{"yes" if self.available else "no"}"{failed}>'
                f"<h2>{esc(self.title)}</h2>{self.body}</section>")  # fmt: skip


class Ids:
    """Unique element ids for the charts of one page (deterministic: same run, same page)."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}-{self.n}"


def na(why: str) -> str:
    return f'<p class="na">not available: {esc(why)}</p>'


def table(
    headers: Sequence[str], rows: Iterable[Sequence[Any]], *, numeric: Iterable[int] = (), cls: str = ""
) -> str:
    """An HTML table; cells are escaped unless given as ``Raw``; ``numeric`` columns are right-aligned."""
    num = set(numeric)
    head = "".join(f'<th{" class=num" if i in num else ""}>{esc(h)}</th>' for i, h in enumerate(headers))
    body = []
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            text = v.html if isinstance(v, Raw) else esc(fmt_value(v) if not isinstance(v, str) else v)
            cells.append(f'<td{" class=num" if i in num else ""}>{text}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table class="{esc(cls)}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")  # fmt: skip


@dataclass
class Raw:
    """Cell content that is already HTML."""

    html: str


def kv(items: Iterable[tuple[str, Any]]) -> str:
    cells = [f"<div><dt>{esc(k)}</dt><dd>{esc(v if isinstance(v, str) else fmt_value(v))}</dd></div>"
             for k, v in items if v is not None and v != ""]  # fmt: skip
    return f'<dl class="kv">{"".join(cells)}</dl>' if cells else ""


def figure(chart: str, caption: str, sub: str = "", legend: str = "", cls: str = "") -> str:
    small = f' <span class="small">{esc(sub)}</span>' if sub else ""
    return f'<figure class="{esc(cls)}"><figcaption>{esc(caption)}{small}</figcaption>{legend}{chart}</figure>'


def _get(d: Any, *keys: str) -> Any:
    """d[k1][k2]..., or None where a level is missing or not an object."""
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def as_dict(x: Any) -> dict[str, Any]:
    """x if it is a JSON object, else an empty one: files can hold anything, the page must not care."""
    return x if isinstance(x, dict) else {}


def as_list(x: Any) -> list[Any]:
    return x if isinstance(x, list) else []


def as_int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def as_num(x: Any) -> float | None:
    """A finite number as float, else None (bools, strings, NaN and inf are not numbers here)."""
    return float(x) if finite(x) else None


def as_text(x: Any, default: str = "") -> str:
    return default if x is None else str(x)


def pct(x: Any) -> str:
    v = as_num(x)
    return f"{v:.1%}" if v is not None else "—"


def pick(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n), first and last included."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


# ------------------------------------------------------------------------------ header/config


def run_name(facts: RunFacts) -> str:
    name = _get(facts.config, "name")
    return str(name) if name else facts.root.resolve().name


def transparency_section(facts: RunFacts) -> Section:
    rows = transparency_rows(facts)
    body = ['<p class="lead">What this folder lets anyone reproduce and study, after Table 1 of the LLM360 paper. '
            "Every answer is filled from the files present, with the evidence.</p>",
            '<div class="scroll"><table class="transparency"><thead><tr><th>Artifact</th><th>Released</th>'
            "<th>Evidence</th></tr></thead><tbody>"]  # fmt: skip
    for r in rows:
        body.append(f'<tr data-row="{esc(r.key)}" data-status="{esc(r.status)}"><td>{esc(r.label)}</td>'
                    f'<td><span class="badge {esc(r.status)}">{esc(r.status)}</span></td><td>{esc(r.evidence)}</td></tr>')  # fmt: skip
    body.append("</tbody></table></div>")
    return Section("transparency", "Transparency", "".join(body), True)


def config_section(facts: RunFacts) -> Section:
    c = facts.config
    if c is None:
        return Section("config", "Configuration", na(facts.config_error or "no config.yaml"), False)
    data, model, train = as_dict(c.get("data")), as_dict(c.get("model")), as_dict(c.get("train"))
    seq, gb = as_int(data.get("seq_len")), as_int(train.get("global_batch_sequences"))
    stages = as_list(data.get("stages"))
    guards = as_dict(train.get("guards"))
    tok = as_dict(data.get("tokenizer"))
    items: list[tuple[str, Any]] = [
        ("run name", c.get("name")), ("preset", c.get("preset") or "none"), ("model", model.get("name")),
        ("sequence length", seq), ("data seed", data.get("seed")),
        ("chunks", f"{len(stages)} stages" if stages else data.get("chunks")),
        ("tokenizer", f"{as_text(tok.get('kind'), '?')} (vocab {as_text(tok.get('vocab_size'), '?')})"
         if tok else None),
        ("global batch", f"{gb} sequences" if gb else None),
        ("tokens per step", f"{gb * seq:,}" if gb is not None and seq is not None else None),
        ("micro batch", train.get("micro_batch_sequences")),
        ("learning rate", f"{fmt_value(train.get('lr'))} → {fmt_value(train.get('min_lr'))} (cosine)"
         if "lr" in train else None),
        ("warmup steps", train.get("warmup_steps")),
        ("AdamW betas", f"{fmt_value(train.get('beta1'))}, {fmt_value(train.get('beta2'))}"
         if "beta1" in train else None),
        ("weight decay", _get(train, "weight_decay")), ("grad clip", _get(train, "grad_clip")),
        ("precision", _get(train, "precision")), ("deterministic", _get(train, "deterministic")),
        ("parallelism", _get(train, "parallelism")), ("train seed", _get(train, "seed")),
        ("non-finite policy", _get(guards, "nonfinite_policy")), ("spike policy", _get(guards, "spike_policy")),
    ]  # fmt: skip
    body = kv(items)
    if facts.config_text:
        body += f"<details><summary>config.yaml (as written)</summary><pre>{esc(facts.config_text)}</pre></details>"
    return Section("config", "Configuration", body, True)


# Amber (LLM360 paper, Table 3), for scale.
_AMBER = {"hidden size": 4096, "intermediate size": 11008, "attention heads": 32, "key/value heads": 32,
          "layers": 32, "vocabulary": 32000, "sequence length": 2048, "normalization": "RMSNorm, eps 1e-06",
          "RoPE": "θ 10000, all dims", "tied embeddings": "no", "parametrization": "standard",
          "parameters": "6.74B"}  # fmt: skip


def architecture_section(facts: RunFacts) -> Section:
    m = facts.model_config
    if m is None:
        why = ("no config.json in any checkpoint" if facts.checkpoints
               else "no checkpoints/ folder (run `llm360 train`)")  # fmt: skip
        return Section("architecture", "Architecture", na(why), False)
    ck = next((c for c in facts.checkpoints if c.name == facts.model_config_from), None)
    seq = as_int(_get(facts.config, "data", "seq_len")) or m.get("max_position_embeddings")
    if "rms_norm_eps" in m:
        norm = f"RMSNorm, eps {fmt_value(m['rms_norm_eps'])}"
    elif "layer_norm_eps" in m:
        norm = f"LayerNorm, eps {fmt_value(m['layer_norm_eps'])}"
    else:
        norm = "—"
    frac = as_num(m.get("partial_rotary_factor"))
    model = as_dict(_get(facts.config, "model"))  # muP is not in config.json
    rope = f"θ {fmt_value(m.get('rope_theta'))}, " + ("all dims" if frac in (None, 1.0) else f"{frac:.0%} of dims")
    params = ck.parameters if ck is not None else None
    ours = {
        "hidden size": m.get("hidden_size"), "intermediate size": m.get("intermediate_size"),
        "attention heads": m.get("num_attention_heads"),
        "key/value heads": m.get("num_key_value_heads", m.get("num_attention_heads")),
        "layers": m.get("num_hidden_layers"), "vocabulary": m.get("vocab_size"), "sequence length": seq,
        "normalization": norm, "RoPE": rope, "tied embeddings": "yes" if m.get("tie_word_embeddings") else "no",
        "parametrization": parametrization_text(model) if model else "—",
        "parameters": f"{fmt_si(params)} ({params:,})" if params else "—",
    }  # fmt: skip
    rows = [(k, v if isinstance(v, str) else fmt_value(v), _AMBER[k]) for k, v in ours.items()]
    dtypes = ", ".join(ck.model_dtypes) if ck is not None and ck.model_dtypes else "unknown"
    body = (f'<p class="lead">From {esc(facts.model_config_from)}/config.json (Hugging Face '
            f"{esc(m.get('model_type', '?'))} format); weights stored as {esc(dtypes)}. "
            "Amber, LLM360's 7B model, for scale.</p>"
            + table(("", "this run", "Amber (paper)"), rows, numeric=(1, 2)))  # fmt: skip
    return Section("architecture", "Architecture", body, True)


# ------------------------------------------------------------------------------------ data


def data_section(facts: RunFacts, ids: Ids) -> Section:
    m = facts.manifest
    if m is None:
        why = facts.manifest_error or "no data/manifest.json (run `llm360 prepare`)"
        return Section("data", "Data", na(why), False)
    sources = as_dict(m.get("sources"))
    chunks = [c for c in as_list(m.get("chunks")) if isinstance(c, dict)]
    per_chunk = [as_dict(c.get("tokens_per_source")) for c in chunks]
    names = list(sources) or sorted({str(s) for tps in per_chunk for s in tps})

    def tokens(tps: dict[str, Any], n: str) -> float:
        return as_num(tps.get(n)) or 0.0

    in_chunks = {n: sum(tokens(tps, n) for tps in per_chunk) for n in names}
    total_chunk_tokens = sum(in_chunks.values())
    total = as_int(m.get("total_tokens"))
    parts = [kv([
        ("tokens in chunks", f"{fmt_si(total)} ({total:,})" if total is not None else None),
        ("training rows", m.get("total_rows")), ("row length", m.get("row_length")), ("chunks", m.get("num_chunks")),
        ("vocabulary", m.get("vocab_size")), ("token dtype", m.get("token_dtype")), ("data seed", m.get("seed")),
        ("tokenizer sha256", as_text(m.get("tokenizer_sha256"))[:12] + "…" if m.get("tokenizer_sha256") else None),
    ])]  # fmt: skip
    if sources:
        rows = []
        for i, n in enumerate(names):
            s = as_dict(sources.get(n))
            rej = as_dict(s.get("documents_rejected"))
            rej_text = ", ".join(f"{k}: {fmt_value(v)}" for k, v in rej.items()) or "0"
            share = in_chunks.get(n, 0) / total_chunk_tokens if total_chunk_tokens else None
            rows.append((Raw(f'<i class="sw" style="display:inline-block;width:10px;height:10px;border-radius:2px;'
                             f'background:{color(i)};margin-right:6px"></i>{esc(n)}'),
                         as_text(s.get("kind")), s.get("documents_in"), s.get("documents_used"), rej_text,
                         s.get("tokens_train_documents"), in_chunks.get(n), pct(share), s.get("valid_rows")))  # fmt: skip
        parts.append("<h3>Sources</h3>" + table(
            ("source", "kind", "documents in", "used", "rejected (reason: count)", "train tokens (documents)",
             "tokens in chunks", "share", "valid rows"), rows, numeric=(2, 3, 5, 6, 7, 8)))  # fmt: skip
    stages = [s for s in as_list(m.get("stages")) if isinstance(s, dict)]
    if stages:
        srows = []
        for st in stages:
            first, count = as_int(st.get("first_chunk")), as_int(st.get("chunks"))
            span = f"{first}–{first + count - 1}" if first is not None and count is not None else "?"
            mix = "; ".join(f"{as_text(x.get('source'))} ×{fmt_value(x.get('weight'))} "
                            f"({fmt_si(as_num(x.get('tokens')) or 0)} tokens)"
                            for x in as_list(st.get("mix")) if isinstance(x, dict))  # fmt: skip
            srows.append((as_text(st.get("name")), span, st.get("rows_per_chunk"), mix))
        parts.append("<h3>Stages</h3>" + table(("stage", "chunks", "rows per chunk", "mix"), srows, numeric=(2,)))
    if chunks and names:
        cats = [as_text(c.get("name", c.get("index", i))) for i, c in enumerate(chunks)]
        stacks = [(n, [tokens(tps, n) for tps in per_chunk], color(i)) for i, n in enumerate(names)]
        bounds = [(first, f"stage {as_text(st.get('name'))}") for st in stages
                  if (first := as_int(st.get("first_chunk"))) is not None and 0 < first < len(chunks)]  # fmt: skip
        chart = stacked_bars(ids("mix"), cats, stacks, xlabel="chunk", ylabel="tokens", boundaries=bounds, height=280,
                             aria="tokens per source per chunk")  # fmt: skip
        legend = Legend([(n, color(i)) for i, n in enumerate(names)]).html()
        parts.append(figure(chart, "Tokens per source in each chunk",
                            "chunks are trained in order; chunk i becomes checkpoint ckpt_i", legend))  # fmt: skip
    elif not chunks:
        parts.append(na("the manifest lists no chunks"))
    return Section("data", "Data", "".join(parts), True)


# -------------------------------------------------------------------------------- training

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
    for st in as_list(_get(facts.manifest, "stages")):
        first = as_int(as_dict(st).get("first_chunk"))
        if first is not None and first > 0:
            stage_first[first] = as_text(st.get("name"))
    prev = None
    for step in steps:
        c = chunk_of[step]
        if c != prev and prev is not None and c is not None:
            name = f"{c:03d}"
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
    summary = kv([
        ("steps logged", n), ("last step", last_step),
        ("tokens seen", f"{fmt_si(last_tokens)} ({last_tokens:,.0f})" if last_tokens is not None else None),
        ("final loss (mean of last 10)", statistics.fmean(finite_loss[-10:]) if finite_loss else None),
        ("lowest loss", min(finite_loss) if finite_loss else None),
        ("non-finite losses", nonfinite),
        ("median tokens/s", statistics.median(tps_f) if tps_f else None),
        ("mean MFU", f"{statistics.fmean(mfu_f):.1%}" if mfu_f else None),
        ("time in steps", _duration(total_time) if total_time else None),
        ("peak RSS", f"{max(rss_f):,.0f} MB" if rss_f else None),
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
    small = []
    if any(math.isfinite(v) for v in gnorm):
        pos = [v for v in gnorm if math.isfinite(v) and v > 0]
        log = bool(pos) and max(pos) / max(min(pos), 1e-30) > 30
        clip = as_num(_get(facts.config, "train", "grad_clip"))
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
                     f"{c:03d}" if as_int(c) is not None else ("—" if c is None else fmt_value(c)), _event_text(e),
                     when))  # fmt: skip
    more = (f'<p class="small">{len(ordered) - MAX_EVENT_ROWS:,} more events not listed; all are in '
            "metrics/events.jsonl.</p>") if len(ordered) > MAX_EVENT_ROWS else ""  # fmt: skip
    quiet = [k for k in counts if k in _QUIET_EVENTS]
    note = f' <span class="small">({", ".join(quiet)} not marked on the chart)</span>' if quiet else ""
    return (f"<h3>Events{note}</h3>{keys}<details{' open' if len(ordered) <= 30 else ''}><summary>"
            f"{len(ordered):,} event{'s' if len(ordered) != 1 else ''}</summary>"
            + table(("step", "event", "chunk", "details", "time (UTC)"), rows, numeric=(0,)) + more + "</details>")


# ------------------------------------------------------------------------------ evaluations


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
            return [v if (v := as_num(_get(d, n, key))) is not None else math.nan for n in names]

        series = [Series("mean score, seen chunks", xs, line(dist, "mean"), color(0), 2, markers=True),
                  Series("k-extractible share, seen chunks", xs, line(dist, "extractible_share"), color(3), 2,
                         markers=True),
                  Series("mean score, unseen chunks", xs, line(dist_u, "mean"), color(4), 1.5, dash="5 4",
                         markers=True)]  # fmt: skip
        ch = line_chart(ids("mem"), series, xlabel="checkpoint (chunk)", ylabel="score / share", y_min=0.0,
                        x_format="int", height=260, aria="memorization over checkpoints")  # fmt: skip
        legend = Legend([(x.name, x.color) for x in series]).html()
        parts.append(figure(ch, "Memorization over checkpoints", "", legend))
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
    # Correlation between checkpoints (fig. 9).
    corr = as_list(_get(s, "correlation", "score_pearson"))
    if len(corr) == len(names) and len(names) >= 2:
        idx = pick(len(names), MAX_HEATMAP)
        sub_m = [[as_num(as_list(corr[a])[b]) if b < len(as_list(corr[a])) else None for b in idx] for a in idx]
        ch = heatmap(ids("corr"), [names[i] for i in idx], sub_m, what="Pearson r of per-row scores",
                     aria="correlation of memorization scores between checkpoints")  # fmt: skip
        note = f"; {len(idx)} of {len(names)} checkpoints shown" if len(idx) < len(names) else ""
        parts.append(figure(ch, "Correlation of per-row scores between checkpoints",
                            f"Pearson r over the rows of chunks both have seen{note}"))  # fmt: skip
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
        c_, d_ = as_num(_get(b, "clean", "examples")), as_num(_get(b, "dirty", "examples"))
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
    return as_text(_get(example, "first_occurrence", "checkpoint")) or "—"  # a result file without first_seen_by
