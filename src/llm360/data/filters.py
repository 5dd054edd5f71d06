"""Document filters of a mix entry: keep or drop documents by a field of their record.

A filter (:class:`~llm360.config.data.DocumentFilter`) names a field by a dotted key
(``meta.redpajama_set_name`` walks into the object ``meta``; a record that holds the dotted name
as one key is read by that key too), an operator (``in`` keeps the documents whose value is one of
the values, ``not_in`` drops them) and a list of values. A record without the field has the value
``null``, so ``not_in`` keeps it and ``in`` drops it unless ``null`` is listed.

Values compare as JSON values: ``true`` is not ``1`` and ``"1"`` is not ``1``; ``1`` equals ``1.0``.
Lists and objects never equal a listed value.

Which fields a record carries: the whole object of a JSONL line; the named columns of a Parquet
file or saved dataset (the first part of each filter's key); what a source snapshot kept of them.
Text files and the embedded corpus have no record: every field is ``null`` there.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

_MISSING = object()

FilterSpec = tuple[str, str, tuple[Any, ...]]
"""(field, op, values): a filter as the map tasks carry it (plain, picklable, hashable)."""


def field_value(record: Mapping[str, Any] | None, dotted: str) -> Any:
    """The value at a dotted key of a record (None when the record or any step is missing)."""
    if not record:
        return None
    if dotted in record:
        return record[dotted]
    cur: Any = record
    for part in dotted.split("."):
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(part, _MISSING)
        if cur is _MISSING:
            return None
    return cur


def _json_key(value: Any) -> tuple[str, Any]:
    """A hashable key under which JSON-equal values are equal (bools apart from numbers)."""
    if value is None:
        return ("null", None)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float):
        return ("number", value)
    if isinstance(value, str):
        return ("string", value)
    try:
        return ("json", json.dumps(value, sort_keys=True, ensure_ascii=False, default=str))
    except (TypeError, ValueError):
        return ("other", repr(value))


@dataclass(frozen=True)
class CompiledFilter:
    """One filter, ready to test records."""

    field: str
    keep_listed: bool
    """True for ``in`` (keep the listed values), False for ``not_in`` (drop them)."""
    keys: frozenset

    def passes(self, record: Mapping[str, Any] | None) -> bool:
        """Whether the record's document is kept by this filter."""
        listed = _json_key(field_value(record, self.field)) in self.keys
        return listed == self.keep_listed


def compile_filters(specs: Iterable[FilterSpec]) -> tuple[CompiledFilter, ...]:
    """Filters of a mix entry as (field, op, values) triples -> testers."""
    return tuple(CompiledFilter(f, op == "in", frozenset(_json_key(v) for v in vals)) for f, op, vals in specs)


def first_failing(filters: tuple[CompiledFilter, ...], record: Mapping[str, Any] | None) -> str | None:
    """The field of the first filter that drops the record's document, or None when all keep it."""
    for f in filters:
        if not f.passes(record):
            return f.field
    return None


def record_columns(specs: Iterable[FilterSpec]) -> tuple[str, ...]:
    """The top-level fields (columns) the filters read, sorted: what a reader must keep of a record."""
    return tuple(sorted({f.split(".")[0] for f, _, _ in specs} | {f for f, _, _ in specs}))


def as_specs(filters: Iterable[Any]) -> tuple[FilterSpec, ...]:
    """Config filters (:class:`~llm360.config.data.DocumentFilter`) -> (field, op, values) triples."""
    return tuple((f.field, f.op, tuple(f.values)) for f in filters)
