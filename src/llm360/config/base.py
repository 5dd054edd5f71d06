"""What every config section shares: the `Section` base, the config hash, field ranges and field-doc lookups.

Every numeric field declares its range with pydantic ``Field`` constraints (``ge``, ``gt``, ``lt``,
``le``), NaN and infinities are refused everywhere, and relations between fields are model
validators; a violation becomes one :class:`~llm360.errors.ConfigError` through
:func:`format_validation_error`, before any stage does work. The lookups walk a section's schema by
a dotted location (as pydantic reports it in a validation error) to find a field's docstring, so an
error for a bad value can say what the field means.
"""

from __future__ import annotations

import hashlib
import json
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, field docstrings are descriptions, and no
    float field takes NaN or an infinity."""

    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, validate_assignment=True, allow_inf_nan=False
    )


SEED_MAX = 2**32 - 1
"""Largest seed: every RNG a seed reaches takes it (numpy's legacy seeding, which transformers and
lm-eval use, stops at 2^32 - 1)."""


def seed_field(default: int) -> Any:
    """A seed field: an integer in [0, SEED_MAX]."""
    return Field(default, ge=0, le=SEED_MAX)


def stable_hash(obj: Any) -> str:
    """sha256 hex of the canonical JSON encoding of obj (sorted keys, no spaces, ASCII).

    Raises TypeError when obj holds something JSON cannot encode.
    """
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def format_validation_error(err: ValidationError, root: type[BaseModel], raw: dict) -> str:
    """One message for a failed validation of ``raw`` against ``root``: every problem on its own
    line with the dotted field, the value given, what is wrong and the field's docstring."""
    lines = ["invalid config:"]
    for e in err.errors():
        loc = list(e["loc"])
        dotted = ".".join(str(p) for p in loc)
        value = _lookup(raw, loc)
        doc = field_doc(root, loc)
        # a whole section (a check between its fields failed) is not repeated: the message names the fields
        section = isinstance(value, dict) and e["type"] == "value_error"
        got = f" = {_short_repr(value)}" if value is not _MISSING and not section else ""
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `llm360 config show` lists every field)"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        line = f"  {dotted}{got}: {msg}" if dotted else f"  {msg}"
        if doc:
            line += f"\n      ({doc})"
        lines.append(line)
    return "\n".join(lines)


_MISSING = object()


def _short_repr(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + " …"


def _lookup(raw: Any, loc: list) -> Any:
    cur = raw
    for p in loc:
        if isinstance(cur, dict) and p in cur:
            cur = cur[p]
        elif isinstance(cur, list) and isinstance(p, int) and p < len(cur):
            cur = cur[p]
        else:
            return _MISSING
    return cur


def field_doc(root: type[BaseModel], loc: list) -> str | None:
    """The docstring of the field at loc (names and list indices), walking nested models and lists;
    None when loc names no field."""
    model: Any = root
    doc = None
    for p in loc:
        if isinstance(p, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return doc
        field = model.model_fields.get(str(p))
        if field is None:
            return None
        doc = field.description
        model = inner_model(field.annotation)
    return doc


def inner_model(annotation: Any) -> Any:
    """The model class inside a field's annotation (``X``, ``X | None``, ``list[X]``), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        inner = inner_model(arg)
        if inner is not None:
            return inner
    return None


def is_list(annotation: Any) -> bool:
    """Whether a field's annotation is a list (possibly inside an optional)."""
    return typing.get_origin(annotation) is list or any(
        typing.get_origin(a) is list for a in typing.get_args(annotation)
    )
