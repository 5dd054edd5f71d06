"""What the trainer knows about its position besides tensors: ``trainer_state.json`` of a checkpoint.

:class:`TrainState` is the part the trainer keeps and updates; a checkpoint's ``trainer_state.json``
holds it plus what the trainer adds at save time (the data cursor, the learning rate, the world
size). :func:`run_identity` says whether a checkpoint belongs to a run: it hashes everything that
determines the run's numbers and leaves out :data:`NON_NUMERIC_TRAIN_FIELDS`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from llm360.config import RunConfig, stable_hash

NON_NUMERIC_TRAIN_FIELDS = frozenset({
    "log_every", "tensorboard", "wandb", "wandb_project", "max_chunks", "checkpoint_every_steps",
    "compile", "activation_checkpointing", "micro_batch_sequences", "guards",
    "shard_group_size", "tensor_parallel", "peak_tflops", "device_memory_gb", "checkpoint_shard_mb",
})  # fmt: skip
"""Train-config fields that do not change the numbers a run produces: they may differ on resume (the
layout's degrees change only the order of reductions, as the world size does)."""


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
        """The state of a trainer_state.json dict; fields the trainer adds at save time are ignored."""
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def run_identity(cfg: RunConfig, data_hash: str, model_cfg: dict) -> str:
    """Hash of everything that determines the numbers of a run (not logging or speed knobs).

    ``data_hash`` is the prepared data's config hash, ``model_cfg`` the resolved model config
    (vocabulary and sequence length filled in) as JSON.
    """
    train = {k: v for k, v in cfg.train.model_dump(mode="json").items() if k not in NON_NUMERIC_TRAIN_FIELDS}
    return stable_hash({"data": data_hash, "model": model_cfg, "train": train})
