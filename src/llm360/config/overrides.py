"""Dotted overrides (``--set a.b.c=value``) and the merge of a config file over a preset.

List items can be addressed by index or, where they have a ``name`` (sources, stages) or
``source`` (mix entries), by that name: ``--set data.sources.code.paths=[a.jsonl]``.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from llm360.errors import ConfigError


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into a path and a YAML-parsed value; ConfigError when it is not KEY=VALUE
    or the value is not valid YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set data.seq_len=512")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: value is not valid YAML: {e}") from None
    return key.split("."), value


def apply_override(raw: dict, path: list[str], value: Any) -> None:
    """Set raw[path] = value in place, creating missing sections; list items by index or by their
    `name` / `source`. ConfigError names the override when a step of the path does not exist."""
    cur: Any = raw
    dotted = ".".join(path)
    for i, p in enumerate(path):
        last = i == len(path) - 1
        if isinstance(cur, list):
            idx = _list_index(cur, p, dotted)
            if last:
                cur[idx] = value
                return
            cur = cur[idx]
            continue
        if not isinstance(cur, dict):
            raise ConfigError(f"--set {dotted}: '{'.'.join(path[:i])}' is not a section or list")
        if last:
            cur[p] = value
            return
        if p not in cur or cur[p] is None:
            cur[p] = {}
        cur = cur[p]


def _list_index(items: list, key: str, dotted: str) -> int:
    if key.lstrip("-").isdigit():
        idx = int(key)
        if not -len(items) <= idx < len(items):
            raise ConfigError(f"--set {dotted}: index {idx} out of range (list has {len(items)} items)")
        return idx
    for j, item in enumerate(items):
        if isinstance(item, dict) and key in (item.get("name"), item.get("source")):
            return j
    names = [it.get("name") or it.get("source") for it in items if isinstance(it, dict)]
    raise ConfigError(f"--set {dotted}: no list item named '{key}' (have {names})")


def deep_merge(base: dict, over: dict) -> dict:
    """A copy of base with over merged in: nested dicts are merged key by key, anything else
    (lists included) in over replaces what base has. Neither argument is changed."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out
