"""Built-in fine-tuning sets derived from the embedded corpus, so the embedded default can be fine-tuned.

Nothing is shipped or downloaded: both sets are built at run time from what every Python
installation has, as a pure function of that installation (sorted, no randomness), the same way
the ``docs`` and ``package-docs`` parts of the pretraining corpus are (:mod:`llm360.data.embedded`).

``builtin:instructions`` (SFT, ``messages`` records), for each

- ``pydoc_data`` topic: "Explain the Python topic "for"." -> the section's title and first prose
  paragraph; "What is the title of ..." -> the title;
- installed distribution with a summary: "What is the Python package `x`?" -> ``x: <summary>``;
  with a licence: "Which licence does `x` use?" -> the SPDX expression or the licence classifiers.

``builtin:preferences`` (DPO, ``prompt``/``chosen``/``rejected``): the same questions, the right
answer chosen, and the answer to another question of the same kind rejected (a deterministic
pairing: the item half-way round the sorted list), so the preference is "answer the question that
was asked".

A run writes the set it used into its output folder (``train_data.jsonl``) and records its
sha256 in the lineage, since another installation builds a different set.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

from llm360.errors import DataError

PREFIX = "builtin:"
NAMES: dict[str, str] = {"instructions": "sft", "preferences": "dpo"}
"""Built-in set -> the fine-tuning kind it is shaped for."""

_MAX_ANSWER_CHARS = 400
_UNDERLINE = re.compile(r"^[*=\-~^]{3,}$")


@dataclass(frozen=True, slots=True)
class QA:
    """One question with its answer; `kind` groups items whose answers are interchangeable in form."""

    kind: str
    key: str
    question: str
    answer: str


# ------------------------------------------------------------------------------------- sources


def _topic_items() -> Iterator[QA]:
    from llm360.data.embedded import iter_embedded

    for doc_id, text in iter_embedded("docs"):
        topic = doc_id.removeprefix("pydoc:")
        title, paragraph = _title_and_paragraph(text)
        if not title or not paragraph:
            continue
        yield QA("topic-explain", topic, f'Explain the Python topic "{topic}".', f"{title}. {paragraph}")
        yield QA(
            "topic-title", topic, f'What is the title of the Python reference section on "{topic}"?', title
        )


def _title_and_paragraph(text: str) -> tuple[str, str]:
    """The first heading of a pydoc topic and its first prose paragraph, unwrapped and shortened."""
    lines = text.splitlines()
    title = ""
    for i in range(len(lines) - 1):
        if lines[i].strip() and _UNDERLINE.match(lines[i + 1].strip()):
            title = lines[i].strip()
            break
    paragraph = ""
    for block in re.split(r"\n\s*\n", text):
        block_lines = [ln for ln in block.splitlines() if ln.strip()]
        if not block_lines or any(_UNDERLINE.match(ln.strip()) for ln in block_lines):
            continue  # a heading
        if block_lines[0].startswith((" ", "\t")):
            continue  # grammar, code or a quoted example
        paragraph = " ".join(ln.strip() for ln in block_lines)
        break
    paragraph = _shorten(paragraph)
    if paragraph.endswith(":"):  # it introduced a grammar rule or an example, which is left out
        paragraph = paragraph[:-1] + "."
    return title, paragraph


def _shorten(text: str, limit: int = _MAX_ANSWER_CHARS) -> str:
    """text cut to at most `limit` characters, at the end of a sentence when there is one."""
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) <= limit:
        return text
    cut = text[:limit]
    end = max(cut.rfind(". "), cut.rfind(".\u00a0"))
    return cut[: end + 1] if end > limit // 3 else cut.rsplit(" ", 1)[0] + " ..."


def _package_items() -> Iterator[QA]:
    from llm360.data.embedded import _distributions

    for d in _distributions():
        if d.metadata is None:
            continue
        shown = (d.metadata.get("Name") or d.name).strip()
        summary = _shorten((d.metadata.get("Summary") or "").strip())
        if summary and summary.upper() != "UNKNOWN":
            yield QA(
                "package-summary", d.name, f"What is the Python package `{shown}`?", f"{shown}: {summary}"
            )
        lic = _licence(d.metadata)
        if lic:
            yield QA("package-licence", d.name, f"Which licence does the Python package `{shown}` use?",
                     f"{shown} is distributed under {lic}.")  # fmt: skip


def _licence(metadata) -> str:
    expr = (metadata.get("License-Expression") or "").strip()
    if expr:
        return expr
    names = sorted(
        {
            c.split("::")[-1].strip()
            for c in metadata.get_all("Classifier") or []
            if c.startswith("License ::")
        }
    )
    names = [n for n in names if n and n != "OSI Approved"]
    if names:
        return " and ".join(names)
    field = (metadata.get("License") or "").strip()
    return field if field and len(field) <= 40 and "\n" not in field and field.upper() != "UNKNOWN" else ""


def _items() -> list[QA]:
    items = list(_topic_items()) + list(_package_items())
    if not items:
        raise DataError(
            "the built-in fine-tuning sets are empty: this Python has neither `pydoc_data` topics nor installed "
            "distributions with summaries; pass your own data with --data FILE"
        )
    return items


# --------------------------------------------------------------------------------------- sets


def build_instructions() -> list[dict]:
    """The built-in SFT set: one ``{"messages": [user, assistant]}`` record per question, sorted."""
    return [
        {"messages": [{"role": "user", "content": q.question}, {"role": "assistant", "content": q.answer}]}
        for q in _items()
    ]


def build_preferences() -> list[dict]:
    """The built-in DPO set: ``{"prompt", "chosen", "rejected"}`` records, the rejected answer belonging to another question."""
    by_kind: dict[str, list[QA]] = {}
    for q in _items():
        by_kind.setdefault(q.kind, []).append(q)
    out: list[dict] = []
    for kind in sorted(by_kind):
        group = by_kind[kind]
        n = len(group)
        if n < 2:
            continue
        for i, q in enumerate(group):
            # Half-way round the list: far from i (different topic/package), deterministic, a bijection.
            j = (i + max(1, n // 2)) % n
            other = group[j].answer
            if other == q.answer:
                other = next((g.answer for g in group if g.answer != q.answer), "")
            if not other:
                continue
            out.append({"prompt": q.question, "chosen": q.answer, "rejected": other})
    if not out:
        raise DataError(
            "the built-in preference set is empty on this Python; pass your own data with --data FILE"
        )
    return out


def build(name: str) -> list[dict]:
    """The records of built-in set `name` (instructions or preferences)."""
    if name == "instructions":
        return build_instructions()
    if name == "preferences":
        return build_preferences()
    raise DataError(
        f"unknown built-in data set {PREFIX}{name}; there are {', '.join(PREFIX + n for n in NAMES)}"
    )


def to_jsonl(records: list[dict]) -> bytes:
    """Canonical JSON lines (sorted keys, UTF-8): equal records give equal bytes, hence an equal sha256."""
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
