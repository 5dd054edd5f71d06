"""Prepare's *plan* step: from the map tasks' summaries to where every row goes. Small, run once.

Each stage's token stream is, in this order: for every mix entry, for every epoch ``e`` (the
documents with more than ``e`` copies), for every piece of the entry's source in read order,
that piece's selected documents, each followed by its EOS. Prefix sums over these *blocks* give
every block's first position in the stream, every piece's first document number and validation
offset, and the stage's rows (``tokens // (seq_len + 1)``); the partial last row is dropped.

A stage's rows are split into its chunks in order: ``chunks`` of ``rows // chunks`` rows each
(the rest dropped), or -- when the stage gives ``tokens_per_chunk``, or the run ``total_chunks``
-- into the chunks that number asks for, the first ``rows_extra`` of them one row longer, so no row
is dropped and sizes differ by at most one row (:func:`chunk_sizes`). With ``data.partial_chunk:
drop``, every chunk of every stage holds exactly ``round(tokens_per_chunk / row_length)`` rows and
each stage's rows past its last whole chunk are dropped.

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
from llm360.data.filters import as_specs
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
            out[m.source].append(Draw(si, ei, float(m.weight), (float(m.part[0]), float(m.part[1])),
                                      slot=len(out[m.source]), filters=as_specs(m.filters),
                                      fim_rate=float(m.fim_rate), spm_rate=float(m.spm_rate),
                                      stage_name=stage.name))
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


def chunk_sizes(rows: int, chunks: int) -> tuple[int, int]:
    """(rows_per_chunk, rows_extra): ``rows`` split into ``chunks`` chunks as evenly as whole rows
    allow -- the first ``rows_extra`` chunks have one row more."""
    return rows // chunks, rows % chunks


def share_chunks(rows: list[int], total: int) -> list[int]:
    """``total`` chunks shared among stages in proportion to their rows (largest remainders, ties to
    the earlier stage); a stage left with none takes one from the stage with the most."""
    n = len(rows)
    whole = sum(rows)
    if whole == 0:
        return [total - n + 1] + [1] * (n - 1)
    quota = [r * total / whole for r in rows]
    base = [int(q) for q in quota]
    order = sorted(range(n), key=lambda i: (-(quota[i] - base[i]), i))
    for i in order[: total - sum(base)]:
        base[i] += 1
    for i in range(n):
        if base[i] == 0:
            base[max(range(n), key=lambda k: (base[k], -k))] -= 1
            base[i] = 1
    return base


def _rows_asked(stage, L: int) -> int:
    """The rows per chunk a stage's tokens_per_chunk asks for."""
    return max(1, round(stage.tokens_per_chunk / L))


def _stage_chunks(stage, n_rows: int, L: int, partial: str = "spread") -> int:
    """The chunks of a stage that gives chunks or tokens_per_chunk (``partial``: data.partial_chunk)."""
    if stage.chunks is not None:
        return int(stage.chunks)
    target = _rows_asked(stage, L)
    if partial == "drop":
        if n_rows < target:
            raise DataError(
                f"stage '{stage.name}' has {n_rows} rows of seq_len + 1 = {L} tokens, fewer than one chunk of "
                f"tokens_per_chunk = {stage.tokens_per_chunk} ({target} rows), and data.partial_chunk = drop "
                "would drop them all. Add data, lower tokens_per_chunk, or set partial_chunk: spread."
            )
        return n_rows // target
    return max(1, min(n_rows, round(n_rows / target)))


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
        fim_tokens = 0
        for ei, m in enumerate(stage.mix):
            t = index_of[m.source]
            key = f"{si}/{ei}"
            per_piece = [s["epochs"].get(key, []) for s in summaries[t]]
            n_epochs = max((len(e) for e in per_piece), default=0)
            docs = copies = toks = 0
            fim = [0, 0, 0]  # copies FIM-transformed, of them in SPM order, their tokens
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
                        for j, x in enumerate(ep[e][2:5]):
                            fim[j] += x
            entry = {"source": m.source, "weight": m.weight, "part": list(m.part),
                     "documents": docs, "document_copies": copies, "tokens": toks}
            if m.filters:
                filtered: dict[str, int] = {}
                for s in summaries[t]:
                    for f, n in s.get("filtered", {}).get(key, {}).items():
                        filtered[f] = filtered.get(f, 0) + n
                entry["filters"] = [f.model_dump(mode="json") for f in m.filters]
                entry["filtered_by_mix"] = dict(sorted(filtered.items()))
            if m.fim_rate > 0:
                entry.update({"fim_rate": m.fim_rate, "spm_rate": m.spm_rate, "fim_copies": fim[0],
                              "spm_copies": fim[1], "fim_tokens": fim[2]})
                fim_tokens += fim[2]
            mix_json.append(entry)
        total = pos
        n_rows = total // L
        if stage.chunks is not None and n_rows < stage.chunks:
            raise DataError(
                f"stage '{stage.name}' has {total} tokens, {n_rows} rows of seq_len + 1 = {L} tokens: "
                f"too few for its {stage.chunks} chunks. Add data, lower data.seq_len or the stage's chunks."
            )
        if n_rows < 1:
            raise DataError(
                f"stage '{stage.name}' has {total} tokens, not one row of seq_len + 1 = {L} tokens. "
                "Add data or lower data.seq_len."
            )
        st = {
            "index": si, "name": stage.name, "shuffle": stage.shuffle, "first_chunk": 0,
            "chunks": 0, "rows_packed": n_rows, "rows_per_chunk": 0,
            "tokens_packed": total, "cap": n_rows * L, "mix": mix_json, "blocks": blocks,
        }
        if stage.tokens_per_chunk is not None:
            st["tokens_per_chunk"] = stage.tokens_per_chunk
        if stage.uses_fim:
            st["fim_tokens"] = fim_tokens
        stages.append(st)
    resolved = data.resolved_stages()
    if data.total_chunks is not None:
        counts = share_chunks([st["rows_packed"] for st in stages], data.total_chunks)
        short = [(st["name"], st["rows_packed"], c) for st, c in zip(stages, counts, strict=True)
                 if st["rows_packed"] < c]
        if short:
            name, rows, c = short[0]
            raise DataError(f"stage '{name}' has {rows} rows, too few for the {c} chunks data.total_chunks = "
                            f"{data.total_chunks} gives it. Add data, lower data.seq_len or total_chunks.")
    else:
        counts = [_stage_chunks(stage, st["rows_packed"], L, data.partial_chunk)
                  for stage, st in zip(resolved, stages, strict=True)]
    for stage, st, c in zip(resolved, stages, counts, strict=True):
        st["first_chunk"], st["chunks"] = first_chunk, c
        if stage.chunks is not None:  # the stage's rows // chunks each, the rest dropped
            st["rows_per_chunk"] = st["rows_packed"] // c
        elif data.partial_chunk == "drop":  # tokens_per_chunk's rows each, the rows past the last whole chunk dropped
            st["rows_per_chunk"] = _rows_asked(stage, L)
        else:
            st["rows_per_chunk"], st["rows_extra"] = chunk_sizes(st["rows_packed"], c)
        first_chunk += c
    return {"format": PLAN_FORMAT, "seed": data.seed, "row_length": L, "source_names": names,
            "pieces": pieces, "stages": stages}


def plan_hash(plan: dict, salt: str) -> str:
    """A name for the plan's outputs: equal plans (and salt: the map outputs' keys) give equal names."""
    return hashlib.sha256(json_bytes(plan) + salt.encode()).hexdigest()[:20]


def stage_rows(st: dict) -> int:
    """Rows a planned stage keeps in its chunks."""
    return int(st["rows_per_chunk"] * st["chunks"] + st.get("rows_extra", 0))


def chunk_rows(st: dict, c: int) -> int:
    """Rows of the stage's chunk ``c`` (0-based within the stage)."""
    return int(st["rows_per_chunk"] + (1 if c < st.get("rows_extra", 0) else 0))


def stage_json(st: dict) -> dict:
    """A stage's entry in the manifest."""
    rows = stage_rows(st)
    extra = {k: st[k] for k in ("tokens_per_chunk", "rows_extra") if k in st}
    if "fim_tokens" in st:
        extra["fim_tokens"] = int(st["fim_tokens"])
        extra["fim_share"] = round(st["fim_tokens"] / st["tokens_packed"], 6) if st["tokens_packed"] else 0.0
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
        **extra,
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
