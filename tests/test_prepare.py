"""The data stage's promises: determinism, accounting, provenance, bad input, round trips."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_docs, small_config, write_jsonl
from llm360.cli import main as cli_main
from llm360.config import validate_config
from llm360.data.prepare import prepare, token_dtype
from llm360.data.tokenizer import load_saved
from llm360.errors import DataError, RunDirError
from llm360.rundir.data import DataStore, StepIndex


def other_data(cfg):
    """cfg with another data set (seq_len 16)."""
    raw = cfg.model_dump(mode="json")
    raw["data"]["seq_len"] = 16
    return validate_config(raw)


def tree_hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def hidden_data_entries(run: Path) -> list[str]:
    """What a prepare keeps beside data/ while it runs (its build, scratch, a moved-aside data/)."""
    return sorted(p.name for p in run.iterdir() if p.name.startswith(".data"))


def dead_pid() -> int:
    """The pid of a process that has exited: what a killed prepare's leftovers are named with."""
    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait()
    return p.pid


def test_workers_1_and_2_give_byte_identical_data(tmp_path: Path):
    cfg = small_config(tmp_path)
    prepare(cfg, tmp_path / "a", workers=1)
    prepare(cfg, tmp_path / "b", workers=2)
    prepare(cfg, tmp_path / "c", workers=1)
    ha, hb, hc = (tree_hashes(tmp_path / r / "data") for r in "abc")
    assert ha == hb == hc
    assert any(k.startswith("chunk_") for k in ha) and "manifest.json" in ha
    assert any(k.startswith("provenance_") for k in ha)


def test_a_moved_corpus_prepares_to_the_same_data(tmp_path: Path):
    # Document ids do not hold the corpus's location, so neither do the split and the mix.
    cfg = small_config(tmp_path / "here", n_docs=120, chunks=2)
    prepare(cfg, tmp_path / "a")
    (tmp_path / "there").mkdir()
    os.rename(tmp_path / "here" / "src", tmp_path / "there" / "corpus")
    raw = cfg.model_dump(mode="json")
    for s in raw["data"]["sources"]:
        s["paths"] = [p.replace(str(tmp_path / "here" / "src"), str(tmp_path / "there" / "corpus")) for p in s["paths"]]
    prepare(validate_config(raw), tmp_path / "b")
    ha, hb = (tree_hashes(tmp_path / r / "data") for r in "ab")
    assert ha.pop("manifest.json") != hb.pop("manifest.json")  # it records the source paths
    for run, base in (("a", tmp_path / "here" / "src"), ("b", tmp_path / "there" / "corpus")):
        web = DataStore(tmp_path / run / "data").manifest["sources"]["web"]
        assert web["doc_id_base"] == str(base)  # an id's file is doc_id_base / the id's path part
    assert ha == hb and any(k.startswith("chunk_") for k in ha)


def test_too_small_a_validation_share_is_said_at_prepare_and_eval(tmp_path: Path, caplog):
    from llm360.eval.perplexity import validation_sources

    cfg = small_config(tmp_path, n_docs=60, chunks=2, extra={"valid_fraction": 0.001})
    with caplog.at_level("WARNING", logger="llm360"):
        prepare(cfg, tmp_path / "run")
    assert "source 'web': valid_fraction = 0.001 held out 0 of its 60 documents" in caplog.text
    assert "raise data.valid_fraction" in caplog.text
    _, sources, why = validation_sources(tmp_path / "run" / "data")
    assert sources == [] and "no validation rows: data.valid_fraction = 0.001" in why


def test_seed_changes_order_not_content(tmp_path: Path):
    cfg = small_config(tmp_path)
    prepare(cfg, tmp_path / "a")
    raw = cfg.model_dump(mode="json")
    raw["data"]["seed"] = 99
    prepare(validate_config(raw), tmp_path / "b")
    a, b = DataStore(tmp_path / "a" / "data"), DataStore(tmp_path / "b" / "data")
    assert not np.array_equal(a.chunk(0), b.chunk(0))


def test_manifest_accounts_for_every_document(tmp_path: Path):
    cfg = small_config(tmp_path)
    m = prepare(cfg, tmp_path / "run").manifest
    for name, s in m["sources"].items():
        assert s["documents_in"] == s["documents_used"] + s["documents_rejected_total"], name
        table = tmp_path / "run" / "data" / "documents" / f"{name}.jsonl.gz"
        with gzip.open(table, "rt") as f:
            recs = [json.loads(line) for line in f]
        assert [r["n"] for r in recs] == list(range(s["documents_in"]))
        assert sum(r["status"] == "valid" for r in recs) == s["documents_used_valid"]
    # every chunk: same rows, rows x row_length tokens, per-source tokens add up
    rows = {c["rows"] for c in m["chunks"]}
    assert len(rows) == 1
    for c in m["chunks"]:
        assert sum(c["tokens_per_source"].values()) == c["tokens"] == c["rows"] * m["row_length"]
    # tokens: packed = in chunks + dropped (with reasons)
    st = m["stages"][0]
    dropped = sum(sum(v for k, v in s["tokens_dropped"].items() if not k.startswith("valid"))
                  for s in m["sources"].values())
    assert st["tokens_packed"] == m["total_tokens"] + dropped


def test_provenance_points_at_the_exact_document_tokens(tmp_path: Path):
    cfg = small_config(tmp_path)
    prepare(cfg, tmp_path / "run")
    store = DataStore(tmp_path / "run" / "data")
    tok = load_saved(store.dir / "tokenizer")
    texts = {
        "web": make_docs(400, seed=1),
        "code": make_docs(200, seed=2),
    }
    checked = 0
    for c in range(store.num_chunks):
        arr = store.chunk(c)
        prov = store.provenance(c)
        covered = np.zeros(arr.shape[0], dtype=np.int64)
        for rec in prov[:: max(1, len(prov) // 60)]:
            src = store.manifest["source_names"][rec["source"]]
            n = int(rec["doc"])
            doc_ids = tok.encode_batch([texts[src][n]])[0] + [store.manifest["eos_id"]]
            lo, ln = int(rec["doc_offset"]), int(rec["length"])
            got = arr[int(rec["row"]), int(rec["row_offset"]) : int(rec["row_offset"]) + ln]
            assert list(got) == doc_ids[lo : lo + ln]
            checked += 1
        np.add.at(covered, prov["row"].astype(np.int64), prov["length"].astype(np.int64))
        assert (covered == store.row_length).all(), "every token of every row has a provenance"
    assert checked > 50


def test_step_index_is_independent_of_world_size(tmp_path: Path):
    idx = StepIndex([10, 10, 9], global_batch=4)
    assert idx.total_steps == 2 + 2 + 2
    assert [idx.locate(s).chunk for s in range(6)] == [0, 0, 1, 1, 2, 2]
    assert idx.unused_rows(2) == 1
    for s in range(6):
        loc = idx.locate(s)
        one = list(range(*loc.rank_slice(0, 1)))
        two = [r for rank in range(2) for r in range(*loc.rank_slice(rank, 2))]
        four = [r for rank in range(4) for r in range(*loc.rank_slice(rank, 4))]
        assert one == two == four
    with pytest.raises(DataError, match="outside the data"):
        idx.locate(6)
    with pytest.raises(DataError, match="fewer than one global batch"):
        StepIndex([10, 3], global_batch=4)

    cfg = small_config(tmp_path)
    prepare(cfg, tmp_path / "run")
    store = DataStore(tmp_path / "run" / "data")
    full = store.batch(5, 8)
    halves = np.concatenate([store.batch(5, 8, rank=r, world_size=2) for r in range(2)])
    assert np.array_equal(full, halves)


def test_rerun_does_nothing_and_other_config_is_refused(tmp_path: Path):
    cfg = small_config(tmp_path)
    run = tmp_path / "run"
    assert prepare(cfg, run).built
    before = tree_hashes(run / "data")
    assert not prepare(cfg, run).built
    assert tree_hashes(run / "data") == before
    other = other_data(cfg)
    with pytest.raises(RunDirError, match="different data set"):
        prepare(other, run)
    assert tree_hashes(run / "data") == before
    assert prepare(other, run, force=True).built
    assert DataStore(run / "data").seq_len == 16
    assert hidden_data_entries(run) == []  # the old data set moved aside is gone too
    # a tampered file makes the data "different" too
    (run / "data" / "chunk_000.npy").write_bytes(b"junk")
    with pytest.raises(RunDirError):
        prepare(other, run)


def test_interrupted_build_leaves_no_data_and_is_cleaned(tmp_path: Path):
    cfg = small_config(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    pid = dead_pid()
    (run / f".data.tmp-{pid}").mkdir()
    (run / f".data.tmp-{pid}" / "chunk_000.npy").write_bytes(b"half")
    (run / f".data.work-{pid}").mkdir()  # a killed prepare's scratch
    (run / f".data.work-{pid}" / "000.tokens.bin").write_bytes(b"scratch")
    prepare(cfg, run)
    assert hidden_data_entries(run) == []
    assert (run / "data" / "manifest.json").is_file()


def test_a_kill_between_the_renames_of_a_rebuild_keeps_the_data(tmp_path: Path):
    """Killed after data/ was moved aside and before the rebuild was renamed in: the data come back."""
    cfg = small_config(tmp_path)
    run = tmp_path / "run"
    assert prepare(cfg, run).built
    before = tree_hashes(run / "data")
    pid = dead_pid()
    os.rename(run / "data", run / f".data.old-{pid}")  # the state the kill leaves
    (run / f".data.tmp-{pid}").mkdir()  # the rebuild, finished or not, and its scratch
    (run / f".data.tmp-{pid}" / "chunk_000.npy").write_bytes(b"new")
    (run / f".data.work-{pid}").mkdir()
    res = prepare(cfg, run)
    assert not res.built  # restored, not rebuilt from the sources
    assert tree_hashes(run / "data") == before
    assert hidden_data_entries(run) == []

    # the same kill during a --force rebuild with another config: the old data set is still the run's
    os.rename(run / "data", run / f".data.old-{pid}")
    with pytest.raises(RunDirError, match="different data set"):
        prepare(other_data(cfg), run)
    assert tree_hashes(run / "data") == before
    assert DataStore(run / "data").seq_len == cfg.data.seq_len


def test_bad_lines_are_counted_with_reasons(tmp_path: Path):
    src = tmp_path / "bad.jsonl"
    good = make_docs(200, seed=3)
    with open(src, "wb") as f:
        for d in good:
            f.write(json.dumps({"text": d}).encode() + b"\n")
        f.write(b'{"text": "unterminated\n')
        f.write(b'{"body": "no text field"}\n')
        f.write(b'{"text": "caf\xe9 latin-1 bytes"}\n')
        f.write(b'{"text": "   "}\n')
        f.write(json.dumps({"text": "word " * 5000}).encode() + b"\n")
    (tmp_path / "empty.jsonl").write_bytes(b"")
    raw = {
        "data": {
            "seq_len": 16,
            "chunks": 2,
            "max_document_chars": 10_000,
            "sources": [
                {"name": "bad", "kind": "jsonl", "paths": [str(src)]},
                {"name": "empty", "kind": "jsonl", "paths": [str(tmp_path / "empty.jsonl")]},
            ],
            "tokenizer": {"kind": "train", "vocab_size": 300},
        }
    }
    m = prepare(validate_config(raw), tmp_path / "run").manifest
    s = m["sources"]["bad"]
    assert s["documents_in"] == 205
    assert s["documents_rejected"] == {
        "malformed_json": 1, "missing_text_field": 1, "invalid_utf8": 1, "empty": 1, "too_large": 1,
    }
    assert m["sources"]["empty"]["documents_in"] == 0
    with gzip.open(tmp_path / "run" / "data" / "documents" / "bad.jsonl.gz", "rt") as f:
        recs = [json.loads(line) for line in f]
    bad = {r["reason"]: r for r in recs if r["status"] == "rejected"}
    assert bad["malformed_json"]["id"].endswith("bad.jsonl:201")
    assert "body" in bad["missing_text_field"]["detail"]


def test_clear_errors_for_missing_inputs(tmp_path: Path):
    def cfg_with(**data):
        base = {"seq_len": 16, "chunks": 2,
                "sources": [{"name": "a", "kind": "jsonl", "paths": [str(tmp_path / "a.jsonl")]}]}
        base.update(data)
        return validate_config({"data": base})

    write_jsonl(tmp_path / "a.jsonl", make_docs(50))
    with pytest.raises(DataError, match="tokenizer not found: .*nope.json"):
        prepare(cfg_with(tokenizer={"kind": "file", "path": str(tmp_path / "nope.json")}), tmp_path / "r1")
    with pytest.raises(DataError, match="needs data.tokenizer.path"):
        prepare(cfg_with(tokenizer={"kind": "file"}), tmp_path / "r2")
    with pytest.raises(DataError, match="nothing|no files|not found|match"):
        prepare(validate_config({"data": {"seq_len": 16, "sources": [
            {"name": "a", "kind": "jsonl", "paths": [str(tmp_path / "missing*.jsonl")]}]}}), tmp_path / "r3")
    with pytest.raises(DataError, match="too few for its 50000 chunks"):
        prepare(cfg_with(chunks=50000, tokenizer={"vocab_size": 300}), tmp_path / "r4")
    assert not (tmp_path / "r4" / "data").exists()


def test_token_dtype_choice_and_overflow():
    cfg = validate_config({"data": {"sources": [{"name": "a"}]}}).data
    assert token_dtype(cfg, 32000) == np.uint16
    assert token_dtype(cfg, 70000) == np.uint32
    cfg16 = validate_config({"data": {"sources": [{"name": "a"}], "token_dtype": "uint16"}}).data
    with pytest.raises(DataError, match="uint16 cannot hold a vocabulary of 70000"):
        token_dtype(cfg16, 70000)


def test_export_then_import_reproduces_chunks_byte_for_byte(tmp_path: Path):
    cfg = small_config(tmp_path)
    run = tmp_path / "run"
    prepare(cfg, run)
    assert cli_main(["--no-progress", "export-data", "--run-dir", str(run), "--out", str(tmp_path / "exp")]) == 0
    first = json.loads((tmp_path / "exp" / "train_000.jsonl").open().readline())
    assert set(first) == {"token_ids", "source"} and len(first["token_ids"]) == cfg.data.seq_len + 1
    assert cli_main(["--no-progress", "prepare", str(tmp_path / "exp" / "import.yaml"),
                     "--run-dir", str(tmp_path / "back")]) == 0
    a, b = DataStore(run / "data"), DataStore(tmp_path / "back" / "data")
    assert a.num_chunks == b.num_chunks
    for c in range(a.num_chunks):
        assert (a.dir / f"chunk_{c:03d}.npy").read_bytes() == (b.dir / f"chunk_{c:03d}.npy").read_bytes()


def test_imported_rows_with_bad_length_or_ids_are_rejected(tmp_path: Path):
    f = tmp_path / "train_000.jsonl"
    lines = [json.dumps({"token_ids": list(range(9)), "source": "x"}) for _ in range(20)]
    lines += [json.dumps({"token_ids": list(range(5)), "source": "x"}),
              json.dumps({"token_ids": [999] * 9, "source": "x"}), "not json"]
    f.write_text("\n".join(lines) + "\n")
    raw = {"data": {"seq_len": 8, "chunks": 2, "valid_fraction": 0.0,
                    "sources": [{"name": "imp", "kind": "llm360", "paths": [str(f)]}],
                    "tokenizer": {"kind": "none", "vocab_size": 300}}}
    m = prepare(validate_config(raw), tmp_path / "run").manifest
    assert m["sources"]["imp"]["documents_rejected"] == {
        "wrong_row_length": 1, "token_id_out_of_range": 1, "malformed_json": 1}
    assert m["total_rows"] == 20
    assert m["chunks"][0]["tokens_per_source"] == {"x": 10 * 9}
    raw["data"]["token_dtype"] = "uint16"
    raw["data"]["tokenizer"]["vocab_size"] = 70000
    with pytest.raises(DataError, match="uint16 cannot hold"):
        prepare(validate_config(raw), tmp_path / "run2")


def test_stages_parts_and_repeats(tmp_path: Path):
    a = write_jsonl(tmp_path / "slim.jsonl", make_docs(300, seed=5))
    b = write_jsonl(tmp_path / "star.jsonl", make_docs(100, seed=6))
    raw = {"data": {
        "seq_len": 16, "valid_fraction": 0.0,
        "sources": [{"name": "slim", "paths": [str(a)]}, {"name": "star", "paths": [str(b)]}],
        "stages": [
            {"name": "s1", "chunks": 2, "mix": [{"source": "slim", "part": [0, 0.5]}]},
            {"name": "s2", "chunks": 3, "mix": [{"source": "slim", "part": [0.5, 1]},
                                               {"source": "star", "weight": 2.0}]},
        ],
        "tokenizer": {"vocab_size": 300},
    }}
    run = tmp_path / "run"
    m = prepare(validate_config(raw), run).manifest
    assert [c["stage"] for c in m["chunks"]] == ["s1", "s1", "s2", "s2", "s2"]
    s1, s2 = m["stages"]
    assert s1["mix"][0]["documents"] + s2["mix"][0]["documents"] == 300
    assert s2["mix"][1]["document_copies"] == 200
    star_docs_in_s1 = sum(c["tokens_per_source"].get("star", 0) for c in m["chunks"][:2])
    assert star_docs_in_s1 == 0
    # a document is in stage 1 or stage 2, never both
    store = DataStore(run / "data")
    docs = [set(store.provenance(c)["doc"][store.provenance(c)["source"] == 0].tolist()) for c in range(5)]
    assert not (docs[0] | docs[1]) & (docs[2] | docs[3] | docs[4])


def test_cli_prepare_inspect_and_errors(tmp_path: Path, capsys):
    cfg_path = tmp_path / "c.yaml"
    from llm360.config import to_yaml

    cfg_path.write_text(to_yaml(small_config(tmp_path)))
    run = str(tmp_path / "run")
    assert cli_main(["--no-progress", "prepare", str(cfg_path), "--run-dir", run]) == 0
    assert cli_main(["--no-progress", "prepare", "--run-dir", run]) == 0  # uses the run's config
    assert "nothing to do" in capsys.readouterr().out
    assert cli_main(["--no-progress", "inspect", "chunk", "--run-dir", run, "--chunk", "1", "--row", "2"]) == 0
    out = capsys.readouterr().out
    assert "chunk 001 row 2" in out and ".jsonl:" in out
    assert cli_main(["--no-progress", "inspect", "batch", "--run-dir", run, "--step", "3",
                     "--global-batch", "4"]) == 0
    assert "step 3" in capsys.readouterr().out
    assert cli_main(["--no-progress", "inspect", "chunk", "--run-dir", run, "--chunk", "9", "--row", "0"]) == 2
    assert "chunk 9 does not exist" in capsys.readouterr().err
    assert cli_main(["--no-progress", "prepare", str(cfg_path), "--run-dir", run,
                     "--set", "data.seq_len=7"]) == 2
    err = capsys.readouterr().err
    assert "data.seq_len" in err and "Traceback" not in err


def test_cli_subprocess_has_no_traceback_for_user_errors(tmp_path: Path):
    exe = [sys.executable, "-m", "llm360.cli"]
    env = dict(os.environ)
    r = subprocess.run([*exe, "prepare", str(tmp_path / "missing.yaml"), "--run-dir", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2
    assert "config file not found" in r.stderr and "Traceback" not in r.stderr
