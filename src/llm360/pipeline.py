"""`llm360 run`: every stage, in order, on one run directory.

prepare -> train -> eval -> analyze memorization -> analyze contamination -> report -> release
(which carries the report) -> verify (with the replay of one chunk). Each stage resumes or skips itself: prepare does nothing when
the data is complete, training continues from the latest complete checkpoint, evaluation and
analyses only compute what is missing, and release, verify and report are redone only when their
inputs changed (a fingerprint of the run's files, kept in ``pipeline.json``). Run again on a
finished run directory, it says everything is done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from llm360.config import RunConfig
from llm360.errors import Llm360Error
from llm360.rundir.atomic import atomic_write_text
from llm360.rundir.layout import REPORT_DIR, RUN_CONTENT, STEPS_DIR, RunDir

logger = logging.getLogger(__name__)



class VerificationFailed(Llm360Error):
    """The release of this run did not verify."""

    exit_code = 1  # a check failed, not a usage error


def fingerprint(run_dir: Path, *, with_report: bool = True) -> str:
    """A hash of the names, sizes and modification times of the files the release is made of."""
    h = hashlib.sha256()
    for top in RUN_CONTENT if with_report else tuple(t for t in RUN_CONTENT if t != REPORT_DIR):
        base = run_dir / top
        paths = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file()) if base.is_dir() else []
        for p in paths:
            parts = p.relative_to(run_dir).parts
            # intra-chunk checkpoints are not released; hidden entries are writes in progress or leftovers
            if STEPS_DIR in parts[:-1] or any(part.startswith(".") for part in parts):
                continue
            rel = p.relative_to(run_dir).as_posix()
            st = p.stat()
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _state(run_dir: Path) -> dict:
    try:
        return json.loads(RunDir(run_dir).pipeline_state.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _save_state(run_dir: Path, state: dict) -> None:
    atomic_write_text(RunDir(run_dir).pipeline_state, json.dumps(state, indent=2, sort_keys=True) + "\n")


def run_all(cfg: RunConfig, run_dir: Path, *, workers: int = 1, replay_chunk: int | None = None) -> dict:
    """Run every stage on run_dir; returns {stage: what happened}."""
    from llm360.analysis.contamination import analyze_contamination
    from llm360.analysis.memorization import analyze_memorization
    from llm360.data.prepare import prepare
    from llm360.eval import evaluate
    from llm360.release.build import release
    from llm360.release.verify import verify
    from llm360.report import build_report
    from llm360.train.loop import train

    run_dir = Path(run_dir)
    done: dict[str, str] = {}
    stages = 8
    t0 = time.perf_counter()

    def stage(i: int, name: str) -> None:
        logger.info("[%d/%d] %s", i, stages, name)

    stage(1, "prepare")
    done["prepare"] = "built" if prepare(cfg, run_dir, workers=workers).built else "up to date"
    stage(2, "train")
    summary = train(cfg, run_dir)
    done["train"] = f"{summary['step']} steps, chunks up to {summary['last_chunk_done']:03d}"
    stage(3, "eval")
    table = evaluate(run_dir, None, cfg.eval)
    done["eval"] = f"{len(table.computed)} new results" if table.computed else "up to date"
    stage(4, "analyze memorization")
    mem = analyze_memorization(run_dir, cfg.analysis.memorization)
    done["memorization"] = f"{len(mem.computed)} checkpoints scored" if mem.computed else "up to date"
    for item, why in mem.failed.items():
        logger.warning("memorization: %s: %s", item, why)
    stage(5, "analyze contamination")
    if not cfg.analysis.contamination.tasks:
        done["contamination"] = "up to date (no tasks in analysis.contamination.tasks)"
        logger.info("no evaluation sets configured (analysis.contamination.tasks): skipped")
    else:
        con = analyze_contamination(run_dir, cfg.analysis.contamination)
        done["contamination"] = f"{len(con.computed)} tasks scanned" if con.computed else "up to date"
        for item, why in con.failed.items():
            logger.warning("contamination: %s: %s", item, why)

    state = _state(run_dir)
    fp0 = fingerprint(run_dir, with_report=False)
    stage(6, "report")
    report = RunDir(run_dir).report_page
    if state.get("report") == fp0 and report.is_file():
        done["report"] = "up to date"
    else:
        build_report(run_dir)
        state["report"] = fp0
        _save_state(run_dir, state)
        done["report"] = f"written to {report}"
    fp = fingerprint(run_dir)
    rel = RunDir(run_dir).release_default
    fresh = state.get("release") == fp and rel.is_dir() and RunDir(rel).sums.is_file()
    stage(7, "release")
    if fresh:
        done["release"] = "up to date"
    else:
        release(run_dir, rel, force=True)
        state["release"] = fp
        state.pop("verify", None)
        _save_state(run_dir, state)
        done["release"] = f"written to {rel}"
    stage(8, "verify")
    if state.get("verify") == fp:
        done["verify"] = "up to date (verified)"
    else:
        n = summary["last_chunk_done"]
        chunk = n if replay_chunk is None else replay_chunk
        rep = verify(rel, replay=[chunk] if chunk >= 0 else [])
        if not rep.ok:
            raise VerificationFailed(
                f"the release in {rel} does not verify:\n  " + "\n  ".join(rep.problems)
            )
        state["verify"] = fp
        _save_state(run_dir, state)
        done["verify"] = f"verified, chunk {chunk:03d} replayed bitwise" if chunk >= 0 else "verified"
    if all(v.startswith("up to date") for k, v in done.items() if k != "train") and summary.get("done"):
        logger.info("everything is done in %s: the release is verified and the report is at %s", run_dir, report)
    logger.info("run finished in %.0f s", time.perf_counter() - t0)
    return done
