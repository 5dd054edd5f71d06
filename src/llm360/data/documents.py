"""What source readers yield: documents with a stable id, or a counted rejection.

Every item a reader meets becomes exactly one :class:`Document`, :class:`TokenRow` or
:class:`Rejected`, so that documents in = documents used + documents rejected holds per source.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Document:
    """One raw text document."""

    source: str
    """Source name from the config."""
    doc_id: str
    """Stable id: `<file relative to the source root or path>:<line or row>` (1-based lines, 0-based rows)."""
    text: str
    fields: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    """The record's other fields, for the mix's filters: a JSONL line's whole object, the requested
    columns of a Parquet row or dataset row; None when the reader has no record (text files, embedded)."""


@dataclass(frozen=True, slots=True)
class TokenRow:
    """One pre-tokenized row from an LLM360 chunk file (kept in file order, never re-packed)."""

    source: str
    """The configured source name (the file set it came from)."""
    doc_id: str
    """`<file>:<line>`."""
    token_ids: tuple[int, ...] | list[int]
    row_source: str
    """The `source` field written in the row (e.g. `arxiv`); tokens are counted under this name."""


@dataclass(frozen=True, slots=True)
class Rejected:
    """An input item that could not be used, with why and where."""

    source: str
    doc_id: str
    reason: str
    """Short, stable reason key used for counting, e.g. `malformed_json`, `missing_text_field`."""
    detail: str = ""
    """Human-readable detail (the parser's message, the field found, ...)."""


def content_hash(text: str) -> str:
    """Content hash of a document: first 16 hex digits of sha256 of its UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()[:16]
