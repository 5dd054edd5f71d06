"""Distributed training on CPU: two gloo processes under torchrun against one process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from llm360.config import to_yaml, validate_config
from llm360.data.prepare import prepare
from llm360.train import train
from llm360.train.faults import INJECT_ENV
from test_train import assert_same_weights, read_jsonl, tiny_run_config


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun's workers run in sessions of their own, so
    killing its process group leaves them training)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_torchrun(nproc: int, cfg_path: Path, run: Path, **popen: Any) -> subprocess.Popen:
    """`llm360 train` under torchrun on gloo, one thread per rank, in a session of its own."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "llm360.cli", "--no-progress", "train", str(cfg_path), "--run-dir", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, start_new_session=True, **popen)


def torchrun(nproc: int, cfg_path: Path, run: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    proc = start_torchrun(nproc, cfg_path, run, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:  # timed out (or interrupted): no worker may outlive the test
            kill_tree(proc.pid)
            proc.communicate()
    if proc.returncode != 0:  # the workers' own errors first: torchrun's summary fills the tail
        own = [ln for ln in err.splitlines() if "torch/distributed/elastic" not in ln and (
            "rror" in ln or "terminate" in ln or "Traceback" in ln or "abort" in ln.lower())]
        pytest.fail("torchrun failed:\n" + "\n".join(own[-40:]) + "\n...\n" + err[-3000:])
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_bounded(cmd: list[str], timeout: int, **env: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` (one thread a process, in a session of its own, ``env`` added); every process it started
    is killed when it outlives ``timeout``. Fails the test, with the tail of its stderr, unless it exits 0."""
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    return subprocess.CompletedProcess(cmd, 0, out, err)


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_ranks_match_one_and_resume_on_another_world_size(tmp_path: Path, parallelism: str):
    cfg = tiny_run_config(tmp_path, parallelism=parallelism)
    raw = cfg.model_dump(mode="json")
    if parallelism == "fsdp":  # and muP: a third param group (the blocks' matrices at a scaled lr), sharded
        raw["model"]["mup"] = {"base_width": 16}
        cfg = validate_config(raw)
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

    assert sorted(p.name for p in (tmp_path / "dist" / "checkpoints").iterdir()) == ["ckpt_000", "init"]
    if parallelism == "fsdp":
        # chunk 1 on two ranks again: each reads only its own blocks of ckpt_000
        raw["train"]["max_chunks"] = 2
        cfg_path.write_text(to_yaml(validate_config(raw)))
        torchrun(2, cfg_path, tmp_path / "dist")
        resume = [e for e in read_jsonl(tmp_path / "dist" / "metrics" / "events.jsonl") if e["event"] == "resume"]
        assert resume[-1]["sharded"] is True and resume[-1]["world_size"] == 2

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


@pytest.mark.slow
def test_fsdp_bf16_uses_the_mixed_precision_policy_and_tracks_one_process(tmp_path: Path):
    cfg = tiny_run_config(tmp_path, parallelism="fsdp", precision="bf16", max_chunks=1)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(to_yaml(cfg))
    prepare(cfg, tmp_path / "single")
    train(cfg, tmp_path / "single")  # one process: bf16 autocast over fp32 weights
    prepare(cfg, tmp_path / "dist")
    done = torchrun(2, cfg_path, tmp_path / "dist")
    assert "parameters all-gathered in bf16, gradients reduced in fp32" in " ".join(done.stderr.split())
    single = read_jsonl(tmp_path / "single" / "metrics" / "train.jsonl")
    dist = read_jsonl(tmp_path / "dist" / "metrics" / "train.jsonl")
    assert len(dist) == len(single) > 3
    for a, b in zip(single, dist, strict=True):  # the same bf16 products; sums in another order
        assert abs(a["loss"] - b["loss"]) <= 2e-2 * abs(a["loss"])
    w = load_file(str(tmp_path / "dist" / "checkpoints" / "ckpt_000" / "model.safetensors"))
    assert {t.dtype for t in w.values()} == {torch.float32}  # the master weights, saved in fp32
    ref = load_file(str(tmp_path / "single" / "checkpoints" / "ckpt_000" / "model.safetensors"))
    for k in ref:
        torch.testing.assert_close(w[k], ref[k], rtol=0.05, atol=5e-3)


@pytest.mark.slow
@pytest.mark.parametrize(("parallelism", "tensor_parallel"), [("fsdp", 1), ("ddp", 2)])
def test_verify_replays_a_two_rank_run_bit_for_bit_under_torchrun(tmp_path: Path, parallelism: str,
                                                                   tensor_parallel: int):
    from llm360.release.build import release

    # FSDP or tensor parallel: a model that needs its shards on several ranks replays on as many, with the
    # run's layout
    cfg = tiny_run_config(tmp_path, parallelism=parallelism, tensor_parallel=tensor_parallel, max_chunks=2)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(to_yaml(cfg))
    prepare(cfg, tmp_path / "run")
    torchrun(2, cfg_path, tmp_path / "run")
    rel = release(tmp_path / "run", tmp_path / "rel")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "llm360.cli",
           "--no-progress", "verify", str(rel), "--replay", "0", "1", "--json"]
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    rep = json.loads(run_bounded(cmd, 240, TMPDIR=str(scratch)).stdout)  # rank 0's verdict alone: the other rank prints nothing
    assert rep["ok"], rep["problems"]
    assert [r["mode"] for r in rep["replays"]] == ["bitwise", "bitwise"]
    assert any("SHA256SUMS" in line or "sha256" in line for line in rep["passed"])
    assert not list(scratch.glob("llm360-replay-*"))  # the work folders are gone


REJOIN = """
import os, time
import torch, torch.distributed as dist
from llm360.train.parallel import destroy_distributed, init_distributed
rank = int(os.environ["RANK"])
for i in range(3):
    init_distributed("cpu")
    x = torch.tensor([rank + 1.0])
    dist.all_reduce(x)
    assert x.item() == 3.0, x
    dist.barrier()
    destroy_distributed()
    if rank == 0:
        time.sleep(1)  # rank 1 joins the next group first, as after a replay, whose rank 0 then compares
print("joined", i + 1)
"""


@pytest.mark.slow
def test_a_process_joins_a_new_process_group_after_destroying_one_under_torchrun(tmp_path: Path):
    # torchrun's store keeps the addresses the previous group's ranks published under the same keys
    script = tmp_path / "rejoin.py"
    script.write_text(REJOIN)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    assert run_bounded(cmd, 120).stdout.split("\n").count("joined 3") == 2


def first_chunk_and_the_rest(cfg, tmp: Path) -> tuple[Path, Path]:
    """Config files for training chunk 0 only, and for the whole run (what a second launch resumes)."""
    raw = cfg.model_dump(mode="json")
    raw["train"]["max_chunks"] = 1
    first, rest = tmp / "first.yaml", tmp / "rest.yaml"
    first.write_text(to_yaml(validate_config(raw)))
    rest.write_text(to_yaml(cfg))
    return first, rest


@pytest.mark.slow
def test_hsdp_two_by_two_matches_one_process_and_resumes_its_own_blocks(tmp_path: Path):
    """HSDP on 4 ranks (2 shard groups of 2): the same losses as one process, step by step, and a resume
    that reads (replicated x sharded) blocks back."""
    cfg = tiny_run_config(tmp_path, parallelism="hsdp", shard_group_size=2, micro_batch_sequences=2)
    first, rest = first_chunk_and_the_rest(cfg, tmp_path)
    single_cfg = validate_config({**cfg.model_dump(mode="json"),
                                  "train": {**cfg.model_dump(mode="json")["train"], "parallelism": "ddp",
                                            "shard_group_size": None}})
    prepare(single_cfg, tmp_path / "single")
    train(single_cfg, tmp_path / "single")
    prepare(cfg, tmp_path / "hsdp")
    torchrun(4, first, tmp_path / "hsdp")
    torchrun(4, rest, tmp_path / "hsdp")
    single = read_jsonl(tmp_path / "single" / "metrics" / "train.jsonl")
    dist = read_jsonl(tmp_path / "hsdp" / "metrics" / "train.jsonl")
    assert [r["step"] for r in dist] == [r["step"] for r in single] and all(r["world_size"] == 4 for r in dist)
    for a, b in zip(single, dist, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"])), (a["step"], a["loss"], b["loss"])
    resume = [e for e in read_jsonl(tmp_path / "hsdp" / "metrics" / "events.jsonl") if e["event"] == "resume"]
    assert resume and resume[-1]["sharded"] is True
    from llm360.rundir.checkpoint import load_model_state

    ref = load_model_state(tmp_path / "single" / "checkpoints" / "ckpt_002")
    got = load_model_state(tmp_path / "hsdp" / "checkpoints" / "ckpt_002")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(("nproc", "parallelism"), [(2, "ddp"), (4, "fsdp"), (8, "hsdp")])
def test_tensor_parallel_matches_one_process_and_resumes_its_own_blocks(tmp_path: Path, nproc: int, parallelism: str):
    """Tensor parallel 2 alone (2 ranks), data x tensor 2 x 2 (FSDP over the data dimension) and HSDP
    (2 x 2) x tensor 2: losses per step and final weights within 1e-5 of one process; the second launch
    reads its blocks of ckpt_000 back (q/k/v split by rows, o_proj by columns), and a single process
    resumes the same checkpoint. Tensor parallel alone runs compiled, data x tensor with activation
    checkpointing."""
    cfg = tiny_run_config(tmp_path, parallelism=parallelism, tensor_parallel=2, micro_batch_sequences=1,
                          shard_group_size=2 if parallelism == "hsdp" else None,
                          activation_checkpointing=parallelism == "fsdp",  # recomputed blocks: the same numbers
                          compile=parallelism == "ddp")
    first, rest = first_chunk_and_the_rest(cfg, tmp_path)
    raw = cfg.model_dump(mode="json")
    # (the in-process runs are not compiled: torch.compile's state would outlive them in the test process)
    single_cfg = validate_config({**raw, "train": {**raw["train"], "parallelism": "ddp", "tensor_parallel": 1,
                                                   "shard_group_size": None, "compile": False}})
    one_rank = validate_config({**raw, "train": {**raw["train"], "tensor_parallel": 1,  # the same run on 1
                                                 "compile": False}})
    prepare(single_cfg, tmp_path / "single")
    train(single_cfg, tmp_path / "single")
    prepare(cfg, tmp_path / "tp")
    done = torchrun(nproc, first, tmp_path / "tp")
    assert f"every block split over 2 ranks, {nproc // 2} data-parallel" in " ".join(done.stderr.split())
    runs = ["tp"]
    if parallelism != "hsdp":  # (HSDP needs several ranks)
        shutil.copytree(tmp_path / "tp", tmp_path / "on1", symlinks=True)
        train(one_rank, tmp_path / "on1")
        runs.append("on1")
    torchrun(nproc, rest, tmp_path / "tp")
    single = read_jsonl(tmp_path / "single" / "metrics" / "train.jsonl")
    dist = read_jsonl(tmp_path / "tp" / "metrics" / "train.jsonl")
    assert [r["step"] for r in dist] == [r["step"] for r in single] and all(r["world_size"] == nproc for r in dist)
    for a, b in zip(single, dist, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"])), (a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * max(1.0, abs(a["grad_norm"]))
    resume = [e for e in read_jsonl(tmp_path / "tp" / "metrics" / "events.jsonl") if e["event"] == "resume"]
    assert resume and resume[-1]["sharded"] is True and resume[-1]["world_size"] == nproc
    from llm360.rundir.checkpoint import load_model_state

    ref = load_model_state(tmp_path / "single" / "checkpoints" / "ckpt_002")
    for run in runs:
        got = load_model_state(tmp_path / run / "checkpoints" / "ckpt_002")
        assert got.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-5, msg=f"{run}: {k}")


@pytest.mark.slow
def test_four_rank_sharded_checkpoint_resumes_on_three_ranks_and_on_one(tmp_path: Path):
    """FSDP on 4 ranks writes ckpt_000 in shards (every rank its own files); the run then goes on
    from it on 3 ranks and, separately, on 1 process: both end where an uninterrupted run ends."""
    cfg = tiny_run_config(tmp_path, parallelism="fsdp", checkpoint_shard_mb=0.02,  # 20 kB files
                          global_batch_sequences=12, micro_batch_sequences=1)  # 12 splits over 4 and 3
    first, rest = first_chunk_and_the_rest(cfg, tmp_path)
    prepare(cfg, tmp_path / "single")
    train(cfg, tmp_path / "single")
    prepare(cfg, tmp_path / "on3")
    torchrun(4, first, tmp_path / "on3")
    ck0 = tmp_path / "on3" / "checkpoints" / "ckpt_000"
    assert len(list(ck0.glob("model-*-of-*.safetensors"))) >= 3 and (ck0 / "model.safetensors.index.json").is_file()
    shutil.copytree(tmp_path / "on3", tmp_path / "on1", symlinks=True)
    torchrun(3, rest, tmp_path / "on3")
    train(cfg, tmp_path / "on1")
    from llm360.rundir.checkpoint import load_model_state

    ref = load_model_state(tmp_path / "single" / "checkpoints" / "ckpt_002")
    for run, world, sharded in (("on3", 3, True), ("on1", 1, False)):
        resume = [e for e in read_jsonl(tmp_path / run / "metrics" / "events.jsonl") if e["event"] == "resume"]
        assert resume[-1]["world_size"] == world and resume[-1]["sharded"] is sharded
        state = json.loads((tmp_path / run / "checkpoints" / "ckpt_002" / "trainer_state.json").read_text())
        assert state["world_size_history"] == [4, world]
        got = load_model_state(tmp_path / run / "checkpoints" / "ckpt_002")
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-3, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("policy", "nan_steps", "restored", "earlier_launch"),
    [
        # NaN inside chunk 1: back to ckpt_000, each rank reading its blocks of it
        pytest.param("rollback_skip_chunk", "24", ["ckpt_000"], False, id="skip_chunk"),
        # the same with chunk 0 trained by an earlier launch
        pytest.param("rollback_skip_chunk", "24", ["ckpt_000"], True, id="skip_chunk-earlier_launch"),
        # NaN inside chunk 0, then in chunk 1: back to init (an empty optimizer state), then to ckpt_000
        pytest.param("rollback_reseed", "2,24", ["init", "ckpt_000"], False, id="reseed-init_then_ckpt"),
    ],
)
def test_fsdp_rollback_restores_sharded_state_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: str, nan_steps: str, restored: list[str],
    earlier_launch: bool,
):
    cfg = tiny_run_config(tmp_path, parallelism="fsdp", checkpoint_every_steps=4,
                          guards={"nonfinite_policy": policy})
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(to_yaml(cfg))
    prepare(cfg, tmp_path / "single")
    monkeypatch.setenv(INJECT_ENV, nan_steps)
    single = train(cfg, tmp_path / "single")
    prepare(cfg, tmp_path / "dist")
    if earlier_launch:
        raw = cfg.model_dump(mode="json")
        raw["train"]["max_chunks"] = 1
        first_path = tmp_path / "first.yaml"
        first_path.write_text(to_yaml(validate_config(raw)))
        torchrun(2, first_path, tmp_path / "dist")
    torchrun(2, cfg_path, tmp_path / "dist")  # inherits the injected steps
    monkeypatch.delenv(INJECT_ENV)

    run = tmp_path / "dist"
    events = [e for e in read_jsonl(run / "metrics" / "events.jsonl") if e["event"] == policy]
    assert [e["restored"] for e in events] == restored
    assert all(e["sharded"] for e in events)  # each rank read its own blocks
    ck = run / "checkpoints"
    state = json.loads((ck / "ckpt_002" / "trainer_state.json").read_text())
    assert state["step"] == single["step"] and state["rollbacks"] == len(restored)
    assert state["skipped_chunks"] == single["skipped_chunks"]
    if policy == "rollback_skip_chunk":
        # chunk 1 skipped: ckpt_001 is ckpt_000's state, restored from the shards and gathered again
        assert_same_weights(ck / "ckpt_000", ck / "ckpt_001")
        opt0 = load_file(str(ck / "ckpt_000" / "optimizer.safetensors"))
        opt1 = load_file(str(ck / "ckpt_001" / "optimizer.safetensors"))
        assert opt0.keys() == opt1.keys() and all(torch.equal(opt0[k], opt1[k]) for k in opt0)
        # the abandoned attempt's step checkpoints (inside chunk 1) are gone; chunk 1's steps run
        # between ckpt_000's and ckpt_001's
        lo, hi = (json.loads((ck / c / "trainer_state.json").read_text())["step"] for c in ("ckpt_000", "ckpt_001"))
        assert lo < 24 < hi
        assert not [p for p in (ck / "steps").glob("step_*") if lo < int(p.name.split("_")[1]) < hi]
    else:
        assert state["chunk_reseeds"] == {"0": 1, "1": 1}
    assert sorted(ck.glob("steps/step_*")) and not (ck / "dcp").exists()
    # the same training as one process with the same policy: the rollback restored the state
    w1, w2 = load_file(str(tmp_path / "single" / "checkpoints" / "ckpt_002" / "model.safetensors")), \
        load_file(str(ck / "ckpt_002" / "model.safetensors"))
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_fsdp_killed_with_sigkill_resumes_to_the_same_weights(tmp_path: Path):
    """Two FSDP ranks killed (the whole torchrun group, SIGKILL) while training and saving, then
    restarted: the final checkpoint equals an uninterrupted two-rank run's, bit for bit."""
    cfg = tiny_run_config(tmp_path, parallelism="fsdp", checkpoint_every_steps=5, deterministic=True)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(to_yaml(cfg))
    for run in ("ref", "killed"):
        prepare(cfg, tmp_path / run)
    torchrun(2, cfg_path, tmp_path / "ref")

    run = tmp_path / "killed"
    kills = 0
    for wait_for in ("steps/step_00000005", "ckpt_000", "ckpt_001"):  # kill soon after each appears
        proc = start_torchrun(2, cfg_path, run, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 180
            while not (run / "checkpoints" / wait_for / "COMPLETE.json").exists() and proc.poll() is None:
                assert time.monotonic() < deadline, f"{wait_for} never appeared"
                time.sleep(0.05)
            time.sleep(0.3)  # into the next steps or the next save
        finally:
            if proc.poll() is None:
                kill_tree(proc.pid)  # the agent and both workers, as a preempted node
                kills += 1
            proc.wait(timeout=30)
    assert kills >= 2
    torchrun(2, cfg_path, run)  # finishes the run from the latest complete checkpoint
    for i in range(3):
        assert_same_weights(tmp_path / "ref" / "checkpoints" / f"ckpt_{i:03d}", run / "checkpoints" / f"ckpt_{i:03d}")
    resumes = [e for e in read_jsonl(run / "metrics" / "events.jsonl") if e["event"] == "resume"]
    assert len(resumes) >= kills and all(e["world_size"] == 2 for e in resumes)


def spawn_ranks(worker: Any, world: int, tmp: Path, timeout: float = 120) -> None:
    """Run ``worker(rank, world, init_file, out_dir)`` in ``world`` spawned processes (a gloo group through
    a file in ``tmp``, results written to ``tmp``); fails if they have not all finished within
    ``timeout`` seconds, and kills every one still alive."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=(world, str(tmp / "init"), str(tmp)), nprocs=world,
                             join=False, start_method="spawn")  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, "the ranks did not finish: a collective is waiting"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def _agreement_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from llm360.errors import CheckpointError, Llm360Error, RunDirError
    from llm360.train.parallel import DistInfo, same_on_every_rank, together

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    info = DistInfo(rank, world)
    seen: dict[str, list[str]] = {}
    try:
        with together(info):
            if rank == 1:
                raise CheckpointError("ckpt_003/model.safetensors does not match its marker")
    except Llm360Error as e:
        seen["together"] = [type(e).__name__, str(e)]
    with together(info):  # nobody fails: nobody raises
        pass
    try:
        with together(info):
            if rank == 0:
                raise KeyError("step")  # a bug, not a user's mistake: still no rank left waiting
    except (KeyError, RuntimeError) as e:
        seen["bug"] = [type(e).__name__, str(e)]
    try:
        same_on_every_rank("ckpt_001 at step 40" if rank == 0 else None, "latest complete checkpoint", info)
    except RunDirError as e:
        seen["same"] = [type(e).__name__, str(e)]
    same_on_every_rank("ckpt_001", "latest complete checkpoint", info)
    Path(out, f"{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


def test_a_failure_on_one_rank_is_raised_on_every_rank(tmp_path: Path):
    # One rank failing to read a checkpoint must not leave the others waiting in a collective,
    # and ranks that see different checkpoints must not train on.
    spawn_ranks(_agreement_worker, 2, tmp_path)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"{rank}.json").read_text())
        kind, msg = seen["together"]
        assert kind == "CheckpointError" and "ckpt_003/model.safetensors does not match its marker" in msg
        assert msg.startswith("rank 1: ") == (rank == 0)  # the others say which rank failed
        kind, msg = seen["bug"]
        assert (kind, msg) == (("KeyError", "'step'") if rank == 0 else
                               ("RuntimeError", "rank 0 failed with KeyError: 'step' (its traceback is in its log)"))
        kind, msg = seen["same"]
        assert kind == "RunDirError"
        assert "rank 0: ckpt_001 at step 40; rank 1: None" in msg and "shared by all nodes" in msg


def _gather_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from llm360.train.parallel import DistInfo, gather_to_owners

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    info = DistInfo(rank, world)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    full = {"rows": torch.arange(7 * 3, dtype=torch.float32).view(7, 3),  # 7 rows: uneven blocks
            "cols": torch.arange(4 * 5, dtype=torch.float32).view(4, 5),
            "dp_only": torch.arange(5 * 2, dtype=torch.float32).view(5, 2),
            "plain": torch.ones(3)}
    tensors = {
        "rows": distribute_tensor(full["rows"], mesh, [Shard(0), Shard(0)]),
        "cols": distribute_tensor(full["cols"], mesh, [Replicate(), Shard(1)]),
        "dp_only": distribute_tensor(full["dp_only"], mesh["dp"], [Shard(0)]),  # a copy on each tp column
        "plain": full["plain"],
    }
    owner = {"rows": 3, "cols": 1, "dp_only": 2, "plain": 0}
    got = gather_to_owners(tensors, owner, info)
    Path(out, f"{rank}.json").write_text(json.dumps({
        "names": sorted(got), "equal": all(torch.equal(got[n], full[n]) for n in got)}))
    dist.destroy_process_group()


def test_a_save_gathers_each_sharded_tensor_to_its_owner_only(tmp_path: Path):
    # 4 ranks on a (2 x 2) mesh: a tensor split twice by rows (uneven), one by columns and replicated,
    # one on a sub-mesh (a copy per tensor-parallel column), one plain: the owner alone gets each, whole
    spawn_ranks(_gather_worker, 4, tmp_path)
    want = {0: ["plain"], 1: ["cols"], 2: ["dp_only"], 3: ["rows"]}
    for rank in range(4):
        seen = json.loads((tmp_path / f"{rank}.json").read_text())
        assert seen == {"names": want[rank], "equal": True}, (rank, seen)
