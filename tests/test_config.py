import ast
from pathlib import Path

import pytest
import yaml

import llm360.config
from llm360.config import PRESETS, load_config, to_yaml, validate_config
from llm360.errors import ConfigError


def test_presets_validate_and_differ():
    hashes = {name: load_config(preset=name).data_hash() for name in PRESETS}
    assert len(set(hashes.values())) == len(PRESETS)
    amber = load_config(preset="amber")
    assert amber.data.resolved_stages()[0].chunks == 360
    assert amber.model.hidden_size == 4096 and amber.model.num_layers == 32
    assert amber.train.global_batch_sequences == 2240
    cc = load_config(preset="crystalcoder")
    stages = cc.data.resolved_stages()
    assert [s.name for s in stages] == ["stage1", "stage2", "stage3"]
    assert stages[1].mix[1].weight == 2.0 and stages[0].mix[0].part == (0.0, 0.5)
    assert cc.model.norm == "layernorm" and cc.model.rope_fraction == 0.25


def test_dotted_overrides_by_index_and_name():
    cfg = load_config(overrides=["data.seq_len=512", "data.sources.docs.snapshot=false",
                                 "data.stages.0.mix.code.weight=0.5", "model.name=125m"])
    assert cfg.data.seq_len == 512
    assert [s.snapshot for s in cfg.data.sources if s.name == "docs"] == [False]
    assert cfg.data.stages[0].mix[0].weight == 0.5
    assert cfg.model.hidden_size == 768


@pytest.mark.parametrize(
    "override, must_contain",
    [
        ("data.seq_len=abc", ["data.seq_len", "'abc'", "valid integer", "Tokens per training sequence"]),
        ("data.seq_len=2", ["data.seq_len", "2", "greater than or equal to 8"]),
        ("data.sq_len=4", ["data.sq_len", "unknown field"]),
        ("data.token_dtype=int8", ["data.token_dtype", "'int8'", "uint16", "uint32"]),
        ("data.stages.stage-0.mix.code.part=[0.5,0.2]", ["part", "0 <= lo < hi <= 1"]),
        ("data.stages.stage-0.mix.code.source=nope", ["unknown source 'nope'"]),
        ("model.name=huge", ["model.name", "huge", "amber-7b"]),
        ("data.sources.nosuch.paths=[]", ["no list item named 'nosuch'"]),
        ("seq_len", ["KEY=VALUE"]),
    ],
)
def test_config_errors_name_field_value_and_allowed(override, must_contain):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    for s in must_contain:
        assert s in str(e.value), (s, str(e.value))


def test_resolved_yaml_round_trips_and_documents_every_field(tmp_path: Path):
    cfg = load_config(preset="crystalcoder")
    text = to_yaml(cfg)
    assert "# Tokens per training sequence" in text
    again = validate_config(yaml.safe_load(text))
    assert again == cfg
    p = tmp_path / "c.yaml"
    p.write_text(text)
    assert load_config(p) == cfg


def test_config_file_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(preset="gpt5")


def test_file_with_preset_key_overrides_preset(tmp_path: Path):
    p = tmp_path / "c.yaml"
    p.write_text("preset: amber\ndata:\n  seq_len: 1024\n")
    cfg = load_config(p)
    assert cfg.data.seq_len == 1024 and cfg.data.stages[0].chunks == 360


def test_every_field_is_documented():
    from llm360.config import field_docs

    rows = field_docs()
    keys = [k for k, _, _ in rows]
    assert "data.seq_len" in keys and "train.guards.nonfinite_policy" in keys and "model.hidden_size" in keys
    assert "analysis.memorization.prompt_tokens" in keys and "finetune.sft.lr" in keys
    undocumented = [k for k, _, doc in rows if not doc.strip()]
    assert not undocumented, f"fields without a docstring: {undocumented}"


def test_config_imports_no_stage_package():
    """Every stage imports the config, so the config imports none of them, not even inside a function."""
    allowed = ("llm360.config", "llm360.errors", "llm360.log", "llm360.utils")
    for path in sorted(Path(llm360.config.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name == "llm360" or name.startswith("llm360."):
                    ok = name in allowed or name.startswith(tuple(f"{a}." for a in allowed))
                    assert ok, f"{path.name} imports {name}"
