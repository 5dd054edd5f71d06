"""`llm360 plan` and the layout rules: closed-form counts, the estimate against a measured peak,
the presets on the paper's hardware, layout errors that say what works, and the system metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from llm360.cli import main as cli_main
from llm360.config import load_config, to_yaml, validate_config
from llm360.data.prepare import prepare
from llm360.errors import ConfigError
from llm360.model.llama import Llama, flops_per_token, resolve_model_config
from llm360.report import build_report
from llm360.rundir.data import DataStore
from llm360.train import train
from llm360.train.optim import build_optimizer
from llm360.train.parallel import DistInfo, parallelize
from llm360.train.plan import (
    Cluster,
    Layout,
    check_trainer_supports,
    device_peak_flops,
    peak_tflops_by_name,
    plan,
    plan_model_config,
    startup_check,
)
from test_train import read_jsonl, tiny_run_config

AMBER_CLUSTER = Cluster(gpus=224, gpus_per_node=4, gpu_memory_bytes=80 * 10**9, peak_tflops=312.0)
"""Amber's hardware: 56 DGX A100 nodes of 4 x 80 GB A100s."""


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli_main(["--no-progress", *args])
    got = capsys.readouterr()
    return rc, got.out, got.err


# ----------------------------------------------------------------------------- closed forms


def test_amber_parameters_gradients_and_optimizer_equal_the_closed_form():
    cfg = load_config(preset="amber")
    V, h, f, L = 32000, 4096, 11008, 32
    # LLaMA-7B: embedding and head (untied), per block q/k/v/o (4h^2), gate/up/down (3hf) and two
    # RMSNorm gains, and the final norm
    P = 2 * V * h + L * (4 * h * h + 3 * h * f + 2 * h) + h
    assert P == 6_738_415_616
    one = plan(cfg, Cluster(gpus=1, gpu_memory_bytes=10**13), layout=Layout("ddp", micro_batch_sequences=1))
    assert one.model["parameters"] == P
    assert (one.memory["parameters"], one.memory["gradients"], one.memory["optimizer"]) == (4 * P, 4 * P, 8 * P)
    assert one.memory["parameters"] + one.memory["gradients"] + one.memory["optimizer"] == 16 * P  # ~108 GB
    sharded = plan(cfg, AMBER_CLUSTER)  # the preset: FSDP over 224 ranks
    assert sharded.layout["shard_degree"] == 224
    assert sharded.memory["parameters"] == 4 * P // 224 and sharded.memory["optimizer"] == 8 * P // 224
    ck = sharded.checkpoint
    assert ck["model_bytes"] == 4 * P and ck["optimizer_bytes"] == 8 * P
    assert ck["files"] == 6 + 11  # 5 GB files: 27 GB of weights, 54 GB of AdamW moments
    assert ck["bytes_per_rank_max"] == 5 * 10**9 and ck["seconds_one_rank_writing"] == pytest.approx(12 * P / 2e9)
    tp = sharded.throughput
    assert tp["tokens"] == pytest.approx(1259.13e9, rel=1e-4)  # the paper's mix table (its rows sum to 1259.11)
    assert tp["tokens_per_s"] == pytest.approx(0.4 * 312e12 * 224 / tp["flops_per_token"])
    assert tp["days"] == pytest.approx(tp["tokens"] / tp["tokens_per_s"] / 86400)


# ----------------------------------------------------------------------------- the estimate, measured


def _profiled_peak(fn) -> int:
    """Peak bytes of tensor storage allocated while fn runs and not yet freed, above what was live
    when it started.

    torch's profiler (profile_memory) records every allocation and free of the CPU allocator with
    its size and time; the running sum of those sizes, in time order, is the live bytes fn added,
    and its maximum the peak. This counts tensor storage exactly -- no RSS noise from the Python
    heap, pages glibc keeps, or other threads -- so it is the same from run to run. (Blocks
    allocated before profiling and freed during it are not subtracted: fn frees none of note.)
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()

    def walk(nodes):
        for n in nodes:
            yield n
            yield from walk(n.children)

    events = sorted((n.start_time_ns, n.extra_fields.alloc_size)
                    for n in walk(prof.profiler.kineto_results.experimental_event_tree())
                    if n.tag == _EventType.Allocation)
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return peak


CRYSTALCODER_LIKE = {"norm": "layernorm", "rope_fraction": 0.25, "mup": {"base_width": 64}}


@pytest.mark.parametrize("checkpointing, model", [(False, {}), (True, {}), (False, CRYSTALCODER_LIKE)])
def test_cpu_estimate_is_within_20_percent_of_the_measured_peak(checkpointing: bool, model: dict):
    raw = {"data": {"seq_len": 128, "sources": [{"name": "x", "paths": []}], "tokenizer": {"vocab_size": 2000}},
           "model": {"hidden_size": 256, "intermediate_size": 688, "num_layers": 4, "num_heads": 4, **model},
           "train": {"global_batch_sequences": 16, "micro_batch_sequences": 8,
                     "activation_checkpointing": checkpointing}}
    cfg = validate_config(raw)
    estimate = plan(cfg, Cluster(gpus=1, device="cpu")).per_gpu_bytes

    torch.manual_seed(0)
    model = Llama(plan_model_config(cfg))
    model = parallelize(model, "ddp", DistInfo(), checkpointing)  # the trainer's checkpointing wrapper
    opt = build_optimizer(model, cfg.train)
    rows = torch.randint(0, 2000, (16, 129))

    def step() -> None:  # as Trainer.train_step: two micro-batches, summed loss, one update
        for i in range(2):
            x = rows[i * 8 : (i + 1) * 8]
            _, loss = model(x[:, :-1], x[:, 1:], reduction="sum")
            (loss / 2048).backward()
        opt.step()

    step()  # AdamW's moments exist from here on
    opt.zero_grad(set_to_none=True)
    P = sum(p.numel() for p in model.parameters())
    live_at_start = 12 * P  # fp32 weights and two moments (AdamW's step counters are a few bytes)
    measured = live_at_start + _profiled_peak(step)
    assert abs(estimate - measured) <= 0.2 * measured, (estimate, measured)  # within ~8% when written


# ----------------------------------------------------------------------------- presets on the paper's hardware


def test_presets_fit_80gb_gpus_at_the_paper_scale():
    amber = load_config(preset="amber")
    t = amber.train
    assert (t.parallelism, t.activation_checkpointing, t.compile, t.deterministic) == ("fsdp", True, True, "auto")
    assert t.deterministic_on("cuda") is False and t.deterministic_on("cpu") is True
    p = plan(amber, AMBER_CLUSTER)
    assert p.fits and p.per_gpu_bytes < 0.5 * p.usable_bytes, p.advice
    # CrystalCoder (trained on Cerebras CG-1): on one 8 x 80 GB node at its preset's batch, and on
    # Amber's cluster at Amber's batch of 2240
    cc = load_config(preset="crystalcoder")
    assert (cc.train.parallelism, cc.train.activation_checkpointing, cc.train.compile) == ("fsdp", True, True)
    assert plan(cc, Cluster(gpus=8, gpus_per_node=8)).fits
    cc_big = load_config(preset="crystalcoder", overrides=["train.global_batch_sequences=2240"])
    assert plan(cc_big, AMBER_CLUSTER).fits
    assert plan(cc, Cluster(gpus=8)).throughput["tokens"] == 1_382_000_000_000


def test_the_old_ddp_layout_does_not_fit_and_the_plan_says_what_does():
    cfg = load_config(preset="amber", overrides=["train.parallelism=ddp", "train.activation_checkpointing=false"])
    p = plan(cfg, AMBER_CLUSTER)
    assert not p.fits and p.per_gpu_bytes > 108 * 10**9
    assert p.smallest_fitting is not None and p.smallest_fitting["shard_degree"] > 1
    assert "--set train.parallelism=" in p.advice
    again = plan(load_config(preset="amber", overrides=["train.parallelism=ddp", *p.smallest_fitting["overrides"]]),
                 AMBER_CLUSTER)
    assert again.fits


# ----------------------------------------------------------------------------- the command and its errors


def test_plan_json_has_fits_and_per_gpu_bytes(capsys):
    rc, out, _ = _cli(capsys, "plan", "--preset", "amber", "--gpus", "224", "--gpus-per-node", "4",
                      "--peak-tflops", "312", "--json")
    doc = json.loads(out)
    assert rc == 0 and doc["fits"] is True and isinstance(doc["per_gpu_bytes"], int)
    assert doc["per_gpu_bytes"] == sum(v for k, v in doc["memory"].items()
                                       if k not in ("total", "activations_with_checkpointing",
                                                    "activations_without_checkpointing"))
    rc, out, _ = _cli(capsys, "plan", "--preset", "amber", "--gpus", "8", "--gpu-memory", "24GB", "--json")
    doc = json.loads(out)
    assert rc == 1 and doc["fits"] is False  # a layout that does not fit is a failed check
    rc, out, _ = _cli(capsys, "plan", "--preset", "amber", "--gpus", "224", "--tokens", "2T")
    assert rc == 0 and "2,000.0B tokens" in out and "fits" in out


@pytest.mark.parametrize("args, must_contain", [
    (["--set", "train.tensor_parallel=3"], ["does not divide model.num_heads = 32", "[1, 2, 4, 8]"]),
    (["--set", "model.num_kv_heads=4", "--set", "train.tensor_parallel=8"], ["key/value heads", "[1, 2, 4]"]),
    (["--gpus-per-node", "4", "--set", "train.tensor_parallel=8"], ["more than the 4 GPUs of a node"]),
    (["--gpus", "100"], ["does not split over 100", "80 ranks or 112 ranks"]),
    (["--gpus", "228", "--set", "train.tensor_parallel=8"], ["multiple of 8 ranks (224, 232)"]),
    (["--gpus-per-node", "4", "--set", "train.parallelism=hsdp", "--set", "train.shard_group_size=8"],
     ["larger than a node (4 GPUs)", "shard_group_size in [2, 4]", "parallelism = fsdp"]),
    (["--set", "train.parallelism=hsdp", "--set", "train.shard_group_size=3"], ["does not divide the 224", "[2, 4,"]),
    (["--gpus", "1", "--set", "train.parallelism=hsdp", "--set", "train.shard_group_size=2"],
     ["needs several ranks", "parallelism = ddp"]),
    (["--set", "train.parallelism=hsdp"], ["needs shard_group_size", "parallelism = fsdp"]),
    (["--set", "train.shard_group_size=4"], ["applies to parallelism = hsdp only"]),
])
def test_layout_errors_are_config_errors_that_name_what_works(capsys, args, must_contain):
    argv = ["plan", "--preset", "amber", *args]
    if "--gpus" not in args:
        argv += ["--gpus", "224"]
    rc, out, err = _cli(capsys, *argv)
    assert rc == 2 and out == "", err
    for s in must_contain:
        assert s in err, (s, err)


def test_the_trainer_refuses_what_it_cannot_run_before_loading_anything(tmp_path: Path):
    cfg = tiny_run_config(tmp_path)
    # no data prepared in run/: the plan's error comes first
    small = cfg.model_copy(update={"train": cfg.train.model_copy(update={"device_memory_gb": 0.001})})
    with pytest.raises(ConfigError, match="does not fit the device's memory"):
        train(small, tmp_path / "run", device="cpu")
    assert not (tmp_path / "run" / "metrics").exists()
    ddp_tp = cfg.train.model_copy(update={"tensor_parallel": 2})
    check_trainer_supports(ddp_tp, 2)  # tensor parallel alone: no data-parallel copies to synchronise
    what = "shards the 2 data-parallel copies of a tensor-parallel model with FSDP; set parallelism = fsdp"
    with pytest.raises(ConfigError, match=what):
        check_trainer_supports(ddp_tp, 4)
    with pytest.raises(ConfigError, match=what):  # 4 ranks of one node: a valid layout the trainer does not run
        startup_check(cfg.model_copy(update={"train": ddp_tp}), 4, 4, torch.device("cpu"))
    check_trainer_supports(ddp_tp.model_copy(update={"parallelism": "fsdp"}), 4)
    assert startup_check(cfg, 1, None, torch.device("cpu")) is None  # CPU, no memory given: nothing to check
    hsdp = cfg.train.model_copy(update={"parallelism": "hsdp", "shard_group_size": 2})
    check_trainer_supports(hsdp, 4)  # HSDP runs (tests/test_distributed.py)
    with pytest.raises(ConfigError, match="larger than a node"):  # but a shard group stays inside a node
        startup_check(cfg.model_copy(update={"train": hsdp}), 4, 1, torch.device("cpu"))


# ----------------------------------------------------------------------------- system metrics


def test_peak_flops_of_known_gpus_and_configured_ones():
    assert peak_tflops_by_name("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_by_name("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_by_name("NVIDIA H200") == 989.0
    assert peak_tflops_by_name("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_by_name("NVIDIA L40S") == 362.0
    assert peak_tflops_by_name("Some Future Accelerator") is None
    tcfg = load_config(overrides=["train.peak_tflops=2.5"]).train
    assert device_peak_flops(tcfg, torch.device("cpu")) == 2.5e12
    assert device_peak_flops(load_config().train, torch.device("cpu")) is None


def test_train_jsonl_has_rank_extremes_and_mfu_against_the_configured_peak(tmp_path: Path):
    cfg = tiny_run_config(tmp_path, max_chunks=1, peak_tflops=1.0)
    prepare(cfg, tmp_path / "run")
    train(cfg, tmp_path / "run", device="cpu")
    recs = read_jsonl(tmp_path / "run" / "metrics" / "train.jsonl")
    assert recs
    store = DataStore(tmp_path / "run" / "data")
    fpt = flops_per_token(resolve_model_config(cfg.model, store.vocab_size, store.seq_len), store.seq_len)
    for r in recs:
        assert r["step_time_max_s"] == r["step_time_min_s"] == r["step_time_s"]  # one rank
        assert r["memory_max_mb"] == r["rss_mb"]
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * fpt / 1e12)  # train.peak_tflops = 1
    page = build_report(tmp_path / "run").read_text(encoding="utf-8")
    assert "Step time across ranks" in page and "Memory, largest rank" in page


@pytest.mark.slow
def test_two_ranks_log_the_slowest_fastest_and_largest(tmp_path: Path):
    from test_distributed import torchrun

    cfg = tiny_run_config(tmp_path, max_chunks=1)
    prepare(cfg, tmp_path / "run")
    path = tmp_path / "cfg.yaml"
    path.write_text(to_yaml(cfg), encoding="utf-8")
    torchrun(2, path, tmp_path / "run")
    recs = read_jsonl(tmp_path / "run" / "metrics" / "train.jsonl")
    assert recs and all(r["world_size"] == 2 for r in recs)
    for r in recs:
        assert r["step_time_max_s"] >= r["step_time_min_s"] > 0
        assert r["step_time_min_s"] <= r["step_time_s"] <= r["step_time_max_s"]  # rank 0's is among them
        assert r["memory_max_mb"] >= r["rss_mb"] > 0
