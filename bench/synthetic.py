"""Synthetic prepared data for the scan benchmarks: uint16 chunks in the data layout, no tokenizer.

Rows of 2049 tokens over a vocabulary of 32000, written as ``data/chunk_NNN.npy`` with a minimal
``data/manifest.json`` that :class:`llm360.rundir.data.DataStore` opens. Token ids are uniform, or
Zipf-like (``zipf=1.1``) so that short n-grams repeat as in text.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from llm360.rundir.data import DataStore
from llm360.rundir.layout import RunDir, chunk_file

ROW = 2049
VOCAB = 32000


def write_run(root: Path, tokens: int, chunk_tokens: int, seed: int, *, zipf: float | None = None) -> DataStore:
    """Write about ``tokens`` tokens in chunks of about ``chunk_tokens`` under ``root/data``; returns the store."""
    rd = RunDir(root)
    rd.data.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rows_total, rows_per_chunk = tokens // ROW, max(1, chunk_tokens // ROW)
    weights = None
    if zipf is not None:
        weights = 1.0 / np.arange(1, VOCAB + 1) ** zipf
        weights /= weights.sum()
    chunks = []
    for c, start in enumerate(range(0, rows_total, rows_per_chunk)):
        rows = min(rows_per_chunk, rows_total - start)
        if weights is None:
            arr = rng.integers(0, VOCAB, (rows, ROW), dtype=np.uint16)
        else:
            arr = rng.choice(VOCAB, size=(rows, ROW), p=weights).astype(np.uint16)
        np.save(rd.chunk(c), arr)
        chunks.append({"file": chunk_file(c), "rows": rows, "index": c, "sha256": f"synthetic-{seed}-{c}"})
    manifest = {"format": "llm360-data", "token_dtype": "uint16", "row_length": ROW, "seq_len": ROW - 1,
                "vocab_size": VOCAB, "num_chunks": len(chunks), "chunks": chunks, "eos_id": 0}  # fmt: skip
    rd.manifest.write_text(json.dumps(manifest))
    os.sync()  # written back to disk (still in the page cache), so no writeback competes with the scan
    return DataStore(rd.data)
