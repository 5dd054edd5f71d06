"""bench/gpu.py runs on CPU with tiny sizes, so it is known to work before it meets a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_runs_on_cpu():
    cmd = [
        sys.executable, str(ROOT / "bench" / "gpu.py"), "--preset", "tiny", "--device", "cpu",
        "--vocab", "512", "--seq", "32", "--batch", "2", "--steps", "2", "--warmup", "1",
        "--matmul-size", "128", "--compile-backend", "eager",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    for line in ("bf16 matmul", "llm360 compiled:", "transformers eager:", "transformers compiled:", "MFU"):
        assert line in out.stdout, out.stdout
    assert "llm360 compiled / transformers eager:" in out.stdout


@pytest.mark.slow
def test_gpu_session_script_runs_on_cpu(tmp_path: Path):
    """bench/gpu_session.sh at toy sizes on the CPU: every step ends well, the resume check included."""
    out = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_session.sh"), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "QUICK": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    summary = (tmp_path / "out" / "summary.txt").read_text()
    for name in ("env", "gpu", "memorization", "train"):
        assert f"{name}: rc=0" in summary, (summary, (tmp_path / "out" / f"{name}.log").read_text()[-3000:])
    train_log = (tmp_path / "out" / "train.log").read_text()
    assert "killed the run" in train_log and "identical=True" in train_log, train_log[-3000:]


def test_gpu_bench_reports_out_of_memory_and_goes_on(monkeypatch: pytest.MonkeyPatch, capsys):
    """One model running out of memory is reported; the others are still measured."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu
    finally:
        sys.path.remove(str(ROOT / "bench"))
    real = gpu.measure
    calls = []

    def measure(model, loss_fn, a, device):
        calls.append(type(model).__name__)
        if len(calls) == 2:  # transformers eager
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, loss_fn, a, device)

    monkeypatch.setattr(gpu, "measure", measure)
    gpu.main(["--preset", "tiny", "--device", "cpu", "--vocab", "256", "--seq", "16", "--batch", "2", "--steps", "1",
              "--warmup", "1", "--matmul-size", "64", "--compile-backend", "eager"])  # fmt: skip
    out = capsys.readouterr().out
    assert "transformers eager: out of memory at batch 2" in out
    assert "llm360 compiled / transformers compiled:" in out and "llm360 compiled / transformers eager" not in out
