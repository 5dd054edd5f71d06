"""The mix's draws: which copies of a document each mix entry takes, after its filters, and which of
those copies are FIM-transformed.

A :class:`Draw` is one mix entry of one stage that draws from a source. A document's fate in it is
a function of the seed, the source and the document id alone (never of the piece it lands in):

* its two seeded draws ``u_part`` and ``u_sample`` (:func:`~llm360.data.prepare_map.unit_hash`)
  give the copies: 0 outside the entry's ``part``, else the weight's floor plus one more when
  ``u_sample`` falls below the weight's fraction;
* the entry's filters (:mod:`llm360.data.filters`) may drop it (0 copies, counted under the field
  of the first filter that dropped it);
* each copy ``e`` of an entry with ``fim_rate`` > 0 is FIM-transformed or not by
  :func:`~llm360.data.fim.fim_split` of the document id, the entry and ``e``.

:func:`decide` makes these decisions for one document in a map task; the per-piece index keeps
``u_part``, ``u_sample`` and a bit per filtered-out draw (``drop``), so :meth:`Draw.copies` gives
the plan and scatter the same copies for a whole piece at once. The FIM-transformed copies have
their own tokens (the map's ``fim.npy`` / ``fim.zst``): :func:`block_copies` says, for one
(draw, epoch) block, where each selected copy's tokens are.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from llm360.data.filters import CompiledFilter, FilterSpec, compile_filters, first_failing
from llm360.data.fim import FimSplit, fim_split
from llm360.errors import DataError

MAX_FILTERED_DRAWS = 64
"""Mix entries with filters per source at most (one bit each in the index's ``drop``)."""

FIMIDX_DTYPE = np.dtype(
    [
        ("row", "<u8"),  # position of the document in the piece's index
        ("slot", "<u2"),  # the draw (its position among the source's draws)
        ("epoch", "<u4"),  # the copy's repeat number
        ("offset", "<i8"),  # first token in fim.zst
        ("ntok", "<i8"),  # tokens of the copy: parts, three sentinels, EOS
        ("mark", "<u2"),  # its position (1-based) in the document's `fim` list of the documents table
        ("spm", "u1"),  # 1: SPM order, 0: PSM
    ]
)
"""Per FIM-transformed copy of a piece: which document, draw and repeat, and where its tokens are."""


@dataclass(frozen=True)
class Draw:
    """One mix entry of one stage that draws from a source: which documents, how many copies."""

    stage: int
    entry: int
    weight: float
    part: tuple[float, float]
    slot: int = 0
    """Position among the source's draws (its bit in the index's ``drop``; its ``slot`` in fim.npy)."""
    filters: tuple[FilterSpec, ...] = ()
    fim_rate: float = 0.0
    spm_rate: float = 0.0
    stage_name: str = ""

    @property
    def key(self) -> str:
        return f"{self.stage}/{self.entry}"

    def copies(self, index: np.ndarray) -> np.ndarray:
        """Copies of each document of ``index`` (DOCIDX_DTYPE) in the stage: 0, or the weight's floor
        plus one more when the document's sample draw falls below the weight's fraction; 0 for a
        document this entry's filters dropped."""
        in_part = (index["u_part"] >= self.part[0]) & (index["u_part"] < self.part[1])
        if self.filters:
            in_part &= (index["drop"] & np.uint64(1 << self.slot)) == 0
        whole, frac = int(np.floor(self.weight)), self.weight - np.floor(self.weight)
        return np.where(in_part, whole + (index["u_sample"] < frac).astype(np.int64), 0)

    def copies_one(self, u_part: float, u_sample: float) -> int:
        """:meth:`copies` of one document before the filters (the same arithmetic)."""
        if not (self.part[0] <= u_part < self.part[1]):
            return 0
        whole = math.floor(self.weight)
        return int(whole) + int(u_sample < self.weight - whole)


@dataclass
class Decision:
    """What the draws of a piece decided for one training document."""

    drop: int = 0
    """Bit ``slot`` set: that draw's filters dropped the document."""
    fim: list[tuple[Draw, int, FimSplit]] = field(default_factory=list)
    """The FIM-transformed copies: (draw, repeat number, split)."""
    plain: bool = True
    """Whether some copy (or none at all) uses the document as it is, so its plain tokens are needed."""


class Mixer:
    """The per-document decisions of one source's draws (filters, FIM), with their counts."""

    def __init__(self, draws: tuple[Draw, ...], seed: int, source: str) -> None:
        self.draws, self.seed, self.source = draws, seed, source
        self.compiled: dict[int, tuple[CompiledFilter, ...]] = {d.slot: compile_filters(d.filters)
                                                                 for d in draws if d.filters}
        if any(slot >= MAX_FILTERED_DRAWS for slot in self.compiled):
            raise DataError(f"source '{source}' has more than {MAX_FILTERED_DRAWS} mix entries; at most "
                            f"{MAX_FILTERED_DRAWS} may draw from one source when any of them has filters")
        self.active = bool(self.compiled) or any(d.fim_rate > 0 for d in draws)
        """Whether any decision is needed (else every document is plain and unfiltered)."""
        self.filtered: dict[str, Counter] = {}
        """Per draw key: documents the entry's part and sample took but a filter dropped, by field."""
        self.filtered_unused: Counter = Counter()
        """Documents no draw used because filters dropped them, by the field of the first such filter."""

    def decide(self, doc_id: str, text: str, fields: dict | None, u_part: float, u_sample: float) -> Decision:
        """The decision for one training document (see the module docstring)."""
        out = Decision()
        if not self.active:
            return out
        total = 0
        first_field = None
        for d in self.draws:
            c = d.copies_one(u_part, u_sample)
            if c and d.filters:
                f = first_failing(self.compiled[d.slot], fields)
                if f is not None:
                    out.drop |= 1 << d.slot
                    self.filtered.setdefault(d.key, Counter())[f] += 1
                    first_field = first_field or f
                    c = 0
            total += c
            if c and d.fim_rate > 0:
                for e in range(c):
                    sp = fim_split(self.seed, self.source, doc_id, d.key, e, len(text), d.fim_rate, d.spm_rate)
                    if sp is not None:
                        out.fim.append((d, e, sp))
        if total == 0 and first_field is not None:
            self.filtered_unused[first_field] += 1
        out.plain = not out.fim or len(out.fim) < total
        return out


def block_copies(index: np.ndarray, fim: np.ndarray, draw: Draw, epoch: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The copies of one (draw, epoch) block, in index order: (selected rows of the index, their
    tokens' offsets, their token counts, whether the tokens are in fim.zst, their FIM marks).

    A copy that is FIM-transformed has its tokens in fim.zst (``fim``: FIMIDX_DTYPE); the others are
    the document's plain tokens in tokens.zst.
    """
    sel = np.nonzero(draw.copies(index) > epoch)[0]
    offset = index["offset"][sel].astype(np.int64)
    ntok = index["ntok"][sel].astype(np.int64)
    from_fim = np.zeros(len(sel), bool)
    mark = np.zeros(len(sel), np.int64)
    if len(fim) and draw.fim_rate > 0:
        v = fim[(fim["slot"] == draw.slot) & (fim["epoch"] == epoch)]
        at = np.searchsorted(sel, v["row"].astype(np.int64))
        offset[at], ntok[at], from_fim[at], mark[at] = v["offset"], v["ntok"], True, v["mark"]
    return sel, offset, ntok, from_fim, mark


def gather(tokens: np.ndarray, fim_tokens: np.ndarray, offset: np.ndarray, ntok: np.ndarray,
           from_fim: np.ndarray, limit: int) -> np.ndarray:
    """The first ``limit`` tokens of the copies laid end to end (each from tokens or fim_tokens)."""
    starts = np.cumsum(ntok) - ntok
    keep = starts < limit
    offset, ntok, from_fim, starts = offset[keep], ntok[keep], from_fim[keep], starts[keep]
    ntok = np.minimum(ntok, limit - starts)
    out = np.empty(int(ntok.sum()), tokens.dtype)
    for arr, m in ((tokens, ~from_fim), (fim_tokens, from_fim)):
        if not m.any():
            continue
        n = ntok[m]
        k = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        out[np.repeat(starts[m], n) + k] = arr[np.repeat(offset[m], n) + k]
    return out


def epochs(index: np.ndarray, fim: np.ndarray, draws: tuple[Draw, ...]) -> dict[str, list[list[int]]]:
    """Per draw: ``[documents, tokens]`` of every epoch (documents with more than e copies, e = 0, 1,
    ...), with ``fim copies, spm copies, fim tokens`` after them for an entry with fim_rate > 0."""
    out = {}
    for d in draws:
        c = d.copies(index)
        rows = []
        for e in range(int(c.max()) if c.size else 0):
            if d.fim_rate > 0:
                sel, _, ntok, from_fim, _ = block_copies(index, fim, d, e)
                v = fim[(fim["slot"] == d.slot) & (fim["epoch"] == e)] if len(fim) else fim
                rows.append([len(sel), int(ntok.sum()), int(from_fim.sum()), int(v["spm"].sum()),
                             int(ntok[from_fim].sum())])
            else:
                sel_mask = c > e
                rows.append([int(sel_mask.sum()), int(index["ntok"][sel_mask].sum())])
        out[d.key] = rows
    return out


def used(index: np.ndarray, draws: tuple[Draw, ...]) -> np.ndarray:
    """Whether any draw takes a copy of each document of the index."""
    mask = np.zeros(len(index), dtype=bool)
    for d in draws:
        mask |= d.copies(index) > 0
    return mask
