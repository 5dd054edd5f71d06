"""Prepare's *plan* step: from the map tasks' summaries to where every row goes. Small, run once.

Each stage's token stream is, in this order: for every mix entry, for every epoch ``e`` (the
documents with more than ``e`` copies), for every piece of the entry's source in read order,
that piece's selected documents, each followed by its EOS. Prefix sums over these *blocks* give
every block's first position in the stream, every piece's first document number and validation
offset, and the stage's rows (``tokens // (seq_len + 1)``); the partial last row is dropped.

The seeded permutation of each stage's rows (``np.random.default_rng([seed, stage])``) is
computed here once and stored as its inverse: ``position[row]`` = where stage row ``row`` lands
in the stage's chunks (``position // rows_per_chunk`` is the chunk, the rest its row there; at
or past ``rows_per_chunk * chunks`` the row is dropped by the uneven split).

Memory: 16 bytes per stage row at the peak (the permutation and its inverse, int64), 8 bytes
per row on disk; nothing per document -- the plan reads only the per-piece summaries.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llm360.config import DataConfig
from llm360.data.prepare_map import Draw
from llm360.errors import DataError
from llm360.rundir.atomic import atomic_path, json_bytes

logger = logging.getLogger(__name__)

PLAN_FORMAT = 1


def stage_draws(data: DataConfig) -> dict[str, tuple[Draw, ...]]:
    """Per source name, the mix entries of every stage that draw from it."""
    out: dict[str, list[Draw]] = {s.name: [] for s in data.sources}
    for si, stage in enumerate(data.resolved_stages()):
        for ei, m in enumerate(stage.mix):
            out[m.source].append(Draw(si, ei, float(m.weight), (float(m.part[0]), float(m.part[1]))))
    return {k: tuple(v) for k, v in out.items()}


def check_stage_kinds(data: DataConfig) -> None:
    """A stage mixes pre-tokenized rows and text: a config error, said before any work."""
    kinds = {s.name: s.kind == "llm360" for s in data.sources}
    for stage in data.resolved_stages():
        if len({kinds[m.source] for m in stage.mix}) > 1:
            raise DataError(
                f"stage '{stage.name}' mixes pre-tokenized (llm360) and text sources; put them in separate stages"
            )


@dataclass(frozen=True)
class Block:
    """One (mix entry, epoch, piece) block of a stage's stream: a piece's selected documents."""

    stage: int
    entry: int
    epoch: int
    start: int
    """First position in the stage's token stream."""
    tokens: int


def make_plan(data: DataConfig, summaries: list[list[dict]], row_length: int) -> dict:
    """The plan (a JSON-able dict) from every piece's map summary, ``summaries[source][piece]``.

    Raises DataError for a stage with fewer rows than chunks.
    """
    L = row_length
    sources = data.sources
    names = [s.name for s in sources]
    pieces: list[list[dict]] = []
    for per_piece in summaries:
        doc_base = valid_base = 0
        out = []
        for s in per_piece:
            names_map = []
            for nm in s["names"]:  # row sources get ids in the order they are first met
                if nm not in names:
                    names.append(nm)
                names_map.append(names.index(nm))
            out.append({"doc_base": doc_base, "valid_base": valid_base, "names_map": names_map})
            doc_base += s["documents_in"]
            valid_base += s["valid_tokens"]
        pieces.append(out)
    index_of = {s.name: t for t, s in enumerate(sources)}
    stages, first_chunk = [], 0
    for si, stage in enumerate(data.resolved_stages()):
        blocks: list[list[int]] = []
        mix_json = []
        pos = 0
        for ei, m in enumerate(stage.mix):
            t = index_of[m.source]
            per_piece = [s["epochs"].get(f"{si}/{ei}", []) for s in summaries[t]]
            n_epochs = max((len(e) for e in per_piece), default=0)
            docs = copies = toks = 0
            for e in range(n_epochs):
                for pi, ep in enumerate(per_piece):
                    if e < len(ep) and ep[e][1] > 0:
                        blocks.append([ei, e, t, pi, pos, ep[e][1]])
                        pos += ep[e][1]
                    if e < len(ep):
                        copies += ep[e][0]
                        toks += ep[e][1]
                        if e == 0:
                            docs += ep[e][0]
            mix_json.append({"source": m.source, "weight": m.weight, "part": list(m.part),
                             "documents": docs, "document_copies": copies, "tokens": toks})
        total = pos
        n_rows = total // L
        if n_rows < stage.chunks:
            raise DataError(
                f"stage '{stage.name}' has {total} tokens, {n_rows} rows of seq_len + 1 = {L} tokens: "
                f"too few for its {stage.chunks} chunks. Add data, lower data.seq_len or the stage's chunks."
            )
        per_chunk = n_rows // stage.chunks
        stages.append({
            "index": si, "name": stage.name, "shuffle": stage.shuffle, "first_chunk": first_chunk,
            "chunks": stage.chunks, "rows_packed": n_rows, "rows_per_chunk": per_chunk,
            "tokens_packed": total, "cap": n_rows * L, "mix": mix_json, "blocks": blocks,
        })
        first_chunk += stage.chunks
    return {"format": PLAN_FORMAT, "seed": data.seed, "row_length": L, "source_names": names,
            "pieces": pieces, "stages": stages}


def plan_hash(plan: dict, salt: str) -> str:
    """A name for the plan's outputs: equal plans (and salt: the map outputs' keys) give equal names."""
    return hashlib.sha256(json_bytes(plan) + salt.encode()).hexdigest()[:20]


def stage_json(st: dict) -> dict:
    """A stage's entry in the manifest."""
    rows = st["rows_per_chunk"] * st["chunks"]
    return {
        "name": st["name"],
        "index": st["index"],
        "shuffle": st["shuffle"],
        "first_chunk": st["first_chunk"],
        "chunks": st["chunks"],
        "rows": int(rows),
        "rows_per_chunk": int(st["rows_per_chunk"]),
        "rows_packed": int(st["rows_packed"]),
        "rows_dropped_uneven_split": int(st["rows_packed"] - rows),
        "tokens_packed": int(st["tokens_packed"]),
        "tokens_dropped_partial_last_row": int(st["tokens_packed"] - st["cap"]),
        "mix": st["mix"],
    }


def write_positions(path: Path, seed: int, stage: dict) -> None:
    """Write where each row of a stage lands (the inverse of its seeded permutation), int64 ``.npy``."""
    if path.is_file():
        return
    n = int(stage["rows_packed"])
    if stage["shuffle"]:
        perm = np.random.default_rng([seed, int(stage["index"])]).permutation(n)
    else:
        perm = np.arange(n)
    position = np.empty(n, dtype=np.int64)
    block = 1 << 24
    for b in range(0, n, block):  # an arange of the whole stage would be 8 more bytes a row
        position[perm[b : b + block]] = np.arange(b, min(n, b + block), dtype=np.int64)
    del perm
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, position, allow_pickle=False)
