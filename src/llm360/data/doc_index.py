"""Where each document's tokens lie in the chunks: the provenance, indexed by document.

The provenance (``provenance_NNN.npy``, :data:`~llm360.rundir.data.PROVENANCE_DTYPE`) answers "which
documents does this row hold"; the reverse question, "which rows hold this document", would scan
every chunk's provenance. :func:`document_places` answers it from an index built once: for each
documents table (a configured source), every provenance record of every chunk that refers to it,
sorted by document number, so one lookup is a binary search.

The index of a run directory's data is cached in ``data/.doc_index/<source>.npy``
(:func:`~llm360.rundir.layout.doc_index_file`), written atomically on first use; the data directory
never changes once prepared (preparing again replaces it, index and all). A release is read only:
its index is built in memory, since every file of a release is in its SHA256SUMS.

It also finds a document's line in ``data/documents/<source>.jsonl.gz`` by its id or number.
"""

from __future__ import annotations

import gzip
import io
import json
import logging

import numpy as np

from llm360.errors import DataError
from llm360.rundir.atomic import atomic_write_bytes
from llm360.rundir.data import DataStore
from llm360.rundir.layout import RELEASE_SUMS, doc_index_file

logger = logging.getLogger(__name__)

DOC_PLACE_DTYPE = np.dtype(
    [
        ("doc", "<u8"),  # document number n in data/documents/<source>.jsonl.gz
        ("chunk", "<u4"),  # chunk index
        ("row", "<u4"),  # row in the chunk file
        ("row_offset", "<u4"),  # first position of the span in the row
        ("length", "<u4"),  # tokens of the span
        ("doc_offset", "<u4"),  # token offset of the span within the document
        ("source", "<u2"),  # index into manifest["source_names"] (a pre-tokenized row's own source)
        ("fim", "<u2"),  # 0: the document as it is; k: its k-th FIM-transformed copy (the provenance's `fim`)
    ]
)
"""One record per (document span, row): the index's layout, sorted by (doc, chunk, row, row_offset)."""

_MEMORY: dict[tuple[str, str], np.ndarray] = {}  # indexes of read-only data directories, per process


def table_names(store: DataStore) -> list[str]:
    """The documents tables of a data set, in the order provenance's ``table`` field counts them."""
    return [str(s["name"]) for s in store.manifest["data_config"]["sources"]]


def _table_index(store: DataStore, source: str) -> int:
    names = table_names(store)
    if source not in names:
        raise DataError(f"no source named {source!r} in {store.dir} (its sources: {', '.join(names)})")
    return names.index(source)


def build_doc_index(store: DataStore) -> dict[str, np.ndarray]:
    """Every documents table's index (DOC_PLACE_DTYPE, sorted by document), in one pass over the provenance.

    Memory: the provenance of all chunks at once (about 30 bytes per document span).
    """
    names = table_names(store)
    parts: dict[int, list[np.ndarray]] = {t: [] for t in range(len(names))}
    for c in range(store.num_chunks):
        prov = store.provenance(c)
        for t in np.unique(prov["table"]).tolist():
            sel = prov[prov["table"] == t]
            rec = np.empty(len(sel), dtype=DOC_PLACE_DTYPE)
            rec["doc"], rec["chunk"], rec["row"] = sel["doc"], c, sel["row"]
            rec["row_offset"], rec["length"] = sel["row_offset"], sel["length"]
            rec["doc_offset"], rec["source"] = sel["doc_offset"], sel["source"]
            rec["fim"] = sel["fim"] if "fim" in sel.dtype.names else 0
            parts.setdefault(int(t), []).append(rec)
    out = {}
    for t, name in enumerate(names):
        arr = np.concatenate(parts[t]) if parts[t] else np.zeros(0, DOC_PLACE_DTYPE)
        order = np.lexsort((arr["row_offset"], arr["row"], arr["chunk"], arr["doc"]))
        out[name] = arr[order]
    return out


def _read_only(store: DataStore) -> bool:
    """A release's data (its folder holds SHA256SUMS): nothing may be added to it."""
    return (store.dir.parent / RELEASE_SUMS).is_file()


def doc_index(store: DataStore, source: str) -> np.ndarray:
    """The index of one documents table: cached on disk in a run directory, built on first use.

    Raises DataError for a source the data does not have.
    """
    _table_index(store, source)
    path = doc_index_file(store.dir, source)
    if path.is_file():
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            if arr.dtype == DOC_PLACE_DTYPE and arr.ndim == 1:
                return arr
        except (OSError, ValueError):
            pass
        logger.warning("%s is not a document index; building it again", path)
    key = (str(store.dir.resolve()), source)
    if key in _MEMORY:
        return _MEMORY[key]
    logger.info("indexing the provenance of %d chunks by document (once)", store.num_chunks)
    built = build_doc_index(store)
    if _read_only(store):
        _MEMORY.update({(key[0], name): arr for name, arr in built.items()})
        return built[source]
    try:
        for name, arr in built.items():
            buf = io.BytesIO()
            np.save(buf, arr, allow_pickle=False)
            target = doc_index_file(store.dir, name)
            target.parent.mkdir(exist_ok=True)
            atomic_write_bytes(target, buf.getvalue())
    except OSError as e:  # a data directory we may not write: keep the index for this process
        logger.info("could not cache the document index in %s (%s); it is kept in memory", path.parent, e)
        _MEMORY.update({(key[0], name): arr for name, arr in built.items()})
    return built[source]


def document_places(store: DataStore, source: str, number: int) -> np.ndarray:
    """Every span of document `number` of documents table `source` in the chunks (DOC_PLACE_DTYPE),
    in (chunk, row, row_offset) order; empty when no chunk holds it."""
    idx = doc_index(store, source)
    lo, hi = np.searchsorted(idx["doc"], [number, number + 1])
    return np.asarray(idx[lo:hi])


def find_document(store: DataStore, source: str, ident: str | int) -> dict:
    """The line of ``data/documents/<source>.jsonl.gz`` for a document: its id as the manifest and
    that table write it (``web/part-3.jsonl:1207``), else, for an integer, its number ``n``.

    An id wins over a number equal to it. The table is read once, in a stream. Raises DataError
    naming the table when no line matches.
    """
    _table_index(store, source)
    path = store.dir / "documents" / f"{source}.jsonl.gz"
    if not path.is_file():
        raise DataError(f"{path} is missing: the data directory is incomplete")
    text = str(ident)
    number = int(text) if text.isdigit() else None
    by_number, lines = None, 0
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("id") == text:
                    return rec
                if rec.get("n", lines) == number:
                    by_number = rec
                lines += 1
    except (OSError, EOFError, ValueError) as e:
        raise DataError(f"{path} is unreadable ({e}); the data directory is corrupt") from None
    if by_number is not None:
        return by_number
    hint = f" (nor a number below {lines})" if number is not None else ""
    raise DataError(f"no document with id {text!r} in {path}{hint}; ids look like the `doc_id` that "
                    "`llm360 inspect chunk` shows")
