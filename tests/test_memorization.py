"""Memorization (Analysis360): exact fast scores, parity with transformers, incremental files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import save_model_checkpoint, small_config
from llm360.analysis import AnalysisError, MemorizationConfig
from llm360.analysis.memorization import analyze_memorization, sample_rows
from llm360.analysis.memorization_scores import _scores_of, memorization_scores, reference_scores_transformers
from llm360.config import ModelConfig
from llm360.data.prepare import prepare
from llm360.model.llama import Llama
from llm360.model.load import load_model
from llm360.rundir.data import DataStore

K = L = 16


MEMO = MemorizationConfig(prompt_tokens=K, continuation_tokens=L, rows_per_chunk=16, batch_size=16, device="cpu")


def tiny_model(vocab: int, seed: int = 0, **kw) -> Llama:
    cfg = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, vocab_size=vocab,
                      max_seq_len=64, **kw)  # fmt: skip
    torch.manual_seed(seed)
    return Llama(cfg)


def memorize(model: Llama, rows: np.ndarray, steps: int, lr: float = 1e-2) -> Llama:
    """Train on a handful of rows, over and over, so the model reproduces (some of) them."""
    x = torch.as_tensor(rows, dtype=torch.long)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    torch.manual_seed(1)
    for _ in range(steps):
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def write_checkpoint(model: Llama, folder: Path, eos_id: int, step: int = 0) -> Path:
    """A complete checkpoint folder (marker written last), loadable by transformers."""
    return save_model_checkpoint(folder, model, eos_id=eos_id, trainer_state={"step": step})


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A prepared run with ckpt_000 (random) and ckpt_001 (memorized part of chunk 0's sample)."""
    tmp = tmp_path_factory.mktemp("memo")
    cfg = small_config(tmp, n_docs=240, chunks=3, seq_len=48)
    run_dir = tmp / "run"
    prepare(cfg, run_dir)
    store = DataStore(run_dir / "data")
    eos = int(store.manifest["eos_id"])
    chunk_N, row_N = sample_rows(store.rows_per_chunk, MEMO.rows_per_chunk, MEMO.seed)
    chunk0 = np.asarray(store.chunk(0), dtype=np.int64)
    with_eos = np.flatnonzero((chunk0[:, K : K + L] == eos).any(axis=1))[:4]  # so EOS gets memorized too
    trained_rows = chunk0[np.concatenate([row_N[chunk_N == 0][:10], with_eos])]
    random_model = tiny_model(store.vocab_size)
    write_checkpoint(random_model, run_dir / "checkpoints" / "ckpt_000", eos)
    trained = memorize(tiny_model(store.vocab_size), trained_rows, steps=150, lr=1e-2)
    write_checkpoint(trained, run_dir / "checkpoints" / "ckpt_001", eos, step=1)
    return {"dir": run_dir, "store": store, "eos": eos, "trained": trained, "random": random_model,
            "trained_rows": trained_rows}  # fmt: skip


def all_rows(store: DataStore) -> np.ndarray:
    return np.concatenate([np.asarray(store.chunk(c)[:24], dtype=np.int64) for c in range(store.num_chunks)])


def plain_greedy(model: Llama, ids: np.ndarray, eos_id: int | None = None) -> np.ndarray:
    x = torch.as_tensor(ids[:, :K])
    with torch.no_grad():
        for _ in range(L):
            logits = model(x)[:, -1]
            if eos_id is not None:
                logits[:, eos_id] = -torch.inf
            x = torch.cat((x, logits.argmax(-1, keepdim=True)), dim=1)
    return x[:, K:].numpy()


@pytest.mark.parametrize("which", ["trained", "random"])
@pytest.mark.parametrize("batch_size", [5, 64])
def test_fast_scores_equal_plain_greedy_decoding(run, which, batch_size):
    model = run[which]
    ids = np.concatenate([run["trained_rows"], all_rows(run["store"])])
    fast = memorization_scores(model, ids, K, L, batch_size=batch_size)
    ref = _scores_of(plain_greedy(model, ids), ids[:, K : K + L])
    np.testing.assert_array_equal(fast.generated, ref.generated)
    np.testing.assert_array_equal(fast.matched, ref.matched)
    np.testing.assert_array_equal(fast.first_mismatch, ref.first_mismatch)
    if which == "trained":  # every path of the early exit is exercised
        first = fast.first_mismatch
        assert (first == L).any() and ((first > 0) & (first < L - 1)).any() and (first == 0).any()


def follow_greedy(model: Llama, ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """Rows whose continuation follows the model's own greedy output for a random number of tokens."""
    out = ids.copy()
    greedy = plain_greedy(model, ids)
    m = np.random.default_rng(seed).integers(0, L + 1, len(ids))
    for i, mi in enumerate(m):
        out[i, K : K + mi] = greedy[i, :mi]
    return out


def test_fast_scores_with_gqa_and_eos_suppressed(run):
    model = tiny_model(run["store"].vocab_size, num_kv_heads=1).eval()
    ids = follow_greedy(model, all_rows(run["store"]))
    for eos in (None, run["eos"]):
        fast = memorization_scores(model, ids, K, L, batch_size=8, eos_id=eos)
        np.testing.assert_array_equal(fast.generated, plain_greedy(model, ids, eos))


@pytest.mark.parametrize("ckpt", ["ckpt_000", "ckpt_001"])
def test_scores_identical_to_transformers_generate(run, ckpt):
    folder = run["dir"] / "checkpoints" / ckpt
    ids = np.concatenate([run["trained_rows"], all_rows(run["store"])])
    model = load_model(folder, torch.float32, torch.device("cpu"))
    plain = memorization_scores(model, ids, K, L)
    theirs = reference_scores_transformers(folder, ids, K, L, batch_size=32)
    np.testing.assert_array_equal(plain.generated, theirs.generated)
    np.testing.assert_array_equal(plain.score, theirs.score)
    # min_new_tokens = l: transformers masks EOS at every step; suppress_eos does the same
    no_eos = memorization_scores(model, ids, K, L, eos_id=run["eos"])
    theirs = reference_scores_transformers(folder, ids, K, L, batch_size=32, suppress_eos=True)
    np.testing.assert_array_equal(no_eos.generated, theirs.generated)
    assert (no_eos.generated != run["eos"]).all()
    if ckpt == "ckpt_001":  # the memorized rows contain EOS, so the two definitions differ there
        assert (plain.generated == run["eos"]).any() and not np.array_equal(plain.generated, no_eos.generated)


def test_analyze_writes_scores_summary_and_is_incremental(run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(run["dir"], run_dir)
    res = analyze_memorization(run_dir, MEMO)
    assert res.ok and res.computed == ["ckpt_000", "ckpt_001"] and not res.reused
    out = run_dir / "analysis" / "memorization"
    store = DataStore(run_dir / "data")
    with np.load(out / "samples.npz", allow_pickle=False) as z:
        chunk_N, row_N = z["chunk"], z["row"]
    assert np.bincount(chunk_N).tolist() == [16, 16, 16]
    with np.load(out / "ckpt_001.npz", allow_pickle=False) as z:
        assert set(z.files) == {"chunk", "row", "matched", "first_mismatch", "score"}
        np.testing.assert_array_equal(z["row"], row_N)
        ids = np.concatenate([np.asarray(store.chunk(c)[r][None], np.int64) for c, r in zip(chunk_N, row_N, strict=True)])
        model = load_model(run_dir / "checkpoints" / "ckpt_001", torch.float32, torch.device("cpu"))
        np.testing.assert_array_equal(z["matched"], memorization_scores(model, ids, K, L).matched)
        assert z["score"][chunk_N == 0].mean() > z["score"][chunk_N != 0].mean()  # it memorized chunk 0
        assert (z["score"][chunk_N == 0] == 1).sum() >= 3
    meta = json.loads((out / "ckpt_001.json").read_text())
    assert meta["settings"]["dtype"] == "float32" and meta["device"] == "cpu" and meta["chunk"] == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checkpoints"] == ["ckpt_000", "ckpt_001"]
    d = summary["distribution"]["ckpt_001"]
    assert d["rows"] == 32 and sum(d["counts"]) == 32 and len(d["counts"]) == L + 1
    assert d["extractible"] == d["counts"][-1] and d["extractible_share"] == pytest.approx(d["counts"][-1] / 32)
    assert summary["distribution"]["ckpt_000"]["rows"] == 16 and summary["distribution_unseen"]["ckpt_000"]["rows"] == 32
    pc = summary["per_chunk"]["ckpt_001"]
    assert pc["latest_seen_chunk"] == 1 and len(pc["mean"]) == 3 and pc["mean"][0] > pc["mean"][2]
    r = summary["correlation"]["score_pearson"]
    assert r[1][1] == pytest.approx(1.0) and r[0][1] == r[1][0]

    # second call: nothing recomputed; a new checkpoint: only it
    before = (out / "ckpt_001.npz").stat().st_mtime_ns
    res = analyze_memorization(run_dir, MEMO)
    assert res.computed == [] and res.reused == ["ckpt_000", "ckpt_001"]
    assert (out / "ckpt_001.npz").stat().st_mtime_ns == before
    write_checkpoint(run["trained"], run_dir / "checkpoints" / "ckpt_002", run["eos"], step=2)
    res = analyze_memorization(run_dir, MEMO)
    assert res.computed == ["ckpt_002"] and res.reused == ["ckpt_000", "ckpt_001"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checkpoints"] == ["ckpt_000", "ckpt_001", "ckpt_002"]
    # same weights as ckpt_001: identical scores, correlation 1 over the chunks both saw
    assert summary["correlation"]["score_pearson"][1][2] == pytest.approx(1.0)
    assert summary["distribution"]["ckpt_002"]["rows"] == 48

    # other settings are refused (nothing lost), and --force recomputes everything
    with pytest.raises(AnalysisError, match="other settings"):
        analyze_memorization(run_dir, MEMO.model_copy(update={"seed": 7}))
    assert (out / "ckpt_001.npz").stat().st_mtime_ns == before
    res = analyze_memorization(run_dir, MEMO.model_copy(update={"seed": 7}), force=True)
    assert sorted(res.computed) == ["ckpt_000", "ckpt_001", "ckpt_002"]


def test_incomplete_or_corrupt_checkpoints_are_reported_and_others_still_run(run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(run["dir"], run_dir)
    ckpts = run_dir / "checkpoints"
    # being written: no marker yet (and a hidden temporary folder, which is never a candidate)
    shutil.copytree(ckpts / "ckpt_001", ckpts / "ckpt_002")
    (ckpts / "ckpt_002" / "COMPLETE.json").unlink()
    shutil.copytree(ckpts / "ckpt_001", ckpts / ".ckpt_003.tmp-12345")
    # damaged after it was written
    shutil.copytree(ckpts / "ckpt_001", ckpts / "ckpt_004")
    with open(ckpts / "ckpt_004" / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    res = analyze_memorization(run_dir, MEMO, checkpoints=None)
    assert res.computed == ["ckpt_000", "ckpt_001"]
    assert set(res.failed) == {"ckpt_002", "ckpt_004"}
    assert "COMPLETE.json" in res.failed["ckpt_002"]
    assert "model.safetensors" in res.failed["ckpt_004"]
    out = run_dir / "analysis" / "memorization"
    assert not (out / "ckpt_002.json").exists() and not (out / "ckpt_004.json").exists()
    assert json.loads((out / "summary.json").read_text())["checkpoints"] == ["ckpt_000", "ckpt_001"]
    # the save finishes: the next call does only that one
    (ckpts / "ckpt_002").rename(ckpts / ".gone")
    write_checkpoint(run["trained"], ckpts / "ckpt_002", run["eos"], step=2)
    res = analyze_memorization(run_dir, MEMO, checkpoints=["ckpt_002", "ckpt_009"])
    assert res.computed == ["ckpt_002"] and "ckpt_009" in res.failed
    # a damaged result file is recomputed, the others are left alone
    (out / "ckpt_000.npz").write_bytes(b"not a zip")
    before = (out / "ckpt_001.npz").stat().st_mtime_ns
    res = analyze_memorization(run_dir, MEMO)
    assert res.computed == ["ckpt_000"] and (out / "ckpt_001.npz").stat().st_mtime_ns == before


def test_bad_settings_are_clear_errors(run, tmp_path):
    with pytest.raises(AnalysisError, match="do not fit in a training row of 49 tokens"):
        analyze_memorization(run["dir"], MemorizationConfig(prompt_tokens=32, continuation_tokens=32))
    with pytest.raises(AnalysisError, match="too short"):
        memorization_scores(run["random"], np.zeros((2, 10), np.int64), K, L)


def test_sample_is_seeded_per_chunk_and_independent_of_other_chunks():
    a_c, a_r = sample_rows([100, 50, 7], 10, seed=3)
    b_c, b_r = sample_rows([100, 50, 7, 80], 10, seed=3)
    assert np.bincount(a_c).tolist() == [10, 10, 7]
    np.testing.assert_array_equal(a_r, b_r[: len(a_r)])
    assert not np.array_equal(a_r, sample_rows([100, 50, 7], 10, seed=4)[1])
    assert all((np.diff(a_r[a_c == c]) > 0).all() for c in range(3))
