"""Every random generator's state, as a checkpoint holds it (``rng_state.safetensors`` + ``rng_state.json``).

:func:`capture_rng` reads the global generators a training step may touch (torch CPU, the current
CUDA device, numpy, Python's ``random``) and :func:`restore_rng` sets them again, so a resumed run
draws the same numbers as one that never stopped. On disk, the tensor states go to
``rng_state.safetensors`` and the rest (numpy's and Python's states, plain JSON) to
``rng_state.json``, which also says which key each tensor came from (:func:`rng_payload`,
:func:`rng_from`). Nothing is a pickle.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

FORMAT = "llm360-rng"
VERSION = 1


def capture_rng() -> dict[str, Any]:
    """Every global RNG state the trainer may touch.

    ``{"torch": uint8 tensor, "cuda": uint8 tensor (only once this process has initialised CUDA),
    "numpy": {...}, "python": {...}}``; the numpy and python states are plain JSON-able dicts.
    The CUDA state is the current device's: under torchrun each rank owns one device, and reading
    every device's state would create a CUDA context on each of them.
    """
    np_state = np.random.get_state(legacy=False)
    assert isinstance(np_state, dict)
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": np.asarray(np_state["state"]["key"]).tolist(),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": {"version": version, "internal_state": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(rng_state: Mapping[str, Any]) -> None:
    """Set the global RNGs from a :func:`capture_rng` dict (as returned by :func:`load_checkpoint`).

    Keys that are absent are left alone. The CUDA state goes to the current CUDA device; without
    CUDA it is skipped with a warning.
    """
    if "torch" in rng_state:
        torch.set_rng_state(rng_state["torch"].detach().to("cpu", torch.uint8).contiguous().clone())
    cuda = rng_state.get("cuda")
    if isinstance(cuda, Tensor):
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda.detach().to("cpu", torch.uint8).contiguous().clone())
        else:
            logger.warning("checkpoint has a CUDA RNG state but CUDA is not available; it is not restored")
    if "numpy" in rng_state:
        s = rng_state["numpy"]
        np.random.set_state(
            {
                "bit_generator": s["bit_generator"],
                "state": {"key": np.asarray(s["key"], dtype=np.uint32), "pos": int(s["pos"])},
                "has_gauss": int(s["has_gauss"]),
                "gauss": float(s["gauss"]),
            }
        )
    if "python" in rng_state:
        s = rng_state["python"]
        random.setstate((s["version"], tuple(s["internal_state"]), s["gauss_next"]))


def rng_payload(rng_state: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors for ``rng_state.safetensors``, the JSON object for ``rng_state.json``) of a capture_rng-like dict.

    A value is stored as a tensor, a list of tensors, or (anything else) as JSON; keys must not
    contain '/' (ValueError).
    """
    tensors: dict[str, Tensor] = {}
    layout: dict[str, Any] = {}
    values: dict[str, Any] = {}
    for key, v in rng_state.items():
        if "/" in key:
            raise ValueError(f"rng_state key {key!r} must not contain '/'")
        if isinstance(v, Tensor):
            tensors[key] = v
            layout[key] = "tensor"
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, Tensor) for x in v):
            for i, x in enumerate(v):
                tensors[f"{key}/{i}"] = x
            layout[key] = {"tensor_list": len(v)}
        else:
            values[key] = v
    meta = {"format": FORMAT, "version": VERSION, "tensors": layout, "values": values}
    return tensors, meta


def rng_from(tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    """The dict :func:`rng_payload` was given, rebuilt from its two parts (tensors copied out of the buffer).

    Raises KeyError/TypeError/ValueError when meta does not have rng_payload's structure.
    """
    out: dict[str, Any] = dict(meta["values"])
    for key, kind in meta["tensors"].items():
        if kind == "tensor":
            out[key] = tensors[key].clone()
        else:
            out[key] = [tensors[f"{key}/{i}"].clone() for i in range(int(kind["tensor_list"]))]
    return out

