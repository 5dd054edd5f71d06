"""Prepare as a plan of deterministic tasks: the same bytes for any executor, piece size or worker count;
resumable after a kill at any moment; a corrupt file named, and finished tasks reused after the fix.
Also the executor itself (llm360.executor), which eval and analysis share."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_docs, write_jsonl
from llm360.config import validate_config
from llm360.data.pieces import count_lines, iter_piece, list_pieces, number_lines
from llm360.data.prepare import prepare
from llm360.data.sources import iter_source
from llm360.errors import ConfigError, DataError
from llm360.executor import (
    InProcessExecutor,
    Task,
    TaskError,
    TaskFailed,
    make_executor,
    parse_shard,
    shard_tasks,
)
from llm360.rundir.layout import PREPARE_DIR


def tree_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def build_corpus(root: Path) -> dict:
    """Several sources, several files per source (plain, gzip and zstd JSONL, Parquet with row groups,
    text files), two stages with parts and repeats; returns the raw config."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = make_docs(360, seed=11)
    write_jsonl(root / "web" / "a.jsonl", docs[:150])  # big enough to be cut into byte ranges
    with gzip.open(root / "web" / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[150:250])
        f.write("not json\n\n")
    (root / "web" / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": d}) + "\n" for d in docs[250:]).encode()))
    (root / "books").mkdir(parents=True)
    books = make_docs(160, seed=12, min_words=40, max_words=200)
    for k in range(2):
        part = books[k * 80 : (k + 1) * 80]
        pq.write_table(pa.table({"text": part}), root / "books" / f"p{k}.parquet", row_group_size=20)
    (root / "notes").mkdir()
    for k in range(12):
        (root / "notes" / f"n{k:02d}.txt").write_text(" ".join(make_docs(3, seed=100 + k)))
    write_jsonl(root / "code" / "x.jsonl", make_docs(80, seed=13))
    write_jsonl(root / "code" / "y.jsonl", make_docs(80, seed=14))
    return {"name": "plan-test", "data": {
        "seq_len": 24, "valid_fraction": 0.05, "docs_per_batch": 32,
        "sources": [{"name": "web", "paths": [str(root / "web")], "snapshot": True},
                    {"name": "books", "kind": "parquet", "paths": [str(root / "books")]},
                    {"name": "notes", "kind": "text", "paths": [str(root / "notes")]},
                    {"name": "code", "paths": [str(root / "code" / "*.jsonl")]}],
        "stages": [
            {"name": "s1", "chunks": 3, "mix": [{"source": "web", "part": [0, 0.6]},
                                                {"source": "books", "weight": 0.5}, {"source": "notes"}]},
            {"name": "s2", "chunks": 2, "mix": [{"source": "web", "part": [0.6, 1]},
                                                {"source": "code", "weight": 2.5},
                                                {"source": "books", "weight": 0.5, "part": [0, 0.5]}]}],
        "tokenizer": {"vocab_size": 300, "train_max_chars": 20000}}}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("corpus")
    return root, build_corpus(root)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> dict[str, str]:
    """The data of the corpus prepared in this process, whole files as pieces."""
    run = tmp_path_factory.mktemp("ref") / "run"
    prepare(validate_config(corpus[1]), run, workers=1)
    return tree_hashes(run / "data")


def test_pieces_read_exactly_what_the_source_holds(corpus):
    _, raw = corpus
    for src in validate_config(raw).data.sources:
        want = list(iter_source(src, max_document_chars=10**6, min_document_chars=1))
        for piece_bytes in (1, 700, 1 << 30):
            pieces = list_pieces(src, piece_bytes)
            pieces = number_lines(pieces, {i: count_lines(p) for i, p in enumerate(pieces) if p.ranged})
            got = [it for p in pieces for it in iter_piece(src, p, max_document_chars=10**6, min_document_chars=1)]
            assert got == want, (src.name, piece_bytes)
    web = validate_config(raw).data.sources[0]
    assert sum(p.ranged for p in list_pieces(web, 700)) > 5  # a.jsonl cut into byte ranges


def test_workers_and_piece_sizes_give_byte_identical_data(corpus, reference, tmp_path):
    cfg = validate_config(corpus[1])
    prepare(cfg, tmp_path / "w2", workers=2, piece_bytes=4000)
    with InProcessExecutor(workers=1) as ex:
        prepare(cfg, tmp_path / "w1", executor=ex, piece_bytes=1500)
    for run in ("w1", "w2"):
        assert tree_hashes(tmp_path / run / "data") == reference, run
        assert not (tmp_path / run / PREPARE_DIR).exists()  # the scratch is gone
    assert any(k.startswith("sources/") for k in reference) and "valid/web.npy" in reference
    assert len([k for k in reference if k.startswith("chunk_")]) == 5


def test_the_scratch_copy_of_the_tokens_is_compressed_and_freed(corpus, reference, tmp_path, monkeypatch):
    import llm360.data.prepare_build as build
    from llm360.data.prepare_map import TOKENS, read_zstd

    seen: list[tuple[int, int]] = []
    real = build.reduce_chunk

    def first_reduce(spec):  # every piece is scattered now: the scratch is at its largest
        if not seen:
            scratch = tmp_path / "run" / PREPARE_DIR
            maps = sum(len(read_zstd(p)) for p in scratch.rglob(TOKENS))  # pieces with no training rows remain
            scattered = sum(p.stat().st_size for p in scratch.rglob("scatter/*.bin"))
            seen.append((maps, scattered))
        return real(spec)

    monkeypatch.setattr(build, "reduce_chunk", first_reduce)
    m = prepare(validate_config(corpus[1]), tmp_path / "run", workers=1, piece_bytes=1500).manifest
    assert tree_hashes(tmp_path / "run" / "data") == reference
    (maps, scattered), = seen
    assert maps == 0  # each piece's map tokens were deleted once its rows were scattered
    chunk_bytes = sum(f["bytes"] for k, f in m["files"].items() if k.startswith(("chunk_", "provenance_")))
    assert 0 < scattered < chunk_bytes  # the one scratch copy (rows and provenance) is smaller than what it becomes


_KILLABLE = """
import json, logging, sys
logging.basicConfig(level=logging.INFO)
from llm360.config import validate_config
from llm360.data.prepare import prepare
cfg = validate_config(json.loads(open(sys.argv[1]).read()))
prepare(cfg, sys.argv[2], workers=int(sys.argv[3]), piece_bytes=int(sys.argv[4]))
"""


def _start(cfg_path: Path, run: Path, workers: int, piece_bytes: int, log: Path) -> subprocess.Popen:
    # its own session, so the kill reaches its worker processes too (by the group id, which is its pid)
    return subprocess.Popen([sys.executable, "-c", _KILLABLE, str(cfg_path), str(run), str(workers), str(piece_bytes)],
                            stdout=subprocess.DEVNULL, stderr=open(log, "ab"), start_new_session=True)  # noqa: SIM115


def _kill(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait(timeout=30)


def test_sigkill_at_random_moments_then_restart_gives_identical_data(corpus, reference, tmp_path):
    _, raw = corpus
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(raw))
    run, log = tmp_path / "run", tmp_path / "log.txt"
    rng = random.Random(7)
    deadline = time.monotonic() + 60
    kills = 0
    longest = 5.0  # seconds before a kill; shortened whenever a prepare finishes before its kill
    while kills < 4 and time.monotonic() < deadline:
        p = _start(cfg_path, run, 2, 900, log)
        time.sleep(rng.uniform(0.2 * longest, longest))
        if p.poll() is not None:  # finished before the kill: start over, killing sooner
            assert p.returncode == 0, log.read_text()[-3000:]
            shutil.rmtree(run)
            longest = max(0.3, longest / 2)
            continue
        _kill(p)
        kills += 1
    p = _start(cfg_path, run, 2, 900, log)
    try:
        assert p.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        _kill(p)
    assert kills >= 1
    assert tree_hashes(run / "data") == reference
    assert not (run / PREPARE_DIR).exists()
    assert "reusing" in log.read_text()  # a restart took up what a killed run had finished


def test_a_corrupt_file_stops_the_run_naming_it_and_the_fix_reuses_finished_tasks(corpus, reference, tmp_path, caplog):
    import shutil

    root, raw = corpus
    copy = tmp_path / "corpus"
    shutil.copytree(root, copy)
    cfg = validate_config(json.loads(json.dumps(raw).replace(str(root), str(copy))))
    gz = copy / "web" / "b.jsonl.gz"  # the tokenizer, trained on the first documents only, never reads it
    payload = gz.read_bytes()
    gz.write_bytes(payload[: len(payload) // 2])
    run = tmp_path / "run"
    with pytest.raises(DataError, match=r"b\.jsonl\.gz: corrupt or truncated gzip data at line \d+") as err:
        prepare(cfg, run, workers=1, piece_bytes=5000)
    assert "(task map:web:b.jsonl.gz)" in str(err.value)
    assert not (run / "data").exists()
    gz.write_bytes(payload)  # the fix
    with caplog.at_level("INFO", logger="llm360"):
        prepare(cfg, run, workers=1, piece_bytes=5000)
    reused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reusing")]
    assert reused and reused[0].endswith("finished map tasks"), reused
    n_reused, n_total = (int(x) for x in reused[0].split()[1:4:2])
    assert n_reused == n_total - 1  # every other piece was mapped by the failed run; only this one again
    got = tree_hashes(run / "data")
    assert got.pop("manifest.json") != reference["manifest.json"]  # it names the corpus's folder
    assert got == {k: v for k, v in reference.items() if k != "manifest.json"}


# -------------------------------------------------------------------------------- executor


def _square(x: int) -> int:
    return x * x


def _fail(x: int) -> int:
    raise DataError(f"bad input {x}: fix it")


def _bug(x: int) -> int:
    raise KeyError(x)


def _die_once(marker: str, x: int) -> int:
    if not os.path.exists(marker):
        Path(marker).write_text("died")
        os.kill(os.getpid(), signal.SIGKILL)
    return x + 1


def _always_die(x: int) -> int:
    os.kill(os.getpid(), signal.SIGKILL)
    return x


def test_a_task_that_always_kills_its_worker_fails_alone_with_keep_going():
    tasks = [Task("a", _square, (2,)), Task("killer", _always_die, (0,)), Task("b", _square, (3,))]
    with InProcessExecutor(workers=2, max_restarts=1) as ex:
        got = ex.run(tasks, progress_label="x", keep_going=True)
        assert got[0] == 4 and got[2] == 9
        assert isinstance(got[1], TaskError) and got[1].key == "killer" and "worker process died" in str(got[1])
        with pytest.raises(TaskFailed, match="a worker process died 2 times while running"):
            ex.run(tasks, progress_label="x")  # without keep_going the run stops, naming it


@pytest.mark.parametrize("workers", [1, 2])
def test_executor_results_in_task_order_and_errors_name_the_task(workers, tmp_path):
    with InProcessExecutor(workers=workers) as ex:
        assert ex.run([Task(f"sq{i}", _square, (i,)) for i in range(7)], progress_label="squares") == [
            i * i for i in range(7)]
        with pytest.raises(DataError, match=r"bad input 3: fix it \(task fail3\)"):
            ex.run([Task("ok", _square, (2,)), Task("fail3", _fail, (3,))], progress_label="x")
        with pytest.raises(TaskFailed, match="task bug1 failed: KeyError") as err:
            ex.run([Task("bug1", _bug, (1,))], progress_label="x")
        assert isinstance(err.value.__cause__, KeyError)
        got = ex.run([Task("a", _square, (3,)), Task("b", _fail, (4,))], progress_label="x", keep_going=True)
        assert got[0] == 9 and isinstance(got[1], TaskError) and got[1].key == "b" and "bad input 4" in str(got[1])
        with pytest.raises(ValueError, match="share the key"):
            ex.run([Task("k", _square, (1,)), Task("k", _square, (2,))], progress_label="x")
        if workers > 1:  # a worker killed mid-task: replaced, and its task run again
            out = ex.run([Task(f"d{i}", _die_once, (str(tmp_path / "m"), i)) for i in range(3)], progress_label="x")
            assert out == [1, 2, 3]


def _nap(x: int) -> int:
    time.sleep(0.3)
    return _fail(x) if x < 0 else x


@pytest.mark.parametrize("workers", [1, 2])
def test_the_progress_bar_counts_running_and_failed_tasks(workers, monkeypatch):
    import io

    from rich.console import Console

    import llm360.log as log

    screen = io.StringIO()
    monkeypatch.setattr(log, "console", Console(file=screen, force_terminal=True, width=160))
    monkeypatch.setattr(log, "_progress_enabled", True)
    seen: list[tuple[int, int]] = []
    real = log._RichTask.tasks

    def record(self, *, running: int, failed: int) -> None:
        seen.append((running, failed))
        real(self, running=running, failed=failed)

    monkeypatch.setattr(log._RichTask, "tasks", record)
    tasks = [Task(f"t{i}", _nap, (-i if i in (1, 4) else i,)) for i in range(6)]
    with InProcessExecutor(workers=workers) as ex:
        got = ex.run(tasks, progress_label="pairs", unit="pairs", keep_going=True)
    assert [isinstance(g, TaskError) for g in got] == [False, True, False, False, True, False]
    assert max(r for r, _ in seen) == workers  # never more running than workers, and all of them busy
    assert seen[-1] == (0, 2)  # the end: nothing running, the two failures counted
    assert [f for _, f in seen] == sorted(f for _, f in seen)  # failures only ever add up
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())  # the text without its colours
    assert "6/6" in text and "0 running, 2 failed" in text


def test_shards_and_executor_names():
    tasks = [Task(f"t{i}", _square, (i,)) for i in range(10)]
    parts = [shard_tasks(tasks, parse_shard(f"{i}/3")) for i in range(3)]
    assert sorted(t.key for p in parts for t in p) == sorted(t.key for t in tasks)
    assert [t.key for t in parts[1]] == ["t1", "t4", "t7"]
    assert shard_tasks(tasks, parse_shard(None)) == tasks
    for bad in ("3/3", "x", "1/0", "-1/2"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)
    with pytest.raises(ConfigError, match="unknown executor"):
        make_executor("slurm")
    with pytest.raises(ConfigError, match="needs --executor ray"):
        make_executor("local", 1, "10.0.0.1:6379")
    assert make_executor("local", 3).parallelism == 3
