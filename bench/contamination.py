"""Contamination scan throughput: training tokens/s at growing data sizes.

Synthetic uint16 chunks (rows of 2049 tokens, vocabulary 32000) are written as .npy files into a
temporary run layout (``data/manifest.json`` + ``data/chunk_NNN.npy``), then
:func:`llm360.analysis.contamination.scan_training_data` scans them against an evaluation set of
``--examples`` examples of ``--example-tokens`` tokens, a tenth of them copied from the training
rows so the scan has real hits to verify and record. The time covers the whole scan: starting the
worker processes, reading the chunks (from the page cache: they were just written), hashing,
matching and merging. The goal is >= 20 M tokens/s with two workers, growing linearly; the last
lines fit seconds = fixed + tokens / throughput.

    .venv/bin/python bench/contamination.py                      # 10, 40, 160 M tokens, 2 workers
    .venv/bin/python bench/contamination.py --sizes 10,40 --workers 1,2,4
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from llm360.analysis.contamination import build_eval_index, scan_training_data
from llm360.rundir.data import DataStore
from synthetic import ROW, VOCAB, write_run


def eval_set(store: DataStore, examples: int, length: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    out = [rng.integers(0, VOCAB, length) for _ in range(examples)]
    for i in range(0, examples, 10):  # every tenth example is a slice of a training row
        c = int(rng.integers(store.num_chunks))
        r = int(rng.integers(store.rows_per_chunk[c]))
        s = int(rng.integers(ROW - length))
        out[i] = np.asarray(store.chunk(c)[r, s : s + length], dtype=np.int64)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10,40,160", help="training tokens, in millions")
    p.add_argument("--workers", default="2", help="comma-separated worker counts")
    p.add_argument("--chunk-tokens", type=float, default=20, help="tokens per chunk file, in millions")
    p.add_argument("--examples", type=int, default=5000)
    p.add_argument("--example-tokens", type=int, default=200)
    p.add_argument("--ngram", type=int, default=13)
    p.add_argument("--block-tokens", type=int, default=4_194_304)
    args = p.parse_args()
    print(f"# contamination scan bench: uint16 rows of {ROW}, {args.examples} eval examples x {args.example_tokens} "
          f"tokens, n = {args.ngram}, block {args.block_tokens} tokens, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}, numpy {np.__version__}")
    with tempfile.TemporaryDirectory() as tmp:  # warm-up: imports, first allocations
        store = write_run(Path(tmp), 2 * ROW * 64, ROW * 64, seed=0)
        scan_training_data(store, build_eval_index({"w": eval_set(store, 10, 50, 0)}, args.ngram), workers=1)
    timings: dict[int, list[tuple[float, float]]] = {}
    for size in [float(s) for s in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            store = write_run(Path(tmp), int(size * 1e6), int(args.chunk_tokens * 1e6), seed=int(size))
            index = build_eval_index({"synthetic": eval_set(store, args.examples, args.example_tokens, 0)},
                                     args.ngram)  # fmt: skip
            for w in [int(x) for x in args.workers.split(",")]:
                t0 = time.perf_counter()
                res = scan_training_data(store, index, workers=w, block_tokens=args.block_tokens)
                secs = time.perf_counter() - t0
                hits = int((res.count > 0).sum())
                timings.setdefault(w, []).append((res.tokens, secs))
                print(f"{res.tokens / 1e6:7.1f} M tokens  {w} workers  {secs:6.2f} s  "
                      f"{res.tokens / secs / 1e6:6.1f} M tokens/s   ({hits} of {len(index.hashes)} eval n-grams found)")
    for w, pts in timings.items():
        if len(pts) >= 2:  # least-squares line: seconds = fixed + tokens / marginal throughput
            tok, sec = np.array(pts, dtype=float).T
            slope, fixed = np.polyfit(tok, sec, 1)
            worst = np.max(np.abs(sec - (fixed + slope * tok)) / sec)
            print(f"# {w} workers: seconds = {fixed:.2f} + tokens / ({1 / slope / 1e6:.1f} M/s); "
                  f"largest deviation from that line {worst:.0%}")


if __name__ == "__main__":
    main()
