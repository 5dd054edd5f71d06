"""No config ends in a traceback: seeded random mutations of a config, through the command line.

Every mutated config (wrong types, edge values, negative, zero and huge numbers, NaN, unknown keys,
lists where scalars go, broken YAML, undecodable bytes, bad ``--set`` overrides) goes through
``llm360 config show`` in this process: the exit code is 0 (and the YAML shown loads back to the
same config) or 2 (and stderr says what is wrong), never an exception. A few mutated configs that
validate are then prepared and trained for one chunk, again without a traceback.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import make_docs, write_jsonl
from llm360.cli import main as cli_main
from llm360.config import load_config

CASES = 320
SAMPLES_TRAINED = 5

WRONG_TYPES: list[Any] = [{"a": 1}, {"name": {"x": 1}}, [1, 2], [], {}, "x", "", None, True, False, [{"a": 1}],
                          "2020-01-01", "1e9", "∞", "a" * 5000]
NUMBERS: list[Any] = [0, 1, -1, 2, -7, 0.5, 1.0, 0.999, 1e-300, -0.0, 1e9, -1e9, 2**31, 2**32, 2**63, 10**30,
                      -(10**30), 1e308, float("nan"), float("inf"), float("-inf"), 3.7]


def _base(tmp: Path) -> dict:
    """A small two-source run config as a raw dict (what a YAML file holds), every section written out."""
    web = write_jsonl(tmp / "src" / "web.jsonl", make_docs(60, seed=1, max_words=60))
    code = write_jsonl(tmp / "src" / "code.jsonl", make_docs(30, seed=2, max_words=60))
    raw = {
        "name": "fuzz",
        "data": {"seq_len": 16, "chunks": 2, "valid_fraction": 0.05, "docs_per_batch": 32,
                 "tokenizer": {"kind": "train", "vocab_size": 300},
                 "sources": [{"name": "web", "kind": "jsonl", "paths": [str(web)]},
                             {"name": "code", "kind": "jsonl", "paths": [str(code)]}],
                 "stages": [{"name": "main", "chunks": 2, "mix": [{"source": "web"}, {"source": "code", "weight": 2.0}]}]},
        "model": {"name": "tiny", "hidden_size": 16, "intermediate_size": 32, "num_layers": 1, "num_heads": 2},
        "train": {"global_batch_sequences": 8, "micro_batch_sequences": 4, "warmup_steps": 1, "lr": 3e-3,
                  "min_lr": 3e-4, "max_chunks": 1},
        "eval": {"tasks": ["perplexity"]},
    }  # fmt: skip
    full = load_config(_write(tmp / "base.yaml", raw)).model_dump(mode="json")
    full.pop("preset", None)
    return full


def _write(path: Path, raw: Any) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (keys and list indices) to a value inside obj, sections and lists included."""
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _get(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _set(obj: Any, path: tuple, value: Any) -> None:
    _get(obj, path[:-1])[path[-1]] = value


def _value(rng: random.Random, old: Any) -> Any:
    """A replacement for old: a wrong type, an edge number, or a number near old."""
    r = rng.random()
    if r < 0.35:
        return copy.deepcopy(rng.choice(WRONG_TYPES))
    if r < 0.75:
        return rng.choice(NUMBERS)
    if isinstance(old, (int, float)) and not isinstance(old, bool):
        return rng.choice([old * 2, old // 2 if isinstance(old, int) else old / 2, -old, old + 1, [old]])
    return rng.choice([[old], {"value": old}, 0, -1])


def mutate(rng: random.Random, base: dict) -> tuple[str | bytes, list[str]]:
    """One mutated config: (the file's content, --set overrides)."""
    raw = copy.deepcopy(base)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        paths = _paths(raw)
        kind = rng.random()
        path = rng.choice(paths)
        if kind < 0.6:
            _set(raw, path, _value(rng, _get(raw, path)))
        elif kind < 0.7:  # an unknown key
            parent = _get(raw, path[:-1])
            if isinstance(parent, dict):
                parent[rng.choice(["lr_", "seqlen", "extra", "1", "model"])] = rng.choice(NUMBERS)
        elif kind < 0.8:  # a missing key
            parent = _get(raw, path[:-1])
            if isinstance(parent, dict):
                parent.pop(path[-1], None)
            elif isinstance(parent, list) and parent:
                parent.pop(path[-1])
        elif kind < 0.9:  # a whole section of the wrong shape
            raw[rng.choice(["data", "model", "train", "eval", "analysis", "finetune", "preset"])] = copy.deepcopy(
                rng.choice(WRONG_TYPES + NUMBERS))
        else:  # a list where a scalar goes (or the reverse)
            old = _get(raw, path)
            _set(raw, path, old[0] if isinstance(old, list) and old else [old, old])
    text = yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)
    r = rng.random()
    if r < 0.08:  # broken YAML
        cut = rng.randrange(len(text))
        text = text[:cut] + rng.choice(["\t:", ": [", "{{", "\n  - : :", "'", "!!python/object:os.system x", "&a *b"]) + text[cut:]
    elif r < 0.11:
        return rng.choice([b"\xff\xfe\x00bad", b"- a\n- b\n", b"42\n", b""]), []
    elif r < 0.14:
        text = rng.choice(["[1, 2]", "just text", "null", "preset: [amber]", "preset: nope", "model: {name: {a: 1}}"])
    overrides: list[str] = []
    if rng.random() < 0.2:
        key = ".".join(str(p) for p in rng.choice(_paths(base)))
        overrides.append(rng.choice([f"{key}={rng.choice(['[', '{a: 1}', '-1', '.nan', '1e9', '', 'x'])}",
                                     key, f"{key}.deeper.still=1", "=3", "data.sources.nosuch.kind=jsonl"]))
    return text, overrides


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("fuzz")
    return tmp, _base(tmp)


def _call(capsys, args: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli_main(["--no-progress", *args])
    got = capsys.readouterr()
    return rc, got.out, got.err


def test_mutated_configs_never_raise(base, capsys):
    tmp, raw = base
    rng = random.Random(20240601)
    codes = {0: 0, 2: 0}
    for i in range(CASES):
        content, overrides = mutate(rng, raw)
        path = tmp / f"case_{i:03d}.yaml"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        args = ["config", "show", str(path), *(a for o in overrides for a in ("--set", o))]
        rc, out, err = _call(capsys, args)
        where = f"case {i}: {path.read_text(errors='replace')[:2000]!r} {overrides}"
        assert rc in (0, 2), f"exit code {rc}; {where}\n{err[-2000:]}"
        assert "Traceback" not in err, where
        codes[rc] += 1
        if rc == 0:  # what config show prints is the config, and loads back to the same one
            again = tmp / f"case_{i:03d}.shown.yaml"
            again.write_text(out, encoding="utf-8")
            assert load_config(again).model_dump() == load_config(path, overrides=overrides).model_dump(), where
        else:
            assert out == "" and "error:" in err, where
    assert codes[0] >= 10 and codes[2] >= 150, codes  # both outcomes are exercised


NUMERIC_LEAVES = ("data.seq_len", "data.valid_fraction", "data.min_document_chars", "data.max_document_chars",
                  "data.tokenizer.vocab_size", "data.stages.0.chunks", "data.stages.0.mix.1.weight",
                  "model.hidden_size", "model.intermediate_size", "model.num_heads", "model.norm_eps",
                  "model.rope_theta", "model.init_std", "train.global_batch_sequences", "train.micro_batch_sequences",
                  "train.lr", "train.min_lr", "train.warmup_steps", "train.weight_decay", "train.beta1",
                  "train.beta2", "train.eps", "train.grad_clip", "train.seed", "data.seed")  # fmt: skip
FEASIBLE: list[Any] = [0, 1, 2, 3, -1, 0.5, 0.999, 1.5, 1e-12, 1e6, 1e30, 2**31]


def test_mutated_configs_prepare_and_train_without_traceback(base, capsys):
    """A few mutations that validate, through `prepare` and one chunk of `train`: ok, or a clear error."""
    tmp, raw = base
    rng = random.Random(7)
    done: list[tuple[str, Any, int, int]] = []
    for attempt in range(200):
        if len(done) == SAMPLES_TRAINED:
            break
        mutated = copy.deepcopy(raw)
        key = rng.choice(NUMERIC_LEAVES)
        path = tuple(int(p) if p.isdigit() else p for p in key.split("."))
        _set(mutated, path, rng.choice(FEASIBLE))
        cfg_path = _write(tmp / f"train_{attempt:03d}.yaml", mutated)
        if _call(capsys, ["config", "show", str(cfg_path)])[0] != 0:
            continue
        run = tmp / f"run_{attempt:03d}"
        rc_prep, _, err = _call(capsys, ["prepare", str(cfg_path), "--run-dir", str(run)])
        assert rc_prep in (0, 2) and "Traceback" not in err, (key, err[-2000:])
        rc_train = -1
        if rc_prep == 0:
            rc_train, _, err = _call(capsys, ["train", str(cfg_path), "--run-dir", str(run), "--device", "cpu"])
            assert rc_train in (0, 1, 2) and "Traceback" not in err, (key, err[-2000:])
        done.append((key, _get(mutated, path), rc_prep, rc_train))
    assert len(done) == SAMPLES_TRAINED, done
