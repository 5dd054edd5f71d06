"""Checkpoints written by several ranks at once, against a raw parallel write of the same bytes.

Each of N gloo processes (N = each of --ranks) holds the same LLaMA-shaped model of about --params
million fp32 parameters after one AdamW step (12 bytes a parameter on disk), as DDP ranks do, and
saves it with ``llm360.train.checkpointing.save_together``: the checkpoint is split into files of
--shard-mb MB, dealt round-robin to the ranks, and every rank writes and hashes its own files at
once; rank 0 then writes the marker and renames the folder in. The baseline, measured in the same
run and in alternating order: every rank writing the same bytes it wrote in the checkpoint to one
raw file of its own, then fsync (no hashing, no staging, no marker).

Printed per world size: the bytes each rank wrote, per-rank and total GB/s of the save and of the
raw write, and the ratio save/raw (median over --repeats, after one unmeasured warm-up round);
then the speed-up of N ranks' saves over one rank's. With ``--fsdp`` the model is FSDP2-sharded
first, so the save also gathers every tensor (one collective each) before writing.

    .venv/bin/python bench/checkpoint_parallel.py                      # 1 and 2 ranks, ~150M params
    .venv/bin/python bench/checkpoint_parallel.py --ranks 1 2 4 --params 300 --dir /mnt/fast
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint import VOCAB, make_model, raw_write  # noqa: E402
from llm360.config import TrainConfig  # noqa: E402
from llm360.train import checkpointing  # noqa: E402
from llm360.train.optim import build_optimizer  # noqa: E402
from llm360.train.parallel import DistInfo  # noqa: E402


def _model(params_m: float, hidden: int) -> torch.nn.Module:
    inter = int(hidden * 8 / 3) // 64 * 64
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((params_m * 1e6 - 2 * VOCAB * hidden) / per_layer))
    torch.manual_seed(0)
    return make_model(hidden, inter, layers)


def worker(rank: int, world: int, init: str, out: str, args: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    info = DistInfo(rank, world)
    model = _model(args["params"], args["hidden"])
    if args["fsdp"]:
        from torch.distributed.fsdp import fully_shard

        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
    opt = build_optimizer(model, TrainConfig())
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)  # one real AdamW step: exp_avg, exp_avg_sq, step
    opt.step()
    opt.zero_grad(set_to_none=True)
    root = Path(args["dir"])
    shard = int(args["shard_mb"] * 1e6)
    rows = []
    payload: list[torch.Tensor] = []  # this rank's checkpoint bytes, read after the warm-up save
    for rep in range(args["repeats"] + 1):  # round 0 warms up (and its save gives the raw payload)
        order = ("save", "raw") if rep % 2 == 0 else ("raw", "save")
        row: dict = {}
        for kind in order:
            dist.barrier()
            t0 = time.perf_counter()
            if kind == "save":
                folder = root / f"ckpt_{world}_{rep}"
                written = checkpointing.save_together(folder, model, opt, {"step": 1}, info, shard_bytes=shard)
                row["bytes"] = sum(written.values())
            else:
                row["raw_bytes"] = raw_write(root / f"raw_{world}_{rep}_{rank}.bin", payload)
            dist.barrier()  # the slowest rank's time: the checkpoint exists only when all are done
            row[kind] = time.perf_counter() - t0
            if kind == "save" and not payload:
                payload = [torch.frombuffer(bytearray((folder / f).read_bytes()), dtype=torch.uint8)
                           for f in written]
        dist.barrier()
        if rank == 0:
            shutil.rmtree(root / f"ckpt_{world}_{rep}", ignore_errors=True)
        (root / f"raw_{world}_{rep}_{rank}.bin").unlink(missing_ok=True)
        if rep:
            rows.append(row)
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="world sizes to measure")
    ap.add_argument("--params", type=float, default=150, help="model size in millions of fp32 parameters")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--shard-mb", type=float, default=200, help="train.checkpoint_shard_mb")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fsdp", action="store_true", help="FSDP2-shard the model (the save gathers each tensor)")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = ap.parse_args()
    import torch.multiprocessing as mp

    work = Path(tempfile.mkdtemp(prefix="ckpt_parallel_", dir=args.dir))
    results: dict[int, list] = {}
    try:
        for world in args.ranks:
            out = work / f"result_{world}.json"
            mp.start_processes(worker, args=(world, str(work / f"init_{world}"), str(out),
                                             {**vars(args), "dir": str(work)}),
                               nprocs=world, start_method="spawn")
            results[world] = json.loads(out.read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'ranks':>5} {'GB/rank':>8} {'save s':>7} {'raw s':>7} {'save GB/s/rank':>14} "
          f"{'save GB/s total':>15} {'raw GB/s total':>14} {'save/raw':>8}")
    base = None
    for world, per_rank in results.items():
        reps = range(len(per_rank[0]))
        save_t = statistics.median(per_rank[0][i]["save"] for i in reps)  # barrier-to-barrier: every rank
        raw_t = statistics.median(per_rank[0][i]["raw"] for i in reps)
        total = sum(per_rank[r][0]["bytes"] for r in range(world))
        most = max(per_rank[r][0]["bytes"] for r in range(world))
        ratio = statistics.median(per_rank[0][i]["raw"] / per_rank[0][i]["save"] for i in reps)
        print(f"{world:>5} {most / 1e9:>8.2f} {save_t:>7.2f} {raw_t:>7.2f} {most / 1e9 / save_t:>14.2f} "
              f"{total / 1e9 / save_t:>15.2f} {total / 1e9 / raw_t:>14.2f} {ratio:>8.2f}")
        base = base or save_t
        if world != args.ranks[0]:
            print(f"      {world} ranks' save vs {args.ranks[0]} rank's: {base / save_t:.2f}x faster")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; --fsdp={args.fsdp}")


if __name__ == "__main__":
    main()
