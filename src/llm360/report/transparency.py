"""The transparency table (after Table 1 of the LLM360 paper), filled from the files present.

Each row says yes / partial / no and the evidence: which files were found. Nothing is assumed:
a run that lost its optimizer states says "no" for them, one trained on 3 of 360 chunks says
"partial" for its checkpoints. The rows are computed here once, from
:func:`llm360.report.collect.collect`'s facts about a run directory or a release folder (same
layout): the report renders them as HTML and the release's MODEL_CARD.md as Markdown.
"""

from __future__ import annotations

from dataclasses import dataclass

from llm360.report.collect import RunFacts
from llm360.rundir.layout import CONFIG

YES, PARTIAL, NO = "yes", "partial", "no"


@dataclass
class Row:
    """One line of the table: what is released, whether it is, and which files say so."""

    key: str
    """Stable id (``data-row`` on the page, used by tests)."""
    label: str
    """The paper's name for the item ("Model checkpoints")."""
    status: str
    """YES, PARTIAL or NO."""
    evidence: str
    """The files found (or missing) and their counts, in a sentence."""


def _int(x: object) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def expected_chunks(facts: RunFacts) -> int | None:
    """Chunks the run trains: the manifest's count, capped by train.max_chunks when set."""
    n = None
    if facts.manifest and _int(facts.manifest.get("num_chunks")) is not None:
        n = facts.manifest["num_chunks"]
    train = facts.config.get("train") if isinstance(facts.config, dict) else None
    cap = _int(train.get("max_chunks")) if isinstance(train, dict) else None
    if cap is not None and cap > 0:
        n = cap if n is None else min(n, cap)
    return n


def _span(names: list[str]) -> str:
    if not names:
        return ""
    return names[0] if len(names) == 1 else f"{names[0]} … {names[-1]}"


def _code(facts: RunFacts) -> Row:
    info = facts.code_info
    if info is not None:  # code.json, written by `llm360 release`
        git = info.get("git") if isinstance(info.get("git"), dict) else {}
        commit = git.get("commit") or "unknown"
        dirty = " (uncommitted changes)" if git.get("dirty") else ""
        packages = info.get("packages") if isinstance(info.get("packages"), dict) else {}
        return Row("code", "Code", YES, f"llm360 {info.get('llm360_version')}, commit {commit}{dirty}, "
                   f"{_plural(len(packages), 'package version')} in code.json")  # fmt: skip
    if facts.code_snapshot:
        return Row("code", "Code", YES, f"code snapshot shipped in {facts.code_snapshot}")
    version = None
    if facts.manifest and isinstance(facts.manifest.get("versions"), dict):
        version = facts.manifest["versions"].get("llm360")
    if isinstance(version, str) and version:
        return Row("code", "Code", YES, f"trained with the open-source llm360 {version} "
                   "(version recorded in data/manifest.json)")  # fmt: skip
    return Row("code", "Code", NO, "no code snapshot and no recorded llm360 version")


def _config(facts: RunFacts) -> Row:
    if facts.config is not None:
        return Row("training_config", "Training config", YES,
                   "config.yaml (fully resolved, every default written out)")  # fmt: skip
    in_ckpt = [c.name for c in facts.checkpoints if (c.path / CONFIG).is_file()]
    if in_ckpt:
        return Row("training_config", "Training config", YES,
                   f"config.yaml inside {_plural(len(in_ckpt), 'checkpoint')}")  # fmt: skip
    why = facts.config_error or "no config.yaml"
    return Row("training_config", "Training config", NO, why)


def _checkpoints(facts: RunFacts) -> Row:
    label = "Model checkpoints"
    ckpts = facts.chunk_checkpoints
    with_model = [c for c in ckpts if c.has_model]
    if not with_model:
        why = "no checkpoints/ckpt_*/model.safetensors" + (
            f" ({_plural(len(ckpts), 'checkpoint folder')} without weights)" if ckpts else "")
        return Row("model_checkpoints", label, NO, why)
    complete = [c for c in with_model if c.complete]
    dtypes = sorted({d for c in with_model for d in c.model_dtypes})
    expected = expected_chunks(facts)
    parts = [f"{_plural(len(with_model), 'chunk checkpoint')} ({_span([c.name for c in with_model])})"]
    if expected is not None:
        parts[0] += f" for {_plural(expected, 'chunk')}"
    parts.append(f"{len(complete)} complete (COMPLETE.json)")
    if dtypes:
        parts.append("weights " + "/".join(dtypes))
    if any(c.index is None and c.has_model for c in facts.checkpoints):
        parts.append("plus the initial weights (init)")
    full = len(complete) == len(with_model) and (expected is None or len({c.index for c in complete}) >= expected)
    return Row("model_checkpoints", label, YES if full else PARTIAL, "; ".join(parts))


def _optimizer(facts: RunFacts) -> Row:
    label = "Optimizer checkpoints"
    with_model = [c for c in facts.chunk_checkpoints if c.has_model]
    with_opt = [c for c in with_model if c.has_optimizer]
    if not with_model:
        return Row("optimizer_checkpoints", label, NO, "no model checkpoints")
    if not with_opt:
        return Row("optimizer_checkpoints", label, NO,
                   f"no optimizer.safetensors in any of {_plural(len(with_model), 'checkpoint')}")
    status = YES if len(with_opt) == len(with_model) else PARTIAL
    return Row("optimizer_checkpoints", label, status,
               f"optimizer.safetensors (AdamW moments) in {len(with_opt)} of {_plural(len(with_model), 'checkpoint')}")


def _data_mix(facts: RunFacts) -> Row:
    label = "Data mix"
    m = facts.manifest
    if not m:
        return Row("data_mix", label, NO, facts.manifest_error or "no data/manifest.json")
    sources = m.get("sources") if isinstance(m.get("sources"), dict) else {}
    chunks = m.get("chunks") if isinstance(m.get("chunks"), list) else []
    per_chunk = sum(1 for c in chunks if isinstance(c, dict) and isinstance(c.get("tokens_per_source"), dict))
    if sources and per_chunk:
        return Row("data_mix", label, YES, f"data/manifest.json: {_plural(len(sources), 'source')} with documents "
                   f"in/used/rejected and tokens per source for {_plural(per_chunk, 'chunk')}")  # fmt: skip
    if sources:
        return Row("data_mix", label, PARTIAL, "data/manifest.json lists sources but no tokens per chunk")
    return Row("data_mix", label, NO, "data/manifest.json lists no sources")


def _ordering(facts: RunFacts) -> Row:
    label = "Data ordering"
    m = facts.manifest
    chunks = m.get("chunks") if m else None
    listed = [c for c in chunks if isinstance(c, dict)] if isinstance(chunks, list) else []
    present = set(facts.chunk_files)
    if not listed:
        if present:
            return Row("data_ordering", label, PARTIAL,
                       f"{_plural(len(present), 'chunk file')} but no manifest listing their order and sha256")
        return Row("data_ordering", label, NO, "no data/chunk_*.npy and no manifest")
    names = [str(c.get("file")) for c in listed]
    have = [n for n in names if n in present]
    if not have:
        return Row("data_ordering", label, NO,
                   f"manifest lists {_plural(len(names), 'chunk')} but no chunk file is here")  # fmt: skip
    status = YES if len(have) == len(names) else PARTIAL
    text = (f"{len(have)} of {_plural(len(names), 'chunk file')} (rows stored in training order; sha256 in the "
            "manifest, not re-hashed here)")  # fmt: skip
    if facts.provenance_files:
        text += f"; per-row provenance for {_plural(len(facts.provenance_files), 'chunk')}"
    return Row("data_ordering", label, status, text)


def _available(facts: RunFacts) -> Row:
    label = "Data available"
    parts = []
    if facts.chunk_files:
        parts.append(f"token ids: {_plural(len(facts.chunk_files), 'chunk file')}")
    if facts.source_text_files:
        files = facts.source_text_files
        parts.append(f"raw documents of {_plural(len(files), 'source')}: {', '.join(files[:6])}"
                     + (" …" if len(files) > 6 else ""))
    elif facts.chunk_files:
        parts.append("source text not snapshotted (data/sources/ absent; decode the token ids with the tokenizer)")
    if facts.document_tables:
        parts.append(f"document tables for {_plural(len(facts.document_tables), 'source')} (data/documents/)")
    if not facts.chunk_files and not facts.source_text_files:
        return Row("data_available", label, NO, "no data/chunk_*.npy and no data/sources/*.jsonl.gz")
    return Row("data_available", label, YES, "; ".join(parts))


def _logs(facts: RunFacts) -> Row:
    label = "Training logs"
    t, e = facts.train, facts.events
    if not t.records:
        return Row("training_logs", label, NO, t.error or "metrics/train.jsonl holds no records")
    ev = f"; metrics/events.jsonl: {_plural(len(e.records), 'event')}" if e.present else "; no metrics/events.jsonl"
    return Row("training_logs", label, YES, f"metrics/train.jsonl: {_plural(len(t.records), 'step')}{ev}")


def _evaluations(facts: RunFacts) -> Row:
    label = "Evaluations"
    if facts.eval is None:
        return Row("evaluations", label, NO, facts.eval_error or "no eval results")
    done = {r["checkpoint"] for r in facts.eval.rows}
    tasks = sorted({c.split("/", 1)[0] for c in facts.eval.columns})
    ckpts = {c.name for c in facts.chunk_checkpoints if c.has_model}
    missing = ckpts - done
    status = PARTIAL if missing else YES
    text = f"{_plural(len(tasks), 'task')} on {_plural(len(done), 'checkpoint')} ({facts.eval.source})"
    if missing:
        text += f"; {len(missing)} checkpoint{'' if len(missing) == 1 else 's'} not evaluated yet"
    return Row("evaluations", label, status, text)


def _analyses(facts: RunFacts) -> Row:
    label = "Analyses"
    parts = []
    if facts.memorization is not None:
        parts.append(f"memorization of {_plural(len(facts.memorization.get('checkpoints', [])), 'checkpoint')}")
    elif facts.memorization_metas:
        parts.append(f"memorization of {_plural(len(facts.memorization_metas), 'checkpoint')} (no summary.json)")
    if facts.contamination:
        parts.append(f"contamination of {_plural(len(facts.contamination), 'evaluation set')}")
    if not parts:
        return Row("analyses", label, NO, "no analysis/memorization and no analysis/contamination results")
    return Row("analyses", label, YES if len(parts) == 2 else PARTIAL, "; ".join(parts))


def transparency_rows(facts: RunFacts) -> list[Row]:
    """The table's rows, in the paper's order (code and config, weights, data, logs, evaluations, analyses)."""
    return [
        _code(facts), _config(facts), _checkpoints(facts), _optimizer(facts), _data_mix(facts),
        _ordering(facts), _available(facts), _logs(facts), _evaluations(facts), _analyses(facts),
    ]  # fmt: skip
