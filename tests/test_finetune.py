"""Fine-tuning with TRL: SFT and DPO on a tiny model, outputs as complete HF folders with lineage, bad inputs."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import save_model_checkpoint, small_config
from llm360.errors import CheckpointError, ConfigError, DataError, RunDirError
from llm360.finetune import DpoConfig, SftConfig, builtin, dpo, finetune, finetune_config, sft
from llm360.finetune.chat import CHAT_TEMPLATE, TEMPLATE_NAME, ensure_chat_template
from llm360.finetune.records import load_records
from llm360.rundir.checkpoint import verify_checkpoint

# Few steps, one optimizer step per micro-batch: what the tests need, not the paper's recipe.
FAST = {"micro_batch_size": 4, "gradient_accumulation": 1, "lr": 1e-3, "warmup_ratio": 0.0, "max_length": 96}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _handmade_checkpoint(run: Path, name: str = "ckpt_000", tokenizer_overrides: dict | None = None) -> Path:
    """A checkpoint as the trainer writes one: HF config + fp32 weights + tokenizer, through save_checkpoint."""
    from llm360.config import ModelConfig
    from llm360.model.llama import Llama

    manifest = json.loads((run / "data" / "manifest.json").read_text())
    mcfg = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                       vocab_size=manifest["vocab_size"], max_seq_len=128)  # fmt: skip
    torch.manual_seed(0)
    model = Llama(mcfg)
    return save_model_checkpoint(run / "checkpoints" / name, model, eos_id=manifest["eos_id"],
                                 tokenizer_dir=run / "data" / "tokenizer",
                                 tokenizer_overrides=tokenizer_overrides)  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A prepared tiny run with checkpoints/ckpt_000 written by the trainer."""
    from llm360.data.prepare import prepare

    tmp = tmp_path_factory.mktemp("ft")
    cfg = small_config(tmp, n_docs=120, chunks=2, seq_len=32)
    run = tmp / "run"
    prepare(cfg, run)
    from llm360.config import validate_config
    from llm360.train.loop import train

    raw = cfg.model_dump(mode="json")
    raw["model"] = {"name": "tiny", "hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2,
                    "max_seq_len": 128}  # fmt: skip
    raw["train"] = {"global_batch_sequences": 8, "micro_batch_sequences": 8, "warmup_steps": 1, "max_chunks": 1}
    train(validate_config(raw), run)
    verify_checkpoint(run / "checkpoints" / "ckpt_000")
    return run


@pytest.fixture(scope="module")
def sft_out(run_dir: Path):
    return sft(run_dir, "ckpt_000", "builtin:instructions", SftConfig(max_steps=3, max_records=24, **FAST))


# ------------------------------------------------------------------------------------------- SFT


def test_sft_writes_a_complete_hugging_face_folder_with_lineage(run_dir: Path, sft_out):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = run_dir / "finetune" / "sft-ckpt_000"
    assert sft_out.folder == out and sft_out.steps == 3
    verify_checkpoint(out)  # COMPLETE.json lists every file: `llm360 eval` treats it like any checkpoint
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "lineage.json",
            "metrics.jsonl", "finetune.yaml", "train_data.jsonl", "COMPLETE.json"} <= files  # fmt: skip
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")) for f in files)
    assert not [
        p for p in (run_dir / "finetune").iterdir() if p.name.startswith(".")
    ]  # no work/tmp leftovers

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32
    base = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "ckpt_000")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert not torch.allclose(model(ids).logits, base(ids).logits)
    from llm360.model.hf import load_hf_folder
    from llm360.model.llama import Llama

    cfg, weights = load_hf_folder(out)  # llm360's own loader (what `llm360 eval` uses) reads it too
    ours = Llama(cfg)
    ours.load_state_dict(weights)
    with torch.no_grad():
        assert torch.allclose(ours(ids), model(ids).logits, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == CHAT_TEMPLATE
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|user|>\nhi\n<|assistant|>\n"
    assert len(tok) == model.config.vocab_size  # plain-text markers: no token was added

    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    for key in ("loss", "grad_norm", "lr", "epoch"):
        assert all(isinstance(r[key], float) for r in rows), key

    lin = json.loads((out / "lineage.json").read_text())
    base_dir = run_dir / "checkpoints" / "ckpt_000"
    assert lin["kind"] == "sft" and lin["trainer"] == "trl.SFTTrainer"
    assert lin["base_checkpoint"]["path"] == "checkpoints/ckpt_000"
    assert lin["base_checkpoint"]["complete_json_sha256"] == sha256(base_dir / "COMPLETE.json")
    assert lin["data"]["source"] == "builtin:instructions" and lin["data"]["path"] == "train_data.jsonl"
    assert lin["data"]["sha256"] == sha256(out / "train_data.jsonl")
    assert lin["data"]["records_used"] == 24 and lin["data"]["shape"] == "messages"
    assert (
        lin["config"]["name"] == "sft-ckpt_000"
        and lin["config"]["lr"] == 1e-3
        and lin["config"]["max_steps"] == 3
    )
    assert lin["chat_template"]["source"] == TEMPLATE_NAME
    assert lin["steps"] == 3 and lin["precision"] == "fp32"
    assert {"torch", "transformers", "trl", "llm360", "python"} <= set(lin["versions"])


def test_sft_on_prompt_completion_jsonl_learns(run_dir: Path, tmp_path: Path):
    rows = [
        {"prompt": f"Say the word number {i}.", "completion": w}
        for i, w in enumerate(["alpha", "beta", "gamma", "delta"])
    ]
    data = write_jsonl(tmp_path / "pc.jsonl", rows)
    cfg = SftConfig(name="sft-pc", max_steps=12, **{**FAST, "lr": 1e-2})
    res = finetune("sft", run_dir, run_dir / "checkpoints" / "ckpt_000", data, cfg)
    losses = [r["loss"] for r in res.metrics]
    assert len(losses) == 12 and losses[-1] < losses[0] * 0.8
    lin = res.lineage
    assert lin["data"]["path"] == str(data.resolve()) and lin["data"]["sha256"] == sha256(data)
    assert lin["data"]["shape"] == "prompt_completion" and lin["data"]["notes"]  # strings wrapped as turns
    assert not (res.folder / "train_data.jsonl").exists()  # a user's file is referenced, not copied


# ------------------------------------------------------------------------------------------- DPO


def _completion_logp(model, tok, prompt: list[dict], answer: list[dict], max_length: int) -> float:
    p = tok.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"]
    full = tok.apply_chat_template(prompt + answer, return_dict=True)["input_ids"][:max_length]
    ids = torch.tensor([full])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    token_logp = logp.gather(-1, targets[:, None])[:, 0]
    return float(token_logp[len(p) - 1 :].sum())


def test_dpo_raises_reward_accuracy_on_its_training_pairs(run_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = DpoConfig(max_steps=6, max_records=8, **{**FAST, "micro_batch_size": 8})
    res = dpo(run_dir, "ckpt_000", "builtin:preferences", cfg)
    first, last = res.metrics[0], res.metrics[-1]
    # Step 0 is scored before any update: policy == reference, every reward is 0.
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6) and first["rewards/accuracies"] == 0.0
    assert last["rewards/accuracies"] >= 0.75 and last["rewards/margins"] > first["rewards/margins"]
    assert last["loss"] < first["loss"]

    # Independently of TRL's bookkeeping: the implicit reward beta*(log pi - log pi_ref) prefers `chosen`.
    out, base_dir = res.folder, run_dir / "checkpoints" / "ckpt_000"
    verify_checkpoint(out)
    policy, ref = AutoModelForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(base_dir)
    tok = AutoTokenizer.from_pretrained(out)
    pairs = [load_records(out / "train_data.jsonl", "dpo").rows[i] for i in range(8)]
    margins = []
    for r in pairs:
        lp = {k: _completion_logp(policy, tok, r["prompt"], r[k], 96) - _completion_logp(ref, tok, r["prompt"], r[k], 96)
              for k in ("chosen", "rejected")}  # fmt: skip
        margins.append(lp["chosen"] - lp["rejected"])
    assert sum(m > 0 for m in margins) >= 6 and sum(margins) > 0
    lin = res.lineage
    assert lin["kind"] == "dpo" and lin["config"]["beta"] == 0.1 and lin["data"]["shape"] == "preference"


def test_dpo_on_top_of_sft_keeps_the_chain(run_dir: Path, sft_out, tmp_path: Path):
    rows = [{"prompt": "Pick one.", "chosen": "the right one", "rejected": "the wrong one"},
            {"prompt": [{"role": "user", "content": "Again?"}], "chosen": "yes", "rejected": "no"}]  # fmt: skip
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    res = dpo(run_dir, "sft-ckpt_000", data, DpoConfig(max_steps=1, **FAST))
    assert res.folder.name == "dpo-sft-ckpt_000"
    base = res.lineage["base_checkpoint"]
    assert base["path"] == "finetune/sft-ckpt_000"
    assert base["complete_json_sha256"] == sha256(sft_out.folder / "COMPLETE.json")
    assert base["lineage"]["base_checkpoint"]["path"] == "checkpoints/ckpt_000"
    assert res.lineage["chat_template"]["source"] == "tokenizer"  # the SFT model's template, kept


# ----------------------------------------------------------------------------------- bad inputs


def test_missing_incomplete_or_corrupt_checkpoints_are_refused(run_dir: Path):
    with pytest.raises(CheckpointError, match=r"'ckpt_099' not found.*ckpt_000"):
        sft(run_dir, "ckpt_099", "builtin:instructions")
    half = run_dir / "checkpoints" / "ckpt_007"
    shutil.copytree(run_dir / "checkpoints" / "ckpt_000", half)
    try:
        (half / "COMPLETE.json").unlink()
        with pytest.raises(CheckpointError, match="incomplete"):
            sft(run_dir, "ckpt_007", "builtin:instructions")
        shutil.copy(run_dir / "checkpoints" / "ckpt_000" / "COMPLETE.json", half)
        blob = bytearray((half / "model.safetensors").read_bytes())
        blob[-1] ^= 0xFF
        (half / "model.safetensors").write_bytes(bytes(blob))
        with pytest.raises(CheckpointError, match="model.safetensors"):
            sft(run_dir, "ckpt_007", "builtin:instructions")
    finally:
        shutil.rmtree(half)
    assert not (run_dir / "finetune" / "sft-ckpt_007").exists()


def test_data_in_the_wrong_shape_names_line_and_field(run_dir: Path, tmp_path: Path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"},
                                              {"prompt": "e"}])  # fmt: skip
    cfg = SftConfig(name="never-written")
    with pytest.raises(DataError, match=r"bad.jsonl, line 3: missing field 'completion'"):
        sft(run_dir, "ckpt_000", bad, cfg)
    prefs = write_jsonl(
        tmp_path / "prefs.jsonl",
        [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}],
    )
    with pytest.raises(DataError, match=r"line 2: missing field 'rejected'"):
        dpo(run_dir, "ckpt_000", prefs, DpoConfig(name="never-written"))
    with pytest.raises(DataError, match=r"line 1: missing field 'completion'.*use `llm360 finetune dpo`"):
        sft(run_dir, "ckpt_000", prefs, cfg)
    msgs = write_jsonl(
        tmp_path / "msgs.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}]
    )
    with pytest.raises(DataError, match=r"line 1: messages\[1\] has no 'content'"):
        sft(run_dir, "ckpt_000", msgs, cfg)
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        load_records(tmp_path / "broken.jsonl", "sft")
    with pytest.raises(DataError, match="does not exist"):
        sft(run_dir, "ckpt_000", tmp_path / "nope.jsonl", cfg)
    with pytest.raises(DataError, match="for sft use builtin:instructions"):
        sft(run_dir, "ckpt_000", "builtin:preferences", cfg)
    assert not (run_dir / "finetune" / "never-written").exists()
    assert not [p for p in (run_dir / "finetune").iterdir() if p.name.startswith(".")]


def test_tokenizer_without_chat_template_that_cannot_take_ours(run_dir: Path):
    _handmade_checkpoint(run_dir, "ckpt_008", tokenizer_overrides={"eos_token": None, "pad_token": None})
    try:
        with pytest.raises(
            DataError, match="has no chat template and llm360's plain-text one cannot be added: it has no EOS"
        ):
            sft(run_dir, "ckpt_008", "builtin:instructions", SftConfig(max_steps=1, **FAST))
    finally:
        shutil.rmtree(run_dir / "checkpoints" / "ckpt_008")


def test_existing_output_needs_force(run_dir: Path, sft_out):
    with pytest.raises(RunDirError, match="already exists; pass --force"):
        sft(run_dir, "ckpt_000", "builtin:instructions")


# ------------------------------------------------------------------------------ config, data, chat


def test_defaults_are_the_papers_recipes_and_fields_override():
    s, d = finetune_config("sft"), finetune_config("dpo")
    assert (s.lr, s.epochs, s.warmup_ratio, s.gradient_accumulation) == (2e-5, 3.0, 0.04, 16)  # AmberChat
    assert (d.beta, d.lr, d.gradient_accumulation) == (0.1, 5e-7, 4)  # AmberSafe
    assert finetune_config("sft", preset="amberchat") == s and finetune_config("dpo", preset="ambersafe") == d
    o = finetune_config("sft", overrides=["finetune.sft.lr=1e-4", "epochs=1", "finetune.dpo.beta=0.5"])
    assert (o.lr, o.epochs) == (1e-4, 1.0)
    with pytest.raises(ConfigError, match=r"beta.*\n.*DPO temperature"):
        finetune_config("dpo", overrides=["beta=-1"])
    with pytest.raises(ConfigError, match="is a dpo recipe"):
        finetune_config("sft", preset="ambersafe")
    with pytest.raises(ConfigError, match="plain folder name"):
        finetune_config("sft", overrides=["name=../escape"])


def test_builtin_sets_are_deterministic_and_well_formed(tmp_path: Path):
    ins, prefs = builtin.build_instructions(), builtin.build_preferences()
    assert builtin.to_jsonl(ins) == builtin.to_jsonl(builtin.build_instructions())
    assert len(ins) >= 50 and len(prefs) >= 50
    assert all(p["chosen"] != p["rejected"] for p in prefs)
    path = tmp_path / "ins.jsonl"
    path.write_bytes(builtin.to_jsonl(ins))
    assert load_records(path, "sft").shape == "messages"
    path.write_bytes(builtin.to_jsonl(prefs))
    assert load_records(path, "dpo").conversational


def test_records_parquet_sharegpt_and_raw(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": "c", "rejected": None}]),
                   tmp_path / "prefs.parquet")  # fmt: skip
    with pytest.raises(DataError, match=r"prefs.parquet, row 2: field 'rejected' must be a string"):
        load_records(tmp_path / "prefs.parquet", "dpo")
    sg = write_jsonl(
        tmp_path / "sg.jsonl",
        [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}],
    )
    assert load_records(sg, "sft").rows[0]["messages"][1] == {"role": "assistant", "content": "a"}
    with pytest.raises(DataError, match="set format=chat"):
        load_records(sg, "sft", format="raw")
    raw = write_jsonl(tmp_path / "raw.jsonl", [{"prompt": "p", "completion": "c"}])
    rec = load_records(raw, "sft", format="raw")
    assert rec.rows == [{"prompt": "p", "completion": "c"}] and not rec.conversational


def test_chat_template_splits_prompt_and_answer_on_a_token_boundary(run_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run_dir / "data" / "tokenizer")
    assert ensure_chat_template(tok, "auto", where="test")["source"] == TEMPLATE_NAME
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    answer = [{"role": "assistant", "content": "Four."}]
    p = tok.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"]
    full = tok.apply_chat_template(prompt + answer, return_dict=True, return_assistant_tokens_mask=True)
    assert full["input_ids"][: len(p)] == p
    masked = [i for i, m in zip(full["input_ids"], full["assistant_masks"], strict=True) if m]
    assert tok.decode(masked) == "Four." + tok.eos_token  # the answer and its EOS are what SFT learns


def test_eval_evaluates_fine_tuned_models_like_checkpoints(run_dir: Path, sft_out):
    from llm360.eval import EvalConfig, evaluate

    table = evaluate(run_dir, ["perplexity"], EvalConfig(device="cpu"))
    names = [r["checkpoint"] for r in table.rows]
    assert "ckpt_000" in names and "sft-ckpt_000" in names
    assert (run_dir / "eval" / "sft-ckpt_000" / "perplexity.json").is_file()


def test_release_carries_fine_tuned_models_with_lineage(run_dir: Path, sft_out, tmp_path: Path):
    from llm360.release.build import release
    from llm360.release.verify import verify

    out = release(run_dir, tmp_path / "rel", link=False)
    assert (out / "finetune" / "sft-ckpt_000" / "lineage.json").is_file()
    card = (out / "MODEL_CARD.md").read_text()
    section = card[card.index("## Fine-tuned models"):]
    row = next(line for line in section.splitlines() if line.startswith("| sft-ckpt_000 |"))
    assert "trl.SFTTrainer" in row and "| ckpt_000 |" in row
    assert verify(out).ok


def test_cli_finetune_errors_are_clear(run_dir: Path, tmp_path: Path, capsys):
    from llm360.cli import main as cli_main

    rc = cli_main(["--no-progress", "finetune", "sft", "--run-dir", str(run_dir), "--from", "ckpt_042",
                   "--data", "builtin:instructions"])
    err = capsys.readouterr().err
    assert rc == 2 and "ckpt_042" in err and "Traceback" not in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n')
    rc = cli_main(["--no-progress", "finetune", "sft", "--run-dir", str(run_dir), "--from", "ckpt_000",
                   "--data", str(bad), "--set", "max_steps=1", "--set", "name=cli-bad"])
    err = capsys.readouterr().err
    assert rc == 2 and "line 1" in err and "completion" in err


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_finetune_under_torchrun_takes_the_same_optimizer_batches_and_rank_0_writes_the_folder(
    run_dir: Path, kind: str
):
    """SFT and DPO on 2 gloo ranks with gradient_accumulation 2 (one micro-batch a rank per step) against one
    process with the same settings: the same optimizer batch, losses per step and final weights; one folder.
    Both run as fresh processes of the CLI (the test process's own state -- flags, seeds, environment other
    tests changed -- stays out of the comparison)."""
    from test_distributed import run_bounded

    fast = {**FAST, "gradient_accumulation": 2, "max_records": 32, "max_steps": 3, "log_every": 1}
    data = "builtin:instructions" if kind == "sft" else "builtin:preferences"

    def run(nproc: int, name: str) -> tuple[str, Path]:
        sets = [a for k, v in {**fast, "name": name}.items() for a in ("--set", f"{k}={v}")]
        launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
        cmd = [sys.executable, *launch, "-m", "llm360.cli", "--no-progress", "finetune", kind,
               "--run-dir", str(run_dir), "--from", "ckpt_000", "--data", data, *sets]
        return run_bounded(cmd, 300).stdout, run_dir / "finetune" / name

    _, one_dir = run(1, f"{kind}-one")
    out, two = run(2, f"{kind}-two")
    assert out.count(f"{kind} done") == 1  # rank 0's answer only
    verify_checkpoint(two)
    lineage = json.loads((two / "lineage.json").read_text())
    assert lineage["world_size"] == 2 and json.loads((one_dir / "lineage.json").read_text())["world_size"] == 1
    rows, ref = read_jsonl(two / "metrics.jsonl"), read_jsonl(one_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == [0, 1, 2]
    for a, b in zip(ref, rows, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * max(1.0, abs(a["loss"])), (a, b)
    wa, wb = load_file(str(one_dir / "model.safetensors")), load_file(str(two / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)
    assert not [p for p in (run_dir / "finetune").iterdir() if p.name.startswith(".")]  # no work folder left


def test_an_accumulation_that_does_not_split_over_the_ranks_is_a_config_error(run_dir: Path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; refused before any process group is joined
    with pytest.raises(ConfigError, match="gradient_accumulation = 3 does not split over 2 ranks.*multiple of 2"):
        sft(run_dir, "ckpt_000", "builtin:instructions", SftConfig(name="odd", **{**FAST, "gradient_accumulation": 3}))
    assert not (run_dir / "finetune" / "odd").exists()
