"""Contamination: exact n-gram overlap against a brute-force reference, buckets, bad inputs, incremental."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import make_docs, small_config, write_jsonl
from llm360.analysis import AnalysisError, ContaminationConfig, contamination, eval_sets
from llm360.analysis.contamination import (
    _init_worker,
    _scan_block,
    analyze_contamination,
    build_eval_index,
    scan_training_data,
)
from llm360.analysis.ngrams import ngram_hashes
from llm360.data.prepare import prepare
from llm360.data.tokenizer import load_saved
from llm360.rundir.data import DataStore
from test_inspect import trained_run  # a tiny trained run with a NaN injected (LLM360_INJECT_AT_STEPS)

N = 8
FRESH = "zebra quantum violin nebula saffron glacier orbit lantern marble tundra " * 3


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("contam")
    cfg = small_config(tmp, n_docs=200, chunks=3, seq_len=32)
    prepare(cfg, tmp / "run")
    return tmp / "run"


def training_docs() -> list[str]:
    return make_docs(200, seed=1)  # conftest's "web" source of small_config


@functools.lru_cache(maxsize=4)
def training_ngrams(run_dir: Path, n: int) -> frozenset:
    store = DataStore(run_dir / "data")
    grams = set()
    for c in range(store.num_chunks):
        for row in np.asarray(store.chunk(c)).tolist():
            grams.update(tuple(row[i : i + n]) for i in range(len(row) - n + 1))
    return frozenset(grams)


def brute_force(run_dir: Path, texts: list[str], n: int) -> tuple[list[float], list[bool]]:
    """Per example: contaminated token share and whether any n-gram is in a training row."""
    grams = training_ngrams(run_dir, n)
    tok = load_saved(run_dir / "data" / "tokenizer")
    shares, hit = [], []
    for ids in tok.encode_batch(texts):
        covered = np.zeros(len(ids), bool)
        any_hit = False
        for i in range(len(ids) - n + 1):
            if tuple(ids[i : i + n]) in grams:
                covered[i : i + n] = True
                any_hit = True
        shares.append(round(float(covered.mean()), 4) if len(ids) else 0.0)
        hit.append(any_hit)
    return shares, hit


def leaky_examples(run_dir: Path) -> list[str]:
    """Examples made of training documents (whole ones, halves, quotes), fresh text and a tiny one."""
    docs = training_docs()[:60]
    shares, _ = brute_force(run_dir, docs, N)
    full = [d for d, s in zip(docs, shares, strict=True) if s == 1.0 and len(d) > 200]  # fully in training rows
    return [
        full[0],  # a whole training document: dirty
        full[1][: len(full[1]) // 2] + " " + FRESH,  # half of one: in between
        FRESH,  # nothing from the training data: clean
        full[2][:60] + " " + FRESH + FRESH,  # a short quote in a long example
        "tiny",  # shorter than n tokens
    ]


def test_ngram_hashes_equal_the_polynomial_definition():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 60000, 200).astype(np.uint16)
    for n in (1, 2, 3, 5, 8, 13, 16, 31):
        ref = np.zeros(len(x) - n + 1, np.uint64)
        for j in range(n):
            ref = ref * np.uint64(0x9E3779B97F4A7C15) + x[j : len(x) - n + 1 + j].astype(np.uint64)
        np.testing.assert_array_equal(ngram_hashes(x, n), ref)
    assert len(ngram_hashes(x[:5], 13)) == 0


def test_contamination_matches_brute_force_and_buckets(run, tmp_path):
    task = write_jsonl(tmp_path / "leaky.jsonl", leaky_examples(run))
    res = analyze_contamination(run, ContaminationConfig(tasks=[str(task)], ngram=N, workers=1))
    assert res.ok and res.computed == ["leaky"]
    rep = json.loads((run / "analysis" / "contamination" / "leaky.json").read_text())
    shares, hit = brute_force(run, leaky_examples(run), N)
    assert rep["per_example"]["contamination"] == shares
    assert [c >= 0 for c in rep["per_example"]["first_chunk"]] == hit
    assert shares[0] == 1.0 and 0.2 < shares[1] < 0.8 and shares[2] == 0.0 and 0 < shares[3] < 0.2
    assert rep["examples"] == 5 and rep["examples_shorter_than_ngram"] == 1
    assert rep["contaminated_examples"] == 3 and rep["contaminated_share"] == pytest.approx(0.6)
    b = rep["buckets"]
    assert (b["clean"]["examples"], b["not_clean"]["examples"]) == (3, 2)
    assert (b["not_dirty"]["examples"], b["dirty"]["examples"]) == (4, 1)
    assert rep["thresholds"]["clean_below"] == 0.2 and rep["thresholds"]["dirty_at_least"] == 0.8
    # where: chunks with hits, named with the checkpoint first trained on them
    assert rep["chunks"] and all(c["checkpoint"] == f"ckpt_{c['chunk']:03d}" for c in rep["chunks"])
    first = min(c for c in rep["per_example"]["first_chunk"] if c >= 0)
    assert rep["first_checkpoint_that_saw_it"] == f"ckpt_{first:03d}"
    seen = rep["contaminated_examples_seen_by_checkpoint"]
    assert len(seen) == 3 and seen[-1] == 3 and seen == sorted(seen)
    top = rep["top_examples"][0]
    assert top["index"] == 0 and top["contamination"] == 1.0
    assert top["matched_ngram"] in top["training_context"]
    store = DataStore(run / "data")
    occ = top["first_occurrence"]
    row = np.asarray(store.chunk(occ["chunk"])[occ["row"]])
    tok = load_saved(run / "data" / "tokenizer")
    assert tok.decode(row[occ["position"] : occ["position"] + N].tolist()) == top["matched_ngram"]


def test_scan_is_the_same_with_a_process_pool_and_small_blocks(run, monkeypatch):
    monkeypatch.setattr(contamination, "_TOKENS_PER_WORKER", 1)  # a pool even for this tiny data set
    tok = load_saved(run / "data" / "tokenizer")
    ids = [np.asarray(x) for x in tok.encode_batch(leaky_examples(run) + training_docs()[60:70])]
    index = build_eval_index({"a": ids[:7], "b": ids[5:]}, N)
    store = DataStore(run / "data")
    one = scan_training_data(store, index, workers=1, block_tokens=1 << 20)
    forked = scan_training_data(store, index, workers=2, block_tokens=1024)
    monkeypatch.setattr(contamination.mp, "get_all_start_methods", lambda: ["spawn"])  # as on macOS/Windows
    spawned = scan_training_data(store, index, workers=2, block_tokens=4096)
    for two in (forked, spawned):
        for f in ("count", "first_chunk", "first_row", "first_col", "chunk_task_hits"):
            np.testing.assert_array_equal(getattr(one, f), getattr(two, f))
        assert one.chunk_examples.keys() == two.chunk_examples.keys()
        for c in one.chunk_examples:
            np.testing.assert_array_equal(one.chunk_examples[c], two.chunk_examples[c])
    assert one.count.sum() > 0 and one.tokens == sum(store.rows_per_chunk) * store.row_length


def test_hash_matches_are_verified_token_by_token(run):
    """A training n-gram whose hash equals an evaluation hash but whose tokens differ is no hit."""
    store = DataStore(run / "data")
    row = np.asarray(store.chunk(0)[0], dtype=np.int64)
    index = build_eval_index({"t": [row[:N]]}, N)
    state = {"n": N, "bits": 16, "hashes": index.hashes, "bitmap": np.full(1 << 13, 255, np.uint8),
             "tokens": index.tokens, "rep_start": index.rep_start}  # fmt: skip
    path = str(store.dir / store.manifest["chunks"][0]["file"])
    _init_worker(state)
    found, counts, rows, cols = _scan_block(path, 0, 1)
    assert found.tolist() == [0] and rows.tolist() == [0] and cols.tolist() == [0]
    _init_worker({**state, "tokens": index.tokens + 1})  # same hash, other tokens: as after a collision
    found, *_ = _scan_block(path, 0, 1)
    assert len(found) == 0


def test_bad_task_inputs_are_reported_and_the_other_tasks_still_run(run, tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", leaky_examples(run)[:2])
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": oops}\n')
    nofield = write_jsonl(tmp_path / "nofield.jsonl", ["x"], field="question")
    # an lm-eval task file whose data is local (loads offline) and one whose data is on the Hub
    (tmp_path / "qa.jsonl").write_text(json.dumps({"q": leaky_examples(run)[0], "a": "yes"}) + "\n")
    (tmp_path / "local_qa.yaml").write_text(
        "task: local_qa\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'qa.jsonl'}\ntest_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{q}}"\ndoc_to_target: "{{a}}"\n'
    )
    (tmp_path / "remote.yaml").write_text(
        "task: remote_qa\ndataset_path: no-such-org/no-such-dataset\ntest_split: test\n"
        'output_type: generate_until\ndoc_to_text: "{{q}}"\ndoc_to_target: "{{a}}"\n'
    )
    specs = [str(good), str(bad), str(nofield), str(tmp_path / "missing.jsonl"),
             str(tmp_path / "local_qa.yaml"), str(tmp_path / "remote.yaml")]  # fmt: skip
    res = analyze_contamination(run, ContaminationConfig(tasks=specs, ngram=N, workers=1))
    assert sorted(res.computed) == ["good", "local_qa"]
    assert "line 3: not valid JSON" in res.failed[str(bad)]
    assert "line 1: no text field 'text' (fields: question)" in res.failed[str(nofield)]
    assert "not found" in res.failed[str(tmp_path / "missing.jsonl")]
    assert "not available offline" in res.failed[str(tmp_path / "remote.yaml")]
    rep = json.loads((run / "analysis" / "contamination" / "local_qa.json").read_text())
    assert rep["source"] == "lm-eval:local_qa" and rep["contaminated_examples"] == 1


def test_incremental_nothing_recomputed_and_changes_need_force(run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(run, run_dir, ignore=shutil.ignore_patterns("analysis"))
    a = write_jsonl(tmp_path / "a.jsonl", leaky_examples(run))
    b = write_jsonl(tmp_path / "b.jsonl", [training_docs()[7]])
    cfg = ContaminationConfig(tasks=[str(a)], ngram=N, workers=1)
    assert analyze_contamination(run_dir, cfg).computed == ["a"]
    out = run_dir / "analysis" / "contamination"
    before = (out / "a.json").stat().st_mtime_ns
    res = analyze_contamination(run_dir, cfg, tasks=[str(a), str(b)])
    assert res.reused == ["a"] and res.computed == ["b"]
    assert (out / "a.json").stat().st_mtime_ns == before
    write_jsonl(a, leaky_examples(run)[:3])  # the task changed: its old result is kept until --force
    res = analyze_contamination(run_dir, cfg)
    assert "pass --force" in res.failed["a"] and (out / "a.json").stat().st_mtime_ns == before
    res = analyze_contamination(run_dir, cfg, force=True)
    assert res.computed == ["a"] and json.loads((out / "a.json").read_text())["examples"] == 3
    with pytest.raises(AnalysisError, match="no tasks given"):
        analyze_contamination(run_dir, ContaminationConfig())


def test_unknown_lm_eval_task_name_is_a_clear_message(run, monkeypatch):
    class Index:  # lm-eval's task index takes ~10 s to build; its names are all that matter here
        all_tasks = ["arc_easy", "hellaswag", "mmlu"]

    monkeypatch.setattr(eval_sets.LmEvalTasks, "manager", lambda self, defaults: Index())
    res = analyze_contamination(run, ContaminationConfig(tasks=["hellaswagg"], workers=1))
    assert "neither a file nor an lm-eval task name; did you mean hellaswag?" in res.failed["hellaswagg"]


@pytest.fixture(scope="module")
def skipped_chunk(tmp_path_factory) -> dict:
    """A NaN in chunk 1 under nonfinite_policy = rollback_skip_chunk: chunk 1 is in the data, never trained."""
    return trained_run(tmp_path_factory.mktemp("contam-skip"), "rollback_skip_chunk", lambda spc: spc[0] + 5)


def chunks_holding(run_dir: Path, texts: list[str], n: int) -> list[set[int]]:
    """Per example: the chunks with a training row holding one of its n-grams (brute force)."""
    store = DataStore(run_dir / "data")
    per_chunk = []
    for c in range(store.num_chunks):
        grams = set()
        for row in np.asarray(store.chunk(c)).tolist():
            grams.update(tuple(row[i : i + n]) for i in range(len(row) - n + 1))
        per_chunk.append(grams)
    out = []
    for ids in load_saved(run_dir / "data" / "tokenizer").encode_batch(texts):
        mine = {tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)}
        out.append({c for c, grams in enumerate(per_chunk) if mine & grams})
    return out


def test_a_chunk_a_guard_skipped_is_not_counted_as_seen(skipped_chunk, tmp_path):
    run = skipped_chunk["dir"]
    assert skipped_chunk["summary"]["skipped_chunks"] == [1]
    store = DataStore(run / "data")
    tok = load_saved(run / "data" / "tokenizer")
    texts = [tok.decode(np.asarray(store.chunk(c)[0]).tolist()) for c in range(store.num_chunks)]  # one per chunk
    n = 20  # this corpus's few words repeat shorter n-grams across chunks
    assert chunks_holding(run, texts, n) == [{0}, {1}, {2}]  # each example's n-grams are in its own chunk only
    task = write_jsonl(tmp_path / "rows.jsonl", texts)
    cfg = ContaminationConfig(tasks=[str(task)], ngram=n, workers=1)
    res = analyze_contamination(run, cfg)
    assert res.ok and res.computed == ["rows"]
    path = run / "analysis" / "contamination" / "rows.json"
    rep = json.loads(path.read_text())
    assert rep["skipped_chunks"] == [1] and rep["settings"]["skipped_chunks"] == [1]
    # in the data: every example, chunk 1's included
    assert rep["contaminated_examples"] == 3 and rep["per_example"]["first_chunk"] == [0, 1, 2]
    assert [(c["chunk"], c["skipped"]) for c in rep["chunks"]] == [(0, False), (1, True), (2, False)]
    # seen by a checkpoint: never chunk 1's example, which no checkpoint trained on
    assert rep["per_example"]["first_seen_chunk"] == [0, -1, 2]
    assert rep["contaminated_examples_seen_by_checkpoint"] == [1, 1, 2]
    assert rep["first_checkpoint_that_saw_it"] == "ckpt_000"
    top = {x["index"]: x for x in rep["top_examples"]}
    assert top[1]["first_occurrence"]["chunk"] == 1 and top[1]["first_occurrence"]["skipped"]
    assert top[1]["first_seen_by"] is None and top[2]["first_seen_by"] == "ckpt_002"

    # only chunk 1's example: seen by no checkpoint
    only = write_jsonl(tmp_path / "only.jsonl", texts[1:2])
    analyze_contamination(run, cfg, tasks=[str(only)])
    rep = json.loads((run / "analysis" / "contamination" / "only.json").read_text())
    assert rep["contaminated_examples"] == 1 and rep["first_checkpoint_that_saw_it"] is None
    assert rep["contaminated_examples_seen_by_checkpoint"] == [0, 0, 0]

    # a result written before training skipped the chunk is recomputed, not reused nor refused
    old = json.loads(path.read_text())
    old["settings"]["skipped_chunks"] = []
    path.write_text(json.dumps(old))
    res = analyze_contamination(run, cfg)
    assert res.ok and res.computed == ["rows"]
    assert json.loads(path.read_text())["contaminated_examples_seen_by_checkpoint"] == [1, 1, 2]
