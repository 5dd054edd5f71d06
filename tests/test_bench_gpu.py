"""bench/gpu.py runs on CPU with tiny sizes, so it is known to work before it meets a GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
