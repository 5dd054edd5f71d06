"""MODEL_CARD.md, generated from what a release really contains (nothing is hard-coded).

The folder is read once by :func:`llm360.report.collect.collect` (a release has a run directory's
layout), and the transparency table is :func:`llm360.report.transparency.transparency_rows`: the
card and the HTML report show the same rows with the same evidence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm360.config import parametrization_text
from llm360.report.collect import RunFacts, collect, read_json
from llm360.report.findings import all_findings
from llm360.report.transparency import NO, PARTIAL, YES, Row, transparency_rows
from llm360.rundir.layout import MODEL_META, RunDir

_MARKS = {YES: "✓ yes", PARTIAL: "◐ partial", NO: "✗ no"}


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def transparency_lines(rows: list[Row]) -> list[str]:
    """The paper's Table 1 as Markdown table lines: one row per item, its status and the evidence."""
    lines = ["| item | released |", "| --- | --- |"]
    for r in rows:
        mark = _MARKS.get(r.status, r.status)
        lines.append(f"| {_cell(r.label)} | {mark}" + (f" — {_cell(r.evidence)}" if r.evidence else "") + " |")
    return lines


def _architecture_rows(m: dict) -> list[tuple[str, object]]:
    """(label, value) rows of the card's architecture table from an llm360 ModelConfig dict."""
    heads, kv = m.get("num_heads"), m.get("num_kv_heads")
    norm = "LayerNorm" if m.get("norm") == "layernorm" else "RMSNorm"
    return [
        ("Hidden size", m.get("hidden_size")),
        ("Intermediate size (MLP)", m.get("intermediate_size")),
        ("Attention heads", heads if not kv or kv == heads else f"{heads} ({kv} key/value heads)"),
        ("Hidden layers", m.get("num_layers")),
        ("Normalization", f"{norm}, ε {m.get('norm_eps')}"),
        ("Rotary embeddings", f"θ {m.get('rope_theta')}"
         + (f", on {m['rope_fraction']:.0%} of each head's dims" if m.get("rope_fraction", 1.0) < 1.0 else "")),
        ("Max sequence length", m.get("max_seq_len")),
        ("Vocab size", m.get("vocab_size")),
        ("Tied embeddings", "yes" if m.get("tie_embeddings") else "no"),
        ("Parametrization", parametrization_text(m)),
    ]  # fmt: skip


def _raw_sources_lines(root: Path, cfg: dict) -> list[str]:
    """Where each source's raw documents are, and how to rebuild the data from them."""
    data = cfg.get("data") if isinstance(cfg, dict) else None
    sources = [s for s in (data.get("sources") or []) if isinstance(s, dict)] if isinstance(data, dict) else []
    if not sources:
        return []
    lines = ["", "Raw documents (`llm360 verify . --rederive` rebuilds every data file from them and compares):", ""]
    for src in sources:
        name = src.get("name")
        if RunDir(root).source_snapshot(name).is_file():
            lines.append(f"- `{name}`: in this release, `data/sources/{name}.jsonl.gz`")
        elif src.get("kind") == "embedded":
            lines.append(f"- `{name}`: llm360's embedded corpus ({src.get('embedded')}), not snapshotted: rebuild "
                         "it with the llm360 and Python named below")
        else:
            lines.append(f"- `{name}`: not in this release ({src.get('kind')} files); with a copy of them, add "
                         f"`--source {name}=PATH`")
    return lines


def write_model_card(root: Path) -> Path:
    """Write root/MODEL_CARD.md from the release's files; returns its path.

    Missing or malformed files leave their section out (or say "no" in the transparency table);
    only a failure to write the card itself raises (OSError).
    """
    facts = collect(root)
    cfg = facts.config or {}
    lines = [f"# {cfg.get('name', 'llm360 model')}", ""]
    lines += [
        "Trained with llm360: every chunk of data in training order, one complete checkpoint per chunk "
        "(weights, optimizer state, RNG states, data cursor), all metrics and events. Verify this "
        "release with `llm360 verify .` and replay any chunk with `llm360 verify . --replay I`.",
        "",
        "## Transparency",
        "",
    ]
    lines += transparency_lines(transparency_rows(facts))
    lines += _architecture_lines(facts)
    lines += _data_mix_lines(facts, root, cfg)
    lines += _eval_lines(facts)
    lines += _memorization_lines(facts)
    lines += _findings_lines(facts)
    lines += _events_lines(facts)
    lines += _finetune_lines(facts, root)
    lines += [
        "", "## Files", "",
        "Each `checkpoints/ckpt_NNN` folder is a Hugging Face model folder "
        "(`AutoModelForCausalLM.from_pretrained(folder)`) and a complete training state. `SHA256SUMS` lists "
        "every file; nothing here is a pickle.", "",
    ]
    path = RunDir(root).model_card
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _architecture_lines(facts: RunFacts) -> list[str]:
    """The architecture of the latest checkpoint with a readable config.json, and its parameter count."""
    hf = facts.model_config
    ck = next((c for c in facts.checkpoints if c.name == facts.model_config_from), None)
    ours = read_json(ck.path / MODEL_META, facts)[0] if ck is not None else None
    model = ours.get("model") if isinstance(ours, dict) else None
    if isinstance(model, dict):  # the exact model config: what config.json cannot say (muP) included
        rows = _architecture_rows(model)
    else:
        rows = [(label, hf[key]) for key, label in (
            ("hidden_size", "Hidden size"), ("intermediate_size", "Intermediate size (MLP)"),
            ("num_attention_heads", "Attention heads"), ("num_hidden_layers", "Hidden layers"),
            ("rms_norm_eps", "RMSNorm ε"), ("max_position_embeddings", "Max sequence length"),
            ("vocab_size", "Vocab size")) if hf and key in hf]  # fmt: skip
    if not rows:
        return []
    lines = ["", "## Architecture", "", "| parameter | value |", "| --- | --- |"]
    lines += [f"| {label} | {value} |" for label, value in rows]
    if ck is not None and ck.parameters is not None:  # from model.safetensors' header
        lines.append(f"| Parameters | {ck.parameters:,} |")
    return lines


def _data_mix_lines(facts: RunFacts, root: Path, cfg: dict) -> list[str]:
    """Tokens trained on per source (summed over the manifest's chunks), and where the raw documents are."""
    manifest = facts.manifest or {}
    if not manifest.get("sources"):
        return []
    total = sum(sum(c["tokens_per_source"].values()) for c in manifest.get("chunks", []))
    per: dict[str, int] = {}
    for c in manifest.get("chunks", []):
        for s, t in c["tokens_per_source"].items():
            per[s] = per.get(s, 0) + int(t)
    lines = ["", "## Data mix", "", "| source | tokens trained on | share | documents used | rejected |",
             "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for s, t in sorted(per.items(), key=lambda kv: -kv[1]):
        src = manifest["sources"].get(s, {})
        lines.append(f"| {s} | {t:,} | {t / max(total, 1):.1%} | {src.get('documents_used', '')} | "
                     f"{src.get('documents_rejected_total', '')} |")  # fmt: skip
    lines.append(f"| **total** | **{total:,}** | | | |")
    lines += ["", f"{manifest.get('num_chunks')} chunks of {manifest.get('seq_len')}-token sequences "
              f"(+1 target token per row), dtype {manifest.get('token_dtype')}, vocabulary "
              f"{manifest.get('vocab_size')}, data seed {manifest.get('seed')}."]  # fmt: skip
    return lines + _fim_lines(manifest) + _raw_sources_lines(root, cfg) + _embedded_lines(manifest)


def _fim_lines(manifest: dict) -> list[str]:
    """The fill-in-the-middle share of each stage's tokens, and the rates that made it (when any stage has FIM)."""
    stages = [st for st in manifest.get("stages", []) if isinstance(st, dict) and "fim_share" in st]
    if not stages:
        return []
    lines = ["", "Fill-in-the-middle (StarCoder's sentinels, PSM and SPM order):", "",
             "| stage | FIM share of its tokens | FIM-transformed entries |", "| --- | ---: | --- |"]
    for st in stages:
        entries = ", ".join(f"{m.get('source')} (rate {m.get('fim_rate')}, SPM {m.get('spm_rate')}, "
                            f"{m.get('fim_copies', 0):,} copies)" for m in st.get("mix", []) if m.get("fim_rate"))
        lines.append(f"| {st.get('name')} | {float(st['fim_share']):.1%} | {entries} |")
    return lines


def _embedded_lines(manifest: dict) -> list[str]:
    """Which llm360 and Python reproduce the embedded corpus byte for byte (the manifest's ``embedded``)."""
    rec = manifest.get("embedded")
    if not isinstance(rec, dict) or not isinstance(rec.get("parts"), dict):
        return []
    parts = ", ".join(f"`{p}` ({v.get('documents')} documents, from {v.get('from')})"
                      for p, v in rec["parts"].items() if isinstance(v, dict))  # fmt: skip
    reproduce = str(rec.get("reproduce") or f"llm360 {rec.get('llm360')} on Python {rec.get('python')}")
    return ["", f"Embedded corpus: {parts}; sha256 {str(rec.get('sha256'))[:16]}: {reproduce.rstrip('.')}."]


def _eval_lines(facts: RunFacts) -> list[str]:
    """Up to six ``<task>/<metric>`` columns per checkpoint (eval/summary.json, else the per-file results)."""
    if facts.eval is None or not facts.eval.rows:
        return []
    cols = [c for c in facts.eval.columns if "/" in c][:6]
    lines = ["", "## Evaluation over checkpoints", "",
             "| checkpoint | " + " | ".join(cols) + " |", "| --- |" + " ---: |" * len(cols)]  # fmt: skip
    for row in facts.eval.rows:
        vals = [row.get(c) for c in cols]
        lines.append(f"| {row.get('checkpoint')} | " + " | ".join("" if v is None else f"{v:.4g}" for v in vals)
                     + " |")  # fmt: skip
    return lines


def _memorization_lines(facts: RunFacts) -> list[str]:
    """The paper's memorization score per checkpoint, on the chunks each checkpoint has seen."""
    mem = facts.memorization
    if not mem:
        return []
    lines = ["", "## Memorization", "", "Paper's score (k = l = 32): share of greedy tokens equal to the "
             "true continuation of a training row; extractable when 1. Details in analysis/memorization/."]
    dist = mem.get("distribution") if isinstance(mem.get("distribution"), dict) else {}
    seen = [(n, d) for n in mem.get("checkpoints", [])
            if isinstance(n, str) and isinstance(d := dist.get(n), dict)]
    if seen:
        lines += ["", "| checkpoint | mean score (seen chunks) | extractable share |", "| --- | ---: | ---: |"]
        lines += [f"| {name} | {_fmt(d.get('mean'))} | {_fmt(d.get('extractible_share'))} |" for name, d in seen]
    return lines


def _findings_lines(facts: RunFacts) -> list[str]:
    """What each figure of the report shows on this run, one sentence each."""
    found = all_findings(facts)
    if not found:
        return []
    return ["", "## What the figures show", ""] + [f"- **{figure}**: {text}" for figure, text in found]


def _events_lines(facts: RunFacts) -> list[str]:
    """metrics/events.jsonl as a table: NaN skips, rollbacks, resumes, spikes."""
    events = facts.events.records
    lines = ["", "## Events", ""]
    if not events:
        return lines + ["No events: no skipped steps, rollbacks or resumes."]
    lines += ["| event | step | chunk | detail |", "| --- | ---: | ---: | --- |"]
    for e in events:
        detail = e.get("reason") or e.get("checkpoint") or ""
        lines.append(f"| {e.get('event')} | {e.get('step', '')} | {e.get('chunk', '')} | {detail} |")
    return lines


def _finetune_lines(facts: RunFacts, root: Path) -> list[str]:
    """One row per finetune/<name>/lineage.json: method, base checkpoint and data, with their hashes."""
    fts = sorted(root.glob("finetune/*/lineage.json"))
    if not fts:
        return []
    lines = ["", "## Fine-tuned models", "",
             "| model | method | base checkpoint | base marker sha256 | data | data sha256 | steps |",
             "| --- | --- | --- | --- | --- | --- | ---: |"]  # fmt: skip
    for p in fts:
        lin = read_json(p, facts)[0]
        lin = lin if isinstance(lin, dict) else {}
        base = lin.get("base_checkpoint") or {}
        data = lin.get("data") or {}
        base_name = Path(str(base.get("path", ""))).name if isinstance(base, dict) else str(base)
        lines.append(
            f"| {p.parent.name} | {lin.get('trainer', lin.get('kind', ''))} | {base_name} | "
            f"{str(base.get('complete_json_sha256', ''))[:16]} | {data.get('source', '')} | "
            f"{str(data.get('sha256', ''))[:16]} | {lin.get('steps', '')} |"
        )
    return lines


def _fmt(v: Any) -> str:
    return "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
