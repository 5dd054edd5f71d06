"""The `train` section: optimizer, schedule, precision, parallelism, logging and fault guards."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

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
    deterministic: bool | Literal["auto"] = True
    """Deterministic algorithms: true (resume and replay bitwise on CPU; slower kernels on GPU), false, or auto (on for CPU, off on GPU, where `llm360 verify --replay` compares within its stated tolerance, max abs diff 1e-5 per tensor)."""
    parallelism: Literal["ddp", "fsdp", "hsdp"] = "ddp"
    """Data parallelism under torchrun: ddp (replicated), fsdp (FSDP2, fully_shard per block, sharded over every data rank) or hsdp (FSDP2 on a 2-D mesh: sharded inside groups of train.shard_group_size consecutive ranks, e.g. a node's GPUs, replicated across groups)."""
    shard_group_size: int | None = Field(None, ge=2)
    """hsdp only: data-parallel ranks that shard the model among themselves (x train.tensor_parallel GPUs must fit in one node); groups of that size replicate it. Null for ddp and fsdp."""
    tensor_parallel: int = Field(1, ge=1)
    """GPUs that split every matrix of a block between them (DTensor, consecutive ranks of one node; they read the same rows); it must divide the heads, the key/value heads and the MLP width. 1: none. With several data-parallel ranks (world / tensor_parallel) the parallelism must be fsdp or hsdp."""
    peak_tflops: float | None = Field(None, gt=0.0)
    """Dense bf16 peak of one device in TFLOP/s, the denominator of MFU; null: known GPUs by name (H100 SXM 989, A100 312, ...), else no MFU."""
    device_memory_gb: float | None = Field(None, gt=0.0)
    """Memory of one device in GB (1e9 bytes) that the start-up memory plan is checked against; null: the CUDA device's own, no check on CPU."""
    checkpoint_shard_mb: float = Field(5000, gt=0)
    """Largest safetensors file of a checkpoint in MB (1e6 bytes), as transformers' max_shard_size: a model above it is split into model-0000k-of-0000n.safetensors with an index (so is the optimizer state), files written by every rank at once."""
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

    @field_validator("deterministic", mode="before")
    @classmethod
    def _check_deterministic(cls, v: object) -> object:
        if isinstance(v, bool) or v == "auto" or (isinstance(v, int) and v in (0, 1)):
            return v
        if isinstance(v, str) and v.lower() in ("true", "false"):
            return v.lower() == "true"
        raise ValueError("expected true, false or auto")

    @model_validator(mode="after")
    def _check_schedule(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr = {self.min_lr:g} is above lr = {self.lr:g}: the cosine decays from lr to min_lr")
        return self

    @model_validator(mode="after")
    def _check_layout(self) -> TrainConfig:
        """What the layout fields must agree on without knowing the world size (the rest:
        :func:`llm360.train.plan.check_layout`, at start-up and in `llm360 plan`)."""
        if self.parallelism == "hsdp" and self.shard_group_size is None:
            raise ValueError(
                "parallelism = hsdp needs shard_group_size, the data-parallel ranks of one shard group "
                "(e.g. the GPUs of a node); or use parallelism = fsdp to shard over every rank"
            )
        if self.parallelism != "hsdp" and self.shard_group_size is not None:
            raise ValueError(
                f"shard_group_size = {self.shard_group_size} applies to parallelism = hsdp only, not "
                f"{self.parallelism}; set parallelism = hsdp, or shard_group_size = null"
            )
        return self

    def deterministic_on(self, device_type: str) -> bool:
        """Whether deterministic algorithms are on for a device type ("cpu", "cuda"): auto is on for CPU only."""
        if self.deterministic == "auto":
            return device_type == "cpu"
        return bool(self.deterministic)
