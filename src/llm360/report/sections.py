"""The sections of the report page that describe the run: transparency, configuration, architecture, data.

Each section function takes :class:`~llm360.report.collect.RunFacts` and returns a
:class:`~llm360.report.html.Section`: its HTML, or a one-line "not available: <why>" when its data is
not there. The training section is :mod:`llm360.report.training`; evaluations and analyses are
:mod:`llm360.report.results`.
"""

from __future__ import annotations

from typing import Any

from llm360.config import parametrization_text
from llm360.report.charts import stacked_bars
from llm360.report.collect import RunFacts
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
    kv,
    na,
    pct,
    table,
)
from llm360.report.svg import (
    Legend,
    color,
    esc,
    fmt_si,
    fmt_value,
)
from llm360.report.transparency import transparency_rows


def run_name(facts: RunFacts) -> str:
    name = get_in(facts.config, "name")
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
        ("weight decay", get_in(train, "weight_decay")), ("grad clip", get_in(train, "grad_clip")),
        ("precision", get_in(train, "precision")), ("deterministic", get_in(train, "deterministic")),
        ("parallelism", get_in(train, "parallelism")), ("train seed", get_in(train, "seed")),
        ("non-finite policy", get_in(guards, "nonfinite_policy")), ("spike policy", get_in(guards, "spike_policy")),
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
    seq = as_int(get_in(facts.config, "data", "seq_len")) or m.get("max_position_embeddings")
    if "rms_norm_eps" in m:
        norm = f"RMSNorm, eps {fmt_value(m['rms_norm_eps'])}"
    elif "layer_norm_eps" in m:
        norm = f"LayerNorm, eps {fmt_value(m['layer_norm_eps'])}"
    else:
        norm = "—"
    frac = as_num(m.get("partial_rotary_factor"))
    model = as_dict(get_in(facts.config, "model"))  # muP is not in config.json
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
        any_fim = any("fim_share" in st for st in stages)
        for st in stages:
            first, count = as_int(st.get("first_chunk")), as_int(st.get("chunks"))
            span = f"{first}–{first + count - 1}" if first is not None and count is not None else "?"
            mix = "; ".join(f"{as_text(x.get('source'))} ×{fmt_value(x.get('weight'))} "
                            f"({fmt_si(as_num(x.get('tokens')) or 0)} tokens"
                            + (f", FIM {fmt_value(x.get('fim_rate'))} SPM {fmt_value(x.get('spm_rate'))}"
                               if x.get("fim_rate") else "") + ")"
                            for x in as_list(st.get("mix")) if isinstance(x, dict))  # fmt: skip
            row = (as_text(st.get("name")), span, st.get("rows_per_chunk"), mix)
            srows.append((*row, pct(as_num(st.get("fim_share")) or 0.0)) if any_fim else row)
        head = ("stage", "chunks", "rows per chunk", "mix") + (("FIM share of tokens",) if any_fim else ())
        parts.append("<h3>Stages</h3>" + table(head, srows, numeric=(2, 4) if any_fim else (2,)))
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
