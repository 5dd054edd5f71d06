"""`llm360 eval`: every complete checkpoint x every task, incrementally, one result file per pair.

The (checkpoint, task) pairs are independent tasks (:mod:`llm360.eval.pairs`) run by an executor
(:mod:`llm360.executor`): in this process (the default), in ``workers`` local processes, or on a
Ray cluster with ``gpus_per_task`` GPUs each. ``shard=I/N`` takes every N-th pair of the plan
(all pairs of the models present, in order, whether done or not), so the N jobs of a Slurm array
cover a run between them. Results are one file per pair (:mod:`llm360.eval.results`), written
atomically; the summary is rebuilt from the files by every call, so shards and retries merge.

A result file records the sha256 of the checkpoint's ``COMPLETE.json`` marker (which itself lists
the sha256 of every file), the task's settings, the metrics and lm-eval's details. A (checkpoint,
task) pair whose result file matches the checkpoint's marker and the task's settings is never
computed again; a checkpoint that was re-saved, or a task whose settings changed, is.

Only complete checkpoints are read: a ``ckpt_NNN`` folder without its marker is still being
written and is skipped with a message; one that fails verification is skipped with the reason.
A pair that fails writes nothing and is reported with its error; the others still run.
With ``watch`` the runner keeps looking for new checkpoints until training is finished (the last
chunk's checkpoint is complete), ``eval.watch_idle_timeout_s`` passes without a new one, or Ctrl-C;
with several workers each is a watcher of its own, and a checkpoint is taken by exactly one of
them (an flock claim on ``eval/.claims/<checkpoint>.lock``, dropped if its process dies).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llm360.config import EvalConfig
from llm360.errors import Llm360Error
from llm360.eval.pairs import Pair, PairOutcome, claimed, context, evaluate_pair, signature, trainer_state
from llm360.eval.results import EvalTable, ItemError
from llm360.eval.specs import TaskSpec, resolve_tasks
from llm360.executor import Executor, Shard, Task, TaskError, make_executor, parse_shard
from llm360.rundir import layout
from llm360.rundir.checkpoint import marker_sha256
from llm360.rundir.layout import MARKER, RunDir, ckpt_name, has_marker
from llm360.utils import read_json

__all__ = ["EvalTable", "ItemError", "evaluate", "list_checkpoints", "list_models", "training_finished"]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ checkpoints


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The chunk checkpoint folders ``checkpoints/ckpt_NNN`` in chunk order (complete or not)."""
    return [p for _, p in layout.list_checkpoints(RunDir(run_dir).checkpoints)]


def list_models(run_dir: str | Path) -> list[Path]:
    """Every model to evaluate: the chunk checkpoints in order, then fine-tuned models (finetune/<name>)."""
    ft = RunDir(run_dir).finetune_dir
    tuned = sorted(p for p in ft.iterdir() if p.is_dir() and not p.name.startswith(".")) if ft.is_dir() else []
    return list_checkpoints(run_dir) + tuned


def training_finished(run_dir: str | Path) -> bool:
    """Whether the trainer has written its last checkpoint (the last chunk, or train.max_chunks')."""
    rd = RunDir(run_dir)
    ckpts = [p for _, p in layout.list_checkpoints(rd.checkpoints, complete_only=True)]
    if ckpts:
        cursor = trainer_state(ckpts[-1]).get("data_cursor") or {}
        if "chunk" in cursor and cursor["chunk"] is None:  # the cursor is past the last step
            return True
    try:
        chunks = int(read_json(rd.manifest)["num_chunks"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    max_chunks = None
    if rd.config.is_file():
        import yaml

        try:
            max_chunks = ((yaml.safe_load(rd.config.read_text(encoding="utf-8")) or {}).get("train") or {}).get(
                "max_chunks"
            )
        except (yaml.YAMLError, OSError, AttributeError):
            max_chunks = None
    last = (min(chunks, int(max_chunks)) if isinstance(max_chunks, int) and max_chunks > 0 else chunks) - 1
    return has_marker(rd.ckpt_dir(last))


def _selected(folders: list[Path], wanted: list[str] | None) -> list[Path]:
    if not wanted:
        return folders
    names = set()
    for w in wanted:
        w = w.strip()
        names.add(ckpt_name(int(w)) if w.isdigit() else w)
    chosen = [p for p in folders if p.name in names]
    missing = names - {p.name for p in folders}
    if missing:
        logger.warning("eval.checkpoints: %s not found (yet) in checkpoints/", ", ".join(sorted(missing)))
    return chosen


# ------------------------------------------------------------------------------ the driver


class _Evaluator:
    """One evaluation's plan and bookkeeping: which pairs are pending, what became of each."""

    def __init__(self, run_dir: Path, specs: list[TaskSpec], cfg: EvalConfig, shard: Shard | None = None,
                 call: str | None = None) -> None:  # fmt: skip
        self.rd = RunDir(run_dir)
        self.specs = specs
        self.cfg = cfg
        self.shard = shard
        self.call = call or uuid.uuid4().hex
        self.ctx = context(run_dir, cfg, self.call)
        self.results = self.ctx.results
        self.table = EvalTable()
        self.runnable: list[TaskSpec] = []
        self._announced: set[str] = set()
        self._unverified: dict[str, str] = {}
        """Checkpoints that failed verification -> their marker's sha256 (watch mode does not re-hash them)."""
        self._failed: set[tuple[str, str, str]] = set()
        """(checkpoint, task, marker sha256) that failed in this call: not retried until the next call."""

    def check_tasks(self) -> None:
        """Find out up front which tasks can run at all; say clearly why the others cannot."""
        problems: dict[str, str] = {}
        if any(s.kind == "perplexity" for s in self.specs):
            _, _, why = self.ctx.validation()
            if why:
                problems["perplexity"] = why
        lm_specs = [s for s in self.specs if s.kind == "lm-eval"]
        if lm_specs:
            problems.update(self.ctx.tasks.check(lm_specs))
        for spec in self.specs:
            if spec.key in problems:
                origin = f" (preset {spec.preset})" if spec.preset else ""
                logger.warning("task %s%s cannot run: %s", spec.key, origin, problems[spec.key])
        by_preset: dict[str, list[str]] = {}
        for spec in self.specs:
            if spec.key in problems and spec.preset:
                by_preset.setdefault(spec.preset, []).append(spec.name)
        for preset, names in by_preset.items():
            total = sum(1 for s in self.specs if s.preset == preset)
            logger.warning("preset %s: %d of %d tasks cannot run here: %s", preset, len(names), total, ", ".join(names))
        self.table.unavailable = problems
        self.runnable = [s for s in self.specs if s.key not in problems]

    def _announce(self, name: str, reason: str, level: int = logging.INFO) -> None:
        self.table.skipped[name] = reason
        if name not in self._announced:
            self._announced.add(name)
            logger.log(level, "skipping %s: %s", name, reason)

    def plan(self) -> tuple[list[Pair], set[str]]:
        """The pending pairs of this call's shard, in plan order, and the complete models seen.

        The plan is every (model folder, runnable task) in order, complete or not, done or not, so
        that a shard's share (position modulo N, as :func:`llm360.executor.shard_tasks`) does not
        depend on what other shards have finished.
        """
        pairs: list[Pair] = []
        complete: set[str] = set()
        position = 0
        for folder in _selected(list_models(self.rd.root), self.cfg.checkpoints):
            mine = []
            for spec in self.runnable:
                if self.shard is None or position % self.shard.count == self.shard.index:
                    mine.append(spec)
                position += 1
            if not mine:
                continue
            name = folder.name
            if not has_marker(folder):
                self._announce(name, f"still being written (no {MARKER} yet); it is evaluated once complete")
                continue
            complete.add(name)
            marker_sha = marker_sha256(folder)
            if self._unverified.get(name) == marker_sha:
                continue
            pairs += [
                Pair(name, str(folder), s, marker_sha) for s in mine
                if (name, s.key, marker_sha) not in self._failed
                and not self.results.done(name, s, marker_sha, signature(s, self.cfg))
            ]  # fmt: skip
        return pairs, complete

    def record(self, pairs: Sequence[Pair], outcomes: Sequence[PairOutcome | TaskError]) -> None:
        """Fold what became of each pair into the table."""
        for pair, out in zip(pairs, outcomes, strict=True):
            name, key = pair.checkpoint, pair.spec.key
            if isinstance(out, TaskError):  # the task itself broke (a bug, a worker lost for good)
                out = PairOutcome(name, key, "failed", f"{out.error_type}: {out.message}")
                logger.error("%s / %s failed, nothing written for it: %s", name, key, out.message)
            if out.status == "computed":
                self.table.computed.append((name, key))
                self.table.skipped.pop(name, None)
            elif out.status == "failed":
                self._failed.add((name, key, pair.marker_sha256))
                self.table.failed.append(ItemError(name, key, out.message))
            elif out.status == "unverified":
                self._unverified[name] = pair.marker_sha256  # not hashed again until its marker changes
                self._announce(name, f"it does not verify: {out.message}", logging.WARNING)
            elif out.status == "taken":
                self._announce(name, f"another process is evaluating {key} (its claim in "
                               f"{self.rd.eval_claim(name, key).parent} is held)")  # fmt: skip

    def run_pairs(self, executor: Executor, pairs: list[Pair], gpus_per_task: float = 0.0) -> None:
        """Run pairs as tasks of an executor; every pair finishes (or fails) whatever the others do."""
        root = str(self.rd.root)
        tasks = [Task(p.key, evaluate_pair, (root, self.cfg, p, self.call), num_gpus=gpus_per_task) for p in pairs]
        outcomes = executor.run(tasks, progress_label="eval: (checkpoint, task) pairs", unit="pairs", keep_going=True)
        self.record(pairs, outcomes)

    def run_inline(self, pairs: list[Pair]) -> None:
        """Run pairs here, checkpoint by checkpoint, each taken with its checkpoint's claim (watch mode):
        a checkpoint another watcher holds is left to it."""
        by_ckpt: dict[str, list[Pair]] = {}
        for p in pairs:
            by_ckpt.setdefault(p.checkpoint, []).append(p)
        for name, group in by_ckpt.items():
            with claimed(self.rd.eval_claim(name), f"evaluating {name}") as mine:
                if not mine:
                    logger.debug("%s is being evaluated by another watcher", name)
                    continue
                self.record(group, [evaluate_pair(str(self.rd.root), self.cfg, p, self.call) for p in group])
            self.ctx.release()

    def write_summary(self) -> None:
        self.results.summary([s.key for s in self.specs], self.table)


def _watch(ev: _Evaluator) -> None:
    """Evaluate checkpoints as training writes them, until it is finished, the idle timeout, or Ctrl-C."""
    cfg = ev.cfg
    seen: set[str] = set()
    last_new = time.monotonic()
    while True:
        finished_before = training_finished(ev.rd.root)
        pairs, complete = ev.plan() if ev.runnable else ([], set())
        ev.run_inline(pairs)
        ev.write_summary()
        if complete - seen:
            seen |= complete
            last_new = time.monotonic()
        if finished_before:
            logger.info("training is finished and every checkpoint is evaluated")
            return
        idle = cfg.watch_idle_timeout_s
        if idle is not None and time.monotonic() - last_new >= idle:
            logger.info("no new checkpoint for %.0fs (eval.watch_idle_timeout_s); stopping", idle)
            return
        logger.debug("waiting %.0fs for new checkpoints", cfg.watch_interval_s)
        time.sleep(cfg.watch_interval_s)


def watch_worker(run_dir: str, specs: list[TaskSpec], cfg: EvalConfig, shard: Shard | None = None,
                 call: str | None = None) -> EvalTable:  # fmt: skip
    """One of several watchers (an executor task): :func:`_watch` with the tasks the caller found runnable."""
    from llm360.eval.harness import hub_access

    ev = _Evaluator(Path(run_dir), specs, cfg, shard, call)
    ev.runnable = list(specs)
    with hub_access(cfg.allow_downloads):
        try:
            _watch(ev)
        finally:
            ev.ctx.release()
    return ev.table


def _merge(into: EvalTable, part: EvalTable) -> None:
    into.computed += part.computed
    into.failed += part.failed
    into.skipped.update(part.skipped)


def evaluate(
    run_dir: str | Path,
    tasks: list[str] | None = None,
    cfg: EvalConfig | None = None,
    watch: bool = False,
    *,
    executor: str = "local",
    workers: int = 1,
    gpus_per_task: float = 0.0,
    ray_address: str | None = None,
    shard: str | Shard | None = None,
) -> EvalTable:
    """Evaluate every complete checkpoint of run_dir on every task that has no result yet.

    ``tasks`` overrides ``cfg.tasks`` (names as in :mod:`llm360.eval.specs`). Results go to
    ``run_dir/eval/<checkpoint>/<task>.json``; the summary to ``eval/summary.json`` and ``.csv``.
    ``executor`` (``local`` or ``ray``), ``workers``, ``ray_address``: who runs the pairs (see
    :func:`llm360.executor.make_executor`); ``gpus_per_task``: GPUs Ray gives each pair;
    ``shard`` (``"I/N"``): only every N-th pair of the plan, starting at I.
    With ``watch``, keeps evaluating new checkpoints as training writes them, until training is
    finished, ``cfg.watch_idle_timeout_s`` passes without a new checkpoint, or Ctrl-C; with several
    workers (or Ray), each worker watches and a checkpoint is taken by one of them. Returns the
    summary table and what this call computed, skipped or failed. Raises ConfigError for task
    names that are malformed or a bad shard; tasks that cannot run (missing data, unknown name)
    are reported in the table; ExecutorError when the executor cannot run here.
    """
    from llm360.eval.harness import hub_access
    from llm360.model.load import resolve_device

    cfg = cfg or EvalConfig()
    specs = resolve_tasks(list(tasks) if tasks else cfg.tasks)
    part = parse_shard(shard) if isinstance(shard, str) else shard
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise Llm360Error(f"run directory {run_dir} does not exist")
    resolve_device(cfg.device, where="eval.device")  # a device that cannot work fails before any task runs
    ev = _Evaluator(run_dir, specs, cfg, part)
    with hub_access(cfg.allow_downloads):
        try:
            ev.check_tasks()
            if not ev.runnable:
                logger.warning("none of the tasks can run here; nothing to evaluate")
            if not list_checkpoints(run_dir) and not watch:
                logger.warning("no checkpoints in %s yet; train first (or use --watch)", ev.rd.checkpoints)
            if watch and (workers > 1 or executor != "local"):
                _watch_with_workers(ev, executor, workers, gpus_per_task, ray_address)
            elif watch:
                _watch(ev)
            else:
                pairs, _ = ev.plan() if ev.runnable else ([], set())
                if pairs:
                    with make_executor(executor, workers, ray_address) as ex:
                        ex.check_visible(ev.rd.root)
                        ev.run_pairs(ex, pairs, gpus_per_task)
                ev.write_summary()
        except KeyboardInterrupt:
            ev.table.interrupted = True
            logger.warning("interrupted: every result written so far is kept in %s", ev.results.root)
            ev.write_summary()
        finally:
            ev.ctx.release()
    n = len(ev.table.computed)
    logger.info("evaluated %d (checkpoint, task) pair%s; summary in %s", n, "" if n == 1 else "s",
                ev.rd.eval_summary)  # fmt: skip
    return ev.table


def _watch_with_workers(ev: _Evaluator, executor: str, workers: int, gpus_per_task: float,
                        ray_address: str | None) -> None:  # fmt: skip
    """``workers`` watchers as tasks of the executor; their tables merged into ev's."""
    n = max(1, workers)
    with make_executor(executor, n, ray_address) as ex:
        ex.check_visible(ev.rd.root)
        tasks = [Task(f"eval-watch:{i}", watch_worker, (str(ev.rd.root), ev.runnable, ev.cfg, ev.shard, ev.call),
                      num_gpus=gpus_per_task) for i in range(n)]  # fmt: skip
        outs: list[Any] = ex.run(tasks, progress_label="eval --watch: watchers", unit="watchers", keep_going=True)
    for out in outs:
        if isinstance(out, TaskError):
            logger.error("a watcher failed: %s", out)
            ev.table.failed.append(ItemError("(watcher)", out.key, f"{out.error_type}: {out.message}"))
        else:
            _merge(ev.table, out)
    for name in [c for c, _ in ev.table.computed]:
        ev.table.skipped.pop(name, None)
    ev.write_summary()
