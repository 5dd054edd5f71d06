"""`llm360 release`: a run directory -> one folder that holds everything, verifiable.

Layout of a release (every file is listed with its sha256 in ``SHA256SUMS``)::

    config.yaml                the resolved config
    data/                      chunks, provenance, manifest, tokenizer, documents, valid, raw sources
    checkpoints/init/          the weights before step 0 (for replaying chunk 0)
    checkpoints/ckpt_000/ ...  one Hugging Face folder + resumable state per chunk
    metrics/                   train.jsonl, events.jsonl
    eval/  analysis/           results per checkpoint (when present)
    finetune/<name>/           fine-tuned models with their lineage (when present)
    report/index.html          the report (when present)
    code.json                  llm360 version, git commit (+ dirty), installed package versions
    MODEL_CARD.md              generated from the files above
    SHA256SUMS

Files are hard-linked from the run directory where the file system allows (checkpoints are never
modified in place, so a link is as good as a copy and costs no space), else copied. Nothing in a
release is a pickle: files are checked by content before they are included.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from llm360 import __version__
from llm360.errors import Llm360Error, RunDirError
from llm360.log import progress
from llm360.rundir import atomic
from llm360.rundir.layout import DCP_DIR, STEPS_DIR, RunDir, list_checkpoints
from llm360.utils import sha256_file

logger = logging.getLogger(__name__)

SUMS = "SHA256SUMS"
# What goes into a release, relative to the run directory.
_INCLUDE_DIRS = ("data", "checkpoints", "metrics", "eval", "analysis", "finetune", "report")
_EXCLUDE_PARTS = {STEPS_DIR, DCP_DIR, "wandb", "__pycache__"}  # dcp: sharded resume copies (pickled metadata)
_PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".distcp")


class ReleaseError(Llm360Error):
    """The run cannot be released as it is."""


def is_pickle(path: Path) -> bool:
    """True when a file is (or may be) a pickle: by suffix, or by the pickle protocol header."""
    if path.suffix in _PICKLE_SUFFIXES or path.name == ".metadata":
        return True
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and head[1] in (2, 3, 4, 5)


def _included(rel: Path) -> bool:
    parts = rel.parts
    if any(p in _EXCLUDE_PARTS for p in parts) or any(p.startswith(".") for p in parts):
        return False
    return parts[0] in _INCLUDE_DIRS or rel.as_posix() == "config.yaml"


def code_provenance() -> dict:
    """llm360's version, the git commit of its source tree (and whether it was dirty), package versions."""
    src = Path(__file__).resolve().parents[3]
    git: dict = {"commit": None, "dirty": None}
    if (src / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                                    text=True, timeout=10, check=True).stdout.strip()
            status = subprocess.run(["git", "-C", str(src), "status", "--porcelain"], capture_output=True,
                                    text=True, timeout=10, check=True).stdout
            git = {"commit": commit, "dirty": bool(status.strip())}
        except (OSError, subprocess.SubprocessError):
            pass
    packages = sorted(
        {(d.metadata["Name"] or "").lower(): d.version for d in metadata.distributions() if d.metadata["Name"]}.items()
    )
    return {
        "llm360_version": __version__,
        "git": git,
        "python": sys.version.split()[0],
        "packages": dict(packages),
    }


def _link_or_copy(src: Path, dst: Path, link: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def write_sums(root: Path) -> dict[str, str]:
    """Write SHA256SUMS (sha256sum format, sorted) for every file under root; returns the mapping."""
    sums: dict[str, str] = {}
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != SUMS)
    with progress("hashing release", total=len(files), unit="files") as bar:
        for p in files:
            sums[p.relative_to(root).as_posix()] = sha256_file(p)
            bar.advance(1)
    text = "".join(f"{h}  {rel}\n" for rel, h in sums.items())
    (root / SUMS).write_text(text, encoding="utf-8")
    return sums


def read_sums(root: Path) -> dict[str, str]:
    path = root / SUMS
    out: dict[str, str] = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        h, sep, rel = line.partition("  ")
        if not sep or len(h) != 64:
            raise ReleaseError(f"{path}:{i}: not a sha256sum line: {line[:80]!r}")
        out[rel] = h
    return out


def release(run_dir: str | Path, out: str | Path, *, force: bool = False, link: bool = True) -> Path:
    """Assemble the release of run_dir into out (a new folder); returns out.

    link: hard-link files from the run directory where possible (no extra space; the run's files
    are never modified in place); False copies every byte.
    """
    from llm360.release.card import write_model_card

    run, out = Path(run_dir), Path(out)
    rd = RunDir(run)
    if not rd.manifest.is_file():
        raise RunDirError(f"{run} has no prepared data (data/manifest.json); nothing to release")
    ckpts = [p for _, p in list_checkpoints(rd.checkpoints)]
    if not ckpts:
        raise RunDirError(f"{run} has no checkpoints yet; train first (llm360 train --run-dir {run})")
    from llm360.rundir.checkpoint import verify_checkpoint

    for c in [*ckpts, rd.init_checkpoint]:
        if c.exists():
            verify_checkpoint(c)  # never release a half-written or damaged checkpoint
    atomic.clean_leftovers(out.parent, only=out.name)  # what a killed release of this name left
    if out.exists() and not force:
        raise RunDirError(f"{out} already exists; choose another --out or pass --force to replace it")
    # Built under a hidden name, then renamed: an existing release is replaced only once the new one is whole.
    with atomic.atomic_folder(out) as tmp:
        files = sorted(p for p in run.rglob("*") if p.is_file() and _included(p.relative_to(run)))
        pickles = [p for p in files if is_pickle(p)]
        if pickles:
            raise ReleaseError(
                "refusing to release pickle files (unsafe to load): "
                + ", ".join(str(p.relative_to(run)) for p in pickles[:5])
            )
        with progress("collecting release", total=len(files), unit="files") as bar:
            for p in files:
                _link_or_copy(p, tmp / p.relative_to(run), link)
                bar.advance(1)
        (tmp / "code.json").write_text(json.dumps(code_provenance(), indent=2, sort_keys=True) + "\n")
        write_model_card(tmp)
        write_sums(tmp)
    logger.info("release written to %s", out)
    return out
