"""The data manifest, built from the prepare tasks' outputs (never by re-reading the data) and written last."""

from __future__ import annotations

import platform
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from llm360 import __version__
from llm360.config import RunConfig
from llm360.rundir.data import MANIFEST_VERSION, PROVENANCE_DTYPE, PROVENANCE_FIM_DTYPE


@dataclass
class SourceStats:
    """What happened to one source's documents (or, for a row source, its tokens)."""

    kind: str
    files: list[str] = field(default_factory=list)
    doc_id_base: str | None = None
    documents_in: int = 0
    documents_train: int = 0
    documents_valid: int = 0
    documents_not_selected: int = 0
    rejected: Counter = field(default_factory=Counter)
    tokens_train: int = 0
    tokens_valid: int = 0
    valid_rows: int = 0
    tokens_dropped: Counter = field(default_factory=Counter)
    filtered: Counter = field(default_factory=Counter)
    """Documents no mix entry used because its filters dropped them, by the field that did."""
    fim: Counter | None = None
    """FIM counts (documents_fim, fim_copies, spm_copies, tokens_fim) when a mix entry FIM-transforms it."""

    def add_map(self, summary: dict) -> None:
        """Count one piece's map summary in."""
        self.documents_in += summary["documents_in"]
        self.documents_train += summary["documents_train"]
        self.documents_valid += summary["documents_valid"]
        self.documents_not_selected += summary["not_selected"]
        self.tokens_train += summary["tokens_train"]
        self.tokens_valid += summary["tokens_valid"]
        self.rejected.update(summary["rejected"])
        self.filtered.update(summary.get("filtered_unused", {}))
        if "fim" in summary:
            self.fim = (self.fim or Counter()) + Counter(summary["fim"])

    def to_json(self) -> dict:
        rejected = dict(self.rejected)
        if self.documents_not_selected:
            rejected["not_selected_by_mix"] = self.documents_not_selected
        filtered = sum(self.filtered.values())
        if filtered:
            rejected["filtered_by_mix"] = filtered
        used_train = self.documents_train - self.documents_not_selected - filtered
        used = used_train + self.documents_valid
        extra: dict = {}
        if filtered:
            extra["documents_filtered_by_mix"] = dict(sorted(self.filtered.items()))
        if self.fim is not None:
            extra["fim"] = {k: int(self.fim.get(k, 0)) for k in ("documents_fim", "fim_copies", "spm_copies",
                                                                 "tokens_fim")}
        return {
            "kind": self.kind,
            "files": self.files,
            "doc_id_base": self.doc_id_base,
            "documents_in": self.documents_in,
            "documents_used": used,
            "documents_used_train": used_train,
            "documents_used_valid": self.documents_valid,
            "documents_rejected": dict(sorted(rejected.items())),
            "documents_rejected_total": sum(rejected.values()),
            "tokens_train_documents": self.tokens_train,
            "tokens_valid_documents": self.tokens_valid,
            "valid_rows": self.valid_rows,
            "tokens_dropped": dict(sorted((k, v) for k, v in self.tokens_dropped.items() if v)),
            **extra,
        }


def versions() -> dict:
    import tokenizers

    return {
        "llm360": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "tokenizers": tokenizers.__version__,
    }


def _embedded_record(cfg: RunConfig) -> dict:
    """``{"embedded": what the built-in corpus parts were built from}`` when the config reads any (else {})."""
    from llm360.data.embedded import corpus_record

    parts = [s.embedded for s in cfg.data.sources if s.kind == "embedded" and s.embedded]
    return {"embedded": corpus_record(parts)} if parts else {}


def build_manifest(
    cfg: RunConfig,
    *,
    dtype: np.dtype,
    vocab_size: int,
    eos_id: int | None,
    tokenizer_sha: str | None,
    source_names: list[str],
    stats: dict[str, SourceStats],
    row_dropped: dict[str, Counter],
    stages: list[dict],
    chunks: list[dict],
    files: dict[str, dict],
) -> dict:
    """The manifest's content. ``row_dropped``: tokens dropped per row source that is not a configured
    source (pre-tokenized rows labelled with another name). Raises AssertionError when a source's
    documents do not add up (a bug, never the input's fault)."""
    data = cfg.data
    prov = PROVENANCE_FIM_DTYPE if data.uses_fim else PROVENANCE_DTYPE
    sources_json = {name: st.to_json() for name, st in stats.items()}
    for name, st in sources_json.items():
        if st["documents_in"] != st["documents_used"] + st["documents_rejected_total"]:
            raise AssertionError(f"document accounting broken for {name}: {st}")
    return {
        "format": "llm360-data",
        "version": MANIFEST_VERSION,
        "config_hash": cfg.data_hash(),
        "data_config": data.model_dump(mode="json"),
        "seq_len": data.seq_len,
        "row_length": data.seq_len + 1,
        "seed": data.seed,
        "token_dtype": dtype.name,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "tokenizer_sha256": tokenizer_sha,
        "versions": versions(),
        **_embedded_record(cfg),
        "source_names": source_names,
        "sources": sources_json,
        "row_sources_dropped_tokens": {k: dict(sorted(v.items())) for k, v in row_dropped.items() if v},
        "stages": stages,
        "chunks": chunks,
        "num_chunks": len(chunks),
        "total_rows": sum(c["rows"] for c in chunks),
        "total_tokens": sum(c["tokens"] for c in chunks),
        "valid": {name: {"file": f"valid/{name}.npy", "rows": st.valid_rows}
                  for name, st in stats.items() if st.valid_rows},
        "provenance_dtype": [[n, prov[n].str] for n in prov.names],
        "files": dict(sorted(files.items())),
    }
