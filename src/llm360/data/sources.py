"""Source readers: turn the files of one configured source into a stream of documents.

:func:`iter_source` reads a :class:`~llm360.config.SourceConfig` and yields, in a deterministic
order, exactly one item for every record it meets: a :class:`Document` (text), a
:class:`TokenRow` (a pre-tokenized LLM360 row) or a :class:`Rejected` (a record that cannot be
used, with a stable reason key from :data:`REJECT_REASONS`). So documents in = used + rejected.

Order: the source's paths are expanded (globs, folders recursively) and sorted by path; inside a
file, lines or rows are read in order. Ids are ``<path>:<line>`` (1-based) for JSONL and LLM360
files, ``<path>:<row>`` (0-based) for Parquet and saved datasets, and ``<path>`` for text files,
where ``<path>`` is the file's path relative to the deepest folder holding all the source's paths
(:func:`doc_id_prefixes`): the same ids, split and mix wherever the corpus lies.

Everything streams: JSONL line by line, Parquet by row group and batch, datasets by batch, text
files one at a time. No reader holds more than one line, batch or (bounded) document in memory.

Bad records never stop the reader and are never dropped silently: each becomes a ``Rejected``.
Problems with a whole file (a path that matches nothing, a corrupt gzip/zstd stream, an
unreadable Parquet file, a folder that is not a saved dataset, a missing text column) raise
:class:`~llm360.errors.DataError` naming the file (and line) and what to do.
"""

from __future__ import annotations

import bz2
import contextlib
import glob
import gzip
import io
import itertools
import json
import logging
import lzma
import os
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

import zstandard

from llm360.data.documents import Document, Rejected, TokenRow
from llm360.errors import DataError

if TYPE_CHECKING:
    import pyarrow as pa

    from llm360.config import SourceConfig

logger = logging.getLogger(__name__)

__all__ = ["REJECT_REASONS", "SourceItem", "iter_source", "list_source_files"]

SourceItem = Document | TokenRow | Rejected
"""What :func:`iter_source` yields."""

REJECT_REASONS: dict[str, str] = {
    "malformed_json": "the line is not valid JSON",
    "not_an_object": "the line is valid JSON but not an object",
    "missing_text_field": "the object has no text field (see data.sources.<name>.text_field)",
    "text_not_a_string": "the text field holds something other than a string (null, number, list, ...)",
    "invalid_utf8": "the bytes are not valid UTF-8 (or the text holds an unpaired surrogate escape)",
    "empty": "the text, stripped of whitespace, is shorter than data.min_document_chars",
    "too_large": "the text is longer than data.max_document_chars",
    "missing_token_ids": "an LLM360 row without `token_ids`",
    "bad_token_ids": "an LLM360 row whose `token_ids` is not a non-empty list of non-negative integers",
}
"""Stable reason keys of :class:`Rejected` items, with what each means."""

_BUF = 1 << 20
_GLOB_CHARS = frozenset("*?[")
_JSONL_NAMES = (".jsonl", ".json", ".ndjson", ".jsonlines")
_PARQUET_NAMES = (".parquet", ".pq", ".parq")
_COMPRESSION_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2", ".xz": "xz"}
# Magic numbers of the binary compression formats, to read a mislabeled `x.jsonl` that is compressed.
_MAGIC = ((b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"\xfd7zXZ\x00", "xz"))
_TOOLS = {"gzip": "gzip -t", "zstd": "zstd -t", "bz2": "bzip2 -t", "xz": "xz -t"}
_READ_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError, lzma.LZMAError, ValueError)
# A JSON string can spend up to 12 bytes on one character (a `\ud83d\ude00` escape), so a line
# longer than this cannot hold a document within max_document_chars; it is rejected unparsed,
# which keeps memory bounded even for a file without newlines.
_BYTES_PER_CHAR_MAX = 12
_LINE_SLACK = 1 << 20
_MISSING = object()
_json_decode = json.JSONDecoder().decode


# ---------------------------------------------------------------------------------- public API


def list_source_files(src: SourceConfig) -> list[Path]:
    """The files this source reads, sorted by path (the order :func:`iter_source` reads them).

    Globs are expanded and folders searched recursively: inside a folder, hidden files are left
    out, and for jsonl/llm360/parquet so are files without such an extension (with a warning that
    names them); files named directly or by a glob are always read. For ``hf_dataset`` these are the
    Arrow files of each saved dataset (the ``train`` split of a DatasetDict); for ``embedded``,
    an empty list (the corpus is built into Python). Raises :class:`DataError` when a path or glob
    matches nothing.
    """
    if src.kind == "embedded":
        return []
    if src.kind == "hf_dataset":
        files: list[Path] = []
        for root in _expand_paths(src):
            files.extend(_hf_data_files(_hf_split_dir(root)))
        return files
    return _expand_paths(src)


def iter_source(
    src: SourceConfig, *, max_document_chars: int, min_document_chars: int
) -> Iterator[Document | TokenRow | Rejected]:
    """Yield one Document, TokenRow or Rejected per record of the source, in deterministic order.

    ``max_document_chars``: texts longer than this are rejected as ``too_large``.
    ``min_document_chars``: texts whose stripped length is below this are rejected as ``empty``.
    Paths are expanded here (a path or glob that matches nothing raises :class:`DataError` at
    once); reading happens lazily as the iterator is consumed, and whole-file problems raise
    :class:`DataError` when that file is reached.
    """
    limits = (max_document_chars, min_document_chars)
    if src.kind == "embedded":
        assert src.embedded is not None  # guaranteed by SourceConfig's validator
        return _iter_embedded(src.name, src.embedded, *limits)
    entries = _expand_paths(src)
    labelled = list(zip(entries, doc_id_prefixes(src, entries), strict=True))
    if src.kind == "jsonl":
        return _chain(_iter_jsonl(src.name, p, lb, src.text_field, *limits) for p, lb in labelled)
    if src.kind == "llm360":
        return _chain(_iter_llm360(src.name, p, lb) for p, lb in labelled)
    if src.kind == "parquet":
        return _chain(_iter_parquet(src.name, p, lb, src.text_field, *limits) for p, lb in labelled)
    if src.kind == "text":
        return _chain(_iter_text(src.name, p, lb, *limits) for p, lb in labelled)
    if src.kind == "hf_dataset":
        return _chain(_iter_hf_dataset(src.name, p, lb, src.text_field, *limits) for p, lb in labelled)
    if src.kind == "snapshot":
        return _chain(_iter_snapshot(src.name, p, *limits) for p in entries)
    raise DataError(f"source '{src.name}': unknown kind {src.kind!r}")


def _chain(iterators: Iterator[Iterator[SourceItem]]) -> Iterator[SourceItem]:
    for it in iterators:
        yield from it


def doc_id_base(src: SourceConfig) -> Path:
    """The folder a source's document ids are relative to: the deepest one holding every folder named
    by ``src.paths`` (a folder named is that folder, a glob its fixed leading folders, a file or a saved
    dataset the folder it lies in), as an absolute path."""
    anchors = []
    for given in src.paths:
        path = Path(os.path.expanduser(given))
        if path.exists():
            walked = path.is_dir() and src.kind != "hf_dataset"
            anchors.append(path if walked else path.parent)
        else:  # a glob: the folders before its first wildcard
            fixed = itertools.takewhile(lambda part: not _GLOB_CHARS.intersection(part), path.parts)
            anchors.append(Path(*fixed))
    return Path(os.path.commonpath([os.path.abspath(a) for a in anchors]))


def doc_id_prefixes(src: SourceConfig, entries: list[Path]) -> list[str]:
    """The document-id prefix of each of a source's files (``entries``, from :func:`_expand_paths`): its
    path relative to :func:`doc_id_base`.

    So ids, and with them the validation split and every mixing draw, stay the same when the corpus
    is moved, named by an absolute path or read from another working directory, and when files are
    added to a folder; distinct files keep distinct prefixes.
    """
    if not entries:
        return []
    base = doc_id_base(src)
    return [Path(os.path.relpath(os.path.abspath(p), base)).as_posix() for p in entries]


# ------------------------------------------------------------------------------ path expansion


def _expand_paths(src: SourceConfig) -> list[Path]:
    """Files (or, for hf_dataset, dataset folders) named by src.paths, deduplicated, sorted."""
    if not src.paths:
        raise DataError(
            f"source '{src.name}' (kind={src.kind}) has no paths; set them in the config or with "
            f"--set data.sources.{src.name}.paths=[file.jsonl,folder/,'glob/*.parquet']"
        )
    found: list[Path] = []
    for given in src.paths:
        path = Path(os.path.expanduser(given))
        if path.exists():
            matches = [path]
        elif _GLOB_CHARS.intersection(given):
            matches = [Path(m) for m in glob.glob(str(path), recursive=True)]
            if not matches:
                raise DataError(
                    f"source '{src.name}': the glob {given!r} matches nothing "
                    f"(relative to the working directory {os.getcwd()}); check the pattern"
                )
        else:
            raise DataError(
                f"source '{src.name}': {given!r} does not exist (relative paths are relative to the "
                f"working directory {os.getcwd()}); fix data.sources.{src.name}.paths"
            )
        for match in matches:
            if src.kind == "hf_dataset" or not match.is_dir():
                found.append(match)
                continue
            files = _walk(src, match)
            if not files:
                raise DataError(
                    f"source '{src.name}': the folder {match} holds no {src.kind} files; "
                    "point paths at the data files or a folder that has them"
                )
            found.extend(files)
    found.sort(key=lambda p: Path(os.path.abspath(p)).parts)  # the same order however paths are written
    unique: list[Path] = []
    seen: dict[str, Path] = {}
    for path in found:
        real = os.path.realpath(path)
        if real in seen:
            logger.warning(
                "source '%s': %s is matched more than once by paths; reading it once", src.name, path
            )
            continue
        seen[real] = path
        unique.append(path)
    return unique


def _walk(src: SourceConfig, folder: Path) -> list[Path]:
    """Every non-hidden file under folder that this source kind reads, recursively."""
    kept: list[Path] = []
    skipped: list[Path] = []
    visited = {os.path.realpath(folder)}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        # Follow symlinked folders (common for data on shared storage), but never around a cycle.
        kept_dirs = []
        for d in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, d))
            if not d.startswith(".") and real not in visited:
                visited.add(real)
                kept_dirs.append(d)
        dirnames[:] = kept_dirs
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            (kept if _kind_reads(src.kind, name) else skipped).append(path)
    if skipped:
        skipped.sort(key=lambda p: p.parts)
        logger.warning(
            "source '%s': skipped %d file(s) under %s that are not %s files by name (e.g. %s); "
            "name them explicitly in paths to read them",
            src.name,
            len(skipped),
            folder,
            src.kind,
            ", ".join(str(p) for p in skipped[:3]),
        )
    return kept


def _kind_reads(kind: str, name: str) -> bool:
    lower = name.lower()
    if kind in ("jsonl", "llm360"):
        stem, _ = _split_compression(lower)
        return stem.endswith(_JSONL_NAMES)
    if kind == "parquet":
        return lower.endswith(_PARQUET_NAMES)
    return True


def _split_compression(name: str) -> tuple[str, str | None]:
    for suffix, method in _COMPRESSION_SUFFIXES.items():
        if name.endswith(suffix):
            return name[: -len(suffix)], method
    return name, None


# ------------------------------------------------------------------------------ opening files


def _open_lines(path: Path) -> tuple[IO[bytes], IO[bytes], str | None]:
    """Open path for binary line reading, decompressing by suffix (or by magic number).

    Returns (the file, the stream to read lines from, the compression or None); close both.
    """
    _, method = _split_compression(path.name.lower())
    try:
        raw = open(path, "rb", buffering=_BUF)
    except OSError as e:
        raise DataError(
            f"cannot open {path}: {e.strerror or e}; check that it exists and is readable"
        ) from None
    try:
        if method is None:
            head = raw.peek(8)[:8]
            method = next((m for magic, m in _MAGIC if head.startswith(magic)), None)
            if method is not None:
                logger.info(
                    "%s is %s-compressed although its name does not say so; decompressing", path, method
                )
        if method is None:
            return raw, raw, None
        if method == "gzip":
            return raw, gzip.GzipFile(fileobj=raw, mode="rb"), method
        if method == "zstd":
            return raw, io.BufferedReader(_ZstdReader(raw), buffer_size=_BUF), method
        if method == "bz2":
            return raw, bz2.BZ2File(raw, mode="rb"), method
        return raw, lzma.LZMAFile(raw, mode="rb"), method
    except BaseException:
        raw.close()
        raise


class _ZstdReader(io.RawIOBase):
    """Decompresses every frame of a zstd stream and raises if the stream ends inside a frame.

    (zstandard's ``stream_reader`` ends quietly on a truncated file, which would lose data unseen.)
    """

    _CHUNK = 1 << 16  # compressed bytes per step; bounds the decompressed block held at once

    def __init__(self, raw: IO[bytes]) -> None:
        super().__init__()
        self._raw = raw
        # max_window_size: accept files written with `zstd --long`.
        self._dctx = zstandard.ZstdDecompressor(max_window_size=1 << 31)
        self._dobj: Any = None  # the decompressor of the frame in progress
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._out:
            chunk = self._raw.read(self._CHUNK)
            if not chunk:
                if self._dobj is not None:
                    raise zstandard.ZstdError("the file ends inside a zstd frame (truncated)")
                return 0
            parts = []
            while chunk:
                if self._dobj is None:
                    self._dobj = self._dctx.decompressobj()
                parts.append(self._dobj.decompress(chunk))
                chunk = b""
                if self._dobj.eof:  # a frame ended; what follows is the next frame
                    chunk = self._dobj.unused_data
                    self._dobj = None
            self._out = memoryview(b"".join(parts))
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


def _read_error(path: Path, lineno: int, method: str | None, err: BaseException) -> DataError:
    if method is None:
        return DataError(f"{path}: cannot read line {lineno}: {err}; check the file and the disk")
    return DataError(
        f"{path}: corrupt or truncated {method} data at line {lineno} ({type(err).__name__}: {err}); "
        f"test it with `{_TOOLS[method]} {path}` and re-download or re-create it"
    )


def _iter_lines(
    path: Path, limit: int = -1, *, start: int = 0, stop: int | None = None, first_line: int = 1
) -> Iterator[tuple[int, bytes, int]]:
    """Yield (1-based line number, line bytes, total bytes of the line) for each line.

    With ``limit`` > 0, a line of ``limit`` bytes or more is returned truncated to ``limit`` bytes
    (its total size in the third field) and the rest is skipped without being held in memory.
    ``start``/``stop`` (uncompressed files only): just the lines that *begin* at a byte offset in
    ``[start, stop)``, numbered from ``first_line`` -- one piece of a file split into byte ranges.
    """
    raw, f, method = _open_lines(path)
    with raw, f:
        readline = f.readline
        ranged = start > 0 or stop is not None
        if ranged and method is not None:
            raise AssertionError(f"{path}: a byte range of a {method}-compressed file cannot be read")
        pos = 0
        lineno = first_line - 1
        if start > 0:
            f.seek(start - 1)  # the line that holds byte start-1 began before this range: skip it
            pos = start - 1
            while True:
                rest = readline(_BUF)
                pos += len(rest)
                if not rest or rest[-1] == 0x0A:
                    break
        while True:
            if stop is not None and pos >= stop:
                return
            lineno += 1
            try:
                line = readline(limit)
                size = len(line)
                if size == limit and line[-1] != 0x0A:
                    while True:
                        rest = readline(limit)
                        size += len(rest)
                        if not rest or rest[-1] == 0x0A:
                            break
            except _READ_ERRORS as e:
                raise _read_error(path, lineno, method, e) from None
            if not line:
                return
            pos += size
            yield lineno, line, size


def count_line_starts(path: Path, start: int, stop: int) -> int:
    """How many lines of an uncompressed file begin at a byte offset in ``[start, stop)``.

    A line begins at offset 0 and after every newline; :func:`_iter_lines` numbers the lines of
    a byte range from the counts of the ranges before it. Reads ``stop - start`` bytes.
    """
    n = 1 if start == 0 else 0
    lo = max(0, start - 1)
    hi = max(lo, stop - 1)  # a newline at p starts a line at p + 1
    try:
        with open(path, "rb", buffering=0) as f:
            f.seek(lo)
            left = hi - lo
            while left > 0:
                block = f.read(min(left, 16 << 20))
                if not block:
                    break
                n += block.count(b"\n")
                left -= len(block)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}; check that it exists and is readable") from None
    return n


# ------------------------------------------------------------------------------ shared checks


def _iter_snapshot(name: str, path: Path, max_chars: int, min_chars: int) -> Iterator[Document | Rejected]:
    """A source snapshot written by prepare: every item again, under its original id.

    Lines are ``{"id", "text"}`` for documents and ``{"id", "rejected", "detail"}`` for items the
    original reader rejected, so re-preparing from a snapshot numbers and splits every document
    exactly as the original run did.
    """
    for lineno, line, _ in _iter_lines(path):
        try:
            obj = json.loads(line)
            doc_id = obj["id"]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}:{lineno}: not a source snapshot line ({e})") from None
        if "rejected" in obj:
            yield Rejected(name, doc_id, str(obj["rejected"]), str(obj.get("detail", "")))
        else:
            yield _check_text(name, doc_id, obj["text"], max_chars, min_chars, obj.get("fields"))


def _check_text(name: str, doc_id: str, text: str, max_chars: int, min_chars: int,
                fields: dict | None = None) -> Document | Rejected:
    """The Document (carrying its record's ``fields``), or the rejection for a text that is too long
    or (nearly) empty."""
    n = len(text)
    if n > max_chars:
        return Rejected(name, doc_id, "too_large", f"{n} chars > max_document_chars={max_chars}")
    if min_chars > 0:
        # strip() copies the text, so only when the ends hold whitespace at all.
        if n < min_chars or ((text[0].isspace() or text[-1].isspace()) and len(text.strip()) < min_chars):
            return Rejected(
                name,
                doc_id,
                "empty",
                f"{len(text.strip())} chars after stripping < min_document_chars={min_chars}",
            )
    return Document(name, doc_id, text, fields)


def _decode_json_line(name: str, doc_id: str, line: bytes, lineno: int) -> Any:
    """The parsed line, a Rejected for bad bytes or JSON, or None for a blank line."""
    try:
        s = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return Rejected(name, doc_id, "invalid_utf8", f"byte {e.start} of the line: {e.reason}")
    try:
        return _json_decode(s)
    except ValueError as e:
        if not s.strip():
            return None  # blank lines carry no record
        if lineno == 1 and s.startswith("\ufeff"):
            return _decode_json_line(name, doc_id, line[3:], 2)  # a UTF-8 byte-order mark
        detail = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
        return Rejected(name, doc_id, "malformed_json", detail)
    except RecursionError:
        return Rejected(name, doc_id, "malformed_json", "nesting too deep")


def _check_not_pretty_printed(path: Path, lineno: int, line: bytes) -> None:
    if line.strip() in (b"[", b"{"):
        jq = ".[]" if line.strip() == b"[" else "."
        raise DataError(
            f"{path}: line {lineno} is just {line.strip().decode()!r}: this looks like one pretty-printed "
            "JSON document, not JSON Lines (one object per line). Convert it, e.g. "
            f"`jq -c {jq!r} {path} > {path.with_suffix('.jsonl').name}`"
        )


def _keys(obj: dict) -> str:
    keys = list(obj)
    shown = ", ".join(repr(k) for k in keys[:20])
    return f"keys: [{shown}{', ...' if len(keys) > 20 else ''}]"


# ---------------------------------------------------------------------------------------- jsonl


def _iter_jsonl(
    name: str, path: Path, label: str, text_field: str, max_chars: int, min_chars: int,
    *, start: int = 0, stop: int | None = None, first_line: int = 1,
) -> Iterator[Document | Rejected]:
    limit = _BYTES_PER_CHAR_MAX * max_chars + _LINE_SLACK
    seen_record = start > 0  # a later byte range: the file's first record lies before it
    for lineno, line, size in _iter_lines(path, limit, start=start, stop=stop, first_line=first_line):
        doc_id = f"{label}:{lineno}"
        if size >= limit:
            yield Rejected(
                name,
                doc_id,
                "too_large",
                f"line of {size} bytes, too long for max_document_chars={max_chars}",
            )
            continue
        try:
            obj = _json_decode(line.decode("utf-8"))
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError too
            obj = _decode_json_line(name, doc_id, line, lineno)  # the slow path that says why
            if obj is None:
                continue
            if not seen_record and type(obj) is Rejected and obj.reason == "malformed_json":
                _check_not_pretty_printed(path, lineno, line)
        seen_record = True
        if type(obj) is not dict:
            if type(obj) is Rejected:
                yield obj
            else:
                yield Rejected(name, doc_id, "not_an_object", f"a JSON {_json_type(obj)}")
            continue
        text = obj.get(text_field, _MISSING)
        if type(text) is not str:
            if text is _MISSING:
                yield Rejected(name, doc_id, "missing_text_field", f"no {text_field!r}; {_keys(obj)}")
            else:
                yield Rejected(
                    name, doc_id, "text_not_a_string", f"{text_field!r} is a JSON {_json_type(text)}"
                )
            continue
        # A lone surrogate can only come from a `\\udXXX` escape, and only in a non-ASCII text.
        if not text.isascii() and (b"\\ud" in line or b"\\uD" in line) and _has_lone_surrogate(text):
            yield Rejected(
                name, doc_id, "invalid_utf8", "the text holds an unpaired UTF-16 surrogate escape (\\udXXX)"
            )
            continue
        yield _check_text(name, doc_id, text, max_chars, min_chars, obj)


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )


def _has_lone_surrogate(text: str) -> bool:
    # json turns "\ud800" into a lone surrogate, which no UTF-8 tokenizer can encode.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# --------------------------------------------------------------------------------------- llm360


def _iter_llm360(
    name: str, path: Path, label: str, *, start: int = 0, stop: int | None = None, first_line: int = 1
) -> Iterator[TokenRow | Rejected]:
    for lineno, line, _size in _iter_lines(path, start=start, stop=stop, first_line=first_line):
        doc_id = f"{label}:{lineno}"
        obj = _decode_json_line(name, doc_id, line, lineno)
        if obj is None:
            continue
        if type(obj) is Rejected:
            yield obj
            continue
        if type(obj) is not dict:
            yield Rejected(name, doc_id, "not_an_object", f"a JSON {_json_type(obj)}")
            continue
        ids = obj.get("token_ids", _MISSING)
        if ids is _MISSING:
            yield Rejected(name, doc_id, "missing_token_ids", _keys(obj))
            continue
        problem = _token_ids_problem(ids)
        if problem:
            yield Rejected(name, doc_id, "bad_token_ids", problem)
            continue
        row_source = obj.get("source")
        if type(row_source) is not str or not row_source:
            row_source = name
        yield TokenRow(name, doc_id, ids, row_source)


def _token_ids_problem(ids: object) -> str:
    if type(ids) is not list:
        return f"token_ids is a JSON {_json_type(ids)}, not an array"
    if not ids:
        return "token_ids is empty"
    if set(map(type, ids)) != {int}:  # bools and floats are not ids
        i, bad = next((i, t) for i, t in enumerate(ids) if type(t) is not int)
        return f"token_ids[{i}] is a JSON {_json_type(bad)} ({bad!r}), not an integer"
    if min(ids) < 0:
        return f"token_ids holds a negative id ({min(ids)})"
    return ""


# ------------------------------------------------------------------------------------ parquet


def _is_string_type(t: pa.DataType) -> bool:
    import pyarrow as pa

    view = getattr(pa.types, "is_string_view", None)  # pyarrow >= 16
    return pa.types.is_string(t) or pa.types.is_large_string(t) or bool(view and view(t))


def _is_binary_type(t: pa.DataType) -> bool:
    import pyarrow as pa

    view = getattr(pa.types, "is_binary_view", None)  # pyarrow >= 16
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or bool(view and view(t))


def _text_type_ok(t: pa.DataType) -> bool:
    return _is_string_type(t) or _is_binary_type(t)


def _arrow_texts(column: pa.Array | pa.ChunkedArray) -> list[str | bytes | None]:
    """Python values of a string/binary column; values that are not UTF-8 come back as bytes."""
    import pyarrow as pa

    if _is_string_type(column.type):
        try:
            return column.to_pylist()
        except (UnicodeDecodeError, pa.ArrowException):
            # A writer stored bytes that are not UTF-8 in a string column: look at each value.
            column = column.cast(pa.large_binary())
    values: list[str | bytes | None] = column.to_pylist()
    for i, v in enumerate(values):
        if v is not None:
            with contextlib.suppress(UnicodeDecodeError):
                values[i] = v.decode("utf-8")
    return values


def _check_value(
    name: str, doc_id: str, value: str | bytes | None, field: str, max_chars: int, min_chars: int,
    fields: dict | None = None,
) -> Document | Rejected:
    if type(value) is str:
        return _check_text(name, doc_id, value, max_chars, min_chars, fields)
    if value is None:
        return Rejected(name, doc_id, "text_not_a_string", f"{field!r} is null")
    try:
        value.decode("utf-8")
    except UnicodeDecodeError as e:
        return Rejected(name, doc_id, "invalid_utf8", f"byte {e.start}: {e.reason}")
    raise AssertionError("unreachable: decodable bytes are returned as str")


def _column_error(path: Path, field: str, names: list[str], what: str) -> DataError:
    return DataError(
        f"{path}: no column {field!r} in this {what}; its columns are {names}. "
        "Set text_field of the source to the column holding the text"
    )


def _row_fields(table: Any, extra: list[str], first: int) -> list[dict | None]:
    """Per row of a record batch or table, the given columns (from position ``first`` on) as a dict."""
    if not extra:
        return [None] * table.num_rows
    cols = [table.column(first + i).to_pylist() for i in range(len(extra))]
    return [dict(zip(extra, vals, strict=True)) for vals in zip(*cols, strict=True)]


def _iter_parquet(
    name: str, path: Path, label: str, field: str, max_chars: int, min_chars: int, batch_size: int = 1024,
    *, groups: tuple[int, int] | None = None, first_row: int = 0, columns: tuple[str, ...] = (),
) -> Iterator[Document | Rejected]:
    """The rows of a Parquet file, or of its row groups ``[groups[0], groups[1])`` whose first row is
    row ``first_row`` of the file. ``columns``: other columns each Document carries in its fields
    (those the file has)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
    except (pa.ArrowException, OSError) as e:
        raise DataError(
            f"{path}: not a readable Parquet file ({e}); check that it is complete and really Parquet"
        ) from None
    with contextlib.closing(pf):
        if field not in schema.names:
            raise _column_error(path, field, schema.names, "Parquet file")
        ftype = schema.field(field).type
        if not _text_type_ok(ftype):
            raise DataError(f"{path}: column {field!r} has type {ftype}, expected a string column")
        extra = [c for c in columns if c in schema.names and c != field]
        row = first_row
        for group in range(*(groups or (0, pf.num_row_groups))):
            try:
                for batch in pf.iter_batches(batch_size=batch_size, row_groups=[group], columns=[field, *extra]):
                    values = _arrow_texts(batch.column(0))
                    for v, fields in zip(values, _row_fields(batch, extra, 1), strict=True):
                        yield _check_value(name, f"{label}:{row}", v, field, max_chars, min_chars, fields)
                        row += 1
            except (pa.ArrowException, OSError) as e:
                raise DataError(
                    f"{path}: cannot read row group {group} (rows from {row}): {e}; the file is corrupt "
                    "or truncated, re-download or re-create it"
                ) from None


# --------------------------------------------------------------------------------------- text


def _iter_text(name: str, path: Path, doc_id: str, max_chars: int, min_chars: int) -> Iterator[Document | Rejected]:
    try:
        size = path.stat().st_size
        # UTF-8 spends at most 4 bytes per character: a bigger file is too large without reading it.
        if size > 4 * max_chars:
            yield Rejected(
                name,
                doc_id,
                "too_large",
                f"{size} bytes, at least {-(-size // 4)} chars > max_document_chars={max_chars}",
            )
            return
        data = path.read_bytes()
    except OSError as e:
        raise DataError(
            f"cannot read {path}: {e.strerror or e}; check that it exists and is readable"
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        yield Rejected(
            name, doc_id, "invalid_utf8", f"byte {e.start}: {e.reason} (binary file or another encoding?)"
        )
        return
    if text.startswith("\ufeff"):
        text = text[1:]
    yield _check_text(name, doc_id, text, max_chars, min_chars)


# ------------------------------------------------------------------------------ saved datasets


def _hf_split_dir(root: Path) -> Path:
    """The folder of the saved Dataset to read: root itself, or its `train` split."""
    if (root / "dataset_dict.json").is_file():
        try:
            splits = json.loads((root / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{root}/dataset_dict.json is unreadable ({e}); re-save the dataset") from None
        if "train" not in splits:
            raise DataError(
                f"{root}: this DatasetDict has no 'train' split (its splits: {splits}); point paths at "
                f"the split folder to read, e.g. {root / str(splits[0]) if splits else root}"
            )
        return root / "train"
    if (root / "state.json").is_file():
        return root
    what = "a file" if root.is_file() else "a folder without state.json or dataset_dict.json"
    raise DataError(
        f"{root}: not a dataset saved by `datasets` ({what}). kind=hf_dataset reads folders written by "
        "`Dataset.save_to_disk` / `DatasetDict.save_to_disk`; for raw files use kind=jsonl, parquet or text"
    )


def _hf_data_files(split_dir: Path) -> list[Path]:
    try:
        state = json.loads((split_dir / "state.json").read_text(encoding="utf-8"))
        names = [entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{split_dir}/state.json is unreadable ({e}); re-save the dataset") from None
    return [split_dir / n for n in names]


def _iter_hf_dataset(
    name: str, root: Path, root_label: str, field: str, max_chars: int, min_chars: int, batch_size: int = 1024,
    *, columns: tuple[str, ...] = (),
) -> Iterator[Document | Rejected]:
    split_dir = _hf_split_dir(root)
    try:
        import datasets
        import pyarrow as pa
    except ImportError:
        raise DataError("kind=hf_dataset needs the `datasets` package: pip install 'llm360[hf]'") from None
    try:
        ds = datasets.load_from_disk(str(split_dir))
    except Exception as e:  # datasets raises many types for a damaged folder
        raise DataError(
            f"{split_dir}: cannot load the saved dataset ({type(e).__name__}: {e}); re-save it"
        ) from None
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"{split_dir}: expected a single Dataset, found {type(ds).__name__}")
    if field not in ds.column_names:
        raise _column_error(split_dir, field, ds.column_names, "dataset")
    ftype = ds.data.schema.field(field).type
    if not _text_type_ok(ftype):
        raise DataError(f"{split_dir}: column {field!r} has type {ftype}, expected a string column")
    label = (PurePosixPath(root_label) / split_dir.relative_to(root).as_posix()).as_posix()
    extra = [c for c in columns if c in ds.column_names and c != field]
    row = 0
    try:
        for table in ds.select_columns([field, *extra]).with_format("arrow").iter(batch_size=batch_size):
            for v, fields in zip(_arrow_texts(table.column(0)), _row_fields(table, extra, 1), strict=True):
                yield _check_value(name, f"{label}:{row}", v, field, max_chars, min_chars, fields)
                row += 1
    except (pa.ArrowException, OSError) as e:
        raise DataError(
            f"{split_dir}: cannot read rows from {row} ({e}); the dataset is damaged, re-save it"
        ) from None


# ----------------------------------------------------------------------------------- embedded


def _iter_embedded(name: str, part: str, max_chars: int, min_chars: int) -> Iterator[Document | Rejected]:
    from llm360.data.embedded import Undecodable, iter_embedded_items

    for doc_id, text in iter_embedded_items(part):
        if isinstance(text, Undecodable):
            yield Rejected(name, doc_id, "invalid_utf8", text.detail)
        else:
            yield _check_text(name, doc_id, text, max_chars, min_chars)
