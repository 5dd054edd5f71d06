"""Document filters on a mix entry: keep or drop by a field of the record, and count what was dropped."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import make_docs
from llm360.config import validate_config
from llm360.data.filters import compile_filters, field_value, first_failing
from llm360.data.prepare import prepare
from llm360.errors import ConfigError
from llm360.rundir.data import DataStore

SETS = ["RedPajamaCommonCrawl", "RedPajamaGitHub", "RedPajamaArXiv", "RedPajamaBook"]


def slim_records(n: int) -> list[dict]:
    out = []
    for i, text in enumerate(make_docs(n, seed=11)):
        rec: dict = {"text": text, "meta": {"redpajama_set_name": SETS[i % 4]}}
        if i % 25 == 0:
            rec.pop("meta")  # a record without the field
        out.append(rec)
    return out


def trained_ids(run: Path, source: str) -> set[str]:
    """Ids of the documents of `source` that some chunk holds."""
    store = DataStore(run / "data")
    names = [s["name"] for s in store.manifest["data_config"]["sources"]]
    docs: set[int] = set()
    for c in range(store.num_chunks):
        prov = store.provenance(c)
        docs |= set(prov["doc"][prov["table"] == names.index(source)].tolist())
    with gzip.open(run / "data" / "documents" / f"{source}.jsonl.gz", "rt", encoding="utf-8") as f:
        table = [json.loads(line) for line in f]
    return {table[n]["id"] for n in docs}


def statuses(run: Path, source: str) -> dict[str, str]:
    with gzip.open(run / "data" / "documents" / f"{source}.jsonl.gz", "rt", encoding="utf-8") as f:
        return {r["id"]: r["status"] for r in map(json.loads, f)}


def test_field_values_and_json_equality():
    rec = {"meta": {"redpajama_set_name": "RedPajamaGitHub", "n": 1, "flag": True}, "a.b": 3}
    assert field_value(rec, "meta.redpajama_set_name") == "RedPajamaGitHub"
    assert field_value(rec, "a.b") == 3  # a key holding a dot is read as it is
    assert field_value(rec, "meta.missing") is None and field_value(None, "meta") is None
    assert field_value({"meta": "text"}, "meta.x") is None
    (f_in,) = compile_filters([("meta.n", "in", (1.0, "x"))])
    assert f_in.passes(rec)  # 1 == 1.0
    assert not f_in.passes({"meta": {"n": True}})  # true is not 1
    assert not f_in.passes({"meta": {"n": "1"}})  # "1" is not 1
    assert not f_in.passes({"meta": {"n": [1]}})
    (f_null,) = compile_filters([("meta.n", "in", (None,))])
    assert f_null.passes({}) and not f_null.passes(rec)
    both = compile_filters([("meta.n", "in", (1,)), ("meta.flag", "not_in", (True,))])
    assert first_failing(both, rec) == "meta.flag" and first_failing(both, {"meta": {"n": 2}}) == "meta.n"


def test_a_nested_filter_keeps_and_drops_what_it_says_and_counts_it(tmp_path: Path):
    recs = slim_records(400)
    path = tmp_path / "slim.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    github = {f"slim.jsonl:{i + 1}" for i, r in enumerate(recs) if r.get("meta", {}).get("redpajama_set_name") == SETS[1]}
    arxiv = {f"slim.jsonl:{i + 1}" for i, r in enumerate(recs) if r.get("meta", {}).get("redpajama_set_name") == SETS[2]}
    raw = {"data": {
        "seq_len": 16, "valid_fraction": 0.05, "tokenizer": {"vocab_size": 300},
        "sources": [{"name": "slim", "paths": [str(path)], "snapshot": True}],
        "stages": [
            {"name": "code-free", "chunks": 2, "mix": [
                {"source": "slim", "filters": [{"field": "meta.redpajama_set_name", "op": "not_in",
                                                "values": ["RedPajamaGitHub"]}]}]},
            {"name": "arxiv-only", "chunks": 1, "mix": [
                {"source": "slim", "filters": [{"field": "meta.redpajama_set_name", "op": "in",
                                                "values": ["RedPajamaArXiv"]}]}]},
        ],
    }}
    run = tmp_path / "run"
    m = prepare(validate_config(raw), run).manifest
    status = statuses(run, "slim")
    train = {i for i, s in status.items() if s == "train"}
    got = trained_ids(run, "slim")
    # stage 1 has every non-GitHub training document (records without the field included), stage 2 only ArXiv
    assert got == train - github
    s1, s2 = m["stages"]
    assert s1["mix"][0]["filtered_by_mix"] == {"meta.redpajama_set_name": len(train & github)}
    assert s2["mix"][0]["filtered_by_mix"] == {"meta.redpajama_set_name": len(train - arxiv)}
    assert s1["mix"][0]["documents"] == len(train - github) and s2["mix"][0]["documents"] == len(train & arxiv)
    src = m["sources"]["slim"]
    # GitHub documents are used by neither stage: counted as filtered, with the field, never silently lost
    assert src["documents_rejected"]["filtered_by_mix"] == len(train & github)
    assert src["documents_filtered_by_mix"] == {"meta.redpajama_set_name": len(train & github)}
    assert src["documents_in"] == src["documents_used"] + src["documents_rejected_total"]
    assert src["documents_used_train"] == len(train - github)
    # a source snapshot keeps the filtered field, so preparing from it again gives the same data
    with gzip.open(run / "data" / "sources" / "slim.jsonl.gz", "rt", encoding="utf-8") as f:
        first = json.loads(f.readline())
    assert "fields" not in first  # line 1 has no `meta`
    again = json.loads(json.dumps(raw))
    again["data"]["sources"] = [{"name": "slim", "kind": "snapshot",
                                 "paths": [str(run / "data" / "sources" / "slim.jsonl.gz")]}]
    m2 = prepare(validate_config(again), tmp_path / "run2").manifest
    assert [c["sha256"] for c in m2["chunks"]] == [c["sha256"] for c in m["chunks"]]


def test_filters_read_parquet_struct_columns(tmp_path: Path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    recs = slim_records(200)
    table = pa.table({"text": [r["text"] for r in recs],
                      "meta": [r.get("meta", {"redpajama_set_name": None}) for r in recs]})
    pq.write_table(table, tmp_path / "slim.parquet", row_group_size=50)
    raw = {"data": {
        "seq_len": 16, "valid_fraction": 0.0, "tokenizer": {"vocab_size": 300},
        "sources": [{"name": "slim", "kind": "parquet", "paths": [str(tmp_path / "slim.parquet")]}],
        "stages": [{"name": "s", "chunks": 1, "mix": [{"source": "slim", "filters": [
            {"field": "meta.redpajama_set_name", "op": "not_in", "values": ["RedPajamaGitHub"]}]}]}],
    }}
    run = tmp_path / "run"
    m = prepare(validate_config(raw), run, piece_bytes=1).manifest
    github = sum(r.get("meta", {}).get("redpajama_set_name") == SETS[1] for r in recs)
    assert m["sources"]["slim"]["documents_rejected"]["filtered_by_mix"] == github
    assert len(trained_ids(run, "slim")) == len(recs) - github
    got_rows = sorted(int(i.split(":")[1]) for i in trained_ids(run, "slim"))
    assert not any(recs[r].get("meta", {}).get("redpajama_set_name") == SETS[1] for r in got_rows)


def test_a_document_filtered_in_one_stage_but_used_in_another_is_not_rejected(tmp_path: Path):
    recs = slim_records(120)
    path = tmp_path / "slim.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    raw = {"data": {
        "seq_len": 16, "valid_fraction": 0.0, "tokenizer": {"vocab_size": 300},
        "sources": [{"name": "slim", "paths": [str(path)]}],
        "stages": [
            {"name": "a", "chunks": 1, "mix": [{"source": "slim"}]},
            {"name": "b", "chunks": 1, "mix": [{"source": "slim", "filters": [
                {"field": "meta.redpajama_set_name", "op": "in", "values": ["RedPajamaBook"]}]}]},
        ],
    }}
    m = prepare(validate_config(raw), tmp_path / "run").manifest
    src = m["sources"]["slim"]
    assert "filtered_by_mix" not in src["documents_rejected"] and src["documents_used"] == 120
    books = sum(r.get("meta", {}).get("redpajama_set_name") == "RedPajamaBook" for r in recs)
    assert m["stages"][1]["mix"][0]["filtered_by_mix"]["meta.redpajama_set_name"] == 120 - books
    assert np.isclose(sum(m["stages"][1]["mix"][0]["filtered_by_mix"].values()) + books, 120)


def test_filter_config_is_checked():
    base = {"data": {"sources": [{"name": "w", "paths": ["x"]}],
                     "stages": [{"name": "s", "chunks": 1, "mix": [{"source": "w", "filters": []}]}]}}
    for bad, match in (({"field": "", "values": ["a"]}, "field"), ({"field": "a", "values": []}, "values"),
                       ({"field": "a", "op": "equals", "values": ["a"]}, "op")):
        raw = json.loads(json.dumps(base))
        raw["data"]["stages"][0]["mix"][0]["filters"] = [bad]
        with pytest.raises(ConfigError, match=match):
            validate_config(raw)
