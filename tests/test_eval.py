"""`llm360 eval`: incremental results per (checkpoint, task), perplexity, lm-eval tasks, parity with HFLM."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import save_model_checkpoint, small_config, training_in_background
from llm360.config import ModelConfig, validate_config
from llm360.data.prepare import prepare
from llm360.errors import ConfigError
from llm360.eval import TASKS_DIR, EvalConfig, evaluate, list_checkpoints, resolve_tasks, training_finished
from llm360.eval.harness import hub_access
from llm360.model.llama import Llama

MC = "llm360_demo_licence_mc"
GEN = "llm360_demo_complete_line"


# ------------------------------------------------------------------------------------ fixtures


def _train_a_little(model: Llama, rows: torch.Tensor, steps: int, seed: int) -> None:
    """A few AdamW steps so the model's distributions are peaked (no near-ties in greedy decoding)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, rows.shape[0], (16,), generator=g)
        _, loss = model(rows[idx, :-1], rows[idx, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def write_checkpoint(run: Path, i: int, model: Llama, *, step: int, marker: bool = True) -> Path:
    """What the trainer writes after chunk i: model + trainer state + HF config + tokenizer, marker last."""
    eos = json.loads((run / "data" / "manifest.json").read_text())["eos_id"]
    state = {"step": step, "tokens_seen": step * 16 * 32, "checkpoint_chunk": i,
             "data_cursor": {"next_step": step, "chunk": None if i == 2 else i + 1}}  # fmt: skip
    final = save_model_checkpoint(run / "checkpoints" / f"ckpt_{i:03d}", model, eos_id=eos,
                                  trainer_state=state, tokenizer_dir=run / "data" / "tokenizer")  # fmt: skip
    if not marker:
        (final / "COMPLETE.json").unlink()
    return final


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A prepared 3-chunk run with complete checkpoints ckpt_000 and ckpt_001 of a tiny model."""
    tmp = tmp_path_factory.mktemp("eval")
    cfg = small_config(tmp, n_docs=240, chunks=3, seq_len=32)
    run = tmp / "run"
    prepare(cfg, run)
    (run / "config.yaml").write_text("train:\n  max_chunks: null\n")
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    import numpy as np

    rows = torch.from_numpy(np.load(run / "data" / manifest["chunks"][0]["file"]).astype(np.int64))
    mcfg = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                       vocab_size=manifest["vocab_size"], max_seq_len=128)
    torch.manual_seed(0)
    model = Llama(mcfg)
    for i in range(3):
        _train_a_little(model, rows, steps=15, seed=i)
        write_checkpoint(run, i, model, step=15 * (i + 1))
    # keep ckpt_002 aside: tests add it as "a new checkpoint written by training"
    shutil.move(run / "checkpoints" / "ckpt_002", tmp / "ckpt_002")
    return run


@pytest.fixture
def run(base_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst)
    return dst


def add_new_checkpoint(run: Path, base_run: Path) -> Path:
    dst = run / "checkpoints" / "ckpt_002"
    shutil.copytree(base_run.parent / "ckpt_002", dst)
    return dst


def fast_cfg(**kw) -> EvalConfig:
    return EvalConfig(**{"batch_size": 8, "device": "cpu", "perplexity_max_rows": 16, **kw})


def result(run: Path, ckpt: str, task: str) -> dict:
    return json.loads((run / "eval" / ckpt / f"{task}.json").read_text())


# ---------------------------------------------------------------------------------- behaviour


def test_incremental_second_call_computes_nothing_and_new_checkpoint_is_evaluated(run: Path, base_run: Path):
    table = evaluate(run, ["perplexity", MC], fast_cfg())
    assert sorted(table.computed) == [(c, t) for c in ("ckpt_000", "ckpt_001") for t in (MC, "perplexity")]
    assert not table.failed and not table.unavailable
    r = result(run, "ckpt_001", "perplexity")
    assert r["checkpoint"] == "ckpt_001" and r["step"] == 30 and r["primary_metric"] == "overall"
    assert set(r["metrics"]) == {"overall", "web", "code"}
    assert r["checkpoint_marker_sha256"]
    mc = result(run, "ckpt_000", MC)
    assert 0.0 <= mc["metrics"]["acc_norm"] <= 1.0 and mc["details"]["n-samples"][MC]["effective"] == 40
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert [row["checkpoint"] for row in summary["rows"]] == ["ckpt_000", "ckpt_001"]
    assert "perplexity/overall" in summary["columns"] and f"{MC}/acc_norm" in summary["columns"]
    csv_lines = (run / "eval" / "summary.csv").read_text().splitlines()
    assert csv_lines[0].startswith("checkpoint,step,tokens_seen,") and len(csv_lines) == 3
    # training learned something: later checkpoint, lower held-out perplexity
    assert summary["rows"][1]["perplexity/overall"] < summary["rows"][0]["perplexity/overall"]

    mtimes = {p: p.stat().st_mtime_ns for p in (run / "eval").glob("ckpt_*/*.json")}
    again = evaluate(run, ["perplexity", MC], fast_cfg())
    assert again.computed == []
    assert {p: p.stat().st_mtime_ns for p in (run / "eval").glob("ckpt_*/*.json")} == mtimes

    add_new_checkpoint(run, base_run)
    third = evaluate(run, ["perplexity", MC], fast_cfg())
    assert sorted(third.computed) == [("ckpt_002", MC), ("ckpt_002", "perplexity")]
    assert [row["checkpoint"] for row in third.rows] == ["ckpt_000", "ckpt_001", "ckpt_002"]
    # a task added later is computed for every checkpoint, the rest is kept
    fourth = evaluate(run, ["perplexity", MC, "llm360_demo_next_line_mc:0"], fast_cfg())
    assert sorted(fourth.computed) == [(c, "llm360_demo_next_line_mc_0shot") for c in ("ckpt_000", "ckpt_001", "ckpt_002")]


def test_settings_or_checkpoint_change_recomputes_only_what_changed(run: Path):
    evaluate(run, ["perplexity"], fast_cfg())
    assert evaluate(run, ["perplexity"], fast_cfg(perplexity_max_rows=4)).computed == [
        ("ckpt_000", "perplexity"), ("ckpt_001", "perplexity"),
    ]  # fmt: skip
    # ckpt_001 re-saved (e.g. after a rollback): its marker changes, so its results are stale
    base = run / "checkpoints" / "ckpt_001"
    model = Llama(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                              vocab_size=json.loads((base / "config.json").read_text())["vocab_size"], max_seq_len=128))
    write_checkpoint(run, 1, model, step=99)
    table = evaluate(run, ["perplexity"], fast_cfg(perplexity_max_rows=4))
    assert table.computed == [("ckpt_001", "perplexity")]
    assert result(run, "ckpt_001", "perplexity")["step"] == 99


def test_incomplete_and_corrupt_checkpoints_are_skipped_with_a_message(run: Path, base_run: Path, caplog):
    ckpt = add_new_checkpoint(run, base_run)
    marker = (ckpt / "COMPLETE.json").read_bytes()
    (ckpt / "COMPLETE.json").unlink()
    caplog.set_level(logging.INFO, logger="llm360")
    table = evaluate(run, ["perplexity"], fast_cfg())
    assert sorted(table.computed) == [("ckpt_000", "perplexity"), ("ckpt_001", "perplexity")]
    assert "ckpt_002" in table.skipped and "still being written" in table.skipped["ckpt_002"]
    assert "skipping ckpt_002" in caplog.text and not (run / "eval" / "ckpt_002").exists()

    # the marker arrives, but a file was damaged after it was written: verification refuses it
    (ckpt / "COMPLETE.json").write_bytes(marker)
    with open(ckpt / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    table = evaluate(run, ["perplexity"], fast_cfg())
    assert table.computed == [] and "does not verify" in table.skipped["ckpt_002"]

    shutil.rmtree(ckpt)
    add_new_checkpoint(run, base_run)
    assert evaluate(run, ["perplexity"], fast_cfg()).computed == [("ckpt_002", "perplexity")]


def test_broken_task_files_give_clear_messages_and_other_tasks_still_run(run: Path, tmp_path: Path):
    tasks_dir = tmp_path / "my_tasks"
    tasks_dir.mkdir()
    broken = tasks_dir / "broken.yaml"
    broken.write_text("task: broken\noutput_type: [unclosed\n")
    (tasks_dir / "bad_type.yaml").write_text("task: bad_type\ndataset_path: json\noutput_type: nonsense\n")
    demo_yaml = TASKS_DIR / "llm360_demo_complete_line.yaml"
    (tasks_dir / "too_long.yaml").write_text(  # asks for more new tokens than the model's 128-token context
        f"include: {demo_yaml}\ntask: too_long\ntag: []\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 500\n  do_sample: false\n"
    )
    (tasks_dir / "runs_code.yaml").write_text(f"include: {demo_yaml}\ntask: runs_code\ntag: []\nunsafe_code: true\n")
    cfg = fast_cfg(task_paths=[str(tasks_dir)], checkpoints=["ckpt_001"])
    table = evaluate(run, ["perplexity", str(broken), "bad_type", "no_such_task", "too_long", "runs_code", MC], cfg)
    assert "allow_code_execution" in table.unavailable["runs_code"]
    assert "does not parse" in table.unavailable["broken"] and "broken.yaml" in table.unavailable["broken"]
    assert "bad_type" in table.unavailable["bad_type"]
    assert "no task, group or tag named 'no_such_task'" in table.unavailable["no_such_task"]
    assert "broken.yaml" in table.unavailable["no_such_task"]  # the unreadable file is named as a suspect
    assert [(f.checkpoint, f.task) for f in table.failed] == [("ckpt_001", "too_long")]
    assert "max_gen_toks" in table.failed[0].message
    assert sorted(table.computed) == [("ckpt_001", MC), ("ckpt_001", "perplexity")]
    assert not (run / "eval" / "ckpt_001" / "too_long.json").exists()


def test_run_without_validation_split_says_so_and_other_tasks_run(tmp_path: Path, base_run: Path, caplog):
    cfg = small_config(tmp_path, n_docs=240, chunks=3, seq_len=32, extra={"valid_fraction": 0.0})
    run = tmp_path / "run"
    prepare(cfg, run)
    shutil.copytree(base_run / "checkpoints" / "ckpt_000", run / "checkpoints" / "ckpt_000")
    caplog.set_level(logging.INFO, logger="llm360")
    table = evaluate(run, ["perplexity", MC], fast_cfg(limit=4, log_samples=True))
    assert "no validation split" in table.unavailable["perplexity"]
    assert "no validation split" in caplog.text
    assert table.computed == [("ckpt_000", MC)]
    assert result(run, "ckpt_000", MC)["signature"]["limit"] == 4
    samples = (run / "eval" / "ckpt_000" / f"{MC}.samples.jsonl").read_text().splitlines()
    assert len(samples) == 4 and json.loads(samples[0])["task"] == MC


def test_openllm_offline_names_the_missing_datasets(run: Path, tmp_path: Path, monkeypatch, caplog):
    import datasets
    import huggingface_hub

    empty = tmp_path / "hf-empty"
    monkeypatch.setenv("HF_HOME", str(empty))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(empty / "datasets"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(empty / "hub"))
    caplog.set_level(logging.INFO, logger="llm360")
    t0 = time.monotonic()
    table = evaluate(run, ["openllm", "perplexity"], fast_cfg(checkpoints=["0"]))
    assert time.monotonic() - t0 < 30
    assert set(table.unavailable) == {"arc_challenge_25shot", "hellaswag_10shot", "mmlu_5shot", "truthfulqa_mc2_0shot"}
    for key, ds in (("arc_challenge_25shot", "allenai/ai2_arc"), ("hellaswag_10shot", "Rowan/hellaswag"),
                    ("mmlu_5shot", "cais/mmlu"), ("truthfulqa_mc2_0shot", "truthfulqa/truthful_qa")):
        assert ds in table.unavailable[key] and "not in the local Hugging Face cache" in table.unavailable[key]
        assert "allow_downloads" in table.unavailable[key]
    assert "preset openllm: 4 of 4 tasks cannot run here" in caplog.text
    assert table.computed == [("ckpt_000", "perplexity")]


def test_watch_evaluates_checkpoints_as_they_arrive_and_stops_when_training_is_done(run: Path, base_run: Path):
    assert not training_finished(run)
    box: dict = {}
    cfg = fast_cfg(watch_interval_s=0.1, watch_idle_timeout_s=60)
    thread = threading.Thread(target=lambda: box.setdefault("table", evaluate(run, ["perplexity"], cfg, watch=True)))
    thread.start()
    time.sleep(1.0)
    assert thread.is_alive()  # ckpt_002, the last chunk's, is not there yet
    add_new_checkpoint(run, base_run)
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert training_finished(run)
    assert sorted(box["table"].computed) == [(f"ckpt_{i:03d}", "perplexity") for i in range(3)]


def test_watch_stops_after_idle_timeout_and_does_not_retry_failures_every_poll(run: Path):
    # a checkpoint whose vocabulary is smaller than the run's tokenizer: perplexity fails on it
    small = Llama(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, vocab_size=64,
                              max_seq_len=128))
    write_checkpoint(run, 2, small, step=45)
    t0 = time.monotonic()
    cfg = fast_cfg(watch_interval_s=0.05, watch_idle_timeout_s=0.5, checkpoints=[0, 2])
    table = evaluate(run, ["perplexity"], cfg, watch=True)
    assert time.monotonic() - t0 < 20
    assert table.computed == [("ckpt_000", "perplexity")]
    assert [(f.checkpoint, f.task) for f in table.failed] == [("ckpt_002", "perplexity")]  # once, not per poll
    assert "beyond the model's vocabulary of 64" in table.failed[0].message


@pytest.mark.slow
def test_watch_follows_a_real_training_process(tmp_path: Path):
    """`llm360 train` in another process writes checkpoints; watch mode evaluates each, then stops."""
    cfg = small_config(tmp_path, n_docs=60, chunks=3, seq_len=32)
    raw = cfg.model_dump(mode="json")
    raw["model"] = {"name": "tiny", "hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2}
    raw["train"] = {"global_batch_sequences": 8, "micro_batch_sequences": 4, "warmup_steps": 5, "lr": 3e-3}
    cfg = validate_config(raw)
    with training_in_background(cfg, tmp_path) as run:
        table = evaluate(run, ["perplexity", MC], fast_cfg(watch_interval_s=0.2, watch_idle_timeout_s=120, limit=8),
                         watch=True)  # fmt: skip
    assert sorted(table.computed) == [(f"ckpt_{i:03d}", t) for i in range(3) for t in (MC, "perplexity")]
    ppl = [row["perplexity/overall"] for row in table.rows]
    assert ppl[2] < ppl[0]
    assert [row["step"] for row in table.rows] == sorted(row["step"] for row in table.rows)


# ------------------------------------------------------------------------------------ numbers


def test_perplexity_equals_a_plain_cross_entropy(run: Path):
    from llm360.model.load import load_model
    from llm360.rundir.data import DataStore

    evaluate(run, ["perplexity"], fast_cfg(perplexity_max_rows=10))
    model = load_model(run / "checkpoints" / "ckpt_001")
    store = DataStore(run / "data")
    r = result(run, "ckpt_001", "perplexity")
    total_nll, total_tok = 0.0, 0
    for src in ("web", "code"):
        rows = torch.from_numpy(store.valid(src)[:10].astype("int64"))
        with torch.no_grad():
            logits = model(rows[:, :-1])
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1), reduction="sum").item()
        total_nll += nll
        total_tok += rows[:, 1:].numel()
        assert r["metrics"][src] == pytest.approx(torch.tensor(nll / rows[:, 1:].numel()).exp().item(), rel=1e-5)
        assert r["details"]["sources"][src]["rows"] == 10
    assert r["metrics"]["overall"] == pytest.approx(torch.tensor(total_nll / total_tok).exp().item(), rel=1e-5)


def test_parity_with_lm_evals_hf_model(run: Path):
    """Same checkpoint, same demo tasks: our model and lm-eval's HFLM give the same scores."""
    from lm_eval import simple_evaluate
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from llm360.eval.adapter import LLM360LM

    folder = run / "checkpoints" / "ckpt_001"
    with hub_access(False):
        # by name, as `lm_eval --model llm360 --model_args pretrained=...` would build it
        ours = get_model("llm360").create_from_arg_string(f"pretrained={folder},batch_size=3", {"device": "cpu"})
        assert isinstance(ours, LLM360LM)
        hf = HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=4)
        tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
        runs = {
            name: simple_evaluate(model=lm, tasks=["llm360_demo"], task_manager=tm, num_fewshot=0,
                                  log_samples=True, bootstrap_iters=0)
            for name, lm in (("ours", ours), ("hf", hf))
        }  # fmt: skip
    for task in ("llm360_demo_licence_mc", "llm360_demo_next_line_mc", "llm360_demo_complete_line"):
        a, b = runs["ours"]["results"][task], runs["hf"]["results"][task]
        for metric in ("acc,none", "acc_norm,none", "exact_match,none"):
            if metric in a:
                assert a[metric] == b[metric], (task, metric)
        sa, sb = runs["ours"]["samples"][task], runs["hf"]["samples"][task]
        examples = len((TASKS_DIR / "data" / f"{task.removeprefix('llm360_demo_')}.jsonl").read_text().splitlines())
        assert len(sa) == len(sb) == examples  # every example of the shipped file, by both models
        for x, y in zip(sorted(sa, key=lambda s: s["doc_id"]), sorted(sb, key=lambda s: s["doc_id"]), strict=True):
            if task.endswith("_mc"):
                for (lx, gx), (ly, gy) in zip([r[0] for r in x["resps"]], [r[0] for r in y["resps"]], strict=True):
                    assert abs(float(lx) - float(ly)) <= 1e-4 and gx == gy
            else:
                assert x["resps"] == y["resps"]
    gen = [s["resps"][0][0] for s in runs["ours"]["samples"]["llm360_demo_complete_line"]]
    assert any(g.strip() for g in gen)  # the model does generate text, not only stops

    # rolling loglikelihood (perplexity tasks) over texts longer than the 128-token window; a sum over
    # hundreds of tokens (thousands of nats) agrees to fp32 precision, 1e-4 absolute for short texts
    texts = ["short text", "the model data " * 60, "def f(x):\n    return x + 1\n" * 25]
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    for x, y in zip(ours.loglikelihood_rolling(reqs), hf.loglikelihood_rolling(reqs), strict=True):
        assert x == pytest.approx(y, rel=1e-6, abs=1e-4)
    # stop strings and max_gen_toks, batched over prompts of different lengths
    gen_reqs = [Instance("generate_until", {}, (ctx, {"until": [stop], "max_gen_toks": n, "do_sample": False}), i)
                for i, (ctx, stop, n) in enumerate([("the model", "e", 10), ("doc 3: the", " ", 6),
                                                     ("doc 3: the", " ", 6), ("x", "zzz", 40)])]
    assert ours.generate_until(gen_reqs) == hf.generate_until(gen_reqs)


# -------------------------------------------------------------------------------- small pieces


def test_task_names_and_config():
    keys = [s.key for s in resolve_tasks(["perplexity", "openllm", "arc_easy:5", "demo", "perplexity", "x/my.yaml"])]
    assert keys == ["perplexity", "arc_challenge_25shot", "hellaswag_10shot", "mmlu_5shot", "truthfulqa_mc2_0shot",
                    "arc_easy_5shot", "llm360_demo_licence_mc", "llm360_demo_next_line_mc",
                    "llm360_demo_complete_line", "my"]
    assert [s.name for s in resolve_tasks(["code"])] == ["humaneval", "mbpp"]
    with pytest.raises(ConfigError):
        resolve_tasks(["openllm:5"])
    with pytest.raises(Exception, match="at least one task"):
        EvalConfig(tasks=[])
    with pytest.raises(Exception, match="batch_size"):
        EvalConfig(batch_size=0)
    assert EvalConfig().tasks == ["perplexity", "demo"]
    # every field is documented (the docstrings become --help and config.yaml comments)
    assert all(f.description for f in EvalConfig.model_fields.values())


def test_run_config_can_hold_the_eval_section():
    """What the lead wires: RunConfig.eval = EvalConfig (checked here against a subclass)."""
    from pydantic import Field

    from llm360.config import RunConfig

    class WithEval(RunConfig):
        eval: EvalConfig = Field(default_factory=EvalConfig)
        """Evaluation of every checkpoint."""

    raw = validate_config({"data": {"sources": [{"name": "a", "paths": ["x.jsonl"]}]}}).model_dump(mode="json")
    raw["eval"] = {"tasks": ["perplexity", "openllm"], "batch_size": 4}
    cfg = WithEval.model_validate(raw)
    assert cfg.eval.tasks == ["perplexity", "openllm"]


def test_list_checkpoints_orders_by_index_and_ignores_temporaries(tmp_path: Path):
    ck = tmp_path / "checkpoints"
    for name in ("ckpt_010", "ckpt_002", ".ckpt_003.tmp-12", "steps", "init", "ckpt_1000"):
        (ck / name).mkdir(parents=True)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_002", "ckpt_010", "ckpt_1000"]
