"""Wall time of `llm360 eval` + `llm360 analyze memorization` over 6 checkpoints, by number of workers.

One prepared run (synthetic text, 6 chunks) gets 6 checkpoints of a small LLaMA (random weights, one
seed each: the cost of evaluating a checkpoint does not depend on what it learned). Each
configuration runs both commands as a user would, in fresh processes, on a fresh copy of the run
(no results yet), in the same session:

- ``today``:     ``--workers 1`` -- the pairs one after the other in one process, torch's own threads;
- ``1 worker``:  ``--workers 1`` with one compute thread (OMP_NUM_THREADS=1): what one worker does;
- ``2 workers``: ``--workers 2`` -- two worker processes of one compute thread each.

Reported: seconds per configuration (median of the repeats), and the ratios 1 worker / 2 workers
(how the fan-out scales) and today / 2 workers. Goal: >= 1.7x from 1 to 2 workers on 2 cores.

    .venv/bin/python bench/eval_fanout.py                   # hidden 256, 4 layers, 1 repeat
    .venv/bin/python bench/eval_fanout.py --hidden 384 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

WORDS = [f"w{i}" for i in range(3000)]


def build_run(root: Path, hidden: int, layers: int, seq_len: int) -> Path:
    """A prepared 6-chunk run with 6 complete checkpoints of a (hidden, layers) LLaMA."""
    from llm360.config import ModelConfig, validate_config
    from llm360.data.prepare import prepare
    from llm360.model.hf import hf_metadata_files
    from llm360.model.llama import Llama
    from llm360.rundir.checkpoint import save_checkpoint
    from llm360.rundir.data import DataStore

    rng = random.Random(0)
    src = root / "docs.jsonl"
    with open(src, "w") as f:
        for _ in range(6000):
            f.write(json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(40, 200)))}) + "\n")
    cfg = validate_config({
        "data": {"seq_len": seq_len, "chunks": 6, "valid_fraction": 0.02, "tokenizer": {"vocab_size": 2048},
                 "sources": [{"name": "web", "kind": "jsonl", "paths": [str(src)]}]},
    })  # fmt: skip
    run = root / "run"
    prepare(cfg, run)
    store = DataStore(run / "data")
    mcfg = ModelConfig(hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_layers=layers, num_heads=hidden // 64,
                       vocab_size=store.vocab_size, max_seq_len=seq_len)  # fmt: skip
    tok = {p.name: p.read_bytes() for p in (run / "data" / "tokenizer").iterdir() if p.is_file()}
    for i in range(6):
        torch.manual_seed(i)
        model = Llama(mcfg)
        extra = {**hf_metadata_files(mcfg, eos_token_id=int(store.manifest["eos_id"])), **tok}
        save_checkpoint(run / "checkpoints" / f"ckpt_{i:03d}", model_state=model.state_dict(),
                        trainer_state={"step": i + 1, "tokens_seen": 0, "checkpoint_chunk": i}, extra_files=extra)
    return run


def one(run: Path, work: Path, name: str, workers: int, threads: int | None, rows: int) -> float:
    """Seconds of eval + memorization on a fresh copy of run."""
    copy = work / name
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run, copy)
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cli = [sys.executable, "-m", "llm360.cli", "--no-progress"]
    sets = ["--set", "eval.device=cpu", "--set", "eval.perplexity_max_rows=512",
            "--set", "analysis.memorization.device=cpu", "--set", f"analysis.memorization.rows_per_chunk={rows}"]
    cmds = [[*cli, "eval", "--run-dir", str(copy), "--tasks", "perplexity", "--workers", str(workers), *sets],
            [*cli, "analyze", "memorization", "--run-dir", str(copy), "--workers", str(workers), *sets]]
    t0 = time.perf_counter()
    for cmd in cmds:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    seconds = time.perf_counter() - t0
    shutil.rmtree(copy, ignore_errors=True)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rows", type=int, default=150, help="memorization rows per chunk")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="llm360-bench-fanout-") as tmp:
        root = Path(tmp)
        run = build_run(root, args.hidden, args.layers, args.seq_len)
        print(f"6 checkpoints of a {args.hidden}-wide, {args.layers}-layer LLaMA, seq {args.seq_len}; "
              f"memorization {args.rows} rows x 6 chunks; cores {os.cpu_count()}, load {os.getloadavg()[0]:.1f}")
        configs = [("today", 1, None), ("1 worker", 1, 1), ("2 workers", 2, 1)]
        times: dict[str, list[float]] = {c[0]: [] for c in configs}
        for r in range(args.repeats):
            for name, workers, threads in configs if r % 2 == 0 else configs[::-1]:
                times[name].append(one(run, root, name.replace(" ", "_"), workers, threads, args.rows))
                print(f"  {name:10s} {times[name][-1]:6.1f} s", flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        for name in med:
            print(f"{name:10s} {med[name]:6.1f} s")
        print(f"1 worker / 2 workers: {med['1 worker'] / med['2 workers']:.2f}x; "
              f"today / 2 workers: {med['today'] / med['2 workers']:.2f}x; load at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
