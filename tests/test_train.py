"""Trainer promises: complete checkpoints, exact resume (with real kills), guards, metrics."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import small_config
from llm360.config import validate_config
from llm360.data.prepare import prepare
from llm360.errors import CheckpointError, ConfigError, DataError, RunDirError
from llm360.rundir import checkpoint as ckpt
from llm360.train import TrainingStopped, train
from llm360.train.faults import INJECT_ENV


def tiny_run_config(tmp: Path, **train_overrides):
    cfg = small_config(tmp, n_docs=45, chunks=3, seq_len=32)
    raw = cfg.model_dump(mode="json")
    raw["model"] = {"name": "tiny", "hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2}
    raw["train"] = {"global_batch_sequences": 8, "micro_batch_sequences": 4, "warmup_steps": 5,
                    "lr": 3e-3, "min_lr": 3e-4, **train_overrides}
    return validate_config(raw)


@pytest.fixture
def prepared(tmp_path: Path):
    cfg = tiny_run_config(tmp_path)
    prepare(cfg, tmp_path / "run")
    return cfg, tmp_path / "run"


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs between {a} and {b}"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_train_writes_a_complete_checkpoint_per_chunk(prepared):
    cfg, run = prepared
    summary = train(cfg, run)
    assert summary["done"]
    names = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("ckpt_"))
    assert names == ["ckpt_000", "ckpt_001", "ckpt_002"]
    for n in names:
        ckpt.verify_checkpoint(run / "checkpoints" / n)
        files = {p.name for p in (run / "checkpoints" / n).iterdir()}
        assert {"model.safetensors", "optimizer.safetensors", "trainer_state.json", "config.json",
                "config.yaml", "tokenizer.json"} <= files
        assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    rows = read_jsonl(run / "metrics" / "train.jsonl")
    assert [r["step"] for r in rows] == list(range(summary["step"]))
    for key in ("loss", "grad_norm", "lr", "tokens_per_s", "chunk", "tokens_seen", "rss_mb"):
        assert key in rows[0]
    assert rows[-1]["loss"] < rows[0]["loss"]
    state = json.loads((run / "checkpoints" / "ckpt_002" / "trainer_state.json").read_text())
    assert state["step"] == summary["step"] and state["data_cursor"]["next_step"] == summary["step"]
    # again: nothing to do
    assert train(cfg, run)["done"]


def test_checkpoint_folder_is_a_hugging_face_model(prepared):
    from transformers import AutoModelForCausalLM

    from llm360.model.llama import Llama

    cfg, run = prepared
    train(cfg, run)
    folder = run / "checkpoints" / "ckpt_001"
    hf = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    cfg_m = json.loads((folder / "config.json").read_text())
    ours = Llama(cfg.model.model_copy(update={"vocab_size": cfg_m["vocab_size"], "max_seq_len": 32}))
    ours.load_state_dict(weights(folder))
    ours.eval()
    x = torch.randint(0, cfg_m["vocab_size"], (2, 16))
    with torch.no_grad():
        diff = (hf(x).logits - ours(x)).abs().max().item()
    assert diff <= 1e-5


@pytest.mark.parametrize("mup", [False, True])
def test_resume_after_stop_is_bitwise(tmp_path: Path, mup: bool):
    cfg = tiny_run_config(tmp_path, checkpoint_every_steps=3)
    if mup:  # three param groups, the blocks' matrices at lr / 2
        raw = cfg.model_dump(mode="json")
        raw["model"]["mup"] = {"base_width": 16, "embedding_multiplier": 2.0}
        cfg = validate_config(raw)
    prepare(cfg, tmp_path / "a")
    prepare(cfg, tmp_path / "b")
    train(cfg, tmp_path / "a")
    # b: stop mid-chunk several times; each restart resumes from the latest complete checkpoint
    for _ in range(200):
        if train(cfg, tmp_path / "b", stop_after_steps=4)["done"]:
            break
    for i in range(3):
        assert_same_weights(tmp_path / "a" / "checkpoints" / f"ckpt_{i:03d}",
                            tmp_path / "b" / "checkpoints" / f"ckpt_{i:03d}")
    a_opt = load_file(str(tmp_path / "a" / "checkpoints" / "ckpt_002" / "optimizer.safetensors"))
    b_opt = load_file(str(tmp_path / "b" / "checkpoints" / "ckpt_002" / "optimizer.safetensors"))
    assert all(torch.equal(a_opt[k], b_opt[k]) for k in a_opt)
    la = [r["loss"] for r in read_jsonl(tmp_path / "a" / "metrics" / "train.jsonl")]
    lb = [r["loss"] for r in read_jsonl(tmp_path / "b" / "metrics" / "train.jsonl")]
    assert la == lb
    events = read_jsonl(tmp_path / "b" / "metrics" / "events.jsonl")
    assert any(e["event"] == "resume" for e in events)
    groups = json.loads((tmp_path / "b" / "checkpoints" / "ckpt_002" / "optimizer.json").read_text())["param_groups"]
    scales = [g["hyperparameters"].get("lr_scale", 1.0) for g in groups]
    assert scales == ([0.5, 1.0, 1.0] if mup else [1.0, 1.0])


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bitwise(tmp_path: Path):
    cfg = tiny_run_config(tmp_path, checkpoint_every_steps=2)
    cfg_path = tmp_path / "c.yaml"
    from llm360.config import to_yaml

    cfg_path.write_text(to_yaml(cfg))
    prepare(cfg, tmp_path / "ref")
    train(cfg, tmp_path / "ref")
    run = tmp_path / "killed"
    prepare(cfg, run)
    cmd = [sys.executable, "-m", "llm360.cli", "--no-progress", "train", str(cfg_path), "--run-dir", str(run)]
    metrics = run / "metrics" / "train.jsonl"

    def lines() -> int:
        return len(metrics.read_text().splitlines()) if metrics.is_file() else 0

    rng = random.Random(0)
    kills = 0
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        before = lines()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        # kill at a random moment once this attempt is really training (mid-step or mid-checkpoint)
        while proc.poll() is None and lines() <= before and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            proc.wait(timeout=rng.uniform(0.0, 0.15))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
            continue
        assert proc.returncode == 0
        break
    else:
        pytest.fail("training never finished")
    assert kills >= 5
    print(f"{kills} kills before the run finished")
    for i in range(3):
        assert_same_weights(tmp_path / "ref" / "checkpoints" / f"ckpt_{i:03d}", run / "checkpoints" / f"ckpt_{i:03d}")


def _train_injected(cfg, run, steps: str):
    os.environ[INJECT_ENV] = steps
    try:
        return train(cfg, run)
    finally:
        os.environ.pop(INJECT_ENV, None)


def test_nan_skip_step_is_recorded(tmp_path: Path):
    cfg = tiny_run_config(tmp_path, guards={"nonfinite_policy": "skip_step"})
    prepare(cfg, tmp_path / "run")
    s = _train_injected(cfg, tmp_path / "run", "4")
    assert s["done"] and s["skipped_steps"] == [4]
    ev = read_jsonl(tmp_path / "run" / "metrics" / "events.jsonl")
    assert [e["event"] for e in ev if e["event"] == "skip_step"] == ["skip_step"]
    assert ev[[e["event"] for e in ev].index("skip_step")]["step"] == 4


def test_nan_rollback_skip_chunk(tmp_path: Path):
    cfg = tiny_run_config(tmp_path, guards={"nonfinite_policy": "rollback_skip_chunk"})
    prepare(cfg, tmp_path / "run")
    from llm360.rundir.data import DataStore

    spc = DataStore(tmp_path / "run" / "data").step_index(8).steps_per_chunk
    s = _train_injected(cfg, tmp_path / "run", str(spc[0] + 2))  # inside chunk 1
    assert s["done"] and s["skipped_chunks"] == [1]
    ck = tmp_path / "run" / "checkpoints"
    assert_same_weights(ck / "ckpt_000", ck / "ckpt_001")
    ev = [e["event"] for e in read_jsonl(tmp_path / "run" / "metrics" / "events.jsonl")]
    assert "rollback_skip_chunk" in ev


def test_nan_rollback_reseed_then_stop_policy(tmp_path: Path):
    cfg = tiny_run_config(tmp_path, guards={"nonfinite_policy": "rollback_reseed"})
    prepare(cfg, tmp_path / "run")
    s = _train_injected(cfg, tmp_path / "run", "2")
    assert s["done"] and s["rollbacks"] == 1
    state = json.loads((tmp_path / "run" / "checkpoints" / "ckpt_002" / "trainer_state.json").read_text())
    assert state["chunk_reseeds"] == {"0": 1}

    cfg2 = tiny_run_config(tmp_path, guards={"nonfinite_policy": "stop"})
    prepare(cfg2, tmp_path / "run2")
    with pytest.raises(TrainingStopped, match="non-finite loss at step 5"):
        _train_injected(cfg2, tmp_path / "run2", "5")
    ev = read_jsonl(tmp_path / "run2" / "metrics" / "events.jsonl")
    assert ev[-1]["event"] == "stop"


@pytest.mark.parametrize("policy", ["record", "skip_step", "rollback_skip_chunk"])
def test_loss_spikes_follow_their_policy(tmp_path: Path, policy: str):
    cfg = tiny_run_config(tmp_path, guards={"spike_factor": 3.0, "spike_window": 20, "spike_policy": policy})
    run = tmp_path / "run"
    prepare(cfg, run)
    from llm360.rundir.data import DataStore

    spc = DataStore(run / "data").step_index(8).steps_per_chunk
    spike = spc[0] + 3  # inside chunk 1, with more than 10 losses in the window
    s = _train_injected(cfg, run, f"{spike}:x10")
    assert s["done"]
    ev = read_jsonl(run / "metrics" / "events.jsonl")
    guards = [e for e in ev if e["event"] in ("loss_spike", "skip_step", "rollback_skip_chunk")]
    assert [(e["event"], e["step"]) for e in guards] == [
        ("loss_spike" if policy == "record" else policy, spike if policy != "rollback_skip_chunk" else spc[0])
    ]
    logged = {r["step"]: r["loss"] for r in read_jsonl(run / "metrics" / "train.jsonl")}
    if policy == "record":  # logged and trained on (the gradient clipped like any other)
        assert s["skipped_steps"] == [] and logged[spike] > 3 * logged[spike - 1]
        assert guards[0]["loss"] == pytest.approx(logged[spike])
    elif policy == "skip_step":
        assert s["skipped_steps"] == [spike] and "loss spike" in guards[0]["reason"]
    else:
        assert s["skipped_chunks"] == [1]
        assert_same_weights(run / "checkpoints" / "ckpt_000", run / "checkpoints" / "ckpt_001")


def test_injection_spec_is_checked():
    from llm360.train.faults import parse_injections

    assert parse_injections(" 4, 9:x20 ,") == {4: None, 9: 20.0}
    with pytest.raises(ConfigError, match="'9:y2' is not STEP or STEP:xFACTOR"):
        parse_injections("9:y2")


def test_bad_inputs_are_clear(tmp_path: Path, prepared):
    cfg, run = prepared
    with pytest.raises(DataError, match="no prepared data"):
        train(cfg, tmp_path / "empty")
    raw = cfg.model_dump(mode="json")
    raw["data"]["seq_len"] = 64
    with pytest.raises(ConfigError, match="another data config"):
        train(validate_config(raw), run)
    raw = cfg.model_dump(mode="json")
    raw["model"]["max_seq_len"] = 16
    with pytest.raises(ConfigError, match="max_seq_len"):
        train(validate_config(raw), run)
    raw = cfg.model_dump(mode="json")
    raw["train"]["global_batch_sequences"] = 5000
    with pytest.raises(DataError, match="fewer than one global batch"):
        train(validate_config(raw), run)
    # train one chunk, then try to continue with another optimizer config: another run's checkpoints
    raw = cfg.model_dump(mode="json")
    raw["train"]["max_chunks"] = 1
    train(validate_config(raw), run)
    raw["train"]["lr"] = 1.0
    raw["train"]["max_chunks"] = None
    with pytest.raises(CheckpointError, match="belongs to another run"):
        train(validate_config(raw), run)


def test_one_writer_per_run_directory(prepared):
    from llm360.rundir.atomic import hold_lock
    from llm360.rundir.layout import RunDir

    cfg, run = prepared
    held = hold_lock(RunDir(run).lock, "being trained")  # as another `llm360 train` would
    try:
        with pytest.raises(RunDirError, match=rf"already being trained by pid {os.getpid()} on .*wait for it"):
            train(cfg, run)
        assert not (run / "checkpoints").exists() and not (run / "metrics").exists()  # nothing written
        with pytest.raises(RunDirError, match="already being trained by pid"):
            prepare(cfg, run, force=True)  # would rebuild the data under the trainer
    finally:
        held.close()
    assert train(cfg, run)["done"]  # released: it trains, and lets go again when done
    held = hold_lock(RunDir(run).lock, "being prepared")
    held.close()
    assert "being prepared by pid" in RunDir(run).lock.read_text()


def test_corrupt_latest_checkpoint_is_never_loaded(prepared):
    cfg, run = prepared
    raw = cfg.model_dump(mode="json")
    raw["train"]["max_chunks"] = 2
    cfg2 = validate_config(raw)
    train(cfg2, run)
    bad = run / "checkpoints" / "ckpt_001" / "model.safetensors"
    data = bytearray(bad.read_bytes())
    data[-3] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        ckpt.verify_checkpoint(run / "checkpoints" / "ckpt_001")
    assert ckpt.latest_complete_checkpoint(run / "checkpoints").name == "ckpt_000"


def test_init_from_checkpoint_on_other_data(tmp_path: Path, prepared):
    cfg, run = prepared
    raw = cfg.model_dump(mode="json")
    raw["train"]["max_chunks"] = 1
    train(validate_config(raw), run)
    src = run / "checkpoints" / "ckpt_000"
    # new data: the same sources, another seed (a different mix/order)
    raw2 = cfg.model_dump(mode="json")
    raw2["data"]["seed"] = 7
    raw2["data"]["tokenizer"] = {"kind": "file", "path": str(run / "data" / "tokenizer")}
    cfg2 = validate_config(raw2)
    prepare(cfg2, tmp_path / "branch")
    s = train(cfg2, tmp_path / "branch", init_from=src, reset_optimizer=True)
    assert s["done"]
    init = tmp_path / "branch" / "checkpoints" / "init"
    assert_same_weights(src, init)
    ev = read_jsonl(tmp_path / "branch" / "metrics" / "events.jsonl")
    assert ev[0]["event"] == "init_from" and ev[0]["optimizer"] == "reset"
    # a muP branch groups the optimizer's parameters differently: its state cannot be kept, and it says so
    raw2["model"]["mup"] = {"base_width": 16}
    prepare(validate_config(raw2), tmp_path / "mup-branch")
    with pytest.raises(CheckpointError, match=r"param group .* no saved group.*add --reset-optimizer"):
        train(validate_config(raw2), tmp_path / "mup-branch", init_from=src)
    assert train(validate_config(raw2), tmp_path / "mup-branch", init_from=src, reset_optimizer=True)["done"]


def test_tensorboard_sink_and_missing_wandb_is_a_clear_error(tmp_path: Path):
    import importlib.util

    cfg = tiny_run_config(tmp_path, tensorboard=True, max_chunks=1)
    prepare(cfg, tmp_path / "run")
    train(cfg, tmp_path / "run")
    events = list((tmp_path / "run" / "metrics" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    cfg2 = tiny_run_config(tmp_path, wandb="offline", max_chunks=1)
    prepare(cfg2, tmp_path / "run2")
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match="pip install wandb"):
            train(cfg2, tmp_path / "run2")
    else:  # offline: the run is written locally for a later `wandb sync`
        import os

        os.environ["WANDB_SILENT"] = "true"
        train(cfg2, tmp_path / "run2")
        runs = list((tmp_path / "run2" / "metrics" / "wandb").glob("offline-run-*"))
        assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir())


def test_guards_decide_and_never_act():
    from llm360.config import GuardConfig
    from llm360.train.guards import REPLAYED_SKIP, StepGuard

    guard = StepGuard(GuardConfig(nonfinite_policy="rollback_reseed", spike_factor=3.0, spike_window=20,
                                  spike_policy="record", max_rollbacks=2), recorded_skips={7})
    window = [2.0] * 12
    assert guard.check(3, 2.1, 0.5, window).applies_update and guard.check(3, 2.1, 0.5, window).event is None
    spike = guard.check(3, 9.0, 0.5, window)  # recorded, trained on
    assert spike.applies_update and spike.event == "loss_spike" and dict(spike.fields) == {"loss": 9.0, "median": 2.0}
    assert guard.check(3, 9.0, 0.5, window[:5]).event is None  # too few losses to tell a spike
    nan = guard.check(3, float("nan"), 0.5, window)
    assert nan.policy == "rollback_reseed" and nan.rolls_back and nan.reason == "non-finite loss"
    assert guard.within_budget(nan, 1) is nan
    stop = guard.within_budget(nan, 2)
    assert stop.policy == "stop" and stop.fields["reason"] == "non-finite loss; max_rollbacks reached"
    assert "2 rollbacks were already made" in stop.note
    replayed = guard.check(7, 2.0, float("inf"), window)  # the original run's skip comes first
    assert replayed.policy == "skip_step" and replayed.reason == REPLAYED_SKIP
    assert dict(replayed.fields) == {"reason": REPLAYED_SKIP, "loss": 2.0, "grad_norm": float("inf")}


def test_fault_injector_hits_each_step_once(monkeypatch):
    from llm360.train.faults import INJECT_ENV, FaultInjector

    monkeypatch.setenv(INJECT_ENV, "1,2:x4")
    faults = FaultInjector.from_env()
    model = torch.nn.Linear(2, 2)
    model(torch.ones(1, 2)).sum().backward()
    grad = model.weight.grad.clone()
    loss = torch.tensor(1.5, dtype=torch.float64)
    faults.after_backward(0, loss, model)
    assert loss.item() == 1.5 and torch.equal(model.weight.grad, grad)
    faults.after_backward(2, loss, model)
    assert loss.item() == 6.0 and torch.equal(model.weight.grad, grad * 4)
    faults.after_backward(2, loss, model)  # once: a rollback trains the step again, clean
    assert loss.item() == 6.0
    faults.after_backward(1, loss, model)
    assert math.isnan(loss.item()) and torch.isnan(model.weight.grad).any()


def test_metrics_truncation_is_atomic(tmp_path: Path):
    from llm360.train.metrics import truncate_jsonl_from_step

    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(5)) + '{"step": 5, "lo')
    assert truncate_jsonl_from_step(path, 3) == 3  # steps 3 and 4, and the line a kill cut
    assert [r["step"] for r in read_jsonl(path)] == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"]  # no temporary file left
    assert truncate_jsonl_from_step(path, 3) == 0


def test_replay_api_follows_the_record(tmp_path: Path):
    """replay_chunk re-trains a chunk from its previous checkpoint with the original run's decisions."""
    from llm360.rundir.data import DataStore
    from llm360.train import replay_chunk

    cfg = tiny_run_config(tmp_path, guards={"nonfinite_policy": "rollback_skip_chunk"})
    run = tmp_path / "run"
    prepare(cfg, run)
    spc = DataStore(run / "data").step_index(8).steps_per_chunk
    assert _train_injected(cfg, run, str(spc[0] + 2))["skipped_chunks"] == [1]
    ck = run / "checkpoints"
    first = replay_chunk(run, 0, work_dir=tmp_path / "replay0")
    assert first.bitwise and first.device == "cpu" and not first.skipped_chunk
    assert first.checkpoint == tmp_path / "replay0" / "checkpoints" / "ckpt_000"
    for name, t in weights(ck / "init").items():
        assert torch.equal(first.init_state[name], t)
    for name, t in weights(ck / "ckpt_000").items():
        assert torch.equal(first.model_state[name], t)
    skipped = replay_chunk(run, 1)  # skipped by the guard: the previous state, saved again
    assert skipped.skipped_chunk and skipped.init_state is None and skipped.checkpoint is None
    for name, t in weights(ck / "ckpt_001").items():
        assert torch.equal(skipped.model_state[name], t)
    opt = load_file(str(ck / "ckpt_001" / "optimizer.safetensors"))
    assert opt.keys() == skipped.optimizer_state.keys()
    assert all(torch.equal(opt[k], skipped.optimizer_state[k]) for k in opt)
    with pytest.raises(CheckpointError, match="ckpt_007 is not in"):
        replay_chunk(run, 7)


def test_verify_replays_through_the_public_api():
    import inspect

    from llm360.release import verify

    src = inspect.getsource(verify.replay_chunk)
    assert "llm360.train import replay_chunk" in src
    assert "Trainer" not in inspect.getsource(verify) and "train.loop" not in inspect.getsource(verify)
