"""The `data` section: sources, mix, curriculum stages, tokenizer and chunking."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, field_validator, model_serializer, model_validator

from llm360.config.base import Section, seed_field

SourceKind = Literal["jsonl", "parquet", "text", "hf_dataset", "llm360", "embedded", "snapshot"]
EmbeddedPart = Literal["code", "docs", "package-docs", "licenses"]
FilterValue = str | int | float | bool | None

FIM_TOKENS = ("<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>")
"""StarCoder's names of the fill-in-the-middle sentinels: prefix, middle, suffix and pad."""


def _omit_defaults(data: dict, defaults: dict[str, Any]) -> dict:
    """``data`` without the keys whose value is the given default.

    Fields added after a section's first release are left out of its dump while at their default,
    so a config that does not use them keeps its data hash (and its prepared data's name).
    """
    def same(v: Any, d: Any) -> bool:
        return (list(v) if isinstance(v, tuple) else v) == d

    return {k: v for k, v in data.items() if not (k in defaults and same(v, defaults[k]))}


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


class DocumentFilter(Section):
    field: str = Field(min_length=1)
    """Key of the record to test; dots walk nested objects (`meta.redpajama_set_name`). A record without it has the value null."""
    op: Literal["in", "not_in"] = "in"
    """in: keep the documents whose value is one of `values`; not_in: drop them."""
    values: list[FilterValue] = Field(min_length=1)
    """The values compared with the field's (equal as JSON values: "1" is not 1)."""


class MixEntry(Section):
    source: str
    """Name of a source in data.sources."""
    weight: float = Field(1.0, ge=0.0, le=1000.0)
    """Documents used per document available: <1 sub-samples (by document hash), >1 repeats (2.0 = two epochs); at most 1000."""
    part: tuple[float, float] = (0.0, 1.0)
    """Slice [lo, hi) of the source's documents (by document hash) this entry draws from, e.g. [0, 0.5] for one half."""
    filters: list[DocumentFilter] = Field(default_factory=list)
    """Keep or drop documents by a field of their record before the mix draws them (every filter must pass); dropped ones are counted as filtered_by_mix."""
    fim_rate: float = Field(0.0, ge=0.0, le=1.0)
    """Share of this entry's document copies turned into fill-in-the-middle form (each repeat drawn on its own, by document hash)."""
    spm_rate: float = Field(0.0, ge=0.0, le=1.0)
    """Share of the FIM-transformed copies in suffix-prefix-middle (SPM) order; the rest are prefix-suffix-middle (PSM)."""

    @field_validator("part")
    @classmethod
    def _check_part(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not (0.0 <= lo < hi <= 1.0):
            raise ValueError(f"part must satisfy 0 <= lo < hi <= 1, got [{lo}, {hi}]")
        return v

    @model_validator(mode="after")
    def _check_fim(self) -> MixEntry:
        if self.spm_rate > 0 and self.fim_rate == 0:
            raise ValueError(
                f"mix entry '{self.source}': spm_rate = {self.spm_rate} with fim_rate = 0 transforms nothing; "
                "set fim_rate (the share of copies FIM-transformed) or drop spm_rate"
            )
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict:
        return _omit_defaults(handler(self), {"filters": [], "fim_rate": 0.0, "spm_rate": 0.0})


class StageConfig(Section):
    name: str
    """Stage name (e.g. `stage1`); stages are trained in the order listed."""
    chunks: int | None = Field(None, ge=1)
    """Number of equal-size chunks this stage's rows are split into; one checkpoint per chunk (or give tokens_per_chunk, or data.total_chunks)."""
    tokens_per_chunk: int | None = Field(None, ge=1)
    """Instead of chunks: about this many tokens (rows x (seq_len + 1)) per chunk; the stage gets the nearest whole number of chunks, their sizes within one row of each other."""
    mix: list[MixEntry] = Field(min_length=1)
    """Which sources, in what proportion, make up this stage."""
    shuffle: bool = True
    """Globally permute the stage's rows with the data seed (off keeps file order, e.g. for imported LLM360 chunks)."""

    @model_validator(mode="after")
    def _check_size(self) -> StageConfig:
        if self.chunks is not None and self.tokens_per_chunk is not None:
            raise ValueError(
                f"stage '{self.name}' gives both chunks = {self.chunks} and tokens_per_chunk = "
                f"{self.tokens_per_chunk}; give one of them"
            )
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict:
        return _omit_defaults(handler(self), {"chunks": None, "tokens_per_chunk": None})

    @property
    def uses_fim(self) -> bool:
        """Whether any mix entry of the stage FIM-transforms documents."""
        return any(m.fim_rate > 0 for m in self.mix)


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
    fim_tokens: tuple[str, str, str, str] = FIM_TOKENS
    """Fill-in-the-middle sentinels (prefix, middle, suffix, pad): a trained tokenizer adds them when a mix entry has fim_rate > 0; a loaded one must have the first three."""

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict:
        return _omit_defaults(handler(self), {"fim_tokens": list(FIM_TOKENS)})


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
    total_chunks: int | None = Field(None, ge=1)
    """With stages that give neither chunks nor tokens_per_chunk: this many chunks in all, shared among the stages in proportion to their rows (chunks of about equal size in every stage)."""
    partial_chunk: Literal["spread", "drop"] = "spread"
    """With tokens_per_chunk: `spread` shares a stage's rows among its nearest whole number of chunks (no row dropped; sizes within one row inside a stage, across stages apart by each stage's rounding); `drop` makes every chunk of every stage exactly round(tokens_per_chunk / (seq_len + 1)) rows and drops each stage's rows past its last whole chunk (counted in the manifest as rows_dropped_uneven_split)."""
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
        kinds = {s.name: s.kind for s in self.sources}
        for st in self.stages:
            for m in st.mix:
                if kinds[m.source] == "llm360" and (m.filters or m.fim_rate > 0):
                    raise ValueError(
                        f"stage '{st.name}': source '{m.source}' is pre-tokenized (kind llm360): its rows "
                        "have no text to FIM-transform and no record to filter; drop fim_rate and filters there"
                    )
        self._check_chunking()
        if self.min_document_chars > self.max_document_chars:
            raise ValueError(
                f"min_document_chars = {self.min_document_chars} is above max_document_chars = "
                f"{self.max_document_chars}: every document would be rejected"
            )
        return self

    def _check_chunking(self) -> None:
        sized = [st.name for st in self.stages if st.chunks is not None or st.tokens_per_chunk is not None]
        if self.total_chunks is not None:
            if not self.stages:
                raise ValueError("data.total_chunks shares chunks among data.stages; without stages use data.chunks")
            if sized:
                raise ValueError(
                    f"data.total_chunks = {self.total_chunks} shares the chunks among the stages, but stages "
                    f"{sized} give their own chunks or tokens_per_chunk; drop one or the other"
                )
            if self.total_chunks < len(self.stages):
                raise ValueError(
                    f"data.total_chunks = {self.total_chunks} is fewer than the {len(self.stages)} stages; "
                    "every stage needs at least one chunk"
                )
            return
        unsized = [st.name for st in self.stages if st.name not in sized]
        if self.partial_chunk == "drop":
            counted = [st.name for st in self.stages if st.tokens_per_chunk is None]
            if not self.stages or counted:
                raise ValueError(
                    "data.partial_chunk = drop makes chunks of tokens_per_chunk exactly; "
                    + (f"stages {counted} do not give tokens_per_chunk" if self.stages else "there are no data.stages")
                    + " (give every stage tokens_per_chunk, or leave partial_chunk at spread)"
                )
        if unsized:
            raise ValueError(
                f"stages {unsized} give neither chunks nor tokens_per_chunk; give one of them per stage, "
                "or data.total_chunks for the whole run"
            )

    @property
    def uses_fim(self) -> bool:
        """Whether any stage FIM-transforms documents (the tokenizer then needs the FIM tokens)."""
        return any(st.uses_fim for st in self.stages)

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict:
        return _omit_defaults(handler(self), {"total_chunks": None, "partial_chunk": "spread"})

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
