"""Fine-tuning of pretrained checkpoints with TRL: SFT (AmberChat's recipe) and DPO (AmberSafe's).

Front door: :func:`finetune` (``llm360 finetune sft|dpo``), or :func:`sft` / :func:`dpo`::

    from llm360.finetune import sft, dpo
    sft("runs/demo", "ckpt_005", "builtin:instructions")               # -> runs/demo/finetune/sft-ckpt_005
    dpo("runs/demo", "sft-ckpt_005", "builtin:preferences")             # DPO on top of the SFT model

Modules: :mod:`~llm360.finetune.records` (reading and checking JSONL/Parquet data),
:mod:`~llm360.finetune.chat` (the plain-text chat template), :mod:`~llm360.finetune.builtin`
(instruction and preference sets built from the embedded corpus), :mod:`~llm360.finetune.trainer`
(TRL's trainers built from the config, offline and quiet), :mod:`~llm360.finetune.run` (the run: inputs,
training, the output folder with its lineage). The ``finetune`` config section is
:mod:`llm360.config.finetune`, its presets are in :mod:`llm360.config.presets`.
"""

from typing import Any

from llm360.config import FINETUNE_PRESETS as PRESETS
from llm360.config import DpoConfig, FinetuneConfig, SftConfig, finetune_config

_RUN = {"FinetuneResult", "dpo", "finetune", "resolve_base", "sft"}


def __getattr__(name: str) -> Any:
    """The training entry points load torch and TRL on first use only (config readers need neither)."""
    if name in _RUN:
        from llm360.finetune import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PRESETS",
    "DpoConfig",
    "FinetuneConfig",
    "FinetuneResult",
    "SftConfig",
    "dpo",
    "finetune",
    "finetune_config",
    "resolve_base",
    "sft",
]
