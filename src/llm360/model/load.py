"""Loading our model: a device by name, a checkpoint or Hugging Face folder into a Llama, its tokenizer.

Every stage that runs a saved model (eval, analysis, finetune, train) resolves its device with
:func:`resolve_device` and loads weights with :func:`load_model`, so a device name means the same
thing, and fails with the same message, everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llm360.errors import CheckpointError, ConfigError
from llm360.model.hf import load_hf_folder
from llm360.model.llama import Llama

_INSTEAD = "use cpu, or leave it unset (cuda when available, else cpu)"


def resolve_device(name: str | None, *, where: str = "device") -> torch.device:
    """The torch device ``name`` asks for; None, ``""`` or ``"auto"``: cuda when available, else cpu.

    Takes what ``torch.device`` takes (``cpu``, ``cuda``, ``cuda:1``, ``mps``). ``where`` names the
    setting in error messages (a config field such as ``eval.device``, or a flag). Raises
    ConfigError for a name torch does not know, for cuda (or mps) asked for where torch sees none,
    and for a CUDA index beyond the visible devices.
    """
    if not name or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        message = f"{where} = {name!r} is not a device; use cpu, cuda or cuda:N, or leave it unset"
        raise ConfigError(message) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{where} = {name}, but torch sees no CUDA device here; {_INSTEAD}")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"{where} = {name}, but torch sees {count} CUDA device(s); use cuda:0 to cuda:{count - 1} "
                "(CUDA_VISIBLE_DEVICES chooses which GPUs are visible)"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{where} = {name}, but torch sees no MPS device here; {_INSTEAD}")
    return device


def load_model(
    folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Llama:
    """Our Llama with the weights of a checkpoint or Hugging Face model folder, in eval mode.

    The model is built on the meta device and takes the loaded tensors as its parameters, so no
    time goes to a random init that would be overwritten; each tensor is then cast to ``dtype``
    and moved to ``device`` in one step (a bf16 model on a GPU never holds an fp32 copy there).
    Does not check a checkpoint's marker: callers that need a complete checkpoint verify it
    first. Raises CheckpointError when the folder cannot be loaded (see
    :func:`llm360.model.hf.load_hf_folder`).
    """
    cfg, state_dict = load_hf_folder(folder)
    with torch.device("meta"):
        model = Llama(cfg)
    model.load_state_dict(state_dict, strict=True, assign=True)
    if cfg.tie_embeddings:  # assign gives the two names their own parameters; tie them again
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(device=device, dtype=dtype).eval()


def load_tokenizer(folder: str | Path) -> Any:
    """``transformers.AutoTokenizer`` of a folder (a checkpoint or ``data/tokenizer``), offline.

    Raises CheckpointError when transformers finds no tokenizer there.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: no tokenizer that transformers can load ({e})") from None
