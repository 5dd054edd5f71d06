"""Fine-tuning data: read local JSONL or Parquet, check each record's shape, normalise for TRL.

Accepted shapes (one per file, decided by the first record):

SFT
  ``messages``: ``[{"role": "user"|"assistant"|"system"|"tool", "content": str}, ...]`` with at least
  one assistant turn; ``conversations`` in the ShareGPT spelling (``from``/``value``, ``human``/``gpt``)
  is accepted too; ``prompt`` + ``completion``: strings or message lists; ``text``: plain text.
DPO
  ``prompt`` + ``chosen`` + ``rejected``: strings or message lists.

With ``format: chat`` (the default) plain-string prompts become one user turn and plain-string
answers one assistant turn, so the chat template renders every record the same way; with
``format: raw`` strings are kept as they are and messages are refused.

Files: ``.jsonl``/``.json`` (one object per line; ``.gz``, ``.zst``, ``.bz2``, ``.xz`` compressed)
and ``.parquet``. Every problem names the file, the line (or Parquet row) and the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm360.errors import DataError
from llm360.utils import sha256_file

ROLES = ("system", "user", "assistant", "tool")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "tool": "tool"}  # fmt: skip
SFT_SHAPES = ("messages", "prompt_completion", "text")
DPO_SHAPES = ("preference",)


@dataclass
class Records:
    """Fine-tuning records, checked and normalised, with where they came from."""

    rows: list[dict[str, Any]]
    """Records in file order, only the fields the trainer reads."""
    shape: str
    """messages, prompt_completion, text (SFT) or preference (DPO)."""
    conversational: bool
    """True when the records are message lists (rendered by the chat template)."""
    path: Path
    """The file they were read from."""
    sha256: str
    """sha256 of that file's bytes."""
    records_in_file: int
    """Records in the file (rows may hold fewer, with max_records)."""
    notes: list[str] = field(default_factory=list)
    """What was changed on the way (e.g. strings wrapped as turns)."""


def load_records(
    path: str | Path, kind: str, *, format: str = "chat", max_records: int | None = None
) -> Records:
    """Read and check fine-tuning records for `kind` (sft or dpo) from a JSONL or Parquet file.

    Raises DataError naming the file, the line/row and the field for: a missing file, a line that is
    not a JSON object, a missing or empty field, a field of the wrong type, a shape that differs from
    the first record's, and an empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"fine-tuning data {path} does not exist (or is not a file)")
    rows: list[dict[str, Any]] = []
    shape: str | None = None
    first_where = ""
    wrapped = 0
    count = 0
    for where, obj in _read_objects(path):
        count += 1
        if max_records is not None and len(rows) >= max_records:
            continue
        rec_shape = _shape_of(obj, kind, path, where)
        if shape is None:
            shape, first_where = rec_shape, where
        elif rec_shape != shape:
            raise DataError(
                f"{path}, {where}: a {_SHAPE_NAMES[rec_shape]} record, but {first_where} was a "
                f"{_SHAPE_NAMES[shape]} record; use one shape per file"
            )
        row = _normalise(obj, rec_shape, format, path, where)
        if format == "chat" and rec_shape in ("prompt_completion", "preference"):
            wrapped += any(isinstance(obj[k], str) for k in row)
        rows.append(row)
    if shape is None:
        raise DataError(f"fine-tuning data {path} holds no records")
    # format=chat turns every prompt/answer into messages; format=raw refuses messages.
    conversational = shape == "messages" or (format == "chat" and shape != "text")
    notes = []
    if wrapped:
        notes.append(
            f"{wrapped} records: plain-string prompts/answers wrapped as user/assistant turns (format=chat)"
        )
    return Records(rows, shape, conversational, path, sha256_file(path), count, notes)


_SHAPE_NAMES = {
    "messages": "`messages`",
    "prompt_completion": "`prompt`/`completion`",
    "text": "`text`",
    "preference": "`prompt`/`chosen`/`rejected`",
}


# ---------------------------------------------------------------------------------- reading


def _read_objects(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) for each record: 'line N' for JSON lines, 'row N' for Parquet (1-based)."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        yield from _read_parquet(path)
        return
    from llm360.data.sources import _iter_lines

    for lineno, line, _size in _iter_lines(path):
        if not line.strip():
            continue
        where = f"line {lineno}"
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            hint = (
                " (is it pretty-printed JSON? one record per line is needed)"
                if lineno == 1 and line.strip() in (b"[", b"{")
                else ""
            )
            raise DataError(f"{path}, {where}: not valid JSON ({e}){hint}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}, {where}: expected a JSON object, got {type(obj).__name__}")
        yield where, obj


def _read_parquet(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        n = 0
        for batch in pf.iter_batches(batch_size=1024):
            for obj in batch.to_pylist():
                n += 1
                yield f"row {n}", obj
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read it as Parquet ({e})") from None


# ---------------------------------------------------------------------------------- checking


def _shape_of(obj: dict[str, Any], kind: str, path: Path, where: str) -> str:
    keys = ", ".join(sorted(obj)) or "none"
    if kind == "dpo":
        missing = [f for f in ("prompt", "chosen", "rejected") if f not in obj]
        if missing:
            hint = ""
            if "messages" in obj or "completion" in obj:
                hint = "; this looks like SFT data: use `llm360 finetune sft`"
            raise DataError(
                f"{path}, {where}: missing field {missing[0]!r} (DPO data needs `prompt`, `chosen` and "
                f"`rejected`; this record has: {keys}){hint}"
            )
        return "preference"
    if "messages" in obj or "conversations" in obj:
        return "messages"
    if "prompt" in obj or "completion" in obj:
        missing = [f for f in ("prompt", "completion") if f not in obj]
        if missing:
            hint = "; this looks like preference data: use `llm360 finetune dpo`" if "chosen" in obj else ""
            raise DataError(
                f"{path}, {where}: missing field {missing[0]!r} (a prompt/completion record needs both; "
                f"this record has: {keys}){hint}"
            )
        return "prompt_completion"
    if "text" in obj:
        return "text"
    raise DataError(
        f"{path}, {where}: missing field 'messages' (SFT data needs `messages`, or `prompt` and `completion`, "
        f"or `text`; this record has: {keys})"
    )


def _messages(
    value: Any, field_name: str, path: Path, where: str, *, sharegpt: bool = False
) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else type(value).__name__
        raise DataError(
            f"{path}, {where}: field {field_name!r} must be a non-empty list of messages, got {got}"
        )
    out = []
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    for i, m in enumerate(value):
        item = f"{field_name}[{i}]"
        if not isinstance(m, dict):
            raise DataError(
                f"{path}, {where}: {item} must be an object with {role_key!r} and {content_key!r}, got {type(m).__name__}"
            )
        for k in (role_key, content_key):
            if k not in m:
                raise DataError(f"{path}, {where}: {item} has no {k!r}")
        role, content = m[role_key], m[content_key]
        if sharegpt:
            role = _SHAREGPT_ROLES.get(role, role)
        if role not in ROLES:
            raise DataError(
                f"{path}, {where}: {item}.{role_key} is {m[role_key]!r}; use one of {', '.join(ROLES)}"
            )
        if not isinstance(content, str):
            raise DataError(
                f"{path}, {where}: {item}.{content_key} must be a string, got {type(content).__name__}"
            )
        out.append({"role": role, "content": content})
    return out


def _text(value: Any, field_name: str, path: Path, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(
            f"{path}, {where}: field {field_name!r} must be a string or a list of messages, got {type(value).__name__}"
        )
    if not value.strip():
        raise DataError(f"{path}, {where}: field {field_name!r} is empty")
    return value


def _turns(
    value: Any, field_name: str, role: str, format: str, path: Path, where: str
) -> str | list[dict[str, str]]:
    """A prompt or answer: messages stay messages; strings become one `role` turn with format=chat."""
    if isinstance(value, list):
        if format == "raw":
            raise DataError(
                f"{path}, {where}: field {field_name!r} is a message list, which needs the chat template; "
                "set format=chat"
            )
        return _messages(value, field_name, path, where)
    text = _text(value, field_name, path, where)
    return [{"role": role, "content": text}] if format == "chat" else text


def _normalise(obj: dict[str, Any], shape: str, format: str, path: Path, where: str) -> dict[str, Any]:
    if shape == "messages":
        if format == "raw":
            raise DataError(f"{path}, {where}: `messages` records need the chat template; set format=chat")
        if "messages" in obj:
            msgs = _messages(obj["messages"], "messages", path, where)
        else:
            msgs = _messages(obj["conversations"], "conversations", path, where, sharegpt=True)
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(
                f"{path}, {where}: the conversation has no assistant turn, so there is nothing to learn"
            )
        return {"messages": msgs}
    if shape == "text":
        return {"text": _text(obj["text"], "text", path, where)}
    if shape == "prompt_completion":
        return {
            "prompt": _turns(obj["prompt"], "prompt", "user", format, path, where),
            "completion": _turns(obj["completion"], "completion", "assistant", format, path, where),
        }
    return {
        "prompt": _turns(obj["prompt"], "prompt", "user", format, path, where),
        "chosen": _turns(obj["chosen"], "chosen", "assistant", format, path, where),
        "rejected": _turns(obj["rejected"], "rejected", "assistant", format, path, where),
    }
