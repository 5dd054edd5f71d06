"""The optimizer state of a checkpoint, stored by parameter name (``optimizer.safetensors`` + ``optimizer.json``).

A torch optimizer's ``state_dict`` numbers its parameters in the order the optimizer holds them,
which changes with the parallel layout, the wrapping and the code version. A checkpoint keys them
by the parameter's name in the model instead (:func:`param_name_map`), so the state loads into an
optimizer over the same parameters in any order:

- ``optimizer.safetensors``: every tensor state, keyed ``"<state>/<parameter name>"``, e.g.
  ``exp_avg/model.layers.0.self_attn.q_proj.weight``, ``exp_avg_sq/...``, ``step/...``;
- ``optimizer.json``: the optimizer's class, its param groups (hyperparameters + parameter names)
  and any non-tensor state.

:func:`optimizer_payload` makes both from a live optimizer; :func:`optimizer_state_dict` turns
them back into a ``state_dict`` for *this* optimizer's parameter order, collecting every mismatch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

FORMAT = "llm360-optimizer"
VERSION = 1
# Param-group keys that describe how the optimizer runs on this machine, not the training state:
# they are kept from the live optimizer on load.
_IMPL_KEYS = frozenset({"foreach", "fused", "capturable", "differentiable"})


def param_name_map(model: nn.Module) -> dict[int, str]:
    """``id(parameter) -> name`` for every parameter of model (tied ones under their first name).

    Wrapper prefixes (``module.`` from DDP, ``_orig_mod.`` from torch.compile) are dropped, so the
    names equal the unwrapped model's state_dict keys.
    """
    out: dict[int, str] = {}
    for name, p in model.named_parameters():
        while True:
            for prefix in ("module.", "_orig_mod."):
                if name.startswith(prefix):
                    name = name[len(prefix) :]
                    break
            else:
                break
        out[id(p)] = name
    return out


def names_by_id(param_names: nn.Module | Mapping[Any, str]) -> dict[int, str]:
    """``id(parameter) -> name`` from a model (:func:`param_name_map`) or ``{parameter or id(parameter): name}``."""
    if isinstance(param_names, nn.Module):
        return param_name_map(param_names)
    return {k if isinstance(k, int) else id(k): v for k, v in param_names.items()}



def _hparam_to_json(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.item()
    if isinstance(v, tuple):
        return [_hparam_to_json(x) for x in v]
    return v


def _hparam_from_json(v: Any, current: Any) -> Any:
    if isinstance(current, Tensor):
        return torch.tensor(v, dtype=current.dtype, device=current.device)
    if isinstance(current, tuple) and isinstance(v, list):
        return tuple(v)
    return v


def optimizer_payload(
    optimizer: torch.optim.Optimizer, names: Mapping[int, str]
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors for ``optimizer.safetensors``, the JSON object for ``optimizer.json``) of an optimizer.

    ``names``: ``id(parameter) -> name`` (:func:`names_by_id`). Raises ValueError when a parameter
    the optimizer holds has no name, or two have the same one.
    """
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    groups: list[dict[str, Any]] = []
    unnamed = 0
    seen: set[str] = set()
    for g in optimizer.param_groups:
        gnames: list[str] = []
        for p in g["params"]:
            name = names.get(id(p))
            if name is None:
                unnamed += 1
                continue
            if name in seen:
                raise ValueError(f"parameter name {name!r} is used for two optimizer parameters")
            seen.add(name)
            gnames.append(name)
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, Tensor):
                    tensors[f"{key}/{name}"] = value
                else:
                    scalars.setdefault(name, {})[key] = value
        hp = {k: _hparam_to_json(v) for k, v in g.items() if k != "params"}
        groups.append({"hyperparameters": hp, "params": gnames})
    if unnamed:
        raise ValueError(
            f"{unnamed} optimizer parameter(s) have no name in param_names; pass the model itself "
            "(param_names=model) or a dict covering every parameter the optimizer holds"
        )
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "optimizer": type(optimizer).__name__,
        "param_groups": groups,
        "scalar_state": scalars,
    }
    return tensors, meta


def name_mismatch(what: str, a_label: str, a: list[str], b_label: str, b: list[str]) -> str:
    """'what: a_label: x, y; b_label: z' for two lists of names, either possibly empty."""
    parts = [f"{label}: {_some(names)}" for label, names in ((a_label, a), (b_label, b)) if names]
    return f"{what}: " + "; ".join(parts)


def optimizer_state_dict(
    optimizer: torch.optim.Optimizer,
    names: Mapping[int, str],
    tensors: Mapping[str, Tensor],
    meta: Mapping[str, Any],
    strict: bool,
    problems: list[str],
) -> dict[str, Any]:
    """A torch optimizer state_dict for *this* optimizer's parameter order, built by parameter name.

    ``tensors`` and ``meta`` are what :func:`optimizer_payload` made (read back); every mismatch
    (another optimizer class, names or shapes that differ, groups that do not correspond) is
    appended to ``problems`` rather than raised, so the caller reports them all at once. With
    ``strict=False`` names present on one side only are logged, not problems. A meta of another
    structure raises KeyError/TypeError/ValueError.
    """
    if meta.get("optimizer") != type(optimizer).__name__:
        problems.append(
            f"optimizer state is for {meta.get('optimizer')}, the optimizer is {type(optimizer).__name__}"
        )
    by_name: dict[str, dict[str, Any]] = {}
    for k, t in tensors.items():
        key, _, name = k.partition("/")
        by_name.setdefault(name, {})[key] = t
    for name, vals in meta.get("scalar_state", {}).items():
        by_name.setdefault(name, {}).update(vals)
    saved_groups = meta["param_groups"]
    saved_sets = [frozenset(g["params"]) for g in saved_groups]
    saved_all = frozenset().union(*saved_sets) if saved_sets else frozenset()
    used: set[int] = set()
    state: dict[int, dict[str, Any]] = {}
    groups: list[dict[str, Any]] = []
    ours: set[str] = set()
    index = 0
    for gi, g in enumerate(optimizer.param_groups):
        gnames = [names.get(id(p)) for p in g["params"]]
        if any(n is None for n in gnames):
            problems.append(
                f"{sum(n is None for n in gnames)} optimizer parameter(s) in group {gi} have no name; "
                "pass param_names covering every parameter"
            )
            continue
        gset = frozenset(n for n in gnames if n is not None)
        ours |= gset
        match = [j for j, s in enumerate(saved_sets) if s == gset and j not in used]
        hp = {k: v for k, v in g.items() if k != "params"}
        if match:
            j = gi if gi in match else match[0]
            used.add(j)
            for k, v in saved_groups[j]["hyperparameters"].items():
                if k not in _IMPL_KEYS:
                    hp[k] = _hparam_from_json(v, g.get(k))
        elif strict:
            problems.append(f"optimizer param group {gi} holds parameters that no saved group holds exactly")
        ids = []
        for p, name in zip(g["params"], gnames, strict=True):
            ids.append(index)
            st = by_name.get(name or "", {})
            for key, value in st.items():
                if isinstance(value, Tensor) and value.ndim > 0 and tuple(value.shape) != tuple(p.shape):
                    problems.append(
                        f"optimizer state {key}/{name} has shape {list(value.shape)}, the parameter {list(p.shape)}"
                    )
            if st:
                state[index] = dict(st)
            index += 1
        groups.append({**hp, "params": ids})
    missing = sorted(saved_all - ours)
    extra = sorted(ours - saved_all)
    if strict and (missing or extra):
        problems.append(name_mismatch("optimizer parameters differ by name", "in the checkpoint only", missing,
                                       "in the optimizer only", extra))
    elif missing or extra:
        logger.warning(
            "optimizer state loaded by name; %d names only in checkpoint, %d only in optimizer",
            len(missing),
            len(extra),
        )
    return {"state": state, "param_groups": groups}


def _some(names: list[str], k: int = 10) -> str:
    shown = ", ".join(names[:k])
    return shown + (f" (+{len(names) - k} more)" if len(names) > k else "")

