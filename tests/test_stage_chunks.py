"""Chunks of about equal size in every stage (`tokens_per_chunk`, `total_chunks`), and the CrystalCoder recipe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import make_docs, write_jsonl
from llm360.cli import main as cli_main
from llm360.config import load_config, validate_config
from llm360.config.presets import CRYSTALCODER_STAGE_BTOKENS
from llm360.data.prepare import prepare
from llm360.data.prepare_plan import chunk_sizes, share_chunks
from llm360.errors import ConfigError, DataError
from llm360.rundir.data import DataStore


def three_stages(tmp: Path, sizing: list[dict], total: int | None = None) -> dict:
    a = write_jsonl(tmp / "a.jsonl", make_docs(500, seed=1))
    b = write_jsonl(tmp / "b.jsonl", make_docs(300, seed=2))
    mixes = [[{"source": "a", "part": [0, 0.4]}], [{"source": "a", "part": [0.4, 1]}, {"source": "b", "weight": 2.0}],
             [{"source": "b", "weight": 0.5}]]
    raw = {"data": {
        "seq_len": 16, "valid_fraction": 0.0, "tokenizer": {"vocab_size": 300},
        "sources": [{"name": "a", "paths": [str(a)]}, {"name": "b", "paths": [str(b)]}],
        "stages": [{"name": f"s{i + 1}", **sz, "mix": mx} for i, (sz, mx) in enumerate(zip(sizing, mixes, strict=True))],
    }}
    if total is not None:
        raw["data"]["total_chunks"] = total
    return raw


def test_tokens_per_chunk_gives_chunks_of_equal_size_in_every_stage(tmp_path: Path):
    tokens = 1700  # 100 rows of 17 tokens
    raw = three_stages(tmp_path, [{"tokens_per_chunk": tokens}] * 3)
    run = tmp_path / "run"
    m = prepare(validate_config(raw), run).manifest
    rows = [c["rows"] for c in m["chunks"]]
    target = tokens // m["row_length"]
    for st in m["stages"]:
        mine = rows[st["first_chunk"] : st["first_chunk"] + st["chunks"]]
        assert max(mine) - min(mine) <= 1  # within one row of equal inside a stage
        assert st["rows_dropped_uneven_split"] == 0 and sum(mine) == st["rows_packed"]
        # the stage's whole number of chunks nearest its rows / target: at most half a chunk's rounding apart
        assert st["chunks"] == max(1, round(st["rows_packed"] / target))
        assert abs(np.mean(mine) - target) <= target / (2 * st["chunks"]) + 1
    assert len(m["stages"]) == 3 and all(st["chunks"] >= 2 for st in m["stages"])
    # the chunks are what training reads: equal global batches in every stage
    assert DataStore(run / "data").rows_per_chunk == rows


def test_partial_chunk_drop_gives_chunks_of_one_size_across_stages(tmp_path: Path):
    tokens = 1700  # 100 rows of 17 tokens
    raw = three_stages(tmp_path, [{"tokens_per_chunk": tokens}] * 3)
    raw["data"]["partial_chunk"] = "drop"
    run = tmp_path / "run"
    m = prepare(validate_config(raw), run).manifest
    rows = [c["rows"] for c in m["chunks"]]
    target = tokens // m["row_length"]
    assert set(rows) == {target} and len(m["stages"]) == 3  # one size in every stage: within one row of equal
    for st in m["stages"]:
        assert st["chunks"] == st["rows_packed"] // target >= 1
        # only the rows past the stage's last whole chunk are dropped, and counted
        assert st["rows_dropped_uneven_split"] == st["rows_packed"] - st["chunks"] * target < target
        assert st["rows"] == st["chunks"] * target
    assert DataStore(run / "data").rows_per_chunk == rows
    assert sum(st["rows_dropped_uneven_split"] for st in m["stages"]) > 0  # the corpus does not divide evenly
    # too few rows for one chunk: a DataError that names the stage, not an empty stage
    raw["data"]["stages"][2]["tokens_per_chunk"] = 10**7
    with pytest.raises(DataError, match="stage 's3' has .* fewer than one chunk"):
        prepare(validate_config(raw), tmp_path / "run2")


def test_a_row_count_that_divides_evenly_gives_chunks_within_one_row_across_stages():
    rows = [100 * 36 + 17, 100 * 96 + 40, 100 * 11 + 3]  # stages of 36, 96 and 11 chunks of ~100 rows
    sizes = []
    for n in rows:
        c = max(1, round(n / 100))
        q, extra = chunk_sizes(n, c)
        sizes += [q + 1] * extra + [q] * (c - extra)
        assert sum([q + 1] * extra + [q] * (c - extra)) == n
    assert max(sizes) - min(sizes) <= 1 and len(sizes) == 143


def test_total_chunks_are_shared_by_tokens(tmp_path: Path):
    raw = three_stages(tmp_path, [{}, {}, {}], total=40)
    m = prepare(validate_config(raw), tmp_path / "run").manifest
    counts = [st["chunks"] for st in m["stages"]]
    assert sum(counts) == 40 == m["num_chunks"]
    packed = [st["rows_packed"] for st in m["stages"]]
    assert counts == share_chunks(packed, 40)
    per = [p / c for p, c in zip(packed, counts, strict=True)]
    assert max(per) / min(per) < 1.15  # each stage rounds to whole chunks: at most ~1/(2 x its chunks) off
    # CrystalCoder: 345B / 927B / 110B over 143 checkpoints
    cc = share_chunks([int(CRYSTALCODER_STAGE_BTOKENS[s] * 1000) for s in ("stage1", "stage2", "stage3")], 143)
    assert cc == [36, 96, 11]
    assert share_chunks([0, 0, 5], 3) == [1, 1, 1] and share_chunks([1, 1000], 2) == [1, 1]


def test_chunking_config_is_checked(tmp_path: Path):
    with pytest.raises(ConfigError, match="both chunks"):
        validate_config(three_stages(tmp_path, [{"chunks": 2, "tokens_per_chunk": 100}, {"chunks": 1}, {"chunks": 1}]))
    with pytest.raises(ConfigError, match="neither chunks nor tokens_per_chunk"):
        validate_config(three_stages(tmp_path, [{"chunks": 2}, {}, {"chunks": 1}]))
    with pytest.raises(ConfigError, match="total_chunks"):
        validate_config(three_stages(tmp_path, [{"chunks": 2}, {}, {}], total=10))
    with pytest.raises(ConfigError, match="fewer than the 3 stages"):
        validate_config(three_stages(tmp_path, [{}, {}, {}], total=2))
    raw = three_stages(tmp_path, [{"tokens_per_chunk": 100}, {"chunks": 1}, {"tokens_per_chunk": 100}])
    raw["data"]["partial_chunk"] = "drop"
    with pytest.raises(ConfigError, match=r"partial_chunk = drop .*stages \['s2'\] do not give tokens_per_chunk"):
        validate_config(raw)


def test_crystalcoder_preset_mirrors_the_released_recipe(capsys):
    cfg = load_config(preset="crystalcoder")
    d = cfg.data
    assert d.total_chunks == 143 and all(st.chunks is None for st in d.stages)
    s1, s2, s3 = d.stages
    assert [m.source for m in s1.mix] == ["slimpajama"] and s1.mix[0].part == (0.0, 0.5)
    star = next(m for m in s2.mix if m.source == "starcoder")
    assert (star.weight, star.fim_rate, star.spm_rate) == (2.0, 0.9, 0.5)
    code, slim = s3.mix
    assert (code.weight, code.fim_rate, code.spm_rate) == (3.0, 0.3, 0.5)
    assert [(f.field, f.op, f.values) for f in slim.filters] == [("meta.redpajama_set_name", "not_in",
                                                                  ["RedPajamaGitHub"])]
    assert 9e9 < slim.weight * 596e9 < 11e9 and d.tokenizer.fim_tokens[:3] == ("<fim_prefix>", "<fim_middle>",
                                                                               "<fim_suffix>")
    assert cli_main(["config", "show", "--preset", "crystalcoder"]) == 0
    text = capsys.readouterr().out
    for needle in ("total_chunks: 143", "fim_rate: 0.9", "fim_rate: 0.3", "spm_rate: 0.5", "weight: 3.0",
                   "field: meta.redpajama_set_name", "op: not_in", "values: [RedPajamaGitHub]"):
        assert needle in text, needle
    assert json.dumps(d.model_dump(mode="json"))  # its resolved form is plain JSON
