"""Shared fixtures: small deterministic corpora written into tmp folders."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

# Tiny models on a 2-core CI machine: one intra-op thread per process is faster than two fighting,
# and tests that spawn processes (torchrun, kill-and-resume) inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

WORDS = (
    "the model data chunk token train loss release verify order seed batch step memory corpus "
    "source document python code function return value index layer weight gradient optimizer "
    "checkpoint resume replay hash manifest transparent open science research language"
).split()


def make_docs(n: int, seed: int = 0, min_words: int = 5, max_words: int = 120) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        k = rng.randint(min_words, max_words)
        docs.append(f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(k)) + ".")
    return docs


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({field: d}) + "\n")
    return path


def small_config(tmp: Path, *, n_docs: int = 400, chunks: int = 4, seq_len: int = 32, extra: dict | None = None):
    """A two-source JSONL config with a trained 300-token BPE."""
    from llm360.config import validate_config

    a = write_jsonl(tmp / "src" / "web.jsonl", make_docs(n_docs, seed=1))
    b = write_jsonl(tmp / "src" / "code.jsonl", make_docs(n_docs // 2, seed=2))
    raw = {
        "name": "test",
        "data": {
            "seq_len": seq_len,
            "sources": [
                {"name": "web", "kind": "jsonl", "paths": [str(a)]},
                {"name": "code", "kind": "jsonl", "paths": [str(b)]},
            ],
            "chunks": chunks,
            "valid_fraction": 0.05,
            "tokenizer": {"kind": "train", "vocab_size": 300},
            "docs_per_batch": 64,
        },
    }
    if extra:
        for k, v in extra.items():
            raw["data"][k] = v
    return validate_config(raw)


def save_model_checkpoint(
    folder: Path,
    model,
    *,
    eos_id: int | None,
    trainer_state: dict | None = None,
    tokenizer_dir: Path | None = None,
    tokenizer_overrides: dict | None = None,
) -> Path:
    """A complete checkpoint folder as the trainer writes one, marker last.

    Weights (a copy of model's state), ``trainer_state`` (default ``{"step": 0}``), config.json and
    llm360_model.json, and the tokenizer files of ``tokenizer_dir`` with ``tokenizer_overrides``
    merged into tokenizer_config.json.
    """
    from llm360.model.hf import hf_metadata_files
    from llm360.rundir.checkpoint import save_checkpoint

    extra: dict[str, bytes] = dict(hf_metadata_files(model.cfg, eos_token_id=eos_id))
    if tokenizer_dir is not None:
        for f in sorted(tokenizer_dir.iterdir()):
            extra[f.name] = f.read_bytes()
    if tokenizer_overrides:
        tc = json.loads(extra["tokenizer_config.json"])
        tc.update(tokenizer_overrides)
        extra["tokenizer_config.json"] = json.dumps(tc).encode()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return save_checkpoint(
        folder, model_state=state, trainer_state=trainer_state or {"step": 0}, extra_files=extra
    )


@pytest.fixture
def small_cfg(tmp_path: Path):
    return small_config(tmp_path)


@contextmanager
def training_in_background(cfg, tmp: Path) -> Iterator[Path]:
    """Prepare ``cfg`` into ``tmp/run`` and run ``llm360 train`` on it in a subprocess while the body runs.

    Yields the run directory. On leaving, waits for the training (300 s at most; killed and raised
    beyond that) and, when the body succeeded, asserts it exited 0 (its log in the message).
    """
    from llm360.config import to_yaml
    from llm360.data.prepare import prepare

    cfg_path, run, log = tmp / "train.yaml", tmp / "run", tmp / "train.log"
    cfg_path.write_text(to_yaml(cfg))
    prepare(cfg, run)
    cmd = [sys.executable, "-m", "llm360.cli", "--no-progress", "train", str(cfg_path), "--run-dir", str(run)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            yield run
        finally:
            try:
                rc = proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise
    assert rc == 0, log.read_text()

