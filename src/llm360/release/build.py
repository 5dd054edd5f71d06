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
modified in place, so a link is as good as a copy and costs no space), else copied; a symlink in
the run is followed and its target's bytes are linked or copied, so a release never holds a
symlink. Nothing in a release is a pickle: files are checked by content before they are included.

Each file is hashed at most once. ``SHA256SUMS`` takes a checkpoint file's sha256 from its
folder's marker (``COMPLETE.json``) once the release's own copy of the folder has been checked
against it (so the hashes are those of the bytes shipped, and a damaged checkpoint is never
released), a data file's from ``data/manifest.json`` (which ``prepare`` computed from the bytes
it wrote; a file whose size differs from the manifest's is hashed instead), and hashes what
neither covers (metrics, results, the card) on a bounded pool of threads.
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
from llm360.errors import RunDirError
from llm360.log import progress
from llm360.release.sums import SUMS, ReleaseError, format_sums, hash_files, read_sums
from llm360.rundir import atomic
from llm360.rundir.layout import (
    CONFIG,
    MARKER,
    RUN_CONTENT,
    STEPS_DIR,
    RunDir,
    list_checkpoints,
    walk,
)

__all__ = ["SUMS", "ReleaseError", "code_provenance", "is_pickle", "read_sums", "release", "write_sums"]

logger = logging.getLogger(__name__)

# What goes into a release, relative to the run directory.
_INCLUDE_DIRS = tuple(name for name in RUN_CONTENT if name != CONFIG)
_EXCLUDE_PARTS = {STEPS_DIR, "wandb", "__pycache__"}
_PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".distcp")


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
    return parts[0] in _INCLUDE_DIRS or rel.as_posix() == CONFIG


def _run_files(run: Path) -> list[Path]:
    """The files of run that go into its release, sorted. Symlinks (to files or folders) are followed,
    since the release holds their targets' bytes; a folder reached twice (a symlink loop) is entered once."""
    out: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for top, dirs, names in os.walk(run, followlinks=True):
        st = os.stat(top)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        base = Path(top)
        dirs[:] = [d for d in dirs if _included((base / d).relative_to(run))]
        out += [base / n for n in names if (base / n).is_file() and _included((base / n).relative_to(run))]
    return sorted(out)


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
    """A hard link to src (its target, when src is a symlink), else a copy of its bytes; never a symlink."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(os.path.realpath(src), dst)  # the target: Linux's link(2) would link the symlink itself
            return
        except OSError:
            pass
    shutil.copy2(src, dst, follow_symlinks=True)


def write_sums(root: Path, known: dict[str, str] | None = None, threads: int | None = None) -> dict[str, str]:
    """Write SHA256SUMS (sha256sum format, sorted) for every file under root; returns the mapping.

    ``known``: ``{path: sha256}`` already established for some of these files (not hashed again);
    the others are hashed on ``threads`` threads. Raises ReleaseError when root holds a symlink
    or a file that cannot be read.
    """
    listing = walk(root)
    if listing.links or listing.other:
        odd = sorted([*listing.links, *listing.other])
        raise ReleaseError(f"{root} holds entries that are not regular files ({', '.join(odd[:5])}); a release "
                           "holds regular files only")
    known = dict(known or {})
    files = sorted(listing.files - {SUMS})
    todo = [(rel, root / rel) for rel in files if rel not in known]
    with progress("hashing release", total=len(todo), unit="files") as bar:
        digests = hash_files(todo, threads, done=lambda _: bar.advance(1))
    sums: dict[str, str] = {}
    for rel in files:
        got = known.get(rel) or digests[rel]
        if isinstance(got, OSError):
            raise ReleaseError(f"cannot read {root / rel}: {got.strerror or got}")
        sums[rel] = got
    atomic.atomic_write_text(root / SUMS, format_sums(sums))
    return sums


def _manifest_sums(run: Path, tmp: Path) -> dict[str, str]:
    """``{release path: sha256}`` of the data files the manifest lists, where the copy has the listed size."""
    rd = RunDir(run)
    try:
        files = json.loads(rd.manifest.read_text(encoding="utf-8")).get("files") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    data = rd.data.relative_to(run).as_posix()
    out: dict[str, str] = {}
    for rel, meta in files.items():
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str):
            continue
        path = f"{data}/{rel}"
        try:
            size = os.lstat(tmp / path).st_size
        except (OSError, ValueError):
            continue  # not in the release (or not a plain path): nothing to take from the manifest
        if meta.get("bytes") in (None, size):
            out[path] = meta["sha256"]
        else:
            logger.warning("%s has %d bytes but data/manifest.json lists %s; hashing it", path, size, meta["bytes"])
    return out


def _verified_checkpoint_sums(tmp: Path, marker_dirs: list[str], threads: int | None) -> dict[str, str]:
    """Check the release's copy of each checkpoint folder against its marker (hashing each file once);
    ``{release path: sha256}`` of their files. Raises CheckpointError naming a damaged file."""
    from llm360.rundir.checkpoint import read_marker, verify_checkpoint

    listed: dict[str, dict] = {d: read_marker(tmp / d) for d in marker_dirs}
    todo = [(f"{d}/{name}", tmp / d / name) for d, files in listed.items() for name in files
            if (tmp / d / name).is_file()]  # fmt: skip
    with progress("verifying checkpoints", total=len(todo), unit="files") as bar:
        digests = hash_files(todo, threads, done=lambda _: bar.advance(1))
    out: dict[str, str] = {}
    for d, files in listed.items():
        known = {name: got for name in files if isinstance(got := digests.get(f"{d}/{name}"), str)}
        verify_checkpoint(tmp / d, known_sha256=known)  # compares, sizes and listing included; hashes nothing
        out.update({f"{d}/{name}": files[name]["sha256"] for name in files})
    return out


def release(
    run_dir: str | Path, out: str | Path, *, force: bool = False, link: bool = True, threads: int | None = None
) -> Path:
    """Assemble the release of run_dir into out (a new folder); returns out.

    link: hard-link files from the run directory where possible (no extra space; the run's files
    are never modified in place); False copies every byte. threads: files hashed at once
    (default min(4, cores)). Raises CheckpointError for a checkpoint that is incomplete or
    damaged (nothing is written then), ReleaseError for pickles or unreadable files.
    """
    from llm360.release.card import write_model_card

    run, out = Path(run_dir), Path(out)
    rd = RunDir(run)
    if not rd.manifest.is_file():
        raise RunDirError(f"{run} has no prepared data (data/manifest.json); nothing to release")
    ckpts = [p for _, p in list_checkpoints(rd.checkpoints)]
    if not ckpts:
        raise RunDirError(f"{run} has no checkpoints yet; train first (llm360 train --run-dir {run})")
    from llm360.rundir.checkpoint import read_marker

    for c in [*ckpts, rd.init_checkpoint]:
        if c.exists():
            read_marker(c)  # a half-written checkpoint stops the release before anything is written
    atomic.clean_leftovers(out.parent, only=out.name)  # what a killed release of this name left
    if out.exists() and not force:
        raise RunDirError(f"{out} already exists; choose another --out or pass --force to replace it")
    # Built under a hidden name, then renamed: an existing release is replaced only once the new one is whole.
    with atomic.atomic_folder(out) as tmp:
        files = _run_files(run)
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
        marker_dirs = sorted({p.parent.relative_to(run).as_posix() for p in files if p.name == MARKER})
        # never release a damaged checkpoint: the bytes shipped are checked against their markers
        known = _verified_checkpoint_sums(tmp, marker_dirs, threads)
        known.update(_manifest_sums(run, tmp))
        RunDir(tmp).code_info.write_text(json.dumps(code_provenance(), indent=2, sort_keys=True) + "\n")
        write_model_card(tmp)
        write_sums(tmp, known, threads)
    logger.info("release written to %s", out)
    return out
