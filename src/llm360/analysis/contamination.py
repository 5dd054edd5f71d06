"""How much of each evaluation set is in the training data: n-gram overlap in token space.

Definitions. Both sides are token ids of the run's own tokenizer; an *n-gram* is n consecutive
tokens (default 13, the length GPT-3 and lm-eval's decontamination use); on the training side only
n-grams inside one training row count, since a row is what the model saw at once.

* An example is **contaminated** when at least one of its n-grams occurs in the training data
  (the GPT-3 / lm-eval definition): ``contaminated_share``.
* **Token-level contamination** (Llama 2 paper, Touvron et al. 2023, arXiv:2307.09288, appendix
  A.6 "Dataset contamination"): a token of an example is contaminated when it lies in any of the
  example's n-grams that occurs in the training data; an example's contamination is its
  contaminated tokens / its tokens. The paper's four subsets, whose thresholds are used here:
  **clean** below 20%, **not clean** 20% or more, **not dirty** below 80%, **dirty** 80% or more
  (clean lies within not dirty, dirty within not clean). Differences from the paper: it matched
  with a suffix array on any n-gram longer than 10 tokens with a skip-gram budget of 4 tokens and
  a minimum length chosen per dataset; here n is one fixed, configurable length and matches are
  exact.

How it runs (the hashing, bitmap and lookup are :mod:`llm360.analysis.ngrams`; the evaluation sets
are read by :mod:`llm360.analysis.eval_sets`). The evaluation side is small: all its n-grams are
hashed (a polynomial hash of the n token ids mod 2^64), sorted and summarised in a bitmap of the
hashes' top bits. The training chunks are cut into blocks of rows that worker processes scan (one
process per core): every n-gram hash of a block is computed at once with numpy (log2(n) shifted
multiply-adds), the bitmap discards nearly all of them, a bucket probe of the sorted evaluation
hashes keeps the exact hash matches, and every match is then checked token by token, so a hash collision can never report
contamination that is not there. Memory is bounded by the evaluation side plus one block per
worker (``block_tokens``), never by the size of the training data.

Output: ``<run>/analysis/contamination/<task>.json`` per task. Chunk ``c`` is first trained into
checkpoint ``ckpt_c``, so the chunks that hold an example's n-grams say from which checkpoint on
the model has seen it; a chunk a guard skipped (``rollback_skip_chunk``, in the run's
:func:`~llm360.rundir.data.read_training_record`) holds data no checkpoint has seen. A task whose
result is there (same n, data, tokenizer, examples and skipped chunks) is not recomputed; one that
differs only in the chunks training has skipped since is recomputed; a task that cannot be read
(a JSONL line that does not parse, an lm-eval task whose data is not available offline) is
reported and the others still run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llm360.analysis import AnalysisError, AnalysisResult
from llm360.analysis.eval_sets import TaskDocs, load_tasks
from llm360.analysis.ngrams import (
    SortedHashes,
    bitmap_bits,
    bitmap_candidates,
    make_bitmap,
    ngram_hashes,
    row_blocks,
    same_tokens,
)
from llm360.config import ContaminationConfig
from llm360.errors import Llm360Error
from llm360.rundir.atomic import write_json
from llm360.rundir.layout import RunDir, ckpt_name
from llm360.utils import read_json

if TYPE_CHECKING:  # imported where used: scan workers import this module and need numpy only
    from llm360.executor import Executor
    from llm360.rundir.data import DataStore

logger = logging.getLogger(__name__)

FORMAT = "llm360-contamination"
VERSION = 1
CLEAN_BELOW = 0.2
"""Llama 2 (appendix A.6): an example with less than 20% contaminated tokens is clean."""
DIRTY_AT_LEAST = 0.8
"""Llama 2 (appendix A.6): an example with 80% or more contaminated tokens is dirty."""
_TOKENS_PER_WORKER = 16_000_000
"""Training tokens per worker process below which fewer processes are started."""


# ---------------------------------------------------------------------------- evaluation side


@dataclass
class EvalIndex:
    """Every n-gram of every example of every task, hashed, with the tokens to verify matches."""

    n: int
    task_names: list[str]
    tokens: np.ndarray
    """All examples' token ids, concatenated (int64)."""
    example_offsets: np.ndarray
    """(E + 1,) start of each example in ``tokens``."""
    example_task: np.ndarray
    """(E,) task index of each example."""
    ngram_start: np.ndarray
    """(G,) position in ``tokens`` of every n-gram (in example order)."""
    ngram_example: np.ndarray
    """(G,) example of every n-gram."""
    ngram_unique: np.ndarray
    """(G,) index of every n-gram's hash in ``hashes``."""
    hashes: np.ndarray
    """(U,) sorted distinct n-gram hashes (uint64)."""
    rep_start: np.ndarray
    """(U,) position in ``tokens`` of one n-gram with that hash: what a training match must equal."""
    unique_in_task: np.ndarray
    """(U, T) whether a task has an n-gram with that hash."""
    unique_order: np.ndarray
    """(G,) n-grams ordered by hash: those of hash u are ``unique_order[unique_ptr[u]:unique_ptr[u+1]]``."""
    unique_ptr: np.ndarray
    """(U + 1,) see unique_order."""

    @property
    def num_examples(self) -> int:
        return len(self.example_task)


def build_eval_index(tasks: dict[str, list[np.ndarray]], n: int) -> EvalIndex:
    """Index the n-grams of each task's examples (token id arrays); examples shorter than n have none."""
    names = list(tasks)
    lengths = [len(t) for name in names for t in tasks[name]]
    example_task = np.asarray([i for i, name in enumerate(names) for _ in tasks[name]], dtype=np.int32)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    parts = [np.asarray(t, dtype=np.int64) for name in names for t in tasks[name]]
    tokens = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    per = np.maximum(np.asarray(lengths, dtype=np.int64) - n + 1, 0)
    ngram_example = np.repeat(np.arange(len(lengths), dtype=np.int64), per)
    first = np.zeros(len(per) + 1, dtype=np.int64)
    np.cumsum(per, out=first[1:])
    ngram_start = offsets[ngram_example] + (np.arange(int(first[-1]), dtype=np.int64) - first[ngram_example])
    all_hashes = ngram_hashes(tokens, n)[ngram_start] if len(ngram_start) else np.zeros(0, np.uint64)
    hashes, rep, inverse = np.unique(all_hashes, return_index=True, return_inverse=True)
    unique_in_task = np.zeros((len(hashes), len(names)), dtype=bool)
    unique_in_task[inverse, example_task[ngram_example]] = True
    order = np.argsort(inverse, kind="stable")
    ptr = np.zeros(len(hashes) + 1, dtype=np.int64)
    np.cumsum(np.bincount(inverse, minlength=len(hashes)), out=ptr[1:])
    return EvalIndex(
        n=n, task_names=names, tokens=tokens, example_offsets=offsets, example_task=example_task,
        ngram_start=ngram_start, ngram_example=ngram_example, ngram_unique=inverse.astype(np.int64),
        hashes=hashes, rep_start=ngram_start[rep], unique_in_task=unique_in_task, unique_order=order,
        unique_ptr=ptr,
    )  # fmt: skip


# ------------------------------------------------------------------------------ training side

_W: dict[str, Any] = {}  # the scan state of this (worker) process, set by _init_worker


_STATE_ARRAYS = ("hashes", "bitmap", "tokens", "rep_start", "starts")


def _init_worker(state: dict[str, Any]) -> None:
    """Set this process's scan state; arrays named in ``state["files"]`` are memory-mapped from disk."""
    _W.clear()
    _W.update(state)
    for name, path in state.get("files", {}).items():
        _W[name] = np.load(path, mmap_mode="r", allow_pickle=False)


def scan_task(state: dict[str, Any], path: str, row_start: int, row_end: int) -> tuple[np.ndarray, ...]:
    """One block of the scan as an executor task (:func:`_scan_block`); the evaluation side, in .npy
    files every node sees, is memory-mapped once per worker process."""
    if _W.get("id") != state["id"]:
        _init_worker(state)
    return _scan_block(path, row_start, row_end)


def _scan_block(path: str, row_start: int, row_end: int) -> tuple[np.ndarray, ...]:
    """Hash-match rows [row_start, row_end) of one chunk file against the evaluation n-grams.

    Returns (unique ids found, occurrences of each, row and column of the first occurrence of each).
    """
    n, bits = _W["n"], _W["bits"]
    if "lookup" not in _W:
        if "starts" in _W:
            _W["lookup"] = SortedHashes(_W["hashes"], _W["starts"], _W["bucket_bits"])
        else:  # a state made by hand (tests)
            _W["lookup"] = SortedHashes.build(_W["hashes"])
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    L = arr.shape[1]
    flat = np.ascontiguousarray(arr[row_start:row_end]).reshape(-1)
    del arr
    h = ngram_hashes(flat, n, _W.setdefault("buffers", []))
    cand = bitmap_candidates(h, _W["bitmap"], bits, _W.setdefault("bitmap_buffers", []))  # ~3% of positions
    j = _W["lookup"].lookup(h[cand])
    keep = (j >= 0) & (cand % L <= L - n)  # an exact hash match inside one row
    cand, j = cand[keep], j[keep]
    if len(cand):  # token by token, so a hash collision never counts
        same = same_tokens(flat, cand, _W["tokens"], _W["rep_start"][j], n)
        cand, j = cand[same], j[same]
    found, first, counts = np.unique(j, return_index=True, return_counts=True)
    pos = cand[first]
    return found, counts, row_start + pos // L, pos % L


@dataclass
class ScanResult:
    """What the scan of the training chunks found, per distinct evaluation n-gram (U of them)."""

    count: np.ndarray
    """(U,) occurrences in training rows."""
    first_chunk: np.ndarray
    """(U,) first chunk holding it (-1: none)."""
    first_row: np.ndarray
    """(U,) row of its first occurrence in that chunk."""
    first_col: np.ndarray
    """(U,) position in that row."""
    chunk_examples: dict[int, np.ndarray] = field(default_factory=dict)
    """chunk -> examples with at least one n-gram in that chunk (only chunks with hits)."""
    chunk_task_hits: np.ndarray | None = None
    """(T, C) occurrences in chunk c of n-grams of task t."""
    tokens: int = 0
    """Training tokens scanned."""
    seconds: float = 0.0


def _work_items(store: DataStore, block_tokens: int) -> list[tuple[int, str, int, int]]:
    paths = [str(store.dir / store.manifest["chunks"][c]["file"]) for c in range(store.num_chunks)]
    return [(c, paths[c], s, e) for c, s, e in row_blocks(store.rows_per_chunk, store.row_length, block_tokens)]


def scan_training_data(
    store: DataStore, index: EvalIndex, *, workers: int | None = None, block_tokens: int = 4_194_304,
    executor: Executor | None = None, scratch: Path | None = None,
) -> ScanResult:
    """Find every evaluation n-gram in every chunk of a prepared data set (see the module docstring).

    ``workers`` processes (default: one per CPU core, but no more than one per 16 M training
    tokens; 1 runs in this process) each scan blocks of about ``block_tokens`` tokens. With an
    ``executor`` (a Ray cluster), each block is one of its tasks instead, and the evaluation side,
    built once, is shared through .npy files in ``scratch`` (a folder every node sees; removed
    after). The result does not depend on workers, executor or block size.
    """
    from llm360.log import progress

    t0 = time.perf_counter()
    U, T, C = len(index.hashes), len(index.task_names), store.num_chunks
    res = ScanResult(
        count=np.zeros(U, np.int64), first_chunk=np.full(U, -1, np.int64), first_row=np.zeros(U, np.int64),
        first_col=np.zeros(U, np.int64), chunk_task_hits=np.zeros((T, C), np.int64),
    )  # fmt: skip
    for c in range(C):  # fail early, naming the file, if a chunk is missing or malformed
        store.chunk(c)
    res.tokens = int(sum(store.rows_per_chunk)) * store.row_length
    if U == 0:
        res.seconds = time.perf_counter() - t0
        return res
    bits = bitmap_bits(U)
    lookup = SortedHashes.build(index.hashes)
    state = {"n": index.n, "bits": bits, "hashes": index.hashes, "bitmap": make_bitmap(index.hashes, bits),
             "tokens": index.tokens, "rep_start": index.rep_start, "starts": lookup.starts,
             "bucket_bits": lookup.bits}  # fmt: skip
    items = _work_items(store, block_tokens)
    # A worker process has a start-up cost (milliseconds forked, seconds spawned): below ~16 M tokens
    # per extra worker (about half a second of scanning) it would cost more than it saves.
    workers = max(1, min(workers or os.cpu_count() or 1, len(items), -(-res.tokens // _TOKENS_PER_WORKER)))

    def merge(chunk: int, found: np.ndarray, counts: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> None:
        res.count[found] += counts
        earlier = (res.first_chunk[found] < 0) | (res.first_chunk[found] > chunk) | (
            (res.first_chunk[found] == chunk) & (res.first_row[found] > rows))  # fmt: skip
        f = found[earlier]
        res.first_chunk[f], res.first_row[f], res.first_col[f] = chunk, rows[earlier], cols[earlier]
        assert res.chunk_task_hits is not None
        res.chunk_task_hits[:, chunk] += counts @ index.unique_in_task[found].astype(np.int64)
        if len(found):
            occ = index.unique_order[_ranges(index.unique_ptr[found], index.unique_ptr[found + 1])]
            ex = np.unique(index.ngram_example[occ])
            prev = res.chunk_examples.get(chunk)
            res.chunk_examples[chunk] = ex if prev is None else np.union1d(prev, ex)

    if executor is not None:
        if scratch is None:
            raise ValueError("an executor's scan needs a scratch folder every node sees")
        for (c, _, _, _), found in zip(items, _scan_on(executor, state, items, scratch), strict=True):
            merge(c, *found)
        res.seconds = time.perf_counter() - t0
        return res
    with progress("contamination scan", total=res.tokens / 1e6, unit="M tokens") as bar:
        if workers == 1:
            _init_worker(state)
            try:
                for c, path, s, e in items:
                    merge(c, *_scan_block(path, s, e))
                    bar.advance((e - s) * store.row_length / 1e6)
            finally:
                _W.clear()
        else:
            ctx, tmp = _pool_context(state)
            with tmp, ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                          initargs=(state,)) as pool:  # fmt: skip
                pending: dict[Future, tuple[int, int]] = {}
                queue = iter(items)
                for c, path, s, e in _take(queue, 2 * workers):
                    pending[pool.submit(_scan_block, path, s, e)] = (c, e - s)
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        c, nrows = pending.pop(fut)
                        merge(c, *fut.result())
                        bar.advance(nrows * store.row_length / 1e6)
                        for c2, path, s, e in _take(queue, 1):
                            pending[pool.submit(_scan_block, path, s, e)] = (c2, e - s)
    res.seconds = time.perf_counter() - t0
    return res


def _scan_on(executor: Executor, state: dict[str, Any], items: list[tuple[int, str, int, int]],
             scratch: Path) -> list[tuple[np.ndarray, ...]]:  # fmt: skip
    """Every block's matches, each block a task of ``executor``; the state's arrays in .npy files under scratch."""
    import shutil
    import uuid

    from llm360.executor import Task

    folder = scratch / f".scan-{uuid.uuid4().hex[:12]}"
    folder.mkdir(parents=True)
    try:
        shared = {k: v for k, v in state.items() if k not in _STATE_ARRAYS}
        shared["id"], shared["files"] = folder.name, {}
        for name in _STATE_ARRAYS:
            shared["files"][name] = str(folder / f"{name}.npy")
            np.save(shared["files"][name], state[name])
        executor.check_visible(folder)
        tasks = [Task(f"contamination:{c}:{s}", scan_task, (shared, path, s, e)) for c, path, s, e in items]
        return executor.run(tasks, progress_label="contamination scan", unit="blocks")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _pool_context(state: dict[str, Any]) -> tuple[Any, Any]:
    """How scan workers start: fork where the platform has it, else spawn with the arrays in files.

    Fork starts a worker in milliseconds and shares the evaluation index copy-on-write. It is safe
    here although the parent may hold other threads (torch's, a progress bar's): a worker runs only
    the numpy code of :func:`_scan_block` -- no torch, no BLAS, no logging, no locks those threads
    could hold. Spawn re-imports llm360 in every worker (seconds) and passes the arrays as .npy
    files, since a pipe write would block until each child has started, one after the other.
    """
    import contextlib

    if "fork" in mp.get_all_start_methods():
        return mp.get_context("fork"), contextlib.nullcontext()
    tmp = tempfile.TemporaryDirectory(prefix="llm360-contamination-")
    files = {}
    for name in _STATE_ARRAYS:
        files[name] = os.path.join(tmp.name, f"{name}.npy")
        np.save(files[name], state.pop(name))
    state["files"] = files
    return mp.get_context("spawn"), tmp


def _ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Concatenation of arange(lo[i], hi[i]) for all i, vectorized."""
    lens = hi - lo
    ends = np.cumsum(lens)
    return np.arange(int(ends[-1]) if len(ends) else 0) - np.repeat(ends - lens - lo, lens)


def _take(it: Iterator, k: int) -> list:
    out = []
    for _ in range(k):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out


# ------------------------------------------------------------------------------------ driver


def analyze_contamination(
    run_dir: str | Path,
    cfg: ContaminationConfig | None = None,
    *,
    tasks: Sequence[str] | None = None,
    force: bool = False,
    executor: str = "local",
    workers: int | None = None,
    ray_address: str | None = None,
) -> AnalysisResult:
    """Measure every task's overlap with the run's training data; one JSON file per task.

    ``tasks`` overrides ``cfg.tasks``. Tasks that cannot be read, or whose earlier result was
    computed with other settings (unless ``force``), are reported in ``result.failed``; the rest
    are scanned together in one pass over the chunks, by ``workers`` local processes (default
    ``cfg.workers``) or, with ``executor="ray"``, as tasks on the Ray cluster at ``ray_address``
    (the evaluation n-grams built once here and shared with every node).
    """
    from llm360.data.tokenizer import TOKENIZER_META, load_saved
    from llm360.rundir.data import DataStore, read_training_record

    cfg = cfg or ContaminationConfig()
    specs = list(tasks if tasks is not None else cfg.tasks)
    run = RunDir(run_dir)
    out = run.contamination_dir
    result = AnalysisResult("contamination", out)
    if not specs:
        raise AnalysisError("no tasks given: pass --tasks (JSONL files or lm-eval task names) "
                            "or set analysis.contamination.tasks")
    store = DataStore(run.data)
    tokenizer = load_saved(run.tokenizer)
    meta_tok = read_json(run.tokenizer / TOKENIZER_META)
    docs, failed = load_tasks(specs, cfg)
    result.failed.update(failed)
    out.mkdir(parents=True, exist_ok=True)
    data_fp = hashlib.sha256(json.dumps([c.get("sha256") for c in store.manifest["chunks"]]).encode()).hexdigest()
    skipped = sorted(read_training_record(run.root).skipped_chunks)  # a guard skipped them: never seen

    todo: list[tuple[TaskDocs, dict]] = []
    for d in docs:
        settings = {
            "ngram": cfg.ngram, "data_fingerprint": data_fp, "tokenizer_sha256": meta_tok.get("sha256"),
            "examples_sha256": hashlib.sha256(json.dumps(d.texts, ensure_ascii=False).encode()).hexdigest(),
            "examples": len(d.texts), "skipped_chunks": skipped,
        }  # fmt: skip
        path = run.contamination_result(d.name)
        if path.is_file() and not force:
            try:
                have = read_json(path)
            except (OSError, ValueError):
                have = {}
            if have.get("format") == FORMAT and have.get("settings") == settings:
                result.reused.append(d.name)
                continue
            if have.get("format") == FORMAT:
                diff = [k for k in settings if have.get("settings", {}).get(k) != settings[k]]
                if diff == ["skipped_chunks"]:  # training went on and a guard skipped a chunk: redo it
                    logger.info("contamination of %s: recomputed, training skipped other chunks since", d.name)
                    todo.append((d, settings))
                    continue
                result.failed[d.name] = (
                    f"{path} was computed with other {', '.join(diff)} (the task's examples, n, the data "
                    "or the tokenizer changed); pass --force to replace it"
                )
                continue
        todo.append((d, settings))
    if not todo:
        return result

    tokenized: dict[str, list[np.ndarray]] = {}
    for d, _ in todo:
        ids: list[np.ndarray] = []
        for i in range(0, len(d.texts), 1000):
            ids += [np.asarray(x, dtype=np.int64) for x in tokenizer.encode_batch(d.texts[i : i + 1000])]
        tokenized[d.name] = ids
    index = build_eval_index(tokenized, cfg.ngram)
    logger.info("contamination: %d examples of %d tasks, %d distinct %d-grams; scanning %d chunks",
                index.num_examples, len(todo), len(index.hashes), cfg.ngram, store.num_chunks)
    ex = None
    if executor != "local" or ray_address:
        from llm360.executor import make_executor

        ex = make_executor(executor, workers, ray_address)  # a cluster that cannot be reached stops here
    try:
        scan = scan_training_data(store, index, workers=workers or cfg.workers, block_tokens=cfg.block_tokens,
                                  executor=ex, scratch=out)  # fmt: skip
    except Llm360Error as e:
        for d, _ in todo:
            result.failed[d.name] = f"scan of the training data failed: {e}"
        return result
    finally:
        if ex is not None:
            ex.close()
    logger.info("scanned %.1f M training tokens in %.1f s (%.1f M tokens/s)", scan.tokens / 1e6, scan.seconds,
                scan.tokens / 1e6 / max(scan.seconds, 1e-9))
    for t, (d, settings) in enumerate(todo):
        report = task_report(index, scan, t, store, tokenizer, cfg.examples, d.texts, skipped)
        write_json(run.contamination_result(d.name), {"format": FORMAT, "version": VERSION, "task": d.name,
                                             "source": d.source, "settings": settings, **report})
        result.computed.append(d.name)
    return result


def task_report(
    index: EvalIndex, scan: ScanResult, t: int, store: DataStore, tokenizer: Any, examples: int, texts: list[str],
    skipped_chunks: Sequence[int] = (),
) -> dict[str, Any]:  # fmt: skip
    """The numbers of task t (see the module docstring for the definitions).

    Where an example is in the data (``per_example.first_chunk``, ``chunks``) counts every chunk;
    what a checkpoint has seen (``first_checkpoint_that_saw_it``, ``per_example.first_seen_chunk``,
    ``contaminated_examples_seen_by_checkpoint``) leaves out ``skipped_chunks``, the chunks a guard
    skipped, which no checkpoint was trained on.
    """
    n = index.n
    found_g = scan.count[index.ngram_unique] > 0
    # contaminated tokens: covered by a found n-gram (difference array over the concatenated tokens)
    diff = np.zeros(len(index.tokens) + 1, dtype=np.int64)
    np.add.at(diff, index.ngram_start[found_g], 1)
    np.add.at(diff, index.ngram_start[found_g] + n, -1)
    covered = np.cumsum(diff[:-1]) > 0
    ex = np.flatnonzero(index.example_task == t)
    offs = index.example_offsets
    lengths = offs[ex + 1] - offs[ex]
    covered_cum = np.concatenate([[0], np.cumsum(covered)])
    contaminated = covered_cum[offs[ex + 1]] - covered_cum[offs[ex]]
    share = np.where(lengths > 0, contaminated / np.maximum(lengths, 1), 0.0)
    # first chunk of each example: the earliest chunk holding any of its n-grams
    big = np.iinfo(np.int64).max
    first_chunk_g = np.where(found_g, scan.first_chunk[index.ngram_unique], big)
    first_chunk_e = np.full(index.num_examples, big, dtype=np.int64)
    np.minimum.at(first_chunk_e, index.ngram_example, first_chunk_g)
    first_chunk = first_chunk_e[ex]
    any_hit = first_chunk < big
    first_chunk = np.where(any_hit, first_chunk, -1)
    skipped = {int(c) for c in skipped_chunks}
    first_seen_e = np.full(index.num_examples, big, dtype=np.int64)
    for c, exs in scan.chunk_examples.items():  # the earliest trained chunk holding one of its n-grams
        if c not in skipped:
            first_seen_e[exs] = np.minimum(first_seen_e[exs], c)
    first_seen = first_seen_e[ex]
    seen_hit = first_seen < big
    first_seen = np.where(seen_hit, first_seen, -1)
    E = len(ex)

    def bucket(mask: np.ndarray) -> dict[str, Any]:
        return {"examples": int(mask.sum()), "share": round(float(mask.mean()), 6) if E else None}

    assert scan.chunk_task_hits is not None
    local = {int(e): i for i, e in enumerate(ex)}
    chunks = []
    for c in sorted(scan.chunk_examples):
        mine = [local[int(e)] for e in scan.chunk_examples[c] if int(e) in local]
        if mine:
            chunks.append({"chunk": c, "checkpoint": ckpt_name(c), "examples": len(mine),
                           "ngram_occurrences": int(scan.chunk_task_hits[t, c]), "skipped": c in skipped})  # fmt: skip
    seen_by = [int((seen_hit & (first_seen <= c)).sum()) for c in range(store.num_chunks)]
    first_ckpt = int(first_seen[seen_hit].min()) if seen_hit.any() else None
    return {
        "ngram": n,
        "examples": E,
        "examples_shorter_than_ngram": int((lengths < n).sum()),
        "tokens": int(lengths.sum()),
        "contaminated_examples": int(any_hit.sum()),
        "contaminated_share": round(float(any_hit.mean()), 6) if E else None,
        "contaminated_tokens_share": round(float(contaminated.sum() / max(lengths.sum(), 1)), 6),
        "mean_example_contamination": round(float(share.mean()), 6) if E else None,
        "buckets": {
            "clean": bucket(share < CLEAN_BELOW), "not_clean": bucket(share >= CLEAN_BELOW),
            "not_dirty": bucket(share < DIRTY_AT_LEAST), "dirty": bucket(share >= DIRTY_AT_LEAST),
        },  # fmt: skip
        "thresholds": {"clean_below": CLEAN_BELOW, "dirty_at_least": DIRTY_AT_LEAST,
                       "source": "Llama 2 (Touvron et al. 2023, arXiv:2307.09288), appendix A.6"},  # fmt: skip
        "chunks": chunks,
        "skipped_chunks": sorted(skipped),
        "first_checkpoint_that_saw_it": ckpt_name(first_ckpt) if first_ckpt is not None else None,
        "contaminated_examples_seen_by_checkpoint": seen_by,
        "per_example": {"contamination": [round(float(s), 4) for s in share], "first_chunk": first_chunk.tolist(),
                        "first_seen_chunk": first_seen.tolist()},
        "top_examples": _top_examples(index, scan, ex, share, first_chunk, first_seen, skipped, store, tokenizer,
                                      examples, texts),
        "scan": {"training_tokens": scan.tokens, "seconds": round(scan.seconds, 3),
                 "tokens_per_second": round(scan.tokens / max(scan.seconds, 1e-9))},  # fmt: skip
    }


def _top_examples(
    index: EvalIndex, scan: ScanResult, ex: np.ndarray, share: np.ndarray, first_chunk: np.ndarray,
    first_seen: np.ndarray, skipped: set[int], store: DataStore, tokenizer: Any, k: int, texts: list[str],
) -> list[dict[str, Any]]:  # fmt: skip
    order = sorted((i for i in range(len(ex)) if first_chunk[i] >= 0), key=lambda i: (-share[i], i))[:k]
    out = []
    n = index.n
    for i in order:
        e = int(ex[i])
        g = np.flatnonzero(index.ngram_example == e)
        u = index.ngram_unique[g]
        hit = scan.count[u] > 0
        g, u = g[hit], u[hit]
        best = int(np.argmin(scan.first_chunk[u] * (1 << 40) + scan.first_row[u]))
        uu, gg = int(u[best]), int(g[best])
        c, r, col = int(scan.first_chunk[uu]), int(scan.first_row[uu]), int(scan.first_col[uu])
        row = np.asarray(store.chunk(c)[r], dtype=np.int64)
        start = int(index.ngram_start[gg])
        out.append({
            "index": i,
            "contamination": round(float(share[i]), 4),
            "text": texts[i][:500],
            "matched_ngram": tokenizer.decode(index.tokens[start : start + n].tolist()),
            "first_occurrence": {"chunk": c, "row": r, "position": col, "checkpoint": ckpt_name(c),
                                 "skipped": c in skipped},
            "first_seen_by": ckpt_name(int(first_seen[i])) if first_seen[i] >= 0 else None,
            "training_context": tokenizer.decode(row[max(0, col - 16) : col + n + 16].tolist()),
            "ngram_occurrences": int(scan.count[u].sum()),
        })  # fmt: skip
    return out
