"""Eval, memorization and contamination on a 3-node Ray cluster (loopback, a network namespace of its own)
give the files of one process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from llm360.analysis.contamination import analyze_contamination
from llm360.config import ContaminationConfig
from ray_netns import run_in_netns
from test_fanout import evaluate_and_memorize, results_of, tasks_dir, trained  # noqa: F401 (fixtures)

RAY_CODE = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_fanout import evaluate_and_memorize
from llm360.analysis.contamination import analyze_contamination
from llm360.config import ContaminationConfig
c = start_cluster(3, 1)
try:
    run = Path({run!r})
    table, res = evaluate_and_memorize(run, Path({tasks_dir!r}), executor="ray", ray_address=c.address, workers=3)
    print("COMPUTED", len(table.computed), len(res.computed), len(table.failed), len(res.failed), flush=True)
    cfg = ContaminationConfig(tasks=[{task!r}], ngram=8, block_tokens=1024)
    con = analyze_contamination(run, cfg, executor="ray", ray_address=c.address)
    print("CONTAMINATION", con.computed, dict(con.failed), flush=True)
finally:
    c.shutdown()
"""


def leaky_task(run: Path, folder: Path) -> Path:
    """An evaluation set of 6 texts: 4 documents the run trained on, 2 made up."""
    lines = (run.parent / "src" / "web.jsonl").read_text().splitlines()[:4]
    texts = [json.loads(line)["text"] for line in lines]
    texts += ["nothing like this was ever in the training data, not a word of it", "zq " * 40]
    path = folder / "leaky.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def contamination_of(run: Path) -> dict:
    data = json.loads((run / "analysis" / "contamination" / "leaky.json").read_text())
    data.pop("scan")  # timings
    return data


def test_ray_cluster_gives_the_files_of_one_process(trained: Path, tasks_dir: Path, tmp_path: Path):  # noqa: F811
    local, ray = tmp_path / "local", tmp_path / "ray"
    shutil.copytree(trained, local)
    shutil.copytree(trained, ray)
    evaluate_and_memorize(local, tasks_dir)
    task = leaky_task(trained, tmp_path)
    cfg = ContaminationConfig(tasks=[str(task)], ngram=8, workers=1, block_tokens=1024)
    assert analyze_contamination(local, cfg).computed == ["leaky"]

    code = RAY_CODE.format(tests=str(Path(__file__).parent), run=str(ray), tasks_dir=str(tasks_dir), task=str(task))
    r = run_in_netns(code, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-4000:]
    assert "COMPUTED 6 3 0 0" in r.stdout, r.stdout[-4000:]
    assert "CONTAMINATION ['leaky'] {}" in r.stdout, r.stdout[-4000:]
    a, b = results_of(local), results_of(ray)
    assert a.keys() == b.keys() and len(a) > 10
    assert a == b
    theirs = contamination_of(ray)
    assert theirs == contamination_of(local) and theirs["contaminated_examples"] >= 4
    assert not list((ray / "analysis" / "contamination").glob(".scan-*"))  # the shared n-gram files are removed
