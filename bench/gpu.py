"""GPU training throughput and MFU: llm360's Llama (compiled) vs transformers' LlamaForCausalLM.

One run measures, on the same device and one after another:

1. the rate of a large bf16 matmul (what this GPU really delivers, beside its datasheet peak);
2. llm360's Llama, torch.compile'd, bf16 autocast with fp32 weights, fused AdamW;
3. transformers' LlamaForCausalLM with the same config, weights, batch and optimizer, eager;
4. the same, torch.compile'd.

For each: tokens/s and MFU = tokens/s * flops_per_token / peak, with flops_per_token =
6 * N + 12 * L * D * T (N without the input embedding) and peak = --peak-tflops (989 for H100 and
H200 SXM, dense bf16). Default: the `1b` preset, vocab 32000, seq 2048.

    python bench/gpu.py                                   # on a GPU machine
    python bench/gpu.py --preset tiny --device cpu --vocab 512 --seq 64 --batch 2 --steps 2 \\
        --warmup 1 --matmul-size 256 --compile-backend eager  # a quick CPU check of the script
"""

from __future__ import annotations

import argparse
import gc
import platform
import time
from collections.abc import Callable

import torch

from llm360.config import MODEL_PRESETS, ModelConfig
from llm360.model.hf import reference_model
from llm360.model.llama import Llama, flops_per_token, num_parameters


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="1b", choices=sorted(MODEL_PRESETS))
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--steps", type=int, default=20, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    p.add_argument("--matmul-size", type=int, default=8192, help="n of the n x n x n bf16 matmul probe")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    p.add_argument("--skip-hf", action="store_true", help="only measure llm360's model")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(n: int, device: torch.device, reps: int = 10) -> float:
    """Achieved TFLOP/s of an n x n x n bf16 matmul."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def hf_model(cfg: ModelConfig) -> torch.nn.Module:
    """transformers' LlamaForCausalLM with the same architecture (the baseline)."""
    return reference_model(cfg, attn_implementation="sdpa", use_cache=False)


def measure(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module], torch.Tensor],
    a: argparse.Namespace,
    device: torch.device,
) -> tuple[float, list[float]]:
    """Median tokens/s of forward + backward + AdamW steps, and the losses of every step."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    times, losses = [], []
    for i in range(a.warmup + a.steps):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            loss = loss_fn(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # synchronizes
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    return a.batch * a.seq / times[len(times) // 2], losses


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    device = torch.device(a.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    fields = {**MODEL_PRESETS[a.preset], "vocab_size": a.vocab, "max_seq_len": a.seq}
    cfg = ModelConfig(**{**fields, "name": a.preset})
    fpt = flops_per_token(cfg, a.seq)
    peak = a.peak_tflops * 1e12
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"{gpu} | torch {torch.__version__} | preset {a.preset}: {num_parameters(cfg) / 1e9:.3f}B params, "
        f"vocab {a.vocab}, seq {a.seq}, batch {a.batch} | {fpt / 1e9:.2f} GFLOP/token | "
        f"peak {a.peak_tflops:.0f} TFLOP/s"
    )
    mm = matmul_tflops(a.matmul_size, device)
    print(f"bf16 matmul {a.matmul_size}^3: {mm:.1f} TFLOP/s ({mm * 1e12 / peak:.1%} of peak)")

    seq = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=torch.Generator().manual_seed(1))
    x, y = seq[:, :-1].to(device), seq[:, 1:].contiguous().to(device)
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in Llama(cfg).state_dict().items()}  # one set of weights for all

    runs: list[tuple[str, Callable[[], torch.nn.Module], bool, Callable]] = [
        ("llm360 compiled", lambda: Llama(cfg), True, lambda m: m(x, y)[1]),
    ]
    if not a.skip_hf:
        hf_loss = lambda m: m(input_ids=x, labels=y, shift_labels=y).loss  # noqa: E731
        runs += [
            ("transformers eager", lambda: hf_model(cfg), False, hf_loss),
            ("transformers compiled", lambda: hf_model(cfg), True, hf_loss),
        ]
    results = {}
    for name, build, compiled, loss_fn in runs:
        model = build()
        model.load_state_dict(state)
        model.to(device).train()
        run = torch.compile(model, backend=a.compile_backend) if compiled else model
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            tps, losses = measure(run, loss_fn, a, device)
        except torch.OutOfMemoryError:  # say so and measure the others: a GPU call is one shot
            print(f"{name:>22}: out of memory at batch {a.batch} x seq {a.seq} (try a smaller --batch)")
        else:
            mem = (
                f", peak mem {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
                if device.type == "cuda"
                else ""
            )
            results[name] = tps
            print(
                f"{name:>22}: {tps:10.0f} tokens/s   MFU {tps * fpt / peak:6.1%}   "
                f"loss {losses[0]:.4f} -> {losses[-1]:.4f}{mem}"
            )
        del model, run
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ours = results.get("llm360 compiled")
    for name, tps in results.items():
        if ours is not None and name != "llm360 compiled":
            print(f"llm360 compiled / {name}: {ours / tps:.2f}x")


if __name__ == "__main__":
    main()
