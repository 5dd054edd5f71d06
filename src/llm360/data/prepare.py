"""`llm360 prepare`: raw sources -> globally permuted, fully accounted data chunks.

The pipeline, in the order it runs:

1. **Tokenizer.** Train a byte-level BPE on the training documents (or load the user's).
2. **Read + tokenize.** Stream every source in config order. Each item a reader meets gets a
   number ``n`` within its source and a line in ``data/documents/<source>.jsonl.gz``: used for
   training, held out for validation (chosen by a seeded hash of its id), or rejected with a
   reason. Training token ids go to a per-source scratch file on disk; only a small per-document
   index stays in memory.
3. **Mix.** Per stage, each mix entry picks documents by hash (``part``) and repeats or sub-samples
   them (``weight``). Training documents no stage picks are rejected as ``not_selected_by_mix``.
4. **Pack.** Each stage's documents, each followed by EOS, are concatenated and cut into rows of
   ``seq_len + 1`` tokens (a scratch memmap), recording which document spans each row holds.
5. **Permute and chunk.** A seeded permutation orders the stage's rows; they are split into the
   stage's number of equal chunks (``chunk_000.npy`` ...) with their provenance.
6. **Manifest.** Counts, hashes and every file's sha256, written last.

Everything is built in a hidden folder beside ``data/`` and renamed to ``data/`` at the end
(:func:`llm360.rundir.atomic.staged`, :func:`~llm360.rundir.atomic.install`), so a run directory
never holds a half-written data set; what a killed prepare left is deleted, or renamed back, by
the next one (:func:`~llm360.rundir.atomic.clean_leftovers`). The result depends only on the
config: not on the number of workers or on anything else about the machine it ran on.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import platform
import struct
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llm360 import __version__
from llm360.config import DataConfig, RunConfig, SourceConfig, StageConfig, to_yaml
from llm360.data.documents import Document, Rejected, TokenRow, content_hash
from llm360.data.tokenizer import (
    TextTokenizer,
    from_serialized,
    load_tokenizer_file,
    train_bpe,
    worker_env_single_thread,
)
from llm360.errors import DataError, RunDirError
from llm360.log import progress
from llm360.rundir.atomic import (
    atomic_write_text,
    clean_leftovers,
    fsync_tree,
    hold_lock,
    install,
    staged,
    write_json,
)
from llm360.rundir.data import MANIFEST_VERSION, PROVENANCE_DTYPE
from llm360.rundir.layout import RunDir, chunk_file, index_name, provenance_file
from llm360.utils import read_json, sha256_file

logger = logging.getLogger(__name__)

# Per training document: where its tokens are in the scratch file, and its two seeded draws.
_DOCIDX_DTYPE = np.dtype(
    [
        ("doc", "<u8"),
        ("offset", "<i8"),
        ("ntok", "<i8"),
        ("name", "<u2"),
        ("u_part", "<f8"),
        ("u_sample", "<f8"),
    ]
)


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


# --------------------------------------------------------------------------- accounting


@dataclass
class SourceStats:
    kind: str
    files: list[str] = field(default_factory=list)
    doc_id_base: str | None = None
    documents_in: int = 0
    documents_train: int = 0
    documents_valid: int = 0
    documents_not_selected: int = 0
    rejected: Counter = field(default_factory=Counter)
    tokens_train: int = 0
    tokens_valid: int = 0
    valid_rows: int = 0
    tokens_dropped: Counter = field(default_factory=Counter)

    def to_json(self) -> dict:
        rejected = dict(self.rejected)
        if self.documents_not_selected:
            rejected["not_selected_by_mix"] = self.documents_not_selected
        used = self.documents_train - self.documents_not_selected + self.documents_valid
        return {
            "kind": self.kind,
            "files": self.files,
            "doc_id_base": self.doc_id_base,
            "documents_in": self.documents_in,
            "documents_used": used,
            "documents_used_train": self.documents_train - self.documents_not_selected,
            "documents_used_valid": self.documents_valid,
            "documents_rejected": dict(sorted(rejected.items())),
            "documents_rejected_total": sum(rejected.values()),
            "tokens_train_documents": self.tokens_train,
            "tokens_valid_documents": self.tokens_valid,
            "valid_rows": self.valid_rows,
            "tokens_dropped": dict(sorted(self.tokens_dropped.items())),
        }


# ------------------------------------------------------------------------ tokenize workers

_WORKER_TOK: TextTokenizer | None = None


def _worker_init(kind: str, blob: bytes, eos_token: str) -> None:
    global _WORKER_TOK
    worker_env_single_thread()
    _WORKER_TOK = from_serialized(kind, blob, eos_token)


def _encode_flat(tok: TextTokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    ids = tok.encode_batch(texts)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.concatenate([np.asarray(x, dtype=np.uint32) for x in ids]) if ids else np.zeros(0, np.uint32)
    return flat, lengths


def _worker_encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert _WORKER_TOK is not None
    return _encode_flat(_WORKER_TOK, texts)


class _Encoder:
    """Encodes batches in order, in-process (workers=1) or in a process pool, with bounded lookahead."""

    def __init__(self, tok: TextTokenizer, workers: int) -> None:
        self.tok = tok
        self.workers = workers
        self.pool = None
        self.thread = None
        if workers == 1:
            # one encoding thread: `tokenizers` releases the GIL (and uses every core) while it
            # encodes, so reading and hashing the next batch overlaps with encoding this one
            from concurrent.futures import ThreadPoolExecutor

            self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm360-encode")
        if workers > 1:
            import multiprocessing as mp

            kind, blob = tok.serialized()
            ctx = mp.get_context("spawn")
            self.pool = ctx.Pool(workers, initializer=_worker_init, initargs=(kind, blob, tok.eos_token))

    def submit(self, texts: list[str]) -> Any:
        if self.thread is not None:
            return self.thread.submit(_encode_flat, self.tok, texts)
        return self.pool.apply_async(_worker_encode, (texts,))

    def result(self, handle: Any) -> tuple[np.ndarray, np.ndarray]:
        return handle.result() if self.thread is not None else handle.get()

    @property
    def max_pending(self) -> int:
        return 2 if self.thread is not None else 2 * self.workers

    def close(self) -> None:
        if self.thread is not None:
            self.thread.shutdown(wait=True)
            self.thread = None
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
            self.pool = None

    def terminate(self) -> None:
        if self.thread is not None:
            self.thread.shutdown(wait=True, cancel_futures=True)
            self.thread = None
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


# -------------------------------------------------------------------------------- writers


def _gzip_text_writer(path: Path) -> io.TextIOWrapper:
    """A gzip writer with a fixed header (mtime 0, no name) so equal content gives equal bytes."""
    raw = open(path, "wb")  # noqa: SIM115 - closed through the wrapper
    gz = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6)
    wrapper = io.TextIOWrapper(gz, encoding="utf-8", newline="\n")
    wrapper._llm360_raw = raw  # type: ignore[attr-defined]
    return wrapper


def _close_gzip(w: io.TextIOWrapper) -> None:
    w.close()
    w._llm360_raw.close()  # type: ignore[attr-defined]


def _jsonl(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":")) + "\n"


# ------------------------------------------------------------------------------ the stage


@dataclass
class _SourceData:
    """What pass 2 leaves for one source: scratch token file and per-document index."""

    cfg: SourceConfig
    table: int
    tokens_path: Path
    index_path: Path
    valid_path: Path
    n_train: int = 0

    def index(self) -> np.ndarray:
        if self.n_train == 0:
            return np.zeros(0, dtype=_DOCIDX_DTYPE)
        return np.memmap(self.index_path, dtype=_DOCIDX_DTYPE, mode="r", shape=(self.n_train,))

    def tokens(self, dtype: np.dtype) -> np.ndarray:
        size = self.tokens_path.stat().st_size // dtype.itemsize
        if size == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(self.tokens_path, dtype=dtype, mode="r", shape=(size,))


class Preparer:
    """Builds one data directory from a config. Use :func:`prepare`."""

    def __init__(self, cfg: RunConfig, run_dir: Path, workers: int = 1) -> None:
        self.cfg = cfg
        self.data_cfg = cfg.data
        self.run = RunDir(run_dir)
        self.workers = max(1, int(workers))
        self.L = self.data_cfg.seq_len + 1
        self.stats: dict[str, SourceStats] = {}
        self.source_names: list[str] = [s.name for s in self.data_cfg.sources]
        self.name_ids = {n: i for i, n in enumerate(self.source_names)}

    # ---- driver -------------------------------------------------------------------------
    def build(self) -> dict:
        """Build the data set in a hidden folder beside ``data/`` and rename it in (see the module docstring).

        The scratch files (per-source tokens, packed stages) live in a hidden work folder that is
        deleted however the build ends; what a killed build leaves is cleaned by :func:`prepare`.
        """
        final = self.run.data
        with staged(final) as tmp, staged(final, "work") as work:
            manifest = self._build_into(tmp, work)
            fsync_tree(tmp)
            install(tmp, final)
        return manifest

    def _build_into(self, out: Path, work: Path) -> dict:
        tok, tok_origin = self._tokenizer()
        vocab = tok.vocab_size if tok is not None else self.data_cfg.tokenizer.vocab_size
        self.dtype = token_dtype(self.data_cfg, vocab)
        self.vocab_size = vocab
        self.eos_id = tok.eos_id if tok is not None else None
        tok_hash = None
        if tok is not None:
            tok_hash = tok.save(out / "tokenizer", tok_origin)

        (out / "documents").mkdir()
        (out / "valid").mkdir()
        sources: list[_SourceData] = []
        encoder = _Encoder(tok, self.workers) if tok is not None else None
        try:
            for t, src in enumerate(self.data_cfg.sources):
                sources.append(self._read_source(src, t, tok, encoder, out, work))
            if encoder is not None:
                encoder.close()
        except BaseException:
            if encoder is not None:
                encoder.terminate()
            raise

        for sd in sources:
            self._write_valid(sd, out)
        vf = self.data_cfg.valid_fraction
        for name, st in self.stats.items():
            if vf > 0 and st.valid_rows == 0 and st.documents_train:
                logger.warning(
                    "source '%s': valid_fraction = %g held out %d of its %d documents (%d tokens), less "
                    "than one %d-token row: it has no validation rows and held-out perplexity leaves it "
                    "out; raise data.valid_fraction for a corpus this small",
                    name, vf, st.documents_valid, st.documents_valid + st.documents_train, st.tokens_valid,
                    self.L,
                )  # fmt: skip

        stages_json, chunks_json = [], []
        used_masks = {sd.cfg.name: np.zeros(sd.n_train, dtype=bool) for sd in sources}
        chunk_base = 0
        by_name = {sd.cfg.name: sd for sd in sources}
        for si, stage in enumerate(self.data_cfg.resolved_stages()):
            st_json, ch_json = self._build_stage(si, stage, by_name, used_masks, chunk_base, out, work)
            stages_json.append(st_json)
            chunks_json.extend(ch_json)
            chunk_base += stage.chunks
        for name, mask in used_masks.items():
            self.stats[name].documents_not_selected = int((~mask).sum())
        for name, st in self.stats.items():
            if st.documents_in == 0:
                logger.warning("source '%s' yielded no documents (files: %s)", name, st.files or "none")

        return self._write_manifest(out, tok_hash, stages_json, chunks_json)

    # ---- tokenizer ---------------------------------------------------------------------
    def _tokenizer(self) -> tuple[TextTokenizer | None, dict]:
        tcfg = self.data_cfg.tokenizer
        if tcfg.kind == "none":
            if any(s.kind != "llm360" for s in self.data_cfg.sources):
                raise DataError(
                    "data.tokenizer.kind = none only works when every source is pre-tokenized "
                    "(kind: llm360); set data.tokenizer.kind to train or file"
                )
            return None, {}
        if tcfg.kind == "file":
            if not tcfg.path:
                raise DataError(
                    "data.tokenizer.kind = file needs data.tokenizer.path "
                    "(a tokenizer.json, a Hugging Face tokenizer folder or a SentencePiece .model); "
                    "e.g. --set data.tokenizer.path=/models/llama/tokenizer.model"
                )
            return load_tokenizer_file(tcfg.path, tcfg.eos_token)
        text_sources = [s for s in self.data_cfg.sources if s.kind != "llm360"]
        if not text_sources:
            raise DataError("cannot train a tokenizer: every source is pre-tokenized; use tokenizer kind file or none")
        per_source = max(1, tcfg.train_max_chars // len(text_sources))
        with progress("training tokenizer", total=tcfg.train_max_chars, unit="chars") as bar:

            def texts() -> Iterator[str]:
                for src in text_sources:
                    used = 0
                    for item in self._iter(src):
                        if not isinstance(item, Document) or self._is_valid(src, item.doc_id):
                            continue
                        yield item.text
                        used += len(item.text)
                        bar.advance(len(item.text))
                        if used >= per_source:
                            break

            tok, origin = train_bpe(texts(), tcfg)
        origin["train_chars_per_source_max"] = per_source
        logger.info("trained a byte-level BPE tokenizer with %d tokens", tok.vocab_size)
        return tok, origin

    def _iter(self, src: SourceConfig) -> Iterator[Document | TokenRow | Rejected]:
        from llm360.data.sources import iter_source

        return iter_source(
            src,
            max_document_chars=self.data_cfg.max_document_chars,
            min_document_chars=self.data_cfg.min_document_chars,
        )

    def _is_valid(self, src: SourceConfig, doc_id: str) -> bool:
        vf = self.data_cfg.valid_fraction
        return vf > 0 and unit_hash(self.data_cfg.seed, "valid", src.name, doc_id) < vf

    # ---- pass 2: read, tokenize, account ---------------------------------------------
    def _read_source(
        self,
        src: SourceConfig,
        table: int,
        tok: TextTokenizer | None,
        encoder: _Encoder | None,
        out: Path,
        work: Path,
    ) -> _SourceData:
        from llm360.data.sources import doc_id_base, list_source_files

        stats = SourceStats(kind=src.kind)
        self.stats[src.name] = stats
        if src.kind != "embedded":
            stats.files = [str(p) for p in list_source_files(src)]
            stats.doc_id_base = str(doc_id_base(src))
        sd = _SourceData(
            cfg=src,
            table=table,
            tokens_path=work / f"{table:03d}.tokens.bin",
            index_path=work / f"{table:03d}.index.bin",
            valid_path=work / f"{table:03d}.valid.bin",
        )
        seed = self.data_cfg.seed
        tok_f = open(sd.tokens_path, "wb")  # noqa: SIM115
        idx_f = open(sd.index_path, "wb")  # noqa: SIM115
        val_f = open(sd.valid_path, "wb")  # noqa: SIM115
        table_w = _gzip_text_writer(out / "documents" / f"{src.name}.jsonl.gz")
        snap_w = None
        if src.snapshot:
            (out / "sources").mkdir(exist_ok=True)
            snap_w = _gzip_text_writer(out / "sources" / f"{src.name}.jsonl.gz")
        offset = 0
        n = 0
        pending: deque = deque()  # (items, handle) in order
        batch: list = []
        batch_texts: list[str] = []

        def finish(items: list, handle: Any) -> None:
            nonlocal offset
            flat, lengths = encoder.result(handle) if handle is not None else (None, None)
            pos = 0
            k = 0
            idx_rows = []
            for item in items:
                kind, num = item[0], item[1]
                if kind == "rejected":
                    rej: Rejected = item[2]
                    stats.rejected[rej.reason] += 1
                    rec = {"n": num, "id": rej.doc_id, "status": "rejected", "reason": rej.reason}
                    if rej.detail:
                        rec["detail"] = rej.detail[:500]
                    table_w.write(_jsonl(rec))
                    if snap_w is not None:
                        snap_w.write(_jsonl({"id": rej.doc_id, "rejected": rej.reason, "detail": rej.detail[:500]}))
                    continue
                if kind == "row":
                    row: TokenRow = item[2]
                    ids = np.asarray(row.token_ids, dtype=np.int64)
                    tok_f.write(ids.astype(self.dtype).tobytes())
                    name = self._name_id(row.row_source)
                    idx_rows.append(
                        (num, offset, len(ids), name,
                         unit_hash(seed, "part", src.name, row.doc_id),
                         unit_hash(seed, "sample", src.name, row.doc_id))
                    )
                    offset += len(ids)
                    stats.documents_train += 1
                    stats.tokens_train += len(ids)
                    table_w.write(_jsonl({"n": num, "id": row.doc_id, "status": "train", "tokens": len(ids),
                                          "row_source": row.row_source}))
                    continue
                doc: Document = item[2]
                is_valid = item[3]
                ntok = int(lengths[k])
                ids = flat[pos : pos + ntok]
                pos += ntok
                k += 1
                toks = np.empty(ntok + 1, dtype=self.dtype)
                toks[:ntok] = ids
                toks[ntok] = self.eos_id
                rec = {"n": num, "id": doc.doc_id, "sha256_16": content_hash(doc.text), "tokens": ntok + 1}
                if is_valid:
                    val_f.write(toks.tobytes())
                    stats.documents_valid += 1
                    stats.tokens_valid += ntok + 1
                    rec["status"] = "valid"
                else:
                    tok_f.write(toks.tobytes())
                    idx_rows.append(
                        (num, offset, ntok + 1, table,
                         unit_hash(seed, "part", src.name, doc.doc_id),
                         unit_hash(seed, "sample", src.name, doc.doc_id))
                    )
                    offset += ntok + 1
                    stats.documents_train += 1
                    stats.tokens_train += ntok + 1
                    rec["status"] = "train"
                table_w.write(_jsonl(rec))
                if snap_w is not None:
                    snap_w.write(_jsonl({"id": doc.doc_id, "text": doc.text}))
            if idx_rows:
                idx_f.write(np.array(idx_rows, dtype=_DOCIDX_DTYPE).tobytes())
                sd.n_train += len(idx_rows)

        def flush() -> None:
            nonlocal batch, batch_texts
            if not batch:
                return
            handle = encoder.submit(batch_texts) if (batch_texts and encoder is not None) else None
            pending.append((batch, handle))
            batch, batch_texts = [], []
            limit = encoder.max_pending if encoder is not None else 1
            while len(pending) >= limit:
                finish(*pending.popleft())

        try:
            with progress(f"reading {src.name}", unit="docs") as bar:
                for item in self._iter(src):
                    num = n
                    n += 1
                    bar.advance(1)
                    if isinstance(item, Rejected):
                        batch.append(("rejected", num, item))
                    elif isinstance(item, TokenRow):
                        bad = self._check_row(item)
                        if bad is not None:
                            batch.append(("rejected", num, bad))
                        else:
                            batch.append(("row", num, item))
                    else:
                        if tok is None:
                            raise DataError(f"source '{src.name}' has text but no tokenizer is configured")
                        batch.append(("doc", num, item, self._is_valid(src, item.doc_id)))
                        batch_texts.append(item.text)
                    if len(batch) >= self.data_cfg.docs_per_batch:
                        flush()
                flush()
                while pending:
                    finish(*pending.popleft())
        finally:
            tok_f.close()
            idx_f.close()
            val_f.close()
            _close_gzip(table_w)
            if snap_w is not None:
                _close_gzip(snap_w)
        stats.documents_in = n
        return sd

    def _name_id(self, name: str) -> int:
        if name not in self.name_ids:
            self.name_ids[name] = len(self.source_names)
            self.source_names.append(name)
        return self.name_ids[name]

    def _check_row(self, row: TokenRow) -> Rejected | None:
        ids = row.token_ids
        if len(ids) != self.L:
            return Rejected(row.source, row.doc_id, "wrong_row_length",
                            f"{len(ids)} token ids, expected seq_len + 1 = {self.L}")
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= self.vocab_size:
            return Rejected(row.source, row.doc_id, "token_id_out_of_range",
                            f"ids in [{lo}, {hi}], vocabulary has {self.vocab_size}")
        return None

    # ---- validation split ------------------------------------------------------------
    def _write_valid(self, sd: _SourceData, out: Path) -> None:
        stats = self.stats[sd.cfg.name]
        size = sd.valid_path.stat().st_size // self.dtype.itemsize
        rows = size // self.L
        if rows == 0:
            if size:
                stats.tokens_dropped["valid_partial_row"] += size
            return
        toks = np.memmap(sd.valid_path, dtype=self.dtype, mode="r", shape=(size,))
        arr = np.lib.format.open_memmap(out / "valid" / f"{sd.cfg.name}.npy", mode="w+",
                                        dtype=self.dtype, shape=(rows, self.L))
        arr[:] = toks[: rows * self.L].reshape(rows, self.L)
        arr.flush()
        del arr, toks
        stats.valid_rows = rows
        if size - rows * self.L:
            stats.tokens_dropped["valid_partial_row"] += size - rows * self.L

    # ---- stages ----------------------------------------------------------------------
    def _build_stage(
        self,
        si: int,
        stage: StageConfig,
        by_name: dict[str, _SourceData],
        used_masks: dict[str, np.ndarray],
        chunk_base: int,
        out: Path,
        work: Path,
    ) -> tuple[dict, list[dict]]:
        L = self.L
        kinds = {by_name[m.source].cfg.kind == "llm360" for m in stage.mix}
        if len(kinds) > 1:
            raise DataError(
                f"stage '{stage.name}' mixes pre-tokenized (llm360) and text sources; "
                "put them in separate stages"
            )
        # Which documents, how many times: one list of (source data, doc positions) per epoch pass.
        plan: list[tuple[_SourceData, np.ndarray]] = []
        mix_json = []
        for m in stage.mix:
            sd = by_name[m.source]
            idx = sd.index()
            in_part = (idx["u_part"] >= m.part[0]) & (idx["u_part"] < m.part[1])
            whole, frac = int(np.floor(m.weight)), m.weight - np.floor(m.weight)
            copies = np.where(in_part, whole + (idx["u_sample"] < frac).astype(np.int64), 0)
            used_masks[m.source] |= copies > 0
            for e in range(int(copies.max()) if copies.size else 0):
                plan.append((sd, np.nonzero(copies > e)[0]))
            mix_json.append({
                "source": m.source, "weight": m.weight, "part": list(m.part),
                "documents": int((copies > 0).sum()), "document_copies": int(copies.sum()),
                "tokens": int((copies * idx["ntok"]).sum()) if copies.size else 0,
            })
        total = sum(int(sd.index()["ntok"][pos].sum()) for sd, pos in plan)
        n_rows = total // L
        if n_rows < stage.chunks:
            raise DataError(
                f"stage '{stage.name}' has {total} tokens, {n_rows} rows of seq_len + 1 = {L} tokens: "
                f"too few for its {stage.chunks} chunks. Add data, lower data.seq_len or the stage's chunks."
            )
        stage_path = work / f"stage_{si:03d}.bin"
        seg_path = work / f"stage_{si:03d}.seg.bin"
        rows_mm = np.memmap(stage_path, dtype=self.dtype, mode="w+", shape=(n_rows, L))
        flat = rows_mm.reshape(-1)
        cap = n_rows * L
        pos = 0
        n_seg = 0
        with open(seg_path, "wb") as seg_f, progress(f"packing {stage.name}", total=total, unit="tokens") as bar:
            for sd, docs in plan:
                idx = sd.index()
                toks = sd.tokens(self.dtype)
                for b in range(0, len(docs), 8192):
                    sel = idx[docs[b : b + 8192]]
                    pieces = [toks[o : o + n] for o, n in zip(sel["offset"], sel["ntok"], strict=True)]
                    block = np.concatenate(pieces) if pieces else np.zeros(0, self.dtype)
                    starts = pos + np.concatenate([[0], np.cumsum(sel["ntok"])[:-1]])
                    ends = starts + sel["ntok"]
                    keep = min(block.size, max(0, cap - pos))
                    flat[pos : pos + keep] = block[:keep]
                    dropped = np.clip(ends - np.maximum(starts, cap), 0, None)
                    if dropped.any():
                        for name_id, d in zip(sel["name"], dropped, strict=True):
                            if d:
                                self.stats_for_name(int(name_id)).tokens_dropped["partial_last_row"] += int(d)
                    segs = _segments(starts, np.minimum(ends, cap), sel, sd.table, L)
                    seg_f.write(segs.tobytes())
                    n_seg += len(segs)
                    pos += block.size
                    bar.advance(block.size)
        rows_mm.flush()
        segs_mm = (np.memmap(seg_path, dtype=PROVENANCE_DTYPE, mode="r", shape=(n_seg,))
                   if n_seg else np.zeros(0, PROVENANCE_DTYPE))
        seg_row = segs_mm["row"]
        row_start = np.searchsorted(seg_row, np.arange(n_rows + 1), side="left")

        if stage.shuffle:
            perm = np.random.default_rng([self.data_cfg.seed, si]).permutation(n_rows)
        else:
            perm = np.arange(n_rows)
        per_chunk = n_rows // stage.chunks
        tail = perm[per_chunk * stage.chunks :]
        if tail.size:
            self._account_rows(segs_mm, row_start, tail, "uneven_chunk_split")

        chunks = []
        with progress(f"writing {stage.name} chunks", total=stage.chunks, unit="chunks") as bar:
            for c in range(stage.chunks):
                rows = perm[c * per_chunk : (c + 1) * per_chunk]
                ci = chunk_base + c
                chunks.append(self._write_chunk(ci, stage.name, rows, rows_mm, segs_mm, row_start, out))
                bar.advance(1)
        del rows_mm, segs_mm
        stage_json = {
            "name": stage.name,
            "index": si,
            "shuffle": stage.shuffle,
            "first_chunk": chunk_base,
            "chunks": stage.chunks,
            "rows": int(per_chunk * stage.chunks),
            "rows_per_chunk": int(per_chunk),
            "rows_packed": int(n_rows),
            "rows_dropped_uneven_split": int(tail.size),
            "tokens_packed": int(total),
            "tokens_dropped_partial_last_row": int(total - cap),
            "mix": mix_json,
        }
        return stage_json, chunks

    def stats_for_name(self, name_id: int) -> SourceStats:
        name = self.source_names[name_id]
        if name not in self.stats:
            # a row_source name from pre-tokenized rows: account under a synthetic entry
            self.stats[name] = SourceStats(kind="llm360-row-source")
        return self.stats[name]

    def _account_rows(self, segs: np.ndarray, row_start: np.ndarray, rows: np.ndarray, reason: str) -> None:
        g = _gather_segments(segs, row_start, rows)
        for name_id, length in zip(g["source"], g["length"], strict=True):
            self.stats_for_name(int(name_id)).tokens_dropped[reason] += int(length)

    def _write_chunk(
        self, ci: int, stage: str, rows: np.ndarray, rows_mm: np.ndarray, segs: np.ndarray,
        row_start: np.ndarray, out: Path,
    ) -> dict:
        path = out / chunk_file(ci)
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=self.dtype, shape=(len(rows), self.L))
        block = max(1, (64 << 20) // (self.L * self.dtype.itemsize))
        for b in range(0, len(rows), block):
            sel = rows[b : b + block]
            order = np.argsort(sel, kind="stable")  # read the scratch file in order, write back permuted
            got = rows_mm[sel[order]]
            dst = np.empty_like(got)
            dst[order] = got
            arr[b : b + len(sel)] = dst
        arr.flush()
        del arr
        prov = _gather_segments(segs, row_start, rows)
        np.save(out / provenance_file(ci), prov, allow_pickle=False)
        tokens = np.bincount(prov["source"], weights=prov["length"], minlength=len(self.source_names))
        docs_per_source: dict[str, int] = {}
        for name_id in np.unique(prov["source"]):
            docs_per_source[self.source_names[int(name_id)]] = int(
                (prov["source"] == name_id).sum())
        return {
            "index": ci,
            "name": index_name(ci),
            "stage": stage,
            "file": chunk_file(ci),
            "provenance": provenance_file(ci),
            "rows": int(len(rows)),
            "tokens": int(len(rows) * self.L),
            "tokens_per_source": {
                self.source_names[i]: int(t) for i, t in enumerate(tokens) if t
            },
            "document_spans_per_source": docs_per_source,
        }

    # ---- manifest --------------------------------------------------------------------
    def _write_manifest(self, out: Path, tok_hash: str | None, stages: list, chunks: list) -> dict:
        files = {}
        for p in sorted(out.rglob("*")):
            if p.is_file():
                rel = p.relative_to(out).as_posix()
                files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for ch in chunks:
            ch["sha256"] = files[ch["file"]]["sha256"]
            ch["provenance_sha256"] = files[ch["provenance"]]["sha256"]
        sources_json = {name: st.to_json() for name, st in self.stats.items()
                        if name in {s.name for s in self.data_cfg.sources}}
        for name, st in sources_json.items():
            if st["documents_in"] != st["documents_used"] + st["documents_rejected_total"]:
                raise AssertionError(f"document accounting broken for {name}: {st}")
        row_sources = {name: st.to_json()["tokens_dropped"] for name, st in self.stats.items()
                       if name not in sources_json}
        manifest = {
            "format": "llm360-data",
            "version": MANIFEST_VERSION,
            "config_hash": self.cfg.data_hash(),
            "data_config": self.data_cfg.model_dump(mode="json"),
            "seq_len": self.data_cfg.seq_len,
            "row_length": self.L,
            "seed": self.data_cfg.seed,
            "token_dtype": self.dtype.name,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "tokenizer_sha256": tok_hash,
            "versions": _versions(),
            "source_names": self.source_names,
            "sources": sources_json,
            "row_sources_dropped_tokens": row_sources,
            "stages": stages,
            "chunks": chunks,
            "num_chunks": len(chunks),
            "total_rows": sum(c["rows"] for c in chunks),
            "total_tokens": sum(c["tokens"] for c in chunks),
            "valid": {name: {"file": f"valid/{name}.npy", "rows": st.valid_rows}
                      for name, st in self.stats.items() if st.valid_rows},
            "provenance_dtype": [[n, PROVENANCE_DTYPE[n].str] for n in PROVENANCE_DTYPE.names],
            "files": files,
        }
        write_json(out / "manifest.json", manifest)
        return manifest


def _segments(starts: np.ndarray, ends: np.ndarray, sel: np.ndarray, table: int, L: int) -> np.ndarray:
    """Split document spans [start, end) of the packed stream at row boundaries."""
    live = ends > starts
    starts, ends, sel = starts[live], ends[live], sel[live]
    first = starts // L
    last = (ends - 1) // L
    counts = last - first + 1
    if counts.size == 0:
        return np.zeros(0, PROVENANCE_DTYPE)
    rep = np.repeat(np.arange(len(starts)), counts)
    k = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    row = first[rep] + k
    seg_lo = np.maximum(starts[rep], row * L)
    seg_hi = np.minimum(ends[rep], (row + 1) * L)
    out = np.empty(len(rep), PROVENANCE_DTYPE)
    out["row"] = row
    out["row_offset"] = seg_lo - row * L
    out["length"] = seg_hi - seg_lo
    out["source"] = sel["name"][rep]
    out["table"] = table
    out["doc"] = sel["doc"][rep]
    out["doc_offset"] = seg_lo - starts[rep]
    return out


def _gather_segments(segs: np.ndarray, row_start: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The provenance records of the given stage rows, renumbered 0..len(rows)-1 in that order."""
    lo = row_start[rows]
    counts = row_start[rows + 1] - lo
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, PROVENANCE_DTYPE)
    idx = np.repeat(lo - (np.cumsum(counts) - counts), counts) + np.arange(total)
    out = np.asarray(segs[idx]).copy()
    out["row"] = np.repeat(np.arange(len(rows)), counts)
    return out


def _versions() -> dict:
    import tokenizers

    return {
        "llm360": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "tokenizers": tokenizers.__version__,
    }


# ------------------------------------------------------------------------------- front door


@dataclass
class PrepareResult:
    manifest: dict
    built: bool
    """False when the data directory was already complete for this config."""


def data_status(run_dir: Path, cfg: RunConfig) -> str:
    """'missing', 'complete' (same config, files present) or 'different' (another data set)."""
    rd = RunDir(run_dir)
    if not rd.manifest.is_file():
        return "missing"
    try:
        manifest = read_json(rd.manifest)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return "different"
    if manifest.get("config_hash") != cfg.data_hash():
        return "different"
    for rel, meta in manifest.get("files", {}).items():
        p = rd.data / rel
        if not p.is_file() or p.stat().st_size != meta["bytes"]:
            return "different"
    return "complete"


def prepare(cfg: RunConfig, run_dir: str | Path, *, workers: int = 1, force: bool = False) -> PrepareResult:
    """Prepare the data of cfg into run_dir/data; a no-op when it is already there.

    Raises RunDirError if run_dir already holds a different data set (unless force and no
    checkpoints were trained on it), DataError for bad inputs.
    """
    run_dir = Path(run_dir)
    rd = RunDir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = hold_lock(rd.lock, "being prepared")  # a concurrent prepare or train would clash here
    try:
        return _prepare_locked(cfg, rd, workers=workers, force=force)
    finally:
        lock.close()


def _prepare_locked(cfg: RunConfig, rd: RunDir, *, workers: int, force: bool) -> PrepareResult:
    run_dir = rd.root
    # What a killed prepare left: its unfinished build and scratch are deleted, and a data/ it had
    # moved aside to rename a rebuild in is renamed back, so the data set is never lost.
    clean_leftovers(run_dir, only=rd.data.name)
    status = data_status(run_dir, cfg)
    if status == "complete":
        logger.info("data in %s is complete for this config (hash %s): nothing to do",
                    rd.data, cfg.data_hash()[:12])
        atomic_write_text(rd.config, to_yaml(cfg))
        return PrepareResult(read_json(rd.manifest), built=False)
    if status == "different" or (rd.data.exists() and any(rd.data.iterdir())):
        have = "unreadable"
        if rd.manifest.is_file():
            try:
                have = str(read_json(rd.manifest).get("config_hash", "?"))[:12]
            except (json.JSONDecodeError, OSError):
                pass
        if not force:
            raise RunDirError(
                f"{rd.data} already holds a different data set (config hash {have}, this config "
                f"{cfg.data_hash()[:12]}), or files in it were changed. Use a new --run-dir, or "
                "--force to rebuild it."
            )
        if rd.checkpoints.exists() and any(rd.checkpoints.iterdir()):
            raise RunDirError(
                f"refusing to rebuild {rd.data}: {rd.checkpoints} holds checkpoints trained on it. "
                "Use a new --run-dir."
            )
        logger.warning("--force: rebuilding %s", rd.data)
    manifest = Preparer(cfg, run_dir, workers=workers).build()
    atomic_write_text(rd.config, to_yaml(cfg))
    logger.info(
        "prepared %d chunks, %d rows, %d tokens into %s",
        manifest["num_chunks"], manifest["total_rows"], manifest["total_tokens"], rd.data,
    )
    return PrepareResult(manifest, built=True)
