"""`llm360 inspect find` scan speed against a plain numpy sliding-window scan of the same chunks.

Synthetic uint16 chunks (rows of 2049 tokens, vocabulary 32000, token ids drawn from a Zipf-like
distribution so that short n-grams repeat as in text) are written as .npy files into a temporary
data layout. Each query is ``--query-tokens`` tokens: one copied from a training row (found), one
drawn at random (not found). Timed, on the same chunks, from the page cache:

* ours: :func:`llm360.analysis.find.longest_runs` -- strided seed hashes, bitmap, extension: what
  ``inspect find`` runs, with its fall-back scans (every position, then shorter seeds, down to 2
  tokens) for the query that is not found;
* baseline: ``numpy.lib.stride_tricks.sliding_window_view`` over each block of rows, compared with
  the query token by token (``(windows == query).all(axis=2)``): the exact matches only.

Both must report the same exact matches. Prints tokens/s of each and the ratio.

    .venv/bin/python bench/inspect_find.py                  # 40 M tokens, 32-token queries
    .venv/bin/python bench/inspect_find.py --tokens 160 --query-tokens 64
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from llm360.analysis.find import longest_runs
from llm360.rundir.data import DataStore
from synthetic import ROW, VOCAB, write_run


def sliding_window(store: DataStore, query: np.ndarray, block_rows: int) -> set[tuple[int, int, int]]:
    """Exact matches of query inside one row: every window of every row compared token by token."""
    found = set()
    for c in range(store.num_chunks):
        arr = store.chunk(c)
        for r0 in range(0, arr.shape[0], block_rows):
            block = np.asarray(arr[r0 : r0 + block_rows])
            win = np.lib.stride_tricks.sliding_window_view(block, len(query), axis=1)
            for r, col in zip(*np.nonzero((win == query).all(axis=2)), strict=True):
                found.add((c, r0 + int(r), int(col)))
    return found


def ours(store: DataStore, query: np.ndarray) -> tuple[int, set[tuple[int, int, int]]]:
    length, _, found = longest_runs(store, query, keep=10_000)
    exact = {(int(c), int(r), int(col)) for c, r, col, _ in found} if length == len(query) else set()
    return length, exact


def timed(fn, repeat: int):
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=float, default=40, help="training tokens, in millions")
    p.add_argument("--chunk-tokens", type=float, default=10, help="tokens per chunk file, in millions")
    p.add_argument("--query-tokens", type=int, default=32)
    p.add_argument("--block-rows", type=int, default=256, help="rows per sliding-window block (baseline)")
    p.add_argument("--repeat", type=int, default=3, help="best of N runs")
    args = p.parse_args()
    tokens = int(args.tokens * 1e6)
    print(f"# inspect find bench: {tokens / 1e6:g} M uint16 tokens in rows of {ROW}, Zipf(1.1) ids over {VOCAB}, "
          f"{args.query_tokens}-token queries, best of {args.repeat}; {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}, numpy {np.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        store = write_run(Path(tmp), tokens, int(args.chunk_tokens * 1e6), seed=0, zipf=1.1)
        scanned = sum(store.rows_per_chunk) * ROW
        rng = np.random.default_rng(1)
        c = int(rng.integers(store.num_chunks))
        r, s = int(rng.integers(store.rows_per_chunk[c])), int(rng.integers(ROW - args.query_tokens))
        queries = {"found": np.asarray(store.chunk(c)[r, s : s + args.query_tokens], dtype=np.int64),
                   "not found": rng.integers(0, VOCAB, args.query_tokens).astype(np.int64)}
        for name, q in queries.items():
            t_ours, (length, exact) = timed(lambda q=q: ours(store, q), args.repeat)
            t_base, base = timed(lambda q=q: sliding_window(store, q, args.block_rows), args.repeat)
            assert exact == base, (name, sorted(exact)[:5], sorted(base)[:5])
            print(f"{name:>9}: {len(base)} exact match(es), longest run {length} tokens | ours {t_ours:.3f} s "
                  f"({scanned / t_ours / 1e6:.0f} M tokens/s) | sliding window {t_base:.3f} s "
                  f"({scanned / t_base / 1e6:.0f} M tokens/s) | ratio {t_base / t_ours:.1f}x")


if __name__ == "__main__":
    main()
