"""`llm360 train`: walk the chunks in order, one complete checkpoint per chunk, exact resume.

One optimizer step trains on one global batch: the rows :class:`~llm360.rundir.data.StepIndex`
assigns to that step, split over ranks, then over micro-batches. The loss is the sum of token
losses divided by the tokens of the whole global batch, so the gradient is the same whatever the
world size, micro-batch size or accumulation. Every logged number is reduced over ranks.

After the last step of chunk ``i`` the state goes into ``checkpoints/ckpt_i``: fp32 weights (a
Hugging Face folder), AdamW state by parameter name, schedule position, RNG states, data cursor
and config. Restarting continues from the latest complete checkpoint; in deterministic mode on
CPU the result is bitwise what an uninterrupted run gives.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import statistics
import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from llm360.config import RunConfig, save_config, stable_hash, to_yaml
from llm360.errors import CheckpointError, ConfigError, Llm360Error
from llm360.log import progress
from llm360.model.hf import hf_metadata_files
from llm360.model.llama import Llama, flops_per_token, resolve_model_config
from llm360.rundir import checkpoint as ckpt
from llm360.rundir.atomic import hold_lock
from llm360.rundir.data import DataStore, StepIndex
from llm360.rundir.layout import RunDir, index_name
from llm360.train.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast_object,
    gather_full_state,
    init_distributed,
    is_sharded,
    load_full_optimizer_state,
    load_full_state,
    load_sharded,
    named_optimizer_state,
    parallelize,
    same_on_every_rank,
    save_sharded,
    sharded_copy_step,
    together,
)
from llm360.train.metrics import MetricsLogger, truncate_jsonl_from_step
from llm360.train.optim import build_optimizer, lr_at, set_lr
from llm360.utils import sha256_file

logger = logging.getLogger(__name__)

# Train-config fields that do not change the numbers a run produces: they may differ on resume.
_NON_NUMERIC_TRAIN_FIELDS = {
    "log_every", "tensorboard", "wandb", "wandb_project", "max_chunks", "checkpoint_every_steps",
    "compile", "activation_checkpointing", "micro_batch_sequences", "guards",
}
INJECT_ENV = "LLM360_INJECT_AT_STEPS"
"""Test hook to exercise the guards: comma-separated global steps whose loss and gradients are made NaN
(``7``) or multiplied by a factor (``7:x20``, a loss spike), once each."""

H100_BF16_PEAK_FLOPS = 989e12


class TrainingStopped(Llm360Error):
    """A guard's policy stopped training; the last complete checkpoint is intact."""


@dataclass
class TrainState:
    """Everything about the trainer's position that is not a tensor (saved as trainer_state.json)."""

    step: int = 0
    """Next global step to run (0-based)."""
    tokens_seen: int = 0
    last_chunk_done: int = -1
    run_id: str = ""
    data_config_hash: str = ""
    skipped_steps: list[int] = field(default_factory=list)
    skipped_chunks: list[int] = field(default_factory=list)
    chunk_reseeds: dict[str, int] = field(default_factory=dict)
    rollbacks: int = 0
    loss_window: list[float] = field(default_factory=list)
    chunk_loss_sum: float = 0.0
    chunk_loss_steps: int = 0
    init_from: dict | None = None
    data_dir: str | None = None
    world_size_history: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> TrainState:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def parse_injections(spec: str) -> dict[int, float | None]:
    """``"4,9:x20"`` -> {4: None (NaN), 9: 20.0 (loss times 20)}; see :data:`INJECT_ENV`."""
    out: dict[int, float | None] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        step, _, factor = item.partition(":x")
        try:
            out[int(step)] = float(factor) if factor else None
        except ValueError:
            raise ConfigError(f"{INJECT_ENV}={spec!r}: {item!r} is not STEP or STEP:xFACTOR") from None
    return out


def run_identity(cfg: RunConfig, data_hash: str, model_cfg: dict) -> str:
    """Hash of everything that determines the numbers of a run (not logging or speed knobs)."""
    train = {k: v for k, v in cfg.train.model_dump(mode="json").items() if k not in _NON_NUMERIC_TRAIN_FIELDS}
    return stable_hash({"data": data_hash, "model": model_cfg, "train": train})


def read_trainer_state(folder: Path) -> dict:
    """trainer_state.json of a checkpoint folder (call after it verified)."""
    import json

    try:
        return json.loads((folder / ckpt.TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder / ckpt.TRAINER_STATE} is unreadable: {e}") from None


def set_determinism(on: bool) -> None:
    torch.use_deterministic_algorithms(on, warn_only=False)
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False


def chunk_row_order(chunk: int, rows: int, reseeds: int, seed: int) -> np.ndarray | None:
    """Row order inside a chunk after `reseeds` reseeds by the guard policy (None: file order)."""
    if reseeds <= 0:
        return None
    return np.random.default_rng([seed, chunk, reseeds]).permutation(rows)


class Trainer:
    """One training run over a prepared data directory. Use :func:`train`."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: str | Path,
        *,
        init_from: str | Path | None = None,
        data_dir: str | Path | None = None,
        reset_optimizer: bool = False,
        device: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.tcfg = cfg.train
        self.rd = RunDir(run_dir)
        self.info: DistInfo = init_distributed(device)
        self.init_from = Path(init_from) if init_from else None
        self.reset_optimizer = reset_optimizer
        self._explicit_data = Path(data_dir) if data_dir else None
        self._injected: set[int] = set()
        self.replay_skip_steps: set[int] = set()
        self.sharded_resume = False
        self._lock: IO[str] | None = None  # the run directory's lock, held by rank 0 while training
        """Steps to skip as the original run's guards did (set by `llm360 verify --replay`)."""
        inject = os.environ.get(INJECT_ENV, "")
        self._inject_steps = parse_injections(inject)

    # ------------------------------------------------------------------ set-up
    def _data_dir(self, saved: TrainState | None) -> Path:
        if self._explicit_data is not None:
            d = self._explicit_data
            return d / "data" if (d / "data" / "manifest.json").is_file() else d
        if saved is not None and saved.data_dir:
            return Path(saved.data_dir)
        return self.rd.data

    def setup(self) -> None:
        tcfg = self.tcfg
        # What a rank reads alone (checkpoints, data) may fail on one rank only: a rank's error is
        # raised on every rank (`together`), and ranks that see different checkpoints stop, rather
        # than wait for each other in a collective or train from different states.
        with together(self.info):
            if self.info.is_main and self.rd.root.is_dir():  # one training per run directory
                self._lock = hold_lock(self.rd.lock, "being trained")
            # names and sizes here; load_checkpoint hashes every file as it reads it
            latest = ckpt.latest_complete_checkpoint(self.rd.checkpoints, verify=False)
            saved = None
            if latest is not None:
                saved = TrainState.from_json(read_trainer_state(latest))
            data_dir = self._data_dir(saved)
            self.store = DataStore(data_dir)
            m = self.store.manifest
            if self._explicit_data is None and (saved is None or not saved.data_dir):
                if m["config_hash"] != self.cfg.data_hash():
                    raise ConfigError(
                        f"the data in {data_dir} was prepared from another data config (hash "
                        f"{m['config_hash'][:12]}, this config {self.cfg.data_hash()[:12]}); train with the "
                        "config the data was prepared with, or prepare again"
                    )
        same_on_every_rank(
            None if latest is None else f"{latest.name} at step {saved.step}", "latest complete checkpoint", self.info
        )
        same_on_every_rank(m["config_hash"], f"prepared data (config hash in {data_dir}/manifest.json)", self.info)
        if self.cfg.model.max_seq_len is not None and self.cfg.model.max_seq_len < self.store.seq_len:
            raise ConfigError(
                f"model.max_seq_len = {self.cfg.model.max_seq_len} is shorter than the data's seq_len "
                f"{self.store.seq_len}"
            )
        if self.cfg.model.vocab_size is not None and self.cfg.model.vocab_size < self.store.vocab_size:
            raise ConfigError(
                f"model.vocab_size = {self.cfg.model.vocab_size} is smaller than the data's vocabulary "
                f"({self.store.vocab_size} ids in {data_dir}/manifest.json)"
            )
        self.mcfg = resolve_model_config(self.cfg.model, self.store.vocab_size, self.store.seq_len)
        self.seq_len = self.store.seq_len
        world = self.info.world_size
        B = tcfg.global_batch_sequences
        if B % world:
            raise ConfigError(
                f"train.global_batch_sequences = {B} does not split over {world} ranks; use a multiple of {world}"
            )
        self.index = StepIndex(self.store.rows_per_chunk, B)
        self.total_steps = self.index.total_steps
        n_chunks = self.store.num_chunks if tcfg.max_chunks is None else min(tcfg.max_chunks, self.store.num_chunks)
        self.stop_step = int(self.index.first_step[n_chunks])
        self.run_id = run_identity(self.cfg, m["config_hash"], self.mcfg.model_dump(mode="json"))

        set_determinism(tcfg.deterministic)
        torch.manual_seed(tcfg.seed)
        self.model = Llama(self.mcfg).to(self.info.device)
        self.optimizer = build_optimizer(self.model, tcfg)
        self.state = TrainState(run_id=self.run_id, data_config_hash=m["config_hash"])
        if self._explicit_data is not None:
            self.state.data_dir = str(data_dir.resolve())

        if latest is not None:
            self.sharded_resume = tcfg.parallelism == "fsdp" and self.info.enabled and self._has_sharded_copy(
                latest.name, saved.step
            )
            same_on_every_rank(self.sharded_resume, f"sharded copy checkpoints/dcp/{latest.name}", self.info)
        with together(self.info):  # no collective inside
            if latest is not None:
                self._resume(latest, saved)
            elif self.init_from is not None:
                self._init_from(self.init_from)
        dropped = 0
        resuming = latest is not None and self.state.step < self.stop_step  # not when already finished
        if resuming and self.info.is_main:
            # steps after the checkpoint will run again: their lines go (before the writer opens the file)
            dropped = truncate_jsonl_from_step(self.rd.metrics / "train.jsonl", self.state.step)
        self.metrics = MetricsLogger(
            self.rd.metrics, tcfg, enabled=self.info.is_main, run_name=self.cfg.name,
            config=self.cfg.model_dump(mode="json"),
        )
        if resuming:
            self.metrics.event("resume", step=self.state.step, checkpoint=latest.name,
                               sharded=self.sharded_resume,
                               world_size=world, metrics_lines_dropped=dropped)
        elif self.init_from is not None:
            self.metrics.event("init_from", step=0, checkpoint=str(self.init_from),
                               optimizer="reset" if self.reset_optimizer else "kept",
                               data=str(data_dir))
        if self.info.is_main:  # the run directory's config is the one training runs with
            save_config(self.cfg, self.rd.config)
        if world not in self.state.world_size_history:
            self.state.world_size_history.append(world)
        named_opt = None
        if tcfg.parallelism == "fsdp" and self.info.enabled:
            named_opt = named_optimizer_state(self.model, self.optimizer)
        self.train_model = parallelize(self.model, tcfg.parallelism, self.info, tcfg.activation_checkpointing)
        if named_opt is not None:  # FSDP2 replaced the parameters by shards: a new optimizer over them
            self.optimizer = build_optimizer(self.model, tcfg)
            if self.sharded_resume:
                load_sharded(self.model, self.optimizer, self._dcp_dir(latest.name))
            else:
                load_full_optimizer_state(self.model, self.optimizer, named_opt)
        if tcfg.compile:
            self.train_model = torch.compile(self.train_model)
        use_bf16 = tcfg.precision == "bf16" or (tcfg.precision == "auto" and self.info.device.type == "cuda")
        self.autocast = (
            (lambda: torch.autocast(self.info.device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
        )
        self.flops_per_token = flops_per_token(self.mcfg, self.seq_len)

    def _resume(self, latest: Path, saved: TrainState) -> None:
        if saved.run_id != self.run_id:
            raise CheckpointError(
                f"{latest} belongs to another run (its data, model or optimizer config differs from this "
                f"config: run id {saved.run_id[:12]} vs {self.run_id[:12]}). Use a new --run-dir, or "
                f"--init-from {latest} to start a new run from it. Compare with {latest / 'config.yaml'}."
            )
        # with a sharded copy the optimizer state comes from it, shard by shard, after fully_shard
        opt = None if self.sharded_resume else self.optimizer
        res = ckpt.load_checkpoint(latest, self.model, opt, strict=opt is not None)
        ckpt.restore_rng(res["rng_state"])
        self.state = saved
        logger.info("resuming from %s at step %d%s", latest, saved.step,
                    " (sharded state from checkpoints/dcp)" if self.sharded_resume else "")

    def _init_from(self, src: Path) -> None:
        if not src.is_dir():
            raise CheckpointError(f"--init-from {src}: no such checkpoint folder")
        opt = None if self.reset_optimizer else self.optimizer
        try:
            ckpt.load_checkpoint(src, self.model, opt)
        except CheckpointError as e:
            hint = "" if opt is None else " (to keep only its weights, add --reset-optimizer)"
            raise CheckpointError(f"cannot initialise from {src}: {e}{hint}") from None
        self.state.init_from = {
            "checkpoint": str(src.resolve()),
            "marker_sha256": sha256_file(src / ckpt.MARKER),
            "optimizer": "reset" if self.reset_optimizer else "kept",
        }
        logger.info("initialised weights%s from %s", "" if self.reset_optimizer else " and optimizer", src)

    # ------------------------------------------------------------------ checkpoints
    @cached_property
    def _extra_files(self) -> dict[str, bytes]:
        """Files every checkpoint of this run carries besides the state (constant for the run)."""
        eos = self.store.manifest.get("eos_id")
        # config.json for transformers, llm360_model.json for what it cannot hold (muP, unfolded here)
        files = {**hf_metadata_files(self.mcfg, eos_token_id=eos), "config.yaml": to_yaml(self.cfg).encode()}
        tok_dir = self.store.dir / "tokenizer"
        if tok_dir.is_dir():
            for f in sorted(tok_dir.iterdir()):
                if f.is_file():
                    files[f.name] = f.read_bytes()
        return files

    def save(self, name: str, *, chunk: int | None) -> Path:
        """Write checkpoints/<name> (rank 0 writes; every rank waits for it)."""
        target = self.rd.checkpoints / name if chunk is not None else self.rd.checkpoints / "steps" / name
        state = self.state.to_json()
        state["checkpoint_chunk"] = chunk
        state["data_cursor"] = self._cursor()
        state["lr"] = lr_at(max(self.state.step - 1, 0), self.tcfg, self.total_steps)
        state["total_steps"] = self.total_steps
        state["global_batch_sequences"] = self.tcfg.global_batch_sequences
        state["world_size"] = self.info.world_size
        if is_sharded(self.model):
            model_state, optimizer, names = gather_full_state(self.model, self.optimizer)
        else:
            model_state, optimizer, names = self.model.state_dict(), self.optimizer, self.model
        with together(self.info):  # every rank waits for it; a failed write stops every rank
            if self.info.is_main:
                t0 = time.perf_counter()
                ckpt.save_checkpoint(
                    target,
                    model_state=model_state,
                    optimizer=optimizer,
                    param_names=names,
                    trainer_state=state,
                    rng_state=ckpt.capture_rng(),
                    extra_files=self._extra_files,
                )
                logger.info("saved %s (%.1fs)", target.relative_to(self.rd.root), time.perf_counter() - t0)
        if is_sharded(self.model) and self.optimizer.state:
            save_sharded(self.model, self.optimizer, self._dcp_dir(target.name), self.state.step, self.info)
        return target

    def _dcp_dir(self, name: str) -> Path:
        """checkpoints/dcp/<name>: the sharded copy of checkpoint <name> (FSDP runs)."""
        return self.rd.checkpoints / "dcp" / name

    def _has_sharded_copy(self, name: str, step: int) -> bool:
        """Whether a complete sharded copy of checkpoint <name>, taken at ``step``, exists."""
        return sharded_copy_step(self._dcp_dir(name)) == step

    def _cursor(self) -> dict:
        if self.state.step >= self.total_steps:
            return {"next_step": self.state.step, "chunk": None, "step_in_chunk": None}
        loc = self.index.locate(self.state.step)
        return {"next_step": self.state.step, "chunk": loc.chunk, "step_in_chunk": loc.step_in_chunk}

    def _rollback(self, chunk: int, reason: str, policy: str) -> None:
        """Restore the state before `chunk` and skip or reseed it."""
        if self.state.rollbacks >= self.tcfg.guards.max_rollbacks:
            self.metrics.event("stop", step=self.state.step, chunk=chunk, reason=f"{reason}; max_rollbacks reached")
            raise TrainingStopped(
                f"{reason} at step {self.state.step} (chunk {index_name(chunk)}), and "
                f"{self.state.rollbacks} rollbacks were already made (train.guards.max_rollbacks)"
            )
        target = self.rd.ckpt_dir(chunk - 1) if chunk > 0 else self.rd.checkpoints / "init"
        rollbacks = self.state.rollbacks + 1
        res, sharded = self._restore(target)
        ckpt.restore_rng(res["rng_state"])
        self.state = TrainState.from_json(res["trainer_state"])
        self.state.rollbacks = rollbacks
        # intra-chunk checkpoints of the abandoned attempt must never be resumed from. Their sharded
        # copies go first: a copy left without its consolidated checkpoint could later pass for the
        # copy of a new checkpoint of the same step whose own copy a kill prevented.
        if self.info.is_main:
            for folder in (self.rd.checkpoints / "dcp", self.rd.checkpoints / "steps"):
                for stale in sorted(folder.glob("step_*")):
                    if int(stale.name.split("_")[1]) > self.state.step:
                        ckpt.remove_checkpoint(stale)
        barrier(self.info)
        if policy == "rollback_skip_chunk":
            self.state.skipped_chunks.append(chunk)
            self.state.step = int(self.index.first_step[chunk + 1])
            self.metrics.event("rollback_skip_chunk", step=int(self.index.first_step[chunk]), chunk=chunk,
                               reason=reason, restored=target.name, sharded=sharded)
            self.state.last_chunk_done = chunk
            self.save(f"ckpt_{index_name(chunk)}", chunk=chunk)
        else:
            key = str(chunk)
            self.state.chunk_reseeds[key] = self.state.chunk_reseeds.get(key, 0) + 1
            self.metrics.event("rollback_reseed", step=int(self.index.first_step[chunk]), chunk=chunk,
                               reason=reason, restored=target.name, sharded=sharded,
                               reseed=self.state.chunk_reseeds[key])

    def _restore(self, target: Path) -> tuple[dict, bool]:
        """Load checkpoint `target`'s weights and optimizer state into the live model and optimizer.

        Unsharded, the checkpoint loads straight into them. Under FSDP every rank restores its own
        shards in place: from the sharded copy checkpoints/dcp/<name> when one holds the target's
        step (after verifying the consolidated checkpoint, which holds the trainer and RNG state),
        otherwise from the consolidated files, read into a full-size CPU copy of the model and its
        optimizer state and scattered. The consolidated checkpoint is verified (every file hashed)
        either way, before the live state is touched. Returns :func:`~llm360.rundir.checkpoint.load_checkpoint`'s
        dict (trainer and RNG state) and whether the state came from the sharded copy.
        """
        if not is_sharded(self.model):
            with together(self.info):
                res = ckpt.load_checkpoint(target, self.model, self.optimizer)
            return res, False
        # every rank must take the same path (rank 0's): the loads below are collectives
        with together(self.info):
            has_copy = self._has_sharded_copy(target.name, int(read_trainer_state(target).get("step", -1)))
        from_copy = broadcast_object(has_copy, self.info)
        if from_copy:  # verified, then each rank reads its own shards: no full-size copy anywhere
            with together(self.info):
                res = ckpt.load_training_state(target)
            load_sharded(self.model, self.optimizer, self._dcp_dir(target.name))
        else:
            with torch.device("meta"):  # no initialisation: every value is overwritten by the load
                full = Llama(self.mcfg)
            full.to_empty(device="cpu")
            full_opt = build_optimizer(full, self.tcfg)
            with together(self.info):
                res = ckpt.load_checkpoint(target, full, full_opt)
            load_full_state(self.model, self.optimizer, full.state_dict(), named_optimizer_state(full, full_opt))
        logger.info("restored %s in place on every rank (%s)", target.relative_to(self.rd.root),
                    "sharded copy" if from_copy else "consolidated files")
        return res, from_copy

    # ------------------------------------------------------------------ one step
    def _rows(self, step: int) -> np.ndarray:
        loc = self.index.locate(step)
        lo, hi = loc.rank_slice(self.info.rank, self.info.world_size)
        order = chunk_row_order(loc.chunk, self.store.rows_per_chunk[loc.chunk],
                                self.state.chunk_reseeds.get(str(loc.chunk), 0), self.tcfg.seed)
        if order is None:
            return self.store.rows(loc.chunk, lo, hi)
        return np.asarray(self.store.chunk(loc.chunk)[order[lo:hi]], dtype=np.int64)

    def train_step(self, step: int) -> tuple[float, float]:
        """Forward/backward over this rank's rows; returns the global (loss, grad norm) before the update."""
        rows = torch.from_numpy(self._rows(step)).to(self.info.device)
        x_BT, y_BT = rows[:, :-1], rows[:, 1:]
        tokens_global = self.tcfg.global_batch_sequences * self.seq_len
        scale = self.info.world_size / tokens_global  # DDP/FSDP average gradients over ranks
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
        if step in self._inject_steps and step not in self._injected:
            self._injected.add(step)
            factor = self._inject_steps[step]
            if factor is None:  # NaN: one gradient is enough for the non-finite check
                loss_sum.fill_(float("nan"))
                next(p for p in self.model.parameters() if p.grad is not None).grad.fill_(float("nan"))
            else:  # a loss spike: loss and gradients scaled alike
                loss_sum.mul_(factor)
                for p in self.model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(factor)
        loss_global = all_reduce_sum(loss_sum, self.info).item() / tokens_global
        clip = self.tcfg.grad_clip if self.tcfg.grad_clip is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip, foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return loss_global, float(norm)

    # ------------------------------------------------------------------ the loop
    def fit(self, stop_after_steps: int | None = None) -> dict:
        """Train to the end (or max_chunks); returns a summary. stop_after_steps: for tests."""
        if self.state.step == 0 and not (self.rd.checkpoints / "init").exists():
            self.save("init", chunk=-1)
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

    def _guard_policy(self, step: int, chunk: int, loss: float, gnorm: float) -> tuple[str | None, str]:
        """(policy to apply or None, reason) for this step's loss and gradient norm."""
        g = self.tcfg.guards
        if step in self.replay_skip_steps:
            return "skip_step", "skipped in the original run (replayed)"
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            return g.nonfinite_policy, f"non-finite {'loss' if not math.isfinite(loss) else 'gradient'}"
        if g.spike_factor is not None and len(self.state.loss_window) >= min(g.spike_window, 10):
            med = statistics.median(self.state.loss_window)
            if loss > g.spike_factor * med:
                reason = f"loss spike: {loss:.4f} > {g.spike_factor} x median {med:.4f}"
                if g.spike_policy == "record":
                    self.metrics.event("loss_spike", step=step, chunk=chunk, loss=loss, median=med)
                    return None, reason
                return g.spike_policy, reason
        return None, ""

    def _one_step(self, bars: ExitStack) -> None:
        """Run the step at self.state.step with its guards, logging and checkpoints."""
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
        policy, reason = self._guard_policy(step, chunk, loss, gnorm)
        if policy is None:
            set_lr(self.optimizer, lr_at(step, tcfg, self.total_steps))
            self.optimizer.step()
            self.state.loss_window = (self.state.loss_window + [loss])[-tcfg.guards.spike_window :]
            self.state.chunk_loss_sum += loss
            self.state.chunk_loss_steps += 1
        else:
            self.optimizer.zero_grad(set_to_none=True)
            if policy == "stop":
                self.metrics.event("stop", step=step, chunk=chunk, reason=reason, loss=loss, grad_norm=gnorm)
                raise TrainingStopped(
                    f"{reason} at step {step} (chunk {index_name(chunk)}); policy is stop. The last complete "
                    f"checkpoint is intact in {self.rd.checkpoints}"
                )
            if policy != "skip_step":
                self._rollback(chunk, reason, policy)
                self._bar_chunk = None
                return
            self.metrics.event("skip_step", step=step, chunk=chunk, reason=reason, loss=loss, grad_norm=gnorm)
            self.state.skipped_steps.append(step)
        self.state.step += 1
        self.state.tokens_seen += tcfg.global_batch_sequences * self.seq_len
        self._log(step, chunk, loc.step_in_chunk, n_in_chunk, loss, gnorm, time.perf_counter() - t0)
        self._bar.advance(1)
        if loc.step_in_chunk == n_in_chunk - 1:
            self.state.last_chunk_done = chunk
            self.save(f"ckpt_{index_name(chunk)}", chunk=chunk)
            self.state.chunk_loss_sum, self.state.chunk_loss_steps = 0.0, 0
            unused = self.index.unused_rows(chunk)
            if unused:
                self.metrics.event("rows_unused", step=step, chunk=chunk, rows=unused,
                                   reason="fewer than a global batch left at the end of the chunk")
        elif tcfg.checkpoint_every_steps and self.state.step % tcfg.checkpoint_every_steps == 0:
            self.save(f"step_{self.state.step:08d}", chunk=None)

    def _log(self, step: int, chunk: int, k: int, n: int, loss: float, gnorm: float, dt: float) -> None:
        tcfg = self.tcfg
        tokens = tcfg.global_batch_sequences * self.seq_len
        tps = tokens / dt if dt > 0 else 0.0
        rec: dict[str, Any] = {
            "step": step, "chunk": chunk, "step_in_chunk": k, "tokens_seen": self.state.tokens_seen,
            "loss": loss, "grad_norm": gnorm, "lr": lr_at(step, tcfg, self.total_steps),
            "tokens_per_s": tps, "step_time_s": dt, "world_size": self.info.world_size,
            "rollbacks": self.state.rollbacks,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        if self.info.device.type == "cuda":
            rec["mfu"] = tps * self.flops_per_token / (H100_BF16_PEAK_FLOPS * self.info.world_size)
            rec["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
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

