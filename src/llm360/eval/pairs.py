"""One (checkpoint, task) pair of `llm360 eval`: the unit of work any executor runs.

:func:`evaluate_pair` is a plain module-level function of picklable arguments, so the in-process
executor, its worker processes and Ray run the same code. It

1. takes the pair's claim (an flock on ``eval/.claims/<checkpoint>.<task>.lock``): a pair is
   evaluated by one process at a time, whatever else evaluates the run (another shard, a second
   ``--watch``); a claim held by another process returns ``taken``, one whose process died is
   free again (the kernel drops an flock with its process);
2. returns ``done`` if the result appeared meanwhile (written by whoever held the claim before);
3. verifies the files it reads (weights, configs, tokenizer; not the optimizer) once per process
   (:func:`~llm360.rundir.checkpoint.verify_model_files`), loads the model (kept for the next
   pair of the same checkpoint in this process), runs the task and writes the result file
   atomically.

What a process keeps between pairs (the lm-eval task index, the held-out rows, the last model)
is in one :class:`PairContext` per process.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch

from llm360 import __version__
from llm360.config import EvalConfig
from llm360.errors import CheckpointError, Llm360Error, RunDirError
from llm360.eval.results import RESULT_FORMAT, ResultFiles
from llm360.eval.specs import TaskSpec
from llm360.rundir import layout
from llm360.rundir.atomic import hold_lock
from llm360.rundir.layout import RunDir
from llm360.utils import read_json

logger = logging.getLogger(__name__)

Status = Literal["computed", "failed", "unverified", "taken", "done"]


@dataclass(frozen=True)
class Pair:
    """A (checkpoint, task) pair to evaluate: the model folder, its marker's sha256 when planned, the task."""

    checkpoint: str
    """The model's name: a checkpoint folder (``ckpt_003``) or a fine-tuned model's."""
    folder: str
    spec: TaskSpec
    marker_sha256: str

    @property
    def key(self) -> str:
        return f"eval:{self.checkpoint}/{self.spec.key}"


@dataclass(frozen=True)
class PairOutcome:
    """What became of one pair: ``computed`` (a result file written), ``failed`` (nothing written;
    ``message`` says why), ``unverified`` (the checkpoint does not verify), ``taken`` (another
    process holds its claim), ``done`` (its result appeared meanwhile)."""

    checkpoint: str
    task: str
    status: Status
    message: str = ""
    path: str | None = None


def signature(spec: TaskSpec, cfg: EvalConfig) -> dict[str, Any]:
    """What, besides the checkpoint, determines a pair's result (stored in the result file)."""
    if spec.kind == "perplexity":
        return {"task": "perplexity", "max_rows": cfg.perplexity_max_rows}
    return {**spec.signature(), "limit": cfg.limit, "fewshot_seed": cfg.fewshot_seed,
            "generation_seed": cfg.generation_seed}


def describe(e: BaseException) -> str:
    """A user-facing message for what a task raised."""
    if isinstance(e, Llm360Error):
        return str(e)
    from llm360.eval.harness import describe_error

    return describe_error(e)


# ------------------------------------------------------------------------------ the context


class PairContext:
    """What one process keeps between the pairs of one evaluation: the task runner, the held-out
    rows, the model last loaded (one at a time: a new checkpoint's model replaces it)."""

    def __init__(self, run_dir: Path, cfg: EvalConfig) -> None:
        self.rd = RunDir(run_dir)
        self.cfg = cfg
        self.results = ResultFiles(self.rd)
        self._tasks: Any = None
        self._perplexity: tuple[Any, list[str], str | None] | None = None
        self._loaded: tuple[str, str] | None = None
        self._model: Any = None
        self._lm: Any = None
        self._unverified: dict[tuple[str, str], str] = {}

    @property
    def tasks(self) -> Any:
        """The lm-eval :class:`~llm360.eval.harness.TaskRunner` (made on first use)."""
        if self._tasks is None:
            from llm360.eval.harness import TaskRunner

            self._tasks = TaskRunner(self.cfg)
        return self._tasks

    def validation(self) -> tuple[Any, list[str], str | None]:
        """(store, sources with held-out rows, why perplexity cannot run or None)."""
        if self._perplexity is None:
            from llm360.eval.perplexity import validation_sources

            self._perplexity = validation_sources(self.rd.data)
        return self._perplexity

    @property
    def device(self) -> torch.device:
        from llm360.model.load import resolve_device

        return resolve_device(self.cfg.device, where="eval.device")

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.cfg.precision == "bf16" else torch.float32

    def verify(self, folder: Path) -> str:
        """The marker's sha256 once the files evaluation reads verify; CheckpointError otherwise
        (remembered for this marker, so a damaged checkpoint is hashed once per process too)."""
        from llm360.rundir.checkpoint import marker_sha256, verify_model_files

        key = (str(folder), marker_sha256(folder))
        if key in self._unverified:
            raise CheckpointError(self._unverified[key])
        try:
            return verify_model_files(folder)
        except CheckpointError as e:
            self._unverified[key] = str(e)
            raise

    def model(self, folder: Path, marker_sha: str) -> Any:
        """The checkpoint's model on the device, loaded once for consecutive pairs of one checkpoint."""
        from llm360.model.load import load_model

        if self._loaded != (str(folder), marker_sha):
            self.release()
            self._model = load_model(folder, self.dtype, self.device)
            self._loaded = (str(folder), marker_sha)
        return self._model

    def lm(self, folder: Path) -> Any:
        """lm-eval's view of the loaded model (made once per model)."""
        if self._lm is None:
            from llm360.eval.adapter import LLM360LM

            tok_dir = folder
            if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
                tok_dir = self.rd.tokenizer  # a folder without tokenizer files: the run's own tokenizer
            self._lm = LLM360LM(model=self._model, tokenizer=tok_dir, batch_size=self.cfg.batch_size,
                                device=str(self.device), dtype=self.dtype, seed=self.cfg.generation_seed)  # fmt: skip
            self._lm.pretrained = str(folder)
        return self._lm

    def release(self) -> None:
        """Drop the loaded model (and free its GPU memory)."""
        cuda = self._model is not None and self.device.type == "cuda"
        self._model = self._lm = self._loaded = None
        if cuda:
            torch.cuda.empty_cache()


_context: tuple[tuple[str, str, str], PairContext] | None = None


def context(run_dir: str | Path, cfg: EvalConfig, call: str = "") -> PairContext:
    """This process's context for one evaluation call (``call``: its id) of (run_dir, cfg): made on
    first use, kept while that call runs (one at a time: another call replaces it)."""
    global _context
    key = (os.path.realpath(run_dir), cfg.model_dump_json(), call)
    if _context is None or _context[0] != key:
        if _context is not None:
            _context[1].release()
        _context = (key, PairContext(Path(run_dir), cfg))
    return _context[1]


# ------------------------------------------------------------------------------------ claims


@contextmanager
def claimed(path: Path, doing: str) -> Iterator[bool]:
    """Hold the claim file ``path`` for the block: True, or False when another live process holds it.

    An flock (:func:`~llm360.rundir.atomic.hold_lock`): the kernel drops it when its process ends,
    SIGKILL included, so a claim is never stale. The file is removed when the block ends (while
    still locked); a process that opened it just before checks after locking that the name still
    leads to the file it locked, else it claims the new one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            f = hold_lock(path, doing)
        except RunDirError:
            f = None
            break
        try:
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()  # removed by its holder between our open and our lock: claim the new file
    if f is None:
        yield False
        return
    try:
        yield True
    finally:
        path.unlink(missing_ok=True)
        f.close()


# ---------------------------------------------------------------------------------- one pair


def evaluate_pair(run_dir: str, cfg: EvalConfig, pair: Pair, call: str = "") -> PairOutcome:
    """Evaluate one pair and write its result file (see the module docstring); never raises for a
    problem of the pair itself (a damaged checkpoint, a task that fails): the outcome says it.
    ``call``: the id of the evaluation call, which scopes what this process remembers (a checkpoint
    that did not verify is not hashed again within the call)."""
    from llm360.eval.harness import hub_access

    ctx = context(run_dir, cfg, call)
    spec, name, folder = pair.spec, pair.checkpoint, Path(pair.folder)
    with claimed(ctx.rd.eval_claim(name, spec.key), f"evaluating {name} / {spec.key}") as mine:
        if not mine:
            return PairOutcome(name, spec.key, "taken", "another process is evaluating it")
        try:
            marker_sha = ctx.verify(folder)
        except CheckpointError as e:
            return PairOutcome(name, spec.key, "unverified", str(e))
        if ctx.results.done(name, spec, marker_sha, signature(spec, cfg), quiet=True):
            return PairOutcome(name, spec.key, "done")
        if spec.kind == "lm-eval":  # (importing datasets to switch the Hub off costs seconds: only where read)
            with hub_access(cfg.allow_downloads):
                out = _compute(ctx, pair, folder, marker_sha)
        else:
            out = _compute(ctx, pair, folder, marker_sha)
    if out.status == "failed":
        logger.error("%s / %s failed, nothing written for it: %s", name, spec.key, out.message)
    return out


def _compute(ctx: PairContext, pair: Pair, folder: Path, marker_sha: str) -> PairOutcome:
    spec, name, cfg = pair.spec, pair.checkpoint, ctx.cfg
    device = ctx.device
    try:
        model = ctx.model(folder, marker_sha)
    except Exception as e:
        return PairOutcome(name, spec.key, "failed", f"cannot load the checkpoint: {describe(e)}")
    t0 = time.perf_counter()
    try:
        payload = _perplexity(ctx, model) if spec.kind == "perplexity" else _lm_eval(ctx, ctx.lm(folder), spec, name)
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return PairOutcome(name, spec.key, "failed",
                           f"out of memory on {device}; lower eval.batch_size (now {cfg.batch_size})")  # fmt: skip
    except Exception as e:
        logger.debug("%s/%s failed", name, spec.key, exc_info=True)
        return PairOutcome(name, spec.key, "failed", describe(e))
    seconds = time.perf_counter() - t0
    state = trainer_state(folder)
    payload.update({
        "format": RESULT_FORMAT, "version": 1, "checkpoint": name, "task": spec.key,
        "kind": spec.kind, "preset": spec.preset, "signature": signature(spec, cfg),
        "checkpoint_marker_sha256": marker_sha, "step": state.get("step"),
        "tokens_seen": state.get("tokens_seen"), "chunk": state.get("checkpoint_chunk"),
        "seconds": round(seconds, 3), "device": str(device), "precision": cfg.precision,
        "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "llm360_version": __version__,
    })  # fmt: skip
    path = ctx.results.write(name, spec.key, payload)
    primary = payload.get("primary_metric")
    value = (payload.get("metrics") or {}).get(primary)
    shown = f"{primary} = {value:.4g}" if isinstance(value, (int, float)) else "done"
    logger.info("%s / %s: %s (%.1fs) -> %s", name, spec.key, shown, seconds, path.relative_to(ctx.rd.root))
    return PairOutcome(name, spec.key, "computed", path=str(path))


def trainer_state(folder: Path) -> dict[str, Any]:
    """A checkpoint's trainer_state.json, or {} when it is missing or unreadable (fields are optional here)."""
    try:
        state = read_json(folder / layout.TRAINER_STATE)
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def _perplexity(ctx: PairContext, model: Any) -> dict[str, Any]:
    from llm360.eval.perplexity import heldout_perplexity

    store, sources, _ = ctx.validation()
    stats = heldout_perplexity(model, store, sources, max_rows=ctx.cfg.perplexity_max_rows,
                               batch_size=ctx.cfg.batch_size)  # fmt: skip
    metrics = {"overall": stats["overall"]["perplexity"]}
    metrics.update({src: s["perplexity"] for src, s in stats["sources"].items()})
    return {"metrics": metrics, "primary_metric": "overall", "details": stats}


def _lm_eval(ctx: PairContext, lm: Any, spec: TaskSpec, ckpt: str) -> dict[str, Any]:
    from llm360.eval.harness import details_of, extract_metrics, lm_eval_version

    results = ctx.tasks.run(lm, spec)
    metrics, stderr = extract_metrics(results, spec)
    if not metrics:
        raise RuntimeError(f"lm-eval returned no metrics for {spec.name!r}")
    if ctx.cfg.log_samples and results.get("samples"):
        ctx.results.write_samples(ckpt, spec.key, results["samples"])
    primary = spec.primary_metric if spec.primary_metric in metrics else next(iter(metrics))
    return {
        "metrics": metrics, "stderr": stderr, "primary_metric": primary,
        "details": details_of(results), "lm_eval_version": lm_eval_version(),
    }  # fmt: skip
