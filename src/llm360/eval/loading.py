"""Loading a checkpoint folder for evaluation: our Llama, its tokenizer, the device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llm360.errors import CheckpointError
from llm360.model.hf import load_hf_folder
from llm360.model.llama import Llama


def resolve_device(device: str | None) -> torch.device:
    """The device to evaluate on: as given, else cuda when available, else cpu."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_llama(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Llama:
    """Our Llama with the weights of a Hugging Face folder (a checkpoint), in eval mode.

    Built on the meta device and filled with the loaded tensors, so no time is spent on a random
    init that would be overwritten. Raises CheckpointError when the folder cannot be loaded.
    """
    cfg, state_dict = load_hf_folder(folder)
    with torch.device("meta"):
        model = Llama(cfg)
    model.load_state_dict(state_dict, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(device=device, dtype=dtype).eval()


def load_tokenizer(folder: str | Path) -> Any:
    """``transformers.AutoTokenizer`` of a folder (a checkpoint or ``data/tokenizer``), offline."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: no tokenizer that transformers can load ({e})") from None
