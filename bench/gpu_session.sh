#!/usr/bin/env bash
# Every GPU measurement and check of llm360 in one call, for a GPU machine lent for a few minutes.
#
#   bench/gpu_session.sh OUT_DIR              # on the GPU machine: about 8 minutes on one H100/H200
#   QUICK=1 bench/gpu_session.sh OUT_DIR      # the same steps at toy sizes on the CPU (a smoke test)
#
# Steps, each with its own time limit and log (OUT_DIR/<step>.log); a step that fails or runs out
# of time is recorded in OUT_DIR/summary.txt and the next one still runs:
#   env           nvidia-smi, python, torch; installs the wheels carried in .gpu-wheels (if any)
#   gpu           bench/gpu.py: the 1b preset, seq 2048, bf16, compiled, beside LlamaForCausalLM
#                 eager and compiled, with MFU and a large bf16 matmul's rate (issue: MFU >= 62%)
#   memorization  bench/memorization.py on the GPU: our scorer against transformers.generate
#   train         `llm360 prepare` + `llm360 train` (2 chunks of the embedded default, bf16 autocast
#                 and fused AdamW on CUDA, deterministic mode), then the same run killed with
#                 SIGKILL after its first checkpoint and resumed: are the final weights identical?
#
# The GPU image has torch and transformers but not pydantic or zstandard: fetch their wheels here
# once (`bash bench/gpu_session.sh --wheels`; .gpu-wheels is git-ignored) and carry them, e.g.
#   run(command="bash bench/gpu_session.sh $OUT", carry=[".gpu-wheels"], timeout_s=600)
set -u
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--wheels" ]; then
  exec python3 -m pip download -q -d .gpu-wheels --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 "pydantic>=2.7" "zstandard>=0.22"
fi

OUT=${1:?usage: bench/gpu_session.sh OUT_DIR (or --wheels)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
QUICK=${QUICK:-0}
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=$PWD/.venv/bin/python
else PY=python3
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

step() {  # step NAME SECONDS COMMAND...: run it with a time limit, log it, note how it ended
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  timeout --kill-after=10 "$limit" bash -c '"$@"' step "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name: rc=$rc$([ $rc = 124 ] && echo ' (time limit)') in $((SECONDS - t0)) s" | tee -a "$SUMMARY"
}

env_step() {
  nvidia-smi || echo "no nvidia-smi"
  "$PY" --version
  if [ -d .gpu-wheels ] && ! "$PY" -c "import pydantic, zstandard" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps .gpu-wheels/*.whl
  fi
  "$PY" -c "import torch, transformers, llm360.config; print('torch', torch.__version__, 'cuda', \
torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else ''); \
print('transformers', transformers.__version__)"
}

train_step() {  # an uninterrupted run (a), and one killed after its first checkpoint and resumed (b)
  local dev=$1 root
  root=$(mktemp -d)
  trap 'rm -rf "$root"' RETURN
  local sets=(--set train.max_chunks=2 --set train.deterministic=true)
  "$PY" -m llm360.cli --no-progress prepare --run-dir "$root/a" || return 1
  cp -r "$root/a" "$root/b"  # the same prepared data for both runs
  "$PY" -m llm360.cli --no-progress train --run-dir "$root/a" --device "$dev" "${sets[@]}" || return 1
  local marker  # the marker of run b's first checkpoint, as the run directory's format names it
  marker=$("$PY" -c 'import sys; from llm360.rundir.layout import MARKER, RunDir
print(RunDir(sys.argv[1]).ckpt_dir(0) / MARKER)' "$root/b") || return 1
  "$PY" -m llm360.cli --no-progress train --run-dir "$root/b" --device "$dev" "${sets[@]}" &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null && [ ! -f "$marker" ]; do sleep 0.2; done
  sleep 1
  kill -9 "$pid" 2>/dev/null && echo "killed the run at $(date +%T) after ckpt_000"
  wait "$pid" 2>/dev/null
  "$PY" -m llm360.cli --no-progress train --run-dir "$root/b" --device "$dev" "${sets[@]}" || return 1
  "$PY" - "$root" <<'EOF'
import json, sys
from pathlib import Path
import torch
from llm360.rundir.checkpoint import load_model_state
from llm360.rundir.layout import RunDir
root = Path(sys.argv[1])
a, b = (load_model_state(RunDir(root / r).ckpt_dir(1)) for r in ("a", "b"))
same = all(torch.equal(a[k], b[k]) for k in a)
diff = max(float((a[k] - b[k]).abs().max()) for k in a)
print(f"resumed after SIGKILL vs uninterrupted, ckpt_001 weights: identical={same} max|diff|={diff:.3g}")
lines = [json.loads(x) for x in (root / "a" / "metrics" / "train.jsonl").read_text().splitlines() if x]
last = lines[-1]
print("last step of run a:", {k: last.get(k) for k in ("step", "loss", "tokens_per_s", "mfu", "cuda_max_allocated_mb")})
EOF
}

export PY OUT
export -f env_step train_step
step env 120 env_step
if [ "$QUICK" = 1 ]; then
  step gpu 300 "$PY" bench/gpu.py --preset tiny --device cpu --vocab 512 --seq 32 --batch 2 --steps 2 \
    --warmup 1 --matmul-size 128 --compile-backend eager
  step memorization 300 "$PY" bench/memorization.py --device cpu --rows 16 --hidden 32 --layers 1 \
    --heads 2 --vocab 256 --train-steps 2 --repeats 1 --models random
  step train 300 train_step cpu
else
  step gpu 330 "$PY" bench/gpu.py --batch 8    # the issue's reference numbers used micro-batch 8
  step memorization 120 "$PY" bench/memorization.py --device cuda --threads 4
  step train 180 train_step cuda
fi
echo "logs in $OUT"
