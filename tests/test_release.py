"""Release and verify: a release holds everything, verifies, replays bitwise, and every flip is caught."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

from llm360.cli import main as cli_main
from llm360.data.prepare import prepare
from llm360.release.build import SUMS, is_pickle, release
from llm360.release.verify import verify
from llm360.train import train
from llm360.train.faults import INJECT_ENV
from test_train import tiny_run_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rel")
    cfg = tiny_run_config(tmp)
    prepare(cfg, tmp / "run")
    train(cfg, tmp / "run")
    return cfg, tmp / "run"


def test_release_contains_everything_and_verifies(trained, tmp_path: Path):
    _, run = trained
    out = release(run, tmp_path / "rel", link=False)
    for rel in ("config.yaml", "data/manifest.json", "data/chunk_000.npy", "data/provenance_000.npy",
                "checkpoints/init/model.safetensors", "checkpoints/ckpt_002/optimizer.safetensors",
                "metrics/train.jsonl", "code.json", "MODEL_CARD.md", SUMS):
        assert (out / rel).is_file(), rel
    assert not any(is_pickle(p) for p in out.rglob("*") if p.is_file())
    card = (out / "MODEL_CARD.md").read_text()
    assert "| Optimizer checkpoints | ✓ yes" in card and "| Hidden size | 32 |" in card
    assert "| Normalization | RMSNorm, ε 1e-06 |" in card and "| Parametrization | standard (init std 0.02) |" in card
    code = json.loads((out / "code.json").read_text())
    assert code["llm360_version"] and "torch" in code["packages"]
    rep = verify(out, replay=[0, 2])
    assert rep.ok, rep.problems
    assert all(r["mode"] == "bitwise" and r["max_abs_diff"] == 0.0 for r in rep.replays)
    # the transparency table is read from the files: drop the optimizer states and it says so
    for p in out.glob("checkpoints/*/optimizer.safetensors"):
        p.unlink()
    from llm360.release.card import write_model_card

    assert "| Optimizer checkpoints | ✗ no" in write_model_card(out).read_text()


def test_model_card_states_crystalcoder_options(tmp_path: Path):
    from llm360.config import ModelConfig, MupConfig
    from llm360.model.hf import hf_metadata_files
    from llm360.release.card import write_model_card

    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_seq_len=32, norm="layernorm", norm_eps=1e-5, rope_fraction=0.25,
                      mup=MupConfig(base_width=16, embedding_multiplier=14.6, output_multiplier=2.22))  # fmt: skip
    ckpt = tmp_path / "checkpoints" / "ckpt_000"
    ckpt.mkdir(parents=True)
    for name, data in hf_metadata_files(cfg, eos_token_id=0).items():
        (ckpt / name).write_bytes(data)
    card = write_model_card(tmp_path).read_text()
    assert "| Attention heads | 4 (2 key/value heads) |" in card
    assert "| Normalization | LayerNorm, ε 1e-05 |" in card
    assert "| Rotary embeddings | θ 10000.0, on 25% of each head's dims |" in card
    assert ("| Parametrization | muP: base width 16 (width multiplier 4), embedding x 14.6, logits x 2.22/4, "
            "attention 1/d; blocks' matrices: init std 0.02/√4, lr / 4 |") in card  # fmt: skip


def test_every_flipped_byte_is_caught_and_named(trained, tmp_path: Path):
    _, run = trained
    out = release(run, tmp_path / "rel", link=False)
    rng = random.Random(1)
    targets = ["data/chunk_001.npy", "data/manifest.json", "data/provenance_000.npy",
               "checkpoints/ckpt_001/model.safetensors", "checkpoints/ckpt_002/optimizer.safetensors",
               "checkpoints/ckpt_000/trainer_state.json", "config.yaml"]
    for rel in targets:
        p = out / rel
        data = bytearray(p.read_bytes())
        pos = rng.randrange(len(data))
        data[pos] ^= 1 << rng.randrange(8)
        p.write_bytes(bytes(data))
        rep = verify(out)
        assert not rep.ok
        assert any(rel in prob for prob in rep.problems), (rel, rep.problems)
        data[pos] ^= 0  # keep the flip: later files are checked with earlier flips still present
    # a missing file and an extra file are named too
    (out / "metrics" / "train.jsonl").unlink()
    (out / "extra.txt").write_text("x")
    probs = verify(out).problems
    assert any("missing file: metrics/train.jsonl" in p for p in probs)
    assert any("unlisted file: extra.txt" in p for p in probs)


def test_replay_detects_a_tampered_checkpoint(trained, tmp_path: Path):
    import torch

    from llm360.model.llama import Llama, resolve_model_config
    from llm360.release.build import write_sums
    from llm360.rundir import checkpoint as ckpt
    from llm360.train.optim import build_optimizer

    cfg, run = trained
    out = release(run, tmp_path / "rel", link=False)
    # re-save ckpt_001 with nudged weights and a valid marker and SHA256SUMS: only a replay can tell
    folder = out / "checkpoints" / "ckpt_001"
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    model = Llama(resolve_model_config(cfg.model, vocab, cfg.data.seq_len))
    opt = build_optimizer(model, cfg.train)
    res = ckpt.load_checkpoint(folder, model, opt)
    with torch.no_grad():
        model.lm_head.weight.add_(1e-3)
    extra = {p.name: p.read_bytes() for p in folder.iterdir() if p.name not in ckpt.CHECKPOINT_FILES}
    ckpt.save_checkpoint(folder, model_state=model.state_dict(), optimizer=opt, param_names=model,
                         trainer_state=res["trainer_state"], rng_state=res["rng_state"], extra_files=extra)
    write_sums(out)
    assert verify(out).ok  # integrity alone cannot see it
    rep = verify(out, replay=[1])
    assert not rep.ok
    assert any("lm_head.weight differs" in p for p in rep.problems), rep.problems


def test_replay_follows_recorded_skips(tmp_path: Path, monkeypatch):
    cfg = tiny_run_config(tmp_path, guards={"nonfinite_policy": "skip_step"})
    prepare(cfg, tmp_path / "run")
    monkeypatch.setenv(INJECT_ENV, "20")
    train(cfg, tmp_path / "run")
    monkeypatch.delenv(INJECT_ENV)
    out = release(tmp_path / "run", tmp_path / "rel")
    rep = verify(out, replay=[1])
    assert rep.ok, rep.problems


def test_rederive_rebuilds_identical_data_from_snapshots(tmp_path: Path):
    from conftest import make_docs, write_jsonl
    from llm360.config import validate_config

    a = write_jsonl(tmp_path / "a.jsonl", make_docs(60, seed=9))
    with open(a, "a") as f:
        f.write("not json\n")
    raw = {"data": {"seq_len": 16, "chunks": 2, "tokenizer": {"vocab_size": 300},
                    "sources": [{"name": "a", "paths": [str(a)], "snapshot": True}]},
           "model": {"hidden_size": 16, "intermediate_size": 32, "num_layers": 1, "num_heads": 2},
           "train": {"global_batch_sequences": 32, "micro_batch_sequences": 32}}
    cfg = validate_config(raw)
    prepare(cfg, tmp_path / "run")
    train(cfg, tmp_path / "run")
    out = release(tmp_path / "run", tmp_path / "rel")
    a.unlink()  # the raw files are gone: the snapshot in the release is enough
    assert "- `a`: in this release, `data/sources/a.jsonl.gz`" in (out / "MODEL_CARD.md").read_text()
    rep = verify(out, rederive_data=True)
    assert rep.ok, rep.problems
    assert any("rederived" in p for p in rep.passed)


def test_rederive_reads_a_moved_corpus_given_with_source(tmp_path: Path, capsys):
    # A corpus too large to snapshot: the verifier downloads its raw files to a folder of their own.
    from conftest import make_docs, write_jsonl
    from llm360.config import validate_config

    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    write_jsonl(corpus / "a.jsonl", make_docs(40, seed=3))
    write_jsonl(corpus / "sub" / "b.jsonl", make_docs(30, seed=4))
    raw = {"data": {"seq_len": 16, "chunks": 2, "tokenizer": {"vocab_size": 300}, "valid_fraction": 0.1,
                    "sources": [{"name": "web", "paths": [str(corpus)]}]},
           "model": {"hidden_size": 16, "intermediate_size": 32, "num_layers": 1, "num_heads": 2},
           "train": {"global_batch_sequences": 32, "micro_batch_sequences": 32}}  # fmt: skip
    cfg = validate_config(raw)
    prepare(cfg, tmp_path / "run")
    train(cfg, tmp_path / "run")
    out = release(tmp_path / "run", tmp_path / "rel")
    assert not (out / "data" / "sources").exists()
    card = (out / "MODEL_CARD.md").read_text()
    assert "- `web`: not in this release (jsonl files); with a copy of them, add `--source web=PATH`" in card
    moved = tmp_path / "downloads" / "web-corpus"
    moved.parent.mkdir()
    corpus.rename(moved)

    rep = verify(out, rederive_data=True)
    assert not rep.ok and "--source NAME=PATH" in rep.problems[0] and str(corpus) in rep.problems[0]
    rep = verify(out, rederive_data=True, source_paths={"web": [str(moved)]})
    assert rep.ok, rep.problems
    assert cli_main(["--no-progress", "verify", str(out), "--rederive", "--source", f"web={moved}"]) == 0

    lines = (moved / "sub" / "b.jsonl").read_text().splitlines()
    lines[3] = lines[3].replace("a", "b", 1)  # one changed character in one document
    (moved / "sub" / "b.jsonl").write_text("\n".join(lines) + "\n")
    rep = verify(out, rederive_data=True, source_paths={"web": [str(moved)]})
    assert not rep.ok and any("data/documents/web.jsonl.gz differs" in p for p in rep.problems), rep.problems
    assert not any("rebuild with the version" in p for p in rep.problems)  # same version: the source changed
    manifest = out / "data" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["versions"]["llm360"] = "0.0.1"
    manifest.unlink()  # a hard link into the run: write a file of its own
    manifest.write_text(json.dumps(m))
    from llm360.release.verify import rederive

    problems = rederive(out, {"web": [str(moved)]})
    assert any("prepared by llm360 0.0.1 and rebuilt by llm360" in p for p in problems), problems

    capsys.readouterr()
    assert cli_main(["verify", str(out), "--rederive", "--source", "news=/x"]) == 2
    assert "no such source (its sources: web)" in capsys.readouterr().err
    assert cli_main(["verify", str(out), "--source", f"web={moved}"]) == 2
    assert "--source only applies with --rederive" in capsys.readouterr().err
    assert cli_main(["verify", str(out), "--rederive", "--source", "web"]) == 2
    assert "expected NAME=PATH" in capsys.readouterr().err


def test_cli_release_and_verify(trained, tmp_path: Path, capsys):
    _, run = trained
    out = str(tmp_path / "rel")
    assert cli_main(["--no-progress", "release", "--run-dir", str(run), "--out", out, "--copy"]) == 0
    assert cli_main(["--no-progress", "release", "--run-dir", str(run), "--out", out]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["--no-progress", "verify", out]) == 0
    p = Path(out) / "data" / "chunk_000.npy"
    b = bytearray(p.read_bytes())
    b[200] ^= 0xFF
    p.write_bytes(bytes(b))
    assert cli_main(["--no-progress", "verify", out]) == 1
    assert "sha256 mismatch: data/chunk_000.npy" in capsys.readouterr().out


# ---------------------------------------------------------------- verify never reads outside the release


def test_verify_refuses_entries_outside_the_release_without_opening_them(trained, tmp_path: Path):
    from llm360.release.sums import format_sums, read_sums
    from llm360.utils import sha256_file
    from opened import recording, under

    _, run = trained
    out = release(run, tmp_path / "rel", link=False)
    base = (out / SUMS).read_text()
    outside = tmp_path / "outside"
    outside.mkdir()
    for rel, target in (("../../etc/passwd", "/etc/passwd"), ("/etc/hostname", "/etc/hostname")):
        digest = sha256_file(target) if os.access(target, os.R_OK) else "0" * 64
        (out / SUMS).write_text(base + f"{digest}  {rel}\n")
        with recording() as opened:
            rep = verify(out)
        assert not rep.ok
        assert any(f"refused {SUMS} entry {rel!r}" in p and "not opened" in p for p in rep.problems), rep.problems
        assert not any("sha256 mismatch" in p for p in rep.problems), rep.problems
        assert not [p for p in opened if p == os.path.realpath(target)], target
        assert under(opened, out), "verify read nothing of the release?"
    (out / SUMS).write_text(base)
    assert verify(out).ok

    # a file replaced by a symlink to an identical copy outside: a finding, the copy never read
    victim = out / "metrics" / "train.jsonl"
    copy = outside / "train.jsonl"
    shutil.copy(victim, copy)
    victim.unlink()
    victim.symlink_to(copy)
    # a folder replaced by a symlink to a copy outside, and a symlink to a file inside the release
    tok = out / "data" / "tokenizer"
    shutil.copytree(tok, outside / "tokenizer")
    shutil.rmtree(tok)
    tok.symlink_to(outside / "tokenizer", target_is_directory=True)
    (out / "metrics" / "alias.jsonl").symlink_to("events.jsonl")
    # a manifest that points a data file outside data/
    manifest = out / "data" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["files"]["../../outside/train.jsonl"] = {"sha256": "0" * 64, "bytes": 1}
    manifest.write_text(json.dumps(m))
    listed = read_sums(out)
    listed["data/manifest.json"] = sha256_file(manifest)
    (out / SUMS).write_text(format_sums(listed))
    with recording() as opened:
        rep = verify(out, replay=[1])
    assert not rep.ok
    probs = "\n".join(rep.problems)
    assert f"refused {SUMS} entry 'metrics/train.jsonl': it is a symlink" in probs and "outside the release" in probs
    assert "symlink in the release: data/tokenizer ->" in probs
    assert f"refused {SUMS} entry 'data/tokenizer/tokenizer.json': it lies under the symlink data/tokenizer" in probs
    assert "symlink in the release: metrics/alias.jsonl -> events.jsonl, inside the release" in probs
    assert "data/manifest.json lists '../../outside/train.jsonl'" in probs and "not opened" in probs
    assert "replay not run" in probs
    assert not under(opened, outside), under(opened, outside)
    assert not any("metrics/train.jsonl" in p and "mismatch" in p for p in rep.problems)


def test_release_never_writes_a_symlink(trained, tmp_path: Path):
    _, run = trained
    run2 = tmp_path / "run"
    shutil.copytree(run, run2)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    events = run2 / "metrics" / "events.jsonl"
    shutil.move(events, elsewhere / "events.jsonl")
    events.symlink_to(elsewhere / "events.jsonl")
    shutil.move(run2 / "data" / "tokenizer", elsewhere / "tokenizer")
    (run2 / "data" / "tokenizer").symlink_to(elsewhere / "tokenizer", target_is_directory=True)
    for link in (True, False):
        out = release(run2, tmp_path / f"rel-{link}", link=link)
        assert not [p for p in out.rglob("*") if p.is_symlink()]
        assert (out / "metrics" / "events.jsonl").read_bytes() == (elsewhere / "events.jsonl").read_bytes()
        assert (out / "data" / "tokenizer" / "tokenizer.json").is_file()
        rep = verify(out)
        assert rep.ok, rep.problems


def test_release_hashes_each_file_at_most_once(trained, tmp_path: Path, monkeypatch):
    from collections import Counter

    from llm360.release import sums

    _, run = trained
    real = sums.sha256_nofollow
    hashed: Counter[str] = Counter()

    def counting(path, buf=None):
        hashed["/".join(Path(path).relative_to(tmp_path).parts[1:])] += 1  # under the release's hidden folder
        return real(path, buf)

    monkeypatch.setattr(sums, "sha256_nofollow", counting)
    from llm360.rundir import tensorio

    hashed_by_loader = []
    monkeypatch.setattr(tensorio, "hash_file", lambda *a, **k: hashed_by_loader.append(a[0]))
    out = release(run, tmp_path / "rel")
    rels = list(hashed)
    assert max(hashed.values()) == 1
    assert "checkpoints/ckpt_001/model.safetensors" in rels and "checkpoints/ckpt_001/optimizer.safetensors" in rels
    assert not [r for r in rels if r.startswith("data/chunk_") or r.startswith("data/provenance_")], rels
    assert not hashed_by_loader
    monkeypatch.undo()
    assert verify(out, threads=2).ok
