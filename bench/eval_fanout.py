"""Wall time of `llm360 eval` + `llm360 analyze memorization` over 6 checkpoints, by number of workers.

One prepared run (synthetic text, 6 chunks) gets 6 checkpoints of a small LLaMA (random weights, one
seed each: the cost of evaluating a checkpoint does not depend on what it learned). Each
configuration runs both commands as a user would, in fresh processes, on a fresh copy of the run
(no results yet), in the same session:

- ``today``:     ``--workers 1`` -- the pairs one after the other in one process, torch's own threads;
- ``1 worker``:  ``--workers 1`` with one compute thread (OMP_NUM_THREADS=1): what one worker does;
- ``2 workers``: ``--workers 2`` -- two worker processes of one compute thread each.

Reported: wall seconds per configuration (median of the repeats), the CPU seconds its processes used
(user + system), and the ratios 1 worker / 2 workers (how the fan-out scales) and today / 2 workers.
Goal: >= 1.7x from 1 to 2 workers on 2 cores. On a machine whose cores are busy with other work the
wall ratio cannot show it (two workers get no second core); the CPU seconds can: two workers doing the
work of one in about the same CPU time scale to ~2 x (CPU of 1 worker) / (CPU of 2 workers) on two idle
cores, which the last line prints as the projection.

    .venv/bin/python bench/eval_fanout.py                   # hidden 256, 4 layers, 1 repeat
    .venv/bin/python bench/eval_fanout.py --hidden 384 --repeats 2
    llm360 run --run-dir runs/demo && .venv/bin/python bench/eval_fanout.py --run-dir runs/demo \
        --tasks perplexity demo --rows 200 --skip-today       # the embedded default's 6 checkpoints
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


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a run without results (eval/, analysis/, report/, release/): what the commands compute."""
    shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if Path(d) == src and n in
                                                       ("eval", "analysis", "report", "release")])  # fmt: skip
    return dst


def one(run: Path, work: Path, name: str, workers: int, threads: int | None, rows: int,
        tasks: list[str]) -> tuple[float, float]:  # fmt: skip
    """(wall seconds, CPU seconds of the processes) of eval + memorization on a fresh copy of run."""
    import resource

    copy = work / name
    shutil.rmtree(copy, ignore_errors=True)
    copy_run(run, copy)
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cli = [sys.executable, "-m", "llm360.cli", "--no-progress"]
    sets = ["--set", "eval.device=cpu", "--set", "eval.perplexity_max_rows=512",
            "--set", "analysis.memorization.device=cpu", "--set", f"analysis.memorization.rows_per_chunk={rows}"]
    cmds = [[*cli, "eval", "--run-dir", str(copy), "--tasks", *tasks, "--workers", str(workers), *sets],
            [*cli, "analyze", "memorization", "--run-dir", str(copy), "--workers", str(workers), *sets]]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    for cmd in cmds:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    seconds = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    shutil.rmtree(copy, ignore_errors=True)
    return seconds, (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rows", type=int, default=150, help="memorization rows per chunk")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--run-dir", type=Path, help="measure on this run's checkpoints instead of built ones")
    ap.add_argument("--tasks", nargs="+", default=["perplexity"], help="eval tasks (default: perplexity)")
    ap.add_argument("--skip-today", action="store_true", help="leave out the multi-threaded single process")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="llm360-bench-fanout-") as tmp:
        root = Path(tmp)
        if args.run_dir:
            run = copy_run(args.run_dir, root / "run")
            what = f"the checkpoints of {args.run_dir}"
        else:
            run = build_run(root, args.hidden, args.layers, args.seq_len)
            what = f"6 checkpoints of a {args.hidden}-wide, {args.layers}-layer LLaMA, seq {args.seq_len}"
        print(f"{what}; tasks {' '.join(args.tasks)}; memorization {args.rows} rows a chunk; cores {os.cpu_count()}, "
              f"load {os.getloadavg()[0]:.1f}")
        configs = [("today", 1, None), ("1 worker", 1, 1), ("2 workers", 2, 1)][1 if args.skip_today else 0 :]
        times: dict[str, list[float]] = {c[0]: [] for c in configs}
        cpu: dict[str, list[float]] = {c[0]: [] for c in configs}
        for r in range(args.repeats):
            for name, workers, threads in configs if r % 2 == 0 else configs[::-1]:
                wall, used = one(run, root, name.replace(" ", "_"), workers, threads, args.rows, args.tasks)
                times[name].append(wall)
                cpu[name].append(used)
                print(f"  {name:10s} {wall:6.1f} s wall, {used:6.1f} CPU-s, load {os.getloadavg()[0]:.1f}", flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
        for name in med:
            print(f"{name:10s} {med[name]:6.1f} s wall, {med_cpu[name]:6.1f} CPU-s")
        line = f"1 worker / 2 workers: {med['1 worker'] / med['2 workers']:.2f}x wall"
        if "today" in med:
            line += f"; today / 2 workers: {med['today'] / med['2 workers']:.2f}x"
        print(line + f"; load at the end {os.getloadavg()[0]:.1f}")
        print(f"projection on 2 idle cores: 2 x {med_cpu['1 worker']:.1f} / {med_cpu['2 workers']:.1f} CPU-s = "
              f"{2 * med_cpu['1 worker'] / med_cpu['2 workers']:.2f}x")


if __name__ == "__main__":
    main()
