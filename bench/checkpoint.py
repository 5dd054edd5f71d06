"""Checkpoint write and load speed against a raw write/read of the same bytes on the same disk.

A LLaMA-shaped model (Hugging Face parameter names) of about --params million fp32 parameters takes
one real AdamW step, so the checkpoint holds weights + exp_avg + exp_avg_sq (12 bytes/param). Each
repeat measures, in alternating order:

- raw write:  the same tensors' bytes written to one file, then fsync;
- ckpt write: save_checkpoint (temp folder, sha256 of every file, fsync, rename, marker);
- raw read:   that file read into one preallocated buffer;
- ckpt load:  load_checkpoint into a fresh model + optimizer (verifies every sha256 first).

Before each read the page cache of the files is dropped (posix_fadvise DONTNEED on clean, fsynced
pages), so both reads come from the disk; --warm skips that. A first round warms up and is not
counted. The goal is ckpt/raw >= 0.7 (reported: the median of the per-repeat ratios).

The checkpoint does one thing the raw baseline does not: sha256 of every byte, ~0.56 CPU-seconds
per GB on a core with SHA extensions. It overlaps with the I/O on spare cores, so the ratio is
meaningful only on a machine whose cores are not busy with other work: the last line prints the
CPU seconds per GB of each operation and the load average, to tell the two situations apart.

    .venv/bin/python bench/checkpoint.py                 # ~150M params, 3 repeats
    .venv/bin/python bench/checkpoint.py --params 300 --repeats 2 --dir /mnt/fast
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from llm360.config import TrainConfig
from llm360.rundir.checkpoint import load_checkpoint, save_checkpoint
from llm360.train.optim import build_optimizer

VOCAB = 32000


def make_model(hidden: int, inter: int, layers: int, *, init: bool = True) -> nn.Module:
    """A parameter-only LLaMA skeleton whose state_dict names are LlamaForCausalLM's."""

    def linear(i: int, o: int) -> nn.Linear:
        return nn.Linear(i, o, bias=False, device="meta")

    root = nn.Module()
    root.model = nn.Module()
    root.model.embed_tokens = nn.Embedding(VOCAB, hidden, device="meta")
    root.model.layers = nn.ModuleList()
    for _ in range(layers):
        blk = nn.Module()
        blk.self_attn = nn.Module()
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(blk.self_attn, n, linear(hidden, hidden))
        blk.mlp = nn.Module()
        blk.mlp.gate_proj = linear(hidden, inter)
        blk.mlp.up_proj = linear(hidden, inter)
        blk.mlp.down_proj = linear(inter, hidden)
        blk.input_layernorm = nn.RMSNorm(hidden, device="meta")
        blk.post_attention_layernorm = nn.RMSNorm(hidden, device="meta")
        root.model.layers.append(blk)
    root.model.norm = nn.RMSNorm(hidden, device="meta")
    root.lm_head = linear(hidden, VOCAB)
    root.to_empty(device="cpu")
    with torch.no_grad():
        for p in root.parameters():
            if init:
                p.normal_(0, 0.02)
            else:
                p.zero_()
    return root


def drop_cache(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_write(path: Path, tensors: list[torch.Tensor]) -> int:
    n = 0
    with open(path, "wb", buffering=0) as f:
        for t in tensors:
            mv = memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())
            while len(mv):
                k = f.write(mv)
                mv = mv[k:]
                n += k
        os.fsync(f.fileno())
    return n


def raw_read(path: Path) -> int:
    size = path.stat().st_size
    buf = torch.empty(size, dtype=torch.uint8)
    mv = memoryview(buf.numpy())
    off = 0
    with open(path, "rb", buffering=0) as f:
        while off < size:
            k = f.readinto(mv[off:])
            if not k:
                break
            off += k
    return off


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=150, help="model size in millions of fp32 parameters")
    ap.add_argument("--hidden", type=int, default=1024, help="hidden size (layers are derived from --params)")
    ap.add_argument("--repeats", type=int, default=3, help="measurements of each kind (median is reported)")
    ap.add_argument(
        "--dir", default=".", help="a folder on the disk to measure (a temp folder is made inside)"
    )
    ap.add_argument("--warm", action="store_true", help="read from the page cache instead of dropping it")
    args = ap.parse_args()

    hidden, inter = args.hidden, int(args.hidden * 2.75) // 64 * 64
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((args.params * 1e6 - 2 * VOCAB * hidden) / per_layer))
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = make_model(hidden, inter, layers)
    cfg = TrainConfig()
    opt = build_optimizer(model, cfg)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)  # one real AdamW step creates exp_avg / exp_avg_sq / step
    opt.step()
    opt.zero_grad(set_to_none=True)
    n_params = sum(p.numel() for p in model.parameters())
    model2 = make_model(hidden, inter, layers, init=False)
    opt2 = build_optimizer(model2, cfg)
    raw_tensors = list(model.state_dict().values()) + [
        v for st in opt.state.values() for v in st.values() if v.ndim > 0
    ]
    raw_gb = sum(t.numel() * t.element_size() for t in raw_tensors) / 1e9
    size_gb = raw_gb  # replaced by the checkpoint's size after the first save
    print(
        f"model: {n_params / 1e6:.1f}M fp32 params ({layers} layers, hidden {hidden}), "
        f"setup {time.perf_counter() - t0:.1f} s; {os.cpu_count()} cores, load avg {os.getloadavg()[0]:.1f}"
    )

    work = Path(tempfile.mkdtemp(prefix="llm360-bench-ckpt-", dir=args.dir))
    raw_file = work / "raw.bin"
    ckpt = work / "checkpoints" / "ckpt_000"
    results: dict[str, list[float]] = {"raw write": [], "ckpt write": [], "raw read": [], "ckpt load": []}
    cpu: dict[str, list[float]] = {k: [] for k in results}  # CPU seconds of this process per GB

    def settle() -> None:
        # Let the deletes and writeback of the previous measurement finish before timing the next.
        os.sync()
        time.sleep(0.3)

    def do_raw_write() -> float:
        raw_file.unlink(missing_ok=True)
        settle()
        t = time.perf_counter()
        n = raw_write(raw_file, raw_tensors)
        return n / (time.perf_counter() - t) / 1e9

    def do_ckpt_write() -> float:
        nonlocal size_gb
        if ckpt.exists():
            shutil.rmtree(ckpt)
        settle()
        t = time.perf_counter()
        save_checkpoint(
            ckpt,
            model_state=model.state_dict(),
            optimizer=opt,
            param_names=model,
            trainer_state={"step": 1},
            extra_files={"config.json": "{}"},
        )
        dt = time.perf_counter() - t
        size_gb = sum(p.stat().st_size for p in ckpt.iterdir()) / 1e9
        return size_gb / dt

    def do_raw_read() -> float:
        if not args.warm:
            drop_cache([raw_file])
        settle()
        t = time.perf_counter()
        n = raw_read(raw_file)
        return n / (time.perf_counter() - t) / 1e9

    def do_ckpt_load() -> float:
        files = list(ckpt.iterdir())
        if not args.warm:
            drop_cache(files)
        settle()
        t = time.perf_counter()
        load_checkpoint(ckpt, model2, opt2)
        return sum(p.stat().st_size for p in files) / (time.perf_counter() - t) / 1e9

    steps = {
        "raw write": do_raw_write,
        "ckpt write": do_ckpt_write,
        "raw read": do_raw_read,
        "ckpt load": do_ckpt_load,
    }
    try:
        # Round 0 warms up (first touches of page-cache memory are slow in a VM) and is not counted.
        for r in range(args.repeats + 1):
            writes = ["raw write", "ckpt write"] if r % 2 else ["ckpt write", "raw write"]
            reads = ["raw read", "ckpt load"] if r % 2 else ["ckpt load", "raw read"]
            got = {}
            for k in writes + reads:
                c0 = time.process_time()
                got[k] = steps[k]()
                got_cpu = time.process_time() - c0
                if r:
                    cpu[k].append(got_cpu / (size_gb if k.startswith("ckpt") else raw_gb))
            if r == 0:
                continue
            for k, v in got.items():
                results[k].append(v)
            print(
                f"repeat {r}: "
                + ", ".join(f"{k} {results[k][-1]:.2f} GB/s" for k in results)
                + f" | load avg {os.getloadavg()[0]:.1f}"
            )
        size = sum(p.stat().st_size for p in ckpt.iterdir())
    finally:
        shutil.rmtree(work, ignore_errors=True)

    for i, (a, b) in enumerate(zip(model.state_dict().values(), model2.state_dict().values(), strict=True)):
        assert torch.equal(a, b), f"loaded weights differ (tensor {i})"
    med = {k: statistics.median(v) for k, v in results.items()}
    w_ratio = statistics.median(
        c / r for c, r in zip(results["ckpt write"], results["raw write"], strict=True)
    )
    l_ratio = statistics.median(c / r for c, r in zip(results["ckpt load"], results["raw read"], strict=True))
    print(
        f"checkpoint {size / 1e9:.2f} GB, {args.repeats} repeats, {'page-cache' if args.warm else 'cold'} reads; "
        "medians (ratio: median of the per-repeat ratios):"
    )
    print(
        f"  write: ckpt {med['ckpt write']:.2f} GB/s, raw write+fsync {med['raw write']:.2f} GB/s, "
        f"ratio {w_ratio:.2f} (goal >= 0.7)"
    )
    print(
        f"  load:  ckpt {med['ckpt load']:.2f} GB/s, raw read {med['raw read']:.2f} GB/s, "
        f"ratio {l_ratio:.2f} (goal >= 0.7)"
    )
    print(
        "  CPU seconds of this process per GB (all threads): "
        + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in cpu.items())
        + f"; load avg at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )


if __name__ == "__main__":
    main()
