"""MODEL_CARD.md, generated from what a release really contains (nothing is hard-coded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from llm360.config import parametrization_text
from llm360.rundir.layout import RunDir


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _yes(flag: bool, detail: str = "") -> str:
    return ("✓ yes" if flag else "✗ no") + (f" — {detail}" if detail else "")


def transparency(root: Path) -> list[tuple[str, bool, str]]:
    """The paper's Table 1, filled from the files present: (item, present, evidence)."""
    ckpts = sorted(root.glob("checkpoints/ckpt_*"))
    with_opt = [c for c in ckpts if (c / "optimizer.safetensors").is_file()]
    with_weights = [c for c in ckpts if (c / "model.safetensors").is_file()]
    manifest = _read_json(root / "data" / "manifest.json") or {}
    chunks = sorted(root.glob("data/chunk_*.npy"))
    sources = sorted(root.glob("data/sources/*.jsonl.gz"))
    code = _read_json(root / "code.json") or {}
    commit = (code.get("git") or {}).get("commit")
    evals = sorted(root.glob("eval/*/*.json"))
    analyses = sorted(root.glob("analysis/**/*.json"))
    return [
        ("Code", bool(code), f"llm360 {code.get('llm360_version')}, commit {commit or 'unknown'}" if code else ""),
        ("Training config", (root / "config.yaml").is_file(), "config.yaml"),
        ("Model checkpoints", bool(with_weights), f"{len(with_weights)} of {manifest.get('num_chunks', '?')} chunks"),
        ("Optimizer checkpoints", bool(with_opt), f"{len(with_opt)} checkpoints with AdamW state"),
        ("Data mix", bool(manifest.get("sources")), "tokens per source per chunk in data/manifest.json"),
        ("Data ordering", bool(chunks) and bool(manifest), f"{len(chunks)} chunk files, rows in training order"),
        ("Data available", bool(chunks) or bool(sources),
         f"{len(chunks)} token chunks" + (f", raw documents of {len(sources)} sources" if sources else "")),
        ("Evaluations", bool(evals), f"{len(evals)} result files"),
        ("Analyses", bool(analyses), f"{len(analyses)} result files"),
    ]


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
            lines.append(f"- `{name}`: llm360's embedded corpus ({src.get('embedded')}), not snapshotted: it is "
                         "read from the Python installation, so it cannot be rebuilt from this release")
        else:
            lines.append(f"- `{name}`: not in this release ({src.get('kind')} files); with a copy of them, add "
                         f"`--source {name}=PATH`")
    return lines


def write_model_card(root: Path) -> Path:
    """Write root/MODEL_CARD.md from the release's files."""
    cfg = yaml.safe_load((root / "config.yaml").read_text()) if (root / "config.yaml").is_file() else {}
    manifest = _read_json(root / "data" / "manifest.json") or {}
    ckpts = sorted(root.glob("checkpoints/ckpt_*"))
    hf = _read_json(ckpts[-1] / "config.json") if ckpts else None
    lines = [f"# {cfg.get('name', 'llm360 model')}", ""]
    lines += [
        "Trained with llm360: every chunk of data in training order, one complete checkpoint per chunk "
        "(weights, optimizer state, RNG states, data cursor), all metrics and events. Verify this "
        "release with `llm360 verify .` and replay any chunk with `llm360 verify . --replay I`.",
        "",
        "## Transparency",
        "",
        "| item | released |",
        "| --- | --- |",
    ]
    lines += [f"| {item} | {_yes(ok, ev)} |" for item, ok, ev in transparency(root)]
    ours = (_read_json(ckpts[-1] / "llm360_model.json") or {}).get("model") if ckpts else None
    if isinstance(ours, dict):  # the exact model config: what config.json cannot say (muP) included
        rows = _architecture_rows(ours)
    else:
        rows = [(label, hf[key]) for key, label in (
            ("hidden_size", "Hidden size"), ("intermediate_size", "Intermediate size (MLP)"),
            ("num_attention_heads", "Attention heads"), ("num_hidden_layers", "Hidden layers"),
            ("rms_norm_eps", "RMSNorm ε"), ("max_position_embeddings", "Max sequence length"),
            ("vocab_size", "Vocab size")) if hf and key in hf]  # fmt: skip
    if rows:
        lines += ["", "## Architecture", "", "| parameter | value |", "| --- | --- |"]
        lines += [f"| {label} | {value} |" for label, value in rows]
        st = (root / ckpts[-1] / "model.safetensors") if ckpts else None
        if st is not None and st.is_file():
            from safetensors import safe_open

            with safe_open(str(st), framework="numpy") as f:
                n = sum(int(_numel(f.get_slice(k).get_shape())) for k in f.keys())
            lines.append(f"| Parameters | {n:,} |")
    if manifest.get("sources"):
        total = sum(sum(c["tokens_per_source"].values()) for c in manifest.get("chunks", []))
        per: dict[str, int] = {}
        for c in manifest.get("chunks", []):
            for s, t in c["tokens_per_source"].items():
                per[s] = per.get(s, 0) + int(t)
        lines += ["", "## Data mix", "", "| source | tokens trained on | share | documents used | rejected |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for s, t in sorted(per.items(), key=lambda kv: -kv[1]):
            src = manifest["sources"].get(s, {})
            lines.append(f"| {s} | {t:,} | {t / max(total, 1):.1%} | {src.get('documents_used', '')} | "
                         f"{src.get('documents_rejected_total', '')} |")
        lines.append(f"| **total** | **{total:,}** | | | |")
        lines += ["", f"{manifest.get('num_chunks')} chunks of {manifest.get('seq_len')}-token sequences "
                  f"(+1 target token per row), dtype {manifest.get('token_dtype')}, vocabulary "
                  f"{manifest.get('vocab_size')}, data seed {manifest.get('seed')}."]
        lines += _raw_sources_lines(root, cfg)
    summary = _read_json(root / "eval" / "summary.json")
    if summary and summary.get("rows"):
        cols = [c for c in summary.get("columns", []) if "/" in c][:6]
        lines += ["", "## Evaluation over checkpoints", "",
                  "| checkpoint | " + " | ".join(cols) + " |", "| --- |" + " ---: |" * len(cols)]
        for row in summary["rows"]:
            vals = [row.get(c) for c in cols]
            lines.append(f"| {row.get('checkpoint')} | " + " | ".join("" if v is None else f"{v:.4g}" for v in vals)
                         + " |")
    mem = _read_json(root / "analysis" / "memorization" / "summary.json")
    if mem:
        lines += ["", "## Memorization", "", "Paper's score (k = l = 32): share of greedy tokens equal to the "
                  "true continuation of a training row; extractable when 1. Details in analysis/memorization/."]
        per_ckpt = mem.get("checkpoints") or {}
        if isinstance(per_ckpt, dict) and per_ckpt:
            lines += ["", "| checkpoint | mean score (seen chunks) | extractable share |", "| --- | ---: | ---: |"]
            for name, v in sorted(per_ckpt.items()):
                if isinstance(v, dict):
                    lines.append(f"| {name} | {_fmt(v.get('mean_seen'))} | {_fmt(v.get('extractable_share_seen'))} |")
    events = _read_jsonl(root / "metrics" / "events.jsonl")
    lines += ["", "## Events", ""]
    if events:
        lines += ["| event | step | chunk | detail |", "| --- | ---: | ---: | --- |"]
        for e in events:
            detail = e.get("reason") or e.get("checkpoint") or ""
            lines.append(f"| {e.get('event')} | {e.get('step', '')} | {e.get('chunk', '')} | {detail} |")
    else:
        lines.append("No events: no skipped steps, rollbacks or resumes.")
    fts = sorted(root.glob("finetune/*/lineage.json"))
    if fts:
        lines += ["", "## Fine-tuned models", "",
                  "| model | method | base checkpoint | base marker sha256 | data | data sha256 | steps |",
                  "| --- | --- | --- | --- | --- | --- | ---: |"]
        for p in fts:
            lin = _read_json(p) or {}
            base = lin.get("base_checkpoint") or {}
            data = lin.get("data") or {}
            base_name = Path(str(base.get("path", ""))).name if isinstance(base, dict) else str(base)
            lines.append(
                f"| {p.parent.name} | {lin.get('trainer', lin.get('kind', ''))} | {base_name} | "
                f"{str(base.get('complete_json_sha256', ''))[:16]} | {data.get('source', '')} | "
                f"{str(data.get('sha256', ''))[:16]} | {lin.get('steps', '')} |"
            )
    lines += [
        "", "## Files", "",
        "Each `checkpoints/ckpt_NNN` folder is a Hugging Face model folder "
        "(`AutoModelForCausalLM.from_pretrained(folder)`) and a complete training state. `SHA256SUMS` lists "
        "every file; nothing here is a pickle.", "",
    ]
    path = root / "MODEL_CARD.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _fmt(v: Any) -> str:
    return "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
