"""Prepare on a 3-node Ray cluster gives the in-process bytes, also after its driver is SIGKILLed.

The cluster (``ray.cluster_utils.Cluster``, three nodes on 127.0.0.1) runs inside a network namespace
this test creates (``unshare -n``, then ``ip link set lo up``): there, loopback is the only interface,
so Ray cannot bind to or contact anything else. Everything it starts is stopped in a ``finally``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llm360.config import validate_config
from llm360.data.prepare import prepare
from test_prepare_plan import build_corpus

pytest.importorskip("ray")

PIECE_BYTES = 3000


def _netns_available() -> bool:
    if not shutil.which("unshare") or not shutil.which("ip"):
        return False
    r = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, timeout=30)
    return r.returncode == 0


pytestmark = pytest.mark.skipif(not _netns_available(), reason="needs `unshare -n` (root) for a loopback-only Ray")

# The driver: one prepare on the cluster at argv[3] (what `llm360 prepare --executor ray` runs).
_DRIVER = """
import json, logging, sys
logging.basicConfig(level=logging.INFO)
from llm360.config import validate_config
from llm360.data.prepare import prepare
from llm360.executor import RayExecutor
cfg = validate_config(json.loads(open(sys.argv[1]).read()))
with RayExecutor(sys.argv[3]) as ex:
    prepare(cfg, sys.argv[2], executor=ex, piece_bytes=int(sys.argv[4]))
"""

# Inside the namespace: start the cluster, run the drivers, report, shut everything down.
_CLUSTER = """
import hashlib, json, os, random, signal, subprocess, sys, time
from pathlib import Path
cfg_path, work, piece_bytes = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
driver = work / "driver.py"
report = {}

def tree(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}

def start(run, log):
    return subprocess.Popen([sys.executable, str(driver), cfg_path, str(run), address, piece_bytes],
                            stdout=subprocess.DEVNULL, stderr=open(log, "ab"), start_new_session=True)

def kill(p):
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait(timeout=30)

from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
try:
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    address = cluster.address
    report["address"] = address
    from llm360.executor import ExecutorError, RayExecutor
    t0 = time.monotonic()
    try:
        RayExecutor("127.0.0.1:1")
    except ExecutorError as e:
        report["unreachable"] = [str(e), time.monotonic() - t0]
    # one complete run
    t0 = time.monotonic()
    p = start(work / "ray", work / "ray.log")
    report["ray_rc"] = p.wait(timeout=240)
    report["ray_seconds"] = took = time.monotonic() - t0
    report["ray"] = tree(work / "ray" / "data") if report["ray_rc"] == 0 else {}
    # the driver SIGKILLed at random moments of its run, then started again
    rng = random.Random(3)
    report["killed_while_running"] = []
    for _ in range(2):
        p = start(work / "killed", work / "killed.log")
        time.sleep(rng.uniform(0.35, 0.8) * took)
        report["killed_while_running"].append(p.poll() is None)
        kill(p)
    p = start(work / "killed", work / "killed.log")
    try:
        report["resumed_rc"] = p.wait(timeout=240)
    finally:
        kill(p)
    report["resumed"] = tree(work / "killed" / "data") if report["resumed_rc"] == 0 else {}
finally:
    import ray
    ray.shutdown()
    cluster.shutdown()
    (work / "report.json").write_text(json.dumps(report))
"""


def test_ray_three_nodes_match_in_process_and_survive_a_driver_kill(tmp_path: Path):
    raw = build_corpus(tmp_path / "corpus")
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(raw))
    work = tmp_path / "work"
    work.mkdir()
    (work / "driver.py").write_text(_DRIVER)
    (work / "cluster.py").write_text(_CLUSTER)
    inner = f"ip link set lo up && exec {sys.executable} {work / 'cluster.py'} {cfg_path} {work} {PIECE_BYTES}"
    p = subprocess.Popen(["unshare", "-n", "sh", "-c", inner], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=600)
    finally:
        if p.poll() is None:  # the whole namespace's processes are in its session: stop them by its id
            subprocess.run(["kill", "-9", f"-{p.pid}"], check=False)
            p.wait(timeout=30)
    report_file = work / "report.json"
    assert report_file.is_file(), out.decode(errors="replace")[-4000:]
    report = json.loads(report_file.read_text())
    logs = "".join((work / n).read_text() for n in ("ray.log", "killed.log") if (work / n).is_file())
    assert report["address"].startswith("127.0.0.1:")
    msg, seconds = report["unreachable"]
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in msg and "Nothing was run" in msg and seconds < 30

    prepare(validate_config(raw), tmp_path / "local", workers=1)
    local = {p.relative_to(tmp_path / "local" / "data").as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted((tmp_path / "local" / "data").rglob("*")) if p.is_file()}
    assert report["ray_rc"] == 0, logs[-4000:]
    assert report["ray"] == local
    assert any(report["killed_while_running"]), "the driver finished before it was killed: kill it sooner"
    assert report["resumed_rc"] == 0, logs[-4000:]
    assert report["resumed"] == local
    assert "running on Ray: 3 nodes" in logs
