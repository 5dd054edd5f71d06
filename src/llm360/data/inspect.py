"""What the model saw: decoded rows and batches with their sources and documents."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llm360.data.tokenizer import TextTokenizer, load_saved
from llm360.errors import DataError
from llm360.rundir.data import DataStore


@dataclass
class RowView:
    chunk: int
    row: int
    token_ids: list[int]
    text: str | None
    spans: list[dict]


def _tokenizer(store: DataStore) -> TextTokenizer | None:
    folder = store.dir / "tokenizer"
    return load_saved(folder) if folder.is_dir() else None


def view_row(store: DataStore, chunk: int, row: int, tok: TextTokenizer | None = None) -> RowView:
    """Decode one row of a chunk and list the document spans it holds."""
    arr = store.chunk(chunk)
    if not 0 <= row < arr.shape[0]:
        raise DataError(f"row {row} does not exist: chunk {chunk:03d} has rows 0..{arr.shape[0] - 1}")
    ids = [int(x) for x in arr[row]]
    tok = tok if tok is not None else _tokenizer(store)
    text = tok.decode(ids) if tok is not None else None
    return RowView(chunk, row, ids, text, store.row_provenance(chunk, row))


def view_batch(run_or_data: str | Path, step: int, global_batch: int) -> tuple[dict, list[RowView]]:
    """The rows of global step `step` at a global batch of `global_batch` sequences."""
    store = DataStore(run_or_data)
    loc = store.step_index(global_batch).locate(step)
    tok = _tokenizer(store)
    rows = [view_row(store, loc.chunk, r, tok) for r in range(loc.row_start, loc.row_end)]
    info = {"step": step, "chunk": loc.chunk, "step_in_chunk": loc.step_in_chunk,
            "rows": [loc.row_start, loc.row_end]}
    return info, rows
