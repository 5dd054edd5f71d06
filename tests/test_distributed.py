"""Distributed training on CPU: two gloo processes under torchrun against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm360.config import to_yaml, validate_config
from llm360.data.prepare import prepare
from llm360.train.loop import train
from test_train import read_jsonl, tiny_run_config


def torchrun(nproc: int, cfg_path: Path, run: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "llm360.cli", "--no-progress", "train", str(cfg_path), "--run-dir", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, start_new_session=True)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_ranks_match_one_and_resume_on_another_world_size(tmp_path: Path, parallelism: str):
    cfg = tiny_run_config(tmp_path, parallelism=parallelism)
    raw = cfg.model_dump(mode="json")
    raw["train"]["max_chunks"] = 1
    one_chunk = validate_config(raw)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(to_yaml(one_chunk))

    prepare(cfg, tmp_path / "single")
    train(cfg, tmp_path / "single")
    prepare(cfg, tmp_path / "dist")
    torchrun(2, cfg_path, tmp_path / "dist")

    single = read_jsonl(tmp_path / "single" / "metrics" / "train.jsonl")
    dist = read_jsonl(tmp_path / "dist" / "metrics" / "train.jsonl")
    assert dist and all(r["world_size"] == 2 for r in dist)
    for a, b in zip(single, dist, strict=False):
        assert a["step"] == b["step"] and a["chunk"] == b["chunk"]
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"]))
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * max(1.0, abs(a["grad_norm"]))
    w1 = load_file(str(tmp_path / "single" / "checkpoints" / "ckpt_000" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "dist" / "checkpoints" / "ckpt_000" / "model.safetensors"))
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5)

    dcp_copy = tmp_path / "dist" / "checkpoints" / "dcp" / "ckpt_000"
    assert (dcp_copy / "llm360_dcp.json").is_file() == (parallelism == "fsdp")
    if parallelism == "fsdp":
        # chunk 1 on two ranks again: each reads its own shards from the sharded copy
        raw["train"]["max_chunks"] = 2
        cfg_path.write_text(to_yaml(validate_config(raw)))
        torchrun(2, cfg_path, tmp_path / "dist")
        resume = [e for e in read_jsonl(tmp_path / "dist" / "metrics" / "events.jsonl") if e["event"] == "resume"]
        assert resume[-1]["sharded"] is True and resume[-1]["world_size"] == 2
        from llm360.release.build import release

        rel = release(tmp_path / "dist", tmp_path / "rel")
        assert not (rel / "checkpoints" / "dcp").exists()

    # the rest of the run on ONE process, resuming the two-process checkpoint
    train(cfg, tmp_path / "dist")
    events = read_jsonl(tmp_path / "dist" / "metrics" / "events.jsonl")
    resume = [e for e in events if e["event"] == "resume"]
    assert resume and resume[-1]["world_size"] == 1
    state = json.loads((tmp_path / "dist" / "checkpoints" / "ckpt_002" / "trainer_state.json").read_text())
    assert state["world_size_history"] == [2, 1]
    assert resume[-1]["sharded"] is False
    wa = load_file(str(tmp_path / "single" / "checkpoints" / "ckpt_002" / "model.safetensors"))
    wb = load_file(str(tmp_path / "dist" / "checkpoints" / "ckpt_002" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=1e-4)
