"""`llm360 train`: walk the chunks in order, one complete checkpoint per chunk, exact resume.

One optimizer step trains on one global batch: the rows :class:`~llm360.rundir.data.StepIndex`
assigns to that step, split over ranks, then over micro-batches. The loss is the sum of token
losses divided by the tokens of the whole global batch, so the gradient is the same whatever the
world size, micro-batch size or accumulation. Every logged number is reduced over ranks.

After the last step of chunk ``i`` the state goes into ``checkpoints/ckpt_i``: fp32 weights (a
Hugging Face folder), AdamW state by parameter name, schedule position, RNG states, data cursor
and config. Restarting continues from the latest complete checkpoint; in deterministic mode on
CPU the result is bitwise what an uninterrupted run gives.

The guards (:mod:`llm360.train.guards`) decide about each step; this loop acts on their decisions.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import IO, Any, NoReturn

import numpy as np
import torch

from llm360.config import RunConfig, to_yaml
from llm360.errors import CheckpointError, ConfigError, Llm360Error
from llm360.log import progress
from llm360.model.llama import Llama, flops_per_token, resolve_model_config
from llm360.rundir import checkpoint as ckpt
from llm360.rundir.atomic import atomic_write_text, hold_lock
from llm360.rundir.checkpoint import read_trainer_state
from llm360.rundir.data import DataStore, StepIndex, TrainingRecord
from llm360.rundir.layout import INIT, RunDir, ckpt_name, index_name, list_step_checkpoints, step_name
from llm360.train.checkpointing import Checkpointer
from llm360.train.faults import FaultInjector
from llm360.train.guards import GuardDecision, StepGuard, TrainingStopped
from llm360.train.metrics import MetricsLogger, rank_extremes, truncate_jsonl_from_step
from llm360.train.optim import build_optimizer, lr_at, set_lr
from llm360.train.parallel import (
    DistInfo,
    all_reduce_sum,
    barrier,
    clip_grad_norm,
    data_parallel_rank,
    destroy_distributed,
    init_distributed,
    is_sharded,
    parallelize,
    same_on_every_rank,
    shards_parameters,
    together,
)
from llm360.train.plan import computes_in_bf16, device_peak_flops, startup_check
from llm360.train.state import TrainState, run_identity

__all__ = ["Trainer", "TrainingStopped", "set_determinism", "train"]

logger = logging.getLogger(__name__)


def set_determinism(on: bool) -> None:
    torch.use_deterministic_algorithms(on, warn_only=False)
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False


class Trainer:
    """One training run over a prepared data directory. Use :func:`train` (or, to re-train one chunk of
    a release, :func:`llm360.train.replay.replay_chunk`).

    ``recorded``: an original run's guard decisions to follow from where training starts (a
    replay): chunks it reseeded are trained in their reseeded order, and the steps it skipped are
    skipped again whatever their loss.
    """

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: str | Path,
        *,
        init_from: str | Path | None = None,
        data_dir: str | Path | None = None,
        reset_optimizer: bool = False,
        device: str | None = None,
        recorded: TrainingRecord | None = None,
    ) -> None:
        self.cfg = cfg
        self.tcfg = cfg.train
        self.rd = RunDir(run_dir)
        self._owns_process_group = not torch.distributed.is_initialized()
        self.info: DistInfo = init_distributed(device)
        self.init_from = Path(init_from) if init_from else None
        self.reset_optimizer = reset_optimizer
        self.recorded = recorded
        self._explicit_data = Path(data_dir) if data_dir else None
        self.faults = FaultInjector.from_env()
        self.sharded_resume = False  # the checkpoint is read block by block, after fully_shard
        self._deferred: tuple[Path, bool] | None = None  # (checkpoint, keep its optimizer state) to read then
        self._lock: IO[str] | None = None  # the run directory's lock, held by rank 0 while training

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        """Everything before the first step; raises the user's errors before any weight is loaded.

        Check the layout and the memory plan (:func:`llm360.train.plan.startup_check`), lock the run
        directory, find the checkpoint to resume from, open the data, plan the steps, build the model
        and optimizer, resume (or initialise from ``init_from``), open the metrics, parallelize.
        """
        local = os.environ.get("LOCAL_WORLD_SIZE")  # torchrun's ranks on this node
        startup_check(self.cfg, self.info.world_size, int(local) if local else None, self.info.device)
        # What a rank reads alone (checkpoints, data) may fail on one rank only: a rank's error is
        # raised on every rank (`together`), and ranks that see different checkpoints stop, rather
        # than wait for each other in a collective or train from different states.
        with together(self.info):
            self._take_lock()
            latest, saved = self._find_checkpoint()
            self._open_data(saved)
        same_on_every_rank(
            None if latest is None else f"{latest.name} at step {saved.step}", "latest complete checkpoint", self.info
        )
        same_on_every_rank(self.data_hash, f"prepared data (config hash in {self.store.dir}/manifest.json)", self.info)
        self._plan_steps()
        self._build_model()
        self._start_from(latest, saved)
        self._open_metrics(latest)
        self._parallelize(latest)

    def _take_lock(self) -> None:
        """Rank 0: hold the run directory's lock (one training per run directory), clear leftovers."""
        if self.info.is_main and self.rd.root.is_dir():
            self._lock = hold_lock(self.rd.lock, "being trained")

    def _find_checkpoint(self) -> tuple[Path | None, TrainState | None]:
        """The latest complete checkpoint and its trainer state (None, None: a new run)."""
        # names and sizes here; load_checkpoint hashes every file as it reads it
        latest = ckpt.latest_complete_checkpoint(self.rd.checkpoints, verify=False)
        if latest is None:
            return None, None
        return latest, TrainState.from_json(read_trainer_state(latest))

    def _open_data(self, saved: TrainState | None) -> None:
        """Open the data to train on: ``--data``, else the data the run was trained on, else the run's."""
        if self._explicit_data is not None:
            d = self._explicit_data
            data_dir = RunDir(d).data if RunDir(d).manifest.is_file() else d
        elif saved is not None and saved.data_dir:
            data_dir = Path(saved.data_dir)
        else:
            data_dir = self.rd.data
        self.store = DataStore(data_dir)
        self.data_hash: str = self.store.manifest["config_hash"]
        if self._explicit_data is None and (saved is None or not saved.data_dir):
            if self.data_hash != self.cfg.data_hash():
                raise ConfigError(
                    f"the data in {data_dir} was prepared from another data config (hash "
                    f"{self.data_hash[:12]}, this config {self.cfg.data_hash()[:12]}); train with the "
                    "config the data was prepared with, or prepare again"
                )

    def _plan_steps(self) -> None:
        """The model config the data asks for, the step index and the run's identity (ConfigError first)."""
        # the model's vocabulary and max_seq_len checked against the data's, before anything is built
        self.mcfg = resolve_model_config(self.cfg.model, self.store.vocab_size, self.store.seq_len)
        self.seq_len = self.store.seq_len
        _, dp = data_parallel_rank(self.info, self.tcfg.tensor_parallel)
        B = self.tcfg.global_batch_sequences
        if B % dp:
            raise ConfigError(
                f"train.global_batch_sequences = {B} does not split over {dp} data-parallel ranks; use a multiple of {dp}"
            )
        self.index = StepIndex(self.store.rows_per_chunk, B)
        self.total_steps = self.index.total_steps
        max_chunks = self.tcfg.max_chunks
        n_chunks = self.store.num_chunks if max_chunks is None else min(max_chunks, self.store.num_chunks)
        self.stop_step = int(self.index.first_step[n_chunks])
        self.run_id = run_identity(self.cfg, self.data_hash, self.mcfg.model_dump(mode="json"))

    def _build_model(self) -> None:
        """The model from the seed, its optimizer and a fresh state (what a resume then overwrites)."""
        self.checkpointer = Checkpointer(self.rd, self.info, self.cfg, self.mcfg, self.store)
        set_determinism(self.tcfg.deterministic_on(self.info.device.type))
        torch.manual_seed(self.tcfg.seed)
        self.model = Llama(self.mcfg).to(self.info.device)
        self.optimizer = build_optimizer(self.model, self.tcfg)
        self.state = TrainState(run_id=self.run_id, data_config_hash=self.data_hash)
        if self._explicit_data is not None:
            self.state.data_dir = str(self.store.dir.resolve())

    def _start_from(self, latest: Path | None, saved: TrainState | None) -> None:
        """Resume from the latest checkpoint, or initialise from ``init_from``; then set the guards."""
        # Sharded, every rank reads only its blocks of the checkpoint, once fully_shard has made them
        self.sharded_resume = shards_parameters(self.tcfg.parallelism, self.tcfg.tensor_parallel, self.info)
        with together(self.info):  # no collective inside
            if latest is not None:
                self._resume(latest, saved)
            elif self.init_from is not None:
                self._init_from(self.init_from)
        self.guard = StepGuard(self.tcfg.guards, recorded_skips=self._follow_record())

    def _follow_record(self) -> frozenset[int]:
        """Take the recorded run's reseeds of the chunks still to train; the steps to skip as it did."""
        if self.recorded is None:
            return frozenset()
        start = self.state.step
        for chunk, reseeds in self.recorded.chunk_reseeds.items():
            if chunk < self.store.num_chunks and start <= int(self.index.first_step[chunk]) < self.stop_step:
                self.state.chunk_reseeds[str(chunk)] = reseeds  # the data format gives that order
        return frozenset(s for s in self.recorded.skipped_steps if start <= s < self.stop_step)

    def _open_metrics(self, latest: Path | None) -> None:
        """Open the metrics (dropping lines of steps that will run again) and record how training starts."""
        dropped = 0
        resuming = latest is not None and self.state.step < self.stop_step  # not when already finished
        if resuming and self.info.is_main:
            # steps after the checkpoint will run again: their lines go (before the writer opens the file)
            dropped = truncate_jsonl_from_step(self.rd.train_metrics, self.state.step)
        self.metrics = MetricsLogger(
            self.rd.metrics, self.tcfg, enabled=self.info.is_main, run_name=self.cfg.name,
            config=self.cfg.model_dump(mode="json"),
        )
        world = self.info.world_size
        if resuming:
            self.metrics.event("resume", step=self.state.step, checkpoint=latest.name,
                               sharded=self.sharded_resume,
                               world_size=world, metrics_lines_dropped=dropped)
        elif self.init_from is not None:
            self.metrics.event("init_from", step=0, checkpoint=str(self.init_from),
                               optimizer="reset" if self.reset_optimizer else "kept",
                               data=str(self.store.dir))
        if self.info.is_main:  # the run directory's config is the one training runs with
            atomic_write_text(self.rd.config, to_yaml(self.cfg))
        if world not in self.state.world_size_history:
            self.state.world_size_history.append(world)

    def _parallelize(self, latest: Path | None) -> None:
        """DDP or FSDP2 (the optimizer state moved over to the shards), compile, autocast."""
        tcfg = self.tcfg
        use_bf16 = computes_in_bf16(tcfg, self.info.device.type)
        self.train_model = parallelize(self.model, tcfg.parallelism, self.info, tcfg.activation_checkpointing,
                                       tcfg.shard_group_size, bf16=use_bf16, tensor_parallel=tcfg.tensor_parallel)
        if self.sharded_resume:  # FSDP2 / tensor parallelism replaced the parameters: a new optimizer over them
            self.optimizer = build_optimizer(self.model, tcfg)
        if self._deferred is not None:  # now each rank reads its own blocks
            target, keep_optimizer = self._deferred
            with nullcontext() if latest is not None else self._initialising_from(target):
                res = self.checkpointer.restore(target, self.model, self.optimizer if keep_optimizer else None)
            if latest is not None:
                ckpt.restore_rng(res["rng_state"])
            self._deferred = None
        if tcfg.compile:
            self.train_model = torch.compile(self.train_model)
        # autocast also under FSDP's bf16 policy: it keeps softmax, norms and the loss in fp32
        self.autocast = (
            (lambda: torch.autocast(self.info.device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
        )
        self.flops_per_token = flops_per_token(self.mcfg, self.seq_len)
        self.peak_flops = device_peak_flops(tcfg, self.info.device)  # None: no MFU (an unknown device)

    def _resume(self, latest: Path, saved: TrainState) -> None:
        if saved.run_id != self.run_id:
            raise CheckpointError(
                f"{latest} belongs to another run (its data, model or optimizer config differs from this "
                f"config: run id {saved.run_id[:12]} vs {self.run_id[:12]}). Use a new --run-dir, or "
                f"--init-from {latest} to start a new run from it. Compare with {latest / 'config.yaml'}."
            )
        self.state = saved
        if self.sharded_resume:
            self._deferred = (latest, True)
        else:
            res = ckpt.load_checkpoint(latest, self.model, self.optimizer)
            ckpt.restore_rng(res["rng_state"])
        logger.info("resuming from %s at step %d%s", latest, saved.step,
                    " (each rank reading its own blocks)" if self.sharded_resume else "")

    @contextmanager
    def _initialising_from(self, src: Path) -> Iterator[None]:
        try:
            yield
        except CheckpointError as e:
            hint = "" if self.reset_optimizer else " (to keep only its weights, add --reset-optimizer)"
            raise CheckpointError(f"cannot initialise from {src}: {e}{hint}") from None

    def _init_from(self, src: Path) -> None:
        if not src.is_dir():
            raise CheckpointError(f"--init-from {src}: no such checkpoint folder")
        if self.sharded_resume:
            self._deferred = (src, not self.reset_optimizer)
        else:
            with self._initialising_from(src):
                ckpt.load_checkpoint(src, self.model, None if self.reset_optimizer else self.optimizer)
        self.state.init_from = {
            "checkpoint": str(src.resolve()),
            "marker_sha256": ckpt.marker_sha256(src),
            "optimizer": "reset" if self.reset_optimizer else "kept",
        }
        logger.info("initialised weights%s from %s", "" if self.reset_optimizer else " and optimizer", src)

    # ------------------------------------------------------------------ checkpoints
    def save(self, name: str, *, chunk: int | None) -> Path:
        """Write checkpoints/<name> (chunk None: checkpoints/steps/<name>); rank 0 writes, every rank waits."""
        target = self.rd.checkpoints / name if chunk is not None else self.rd.step_checkpoints / name
        state = self.state.to_json()
        state["checkpoint_chunk"] = chunk
        state["data_cursor"] = self._cursor()
        state["lr"] = lr_at(max(self.state.step - 1, 0), self.tcfg, self.total_steps)
        state["total_steps"] = self.total_steps
        state["global_batch_sequences"] = self.tcfg.global_batch_sequences
        state["world_size"] = self.info.world_size
        self.checkpointer.save(target, self.model, self.optimizer, state)
        return target

    def _cursor(self) -> dict:
        if self.state.step >= self.total_steps:
            return {"next_step": self.state.step, "chunk": None, "step_in_chunk": None}
        loc = self.index.locate(self.state.step)
        return {"next_step": self.state.step, "chunk": loc.chunk, "step_in_chunk": loc.step_in_chunk}

    def _rollback(self, chunk: int, decision: GuardDecision) -> None:
        """Restore the state before `chunk` and skip or reseed it, as the decision says."""
        target = self.rd.ckpt_dir(chunk - 1) if chunk > 0 else self.rd.init_checkpoint
        rollbacks = self.state.rollbacks + 1
        res = self.checkpointer.restore(target, self.model, self.optimizer)
        sharded = is_sharded(self.model)
        ckpt.restore_rng(res["rng_state"])
        self.state = TrainState.from_json(res["trainer_state"])
        self.state.rollbacks = rollbacks
        # intra-chunk checkpoints of the abandoned attempt must never be resumed from
        if self.info.is_main:
            for step, stale in list_step_checkpoints(self.rd.step_checkpoints):
                if step > self.state.step:
                    ckpt.remove_checkpoint(stale)
        barrier(self.info)
        restored = {"restored": target.name, "sharded": sharded}
        first = int(self.index.first_step[chunk])
        if decision.policy == "rollback_skip_chunk":
            self.state.skipped_chunks.append(chunk)
            self.state.step = int(self.index.first_step[chunk + 1])
            self.metrics.event(decision.event, step=first, chunk=chunk, **decision.fields, **restored)
            self.state.last_chunk_done = chunk
            self.save(ckpt_name(chunk), chunk=chunk)
        else:
            key = str(chunk)
            self.state.chunk_reseeds[key] = self.state.chunk_reseeds.get(key, 0) + 1
            self.metrics.event(decision.event, step=first, chunk=chunk, **decision.fields, **restored,
                               reseed=self.state.chunk_reseeds[key])

    # ------------------------------------------------------------------ one step
    def _rows(self, step: int) -> np.ndarray:
        loc = self.index.locate(step)
        lo, hi = loc.rank_slice(*data_parallel_rank(self.info, self.tcfg.tensor_parallel))
        # the data format's one row order after reseeds: inspect and replay read the same
        return self.store.rows_in_training_order(
            loc.chunk, lo, hi, reseeds=self.state.chunk_reseeds.get(str(loc.chunk), 0), seed=self.tcfg.seed
        )

    def train_step(self, step: int) -> tuple[float, float]:
        """Forward/backward over this rank's rows; returns the global (loss, grad norm) before the update."""
        rows = torch.from_numpy(self._rows(step)).to(self.info.device)
        x_BT, y_BT = rows[:, :-1], rows[:, 1:]
        tokens_global = self.tcfg.global_batch_sequences * self.seq_len
        dp_rank, dp = data_parallel_rank(self.info, self.tcfg.tensor_parallel)
        scale = dp / tokens_global  # DDP/FSDP average gradients over the data-parallel ranks
        micro = self.tcfg.micro_batch_sequences
        n_micro = math.ceil(x_BT.shape[0] / micro)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.info.device)
        self.optimizer.zero_grad(set_to_none=True)
        for i in range(n_micro):
            sl = slice(i * micro, (i + 1) * micro)
            sync = i == n_micro - 1 or not hasattr(self.train_model, "no_sync")
            ctx = nullcontext() if sync else self.train_model.no_sync()
            with ctx, self.autocast():
                _, loss = self.train_model(x_BT[sl], y_BT[sl], reduction="sum")
                (loss * scale).backward()
            loss_sum += loss.detach().double()
        self.faults.after_backward(step, loss_sum, self.model)  # a no-op unless a test asks for a fault
        if self.info.rank != dp_rank * self.tcfg.tensor_parallel:  # one rank of a tensor-parallel group counts
            loss_sum.zero_()
        loss_global = all_reduce_sum(loss_sum, self.info).item() / tokens_global
        clip = self.tcfg.grad_clip if self.tcfg.grad_clip is not None else float("inf")
        norm = clip_grad_norm(self.model.parameters(), clip)
        return loss_global, float(norm)

    # ------------------------------------------------------------------ the loop
    def fit(self, stop_after_steps: int | None = None) -> dict:
        """Train to the end (or max_chunks); returns a summary. stop_after_steps: for tests."""
        if self.state.step == 0 and not self.rd.init_checkpoint.exists():
            self.save(INIT, chunk=-1)
        if self.state.step >= self.stop_step:
            logger.info("training is complete: %d of %d steps done (%s)", self.state.step, self.stop_step,
                        self.rd.checkpoints)
            return self.summary(done=True)
        steps_run = 0
        bars = ExitStack()
        self._bar_chunk: int | None = None
        try:
            while self.state.step < self.stop_step:
                self._one_step(bars)
                steps_run += 1
                if stop_after_steps is not None and steps_run >= stop_after_steps:
                    break
        finally:
            bars.close()
        return self.summary(done=self.state.step >= self.stop_step)

    def _one_step(self, bars: ExitStack) -> None:
        """Run the step at self.state.step, act on the guards' decision, log, checkpoint."""
        tcfg = self.tcfg
        step = self.state.step
        loc = self.index.locate(step)
        chunk = loc.chunk
        n_in_chunk = self.index.steps_per_chunk[chunk]
        if chunk != self._bar_chunk:  # one progress bar per chunk
            bars.close()
            self._bar = bars.enter_context(progress(f"chunk {index_name(chunk)}", total=n_in_chunk, unit="steps"))
            self._bar.advance(loc.step_in_chunk)
            self._bar_chunk = chunk
        t0 = time.perf_counter()
        loss, gnorm = self.train_step(step)
        decision = self.guard.within_budget(self.guard.check(step, loss, gnorm, self.state.loss_window),
                                            self.state.rollbacks)
        if decision.applies_update:
            self._record(decision, step, chunk)  # a spike under policy record: trained on, and recorded
            set_lr(self.optimizer, lr_at(step, tcfg, self.total_steps))
            self.optimizer.step()
            self.state.loss_window = (self.state.loss_window + [loss])[-tcfg.guards.spike_window :]
            self.state.chunk_loss_sum += loss
            self.state.chunk_loss_steps += 1
        else:
            self.optimizer.zero_grad(set_to_none=True)
            if decision.policy == "stop":
                self._stop(decision, step, chunk)
            if decision.rolls_back:
                self._rollback(chunk, decision)
                self._bar_chunk = None
                return
            self._record(decision, step, chunk)
            self.state.skipped_steps.append(step)
        self.state.step += 1
        self.state.tokens_seen += tcfg.global_batch_sequences * self.seq_len
        self._log(step, chunk, loc.step_in_chunk, n_in_chunk, loss, gnorm, time.perf_counter() - t0)
        self._bar.advance(1)
        if loc.step_in_chunk == n_in_chunk - 1:
            self.state.last_chunk_done = chunk
            self.save(ckpt_name(chunk), chunk=chunk)
            self.state.chunk_loss_sum, self.state.chunk_loss_steps = 0.0, 0
            unused = self.index.unused_rows(chunk)
            if unused:
                self.metrics.event("rows_unused", step=step, chunk=chunk, rows=unused,
                                   reason="fewer than a global batch left at the end of the chunk")
        elif tcfg.checkpoint_every_steps and self.state.step % tcfg.checkpoint_every_steps == 0:
            self.save(step_name(self.state.step), chunk=None)

    def _record(self, decision: GuardDecision, step: int, chunk: int) -> None:
        """Write the decision's events.jsonl line, if it has one."""
        if decision.event is not None:
            self.metrics.event(decision.event, step=step, chunk=chunk, **decision.fields)

    def _stop(self, decision: GuardDecision, step: int, chunk: int) -> NoReturn:
        self._record(decision, step, chunk)
        raise TrainingStopped(
            f"{decision.reason} at step {step} (chunk {index_name(chunk)}); {decision.note}. The last complete "
            f"checkpoint is intact in {self.rd.checkpoints}"
        )

    def _log(self, step: int, chunk: int, k: int, n: int, loss: float, gnorm: float, dt: float) -> None:
        tcfg = self.tcfg
        tokens = tcfg.global_batch_sequences * self.seq_len
        tps = tokens / dt if dt > 0 else 0.0
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        on_cuda = self.info.device.type == "cuda"
        cuda_mb = torch.cuda.max_memory_allocated(self.info.device) / 2**20 if on_cuda else None
        # collective: every rank logs every step it runs
        extremes = rank_extremes(dt, rss_mb if cuda_mb is None else cuda_mb, self.info)
        rec: dict[str, Any] = {
            "step": step, "chunk": chunk, "step_in_chunk": k, "tokens_seen": self.state.tokens_seen,
            "loss": loss, "grad_norm": gnorm, "lr": lr_at(step, tcfg, self.total_steps),
            "tokens_per_s": tps, "step_time_s": dt, "world_size": self.info.world_size,
            "rollbacks": self.state.rollbacks,
            "rss_mb": rss_mb, **extremes,
        }
        if self.peak_flops is not None:
            rec["mfu"] = tps * self.flops_per_token / (self.peak_flops * self.info.world_size)
        if cuda_mb is not None:
            rec["cuda_max_allocated_mb"] = cuda_mb
        self.metrics.log_step(rec)
        if self.info.is_main and (step % tcfg.log_every == 0 or k == n - 1):
            mfu = f"  mfu {rec['mfu']:.1%}" if "mfu" in rec else ""
            logger.info(
                "step %d  chunk %s %d/%d  loss %.4f  grad %.3f  lr %.2e  %.0f tok/s%s",
                step, index_name(chunk), k + 1, n, loss, gnorm, rec["lr"], tps, mfu,
            )

    def summary(self, done: bool) -> dict:
        return {"done": done, "step": self.state.step, "total_steps": self.stop_step,
                "tokens_seen": self.state.tokens_seen, "last_chunk_done": self.state.last_chunk_done,
                "skipped_steps": self.state.skipped_steps, "skipped_chunks": self.state.skipped_chunks,
                "rollbacks": self.state.rollbacks}

    def close(self) -> None:
        if hasattr(self, "metrics"):
            self.metrics.close()
        if self._lock is not None:
            self._lock.close()  # releases the run directory
            self._lock = None
        if self._owns_process_group:
            # every group (HSDP's mesh has sub-groups) goes before the interpreter exits: gloo's
            # threads left to interpreter teardown abort the process ("terminate called ...")
            destroy_distributed()
            self._owns_process_group = False


def train(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    init_from: str | Path | None = None,
    data_dir: str | Path | None = None,
    reset_optimizer: bool = False,
    stop_after_steps: int | None = None,
    device: str | None = None,
) -> dict:
    """Train (or resume) the run in run_dir; returns a summary dict."""
    trainer = Trainer(cfg, run_dir, init_from=init_from, data_dir=data_dir,
                      reset_optimizer=reset_optimizer, device=device)
    try:
        trainer.setup()
        return trainer.fit(stop_after_steps=stop_after_steps)
    except torch.OutOfMemoryError:
        raise Llm360Error(
            f"out of memory with train.micro_batch_sequences = {cfg.train.micro_batch_sequences}: lower it "
            "(gradient accumulation keeps the global batch), or turn on train.activation_checkpointing. "
            "Nothing was overwritten; the last complete checkpoint is intact."
        ) from None
    finally:
        trainer.close()

