"""`llm360 verify RELEASE [--replay I ...] [--rederive]`: check a release independently.

* **Integrity**: every file in SHA256SUMS is present with its hash, and nothing else is there;
  files are hashed on a bounded pool of threads. Nothing outside the release is opened: an entry
  that is absolute, contains ``..`` or goes through a symlink is refused with a problem that
  says so, and a symlink anywhere in the release is a problem of its own (a release holds
  regular files only: :mod:`llm360.release.sums`).
* **Consistency**: the config's data hash matches the manifest's; every checkpoint's marker
  verifies and its trainer state names the same data; every trained chunk has its checkpoint.
* **Replay** (``--replay I``): re-train chunk I from ``ckpt_{I-1}`` (``init`` for I = 0) on the
  released chunk and compare with ``ckpt_I`` tensor by tensor — weights and optimizer state:
  bitwise in deterministic CPU mode, else the largest difference against a stated tolerance.
  Skipped steps, skipped chunks and reseeded chunks recorded in the checkpoint are replayed too.
* **Rederive** (``--rederive``): rebuild the data from the raw source snapshots (or the original
  files) and the config, and compare every chunk, provenance, validation and tokenizer file.
  ``--source NAME=PATH[,PATH...]`` reads a source from a local copy of its raw files instead (a
  corpus too large to snapshot, downloaded from where the release says): document ids are relative
  to the source's folders, so the same files under another folder give the same data.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llm360.config import load_config
from llm360.errors import CheckpointError, Llm360Error
from llm360.executor import Executor
from llm360.log import progress
from llm360.release.sums import (
    SUMS,
    ReleaseError,
    entry_problem,
    hash_files,
    link_target,
    read_sums,
)
from llm360.rundir.checkpoint import read_tensors
from llm360.rundir.layout import (
    CONFIG,
    DATA_DIR,
    MANIFEST,
    SOURCES_DIR,
    TRAINER_STATE,
    Listing,
    RunDir,
    ckpt_name,
    data_manifest,
    index_name,
    walk,
)
from llm360.utils import sha256_file

logger = logging.getLogger(__name__)

REPLAY_ATOL = 1e-5
"""Largest absolute difference accepted per tensor when a replay cannot be bitwise (GPU, non-deterministic)."""


@dataclass
class VerifyReport:
    """What was checked, and every mismatch found (each names its file or tensor)."""

    release: Path
    problems: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)
    replays: list[dict] = field(default_factory=list)
    secondary: bool = False
    """Under torchrun, a rank other than 0: it took part in the replays, and rank 0 reports."""

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_sums(root: Path, report: VerifyReport, threads: int | None = None) -> tuple[dict[str, str], Listing]:
    """Check every file against SHA256SUMS; returns the sha256 computed for each file read, and the listing.

    Nothing outside the release is opened: entries that are absolute, contain ``..`` or go through
    a symlink are refused (:func:`~llm360.release.sums.entry_problem`), and every symlink in the
    release is a problem of its own. Files are hashed on ``threads`` threads.
    """
    computed: dict[str, str] = {}
    listing = walk(root)
    sums: dict[str, str] | None = None
    if SUMS not in listing.files:
        why = "is a symlink (not followed)" if SUMS in listing.links else "is missing"
        report.problems.append(f"{SUMS} {why}: cannot check the release's files")
    else:
        try:
            sums = read_sums(root)
        except ReleaseError as e:
            report.problems.append(str(e))
    bad = _odd_entries(root, listing, sums or {}, report)
    if sums is None:
        return computed, listing
    to_hash: list[tuple[str, Path]] = []
    for rel in sums:
        why = entry_problem(root, rel, listing)
        if why is not None:
            report.problems.append(why)
            bad += 1
        elif rel not in listing.files:
            report.problems.append(f"missing file: {rel} (listed in {SUMS})")
            bad += 1
        else:
            to_hash.append((rel, root / rel))
    with progress("checking sha256", total=len(to_hash), unit="files") as bar:
        digests = hash_files(to_hash, threads, done=lambda _: bar.advance(1))
    for rel, _ in sorted(to_hash):
        got = digests[rel]
        if isinstance(got, OSError):
            report.problems.append(f"unreadable file: {rel} ({got.strerror or got})")
            bad += 1
            continue
        computed[rel] = got
        if got != sums[rel]:
            report.problems.append(f"sha256 mismatch: {rel}")
            bad += 1
    for rel in sorted(listing.files - set(sums) - {SUMS}):
        report.problems.append(f"unlisted file: {rel} (not in {SUMS})")
        bad += 1
    if not bad:
        report.passed.append(f"{len(sums)} files match {SUMS}, none extra")
    return computed, listing


def _odd_entries(root: Path, listing: Listing, sums: Mapping[str, str], report: VerifyReport) -> int:
    """Report every symlink and special file (a listed symlink is reported with its entry); their count."""
    bad = 0
    for rel in sorted(set(listing.links) - set(sums) - {SUMS}):
        report.problems.append(f"symlink in the release: {rel} -> {link_target(root, rel, listing)}; a release "
                               "holds regular files only, so it was not followed")
        bad += 1
    for rel in sorted(listing.other - set(sums)):
        report.problems.append(f"not a regular file: {rel} (a FIFO, socket or device); it was not opened")
        bad += 1
    return bad


def _readable(listing: Listing, rel: str) -> bool:
    """Whether rel is a regular file of the release reached without a symlink (safe to open)."""
    return rel in listing.files


def _check_consistency(root: Path, report: VerifyReport, computed: dict[str, str], listing: Listing) -> None:
    """Config, manifest and checkpoints agree. Reads only regular files of the release (``listing``):
    what is a symlink, or under one, is already a problem of :func:`_check_sums` and is not followed."""
    from llm360.rundir.checkpoint import verify_checkpoint

    if not _readable(listing, CONFIG):
        report.problems.append("config.yaml is missing (or not a regular file)")
        return
    try:
        cfg = load_config(RunDir(root).config)
    except Llm360Error as e:
        report.problems.append(f"config.yaml: {e}")
        return
    if not _readable(listing, f"{DATA_DIR}/{MANIFEST}"):
        report.problems.append("data/manifest.json is missing (or not a regular file)")
        return
    try:
        manifest = json.loads(RunDir(root).manifest.read_text())
    except (OSError, json.JSONDecodeError) as e:
        report.problems.append(f"data/manifest.json is unreadable: {e}")
        return
    if manifest.get("config_hash") != cfg.data_hash():
        report.problems.append("config.yaml's data section does not match data/manifest.json (config hash "
                               f"{cfg.data_hash()[:12]} vs {str(manifest.get('config_hash'))[:12]})")
    for rel, meta in (manifest.get("files") or {}).items():
        rel_path = f"data/{rel}"
        if entry_problem(root, rel_path, listing) is not None:
            report.problems.append(f"data/manifest.json lists {rel!r}, which is not a plain path inside data/; "
                                   "it was not opened")
            continue
        if _readable(listing, rel_path):
            digest = computed.get(rel_path) or hash_files([(rel_path, root / rel_path)], 1)[rel_path]
            if digest != (meta or {}).get("sha256"):
                report.problems.append(f"{rel_path} does not match its sha256 in data/manifest.json")
    n_chunks = int(manifest.get("num_chunks", 0))
    trained = n_chunks if cfg.train.max_chunks is None else min(n_chunks, cfg.train.max_chunks)
    missing = [i for i in range(trained) if not RunDir(root).ckpt_dir(i).is_dir()]
    if missing:
        report.problems.append("chunks without a checkpoint: " + ", ".join(ckpt_name(i) for i in missing))
    ok_ckpts = 0
    for c in sorted(RunDir(root).checkpoints.glob("*")):
        prefix = f"checkpoints/{c.name}/"
        if f"checkpoints/{c.name}" in listing.links:
            continue  # reported as a symlink; not followed
        if not c.is_dir():
            continue
        held = [rel for rel in (*listing.links, *listing.other) if rel.startswith(prefix)]
        if held:
            report.problems.append(f"checkpoints/{c.name} not checked: it holds entries that are not regular "
                                   f"files ({', '.join(sorted(held)[:3])})")
            continue
        known = {rel[len(prefix) :]: h for rel, h in computed.items() if rel.startswith(prefix)}
        try:
            verify_checkpoint(c, known_sha256=known)  # what SHA256SUMS checking hashed is not hashed again
        except CheckpointError as e:
            report.problems.append(f"checkpoints/{c.name}: {e}")
            continue
        try:
            state = json.loads((c / TRAINER_STATE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            report.problems.append(f"checkpoints/{c.name}/trainer_state.json unreadable: {e}")
            continue
        if state.get("data_config_hash") not in (None, manifest.get("config_hash")) and not state.get("data_dir"):
            report.problems.append(f"checkpoints/{c.name} was trained on other data (hash "
                                   f"{str(state.get('data_config_hash'))[:12]})")
            continue
        ok_ckpts += 1
    if not missing:
        report.passed.append(f"all {trained} trained chunks have a checkpoint; {ok_ckpts} checkpoints verify")


# ------------------------------------------------------------------------------------ replay


def _compare_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str, exact: bool,
                     problems: list[str]) -> float:
    worst = 0.0
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            problems.append(f"{what}: tensor {name} is only in {'the release' if name in b else 'the replay'}")
            continue
        x, y = a[name], b[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            problems.append(f"{what}: {name} is {tuple(x.shape)} {x.dtype} in the replay, "
                            f"{tuple(y.shape)} {y.dtype} in the release")
            continue
        if torch.equal(x, y):
            continue
        diff = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
        worst = max(worst, diff)
        if exact or diff > REPLAY_ATOL:
            problems.append(f"{what}: {name} differs (max abs diff {diff:.3g})")
    return worst


def replay_chunk(root: Path, i: int, work_dir: Path | None = None) -> dict:
    """Re-train chunk i of a release from its previous checkpoint; compare with ckpt_i (on rank 0)."""
    from llm360.train import replay_chunk as retrain_chunk
    from llm360.train.parallel import launched_rank

    rd = RunDir(root)
    result: dict = {"chunk": i, "problems": []}
    for need in [rd.ckpt_dir(i)] + ([rd.ckpt_dir(i - 1)] if i > 0 else []):
        if not need.is_dir():
            result["problems"].append(f"replay {i}: {need.name} is not in the release")
            return result
    replayed = retrain_chunk(root, i, work_dir=work_dir)  # follows the guard decisions ckpt_i recorded
    if launched_rank()[0] != 0:
        return result  # rank 0 compares
    if replayed.skipped_chunk:
        result["skipped_chunk"] = True
    if replayed.init_state is not None and rd.init_checkpoint.is_dir():
        _compare_tensors(replayed.init_state, read_tensors(rd.init_checkpoint),
                         "init weights (from the seed)", True, result["problems"])
    exact = replayed.bitwise
    result["mode"] = "bitwise" if exact else f"max abs diff <= {REPLAY_ATOL}"
    target = rd.ckpt_dir(i)
    worst = _compare_tensors(replayed.model_state, read_tensors(target),
                             f"replay {i} weights", exact, result["problems"])
    worst = max(worst, _compare_tensors(replayed.optimizer_state, read_tensors(target, "optimizer"),
                                        f"replay {i} optimizer state", exact, result["problems"]))
    result["max_abs_diff"] = worst
    return result


def _replays(root: Path, report: VerifyReport, replay: Sequence[int], replay_dir: str | Path | None) -> None:
    for i in replay:
        res = replay_chunk(root, i, Path(replay_dir) / index_name(i) if replay_dir else None)
        report.replays.append(res)
        if res["problems"]:
            report.problems.extend(res["problems"])
        else:
            report.passed.append(f"replay of chunk {index_name(i)}: {res.get('mode')} match "
                                 f"(max abs diff {res.get('max_abs_diff', 0.0):.3g})")


def _rederive_into(root: Path, report: VerifyReport, source_paths: Mapping[str, Sequence[str]] | None,
                   executor: Executor | None) -> None:
    probs = rederive(root, source_paths, executor=executor)
    report.problems.extend(probs)
    if not probs:
        report.passed.append("data rederived from the raw sources: every chunk, provenance, validation, "
                             "document and tokenizer file is identical")


def _verify_on_ranks(root: Path, report: VerifyReport, replay: Sequence[int], replay_dir: str | Path | None,
                     rederive_data: bool, source_paths: Mapping[str, Sequence[str]] | None, threads: int | None,
                     executor: Executor | None) -> VerifyReport:  # fmt: skip
    """verify under torchrun: the replays on every rank (each rank decides alike, from the listing),
    then the files on rank 0 -- whose hashing may take hours, so no rank waits on it in a collective."""
    from llm360.train.parallel import launched_rank

    listing = walk(root)
    if replay and (listing.links or listing.other):
        report.problems.append("replay not run: the release holds symlinks or special files, which a replay would "
                               "follow; replace them with the files themselves")
        replay = []
    _replays(root, report, replay, replay_dir)
    if launched_rank()[0] != 0:
        report.secondary = True
        return report
    computed, listing = _check_sums(root, report, threads)
    _check_consistency(root, report, computed, listing)
    if rederive_data:
        _rederive_into(root, report, source_paths, executor)
    return report


# ---------------------------------------------------------------------------------- rederive


def rederive(root: Path, source_paths: Mapping[str, Sequence[str]] | None = None, *,
             executor: Executor | None = None) -> list[str]:
    """Rebuild the data from the raw sources and the config; the files that differ (empty: all equal).

    ``source_paths`` maps a source's name to the paths to read it from instead of the config's
    (and instead of its snapshot in the release). ``executor``: where prepare's tasks run
    (default: in this process), the same plan as ``llm360 prepare``.
    """
    from llm360.config import validate_config
    from llm360.data.prepare import prepare

    cfg = load_config(RunDir(root).config)
    raw = cfg.model_dump(mode="json")
    problems: list[str] = []
    source_paths = dict(source_paths or {})
    names = [src["name"] for src in raw["data"]["sources"]]
    unknown = sorted(set(source_paths) - set(names))
    if unknown:
        raise ReleaseError(f"--source {', '.join(unknown)}: the release's config has no such source (its "
                           f"sources: {', '.join(names)})")
    for src in raw["data"]["sources"]:
        snap = RunDir(root).source_snapshot(src["name"])
        if src["name"] in source_paths:
            if src["kind"] in ("embedded", "snapshot"):
                raise ReleaseError(f"--source {src['name']}: a {src['kind']} source has no raw files to point at")
            src["paths"] = [str(p) for p in source_paths[src["name"]]]
        elif snap.is_file():
            src.update({"kind": "snapshot", "paths": [str(snap)], "embedded": None, "snapshot": False})
        elif src["kind"] == "embedded":
            problems.append(f"source {src['name']}: embedded corpus without a snapshot in data/sources")
    if problems:
        return problems
    tok = raw["data"]["tokenizer"]
    if tok["kind"] == "file" and tok.get("path") and not Path(tok["path"]).exists():
        tok["path"] = str(RunDir(root).tokenizer)
    cfg2 = validate_config(raw)
    tmp = Path(tempfile.mkdtemp(prefix="llm360-rederive-"))
    try:
        try:
            prepare(cfg2, tmp / "run", executor=executor)
        except Llm360Error as e:
            return [f"rederive failed: {e}. A source whose raw files lie elsewhere is read from there with "
                    "--source NAME=PATH"]
        new, old = RunDir(tmp / "run").data, RunDir(root).data
        compared = 0
        for p in sorted(old.rglob("*")):
            rel = p.relative_to(old).as_posix()
            if not p.is_file() or rel == MANIFEST or rel.startswith(f"{SOURCES_DIR}/"):
                continue
            q = new / rel
            if not q.is_file():
                problems.append(f"rederive: data/{rel} was not produced again")
            elif sha256_file(p) != sha256_file(q):
                problems.append(f"rederive: data/{rel} differs from the rebuilt one")
            compared += 1
        if not problems:
            logger.info("rederived %d data files: all identical", compared)
        else:
            from llm360 import __version__

            try:
                made_by = json.loads(data_manifest(old).read_text())["versions"]["llm360"]
            except (OSError, ValueError, KeyError, TypeError):
                made_by = None
            if made_by != __version__:  # a difference may come from the preparation, not the sources
                problems.append(
                    f"rederive: the data was prepared by llm360 {made_by or '(version not recorded)'} and rebuilt "
                    f"by llm360 {__version__}; rebuild with the version that prepared it to tell a changed "
                    "source from a changed preparation"
                )
        return problems
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def verify(
    release_dir: str | Path,
    *,
    replay: list[int] | None = None,
    rederive_data: bool = False,
    source_paths: Mapping[str, Sequence[str]] | None = None,
    threads: int | None = None,
    executor: Executor | None = None,
    replay_dir: str | Path | None = None,
) -> VerifyReport:
    """Check a release (or a run directory with a SHA256SUMS); see the module docstring.

    Under torchrun (``WORLD_SIZE`` > 1) every rank re-trains the replayed chunks together, with the
    run's layout, first; then rank 0 alone checks the files and reports, and the other ranks return
    a report marked ``secondary``. ``replay_dir``: where replays re-train (a folder every rank
    sees; default a temporary folder, which on several nodes is an error).

    ``source_paths`` (with ``rederive_data``): where to read named sources' raw files from.
    ``threads``: files hashed at once (default min(4, cores)). ``executor``: where a rederive's
    prepare tasks run (default: in this process). Nothing outside the release is
    read (but the raw sources a rederive is pointed at); a release that holds symlinks is not
    replayed, since a replay would follow them.
    """
    root = Path(release_dir)
    if not root.is_dir():
        raise ReleaseError(f"{root} is not a folder")
    report = VerifyReport(root)
    from llm360.train.parallel import launched_rank

    if launched_rank()[1] > 1:
        return _verify_on_ranks(root, report, replay or [], replay_dir, rederive_data, source_paths, threads,
                                executor)
    computed, listing = _check_sums(root, report, threads)
    _check_consistency(root, report, computed, listing)
    if replay and (listing.links or listing.other):
        report.problems.append("replay not run: the release holds symlinks or special files (listed above), which "
                               "a replay would follow; replace them with the files themselves")
        replay = []
    _replays(root, report, replay or [], replay_dir)
    if rederive_data:
        _rederive_into(root, report, source_paths, executor)
    return report
