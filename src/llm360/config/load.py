"""Building validated configs: a preset, then a YAML file, then dotted overrides — for a whole run
(:func:`load_config`) or for one fine-tuning run (:func:`finetune_config`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from llm360.config.base import Section, format_validation_error
from llm360.config.finetune import FINETUNE_KINDS, DpoConfig, FinetuneKind, SftConfig
from llm360.config.overrides import apply_override, deep_merge, parse_override
from llm360.config.presets import FINETUNE_PRESETS, MODEL_PRESETS, PRESETS
from llm360.config.run import RunConfig
from llm360.errors import ConfigError


def preset_dict(name: str) -> dict:
    """The raw dict of a named run preset (a fresh copy); ConfigError for an unknown name."""
    if not isinstance(name, str):
        raise ConfigError(f"preset = {name!r}: expected a preset name, one of {sorted(PRESETS)}")
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; presets are {sorted(PRESETS)}")
    return PRESETS[name]()


def load_config(
    path: str | Path | None = None,
    *,
    preset: str | None = None,
    overrides: list[str] | None = None,
) -> RunConfig:
    """Build a validated RunConfig from a preset, a YAML file and dotted overrides.

    With neither path nor preset, the embedded default is used. A YAML file may name its own
    base with a top-level ``preset:`` key; the file's values override the preset's.
    """
    raw: dict = {}
    file_raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: expected a mapping at the top level, got {type(loaded).__name__}")
        file_raw = loaded
    base = preset or file_raw.get("preset") or (None if file_raw else "embedded")
    if base is not None:
        raw = preset_dict(base)
    raw = deep_merge(raw, file_raw)
    if base is not None:
        raw["preset"] = base
    for item in overrides or []:
        keys, value = parse_override(item)
        apply_override(raw, keys, value)
    return validate_config(_expand_model_preset(raw))


def _expand_model_preset(raw: dict) -> dict:
    model = raw.get("model")
    if not isinstance(model, dict):
        return raw
    name = model.get("name", "tiny")
    if not isinstance(name, str):
        raise ConfigError(f"model.name = {name!r}: expected an architecture name, one of {sorted(MODEL_PRESETS)}")
    if name not in MODEL_PRESETS:
        raise ConfigError(f"model.name = {name!r}: unknown architecture; known are {sorted(MODEL_PRESETS)}")
    out = dict(raw)
    out["model"] = deep_merge(MODEL_PRESETS[name], model)
    return out


def validate_config(raw: dict) -> RunConfig:
    """Validate a raw dict into a RunConfig, with errors that name field, value and meaning."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, RunConfig, raw)) from None



def finetune_config(
    kind: FinetuneKind,
    *,
    base: SftConfig | DpoConfig | dict[str, Any] | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
) -> SftConfig | DpoConfig:
    """The config of one fine-tuning run: defaults (or `base`), a preset, then dotted overrides.

    Overrides may be written relative to the section (``lr=1e-4``) or in full
    (``finetune.sft.lr=1e-4``). Raises ConfigError naming the field and what it means.
    """
    if kind not in FINETUNE_KINDS:
        raise ConfigError(f"unknown fine-tuning kind {kind!r}; use one of {', '.join(FINETUNE_KINDS)}")
    cls = SftConfig if kind == "sft" else DpoConfig
    raw: dict[str, Any] = {}
    if isinstance(base, Section):
        raw = base.model_dump(mode="json")
    elif isinstance(base, dict):
        raw = dict(base)
    if preset is not None:
        if preset not in FINETUNE_PRESETS:
            raise ConfigError(f"unknown fine-tuning preset {preset!r}; presets are {sorted(FINETUNE_PRESETS)}")
        pkind, fields = FINETUNE_PRESETS[preset]
        if pkind != kind:
            raise ConfigError(f"preset {preset!r} is a {pkind} recipe, not {kind}")
        raw.update(fields)
    for item in overrides or []:
        keys, value = parse_override(item)
        if keys[0] == "finetune":
            keys = keys[1:]
        if keys and keys[0] in FINETUNE_KINDS:
            if keys[0] != kind:
                continue  # the other kind's section: not used by this run
            keys = keys[1:]
        if not keys:
            raise ConfigError(
                f"--set {item!r}: name a field of finetune.{kind}, e.g. finetune.{kind}.lr=1e-4"
            )
        apply_override(raw, keys, value)
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        msg = format_validation_error(e, cls, raw)
        raise ConfigError(msg.replace("invalid config:", f"invalid finetune.{kind} config:", 1)) from None
