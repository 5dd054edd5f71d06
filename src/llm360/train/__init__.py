"""Training: `train(config, run_dir)` walks the chunks, one complete checkpoint per chunk, exact resume.

The front: :func:`train` (what `llm360 train` runs), :class:`Trainer` (one run, step by step),
:func:`replay_chunk` (re-train one chunk of a run or release, what `llm360 verify --replay` compares)
and :class:`TrainingStopped` (a guard's policy stopped training). One job per module: ``loop`` (the
trainer), ``state`` (trainer_state.json), ``guards`` (decisions about a step), ``faults`` (the
test hook that injects NaNs and spikes), ``checkpointing`` (live state to a checkpoint and back),
``parallel`` (process groups, DDP/FSDP, sharded state), ``optim``, ``metrics``, ``replay`` and
``plan`` (memory per GPU, checkpoint and run time of a layout; `llm360 plan` and the start-up check).
"""

from llm360.train.guards import TrainingStopped
from llm360.train.loop import Trainer, train
from llm360.train.replay import ReplayResult, replay_chunk

__all__ = ["ReplayResult", "Trainer", "TrainingStopped", "replay_chunk", "train"]
