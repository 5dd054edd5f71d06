"""Run Python code with a Ray cluster of several nodes on loopback, inside a network namespace of its own.

In this machine's default network namespace Ray binds to the external interface; inside a fresh
namespace (``unshare -n``, loopback up) there is nothing but 127.0.0.1 to bind to or reach. The
code runs in a child process; on a timeout that process and every process it started (Ray's
GCS, raylets, workers) are killed by process id.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CLUSTER = '''
import sys
from ray.cluster_utils import Cluster

def start_cluster(nodes=3, cpus=1):
    """A Ray cluster of ``nodes`` nodes with ``cpus`` CPUs each, on 127.0.0.1; returns it (shutdown() ends it)."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus, "include_dashboard": False,
                                                      "node_ip_address": "127.0.0.1"})
    for _ in range(nodes - 1):
        c.add_node(num_cpus=cpus, node_ip_address="127.0.0.1")
    c.wait_for_nodes()
    return c
'''


def netns_available() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    r = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, timeout=30)
    return r.returncode == 0


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def run_in_netns(code: str, timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` (with :data:`CLUSTER`'s ``start_cluster`` defined) in a loopback-only network namespace.

    Skips the test where namespaces cannot be made (not root, no ``unshare``); raises on a timeout
    after killing everything the code started.
    """
    if not netns_available():
        pytest.skip("needs unshare -n (root) for a loopback-only network namespace")
    script = Path(cwd or ".") / f".ray_netns_{os.getpid()}_{time.monotonic_ns()}.py"
    script.write_text(CLUSTER + code)
    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    cmd = ["unshare", "-n", "sh", "-c", f'ip link set lo up && exec "{sys.executable}" "{script}"']
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [*_descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out, _ = proc.communicate()
        raise AssertionError(f"the Ray code did not finish in {timeout:.0f}s; output:\n{out[-4000:]}") from None
    finally:
        script.unlink(missing_ok=True)
        for pid in _descendants(proc.pid):  # anything left behind (a raylet the code did not stop)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")
