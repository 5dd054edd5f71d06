"""Pieces of a source: the units prepare's map tasks read, split by input, never by worker.

A source's pieces, read one after another in order, yield exactly the items of
:func:`~llm360.data.sources.iter_source` -- same documents, same ids, same order -- so the data
never depends on how the input was cut. A piece is:

* a whole file (compressed JSONL, a snapshot, a small file);
* a fixed byte range of a large uncompressed JSONL (or LLM360) file: the lines that *begin* in
  ``[start, stop)``; their numbers come from :func:`~llm360.data.sources.count_line_starts` of
  the ranges before it (:func:`number_lines`), since a document id holds its line number;
* a run of consecutive row groups of a Parquet file (rows numbered from the file's first row);
* a run of consecutive text files (one document each);
* a whole saved dataset or embedded corpus part.

Ranges are cut at fixed multiples of ``piece_bytes`` of the input, so they are a function of the
files alone. Each piece carries the size and modification time of its files
(:attr:`Piece.fingerprint`): a finished map task is reused only while they are unchanged.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llm360 import __version__
from llm360.data import sources as _src
from llm360.errors import DataError

if TYPE_CHECKING:
    from llm360.config import SourceConfig

PIECE_BYTES = 256 << 20
"""Default target size of a piece: a byte range of a large JSONL file, a run of row groups or text files."""
_TEXT_FILES_MAX = 4096  # text files per piece at most (small files: one task each would be overhead)


@dataclass(frozen=True)
class Piece:
    """One piece of a source (see the module docstring)."""

    source: str
    """The configured source's name."""
    index: int
    """Position among the source's pieces (the read order)."""
    kind: str
    files: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    """Document-id prefix of each file (its path relative to the source's id base)."""
    start: int = 0
    """First byte (a byte range) or first row group (Parquet)."""
    stop: int | None = None
    """End byte or end row group; None: to the end of the file."""
    first: int = 1
    """Number of the first line (byte ranges; 0: not counted yet) or first row (Parquet)."""
    fingerprint: tuple = ()
    """(size, mtime_ns) of every file read, or what an embedded corpus depends on."""

    @property
    def ranged(self) -> bool:
        """A byte range of a JSONL/LLM360 file (the line numbers of ranges after the first must be counted)."""
        return self.kind in ("jsonl", "llm360") and self.stop is not None

    def describe(self) -> str:
        """A short human name: ``web/part-1.jsonl`` or ``web/part-1.jsonl bytes 268435456-536870912``."""
        where = self.labels[0] if self.labels else (self.kind if self.kind != "embedded" else "built-in corpus")
        if len(self.files) > 1:
            where = f"{self.labels[0]} .. {self.labels[-1]} ({len(self.files)} files)"
        if self.ranged:
            return f"{self.source}:{where} bytes {self.start}-{self.stop}"
        if self.kind == "parquet" and self.stop is not None:
            return f"{self.source}:{where} row groups {self.start}-{self.stop - 1}"
        return f"{self.source}:{where}"

    def identity(self) -> dict:
        """What the piece is, JSON-able: the part of a map task's key that names its input."""
        d = dataclasses.asdict(self)
        d["fingerprint"] = [list(f) if isinstance(f, tuple) else f for f in self.fingerprint]
        return d


def _stat(path: str | Path) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}; check that it exists and is readable") from None
    return (st.st_size, st.st_mtime_ns)


def list_pieces(src: SourceConfig, piece_bytes: int = PIECE_BYTES) -> list[Piece]:
    """The pieces of a source in read order. Byte ranges after a file's first have ``first=0``
    until :func:`number_lines` fills them in. Raises DataError as
    :func:`~llm360.data.sources.list_source_files` does, and for an unreadable Parquet file."""
    piece_bytes = max(1, int(piece_bytes))
    if src.kind == "embedded":
        minor = ".".join(platform.python_version_tuple()[:2])
        return [Piece(src.name, 0, "embedded", fingerprint=(("llm360", __version__), ("python", minor)))]
    entries = _src._expand_paths(src)
    labels = _src.doc_id_prefixes(src, entries) if src.kind != "snapshot" else [""] * len(entries)
    out: list[Piece] = []

    def add(**kw) -> None:
        out.append(Piece(src.name, len(out), src.kind, **kw))

    if src.kind == "text":
        group: list[tuple[str, str]] = []
        size = 0
        for path, label in zip(entries, labels, strict=True):
            group.append((str(path), label))
            size += _stat(path)[0]
            if size >= piece_bytes or len(group) >= _TEXT_FILES_MAX:
                add(files=tuple(p for p, _ in group), labels=tuple(lb for _, lb in group),
                    fingerprint=tuple(_stat(p) for p, _ in group))
                group, size = [], 0
        if group:
            add(files=tuple(p for p, _ in group), labels=tuple(lb for _, lb in group),
                fingerprint=tuple(_stat(p) for p, _ in group))
        return out
    for path, label in zip(entries, labels, strict=True):
        if src.kind == "hf_dataset":
            data_files = _src._hf_data_files(_src._hf_split_dir(path))
            add(files=(str(path),), labels=(label,), fingerprint=tuple(_stat(p) for p in data_files))
            continue
        stat = _stat(path)
        one = {"files": (str(path),), "labels": (label,), "fingerprint": (stat,)}
        if src.kind == "parquet":
            sizes = _row_group_sizes(path)
            if not sizes:
                add(**one, start=0, stop=0, first=0)
                continue
            g0, row, acc, first_row = 0, 0, 0, 0
            for g, (rows, nbytes) in enumerate(sizes):
                acc += nbytes
                row += rows
                if acc >= piece_bytes and g + 1 < len(sizes):
                    add(**one, start=g0, stop=g + 1, first=first_row)
                    g0, acc, first_row = g + 1, 0, row
            add(**one, start=g0, stop=len(sizes), first=first_row)
            continue
        if src.kind in ("jsonl", "llm360") and stat[0] > piece_bytes and _uncompressed(path):
            for lo in range(0, stat[0], piece_bytes):
                add(**one, start=lo, stop=min(lo + piece_bytes, stat[0]), first=1 if lo == 0 else 0)
            continue
        add(**one)
    return out


def _uncompressed(path: Path) -> bool:
    _, method = _src._split_compression(path.name.lower())
    if method is not None:
        return False
    with open(path, "rb") as f:
        head = f.read(8)
    return not any(head.startswith(magic) for magic, _ in _src._MAGIC)


def _row_group_sizes(path: Path) -> list[tuple[int, int]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except (pa.ArrowException, OSError) as e:
        raise DataError(
            f"{path}: not a readable Parquet file ({e}); check that it is complete and really Parquet"
        ) from None
    sizes = [(meta.row_group(g).num_rows, meta.row_group(g).total_byte_size) for g in range(meta.num_row_groups)]
    return sizes


def count_lines(piece: Piece) -> int:
    """Lines beginning in a byte-range piece (the task :func:`number_lines` needs the results of)."""
    assert piece.ranged and piece.stop is not None
    return _src.count_line_starts(Path(piece.files[0]), piece.start, piece.stop)


def number_lines(pieces: list[Piece], counts: dict[int, int]) -> list[Piece]:
    """The pieces with the first line number of every byte range filled in.

    ``counts``: :func:`count_lines` of every ranged piece, by position in ``pieces``.
    """
    out: list[Piece] = []
    next_line: dict[str, int] = {}
    for i, p in enumerate(pieces):
        if p.ranged:
            f = p.files[0]
            first = 1 if p.start == 0 else next_line[f]
            next_line[f] = first + counts[i]
            p = dataclasses.replace(p, first=first)
        out.append(p)
    return out


def iter_piece(src: SourceConfig, piece: Piece, *, max_document_chars: int, min_document_chars: int,
               columns: tuple[str, ...] = ()) -> Iterator[_src.SourceItem]:
    """The items of one piece, in order: for the pieces of :func:`list_pieces` one after another,
    exactly what :func:`~llm360.data.sources.iter_source` yields. ``columns``: the record fields a
    Parquet or dataset Document carries besides its text (for the mix's filters; JSONL lines carry
    their whole object)."""
    limits = (max_document_chars, min_document_chars)
    if piece.kind == "embedded":
        assert src.embedded is not None
        return _src._iter_embedded(src.name, src.embedded, *limits)
    path, label = Path(piece.files[0]), piece.labels[0]
    if piece.kind == "jsonl":
        if piece.ranged:
            assert piece.first > 0, "number_lines() first"
            return _src._iter_jsonl(src.name, path, label, src.text_field, *limits,
                                    start=piece.start, stop=piece.stop, first_line=piece.first)
        return _src._iter_jsonl(src.name, path, label, src.text_field, *limits)
    if piece.kind == "llm360":
        if piece.ranged:
            assert piece.first > 0, "number_lines() first"
            return _src._iter_llm360(src.name, path, label, start=piece.start, stop=piece.stop,
                                     first_line=piece.first)
        return _src._iter_llm360(src.name, path, label)
    if piece.kind == "parquet":
        groups = (piece.start, piece.stop) if piece.stop is not None else None
        return _src._iter_parquet(src.name, path, label, src.text_field, *limits, groups=groups,
                                  first_row=piece.first if groups else 0, columns=columns)
    if piece.kind == "text":
        return _src._chain(_src._iter_text(src.name, Path(p), lb, *limits)
                           for p, lb in zip(piece.files, piece.labels, strict=True))
    if piece.kind == "hf_dataset":
        return _src._iter_hf_dataset(src.name, path, label, src.text_field, *limits, columns=columns)
    if piece.kind == "snapshot":
        return _src._iter_snapshot(src.name, path, *limits)
    raise DataError(f"source '{src.name}': unknown kind {piece.kind!r}")
