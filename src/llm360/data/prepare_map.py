"""Prepare's *map* task: one piece of a source -> its tokens, document index, counts and table part.

:func:`map_piece` reads one :class:`~llm360.data.pieces.Piece`, and for every item it meets:

* a rejected record (with its reason) goes to the piece's part of the documents table;
* a text document is held out for validation or kept for training by a seeded hash of its id
  (:func:`unit_hash`, tag ``valid``), tokenized, and gets an EOS;
* a pre-tokenized row is checked (length, id range) and kept as it is.

It writes, into its own folder (renamed into place when complete, :func:`~llm360.rundir.atomic.atomic_folder`):

``tokens.zst``  the training tokens, document after document (token dtype, one zstd frame: scratch
                is read back once, and token ids compress, so the scratch copy is smaller than the chunks)
``index.npy``   per training document: number within the piece, offset, tokens, name, its two draws
``valid.bin``   the held-out tokens, document after document
``docs.z``      its lines of ``documents/<source>.jsonl.gz``, with the document number left out
                (``head NUL tail``): numbers are global to a source and only the plan knows them
``snapshot.z``  its lines of ``sources/<source>.jsonl.gz`` (sources with ``snapshot: true``)
``fim.npy``     per FIM-transformed copy (:data:`~llm360.data.prepare_mix.FIMIDX_DTYPE`); ``fim.zst``
                their tokens, compressed alike (only when a mix entry of the source has fim_rate > 0)
``summary.json`` counts, rejections by reason, names of row sources met, and per stage and mix
                entry the documents and tokens of every epoch: all the plan needs (returned, too)

The draws of the mix (``u_part``, ``u_sample``), the mix entries' filters and FIM transforms
(:mod:`~llm360.data.prepare_mix`) depend only on the seed, the source, the document id and its
record, so the piece a document lands in never changes its fate. A document whose every copy is
FIM-transformed is tokenized only in its FIM forms (its documents-table line then has no ``tokens``).
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
from llm360.data.filters import record_columns
from llm360.data.fim import assemble, fim_record, split_text
from llm360.data.pieces import Piece, iter_piece
from llm360.data.prepare_mix import FIMIDX_DTYPE, Draw, Mixer, epochs, used
from llm360.data.tokenizer import TextTokenizer, load_saved
from llm360.errors import DataError
from llm360.rundir.atomic import atomic_folder, write_json

MAP_FORMAT = 3
"""Version of a map task's output; part of its key, so a changed format is never reused."""

DOCIDX_DTYPE = np.dtype(
    [
        ("doc", "<u8"),  # number of the item within its piece (the plan adds the piece's base)
        ("offset", "<i8"),  # first token in tokens.zst
        ("ntok", "<i8"),  # tokens, EOS included
        ("name", "<u2"),  # index into the summary's `names`: whose tokens these are
        ("u_part", "<f8"),  # the two seeded draws of the mix
        ("u_sample", "<f8"),
        ("drop", "<u8"),  # bit s: the filters of the source's draw s dropped the document
    ]
)
"""Per training document of a piece: where its plain tokens are (none for a document whose every
copy is FIM-transformed), its two seeded draws and what the mix's filters dropped."""

__all__ = ["DOCIDX_DTYPE", "FIM_TOKENS", "TOKENS", "Draw", "MapSpec", "load_fim_output", "load_map_output", "map_piece",
           "read_zstd", "unit_hash"]

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
    fim_ids: tuple[int, int, int] | None = None
    """Token ids of the FIM sentinels (prefix, middle, suffix) when a draw has fim_rate > 0."""


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


TOKENS, FIM_TOKENS = "tokens.zst", "fim.zst"
ZSTD_LEVEL = 1
"""Level of the scratch's zstd frames: ~500 MB/s a core, hundreds of times prepare's rate of token bytes."""


class _Zstd:
    """Raw bytes written to a file as one zstd frame."""

    def __init__(self, path: Path) -> None:
        import zstandard

        self.w = zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(open(path, "wb"), closefd=True)  # noqa: SIM115

    def write(self, data: bytes) -> None:
        self.w.write(data)

    def close(self) -> None:
        self.w.close()


def read_zstd(path: Path) -> np.ndarray:
    """The bytes of a file written by :class:`_Zstd`, as a uint8 array."""
    import zstandard

    with open(path, "rb") as f:
        data = f.read()
    if not data:
        return np.zeros(0, np.uint8)
    return np.frombuffer(zstandard.ZstdDecompressor().decompressobj().decompress(data), np.uint8)


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
    mixer = Mixer(spec.draws, seed, src.name)
    if any(d.fim_rate > 0 for d in spec.draws) and spec.fim_ids is None:
        raise DataError(f"source '{src.name}': a mix entry has fim_rate > 0 but no FIM token ids were given")
    filter_specs = [f for d in spec.draws for f in d.filters]
    columns = record_columns(filter_specs)
    fim_parts: list[np.ndarray] = []
    fim_rows: list[tuple] = []
    fim_offset = 0
    n_index = 0  # index rows written so far
    fim_counts = Counter()
    with atomic_folder(out) as tmp:
        tok_f = _Zstd(tmp / TOKENS)
        val_f = open(tmp / "valid.bin", "wb")  # noqa: SIM115 - closed below
        fim_f = _Zstd(tmp / FIM_TOKENS) if mixer.active else None
        docs_w = _Deflated(tmp / "docs.z")
        snap_w = _Deflated(tmp / "snapshot.z") if src.snapshot else None
        try:
            batch: list = []
            texts: list[str] = []

            def flush() -> None:
                nonlocal offset, batch, texts, fim_offset, n_index
                if not batch:
                    return
                ids = tok.encode_batch(texts) if texts else []
                k = 0
                rows: list[tuple] = []
                train_parts: list[np.ndarray] = []
                valid_parts: list[np.ndarray] = []
                fim_parts.clear()
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
                                     unit_hash(seed, "sample", src.name, item.doc_id), 0))
                        n_index += 1
                        offset += len(arr)
                        counts["documents_train"] += 1
                        counts["tokens_train"] += len(arr)
                        docs_w.write(table_line({"id": item.doc_id}, {"row_source": item.row_source,
                                                                      "status": "train", "tokens": len(arr)}))
                        continue
                    is_valid, decision, u_part, u_sample = extra
                    before: dict = {"id": item.doc_id}
                    after = {"sha256_16": content_hash(item.text)}
                    if decision is None or decision.plain:
                        doc_ids = ids[k]
                        k += 1
                        ntok = len(doc_ids)
                        toks = np.empty(ntok + 1, dtype=dtype)
                        toks[:ntok] = doc_ids
                        toks[ntok] = spec.eos_id
                        after["tokens"] = ntok + 1
                    else:
                        toks = np.zeros(0, dtype)
                    if is_valid:  # held out for validation
                        valid_parts.append(toks)
                        counts["documents_valid"] += 1
                        counts["tokens_valid"] += len(toks)
                        after["status"] = "valid"
                    else:
                        train_parts.append(toks)
                        rows.append((num, offset, len(toks), 0, u_part, u_sample,
                                     decision.drop if decision is not None else 0))
                        offset += len(toks)
                        counts["documents_train"] += 1
                        counts["tokens_train"] += len(toks)
                        after["status"] = "train"
                        if decision is not None and decision.fim:
                            records = []
                            for mark, (d, e, sp) in enumerate(decision.fim, start=1):
                                p_ids, m_ids, s_ids = ids[k], ids[k + 1], ids[k + 2]
                                k += 3
                                arr = assemble((p_ids, m_ids, s_ids), sp, spec.fim_ids, spec.eos_id, dtype)
                                fim_parts.append(arr)
                                fim_rows.append((n_index, d.slot, e, fim_offset, len(arr), mark, int(sp.spm)))
                                fim_offset += len(arr)
                                records.append(fim_record(sp, stage=d.stage_name, entry=d.entry, epoch=e,
                                                          n_chars=len(item.text),
                                                          part_tokens=(len(p_ids), len(m_ids), len(s_ids))))
                                fim_counts["fim_copies"] += 1
                                fim_counts["spm_copies"] += int(sp.spm)
                                fim_counts["tokens_fim"] += len(arr)
                            fim_counts["documents_fim"] += 1
                            before["fim"] = records
                        n_index += 1
                    docs_w.write(table_line(before, after))
                    if snap_w is not None:
                        line = {"id": item.doc_id, "text": item.text}
                        kept = {c: item.fields[c] for c in columns if c in item.fields} if item.fields else {}
                        if kept:  # what the filters read, so a prepare from the snapshot filters alike
                            line["fields"] = kept
                        snap_w.write(_dumps(line) + "\n")
                if train_parts:
                    tok_f.write(np.concatenate(train_parts).tobytes())
                if valid_parts:
                    val_f.write(np.concatenate(valid_parts).tobytes())
                if rows:
                    index_parts.append(np.array(rows, dtype=DOCIDX_DTYPE))
                if fim_parts and fim_f is not None:
                    fim_f.write(np.concatenate(fim_parts).tobytes())
                batch, texts = [], []

            n = 0
            items = iter_piece(src, spec.piece, max_document_chars=spec.max_document_chars,
                               min_document_chars=spec.min_document_chars, columns=columns)
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
                    u_part = unit_hash(seed, "part", src.name, item.doc_id)
                    u_sample = unit_hash(seed, "sample", src.name, item.doc_id)
                    decision = None
                    if mixer.active and not is_valid:
                        decision = mixer.decide(item.doc_id, item.text, item.fields, u_part, u_sample)
                    batch.append(("doc", num, item, (is_valid, decision, u_part, u_sample)))
                    if decision is None or decision.plain:
                        texts.append(item.text)
                    if decision is not None:
                        for _, _, sp in decision.fim:
                            texts.extend(split_text(item.text, sp))
                if len(batch) >= spec.docs_per_batch:
                    flush()
            flush()
            counts["documents_in"] = n
        finally:
            tok_f.close()
            val_f.close()
            if fim_f is not None:
                fim_f.close()
            docs_w.close()
            if snap_w is not None:
                snap_w.close()
        index = np.concatenate(index_parts) if index_parts else np.zeros(0, DOCIDX_DTYPE)
        np.save(tmp / "index.npy", index, allow_pickle=False)
        fim = np.array(fim_rows, dtype=FIMIDX_DTYPE)
        if mixer.active:
            np.save(tmp / "fim.npy", fim, allow_pickle=False)
        unused = int((~used(index, spec.draws)).sum())
        filtered_unused = sum(mixer.filtered_unused.values())
        summary = {
            "piece": spec.piece.describe(),
            "fingerprint": spec.piece.identity()["fingerprint"],
            **counts,
            "rejected": dict(sorted(rejected.items())),
            "names": names,
            "valid_tokens": counts["tokens_valid"],
            "epochs": epochs(index, fim, spec.draws),
            "not_selected": unused - filtered_unused,
        }
        if mixer.compiled:
            summary["filtered"] = {k: dict(sorted(v.items())) for k, v in sorted(mixer.filtered.items())}
            summary["filtered_unused"] = dict(sorted(mixer.filtered_unused.items()))
        if any(d.fim_rate > 0 for d in spec.draws):
            summary["fim"] = {k: int(fim_counts[k]) for k in ("documents_fim", "fim_copies", "spm_copies",
                                                                "tokens_fim")}
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


def load_fim_output(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(FIM copies, FIMIDX_DTYPE; their tokens' raw bytes, uint8) of a finished map task; empty
    arrays when the source has no FIM-transformed copies."""
    path = folder / "fim.npy"
    if not path.is_file():
        return np.zeros(0, FIMIDX_DTYPE), np.zeros(0, np.uint8)
    fim = np.load(path, allow_pickle=False)
    blob = folder / FIM_TOKENS
    return fim, (read_zstd(blob) if blob.is_file() else np.zeros(0, np.uint8))


def load_map_output(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(document index, training tokens' raw bytes as uint8 -- the caller knows the dtype) of a
    finished map task."""
    index = np.load(folder / "index.npy", allow_pickle=False)
    return index, read_zstd(folder / TOKENS)
