"""The `train` section: optimizer, schedule, precision, parallelism, logging and fault guards."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from llm360.config.base import Section, seed_field


class GuardConfig(Section):
    nonfinite_policy: Literal["skip_step", "rollback_skip_chunk", "rollback_reseed", "stop"] = "skip_step"
    """What to do on a non-finite loss or gradient: skip the step, roll back to the last checkpoint and skip (or reseed) the chunk, or stop."""
    spike_factor: float | None = Field(3.0, gt=1.0)
    """A loss above spike_factor x the running median of the last spike_window losses is a spike (above 1); null disables."""
    spike_window: int = Field(50, ge=2)
    """Steps in the running window used to detect loss spikes."""
    spike_policy: Literal["record", "skip_step", "rollback_skip_chunk", "rollback_reseed", "stop"] = "record"
    """What to do on a loss spike (record only logs the event)."""
    max_rollbacks: int = Field(3, ge=0)
    """Give up (stop) after this many rollbacks in one run."""


class TrainConfig(Section):
    seed: int = seed_field(42)
    """Seed of model init and every RNG the trainer uses."""
    global_batch_sequences: int = Field(8, ge=1)
    """Sequences per optimizer step across all ranks (the paper: 2240)."""
    micro_batch_sequences: int = Field(4, ge=1)
    """Sequences per forward pass on one rank; gradient accumulation is derived from it and the world size."""
    lr: float = Field(3e-4, gt=0)
    """Peak learning rate."""
    min_lr: float = Field(3e-5, ge=0)
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = Field(10, ge=0)
    """Linear warmup steps from 0 to lr."""
    weight_decay: float = Field(0.1, ge=0.0)
    """AdamW weight decay (not applied to norms and biases)."""
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    """AdamW beta1, in [0, 1)."""
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    """AdamW beta2, in [0, 1)."""
    eps: float = Field(1e-8, gt=0.0)
    """AdamW epsilon."""
    grad_clip: float | None = Field(1.0, gt=0.0)
    """Clip the global gradient norm to this value; null disables."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast with fp32 master weights on GPU, fp32 on CPU."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass to save memory."""
    deterministic: bool = True
    """Deterministic algorithms, so resume and replay are bitwise on CPU."""
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    """Data parallelism under torchrun: DDP, or FSDP2 (fully_shard per block) with sharded checkpoints."""
    checkpoint_every_steps: int | None = Field(None, ge=1)
    """Also checkpoint every N steps inside a chunk (resumable, not a release checkpoint); null: only per chunk."""
    max_chunks: int | None = Field(None, ge=1)
    """Stop after this many chunks (null: all)."""
    log_every: int = Field(1, ge=1)
    """Print one summary line every N steps (every step goes to metrics/train.jsonl)."""
    tensorboard: bool = False
    """Also write TensorBoard event files under metrics/tensorboard."""
    wandb: Literal["off", "online", "offline"] = "off"
    """Also log to Weights & Biases."""
    wandb_project: str = "llm360"
    """W&B project name."""
    guards: GuardConfig = Field(default_factory=GuardConfig)
    """Policies for non-finite values and loss spikes."""

    @model_validator(mode="after")
    def _check_schedule(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr = {self.min_lr:g} is above lr = {self.lr:g}: the cosine decays from lr to min_lr")
        return self
