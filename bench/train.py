"""Tokens/s of one training step: llm360's Llama vs transformers' LlamaForCausalLM, same run.

One step = forward + backward + AdamW step, same config, same weights, same batch, same optimizer
settings, on CPU by default, in fp32 and under bf16 autocast (fp32 weights, as Amber trained).
Each side gets the AdamW kernel it trains with by default: ours from ``build_optimizer`` (the
trainer's), theirs torch's fused AdamW, the ``transformers.Trainer`` default (``adamw_torch_fused``).
The two models alternate step by step (ours first on even steps, theirs first on odd ones), so
load from other processes hits both alike; medians and bests are printed, with their ratios, in
wall-clock tokens/s and in tokens per CPU-second. On a shared machine, `--threads 1` and the
CPU-second figures are the steadiest: two OpenMP threads stall whenever one is descheduled.

    .venv/bin/python bench/train.py                       # hidden 384, 4 layers, seq 256, batch 8
    .venv/bin/python bench/train.py --threads 1 --dtype bf16
    .venv/bin/python bench/train.py --preset tiny --steps 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from llm360.config import MODEL_PRESETS, ModelConfig, TrainConfig
from llm360.model.hf import reference_model
from llm360.model.llama import Llama, num_parameters
from llm360.train.optim import build_optimizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(MODEL_PRESETS), help="model preset (overrides the sizes)")
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=None, help="grouped-query attention (default: heads)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument(
        "--dtype", choices=["fp32", "bf16", "both"], default="both",
        help="fp32, or bf16 autocast (activations in bf16, fp32 weights, as Amber trained) for both models",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--no-profile", action="store_true", help="skip the profiled step (matmul share and ceiling)"
    )
    return p.parse_args(argv)


def model_config(a: argparse.Namespace) -> ModelConfig:
    if a.preset:
        fields = {**MODEL_PRESETS[a.preset], "vocab_size": a.vocab, "max_seq_len": a.seq}
        return ModelConfig(name=a.preset, **fields)
    return ModelConfig(
        name="bench", vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
        num_layers=a.layers, num_heads=a.heads, num_kv_heads=a.kv_heads, max_seq_len=a.seq,
    )  # fmt: skip


def hf_model(cfg: ModelConfig) -> torch.nn.Module:
    """transformers' LlamaForCausalLM with the same architecture (the baseline)."""
    return reference_model(cfg, attn_implementation="sdpa")


def make_step(
    opt: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor], device: str, dtype: str
) -> Callable[[], float]:
    autocast = torch.autocast(
        device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == "bf16"
    )

    def step() -> float:
        with autocast:
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def run_pair(a: argparse.Namespace, cfg: ModelConfig, dtype: str) -> dict[str, float]:
    """Time both models under one precision; print and return the ratios."""
    torch.manual_seed(0)
    ours = Llama(cfg).to(a.device).train()
    theirs = hf_model(cfg).to(a.device).train()
    theirs.load_state_dict(ours.state_dict())
    seq = torch.randint(0, cfg.vocab_size, (a.batch, a.seq + 1), generator=torch.Generator().manual_seed(1))
    x, y = seq[:, :-1].to(a.device), seq[:, 1:].contiguous().to(a.device)
    tcfg = TrainConfig(lr=3e-4, beta1=0.9, beta2=0.95, weight_decay=0.1)
    hf_opt = torch.optim.AdamW(theirs.parameters(), lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2),
                               weight_decay=tcfg.weight_decay, fused=True)  # fmt: skip
    steps = {
        "llm360": make_step(build_optimizer(ours, tcfg), lambda: ours(x, y)[1], a.device, dtype),
        "transformers": make_step(
            hf_opt, lambda: theirs(input_ids=x, labels=y, shift_labels=y).loss, a.device, dtype
        ),
    }
    first = {name: step() for name, step in steps.items()}
    print(
        f"[{dtype}] first-step loss: llm360 {first['llm360']:.6f}  transformers {first['transformers']:.6f}"
    )
    for _ in range(a.warmup - 1):
        for step in steps.values():
            step()
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    for i in range(a.steps):
        for name in order if i % 2 == 0 else order[::-1]:
            t0, c0 = time.perf_counter(), time.process_time()
            steps[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    tokens = a.batch * a.seq
    ratios = {}
    for label, times in (("wall", wall), ("cpu", cpu)):
        med = {n: tokens / statistics.median(t) for n, t in times.items()}
        best = {n: tokens / min(t) for n, t in times.items()}
        unit = "tokens/s" if label == "wall" else "tokens/cpu-s"
        for n in steps:
            print(f"[{dtype}] {label:>4} {n:>13}: median {med[n]:8.0f} {unit:12}  best {best[n]:8.0f}")
        ratios[label] = med["llm360"] / med["transformers"]
        print(
            f"[{dtype}] {label:>4} ratio llm360/transformers: median {ratios[label]:.2f}x   "
            f"best {best['llm360'] / best['transformers']:.2f}x"
        )
    if not a.no_profile:
        matmul_ceiling(steps, dtype)
    return ratios


MATMUL_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"})


def matmul_ceiling(steps: dict[str, Callable[[], float]], dtype: str) -> None:
    """Profile one step of each model: the share of matrix multiplies, and what it bounds.

    Both models do the same matmuls (same FLOPs, same kernels), so a step can never be faster than
    those: transformers' step time / its matmul time is the best ratio any amount of fusing the
    rest could reach. (SDPA's attention kernel is counted as "rest": it is the same in both.)
    """
    from torch.profiler import ProfilerActivity, profile

    shares = {}
    for name, step in steps.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        mm = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
        shares[name] = (mm, total)
        print(
            f"[{dtype}] profile {name:>13}: matmuls {mm / 1e3:7.1f} ms of {total / 1e3:7.1f} ms ({mm / total:.0%})"
        )
    mm_hf, total_hf = shares["transformers"]
    print(
        f"[{dtype}] ceiling: a step of nothing but transformers' matmuls would be {total_hf / mm_hf:.2f}x "
        f"transformers' step; outside matmuls: llm360 {(shares['llm360'][1] - shares['llm360'][0]) / 1e3:.1f} "
        f"ms, transformers {(total_hf - mm_hf) / 1e3:.1f} ms"
    )


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = model_config(a)
    print(
        f"model {cfg.name}: hidden {cfg.hidden_size}, layers {cfg.num_layers}, heads {cfg.num_heads}"
        f"/{cfg.num_kv_heads or cfg.num_heads}, mlp {cfg.intermediate_size}, vocab {cfg.vocab_size}, "
        f"{num_parameters(cfg) / 1e6:.1f}M params | batch {a.batch} x seq {a.seq} = {a.batch * a.seq} "
        f"tokens/step | {a.device}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{platform.machine()}, {os.cpu_count()} cpus, load avg {os.getloadavg()[0]:.1f}"
    )
    for dtype in ("fp32", "bf16") if a.dtype == "both" else (a.dtype,):
        run_pair(a, cfg, dtype)
    print(f"({a.steps} timed steps per model and precision, interleaved; load avg {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
