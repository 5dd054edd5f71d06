"""The command line scripts well, and answers "where and when did the model see this document or text".

Results on stdout (one JSON document with --json), logs on stderr, documented exit codes;
``inspect doc`` lists every span of a document with its step and first checkpoint, checked against
the provenance arrays; ``inspect find`` finds a training text's rows, checked against a brute-force
scan of the chunks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import make_docs, write_jsonl
from llm360 import __version__, cli
from llm360.cli import build_parser
from llm360.cli import main as cli_main
from llm360.config import to_yaml, validate_config
from llm360.data import doc_index as doc_index_mod
from llm360.rundir.data import (
    TRAINED,
    DataStore,
    TrainedIndex,
    TrainingRecord,
    place_rows,
    trained_rows,
)
from llm360.rundir.layout import doc_index_file


def call(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli_main(["--no-progress", *args])
    got = capsys.readouterr()
    return rc, got.out, got.err


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """Two chunks of three trained; `code` repeated by the mix (weight 2.0), `web` sub-sampled (0.6);
    one malformed line in code's file, 10% of documents held out."""
    from llm360.data.prepare import prepare
    from llm360.train.loop import train

    tmp = tmp_path_factory.mktemp("cli")
    web_docs, code_docs = make_docs(60, seed=1, max_words=60), make_docs(30, seed=2, max_words=60)
    web = write_jsonl(tmp / "src" / "web.jsonl", web_docs)
    code = write_jsonl(tmp / "src" / "code.jsonl", code_docs)
    with open(code, "a", encoding="utf-8") as f:
        f.write("{not json\n")
    raw = {
        "name": "cli",
        "data": {"seq_len": 32, "valid_fraction": 0.1, "tokenizer": {"kind": "train", "vocab_size": 300},
                 "sources": [{"name": "web", "paths": [str(web)]}, {"name": "code", "paths": [str(code)]}],
                 "stages": [{"name": "main", "chunks": 3,
                             "mix": [{"source": "web", "weight": 0.6}, {"source": "code", "weight": 2.0}]}]},
        "model": {"hidden_size": 16, "intermediate_size": 32, "num_layers": 1, "num_heads": 2},
        "train": {"global_batch_sequences": 8, "micro_batch_sequences": 4, "warmup_steps": 1, "lr": 3e-3,
                  "min_lr": 3e-4, "max_chunks": 2},
        "eval": {"tasks": ["perplexity"]},
    }  # fmt: skip
    cfg = validate_config(raw)
    cfg_path = tmp / "cfg.yaml"
    cfg_path.write_text(to_yaml(cfg))
    run_dir = tmp / "run"
    prepare(cfg, run_dir)
    train(cfg, run_dir, device="cpu")
    return {"dir": run_dir, "cfg": cfg_path, "tmp": tmp, "web": web_docs, "code": code_docs}


# ------------------------------------------------------------------------------ stdout, stderr, exit codes


def test_version_help_and_usage_errors(capsys):
    rc, out, err = call(capsys, "--version")
    assert rc == 0 and out.strip() == f"llm360 {__version__}"
    text = build_parser().format_help()
    assert "exit codes:" in text and "0    success" in text and "1    a check failed" in text
    assert "2    usage or config error" in text
    sub = build_parser()._subparsers._group_actions[0].choices["verify"].format_help()  # type: ignore[union-attr]
    assert "exit codes:" in sub
    for bad in (["inspect", "batch", "--run-dir", "x", "--step", "-1"], ["nosuchcommand"],
                ["prepare", "--run-dir", "x", "--workers", "0"], ["inspect", "doc", "web"]):
        rc, out, err = call(capsys, *bad)
        assert rc == 2 and out == "" and "usage:" in err, bad


def test_config_fields_pipe_and_json(capsys):
    rc, out, err = call(capsys, "config", "fields", "train")
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert all(line.count("\t") == 2 for line in lines)
    assert [line for line in lines if line.startswith("train.lr\t")] == ["train.lr\t0.0003\tPeak learning rate."]
    rc, out, err = call(capsys, "config", "fields", "--json")
    fields = json.loads(out)
    assert rc == 0 and {"key": "train.beta1", "default": "0.9", "meaning": "AdamW beta1, in [0, 1)."} in fields


def test_config_errors_are_exit_2_on_stderr(capsys, tmp_path: Path):
    p = tmp_path / "c.yaml"
    for text, says in (("train: {beta1: 1.0e9}\n", "train.beta1"), ("model: {name: {a: 1}}\n", "model.name"),
                       ("preset: {a: 1}\n", "preset"), ("model: {max_seq_len: 16}\n", "model.max_seq_len"),
                       ("train: {lr: 1.0e-5}\n", "min_lr"), ("model: {rope_fraction: 0.3}\n", "rope_fraction")):
        p.write_text("preset: embedded\n" + text)
        rc, out, err = call(capsys, "config", "show", str(p))
        assert rc == 2 and out == "" and says in err and "Traceback" not in err, text


def test_results_on_stdout_logs_on_stderr(run, capsys, tmp_path: Path):
    rc, out, err = call(capsys, "prepare", str(run["cfg"]), "--run-dir", str(tmp_path / "r"))
    assert rc == 0 and "prepared 3 chunks" in out and "rows x 33 tokens" in out
    assert "trained a byte-level BPE" in err and "INFO" in err and "INFO" not in out
    rc, out, err = call(capsys, "inspect", "batch", "--run-dir", str(run["dir"]), "--step", "1")
    assert rc == 0 and out.startswith("step 1: chunk 000") and "documents:" in out
    rc, out, err = call(capsys, "verify", str(run["dir"]))  # a run directory is no release: checks fail
    assert rc == 1 and "FAIL" in out and "SHA256SUMS is missing" in out


def test_every_json_flag_writes_one_document(run, capsys):
    d = str(run["dir"])
    for args in (["inspect", "batch", "--run-dir", d, "--step", "0"],
                 ["inspect", "chunk", "--run-dir", d, "--chunk", "1", "--row", "3"],
                 ["inspect", "doc", "code", "0", "--run-dir", d],
                 ["inspect", "find", "doc 1:", "--run-dir", d],
                 ["eval", "--run-dir", d, "--tasks", "perplexity", "--checkpoints", "ckpt_000"],
                 ["verify", d], ["config", "fields"]):  # fmt: skip
        rc, out, err = call(capsys, *args, "--json")
        assert rc in (0, 1), (args, err[-2000:])
        doc = json.loads(out)  # the whole of stdout is one JSON document
        assert out.count("\n") == 1 and doc, args
    rc, out, _ = call(capsys, "eval", "--run-dir", d, "--tasks", "perplexity", "--checkpoints", "ckpt_000", "--json")
    assert json.loads(out)["rows"][0]["checkpoint"] == "ckpt_000"


def test_a_library_print_goes_to_stderr(monkeypatch, capsys):
    def noisy(args) -> int:
        print("a library talking")
        cli.out.json({"answer": 42})
        return 0

    monkeypatch.setattr(cli, "cmd_config_fields", noisy)
    rc, out, err = call(capsys, "config", "fields", "--json")
    assert rc == 0 and json.loads(out) == {"answer": 42} and "a library talking" in err


# ------------------------------------------------------------------------------------------ inspect doc


def _spans_in_provenance(store: DataStore, source: str, n: int) -> list[tuple[int, int, int, int, int]]:
    table = [s["name"] for s in store.manifest["data_config"]["sources"]].index(source)
    out = []
    for c in range(store.num_chunks):
        p = store.provenance(c)
        for rec in p[(p["table"] == table) & (p["doc"] == n)]:
            out.append((c, int(rec["row"]), int(rec["row_offset"]), int(rec["length"]), int(rec["doc_offset"])))
    return sorted(out)


def test_inspect_doc_lists_every_span_of_a_repeated_document(run, capsys):
    d = str(run["dir"])
    store, index = DataStore(run["dir"] / "data"), trained_rows(d)
    checked = 0
    for n in range(len(run["code"])):
        rc, out, _ = call(capsys, "inspect", "doc", "code", str(n), "--run-dir", d, "--json")
        doc = json.loads(out)
        assert rc == 0 and doc["number"] == n and doc["id"] == f"code.jsonl:{n + 1}"
        if doc["status"] != "train":
            continue
        spans = doc["spans"]
        got = sorted((s["chunk"], s["row"], s["row_offset"], s["length"], s["doc_offset"]) for s in spans)
        assert got == _spans_in_provenance(store, "code", n)
        assert sum(s["doc_offset"] == 0 for s in spans) == 2  # two copies: weight 2.0
        for s in spans:
            place = index.place(s["chunk"], s["row"])
            assert s["trained_at"]["step"] == place.step and s["trained_at"]["status"] == place.status
            trained = place.status == TRAINED
            assert s["checkpoint"] == (f"ckpt_{s['chunk']:03d}" if trained else None)
            assert trained == (s["chunk"] < 2 and place.step is not None)
        if len({s["chunk"] for s in spans}) > 1 and doc["first_step"] is not None:
            first = min(s["trained_at"]["step"] for s in spans if s["trained_at"]["trained"])
            assert doc["first_step"] == first and doc["first_checkpoint"].startswith("ckpt_")
            checked += 1
    assert checked >= 3
    rc, out, _ = call(capsys, "inspect", "doc", "code", "code.jsonl:3", "--run-dir", d)  # by id, as text
    assert rc == 0 and "code document 2 (code.jsonl:3)" in out and "2 copies" in out and "first in ckpt_" in out


def test_inspect_doc_says_held_out_rejected_or_not_selected(run, capsys):
    d = str(run["dir"])
    rc, out, _ = call(capsys, "inspect", "doc", "code", "code.jsonl:31", "--run-dir", d)
    assert rc == 0 and "rejected" in out and "malformed_json" in out
    statuses: dict[str, str] = {}
    for n in range(len(run["web"])):
        rc, out, _ = call(capsys, "inspect", "doc", "web", str(n), "--run-dir", d, "--json")
        doc = json.loads(out)
        key = doc["status"] if doc["status"] != "train" else ("used" if doc["spans"] else "unselected")
        statuses.setdefault(key, doc["notes"][0])
    assert "held out for validation" in statuses["valid"]
    assert "not_selected_by_mix" in statuses["unselected"] and "span(s)" in statuses["used"]
    rc, out, err = call(capsys, "inspect", "doc", "web", "web.jsonl:999", "--run-dir", d)
    assert rc == 2 and out == "" and "no document with id 'web.jsonl:999'" in err
    rc, out, err = call(capsys, "inspect", "doc", "news", "1", "--run-dir", d)
    assert rc == 2 and "no source named 'news'" in err and "web, code" in err


def test_doc_index_is_cached_once_and_never_written_into_a_release(run, capsys, monkeypatch, tmp_path: Path):
    from llm360.release.build import release
    from llm360.release.verify import verify

    d = str(run["dir"])
    assert call(capsys, "inspect", "doc", "web", "3", "--run-dir", d)[0] == 0
    cached = doc_index_file(run["dir"] / "data", "code")
    assert cached.is_file() and doc_index_file(run["dir"] / "data", "web").is_file()
    idx = np.load(cached)
    assert np.all(np.diff(idx["doc"].astype(np.int64)) >= 0)  # sorted by document
    rel = release(run["dir"], tmp_path / "rel")
    assert not (rel / "data" / ".doc_index").exists()  # hidden: not released

    def no_rebuild(store):
        raise AssertionError("the index was built again")

    monkeypatch.setattr(doc_index_mod, "build_doc_index", no_rebuild)
    assert call(capsys, "inspect", "doc", "code", "2", "--run-dir", d)[0] == 0
    monkeypatch.undo()
    rc, out, _ = call(capsys, "inspect", "doc", "code", "2", "--run-dir", str(rel), "--json")
    assert rc == 0 and json.loads(out)["spans"]
    assert not (rel / "data" / ".doc_index").exists()  # a release is read only
    assert verify(rel).ok


def test_place_rows_equals_place_after_reseeds_and_skips():
    rows = [50, 43, 61]
    record = TrainingRecord(step=14, chunk_reseeds={1: 2}, skipped_steps=frozenset({7}),
                            skipped_chunks=frozenset({2}))
    index = TrainedIndex(rows, 4, seed=3, record=record, run_global_batch=4)
    for chunk, n in enumerate(rows):
        order = np.random.default_rng(chunk).permutation(n)
        assert place_rows(index, chunk, order) == [index.place(chunk, int(r)) for r in order]


# ----------------------------------------------------------------------------------------- inspect find


def _brute_force(store: DataStore, ids: list[int]) -> set[tuple[int, int, int]]:
    """Every (chunk, row, col) where the ids occur inside one row: a sliding window over every row."""
    q = np.asarray(ids)
    found = set()
    for c in range(store.num_chunks):
        win = np.lib.stride_tricks.sliding_window_view(np.asarray(store.chunk(c)), len(q), axis=1)
        for r, col in zip(*np.nonzero((win == q).all(axis=2)), strict=True):
            found.add((c, int(r), int(col)))
    return found


def test_find_a_sentence_copied_from_a_training_document(run, capsys):
    from llm360.data.tokenizer import load_saved

    d = str(run["dir"])
    store, index = DataStore(run["dir"] / "data"), trained_rows(d)
    tok = load_saved(run["dir"] / "data" / "tokenizer")
    n, text = next((n, t) for n, t in enumerate(run["code"]) if len(t.split()) > 20 and any(
        s[4] == 0 and s[3] >= 20 and s[0] < 2 for s in _spans_in_provenance(store, "code", n)))
    words = text.split()
    k = max(i for i in range(3, len(words)) if len(tok.encode_batch([" ".join(words[:i])])[0]) <= 20)
    sentence = " ".join(words[:k])
    ids = tok.encode_batch([sentence])[0]
    rc, out, _ = call(capsys, "inspect", "find", sentence, "--run-dir", d, "--json")
    res = json.loads(out)
    assert rc == 0 and res["exact"] and res["token_ids"] == ids and res["length"] == len(ids)
    got = {(m["chunk"], m["row"], m["col"]) for m in res["matches"]}
    assert got == _brute_force(store, ids) and res["total_matches"] == len(got)
    starts = [s for s in _spans_in_provenance(store, "code", n) if s[4] == 0 and s[3] >= len(ids)]
    assert {(c, r, off) for c, r, off, _, _ in starts} <= got  # both copies of the document
    for m in res["matches"]:
        place = index.place(m["chunk"], m["row"])
        assert m["trained_at"]["step"] == place.step
        assert m["checkpoint"] == (f"ckpt_{m['chunk']:03d}" if place.status == TRAINED else None)
        if (m["chunk"], m["row"], m["col"]) in {(c, r, off) for c, r, off, _, _ in starts}:
            assert {"source": "code", "doc_id": f"code.jsonl:{n + 1}"}.items() <= m["documents"][0].items()
    rc, out, _ = call(capsys, "inspect", "find", sentence, "--run-dir", d)
    assert rc == 0 and "occurs" in out and f"code:code.jsonl:{n + 1}@0" in out and "first in ckpt_" in out

    # not all of it: the rows holding its longest run
    rc, out, _ = call(capsys, "inspect", "find", sentence + " qqqzx wwvk", "--run-dir", d, "--json")
    res = json.loads(out)
    assert rc == 0 and not res["exact"] and res["length"] >= len(ids) - 1
    assert all(m["length"] == res["length"] for m in res["matches"]) and res["matches"]


def test_find_from_a_file_and_its_errors(run, capsys, tmp_path: Path):
    d = str(run["dir"])
    f = tmp_path / "q.txt"
    f.write_text(run["web"][0].split(":")[0] + ":", encoding="utf-8")
    rc, out, _ = call(capsys, "inspect", "find", "--file", str(f), "--run-dir", d, "--json")
    assert rc == 0 and json.loads(out)["total_matches"] >= 1
    for bad in (["inspect", "find", "--run-dir", d], ["inspect", "find", "x", "--file", str(f), "--run-dir", d],
                ["inspect", "find", "", "--run-dir", d], ["inspect", "find", "--file", str(tmp_path / "no"),
                                                          "--run-dir", d]):  # fmt: skip
        rc, out, err = call(capsys, *bad)
        assert rc == 2 and out == "" and "error:" in err, bad


def _synthetic_store(root: Path, chunks: list[np.ndarray]) -> DataStore:
    data = root / "data"
    data.mkdir(parents=True)
    entries = []
    for c, arr in enumerate(chunks):
        np.save(data / f"chunk_{c:03d}.npy", arr.astype(np.uint16))
        entries.append({"file": f"chunk_{c:03d}.npy", "rows": int(arr.shape[0])})
    (data / "manifest.json").write_text(json.dumps({
        "format": "llm360-data", "token_dtype": "uint16", "row_length": int(chunks[0].shape[1]),
        "seq_len": int(chunks[0].shape[1]) - 1, "vocab_size": 16, "num_chunks": len(chunks), "chunks": entries}))
    return DataStore(data)


def _longest_runs_brute_force(store: DataStore, q: np.ndarray) -> tuple[int, set[tuple[int, int, int, int]]]:
    """(longest run, every (chunk, row, col, text start) of a maximal run that long), cell by cell."""
    best, found = 0, set()
    for c in range(store.num_chunks):
        for r, row in enumerate(np.asarray(store.chunk(c))):
            eq = row[:, None] == q[None, :]
            for col, j in zip(*np.nonzero(eq), strict=True):
                if col and j and eq[col - 1, j - 1]:
                    continue  # not the start of a maximal run
                n = 0
                while col + n < len(row) and j + n < len(q) and eq[col + n, j + n]:
                    n += 1
                if n > best:
                    best, found = n, set()
                if n == best:
                    found.add((c, r, int(col), int(j)))
    return best, found


def test_longest_runs_equal_a_brute_force_search(tmp_path: Path):
    from llm360.analysis.find import MIN_NGRAM, longest_runs

    rng = np.random.default_rng(0)
    store = _synthetic_store(tmp_path, [rng.integers(0, 6, (40, 37)), rng.integers(0, 6, (25, 37))])
    rows = np.concatenate([np.asarray(store.chunk(0)), np.asarray(store.chunk(1))])
    for trial in range(60):
        q_len = int(rng.integers(1, 30))
        if trial % 2:  # a slice of a row, with a changed token now and then
            r, s = int(rng.integers(len(rows))), int(rng.integers(0, 37 - min(q_len, 37) + 1))
            q = rows[r, s : s + q_len].astype(np.int64).copy()
            if trial % 4 == 1 and len(q) > 2:
                q[int(rng.integers(len(q)))] = 7  # a token the data never has
        else:
            q = rng.integers(0, 7, q_len)
        length, count, found = longest_runs(store, q, keep=10_000, block_tokens=37 * 7)
        best, expect = _longest_runs_brute_force(store, q)
        if best < min(MIN_NGRAM, len(q)):
            best, expect = 0, set()
        assert length == best, (trial, q.tolist())
        assert {tuple(int(x) for x in f) for f in found} == expect and count == len(expect), (trial, q.tolist())


def test_strided_seed_hashes_are_contamination_hashes():
    from llm360.analysis.ngrams import ngram_hashes, seed_hashes

    x = np.random.default_rng(1).integers(0, 50000, 1000).astype(np.uint16)
    for n, stride in ((1, 1), (2, 1), (8, 1), (8, 8), (5, 3), (8, 25)):
        np.testing.assert_array_equal(seed_hashes(x, n, stride), ngram_hashes(x, n)[::stride])
