"""`llm360 prepare`: raw sources -> globally permuted, fully accounted data chunks, as a plan of tasks.

The data directory is a pure function of the config and the input bytes. It is built as a plan of
deterministic tasks split by *piece of input* (:mod:`llm360.data.pieces`), never by worker, and
run by any :mod:`llm360.executor` (in-process, a local process pool, a Ray cluster):

0. **Tokenizer** (here, once): train a byte-level BPE on the training documents, or load the user's.
1. **Map**, per piece (:mod:`~llm360.data.prepare_map`): read, reject with a reason, split and
   draw the mix from the document id, tokenize; write the piece's tokens, document index, counts
   and its part of the documents table.
2. **Plan** (here, once; :mod:`~llm360.data.prepare_plan`): prefix sums give document numbers and
   every block's place in each stage's stream; each stage's seeded permutation is computed once.
3. **Scatter**, per piece (:mod:`~llm360.data.prepare_shuffle`): every row to its chunk's bucket;
   beside it, per source (:mod:`~llm360.data.prepare_tables`): the documents table, the snapshot
   and the validation rows.
4. **Reduce**, per chunk: rows placed, provenance sorted, ``chunk_NNN.npy``, ``provenance_NNN.npy``
   and their sha256.
5. **Manifest** (here; :mod:`~llm360.data.prepare_manifest`): built from the tasks' outputs and
   written last, then the whole data set is renamed to ``data/`` at once.

Every task writes under a temporary name and renames (:mod:`llm360.rundir.atomic`) into the
run's scratch folder (``.prepare/``, :attr:`~llm360.rundir.layout.RunDir.prepare_scratch`),
keyed by what it was computed from. A prepare killed at any moment -- a worker, a node or the
driver -- and started again redoes only the tasks whose output is missing; a fixed input file
redoes only its own pieces' maps (and what follows). The scratch holds at most one copy of the
tokens beside the output (a piece's map tokens are freed when its rows are scattered) and is
deleted when the data set is installed.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from llm360.config import RunConfig, to_yaml
from llm360.data.prepare_build import Build
from llm360.data.prepare_map import token_dtype, unit_hash
from llm360.errors import RunDirError
from llm360.executor import Executor, InProcessExecutor
from llm360.rundir.atomic import atomic_write_text, clean_leftovers, hold_lock
from llm360.rundir.layout import RunDir
from llm360.utils import read_json

logger = logging.getLogger(__name__)

__all__ = ["PrepareResult", "data_status", "prepare", "token_dtype", "unit_hash"]


@dataclass
class PrepareResult:
    manifest: dict
    built: bool
    """False when the data directory was already complete for this config."""


def data_status(run_dir: Path, cfg: RunConfig) -> str:
    """'missing', 'complete' (same config, files present) or 'different' (another data set)."""
    rd = RunDir(run_dir)
    if not rd.manifest.is_file():
        return "missing"
    try:
        manifest = read_json(rd.manifest)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return "different"
    if manifest.get("config_hash") != cfg.data_hash():
        return "different"
    for rel, meta in manifest.get("files", {}).items():
        p = rd.data / rel
        if not p.is_file() or p.stat().st_size != meta["bytes"]:
            return "different"
    return "complete"


def prepare(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    workers: int = 1,
    force: bool = False,
    executor: Executor | None = None,
    scratch_dir: str | Path | None = None,
    piece_bytes: int | None = None,
) -> PrepareResult:
    """Prepare the data of cfg into run_dir/data; a no-op when it is already there.

    ``executor``: where the tasks run (default: :class:`~llm360.executor.InProcessExecutor` with
    ``workers`` processes, closed at the end; one given is left open). ``scratch_dir``: where the
    map and scatter outputs go (default: the run directory's ``.prepare/``; on a cluster, a folder
    every node sees). ``piece_bytes``: the size of a piece of input (default 256 MiB); the
    result never depends on it, on the executor or on the number of workers.

    Raises RunDirError if run_dir already holds a different data set (unless force and no
    checkpoints were trained on it), DataError for bad inputs (naming the file and line),
    ExecutorError when the executor cannot run here.
    """
    run_dir = Path(run_dir)
    rd = RunDir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = hold_lock(rd.lock, "being prepared")  # a concurrent prepare or train would clash here
    own = executor is None
    try:
        ex = executor if executor is not None else InProcessExecutor(workers=workers)
        try:
            return _prepare_locked(cfg, rd, executor=ex, force=force, scratch_dir=scratch_dir,
                                   piece_bytes=piece_bytes)
        finally:
            if own:
                ex.close()
    finally:
        lock.close()


def _prepare_locked(cfg: RunConfig, rd: RunDir, *, executor: Executor, force: bool,
                    scratch_dir: str | Path | None, piece_bytes: int | None) -> PrepareResult:
    run_dir = rd.root
    # What a killed prepare left: its unfinished build and scratch are deleted, and a data/ it had
    # moved aside to rename a rebuild in is renamed back, so the data set is never lost.
    clean_leftovers(run_dir, only=rd.data.name)
    status = data_status(run_dir, cfg)
    if status == "complete":
        logger.info("data in %s is complete for this config (hash %s): nothing to do",
                    rd.data, cfg.data_hash()[:12])
        shutil.rmtree(rd.prepare_scratch, ignore_errors=True)  # killed after the install
        atomic_write_text(rd.config, to_yaml(cfg))
        return PrepareResult(read_json(rd.manifest), built=False)
    if status == "different" or (rd.data.exists() and any(rd.data.iterdir())):
        have = "unreadable"
        if rd.manifest.is_file():
            try:
                have = str(read_json(rd.manifest).get("config_hash", "?"))[:12]
            except (json.JSONDecodeError, OSError):
                pass
        if not force:
            raise RunDirError(
                f"{rd.data} already holds a different data set (config hash {have}, this config "
                f"{cfg.data_hash()[:12]}), or files in it were changed. Use a new --run-dir, or "
                "--force to rebuild it."
            )
        if rd.checkpoints.exists() and any(rd.checkpoints.iterdir()):
            raise RunDirError(
                f"refusing to rebuild {rd.data}: {rd.checkpoints} holds checkpoints trained on it. "
                "Use a new --run-dir."
            )
        logger.warning("--force: rebuilding %s", rd.data)
    build = Build(cfg, rd, executor, scratch_dir=Path(scratch_dir) if scratch_dir else None,
                  piece_bytes=piece_bytes)
    manifest = build.run()
    atomic_write_text(rd.config, to_yaml(cfg))
    logger.info(
        "prepared %d chunks, %d rows, %d tokens into %s",
        manifest["num_chunks"], manifest["total_rows"], manifest["total_tokens"], rd.data,
    )
    return PrepareResult(manifest, built=True)

