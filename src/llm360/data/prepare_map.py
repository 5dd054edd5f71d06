"""Prepare's *map* task: one piece of a source -> its tokens, document index, counts and table part.

:func:`map_piece` reads one :class:`~llm360.data.pieces.Piece`, and for every item it meets:

* a rejected record (with its reason) goes to the piece's part of the documents table;
* a text document is held out for validation or kept for training by a seeded hash of its id
  (:func:`unit_hash`, tag ``valid``), tokenized, and gets an EOS;
* a pre-tokenized row is checked (length, id range) and kept as it is.

It writes, into its own folder (renamed into place when complete, :func:`~llm360.rundir.atomic.atomic_folder`):

``tokens.bin``  the training tokens, document after document (token dtype, raw)
``index.npy``   per training document: number within the piece, offset, tokens, name, its two draws
``valid.bin``   the held-out tokens, document after document
``docs.z``      its lines of ``documents/<source>.jsonl.gz``, with the document number left out
                (``head NUL tail``): numbers are global to a source and only the plan knows them
``snapshot.z``  its lines of ``sources/<source>.jsonl.gz`` (sources with ``snapshot: true``)
``summary.json`` counts, rejections by reason, names of row sources met, and per stage and mix
                entry the documents and tokens of every epoch: all the plan needs (returned, too)

The draws of the mix (``u_part``, ``u_sample``) depend only on the seed, the source and the
document id, so the piece a document lands in never changes its fate.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from llm360.config import DataConfig, SourceConfig
from llm360.data.documents import Document, Rejected, TokenRow, content_hash
from llm360.data.pieces import Piece, iter_piece
from llm360.data.tokenizer import TextTokenizer, load_saved
from llm360.errors import DataError
from llm360.rundir.atomic import atomic_folder, write_json

MAP_FORMAT = 1
"""Version of a map task's output; part of its key, so a changed format is never reused."""

DOCIDX_DTYPE = np.dtype(
    [
        ("doc", "<u8"),  # number of the item within its piece (the plan adds the piece's base)
        ("offset", "<i8"),  # first token in tokens.bin
        ("ntok", "<i8"),  # tokens, EOS included
        ("name", "<u2"),  # index into the summary's `names`: whose tokens these are
        ("u_part", "<f8"),  # the two seeded draws of the mix
        ("u_sample", "<f8"),
    ]
)
"""Per training document of a piece: where its tokens are, and its two seeded draws."""

SUMMARY = "summary.json"


def unit_hash(seed: int, tag: str, source: str, doc_id: str) -> float:
    """A seeded, uniform value in [0, 1) for a document: the basis of splits and sampling."""
    h = hashlib.blake2b(f"{seed}\x00{tag}\x00{source}\x00{doc_id}".encode(), digest_size=8).digest()
    return struct.unpack("<Q", h)[0] / 2.0**64


def token_dtype(cfg: DataConfig, vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32; an explicit choice that cannot hold the vocab is an error."""
    if cfg.token_dtype == "uint16" and vocab_size > 2**16:
        raise DataError(
            f"data.token_dtype = uint16 cannot hold a vocabulary of {vocab_size} ids (max 65536); "
            "use token_dtype: uint32 or auto"
        )
    if cfg.token_dtype == "uint32" or (cfg.token_dtype == "auto" and vocab_size > 2**16):
        return np.dtype("<u4")
    return np.dtype("<u2")


@dataclass(frozen=True)
class Draw:
    """One mix entry of one stage that draws from a source: which documents, how many copies."""

    stage: int
    entry: int
    weight: float
    part: tuple[float, float]

    @property
    def key(self) -> str:
        return f"{self.stage}/{self.entry}"

    def copies(self, index: np.ndarray) -> np.ndarray:
        """Copies of each document of ``index`` (DOCIDX_DTYPE) in the stage: 0, or the weight's floor
        plus one more when the document's sample draw falls below the weight's fraction."""
        in_part = (index["u_part"] >= self.part[0]) & (index["u_part"] < self.part[1])
        whole, frac = int(np.floor(self.weight)), self.weight - np.floor(self.weight)
        return np.where(in_part, whole + (index["u_sample"] < frac).astype(np.int64), 0)


@dataclass(frozen=True)
class MapSpec:
    """Everything a map task needs (picklable: it travels to worker processes and Ray nodes)."""

    piece: Piece
    source: SourceConfig
    table: int
    """Position of the source in data.sources (its documents table)."""
    seed: int
    valid_fraction: float
    max_document_chars: int
    min_document_chars: int
    row_length: int
    dtype: str
    vocab_size: int
    eos_id: int | None
    docs_per_batch: int
    draws: tuple[Draw, ...]
    tokenizer_dir: str | None
    tokenizer_sha: str | None
    out: str
    """The task's output folder."""


_TOKENIZERS: dict[str, TextTokenizer] = {}  # per worker process, by sha256


def _tokenizer(spec: MapSpec) -> TextTokenizer | None:
    if spec.tokenizer_dir is None or spec.tokenizer_sha is None:
        return None
    if spec.tokenizer_sha not in _TOKENIZERS:
        _TOKENIZERS.clear()
        _TOKENIZERS[spec.tokenizer_sha] = load_saved(Path(spec.tokenizer_dir))
    return _TOKENIZERS[spec.tokenizer_sha]


def _dumps(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def table_line(before: dict, after: dict) -> str:
    """A documents-table line without its number: ``{<keys before n>,"n":`` NUL ``<keys after n>}``.

    The keys sort around ``n`` (``detail``, ``id`` before; ``reason``, ``row_source``,
    ``sha256_16``, ``status``, ``tokens`` after), so inserting the number gives exactly the
    key-sorted compact JSON of the whole record.
    """
    head = _dumps(before)[:-1] + ',"n":'
    tail = ("," + _dumps(after)[1:]) if after else "}"
    return head + "\x00" + tail + "\n"


class _Deflated:
    """A zlib stream written to a file (level 1: scratch, read back once)."""

    def __init__(self, path: Path) -> None:
        self.f: IO[bytes] = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.z = zlib.compressobj(1)

    def write(self, text: str) -> None:
        self.f.write(self.z.compress(text.encode("utf-8")))

    def close(self) -> None:
        self.f.write(self.z.flush())
        self.f.close()


def map_piece(spec: MapSpec) -> dict:
    """Run the map task of one piece (see the module docstring); returns its summary.

    Raises DataError for a whole-file problem (a corrupt stream, an unreadable file), naming the
    file and line; nothing is left under the output's name then.
    """
    out = Path(spec.out)
    src = spec.source
    dtype = np.dtype(spec.dtype)
    L = spec.row_length
    tok = _tokenizer(spec)
    seed, vf = spec.seed, spec.valid_fraction
    names: list[str] = []
    name_ids: dict[str, int] = {}
    counts = {"documents_in": 0, "documents_train": 0, "documents_valid": 0, "tokens_train": 0, "tokens_valid": 0}
    rejected: Counter = Counter()
    index_parts: list[np.ndarray] = []
    offset = 0

    def name_id(name: str) -> int:
        if name not in name_ids:
            name_ids[name] = len(names)
            names.append(name)
        return name_ids[name]

    if src.kind != "llm360":
        name_id(src.name)
    with atomic_folder(out) as tmp:
        tok_f = open(tmp / "tokens.bin", "wb")  # noqa: SIM115 - closed below
        val_f = open(tmp / "valid.bin", "wb")  # noqa: SIM115
        docs_w = _Deflated(tmp / "docs.z")
        snap_w = _Deflated(tmp / "snapshot.z") if src.snapshot else None
        try:
            batch: list = []
            texts: list[str] = []

            def flush() -> None:
                nonlocal offset, batch, texts
                if not batch:
                    return
                ids = tok.encode_batch(texts) if texts else []
                k = 0
                rows: list[tuple] = []
                train_parts: list[np.ndarray] = []
                valid_parts: list[np.ndarray] = []
                for kind, num, item, extra in batch:
                    if kind == "rejected":
                        rejected[item.reason] += 1
                        before = {"id": item.doc_id}
                        if item.detail:
                            before["detail"] = item.detail[:500]
                        docs_w.write(table_line(before, {"reason": item.reason, "status": "rejected"}))
                        if snap_w is not None:
                            snap_w.write(_dumps({"id": item.doc_id, "rejected": item.reason,
                                                 "detail": item.detail[:500]}) + "\n")
                        continue
                    if kind == "row":
                        arr = np.asarray(item.token_ids, dtype=np.int64).astype(dtype)
                        train_parts.append(arr)
                        rows.append((num, offset, len(arr), name_id(item.row_source),
                                     unit_hash(seed, "part", src.name, item.doc_id),
                                     unit_hash(seed, "sample", src.name, item.doc_id)))
                        offset += len(arr)
                        counts["documents_train"] += 1
                        counts["tokens_train"] += len(arr)
                        docs_w.write(table_line({"id": item.doc_id}, {"row_source": item.row_source,
                                                                      "status": "train", "tokens": len(arr)}))
                        continue
                    doc_ids = ids[k]
                    k += 1
                    ntok = len(doc_ids)
                    toks = np.empty(ntok + 1, dtype=dtype)
                    toks[:ntok] = doc_ids
                    toks[ntok] = spec.eos_id
                    after = {"sha256_16": content_hash(item.text), "tokens": ntok + 1}
                    if extra:  # held out for validation
                        valid_parts.append(toks)
                        counts["documents_valid"] += 1
                        counts["tokens_valid"] += ntok + 1
                        after["status"] = "valid"
                    else:
                        train_parts.append(toks)
                        rows.append((num, offset, ntok + 1, 0,
                                     unit_hash(seed, "part", src.name, item.doc_id),
                                     unit_hash(seed, "sample", src.name, item.doc_id)))
                        offset += ntok + 1
                        counts["documents_train"] += 1
                        counts["tokens_train"] += ntok + 1
                        after["status"] = "train"
                    docs_w.write(table_line({"id": item.doc_id}, after))
                    if snap_w is not None:
                        snap_w.write(_dumps({"id": item.doc_id, "text": item.text}) + "\n")
                if train_parts:
                    tok_f.write(np.concatenate(train_parts).tobytes())
                if valid_parts:
                    val_f.write(np.concatenate(valid_parts).tobytes())
                if rows:
                    index_parts.append(np.array(rows, dtype=DOCIDX_DTYPE))
                batch, texts = [], []

            n = 0
            items = iter_piece(src, spec.piece, max_document_chars=spec.max_document_chars,
                               min_document_chars=spec.min_document_chars)
            for item in items:
                num = n
                n += 1
                if isinstance(item, Rejected):
                    batch.append(("rejected", num, item, None))
                elif isinstance(item, TokenRow):
                    bad = _check_row(item, L, spec.vocab_size)
                    batch.append(("rejected", num, bad, None) if bad is not None else ("row", num, item, None))
                else:
                    assert isinstance(item, Document)
                    if tok is None:
                        raise DataError(f"source '{src.name}' has text but no tokenizer is configured")
                    is_valid = vf > 0 and unit_hash(seed, "valid", src.name, item.doc_id) < vf
                    batch.append(("doc", num, item, is_valid))
                    texts.append(item.text)
                if len(batch) >= spec.docs_per_batch:
                    flush()
            flush()
            counts["documents_in"] = n
        finally:
            tok_f.close()
            val_f.close()
            docs_w.close()
            if snap_w is not None:
                snap_w.close()
        index = np.concatenate(index_parts) if index_parts else np.zeros(0, DOCIDX_DTYPE)
        np.save(tmp / "index.npy", index, allow_pickle=False)
        summary = {
            "piece": spec.piece.describe(),
            "fingerprint": spec.piece.identity()["fingerprint"],
            **counts,
            "rejected": dict(sorted(rejected.items())),
            "names": names,
            "valid_tokens": counts["tokens_valid"],
            "epochs": _epochs(index, spec.draws),
            "not_selected": int((~_used(index, spec.draws)).sum()),
        }
        write_json(tmp / SUMMARY, summary, atomic=False)
    return summary


def _check_row(row: TokenRow, L: int, vocab_size: int) -> Rejected | None:
    ids = row.token_ids
    if len(ids) != L:
        return Rejected(row.source, row.doc_id, "wrong_row_length", f"{len(ids)} token ids, expected seq_len + 1 = {L}")
    lo, hi = min(ids), max(ids)
    if lo < 0 or hi >= vocab_size:
        return Rejected(row.source, row.doc_id, "token_id_out_of_range",
                        f"ids in [{lo}, {hi}], vocabulary has {vocab_size}")
    return None


def _epochs(index: np.ndarray, draws: tuple[Draw, ...]) -> dict[str, list[list[int]]]:
    """Per draw: ``[documents, tokens]`` of every epoch (documents with more than e copies, e = 0, 1, ...)."""
    out = {}
    for d in draws:
        c = d.copies(index)
        epochs = []
        for e in range(int(c.max()) if c.size else 0):
            sel = c > e
            epochs.append([int(sel.sum()), int(index["ntok"][sel].sum())])
        out[d.key] = epochs
    return out


def _used(index: np.ndarray, draws: tuple[Draw, ...]) -> np.ndarray:
    used = np.zeros(len(index), dtype=bool)
    for d in draws:
        used |= d.copies(index) > 0
    return used


def load_map_output(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(document index, training tokens as a memmap of raw token ids -- the caller knows the dtype
    -- or an empty uint8 array) of a finished map task."""
    index = np.load(folder / "index.npy", allow_pickle=False)
    path = folder / "tokens.bin"
    size = path.stat().st_size
    tokens = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    return index, tokens
