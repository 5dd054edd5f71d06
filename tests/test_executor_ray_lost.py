"""RayExecutor when a task's worker process dies: retried to the same result, or named once it is lost for good.

One Ray cluster (``ray.cluster_utils.Cluster``, two nodes on 127.0.0.1) in a network namespace of its
own (:mod:`ray_netns`) runs every case; each test checks its part of what that run reports. A worker
is killed from inside its task (SIGKILL on its own pid), on the attempts a marker file in a temp
folder says: once (it must be retried and give the in-process result) or on every attempt (it must be
reported after ``max_retries`` as a :class:`~llm360.executor.TaskFailed` naming the task, while the
other tasks' results are kept).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from conftest import make_docs, write_jsonl
from llm360.config import validate_config
from llm360.data.prepare import prepare
from llm360.executor import InProcessExecutor, RayExecutor, Task, TaskFailed, raise_failure
from ray_netns import run_in_netns

pytest.importorskip("ray")

KEYS = [f"square:{i:02d}" for i in range(5)]
DIE_ONCE = {"square:01": "once", "square:03": "once"}
DIE_ALWAYS = {"square:02": "always"}
PIECE_BYTES = 4000


# ------------------------------------------------------------------ the tasks (pickled by value to Ray)


def attempt(marker_dir: str, key: str) -> int:
    """Count one more attempt of ``key`` in ``marker_dir`` (an append the kernel has before any kill); 1 = first."""
    path = Path(marker_dir) / f"{key.replace(':', '_')}.attempts"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, b"x\n")
    finally:
        os.close(fd)
    return len(path.read_bytes().splitlines())


def square(marker_dir: str, out_dir: str, key: str, n: int, die: str) -> dict[str, Any]:
    """A deterministic task that writes ``key``'s output file; its worker kills itself when ``die`` says so."""
    first = attempt(marker_dir, key) == 1
    if die == "always" or (die == "once" and first):
        os.kill(os.getpid(), signal.SIGKILL)
    body = hashlib.sha256(f"{key}:{n * n}".encode()).hexdigest()
    out = Path(out_dir) / f"{key.replace(':', '_')}.out"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(body)
    tmp.replace(out)
    return {"key": key, "square": n * n, "sha": body}


def plan(marker_dir: str | Path, out_dir: str | Path, dying: dict[str, str]) -> list[Task]:
    """The tasks of :data:`KEYS`, those in ``dying`` killing their worker ``"once"`` or ``"always"``."""
    Path(marker_dir).mkdir(parents=True, exist_ok=True)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return [Task(k, square, (str(marker_dir), str(out_dir), k, 1000 + i, dying.get(k, ""))) for i, k in enumerate(KEYS)]


def run_then_die_once(marker_dir: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn``; on the first attempt kill the worker after it finished (its output installed, no result sent)."""
    result = fn(*args, **kwargs)
    if attempt(marker_dir, "wrapped") == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return result


class KillFirstMapExecutor(RayExecutor):
    """A RayExecutor whose first ``map:`` task of a run kills its worker once, right after finishing."""

    marker_dir = ""
    wrapped_key = ""

    def run(self, tasks, **kw):  # type: ignore[override]
        tasks = list(tasks)
        for i, t in enumerate(tasks):
            if t.key.startswith("map:") and not self.wrapped_key:
                self.wrapped_key = t.key
                tasks[i] = dataclasses.replace(t, fn=run_then_die_once, args=(self.marker_dir, t.fn, *t.args))
        return super().run(tasks, **kw)


def small_corpus(root: Path) -> dict:
    """Two JSONL sources, the first cut into byte ranges, two chunks; returns the raw config."""
    write_jsonl(root / "web" / "a.jsonl", make_docs(120, seed=21))
    write_jsonl(root / "code" / "b.jsonl", make_docs(60, seed=22))
    return {"name": "lost-test", "data": {
        "seq_len": 24, "valid_fraction": 0.05, "docs_per_batch": 32,
        "sources": [{"name": "web", "paths": [str(root / "web")]}, {"name": "code", "paths": [str(root / "code")]}],
        "stages": [{"name": "s1", "chunks": 2, "mix": [{"source": "web"}, {"source": "code"}]}],
        "tokenizer": {"vocab_size": 300, "train_max_chars": 20000}}}


def tree_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------- the one cluster run, all cases

RAY_CODE = """
import json, sys, time
from pathlib import Path
P = json.loads(PARAMS)
sys.path.insert(0, P["tests"])
import ray.cloudpickle
import test_executor_ray_lost as lost
ray.cloudpickle.register_pickle_by_value(lost)  # the workers need not import the test module
from llm360.config import validate_config
from llm360.data.prepare import prepare
from llm360.executor import RayExecutor, TaskError, TaskFailed
work = Path(P["work"])
report = {}

def failure(e):
    return {"type": type(e).__name__, "message": str(e), "key": getattr(e, "key", None)}

def error(r):
    if not isinstance(r, TaskError):
        return r
    return {"key": r.key, "error_type": r.error_type, "message": r.message, "str": str(r),
            "exception": failure(r.exception)}

c = start_cluster(2, 1)
try:
    with RayExecutor(c.address, max_retries=2) as ex:
        report["once"] = ex.run(lost.plan(work / "m_once", work / "o_once", lost.DIE_ONCE), progress_label="once")
    with RayExecutor(c.address, max_retries=1) as ex:
        try:
            ex.run(lost.plan(work / "m_stop", work / "o_stop", lost.DIE_ALWAYS), progress_label="stop")
            report["stop"] = "returned"
        except Exception as e:
            report["stop"] = failure(e)
        got = ex.run(lost.plan(work / "m_keep", work / "o_keep", lost.DIE_ALWAYS), progress_label="keep",
                     keep_going=True)
        report["keep"] = [error(r) for r in got]
    with lost.KillFirstMapExecutor(c.address, max_retries=2) as ex:
        ex.marker_dir = str(work / "m_prepare")
        Path(ex.marker_dir).mkdir()
        cfg = validate_config(json.loads(Path(P["cfg"]).read_text()))
        prepare(cfg, work / "run", executor=ex, piece_bytes=P["piece_bytes"])
        report["wrapped"] = ex.wrapped_key
    report["prepared"] = True
except Exception as e:
    report["crash"] = failure(e)
    raise
finally:
    c.shutdown()
    (work / "report.json").write_text(json.dumps(report))
"""


@pytest.fixture(scope="module")
def lost(tmp_path_factory) -> tuple[Path, dict]:
    """Run every case on one cluster; (the work folder, what the run reported)."""
    work = tmp_path_factory.mktemp("lost")
    raw = small_corpus(work / "corpus")
    (work / "cfg.json").write_text(json.dumps(raw))
    params = {"tests": str(Path(__file__).parent), "work": str(work), "cfg": str(work / "cfg.json"),
              "piece_bytes": PIECE_BYTES}
    r = run_in_netns(f"PARAMS = {json.dumps(params)!r}\n" + RAY_CODE, timeout=240, cwd=work)
    report_file = work / "report.json"
    assert report_file.is_file(), r.stdout[-4000:]
    report = json.loads(report_file.read_text())
    assert r.returncode == 0 and "crash" not in report, r.stdout[-6000:]
    return work, report


def attempts(marker_dir: Path, key: str) -> int:
    return len((marker_dir / f"{key.replace(':', '_')}.attempts").read_bytes().splitlines())


def test_a_killed_worker_is_retried_to_the_in_process_result(lost, tmp_path: Path):
    work, report = lost
    with InProcessExecutor(workers=1) as ex:
        want = ex.run(plan(tmp_path / "m", tmp_path / "o", {}), progress_label="reference")
    assert report["once"] == want
    for k in KEYS:  # the killed ones ran twice, the others once
        assert attempts(work / "m_once", k) == (2 if k in DIE_ONCE else 1), k
    assert tree_hashes(work / "o_once") == tree_hashes(tmp_path / "o")


def test_a_task_lost_beyond_its_retries_is_named_and_the_others_kept(lost, tmp_path: Path):
    work, report = lost
    with InProcessExecutor(workers=1) as ex:
        want = ex.run(plan(tmp_path / "m", tmp_path / "o", {}), progress_label="reference")
    (dead,) = DIE_ALWAYS
    stop = report["stop"]
    assert stop != "returned"
    assert stop["type"] == "TaskFailed" and stop["key"] == dead, stop
    assert stop["message"].startswith(f"task {dead} failed: lost: the worker process or node running it died, "
                                      "and so did its retry (max_retries=1; "), stop
    assert "WorkerCrashedError" in stop["message"], stop
    assert attempts(work / "m_stop", dead) == 2  # the first run and max_retries=1 retry
    # the tasks running alongside it ended and kept their outputs (the first 4 start at once on 2 CPUs)
    done, theirs = tree_hashes(work / "o_stop"), tree_hashes(tmp_path / "o")
    assert done.items() <= theirs.items() and f"{dead.replace(':', '_')}.out" not in done
    assert {f"{k.replace(':', '_')}.out" for k in KEYS[:4] if k != dead} <= done.keys()

    keep = report["keep"]
    assert [r["key"] for r in keep] == KEYS
    for r, w in zip(keep, want, strict=True):
        if r["key"] == dead:
            assert r["error_type"] == "TaskFailed" and r["message"].startswith("lost: "), r
            assert r["str"] == f"task {dead} failed: TaskFailed: {r['message']}", r
            assert r["exception"] == {"type": "TaskFailed", "message": f"task {dead} failed: {r['message']}",
                                      "key": dead}
        else:
            assert r == w
    assert attempts(work / "m_keep", dead) == 2


def test_prepare_with_a_killed_map_worker_gives_the_in_process_bytes(lost, tmp_path: Path):
    work, report = lost
    assert report["prepared"] and report["wrapped"].startswith("map:")
    assert attempts(work / "m_prepare", "wrapped") == 2  # killed once after finishing, run again
    raw = json.loads((work / "cfg.json").read_text())
    prepare(validate_config(raw), tmp_path / "local", workers=1, piece_bytes=PIECE_BYTES)
    assert tree_hashes(work / "run" / "data") == tree_hashes(tmp_path / "local" / "data")


def test_a_lost_task_is_raised_as_it_is_not_wrapped_again():
    """What a stage that ran with ``keep_going`` raises for a lost task (prepare's map phase does)."""
    lost = TaskFailed("map:x", "lost: the worker process or node running it died")
    with pytest.raises(TaskFailed) as err:
        raise_failure("map:x", lost)
    assert err.value is lost and str(err.value) == "task map:x failed: lost: the worker process or node running it died"
    with pytest.raises(TaskFailed, match=r"^task outer failed: TaskFailed: task map:x failed: lost") as err:
        raise_failure("outer", lost)  # another task's failure inside this one: named as this one's
    assert err.value.key == "outer"
