"""What the model saw: decoded rows and batches with their sources and documents, and the reverse --
every place a document was trained (:func:`view_document`).

Every answer about a run comes from :func:`llm360.rundir.data.trained_rows`: the file rows a step
really trained on (a reseeded chunk in its reseeded order), with skipped steps and chunks marked
not trained and the guard's reason, and the global batch read from the run. Nothing here derives
an order of its own.

A span of a fill-in-the-middle copy (provenance ``fim`` = k > 0) is shown with its transform: the
k-th record of the document's ``fim`` list (mode, split points, each part's tokens) and where the
span's tokens lie in the original text (:func:`llm360.data.fim.locate`); the row's text shows the
sentinels as the tokenizer names them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llm360.data.doc_index import document_places, find_document
from llm360.data.fim import locate
from llm360.data.tokenizer import TextTokenizer, load_saved
from llm360.errors import DataError
from llm360.rundir.data import (
    DATA_ONLY,
    TRAINED,
    DataStore,
    RowPlace,
    TrainedIndex,
    TrainedStep,
    place_rows,
    trained_rows,
)
from llm360.rundir.layout import RunDir, has_marker, list_step_checkpoints, step_name


@dataclass
class RowView:
    """One file row of a chunk, decoded, with the document spans it holds."""

    chunk: int
    row: int
    """Row in the chunk file (data/chunk_NNN.npy)."""
    token_ids: list[int]
    text: str | None
    spans: list[dict]
    position: int | None = None
    """Index in the step's global batch, for the rows of a batch view."""

    def to_json(self) -> dict:
        return {"position": self.position, "chunk": self.chunk, "row": self.row, "token_ids": self.token_ids,
                "text": self.text, "documents": self.spans}


@dataclass
class BatchView:
    """The rows of one global step as trained, and what the guards decided about it."""

    trained: TrainedStep
    rows: list[RowView]
    global_batch: int
    run_global_batch: int | None
    reseed_event: dict | None = None
    notes: list[str] = field(default_factory=list)
    """Plain-text lines saying what the rows are: status, reseeds, data-only exploration."""

    def to_json(self) -> dict:
        t = self.trained
        return {
            "step": t.step, "chunk": t.chunk, "step_in_chunk": t.step_in_chunk,
            "positions": [t.where.row_start, t.where.row_end], "status": t.status, "trained": t.trained,
            "reason": t.reason, "event": t.event, "reseeds": t.reseeds, "reseed_event": self.reseed_event,
            "global_batch": self.global_batch, "run_global_batch": self.run_global_batch,
            "from_run": t.status != DATA_ONLY, "notes": self.notes, "rows": [r.to_json() for r in self.rows],
        }  # fmt: skip


@dataclass
class ChunkRowView:
    """One file row of a chunk and where the run trained it (None: the run's global batch is unknown)."""

    row: RowView
    place: RowPlace | None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        p = self.place
        where = None if p is None else {
            "position": p.position, "step": p.step, "index_in_step": p.index_in_step, "status": p.status,
            "trained": p.status == TRAINED, "reason": p.reason, "event": p.event, "reseeds": p.reseeds,
        }  # fmt: skip
        return {**self.row.to_json(), "trained_at": where, "notes": self.notes}


def place_json(p: RowPlace | None) -> dict | None:
    """A row's place in training as JSON: position, step, index in the step, status and why."""
    if p is None:
        return None
    return {
        "position": p.position, "step": p.step, "index_in_step": p.index_in_step, "status": p.status,
        "trained": p.status == TRAINED, "reason": p.reason, "event": p.event, "reseeds": p.reseeds,
    }  # fmt: skip


@dataclass
class DocumentSpan:
    """One span of a document's tokens in one row, and where the run trained that row."""

    chunk: int
    row: int
    """Row in the chunk file (data/chunk_NNN.npy)."""
    row_offset: int
    """First position of the span in the row."""
    length: int
    """Tokens of the span."""
    doc_offset: int
    """Token offset of the span within the document (its EOS is its last token), or within its FIM copy."""
    place: RowPlace | None
    """Where the row was trained (None: the run's global batch is unknown)."""
    checkpoint: str | None = None
    """The first checkpoint that had trained on the span (``ckpt_NNN``, else ``steps/step_NNNNNNNN``)."""
    fim: int = 0
    """0: the document as it is; k: its k-th FIM-transformed copy (entry k of the record's ``fim`` list)."""

    def to_json(self) -> dict:
        out = {"chunk": self.chunk, "row": self.row, "row_offset": self.row_offset, "length": self.length,
               "doc_offset": self.doc_offset, "trained_at": place_json(self.place), "checkpoint": self.checkpoint}
        if self.fim:
            out["fim"] = self.fim
        return out


@dataclass
class DocumentView:
    """One input document: whether it was used, held out or rejected, and every place it was trained."""

    source: str
    """Its documents table (the configured source)."""
    record: dict
    """Its line of data/documents/<source>.jsonl.gz: n, id, status (train, valid, rejected), reason, tokens."""
    spans: list[DocumentSpan]
    notes: list[str] = field(default_factory=list)

    @property
    def trained_spans(self) -> list[DocumentSpan]:
        return [s for s in self.spans if s.place is not None and s.place.status == TRAINED]

    def to_json(self) -> dict:
        trained = self.trained_spans
        first = min(trained, key=lambda s: s.place.step) if trained else None  # type: ignore[union-attr]
        return {
            "source": self.source, "number": self.record.get("n"), "id": self.record.get("id"),
            "status": self.record.get("status"), "reason": self.record.get("reason"),
            "detail": self.record.get("detail"), "tokens": self.record.get("tokens"), "record": self.record,
            "trained_spans": len(trained), "first_step": None if first is None else first.place.step,  # type: ignore[union-attr]
            "first_checkpoint": None if first is None else first.checkpoint,
            "spans": [s.to_json() for s in self.spans], "notes": self.notes,
        }  # fmt: skip


def _tokenizer(store: DataStore) -> TextTokenizer | None:
    folder = store.dir / "tokenizer"
    return load_saved(folder) if folder.is_dir() else None


def view_row(store: DataStore, chunk: int, row: int, tok: TextTokenizer | None = None) -> RowView:
    """Decode file row `row` of a chunk and list the document spans it holds."""
    arr = store.chunk(chunk)
    if not 0 <= row < arr.shape[0]:
        raise DataError(f"row {row} does not exist: chunk {chunk:03d} has rows 0..{arr.shape[0] - 1}")
    ids = [int(x) for x in arr[row]]
    tok = tok if tok is not None else _tokenizer(store)
    text = tok.decode(ids) if tok is not None else None
    spans = store.row_provenance(chunk, row)
    add_fim_details(store, spans)
    return RowView(chunk, row, ids, text, spans)


def add_fim_details(store: DataStore, spans: list[dict]) -> None:
    """Give every span of a FIM-transformed copy (``fim`` > 0) a ``fim_copy``: the transform's record
    and, under ``original``, where the span's tokens come from (part, tokens within it, the part's
    characters in the original text)."""
    want: dict[str, set[int]] = {}
    for sp in spans:
        if sp.get("fim"):
            want.setdefault(sp["table"], set()).add(sp["doc"])
    if not want:
        return
    records = {table: store.documents(table, numbers) for table, numbers in want.items()}
    for sp in spans:
        k = sp.get("fim")
        if not k:
            continue
        copies = records[sp["table"]][sp["doc"]].get("fim") or []
        if not 0 < k <= len(copies):
            raise DataError(f"{sp['table']} document {sp['doc']}: its provenance names FIM copy {k}, but its "
                            f"documents-table line lists {len(copies)}; the data directory is corrupt")
        rec = copies[k - 1]
        sp["fim_copy"] = {**rec, "copy": k, "original": locate(rec, sp["doc_offset"], sp["length"])}


def reseed_note(index: TrainedIndex, chunk: int) -> str | None:
    """A line saying the chunk was reseeded, how often and why; None when it trained in file order."""
    k = index.reseeds(chunk)
    if not k:
        return None
    ev = index.reseed_event(chunk)
    why = f" (rollback_reseed at step {ev.get('step')}: {ev.get('reason')})" if ev else ""
    return (f"chunk {chunk:03d} was reseeded {k} time{'s' if k != 1 else ''} by a guard{why}: its rows were "
            "trained in the reseeded order, not the file's")


def view_batch(run_dir: str | Path, step: int, global_batch: int | None = None) -> BatchView:
    """The rows global step `step` of the run in `run_dir` trained on, in the order trained.

    ``global_batch`` defaults to the run's; another value explores the data at that batch (file
    order, marked data only). Raises DataError for a step outside the data or a run without data.
    """
    index = trained_rows(run_dir, global_batch)
    assert index.store is not None  # trained_rows always opens the data
    t = index.locate(step)
    tok = _tokenizer(index.store)
    rows = [view_row(index.store, t.chunk, int(r), tok) for r in t.rows]
    for i, v in enumerate(rows):
        v.position = i
    notes = [t.reason] if t.reason else ["trained: the rows below are those of this step, in the order trained"]
    if (line := reseed_note(index, t.chunk)) is not None:
        notes.append(line + "; each row below names its row in the chunk file")
    return BatchView(t, rows, index.global_batch, index.run_global_batch,
                     index.reseed_event(t.chunk) if t.reseeds else None, notes)


def view_chunk_row(run_dir: str | Path, chunk: int, row: int, global_batch: int | None = None) -> ChunkRowView:
    """File row `row` of `chunk`, and the step and batch index at which the run trained it.

    Without a global batch to read (a data directory prepared without a config) the row is shown
    alone, with a note. Raises DataError for a chunk or row that does not exist.
    """
    try:
        index: TrainedIndex | None = trained_rows(run_dir, global_batch)
    except DataError as e:
        if global_batch is not None or RunDir(run_dir).config.is_file():
            raise
        index, notes = None, [f"where it was trained is unknown: {e}"]
    store = index.store if index is not None and index.store is not None else DataStore(RunDir(run_dir).data)
    view = view_row(store, chunk, row)
    if index is None:
        return ChunkRowView(view, None, notes)
    place = index.place(chunk, row)
    if place.step is not None and place.status in (TRAINED, DATA_ONLY):
        verb = "trained" if place.status == TRAINED else f"at global batch {index.global_batch}, it falls"
        notes = [f"{verb} at step {place.step}, index {place.index_in_step} of its global batch of "
                 f"{index.global_batch} (position {place.position} of the chunk's training order)"]
        if place.status == DATA_ONLY:
            notes.append(place.reason)
    else:
        notes = [place.reason + (f" (it falls at step {place.step}, index {place.index_in_step})"
                                 if place.step is not None else "")]
    if (line := reseed_note(index, chunk)) is not None:
        notes.append(line)
    return ChunkRowView(view, place, notes)


def first_checkpoint(run_dir: str | Path, chunk: int, step: int) -> str | None:
    """The first checkpoint holding training step `step` of `chunk`: the chunk's ``ckpt_NNN`` when it is
    complete, else the first complete intra-chunk ``steps/step_NNNNNNNN`` after it; None when neither exists."""
    rd = RunDir(run_dir)
    if has_marker(rd.ckpt_dir(chunk)):
        return rd.ckpt_dir(chunk).name
    for n, _ in list_step_checkpoints(rd.step_checkpoints, complete_only=True):
        if n > step:
            return f"{rd.step_checkpoints.name}/{step_name(n)}"
    return None


def _index_or_note(run_dir: str | Path, global_batch: int | None) -> tuple[TrainedIndex | None, list[str]]:
    """The run's trained index; None with a note for a data directory with no global batch to read."""
    try:
        return trained_rows(run_dir, global_batch), []
    except DataError as e:
        if global_batch is not None or RunDir(run_dir).config.is_file():
            raise
        return None, [f"where it was trained is unknown: {e}"]


def located_spans(run_dir: str | Path, index: TrainedIndex | None, places) -> list[DocumentSpan]:
    """DocumentSpans of provenance-like records (chunk, row, row_offset, length, doc_offset), with where
    the run trained each row and the first checkpoint that had it, in the order trained."""
    spans: list[DocumentSpan] = []
    for chunk in sorted({int(c) for c in places["chunk"]}):
        recs = places[places["chunk"] == chunk]
        rows = [int(r) for r in recs["row"]]
        where: list[RowPlace | None] = place_rows(index, chunk, rows) if index is not None else [None] * len(rows)
        for rec, place in zip(recs, where, strict=True):
            ckpt = None
            if place is not None and place.status == TRAINED and place.step is not None:
                ckpt = first_checkpoint(run_dir, chunk, place.step)
            fim = int(rec["fim"]) if "fim" in (recs.dtype.names or ()) else 0
            spans.append(DocumentSpan(chunk, int(rec["row"]), int(rec["row_offset"]), int(rec["length"]),
                                      int(rec["doc_offset"]), place, ckpt, fim))
    # in the order trained: by chunk, then by position in the chunk's training order
    spans.sort(key=lambda s: (s.chunk, s.row if s.place is None else s.place.position, s.row_offset))
    return spans


def view_document(run_dir: str | Path, source: str, ident: str | int, global_batch: int | None = None) -> DocumentView:
    """Document `ident` (its id, or its number) of `source`: its status, and every span of it in the chunks
    with the step that trained it and the first checkpoint that had seen it.

    A document repeated by the mix (weight > 1) has a span per copy. The places come from the run's
    training record (reseeds, skips; see :func:`trained_rows`); ``global_batch`` other than the
    run's explores the data at that batch instead. Raises DataError for an unknown source or
    document.
    """
    index, notes = _index_or_note(run_dir, global_batch)
    store = index.store if index is not None and index.store is not None else DataStore(RunDir(run_dir).data)
    rec = find_document(store, source, ident)
    number = int(rec.get("n", -1))
    spans = located_spans(run_dir, index, document_places(store, source, number)) if number >= 0 else []
    status = rec.get("status")
    label = f"{source} document {number} ({rec.get('id')})"
    if status == "rejected":
        why = str(rec.get("reason")) + (f": {rec['detail']}" if rec.get("detail") else "")
        notes.insert(0, f"{label} was rejected when preparing the data ({why}); it was never trained")
    elif status == "valid":
        notes.insert(0, f"{label} was held out for validation (data/valid/{source}.npy); it was never trained")
    elif not spans:
        notes.insert(0, f"{label} is in no chunk: no stage's mix selected it (counted as not_selected_by_mix in "
                        "the manifest), or its tokens fell in the rows dropped when packing or splitting chunks")
    else:
        trained = [s for s in spans if s.place is not None and s.place.status == TRAINED]
        steps = sorted({s.place.step for s in trained if s.place is not None and s.place.step is not None})
        copies = len({(s.chunk, s.row, s.row_offset) for s in spans if s.doc_offset == 0}) or 1
        line = (f"{label}: {len(spans)} span(s) in {len({(s.chunk, s.row) for s in spans})} row(s) of "
                f"{len({s.chunk for s in spans})} chunk(s), {copies} cop{'ies' if copies != 1 else 'y'}; ")
        if index is None:
            line += "where it was trained is unknown"
        elif not trained:
            line += "none of them trained yet" if index.from_run else "the global batch given is not the run's"
        else:
            first = min(trained, key=lambda s: s.place.step)  # type: ignore[union-attr]
            line += (f"trained at {len(steps)} step(s), first at step {steps[0]}"
                     + (f", first seen by {first.checkpoint}" if first.checkpoint else ""))
        notes.insert(0, line)
        if rec.get("fim"):
            modes = [f"{c['mode'].upper()} (stage {c['stage']}, repeat {c['epoch']}, split at characters "
                     f"{c['split'][0]} and {c['split'][1]} of {c['chars']})" for c in rec["fim"]]
            notes.append(f"{len(modes)} cop{'ies' if len(modes) != 1 else 'y'} fill-in-the-middle transformed: "
                         + "; ".join(f"{i}: {m}" for i, m in enumerate(modes, start=1))
                         + "; a span's fim = k and doc_offset count tokens of copy k")
    return DocumentView(source, rec, spans, notes)
