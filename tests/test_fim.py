"""Fill-in-the-middle as a mix-entry transform: the transform itself, its draws, and prepared data with it."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from conftest import make_docs, write_jsonl
from llm360.config import TokenizerConfig, validate_config
from llm360.data.fim import (
    assemble,
    copy_tokens,
    fim_record,
    fim_split,
    layout,
    locate,
    marked_text,
    part_ids,
    split_text,
)
from llm360.data.inspect import view_row
from llm360.data.prepare import prepare
from llm360.data.tokenizer import load_saved, train_bpe
from llm360.errors import ConfigError, DataError
from llm360.rundir.data import PROVENANCE_DTYPE, PROVENANCE_FIM_DTYPE, DataStore

FIM_NAMES = ("<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>")


def tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and ".doc_index" not in p.parts}


def texts(n: int, seed: int = 0) -> list[str]:
    """Code-like and non-ASCII texts, some empty-ish, to cut anywhere."""
    rng = random.Random(seed)
    alphabet = "abc xyz_=()[]{}:\n\t" + "éü漢字😀"
    return [f"def f{i}():\n" + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120))) for i in range(n)]


def fim_raw(tmp: Path, *, weight: float = 1.0, fim_rate: float = 0.9, spm_rate: float = 0.5, n: int = 200,
            extra_stage: bool = True) -> dict:
    code = write_jsonl(tmp / "src" / "code.jsonl", texts(n, seed=1))
    web = write_jsonl(tmp / "src" / "web.jsonl", make_docs(n, seed=2))
    stages = [{"name": "s1", "chunks": 2, "mix": [{"source": "web"}]}] if extra_stage else []
    stages.append({"name": "s2", "chunks": 3, "mix": [
        {"source": "code", "weight": weight, "fim_rate": fim_rate, "spm_rate": spm_rate}]})
    return {"data": {
        "seq_len": 32, "valid_fraction": 0.05, "docs_per_batch": 32,
        "sources": [{"name": "web", "paths": [str(web)]}, {"name": "code", "paths": [str(code)], "snapshot": True}],
        "stages": stages, "tokenizer": {"vocab_size": 400},
    }}


def documents(run: Path, source: str) -> list[dict]:
    with gzip.open(run / "data" / "documents" / f"{source}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def copy_ids(store: DataStore, table: int, doc: int, mark: int) -> list[int]:
    """The tokens of one FIM copy, gathered from every chunk's provenance spans in document order."""
    spans = []
    for c in range(store.num_chunks):
        prov = store.provenance(c)
        sel = prov[(prov["table"] == table) & (prov["doc"] == doc) & (prov["fim"] == mark)]
        for rec in sel:
            row = store.rows(c, int(rec["row"]), int(rec["row"]) + 1)[0]
            a = int(rec["row_offset"])
            spans.append((int(rec["doc_offset"]), row[a : a + int(rec["length"])].tolist()))
    spans.sort()
    out: list[int] = []
    for off, ids in spans:
        assert off == len(out), "a copy's spans tile it without gaps"
        out += ids
    return out


def test_a_transformed_document_reassembled_from_its_parts_is_the_original_text():
    tok, _ = train_bpe(iter(texts(300, seed=9)), TokenizerConfig(vocab_size=400), FIM_NAMES)
    sentinels = tok.fim_ids(FIM_NAMES)
    eos = tok.eos_id
    checked = 0
    for i, text in enumerate(texts(400, seed=3)):
        sp = fim_split(7, "code", f"f.jsonl:{i}", "1/0", 0, len(text), 1.0, 0.5)
        assert sp is not None and 0 <= sp.lo <= sp.hi <= len(text)
        parts = split_text(text, sp)
        assert "".join(parts) == text
        ids = [tok.encode_batch([p])[0] for p in parts]
        copy = assemble(ids, sp, sentinels, eos, np.dtype("<u2")).tolist()
        rec = fim_record(sp, stage="s", entry=0, epoch=0, n_chars=len(text), part_tokens=tuple(map(len, ids)))
        assert len(copy) == copy_tokens(rec) and copy[-1] == eos
        assert copy[0] == sentinels[0] and copy.count(sentinels[1]) >= 1
        got = {k: tok.decode(v) for k, v in part_ids(rec, copy).items()}
        assert got["prefix"] + got["middle"] + got["suffix"] == text
        # every token of the copy maps back to a part (with its characters) or a sentinel
        where = locate(rec, 0, len(copy))
        assert sum(w["tokens"][1] - w["tokens"][0] for w in where) == len(copy)
        for w in where:
            if w["chars"] is not None:
                a, b = w["chars"]
                assert text[a:b] == got[w["part"]]
        shown = tok.decode(copy[:-1])
        assert shown == marked_text(text, sp, FIM_NAMES[:3])
        checked += 1
    assert checked == 400


def test_fim_and_spm_shares_are_within_binomial_tolerance_of_the_rates():
    n, fim_rate, spm_rate = 10_000, 0.9, 0.5
    splits = [fim_split(1234, "starcoder", f"lang/part.jsonl:{i}", "1/1", 0, 1000, fim_rate, spm_rate)
              for i in range(n)]
    done = [s for s in splits if s is not None]
    k, spm = len(done), sum(s.spm for s in done)

    def within(count: int, trials: int, p: float) -> bool:
        return abs(count - trials * p) <= 4 * math.sqrt(trials * p * (1 - p))

    assert within(k, n, fim_rate), k
    assert within(spm, k, spm_rate), spm
    # the split points are two uniform draws, sorted: E[lo] = n/3, E[hi] = 2n/3
    lo = np.array([s.lo for s in done]) / 1000
    hi = np.array([s.hi for s in done]) / 1000
    sd = math.sqrt(1 / 18 / k) + 0.001  # var(min of two uniforms) = 1/18; the grid of 1001 points
    assert abs(lo.mean() - 1 / 3) < 4 * sd and abs(hi.mean() - 2 / 3) < 4 * sd
    # an entry at rate 0.3 (CrystalCoder's stage 3)
    k3 = sum(fim_split(1234, "code", f"x:{i}", "2/0", 0, 50, 0.3, 0.5) is not None for i in range(n))
    assert within(k3, n, 0.3), k3


def test_draws_depend_on_the_copy_not_the_order_of_asking():
    a = fim_split(5, "code", "f:1", "1/0", 2, 80, 0.5, 0.5)
    for _ in range(3):
        assert fim_split(5, "code", "f:1", "1/0", 2, 80, 0.5, 0.5) == a
    assert layout({"mode": "psm", "split": [2, 5], "chars": 9, "tokens": [1, 2, 3]})[-1]["tokens"] == [9, 10]


def test_fim_data_is_byte_identical_for_1_and_2_workers_and_any_piece_size(tmp_path: Path):
    cfg = validate_config(fim_raw(tmp_path, weight=2.0))
    prepare(cfg, tmp_path / "a", workers=1)
    prepare(cfg, tmp_path / "b", workers=2, piece_bytes=2048)
    ha, hb = tree_hashes(tmp_path / "a" / "data"), tree_hashes(tmp_path / "b" / "data")
    assert ha == hb
    store = DataStore(tmp_path / "a" / "data")
    assert store.provenance(0).dtype == PROVENANCE_FIM_DTYPE


def test_a_repeated_source_gets_its_own_fim_draw_per_repeat_and_rows_map_back(tmp_path: Path):
    raw = fim_raw(tmp_path, weight=3.0, fim_rate=0.5, spm_rate=0.5, n=150, extra_stage=False)
    del raw["data"]["stages"][0]["chunks"]
    raw["data"]["stages"][0]["tokens_per_chunk"] = 4000
    run = tmp_path / "run"
    m = prepare(validate_config(raw), run).manifest
    entry = m["stages"][0]["mix"][0]
    assert entry["document_copies"] == 3 * entry["documents"]
    copies = entry["document_copies"]
    assert abs(entry["fim_copies"] - copies / 2) <= 4 * math.sqrt(copies / 4)
    assert m["sources"]["code"]["fim"]["fim_copies"] == entry["fim_copies"]
    assert m["stages"][0]["fim_share"] > 0.3
    assert sum(c["fim_tokens_per_source"].get("code", 0) for c in m["chunks"]) > 0

    recs = [r for r in documents(run, "code") if r["status"] == "train"]
    epochs = [sorted(c["epoch"] for c in r.get("fim", [])) for r in recs]
    # each repeat drawn on its own: some documents are transformed in one repeat and not another
    assert any(0 < len(e) < 3 for e in epochs) and any(len(e) == 3 for e in epochs)
    three = [r for r in recs if len(r.get("fim", [])) == 3]
    assert any(len({tuple(c["split"]) for c in r["fim"]}) == 3 for r in three)
    # a document every copy of which is transformed is tokenized only in its FIM forms
    assert all("tokens" not in r for r in three) and all("tokens" in r for r in recs if len(r.get("fim", [])) < 3)

    original = {}
    with gzip.open(run / "data" / "sources" / "code.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            obj = json.loads(line)
            original[obj["id"]] = obj["text"]
    store = DataStore(run / "data")
    tok = load_saved(run / "data" / "tokenizer")
    table = [s["name"] for s in m["data_config"]["sources"]].index("code")
    checked = 0
    for r in recs[:40]:
        for k, c in enumerate(r.get("fim", []), start=1):
            ids = copy_ids(store, table, r["n"], k)
            if len(ids) < copy_tokens(c):
                continue  # its tail fell in the stage's dropped partial last row
            got = {p: tok.decode(v) for p, v in part_ids(c, ids).items()}
            assert got["prefix"] + got["middle"] + got["suffix"] == original[r["id"]]
            lo, hi = c["split"]
            assert got["middle"] == original[r["id"]][lo:hi]
            checked += 1
    assert checked >= 10

    # inspect shows the sentinels in the row's text and says where a span comes from
    for c in range(store.num_chunks):
        prov = store.provenance(c)
        rows = np.unique(prov["row"][prov["fim"] > 0])
        if rows.size:
            v = view_row(store, c, int(rows[0]))
            span = next(s for s in v.spans if s.get("fim"))
            assert span["fim_copy"]["mode"] in ("psm", "spm") and span["fim_copy"]["original"]
            break
    else:
        raise AssertionError("no FIM span in any chunk")
    assert any("<fim_" in (view_row(store, 0, r).text or "") for r in range(store.rows_per_chunk[0]))


def test_fim_needs_the_sentinels_in_a_loaded_tokenizer(tmp_path: Path):
    tok, origin = train_bpe(iter(make_docs(200)), TokenizerConfig(vocab_size=300))
    tok.save(tmp_path / "tok", origin)
    raw = fim_raw(tmp_path, extra_stage=False)
    raw["data"]["tokenizer"] = {"kind": "file", "path": str(tmp_path / "tok" / "tokenizer.json")}
    with pytest.raises(DataError, match="<fim_prefix>.*<fim_middle>.*<fim_suffix>"):
        prepare(validate_config(raw), tmp_path / "run")
    # a trained tokenizer carries them
    run = tmp_path / "run2"
    raw["data"]["tokenizer"] = {"kind": "train", "vocab_size": 400}
    prepare(validate_config(raw), run)
    saved = load_saved(run / "data" / "tokenizer")
    assert all(saved.token_id(t) is not None for t in FIM_NAMES)


def test_fim_config_checks_and_unchanged_defaults(tmp_path: Path):
    raw = fim_raw(tmp_path)
    raw["data"]["stages"][1]["mix"][0]["fim_rate"] = 0.0
    with pytest.raises(ConfigError, match="spm_rate"):
        validate_config(raw)
    raw["data"]["stages"][1]["mix"][0]["fim_rate"] = 1.5
    with pytest.raises(ConfigError, match="fim_rate"):
        validate_config(raw)
    row_src = {"data": {"tokenizer": {"kind": "none"}, "sources": [{"name": "rows", "kind": "llm360", "paths": ["x"]}],
                        "stages": [{"name": "s", "chunks": 1, "mix": [{"source": "rows", "fim_rate": 0.5}]}]}}
    with pytest.raises(ConfigError, match="pre-tokenized"):
        validate_config(row_src)
    # a config without FIM dumps (and hashes) no FIM field, and its provenance has no fim mark
    plain = validate_config({"data": {"sources": [{"name": "w", "paths": ["x"]}],
                                      "stages": [{"name": "s", "chunks": 2, "mix": [{"source": "w"}]}]}})
    dumped = json.dumps(plain.data.model_dump(mode="json"))
    for key in ("fim_rate", "spm_rate", "filters", "fim_tokens", "tokens_per_chunk", "total_chunks"):
        assert key not in dumped
    assert not plain.data.uses_fim and "fim" not in PROVENANCE_DTYPE.names
