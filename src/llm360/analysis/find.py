"""Where the model saw a text: the training rows that hold it, with steps, documents and checkpoints.

``llm360 inspect find TEXT`` tokenizes the text with the run's own tokenizer and scans every chunk
for it as an exact token sequence inside one row (what the model saw at once, as in
:mod:`llm360.analysis.contamination`). When no row holds all of it, the answer is the rows holding
its longest run of consecutive tokens that does occur (at least :data:`MIN_NGRAM` tokens).

How it scans (the hashing and the bitmap are :mod:`llm360.analysis.ngrams`, as for contamination).
Seed and extend: the seeds of a block of rows -- the ``seed`` tokens starting at every
``stride``-th position -- are hashed at once (:func:`~llm360.analysis.ngrams.seed_hashes`, by
Horner's rule over strided views, so about seed / stride passes); the bitmap of the text's own seed
hashes drops nearly every position, the few left are checked token by token and extended left and
right, in the row, as far as they agree with the text. A run of
``seed + stride - 1`` tokens or more always holds a seed: the first scan, sure to find the whole
text, has seeds about as far apart as the text is long (a text that is in the data costs that one
cheap scan); finer scans (:func:`scan_plan`: every run of 15 tokens or more, 7, 3, 2) follow only
while nothing that long is found. Memory is one block of rows (``block_tokens``) at a time.

What it cannot see: a text longer than a row (``seq_len + 1`` tokens) is never found whole, only its
longest run; and a byte-level BPE tokenizes a word differently at the start of a text than after a
space, so a sentence cut from the middle of a document may match all but its first token -- the
longest run says so.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llm360.analysis.ngrams import (
    bitmap_bits,
    bitmap_candidates,
    make_bitmap,
    ngram_hashes,
    row_blocks,
    same_tokens,
    seed_hashes,
)
from llm360.data.inspect import first_checkpoint, place_json
from llm360.data.tokenizer import load_saved
from llm360.errors import DataError
from llm360.rundir.data import TRAINED, DataStore, RowPlace, TrainedIndex, place_rows, trained_rows
from llm360.rundir.layout import TOKENIZER_DIR, RunDir

logger = logging.getLogger(__name__)

SEED = 8
"""Tokens of the first seed; halved (down to :data:`MIN_NGRAM`) while no seed matches."""
MIN_NGRAM = 2
"""The shortest run of the text's tokens reported when the text as a whole is not found."""
BLOCK_TOKENS = 4_194_304
"""Tokens scanned at a time (the work arrays take about 40 bytes per token)."""


@dataclass
class Match:
    """A run of the text's tokens in one training row, and where the run trained that row."""

    chunk: int
    row: int
    """Row in the chunk file (data/chunk_NNN.npy)."""
    col: int
    """First position of the run in the row."""
    length: int
    """Tokens in the run."""
    text_start: int
    """First token of the run in the text's tokens."""
    text: str = ""
    """The run's tokens, decoded."""
    documents: list[dict] = field(default_factory=list)
    """The document spans the run overlaps: source, doc (number), doc_id, doc_offset of the run's first token there."""
    place: RowPlace | None = None
    """Where the row was trained (None: the run's global batch is unknown)."""
    checkpoint: str | None = None
    """The first checkpoint that had trained on the row."""

    def to_json(self) -> dict:
        return {"chunk": self.chunk, "row": self.row, "col": self.col, "length": self.length,
                "text_start": self.text_start, "text": self.text, "documents": self.documents, "trained_at": place_json(self.place),
                "checkpoint": self.checkpoint}  # fmt: skip


@dataclass
class FindResult:
    """What :func:`find_text` found."""

    text: str
    token_ids: list[int]
    exact: bool
    """Whether rows hold the whole text."""
    length: int
    """Tokens of the longest run found (len(token_ids) when exact; 0: nothing of MIN_NGRAM tokens or more)."""
    total_matches: int
    """Occurrences of that run in the training rows (``matches`` lists the first ones, in chunk and row order)."""
    matches: list[Match]
    tokens_scanned: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "exact": self.exact, "length": self.length,
                "total_matches": self.total_matches, "matches": [m.to_json() for m in self.matches],
                "tokens_scanned": self.tokens_scanned, "seconds": self.seconds, "notes": self.notes}  # fmt: skip


class _Runs:
    """The longest maximal runs found so far: (chunk, row, col, length, text_start) arrays, the first `keep`."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.length = 0
        self.count = 0
        self.found: list[np.ndarray] = []  # rows of (chunk, row, col, text_start)

    def add(self, chunk: int, rows: np.ndarray, cols: np.ndarray, lengths: np.ndarray, starts: np.ndarray) -> None:
        if not len(lengths):
            return
        best = int(lengths.max())
        if best < self.length:
            return
        if best > self.length:
            self.length, self.count, self.found = best, 0, []
        sel = lengths == best
        self.count += int(sel.sum())
        have = sum(len(f) for f in self.found)
        if have < self.keep:
            rec = np.stack([np.full(int(sel.sum()), chunk), rows[sel], cols[sel], starts[sel]], axis=1)
            self.found.append(rec[: self.keep - have])


def scan_runs(store: DataStore, query: np.ndarray, seed: int, stride: int = 1, *, keep: int = 100,
              block_tokens: int = BLOCK_TOKENS) -> tuple[int, int, np.ndarray]:
    """Maximal runs of `query` inside the training rows of `store` that contain a seed: `seed` tokens
    starting at a multiple of `stride` (positions counted in a block of whole rows). Every run of
    ``seed + stride - 1`` tokens or more contains one, so when the longest run found is that long it
    is the longest there is, and every run of its length is found.

    Returns (the longest run's length, how many runs have it, the first `keep` of them as an int64
    array of (chunk, row, col, query start) in chunk and row order); length 0 when no seed occurs.
    """
    q, L = len(query), store.row_length
    qh = ngram_hashes(query, seed)
    bits = bitmap_bits(len(np.unique(qh)))
    bitmap = make_bitmap(qh, bits)
    q_order = np.argsort(qh, kind="stable")
    q_sorted = qh[q_order]
    runs = _Runs(keep)
    hbuf: list[np.ndarray] = []
    cbuf: list[np.ndarray] = []
    for c, r0, r1 in row_blocks(store.rows_per_chunk, L, block_tokens):
        flat = store.chunk(c)[r0:r1].reshape(-1)
        h = ngram_hashes(flat, seed, hbuf) if stride == 1 else seed_hashes(flat, seed, stride)
        cand = bitmap_candidates(h, bitmap, bits, cbuf)
        cand = cand[cand * stride % L <= L - seed]  # the seed inside one row
        if not len(cand):
            continue
        pos, hc = cand * stride, h[cand]
        lo = np.searchsorted(q_sorted, hc, side="left")
        n = np.searchsorted(q_sorted, hc, side="right") - lo
        if not n.any():
            continue
        # a seed the query holds more than once pairs with each of its places
        j = q_order[np.repeat(lo, n) + (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n))]
        pos = np.repeat(pos, n)
        same = same_tokens(flat, pos, query, j, seed)  # no hash collision counts
        pos, j = pos[same], j[same]
        col = pos % L
        right = np.full(len(pos), seed, dtype=np.int64)  # extend while the row and the text agree
        act = np.arange(len(pos))
        while len(act):
            k = right[act]
            ok = (j[act] + k < q) & (col[act] + k < L)
            act, k = act[ok], k[ok]
            act = act[flat[pos[act] + k] == query[j[act] + k]]
            right[act] += 1
        left = np.zeros(len(pos), dtype=np.int64)
        act = np.arange(len(pos))
        while len(act):
            k = left[act] + 1
            ok = (j[act] - k >= 0) & (col[act] - k >= 0)
            act, k = act[ok], k[ok]
            act = act[flat[pos[act] - k] == query[j[act] - k]]
            left[act] += 1
        uniq = np.unique(np.stack([pos - left, j - left, left + right], axis=1), axis=0)  # one per maximal run
        runs.add(c, r0 + uniq[:, 0] // L, uniq[:, 0] % L, uniq[:, 2], uniq[:, 1])
    found = np.concatenate(runs.found) if runs.found else np.zeros((0, 4), np.int64)
    return runs.length, runs.count, found.astype(np.int64)


def scan_plan(query_tokens: int) -> list[tuple[int, int]]:
    """The (seed, stride) scans :func:`longest_runs` tries in turn for a text of this many tokens; a
    scan finds every run of ``seed + stride - 1`` tokens or more (its sure length).

    First the whole text (sure length = its tokens, seeds of up to SEED tokens far apart: the
    cheapest scan), then sure lengths 2 * SEED - 1, SEED - 1, ... down to MIN_NGRAM, each shorter
    than the one before.
    """
    q = query_tokens
    if q <= MIN_NGRAM:
        return [(q, 1)]
    seed = min(SEED, max(MIN_NGRAM, -(-q // 2)))
    plan = [(seed, q - seed + 1)]
    seed = SEED
    while True:
        for stride in (seed, 1) if seed == MIN_NGRAM else (seed,):
            if seed + stride - 1 < sum(plan[-1]) - 1:
                plan.append((seed, stride))
        if seed == MIN_NGRAM:
            return plan
        seed = max(MIN_NGRAM, seed // 2)


def longest_runs(store: DataStore, query: np.ndarray, *, keep: int = 100,
                 block_tokens: int = BLOCK_TOKENS) -> tuple[int, int, np.ndarray]:
    """The longest runs of `query`'s tokens in the training rows (see :func:`scan_runs` for the answer).

    The scans of :func:`scan_plan` in turn, until one finds a run as long as it is sure to find: a
    text that is in the training data costs one scan with seeds far apart; only a text that is not
    needs the finer ones. Length 0: not even MIN_NGRAM consecutive tokens of it occur.
    """
    length, count, found = 0, 0, np.zeros((0, 4), np.int64)
    for seed, stride in scan_plan(len(query)):
        length, count, found = scan_runs(store, query, seed, stride, keep=keep, block_tokens=block_tokens)
        # no run reached an earlier scan's sure length, so one this long is the longest there is
        if length >= seed + stride - 1:
            break
    return length, count, found


def _documents(store: DataStore, chunk: int, row: int, col: int, length: int, prov: np.ndarray) -> list[dict]:
    """The provenance spans of a row that overlap positions [col, col + length), without their ids yet."""
    lo, hi = np.searchsorted(prov["row"], [row, row + 1])
    names, tables = store.manifest["source_names"], store.manifest["data_config"]["sources"]
    out = []
    for rec in prov[lo:hi]:
        a, n = int(rec["row_offset"]), int(rec["length"])
        if a < col + length and col < a + n:
            first = max(a, col)
            out.append({"source": names[int(rec["source"])], "table": tables[int(rec["table"])]["name"],
                        "doc": int(rec["doc"]), "doc_id": None, "doc_offset": int(rec["doc_offset"]) + first - a,
                        "length": min(a + n, col + length) - first})  # fmt: skip
    return out


def find_text(run_dir: str | Path, text: str, *, global_batch: int | None = None, max_matches: int = 100,
              block_tokens: int = BLOCK_TOKENS) -> FindResult:
    """The training rows of the run in `run_dir` (or a release) that hold `text`, as tokens of its tokenizer.

    See the module docstring for how, and :class:`FindResult` for the answer. Each match carries
    the documents it overlaps, the step that trained its row (after any reseed or skip) and the
    first checkpoint that had it. Raises DataError when the run has no data or no text tokenizer,
    or the text has no tokens.
    """
    t0 = time.perf_counter()
    index: TrainedIndex | None
    notes: list[str] = []
    try:
        index = trained_rows(run_dir, global_batch)
    except DataError as e:
        if global_batch is not None or RunDir(run_dir).config.is_file():
            raise
        index, notes = None, [f"where it was trained is unknown: {e}"]
    store = index.store if index is not None and index.store is not None else DataStore(RunDir(run_dir).data)
    tok_dir = store.dir / TOKENIZER_DIR
    if not tok_dir.is_dir():
        raise DataError(f"{store.dir} has no tokenizer (pre-tokenized data): a text cannot be turned into its ids")
    tok = load_saved(tok_dir)
    ids = tok.encode_batch([text])[0]
    if not ids:
        raise DataError("the text has no tokens: give a non-empty text")
    query = np.asarray(ids, dtype=np.int64)
    length, count, found = longest_runs(store, query, keep=max_matches, block_tokens=block_tokens)
    matches = [Match(int(c), int(r), int(col), length, int(j), tok.decode(ids[int(j) : int(j) + length]))
               for c, r, col, j in found]
    by_table: dict[str, set[int]] = {}
    for chunk in sorted({m.chunk for m in matches}):
        prov = store.provenance(chunk)
        mine = [m for m in matches if m.chunk == chunk]
        where = place_rows(index, chunk, [m.row for m in mine]) if index is not None else [None] * len(mine)
        for m, place in zip(mine, where, strict=True):
            m.documents = _documents(store, chunk, m.row, m.col, m.length, prov)
            m.place = place
            if place is not None and place.status == TRAINED and place.step is not None:
                m.checkpoint = first_checkpoint(run_dir, chunk, place.step)
            for d in m.documents:
                by_table.setdefault(d["table"], set()).add(d["doc"])
    ids_of = {t: store.documents(t, ns) for t, ns in by_table.items()}
    for m in matches:
        for d in m.documents:
            d["doc_id"] = ids_of[d["table"]][d["doc"]].get("id")
    exact = length == len(query)
    if not length:
        notes.insert(0, f"no {MIN_NGRAM} consecutive tokens of the text ({len(query)} tokens) occur in a training row")
    elif exact:
        notes.insert(0, f"the text ({len(query)} tokens) occurs {count} time(s) in the training rows")
    else:
        notes.insert(0, f"the whole text ({len(query)} tokens) is in no training row; its longest run found is "
                        f"{length} tokens, {count} time(s)")
    if count > len(matches):
        notes.append(f"the first {len(matches)} of {count} occurrences are listed")
    return FindResult(text, [int(i) for i in ids], exact, length, count, matches,
                      tokens_scanned=int(sum(store.rows_per_chunk)) * store.row_length,
                      seconds=time.perf_counter() - t0, notes=notes)
