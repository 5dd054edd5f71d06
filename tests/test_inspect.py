"""`llm360 inspect` shows what the model trained on: after a reseed, a skipped chunk or a skipped step.

The proof is the loss: the rows inspect reports for a step, fed to the weights the step started
from, give the loss metrics/train.jsonl logged for that step (deterministic CPU).
"""

from __future__ import annotations

import inspect as pyinspect
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import small_config
from llm360.analysis import MemorizationConfig
from llm360.analysis.memorization import analyze_memorization
from llm360.cli import main as cli_main
from llm360.config import validate_config
from llm360.data.prepare import prepare
from llm360.model.load import load_model
from llm360.rundir import data as data_format
from llm360.rundir.data import DataStore, chunk_row_order, read_training_record, trained_rows
from llm360.train import Trainer, train
from llm360.train.faults import INJECT_ENV

B = 8  # global batch
MICRO = 4


def tiny_config(tmp: Path, policy: str, **train_fields):
    cfg = small_config(tmp, n_docs=45, chunks=3, seq_len=32)
    raw = cfg.model_dump(mode="json")
    raw["model"] = {"name": "tiny", "hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2}
    raw["train"] = {"global_batch_sequences": B, "micro_batch_sequences": MICRO, "warmup_steps": 5, "lr": 3e-3,
                    "min_lr": 3e-4, "guards": {"nonfinite_policy": policy}, **train_fields}  # fmt: skip
    return validate_config(raw)


def trained_run(tmp: Path, policy: str, nan_at, **train_fields) -> dict:
    """A prepared and trained run with a NaN injected at nan_at(steps_per_chunk)."""
    cfg = tiny_config(tmp, policy, **train_fields)
    run = tmp / "run"
    prepare(cfg, run)
    spc = DataStore(run / "data").step_index(B).steps_per_chunk
    os.environ[INJECT_ENV] = str(nan_at(spc))
    try:
        summary = train(cfg, run, device="cpu")
    finally:
        os.environ.pop(INJECT_ENV, None)
    assert summary["done"]
    return {"cfg": cfg, "dir": run, "spc": spc, "summary": summary}


@pytest.fixture(scope="module")
def reseeded(tmp_path_factory) -> dict:
    """rollback_reseed after a NaN at the 6th step of chunk 1; a step checkpoint every 4 steps."""
    return trained_run(tmp_path_factory.mktemp("reseed"), "rollback_reseed", lambda spc: spc[0] + 5,
                       checkpoint_every_steps=4)


@pytest.fixture(scope="module")
def skipped_chunk(tmp_path_factory) -> dict:
    return trained_run(tmp_path_factory.mktemp("skipchunk"), "rollback_skip_chunk", lambda spc: spc[0] + 5)


def inspect_json(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert cli_main(["--no-progress", "inspect", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def inspect_text(capsys, *args: str) -> str:
    capsys.readouterr()
    assert cli_main(["--no-progress", "inspect", *args, "--max-chars", "20"]) == 0
    return " ".join(capsys.readouterr().out.split())


def logged_loss(run: Path, step: int) -> float:
    """The loss train.jsonl holds for a step (its last line: a rolled-back attempt logged it too)."""
    lines = [json.loads(x) for x in (run / "metrics" / "train.jsonl").read_text().splitlines() if x.strip()]
    return [r["loss"] for r in lines if r["step"] == step][-1]


def loss_of(weights: Path, run: Path, chunk: int, rows: list[int]) -> float:
    """Mean token loss of these file rows under these weights, summed over micro-batches as the trainer does."""
    model = load_model(weights)
    ids = torch.from_numpy(np.asarray(DataStore(run / "data").chunk(chunk)[rows], dtype=np.int64))
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, len(rows), MICRO):
            _, loss = model(ids[i : i + MICRO, :-1], ids[i : i + MICRO, 1:], reduction="sum")
            total += loss.double()
    return total.item() / (len(rows) * (ids.shape[1] - 1))


def test_reseeded_chunk_shows_the_rows_trained(reseeded, capsys):
    run, first = reseeded["dir"], reseeded["spc"][0]  # the first step of chunk 1
    assert reseeded["summary"]["rollbacks"] == 1
    got = inspect_json(capsys, "batch", "--run-dir", str(run), "--step", str(first))
    assert got["chunk"] == 1 and got["step_in_chunk"] == 0 and got["status"] == "trained" and got["trained"]
    assert got["reseeds"] == 1 and got["global_batch"] == B and got["from_run"]
    assert got["reseed_event"]["event"] == "rollback_reseed" and got["reseed_event"]["reason"] == "non-finite loss"
    rows = [r["row"] for r in got["rows"]]
    assert [r["position"] for r in got["rows"]] == list(range(B))
    assert rows != list(range(B))  # the reseeded order, not the file's

    ckpt = run / "checkpoints"
    want = logged_loss(run, first)
    assert loss_of(ckpt / "ckpt_000", run, 1, rows) == pytest.approx(want, abs=1e-6)
    assert abs(loss_of(ckpt / "ckpt_000", run, 1, list(range(B))) - want) > 1e-4  # what inspect used to show

    # a later step of the chunk, from the weights of the step checkpoint written just before it
    mid = first + 2
    assert (ckpt / "steps" / f"step_{mid:08d}").is_dir()
    rows_mid = [r["row"] for r in inspect_json(capsys, "batch", "--run-dir", str(run), "--step", str(mid))["rows"]]
    assert loss_of(ckpt / "steps" / f"step_{mid:08d}", run, 1, rows_mid) == pytest.approx(logged_loss(run, mid),
                                                                                         abs=1e-6)
    # chunks 0 and 2 were trained in file order
    assert [r["row"] for r in inspect_json(capsys, "batch", "--run-dir", str(run), "--step", "1")["rows"]] == list(
        range(B, 2 * B))
    assert inspect_json(capsys, "batch", "--run-dir", str(run), "--step", str(first + reseeded["spc"][1]))["reseeds"] == 0

    text = inspect_text(capsys, "batch", "--run-dir", str(run), "--step", str(first))
    assert "chunk 001 was reseeded 1 time by a guard" in text and "non-finite loss" in text
    assert f"[0] chunk 001 row {rows[0]} " in text and f"[7] chunk 001 row {rows[7]} " in text

    # the reverse: a file row of the reseeded chunk names the step and batch index that trained it
    row = inspect_json(capsys, "chunk", "--run-dir", str(run), "--chunk", "1", "--row", str(rows[3]))
    assert row["row"] == rows[3] and row["trained_at"]["step"] == first and row["trained_at"]["index_in_step"] == 3
    assert row["trained_at"]["status"] == "trained" and row["trained_at"]["reseeds"] == 1
    text = inspect_text(capsys, "chunk", "--run-dir", str(run), "--chunk", "1", "--row", str(rows[3]))
    assert f"chunk 001 row {rows[3]}" in text and f"trained at step {first}, index 3" in text and "reseeded 1 time" in text


def test_other_global_batch_is_data_only(reseeded, capsys):
    run, first = reseeded["dir"], reseeded["spc"][0]
    got = inspect_json(capsys, "batch", "--run-dir", str(run), "--step", "1", "--global-batch", "4")
    assert got["status"] == "data_only" and not got["from_run"] and got["run_global_batch"] == B
    assert [r["row"] for r in got["rows"]] == [4, 5, 6, 7]
    assert "not what the run trained" in got["reason"]
    # the run's own value is the run's answer
    own = inspect_json(capsys, "batch", "--run-dir", str(run), "--step", str(first), "--global-batch", str(B))
    assert own["status"] == "trained" and own["reseeds"] == 1


def test_skipped_chunk_is_shown_not_trained(skipped_chunk, capsys):
    run, spc = skipped_chunk["dir"], skipped_chunk["spc"]
    assert skipped_chunk["summary"]["skipped_chunks"] == [1]
    for step in (spc[0], spc[0] + 5, spc[0] + spc[1] - 1):
        got = inspect_json(capsys, "batch", "--run-dir", str(run), "--step", str(step))
        assert got["chunk"] == 1 and got["status"] == "skipped_chunk" and not got["trained"]
        assert got["event"]["event"] == "rollback_skip_chunk" and "non-finite loss" in got["reason"]
    text = inspect_text(capsys, "batch", "--run-dir", str(run), "--step", str(spc[0]))
    assert "not trained" in text and "chunk 001 was skipped by a guard (rollback_skip_chunk: non-finite loss)" in text
    row = inspect_json(capsys, "chunk", "--run-dir", str(run), "--chunk", "1", "--row", "0")
    assert row["trained_at"]["status"] == "skipped_chunk" and not row["trained_at"]["trained"]

    # the next chunk trained from the weights chunk 0 left, in file order
    nxt = spc[0] + spc[1]
    got = inspect_json(capsys, "batch", "--run-dir", str(run), "--step", str(nxt))
    assert got["chunk"] == 2 and got["status"] == "trained" and got["reseeds"] == 0
    rows = [r["row"] for r in got["rows"]]
    assert rows == list(range(B))
    assert loss_of(run / "checkpoints" / "ckpt_001", run, 2, rows) == pytest.approx(logged_loss(run, nxt), abs=1e-6)


def test_memorization_does_not_count_a_skipped_chunk_as_seen(skipped_chunk):
    memo = MemorizationConfig(prompt_tokens=8, continuation_tokens=8, rows_per_chunk=4, batch_size=16, device="cpu")
    res = analyze_memorization(skipped_chunk["dir"], memo, checkpoints=["ckpt_002"])
    assert res.ok and res.computed == ["ckpt_002"]
    summary = json.loads(res.summary.read_text())
    assert summary["skipped_chunks"] == [1]
    assert summary["distribution"]["ckpt_002"]["rows"] == 8  # chunks 0 and 2
    assert summary["distribution_unseen"]["ckpt_002"]["rows"] == 4  # chunk 1, never trained


def test_skipped_step_is_shown_not_trained(tmp_path: Path, capsys):
    r = trained_run(tmp_path, "skip_step", lambda spc: 4)
    got = inspect_json(capsys, "batch", "--run-dir", str(r["dir"]), "--step", "4")
    assert got["status"] == "skipped_step" and not got["trained"] and "non-finite loss" in got["reason"]
    assert got["event"]["event"] == "skip_step" and [x["row"] for x in got["rows"]] == list(range(32, 40))
    assert inspect_json(capsys, "batch", "--run-dir", str(r["dir"]), "--step", "5")["status"] == "trained"
    row = inspect_json(capsys, "chunk", "--run-dir", str(r["dir"]), "--chunk", "0", "--row", "33")
    assert row["trained_at"]["step"] == 4 and row["trained_at"]["status"] == "skipped_step"
    # a row past the last full batch of its chunk was never trained
    rows0 = DataStore(r["dir"] / "data").rows_per_chunk[0]
    if rows0 % B:
        row = inspect_json(capsys, "chunk", "--run-dir", str(r["dir"]), "--chunk", "0", "--row", str(rows0 - 1))
        assert row["trained_at"]["status"] == "unused" and row["trained_at"]["step"] is None


def test_steps_not_reached_are_not_trained_yet(tmp_path: Path, capsys):
    cfg = tiny_config(tmp_path, "skip_step", max_chunks=1)
    prepare(cfg, tmp_path / "run")
    got = inspect_json(capsys, "batch", "--run-dir", str(tmp_path / "run"), "--step", "0")
    assert got["status"] == "not_trained_yet" and "no complete checkpoint" in got["reason"]
    train(cfg, tmp_path / "run", device="cpu")
    index = trained_rows(tmp_path / "run")
    assert index.locate(0).trained and index.locate(index.index.total_steps - 1).status == "not_trained_yet"


def test_trainer_and_inspect_ask_one_function(reseeded, monkeypatch):
    import llm360.train.loop as loop

    assert not hasattr(loop, "chunk_row_order")
    train_dir = Path(loop.__file__).parent
    for path in [*train_dir.glob("*.py"), Path(pyinspect.getfile(cli_main)).parent / "data" / "inspect.py"]:
        assert "default_rng([" not in path.read_text(), f"{path} derives a row order of its own"
    assert "rows_in_training_order" in pyinspect.getsource(Trainer._rows)

    run, first = reseeded["dir"], reseeded["spc"][0]
    n = DataStore(run / "data").rows_per_chunk[1]
    seed = reseeded["cfg"].train.seed
    assert list(trained_rows(run).locate(first).rows) == list(chunk_row_order(1, n, 1, seed)[:B])
    calls = []
    real = data_format.chunk_row_order
    monkeypatch.setattr(data_format, "chunk_row_order", lambda *a: calls.append(a) or real(*a))
    trained_rows(run).locate(first)
    assert (1, n, 1, seed) in calls
    record = read_training_record(run)
    assert record.reseeds(1) == 1 and record.checkpoint.name == "ckpt_002" and not record.skipped_chunks


def test_replay_of_a_reseeded_chunk_is_bitwise(reseeded, tmp_path: Path):
    from llm360.release.build import release
    from llm360.release.verify import verify

    rep = verify(release(reseeded["dir"], tmp_path / "rel"), replay=[1])
    assert rep.ok, rep.problems
    assert any("replay of chunk 001: bitwise" in line for line in rep.passed), rep.passed
