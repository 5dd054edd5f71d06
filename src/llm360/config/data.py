"""The `data` section: sources, mix, curriculum stages, tokenizer and chunking."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from llm360.config.base import Section, seed_field

SourceKind = Literal["jsonl", "parquet", "text", "hf_dataset", "llm360", "embedded", "snapshot"]
EmbeddedPart = Literal["code", "docs", "package-docs", "licenses"]


class SourceConfig(Section):
    name: str
    """Source name used in the manifest, provenance, metrics and mix (e.g. `code`, `c4`)."""
    kind: SourceKind = "jsonl"
    """Reader: jsonl (.jsonl, .jsonl.gz, .jsonl.zst), parquet, text (one document per file), hf_dataset (a `save_to_disk` folder), llm360 (pre-tokenized `{"token_ids": [...], "source": ...}` rows, order kept) embedded (the built-in corpus) or snapshot (data/sources/<name>.jsonl.gz of a run or release)."""
    paths: list[str] = Field(default_factory=list)
    """Files, folders or glob patterns, read in sorted order; relative paths are relative to the working directory."""
    text_field: str = "text"
    """Field (JSONL key, Parquet or dataset column) holding the document text."""
    embedded: EmbeddedPart | None = None
    """For kind=embedded: which part of the built-in corpus (code, docs, package-docs, licenses)."""
    snapshot: bool = False
    """Write the raw documents into the run directory (data/sources/<name>.jsonl.gz) so a release carries them."""

    @model_validator(mode="after")
    def _check_kind(self) -> SourceConfig:
        if self.kind == "embedded" and self.embedded is None:
            raise ValueError(
                f"source '{self.name}': kind=embedded needs `embedded` set to one of "
                "code, docs, package-docs, licenses"
            )
        if self.kind != "embedded" and self.embedded is not None:
            raise ValueError(f"source '{self.name}': `embedded` is only allowed with kind=embedded")
        return self


class MixEntry(Section):
    source: str
    """Name of a source in data.sources."""
    weight: float = Field(1.0, ge=0.0, le=1000.0)
    """Documents used per document available: <1 sub-samples (by document hash), >1 repeats (2.0 = two epochs); at most 1000."""
    part: tuple[float, float] = (0.0, 1.0)
    """Slice [lo, hi) of the source's documents (by document hash) this entry draws from, e.g. [0, 0.5] for one half."""

    @field_validator("part")
    @classmethod
    def _check_part(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not (0.0 <= lo < hi <= 1.0):
            raise ValueError(f"part must satisfy 0 <= lo < hi <= 1, got [{lo}, {hi}]")
        return v


class StageConfig(Section):
    name: str
    """Stage name (e.g. `stage1`); stages are trained in the order listed."""
    chunks: int = Field(ge=1)
    """Number of equal-size chunks this stage's rows are split into; one checkpoint per chunk."""
    mix: list[MixEntry] = Field(min_length=1)
    """Which sources, in what proportion, make up this stage."""
    shuffle: bool = True
    """Globally permute the stage's rows with the data seed (off keeps file order, e.g. for imported LLM360 chunks)."""


class TokenizerConfig(Section):
    kind: Literal["train", "file", "none"] = "train"
    """train: a byte-level BPE trained on the training documents; file: load `path`; none: only for pre-tokenized sources."""
    path: str | None = None
    """For kind=file: a tokenizer.json, a Hugging Face tokenizer folder, or a SentencePiece .model file."""
    vocab_size: int = Field(4096, ge=260, le=2**32)
    """Vocabulary size when training (special tokens included); with kind=none, the vocabulary of the pre-tokenized ids."""
    eos_token: str = "<|endoftext|>"
    """Token appended after every document (its id is the EOS id); for loaded tokenizers, used if it exists there."""
    train_max_chars: int = Field(20_000_000, ge=1)
    """At most this many characters of training text are used to train the tokenizer (streamed, in document order)."""


class DataConfig(Section):
    seq_len: int = Field(256, ge=8, le=2**31)
    """Tokens per training sequence; each stored row holds seq_len + 1 tokens (inputs and shifted targets)."""
    seed: int = seed_field(1234)
    """Seed of the data order: document sampling, validation split and the global permutation."""
    sources: list[SourceConfig]
    """Where documents come from."""
    stages: list[StageConfig] = Field(default_factory=list)
    """Ordered curriculum; empty means one stage `main` with every source at weight 1 and data.chunks chunks."""
    chunks: int = Field(8, ge=1)
    """Number of chunks when `stages` is empty."""
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    """How text becomes token ids."""
    valid_fraction: float = Field(0.02, ge=0.0, lt=1.0)
    """Share of each source's documents held out for validation (chosen by document hash, before packing)."""
    max_document_chars: int = Field(2_000_000, ge=1)
    """Documents longer than this are rejected (counted in the manifest with the reason)."""
    min_document_chars: int = Field(1, ge=0)
    """Documents shorter than this (after stripping) are rejected as empty."""
    token_dtype: Literal["auto", "uint16", "uint32"] = "auto"
    """On-disk dtype of chunks: auto picks uint16 when the vocabulary fits, else uint32."""
    docs_per_batch: int = Field(512, ge=1)
    """Documents tokenized together in one batch (affects speed and memory, never the result)."""

    @model_validator(mode="after")
    def _check_refs(self) -> DataConfig:
        names = [s.name for s in self.sources]
        if not names:
            raise ValueError("data.sources is empty: give at least one source")
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"source names must be unique, repeated: {sorted(dup)}")
        for st in self.stages:
            for m in st.mix:
                if m.source not in names:
                    raise ValueError(
                        f"stage '{st.name}' mixes unknown source '{m.source}'; sources are {names}"
                    )
        snames = [s.name for s in self.stages]
        if len(set(snames)) != len(snames):
            raise ValueError(f"stage names must be unique, got {snames}")
        if self.min_document_chars > self.max_document_chars:
            raise ValueError(
                f"min_document_chars = {self.min_document_chars} is above max_document_chars = "
                f"{self.max_document_chars}: every document would be rejected"
            )
        return self

    def resolved_stages(self) -> list[StageConfig]:
        """The stages to build: the configured ones, or one `main` stage over every source."""
        if self.stages:
            return list(self.stages)
        shuffle = not all(s.kind == "llm360" for s in self.sources)
        return [
            StageConfig(
                name="main",
                chunks=self.chunks,
                mix=[MixEntry(source=s.name) for s in self.sources],
                shuffle=shuffle,
            )
        ]
