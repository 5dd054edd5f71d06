"""Evaluation and memorization over the checkpoints of a run: what each reads, and how often."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

from conftest import training_in_background
from llm360.analysis.memorization import analyze_memorization
from llm360.config import MemorizationConfig
from llm360.data.prepare import prepare
from llm360.eval import EvalConfig, evaluate
from llm360.train import train
from test_train import tiny_run_config

MEM = MemorizationConfig(prompt_tokens=8, continuation_tokens=8, rows_per_chunk=6, batch_size=8, device="cpu")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A trained 3-chunk tiny run (checkpoints with weights, optimizer and RNG state)."""
    tmp = tmp_path_factory.mktemp("fanout")
    cfg = tiny_run_config(tmp)
    prepare(cfg, tmp / "run")
    train(cfg, tmp / "run")
    return tmp / "run"


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def test_eval_and_memorization_verify_what_they_read_once_per_process(run: Path, monkeypatch):
    from llm360.rundir import checkpoint, tensorio
    from opened import recording

    monkeypatch.setattr(checkpoint, "_verified_for_reading", set())  # a fresh process
    hashed: Counter[str] = Counter()
    real = tensorio.hash_file

    def counting(path, size, pipe):
        hashed[f"{Path(path).parent.name}/{Path(path).name}"] += 1
        return real(path, size, pipe)

    monkeypatch.setattr(tensorio, "hash_file", counting)
    with recording() as opened:
        table = evaluate(run, ["perplexity"], EvalConfig(device="cpu"))
        res = analyze_memorization(run, MEM)
    assert len(table.computed) == 3 and not table.failed and len(res.computed) == 3 and res.ok
    names = {Path(p).name for p in opened if "/checkpoints/" in p}
    assert "model.safetensors" in names
    assert not names & {"optimizer.safetensors", "rng_state.safetensors"}, names
    for i in range(3):
        assert hashed[f"ckpt_{i:03d}/model.safetensors"] == 1, hashed
    assert not [k for k in hashed if "optimizer" in k or "rng_state" in k], hashed

    # a damaged weights file is still refused (by a process that has not verified it yet)
    monkeypatch.setattr(checkpoint, "_verified_for_reading", set())
    p = run / "checkpoints" / "ckpt_001" / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[-5] ^= 0xFF
    p.write_bytes(bytes(data))
    table = evaluate(run, ["perplexity"], EvalConfig(device="cpu", perplexity_max_rows=8))
    assert "ckpt_001" in table.skipped and "model.safetensors is corrupt" in table.skipped["ckpt_001"]


# ------------------------------------------------------------------------- fan-out: same bytes

MC = "fanout_mc"
_TIMINGS = {"seconds", "evaluated_at", "rows_per_second"}


def mc_task(folder: Path) -> Path:
    """A multiple-choice lm-eval task short enough for the tiny model's 32-token context (the demo task's data)."""
    import json

    from llm360.eval import TASKS_DIR

    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"header": f"number {i} is", "choices": ["one", "two", "three", "four"], "label": i % 4}
            for i in range(8)]  # fmt: skip
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "fanout_mc.yaml").write_text(
        f"include: {TASKS_DIR / 'llm360_demo_licence_mc.yaml'}\ntask: {MC}\ntag: []\n"
        f"dataset_kwargs:\n  file: {folder / 'mc.jsonl'}\n"
    )
    return folder


def eval_cfg(tasks_dir: Path) -> EvalConfig:
    return EvalConfig(device="cpu", batch_size=8, perplexity_max_rows=16, task_paths=[str(tasks_dir)])


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    return mc_task(tmp_path_factory.mktemp("tasks"))


def results_of(run: Path) -> dict[str, object]:
    """Every result file of eval/ and analysis/memorization/ by path: JSON without timings, arrays as bytes."""
    import json

    import numpy as np

    out: dict[str, object] = {}
    for folder in (run / "eval", run / "analysis" / "memorization"):
        for p in sorted(folder.rglob("*")):
            if not p.is_file() or any(part.startswith(".") for part in p.relative_to(run).parts):
                continue
            rel = p.relative_to(run).as_posix()
            if p.suffix == ".json":
                data = json.loads(p.read_text())
                out[rel] = {k: v for k, v in data.items() if k not in _TIMINGS} if isinstance(data, dict) else data
            elif p.suffix == ".npz":
                with np.load(p, allow_pickle=False) as z:
                    out[rel] = {k: z[k].tobytes() for k in z.files}
            else:
                out[rel] = p.read_bytes()
    return out


def evaluate_and_memorize(run: Path, tasks_dir: Path, **fanout) -> tuple:
    table = evaluate(run, ["perplexity", MC], eval_cfg(tasks_dir), **fanout)
    res = analyze_memorization(run, MEM, **fanout)
    return table, res


def test_pairs_on_worker_processes_give_the_files_of_one_process(trained: Path, tasks_dir: Path, tmp_path: Path):
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(trained, one)
    shutil.copytree(trained, two)
    t1, m1 = evaluate_and_memorize(one, tasks_dir)
    t2, m2 = evaluate_and_memorize(two, tasks_dir, workers=2)
    assert sorted(t1.computed) == sorted(t2.computed) and len(t1.computed) == 6
    assert not t1.failed and not t2.failed and not t1.unavailable
    assert m1.computed == m2.computed == ["ckpt_000", "ckpt_001", "ckpt_002"]
    a, b = results_of(one), results_of(two)
    assert a.keys() == b.keys() and len(a) > 10
    assert a == b
    assert not list((two / "eval" / ".claims").glob("*")), "claims are removed when a pair is done"


def test_shards_together_are_one_run(trained: Path, tasks_dir: Path, tmp_path: Path, capsys):
    from llm360.cli import main as cli_main

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    shutil.copytree(trained, whole)
    shutil.copytree(trained, parts)
    evaluate_and_memorize(whole, tasks_dir)
    cfg = eval_cfg(tasks_dir)
    first = evaluate(parts, ["perplexity", MC], cfg, shard="0/2")
    # every 2nd pair of the plan (ckpt_000/perplexity, ckpt_000/MC, ckpt_001/perplexity, ...), from 0
    assert first.computed == [(f"ckpt_{i:03d}", "perplexity") for i in range(3)]
    assert analyze_memorization(parts, MEM, shard="0/2").computed == ["ckpt_000", "ckpt_002"]
    second = evaluate(parts, ["perplexity", MC], cfg, shard="1/2")
    assert not set(first.computed) & set(second.computed) and len(second.computed) == 3
    assert analyze_memorization(parts, MEM, shard="1/2").computed == ["ckpt_001"]
    assert results_of(parts) == results_of(whole)  # summaries included: rebuilt from the files by the last shard
    # through the CLI (the run's eval settings: other results): shard 1/2 of 3 pairs is ckpt_001's; again, nothing
    argv = ["--no-progress", "eval", "--run-dir", str(parts), "--tasks", "perplexity", "--device", "cpu"]
    assert cli_main([*argv, "--shard", "1/2"]) == 0
    assert "1 new result(s)" in capsys.readouterr().out
    assert cli_main([*argv, "--shard", "1/2"]) == 0
    assert "0 new result(s)" in capsys.readouterr().out
    assert cli_main([*argv, "--shard", "2/2"]) == 2
    assert "need 0 <= I < N" in capsys.readouterr().err


def test_a_failing_pair_is_reported_and_the_others_finish(trained: Path, tmp_path: Path, capsys):
    import json

    import torch

    from conftest import save_model_checkpoint
    from llm360.cli import main as cli_main
    from llm360.config import ModelConfig
    from llm360.model.llama import Llama

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    eos = json.loads((run / "data" / "manifest.json").read_text())["eos_id"]
    torch.manual_seed(0)
    small = Llama(ModelConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, vocab_size=64,
                              max_seq_len=64))  # fmt: skip
    save_model_checkpoint(run / "checkpoints" / "ckpt_003", small, eos_id=eos, trainer_state={"step": 99})
    argv = ["--no-progress", "eval", "--run-dir", str(run), "--tasks", "perplexity", "--device", "cpu", "--workers", "2"]
    assert cli_main(argv) == 1
    printed = capsys.readouterr().out
    assert "failed ckpt_003 / perplexity:" in printed and "vocabulary of 64" in printed
    assert "3 new result(s)" in printed
    for i in range(3):
        assert (run / "eval" / f"ckpt_{i:03d}" / "perplexity.json").is_file()
    assert not (run / "eval" / "ckpt_003").exists()
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert [r["checkpoint"] for r in summary["rows"]] == ["ckpt_000", "ckpt_001", "ckpt_002"]


def test_watch_with_two_workers_evaluates_each_checkpoint_once(tmp_path: Path):
    cfg = tiny_run_config(tmp_path)
    with training_in_background(cfg, tmp_path) as run:
        watch = EvalConfig(device="cpu", perplexity_max_rows=16, watch_interval_s=0.2, watch_idle_timeout_s=120.0)
        table = evaluate(run, ["perplexity"], watch, watch=True, workers=2)
    assert sorted(table.computed) == [(f"ckpt_{i:03d}", "perplexity") for i in range(3)]  # each once, by one watcher
    assert not table.failed
    assert not list((run / "eval" / ".claims").glob("*"))


def test_a_claim_is_held_by_one_process_and_freed_when_it_dies(tmp_path: Path):
    import subprocess
    import sys

    from llm360.eval.pairs import claimed

    path = tmp_path / "eval" / ".claims" / "ckpt_000.lock"
    code = ("import sys, time; from pathlib import Path; from llm360.eval.pairs import claimed\n"
            f"with claimed(Path({str(path)!r}), 'test') as mine:\n"
            "    print(mine, flush=True); time.sleep(60)\n")  # fmt: skip
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "True"
        with claimed(path, "test") as mine:
            assert not mine
    finally:
        child.kill()  # SIGKILL: the kernel drops its flock
        child.wait(timeout=30)
    with claimed(path, "test") as mine:
        assert mine
    assert not path.exists()
