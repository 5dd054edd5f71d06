"""Prepare's *scatter* (per piece) and *reduce* (per chunk) tasks: the global permutation, in parallel.

:func:`scatter_piece` reads one piece's tokens once, in order. For each of its blocks (see
:mod:`llm360.data.prepare_plan`) it cuts the block's stretch of the stage stream at row
boundaries and files every row under the chunk and position the stage's permutation sends it to:
whole rows, the at most two partial rows at the block's ends (a row can span blocks, so pieces),
and each row's provenance records. Its output, one file per piece, is sorted by chunk, so each
chunk's part is one contiguous range per section:

    magic, header (counts), index[chunk][rows | partials | provenance] (record offsets),
    frames[chunk][rows | provenance] (byte offsets of each chunk's zstd frame)
    row positions (u4) | whole rows (zstd, a frame per chunk) | partial rows (records) | their tokens
    | provenance (zstd, a frame per chunk)

:func:`reduce_chunk` reads its range from every piece of its stage, one piece after another (one
open and one read each), writes each row at its position in ``chunk_NNN.npy`` and then
``provenance_NNN.npy``, sorted by row and offset in the row. Every read is sequential within a
piece's file: no random gather from one big file anywhere.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llm360.data.prepare_map import FIM_TOKENS, TOKENS, ZSTD_LEVEL, Draw, load_fim_output, load_map_output
from llm360.data.prepare_mix import block_copies, gather
from llm360.rundir.atomic import atomic_path, write_json
from llm360.rundir.data import PROVENANCE_DTYPE, PROVENANCE_FIM_DTYPE
from llm360.rundir.layout import chunk_file, index_name, provenance_file
from llm360.utils import sha256_file

_MAGIC = b"L360SCT\x02"
_HEADER = 8  # int64 fields after the magic
_PART_DTYPE = np.dtype([("pos", "<u4"), ("row_offset", "<u4"), ("length", "<u4"), ("tok", "<u8")])


@dataclass(frozen=True)
class StageRows:
    """What scatter needs to know of a stage."""

    index: int
    first_chunk: int
    chunks: int
    rows_per_chunk: int
    cap: int
    """Tokens in the stage's rows: positions at or past this are the dropped partial last row."""
    positions: str
    """The stage's row -> position file (:func:`~llm360.data.prepare_plan.write_positions`)."""
    rows_extra: int = 0
    """The first this many chunks of the stage hold rows_per_chunk + 1 rows."""

    def place(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(chunk, row in the chunk, kept) of stage positions: positions past the stage's rows are
        dropped by the uneven split."""
        q, x = self.rows_per_chunk, self.rows_extra
        long_rows = x * (q + 1)
        late = pos >= long_rows
        c = np.where(late, x + (pos - long_rows) // max(q, 1), pos // (q + 1))
        r = np.where(late, (pos - long_rows) % max(q, 1), pos % (q + 1))
        return self.first_chunk + c, r, pos < q * self.chunks + x


@dataclass(frozen=True)
class ScatterBlock:
    draw: Draw
    epoch: int
    start: int
    tokens: int


@dataclass(frozen=True)
class ScatterSpec:
    map_dir: str
    out: str
    result: str
    table: int
    doc_base: int
    names_map: tuple[int, ...]
    row_length: int
    dtype: str
    n_chunks: int
    stages: tuple[StageRows, ...]
    blocks: tuple[ScatterBlock, ...]
    free_tokens: bool = True
    """Delete the piece's map tokens once its rows are scattered (at most one scratch copy of the tokens)."""
    fim: bool = False
    """The data set has FIM-transformed copies: provenance records carry their ``fim`` mark."""


def provenance_dtype(fim: bool) -> np.dtype:
    """The provenance record of a data set with (or without) FIM-transformed copies."""
    return PROVENANCE_FIM_DTYPE if fim else PROVENANCE_DTYPE


def segments(starts: np.ndarray, ends: np.ndarray, docs: np.ndarray, names: np.ndarray, table: int, L: int,
             marks: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Split document spans [start, end) of a stage stream at row boundaries: int64 columns of the
    provenance records (``row`` is the stage row), in stream order; ``fim`` too when ``marks`` (each
    span's FIM mark) is given."""
    live = ends > starts
    starts, ends, docs, names = starts[live], ends[live], docs[live], names[live]
    first = starts // L
    counts = (ends - 1) // L - first + 1
    rep = np.repeat(np.arange(len(starts)), counts)
    k = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    row = first[rep] + k
    lo = np.maximum(starts[rep], row * L)
    hi = np.minimum(ends[rep], (row + 1) * L)
    out = {"row": row, "row_offset": lo - row * L, "length": hi - lo, "source": names[rep],
           "table": np.full(len(rep), table, np.int64), "doc": docs[rep], "doc_offset": lo - starts[rep]}
    if marks is not None:
        out["fim"] = marks[live][rep]
    return out


def scatter_piece(spec: ScatterSpec) -> dict:
    """Scatter one piece's rows to their chunks (see the module docstring); returns the tokens it
    dropped, ``{name id: {reason: tokens}}`` (``partial_last_row``, ``uneven_chunk_split``)."""
    L, dtype = spec.row_length, np.dtype(spec.dtype)
    map_dir = Path(spec.map_dir)
    index, raw = load_map_output(map_dir)
    toks = raw.view(dtype) if raw.size else np.zeros(0, dtype)
    fim, fraw = load_fim_output(map_dir)
    ftoks = fraw.view(dtype) if fraw.size else np.zeros(0, dtype)
    prov_dtype = provenance_dtype(spec.fim)
    ntok_all = index["ntok"].astype(np.int64)
    names = np.asarray(spec.names_map, np.int64)[index["name"].astype(np.int64)] if len(index) else np.zeros(0, np.int64)
    docs = index["doc"].astype(np.int64) + spec.doc_base
    dropped: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    rows_key, rows_tok, part_key, part_rec, part_tok, prov_chunk, prov_rec = [], [], [], [], [], [], []
    positions: dict[int, np.ndarray] = {}
    for b in spec.blocks:
        st = spec.stages[b.draw.stage]
        if st.index not in positions:
            positions[st.index] = np.load(st.positions, mmap_mode="r", allow_pickle=False)
        transformed = b.draw.fim_rate > 0 and len(fim) > 0
        if transformed:
            rows_sel, offs, ntok, from_fim, marks = block_copies(index, fim, b.draw, b.epoch)
            sel = np.zeros(len(index), bool)
            sel[rows_sel] = True
        else:
            sel = b.draw.copies(index) > b.epoch
            ntok = ntok_all[sel]
            marks = np.zeros(len(ntok), np.int64)
        starts = b.start + np.cumsum(ntok) - ntok
        ends = starts + ntok
        over = np.clip(ends - np.maximum(starts, st.cap), 0, None)
        for name, d in zip(names[sel][over > 0].tolist(), over[over > 0].tolist(), strict=True):
            dropped[name]["partial_last_row"] += d
        b0, b1 = b.start, min(b.start + b.tokens, st.cap)
        if b1 <= b0:
            continue
        if transformed:
            stream = gather(toks, ftoks, offs, ntok, from_fim, b1 - b0)
        else:
            stream = toks[np.repeat(sel, ntok_all)][: b1 - b0]
        r0, r1 = b0 // L, (b1 - 1) // L + 1
        pos = np.asarray(positions[st.index][r0:r1], dtype=np.int64)
        chunk, pos_in, keep = st.place(pos)

        seg = segments(starts, np.minimum(ends, st.cap), docs[sel], names[sel], spec.table, L,
                       marks if spec.fim else None)
        local = seg["row"] - r0
        kept = keep[local]
        for name, n in zip(seg["source"][~kept].tolist(), seg["length"][~kept].tolist(), strict=True):
            dropped[name]["uneven_chunk_split"] += n
        rec = np.empty(int(kept.sum()), prov_dtype)
        for col in prov_dtype.names:
            if col != "row":
                rec[col] = seg[col][kept]
        rec["row"] = pos_in[local[kept]]
        prov_rec.append(rec)
        prov_chunk.append(chunk[local[kept]])

        rows = np.arange(r0, r1)
        lo = np.maximum(b0, rows * L)
        hi = np.minimum(b1, (rows + 1) * L)
        full = (hi - lo) == L
        f = np.nonzero(full)[0]
        if f.size:  # whole rows are consecutive: every row but the block's first and last
            block = stream[lo[f[0]] - b0 : lo[f[0]] - b0 + f.size * L].reshape(f.size, L)
            k = keep[f]
            rows_tok.append(np.asarray(block[k]))
            rows_key.append(np.stack([chunk[f][k], pos_in[f][k]], axis=1))
        for i in np.nonzero(~full & keep)[0].tolist():
            part_key.append((int(chunk[i]), int(pos_in[i]), int(lo[i] - rows[i] * L)))
            part_rec.append((int(pos_in[i]), int(lo[i] - rows[i] * L), int(hi[i] - lo[i])))
            part_tok.append(np.asarray(stream[lo[i] - b0 : hi[i] - b0]))
    _write_scatter(Path(spec.out), spec, rows_key, rows_tok, part_key, part_rec, part_tok, prov_chunk, prov_rec)
    result = {"dropped": {str(k): dict(sorted(v.items())) for k, v in sorted(dropped.items())}}
    write_json(Path(spec.result), result)
    if spec.free_tokens:
        (map_dir / TOKENS).unlink(missing_ok=True)
        (map_dir / FIM_TOKENS).unlink(missing_ok=True)
    return result


def _write_scatter(path: Path, spec: ScatterSpec, rows_key: list, rows_tok: list, part_key: list,
                   part_rec: list, part_tok: list, prov_chunk: list, prov_rec: list) -> None:
    L, dtype, n = spec.row_length, np.dtype(spec.dtype), spec.n_chunks
    keys = np.concatenate(rows_key) if rows_key else np.zeros((0, 2), np.int64)
    order = np.lexsort((keys[:, 1], keys[:, 0]))
    row_chunks = keys[order, 0]
    row_pos = keys[order, 1].astype("<u4")
    row_tok = (np.concatenate(rows_tok) if rows_tok else np.zeros((0, L), dtype))[order]
    porder = sorted(range(len(part_key)), key=part_key.__getitem__)
    part = np.zeros(len(porder), _PART_DTYPE)
    ptoks, at = [], 0
    for j, i in enumerate(porder):
        part[j] = (*part_rec[i], at)
        ptoks.append(part_tok[i])
        at += len(part_tok[i])
    part_chunks = np.array([part_key[i][0] for i in porder], np.int64)
    ptok = np.concatenate(ptoks).astype(dtype) if ptoks else np.zeros(0, dtype)
    pc = np.concatenate(prov_chunk) if prov_chunk else np.zeros(0, np.int64)
    qorder = np.argsort(pc, kind="stable")
    prov = (np.concatenate(prov_rec) if prov_rec else np.zeros(0, provenance_dtype(spec.fim)))[qorder]
    pc = pc[qorder]
    edges = np.arange(n + 1)
    table = np.stack([np.searchsorted(row_chunks, edges), np.searchsorted(part_chunks, edges),
                      np.searchsorted(pc, edges)], axis=1).astype("<i8")
    # whole rows and provenance: one zstd frame per chunk (the bulk of the file; partial rows stay raw)
    rows_blob, rows_at = _frames(row_tok, table[:, 0])
    prov_blob, prov_at = _frames(prov, table[:, 2])
    frames = np.stack([rows_at, prov_at], axis=1).astype("<i8")
    head = np.array([n, len(row_pos), len(part), len(ptok), len(prov), L, dtype.itemsize, len(rows_blob)], "<i8")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for blob in (_MAGIC, head, table, frames, row_pos, rows_blob, part, ptok, prov_blob):
            f.write(blob if isinstance(blob, bytes) else np.ascontiguousarray(blob).tobytes())


def _frames(records: np.ndarray, edges: np.ndarray) -> tuple[bytes, np.ndarray]:
    """``records[edges[c]:edges[c + 1]]`` of every chunk c as its own zstd frame: (the frames, one
    after the other; each frame's byte offset, and the end)."""
    import zstandard

    z = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    parts, at = [], [0]
    for a, b in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True):
        parts.append(z.compress(np.ascontiguousarray(records[a:b]).tobytes()) if b > a else b"")
        at.append(at[-1] + len(parts[-1]))
    return b"".join(parts), np.asarray(at, np.int64)


class _Scattered:
    """One piece's scatter file, opened for the reduce of one chunk."""

    def __init__(self, path: Path, chunk: int, L: int, dtype: np.dtype, prov_dtype: np.dtype = PROVENANCE_DTYPE
                 ) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.path, self.L, self.dtype, self.prov_dtype = path, L, dtype, prov_dtype
        if self._read(0, len(_MAGIC)) != _MAGIC:
            raise AssertionError(f"{path} is not a scatter file")
        n, self.n_rows, self.n_part, self.n_ptok, self.n_prov, _, _, rows_bytes = np.frombuffer(
            self._read(len(_MAGIC), 8 * _HEADER), "<i8").tolist()
        base = len(_MAGIC) + 8 * _HEADER
        table = np.frombuffer(self._read(base + 8 * 3 * chunk, 8 * 3 * 2), "<i8").reshape(2, 3)
        (self.ra, self.pa, self.qa), (self.rb, self.pb, self.qb) = table.tolist()
        o_frames = base + 8 * 3 * (n + 1)
        frames = np.frombuffer(self._read(o_frames + 8 * 2 * chunk, 8 * 2 * 2), "<i8").reshape(2, 2)
        (self.fr_a, self.fq_a), (self.fr_b, self.fq_b) = frames.tolist()
        self.o_pos = o_frames + 8 * 2 * (n + 1)
        self.o_rows = self.o_pos + 4 * self.n_rows
        self.o_part = self.o_rows + rows_bytes
        self.o_ptok = self.o_part + self.n_part * _PART_DTYPE.itemsize
        self.o_prov = self.o_ptok + self.n_ptok * dtype.itemsize
        self.pos = np.frombuffer(self._read(self.o_pos + 4 * self.ra, 4 * (self.rb - self.ra)), "<u4").astype(np.int64)
        self.part = np.frombuffer(self._read(self.o_part + _PART_DTYPE.itemsize * self.pa,
                                             _PART_DTYPE.itemsize * (self.pb - self.pa)), _PART_DTYPE)
        if len(self.part):
            t0 = int(self.part["tok"][0])
            t1 = int(self.part["tok"][-1] + self.part["length"][-1])
            self.ptok = np.frombuffer(self._read(self.o_ptok + t0 * dtype.itemsize, (t1 - t0) * dtype.itemsize), dtype)
            self.ptok_base = t0

    def _read(self, offset: int, size: int) -> bytes:
        out = bytearray()
        while len(out) < size:
            got = os.pread(self.fd, size - len(out), offset + len(out))
            if not got:
                raise AssertionError(f"{self.path} is truncated")
            out += got
        return bytes(out)

    def _frame(self, offset: int, size: int, expect: int) -> bytes:
        import zstandard

        if size == 0:
            return b""
        data = zstandard.ZstdDecompressor().decompress(self._read(offset, size), max_output_size=expect)
        if len(data) != expect:
            raise AssertionError(f"{self.path}: a frame of {len(data)} bytes, expected {expect}")
        return data

    def rows(self) -> np.ndarray:
        """This chunk's whole rows, in the order of ``self.pos``."""
        n = self.rb - self.ra
        data = self._frame(self.o_rows + self.fr_a, self.fr_b - self.fr_a, n * self.L * self.dtype.itemsize)
        return np.frombuffer(data, self.dtype).reshape(n, self.L)

    def provenance(self) -> np.ndarray:
        n = self.qb - self.qa
        data = self._frame(self.o_prov + self.fq_a, self.fq_b - self.fq_a, n * self.prov_dtype.itemsize)
        return np.frombuffer(data, self.prov_dtype)

    def close(self) -> None:
        os.close(self.fd)


@dataclass(frozen=True)
class ReduceSpec:
    chunk: int
    stage: str
    rows: int
    row_length: int
    dtype: str
    source_names: tuple[str, ...]
    scattered: str
    """A JSON list of the scatter files of every piece with rows in this chunk's stage."""
    out_dir: str
    result: str
    fim: bool = False
    """Provenance records carry the ``fim`` mark of FIM-transformed copies (and the result counts their tokens)."""


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _fim_counts(prov: np.ndarray, names: tuple[str, ...], fim: bool) -> dict:
    """``{"fim_tokens_per_source": {...}}`` of a chunk's provenance with FIM marks (else {})."""
    if not fim:
        return {}
    sel = prov[prov["fim"] > 0]
    tokens = np.bincount(sel["source"], weights=sel["length"], minlength=len(names))
    return {"fim_tokens_per_source": {names[i]: int(t) for i, t in enumerate(tokens) if t}}


def reduce_chunk(spec: ReduceSpec) -> dict:
    """Write one chunk and its provenance from the pieces' scatter files; returns its manifest entry
    (with both files' sha256 and size).

    Each piece's part is read once (one file open and one read per section) and its rows written at
    their positions; memory holds one piece's part and the chunk's provenance.
    """
    L, dtype, rows, c = spec.row_length, np.dtype(spec.dtype), spec.rows, spec.chunk
    out = Path(spec.out_dir)
    header = _npy_header((rows, L), dtype)
    row_bytes = L * dtype.itemsize
    covered = 0
    provs = []
    with atomic_path(out / chunk_file(c)) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, header)
            os.ftruncate(fd, len(header) + rows * row_bytes)
            for path in json.loads(Path(spec.scattered).read_text()):
                p = _Scattered(Path(path), c, L, dtype, provenance_dtype(spec.fim))
                try:
                    if len(p.pos):
                        block = p.rows()
                        for pos, row in zip(p.pos.tolist(), block, strict=True):
                            os.pwrite(fd, row.tobytes(), len(header) + pos * row_bytes)
                        covered += len(p.pos) * L
                    for r in p.part:
                        t = int(r["tok"]) - p.ptok_base
                        off, n = int(r["row_offset"]), int(r["length"])
                        os.pwrite(fd, p.ptok[t : t + n].tobytes(),
                                  len(header) + int(r["pos"]) * row_bytes + off * dtype.itemsize)
                        covered += n
                    provs.append(p.provenance().copy())
                finally:
                    p.close()
        finally:
            os.close(fd)
        if covered != rows * L:
            raise AssertionError(f"chunk {c}: {covered} tokens placed, expected {rows * L}")
        sha = sha256_file(tmp)
    prov = np.concatenate(provs) if provs else np.zeros(0, provenance_dtype(spec.fim))
    prov = prov[np.lexsort((prov["row_offset"], prov["row"]))]
    pbuf = io.BytesIO()
    np.save(pbuf, prov, allow_pickle=False)
    with atomic_path(out / provenance_file(c)) as tmp:
        tmp.write_bytes(pbuf.getvalue())
    names = spec.source_names
    tokens = np.bincount(prov["source"], weights=prov["length"], minlength=len(names))
    spans = np.bincount(prov["source"], minlength=len(names))
    result = {
        "index": c,
        "name": index_name(c),
        "stage": spec.stage,
        "file": chunk_file(c),
        "provenance": provenance_file(c),
        "rows": int(rows),
        "tokens": int(rows * L),
        "tokens_per_source": {names[i]: int(t) for i, t in enumerate(tokens) if t},
        "document_spans_per_source": {names[i]: int(s) for i, s in enumerate(spans) if s},
        **_fim_counts(prov, names, spec.fim),
        "sha256": sha,
        "bytes": len(header) + rows * row_bytes,
        "provenance_sha256": hashlib.sha256(pbuf.getvalue()).hexdigest(),
        "provenance_bytes": len(pbuf.getvalue()),
    }
    write_json(Path(spec.result), result)
    return result
