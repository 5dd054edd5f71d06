"""The documented YAML form of a config: every field written out, each after its docstring as a
comment (the resolved ``config.yaml`` of a run directory and ``llm360 config show``), and the table
of every field (``llm360 config fields``).

Writing the text into a run directory is the caller's part (through the run directory's atomic
writes); this module only makes it.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from llm360.config.base import inner_model, is_list
from llm360.config.run import RunConfig


def to_yaml(cfg: BaseModel) -> str:
    """The resolved config as YAML, every default written out, each field preceded by its doc."""
    lines: list[str] = []
    _emit(cfg, 0, lines)
    return "\n".join(lines) + "\n"


def _scalar(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _emit(model: BaseModel, indent: int, lines: list[str]) -> None:
    pad = " " * indent
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if field.description:
            lines.append(f"{pad}# {field.description}")
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:")
            _emit(value, indent + 2, lines)
        elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
            lines.append(f"{pad}{name}:")
            for item in value:
                sub: list[str] = []
                _emit(item, 0, sub)
                sub = [s for s in sub if not s.lstrip().startswith("#")]
                for j, s in enumerate(sub):
                    prefix = "- " if j == 0 else "  "
                    lines.append(f"{pad}  {prefix}{s}")
        else:
            dumped = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
            if isinstance(dumped, tuple):
                dumped = list(dumped)
            lines.append(f"{pad}{name}: {_scalar(dumped)}")


def field_docs(model: type[BaseModel] | None = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default as YAML, description) of every field of model (default: RunConfig),
    nested sections expanded into dotted keys; lists of sections are one row."""
    model = model or RunConfig
    rows: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        inner = inner_model(field.annotation)
        if inner is not None and not is_list(field.annotation):
            rows.extend(field_docs(inner, key + "."))
            continue
        if field.is_required():
            default = "(required)"
        else:
            value = field.get_default(call_default_factory=True)
            if isinstance(value, BaseModel):
                value = value.model_dump(mode="json")
            elif isinstance(value, list):
                value = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
            default = _scalar(list(value) if isinstance(value, tuple) else value)
        rows.append((key, default, field.description or ""))
    return rows
