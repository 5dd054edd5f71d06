"""How the ``demo`` task data shipped in ``llm360/eval/tasks/data/`` was made.

The demo tasks are written for the embedded default corpus (standard-library code, pydoc topics,
licence texts), so a model trained on ``llm360 run`` with no config is evaluated on text of the
kind it saw. The JSONL files are generated once and shipped (a task must not change with the
Python it runs on); this module is the recipe, kept so anyone can see and redo it::

    python -m llm360.eval.demo            # rewrites src/llm360/eval/tasks/data/*.jsonl

Three tasks, 40 examples each, all drawn with a fixed seed:

* ``llm360_demo_licence_mc`` -- multiple choice: a 30-word excerpt of a licence text, which of
  MIT, BSD, Apache 2.0 or PSF is it from.
* ``llm360_demo_next_line_mc`` -- multiple choice: three lines of stdlib code or pydoc text, which
  of four lines comes next (the distractors are lines of other documents of the same kind).
* ``llm360_demo_complete_line`` -- generative, exact match: the start of a line that recurs across
  many licence texts or stdlib modules (the corpus' natural duplicates), complete the line.

These examples come from the training corpus on purpose: they measure what the model learned and
memorized from it, not generalisation. Do not read them as benchmark scores.
"""

from __future__ import annotations

import collections
import json
import random
import re
from collections.abc import Iterable
from pathlib import Path

TASKS_DIR = Path(__file__).parent / "tasks"
"""The folder of llm360's lm-eval task YAML files (pass it to ``TaskManager(include_path=...)``)."""
DATA_DIR = TASKS_DIR / "data"
SEED = 360
EXAMPLES = 40

LICENCE_CHOICES = ["MIT License", "BSD License", "Apache License 2.0", "Python Software Foundation License"]


def _licence_kind(text: str) -> int | None:
    head = text[:4000]
    if "Apache License" in head and "Version 2.0" in head:
        return 2
    if "Permission is hereby granted, free of charge" in head:
        return 0
    if "Redistribution and use in source and binary forms" in head:
        return 1
    if "PYTHON SOFTWARE FOUNDATION LICENSE" in text:
        return 3
    return None


def licence_mc(licences: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    """Excerpts of licence texts, labelled with the licence they come from."""
    by_kind: dict[int, list[tuple[str, str]]] = collections.defaultdict(list)
    for doc_id, text in licences:
        kind = _licence_kind(text)
        if kind is not None:
            by_kind[kind].append((doc_id, text))
    out: list[dict] = []
    per_kind = EXAMPLES // len(LICENCE_CHOICES)
    for kind in range(len(LICENCE_CHOICES)):
        docs = by_kind[kind]
        if not docs:
            raise RuntimeError(f"no {LICENCE_CHOICES[kind]} text in this installation")
        seen: set[str] = set()
        tries = 0
        while sum(1 for e in out if e["label"] == kind) < per_kind and tries < 1000:
            tries += 1
            doc_id, text = docs[rng.randrange(len(docs))]
            words = text.split()
            if len(words) < 60:
                continue
            start = rng.randrange(10, len(words) - 30)
            excerpt = " ".join(words[start : start + 30])
            if excerpt in seen:
                continue
            seen.add(excerpt)
            out.append({"text": excerpt, "choices": LICENCE_CHOICES, "label": kind, "source_doc": doc_id})
    rng.shuffle(out)
    return [{"id": i, **e} for i, e in enumerate(out)]


def _lines(text: str) -> list[str]:
    return [ln.rstrip() for ln in text.splitlines() if ln.strip()]


def next_line_mc(code: list[tuple[str, str]], docs: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    """Three lines of context, the true next line and three lines of other documents."""
    out: list[dict] = []
    code = [c for c in code if "/encodings/" not in c[0]]  # generated codec tables, not code
    for part, items in (("code", code), ("docs", docs)):
        pool = [(doc_id, ln) for doc_id, text in items for ln in _lines(text) if 15 <= len(ln.strip()) <= 90]
        made = 0
        tries = 0
        while made < EXAMPLES // 2 and tries < 5000:
            tries += 1
            doc_id, text = items[rng.randrange(len(items))]
            lines = _lines(text)
            if len(lines) < 8:
                continue
            i = rng.randrange(3, len(lines))
            context, true = lines[i - 3 : i], lines[i]
            if not 15 <= len(true.strip()) <= 90 or any(len(c) > 100 for c in context):
                continue
            distractors: list[str] = []
            while len(distractors) < 3:
                other_id, cand = pool[rng.randrange(len(pool))]
                if other_id != doc_id and cand != true and cand not in distractors and cand not in context:
                    distractors.append(cand)
            choices = [true, *distractors]
            rng.shuffle(choices)
            out.append({
                "context": "\n".join(context) + "\n", "choices": choices, "label": choices.index(true),
                "part": part, "source_doc": doc_id,
            })  # fmt: skip
            made += 1
    rng.shuffle(out)
    return [{"id": i, **e} for i, e in enumerate(out)]


def _frequent_lines(items: Iterable[tuple[str, str]], min_len: int, max_len: int) -> list[tuple[int, str, str, str]]:
    """(documents it occurs in, line, previous line, first document) for every distinct line."""
    count: collections.Counter[str] = collections.Counter()
    first: dict[str, tuple[str, str]] = {}
    for doc_id, text in items:
        lines = _lines(text)
        seen: set[str] = set()
        for j, ln in enumerate(lines):
            if min_len <= len(ln.strip()) <= max_len and ln not in seen and len(ln.split()) >= 4:
                seen.add(ln)
                count[ln] += 1
                first.setdefault(ln, (lines[j - 1] if j else "", doc_id))
    return sorted(((n, ln, *first[ln]) for ln, n in count.items()), key=lambda t: (-t[0], t[1]))


def complete_line(licences: list[tuple[str, str]], code: list[tuple[str, str]]) -> list[dict]:
    """Lines that recur in many documents, split after about half their words."""
    kind_of = {doc_id: _licence_kind(text) for doc_id, text in licences}
    picked: list[tuple[int, str, str, str]] = []
    per_kind: collections.Counter[int | None] = collections.Counter()
    for t in _frequent_lines(licences, 30, 90):
        kind = kind_of[t[3]]
        if t[0] >= 10 and per_kind[kind] < 10 and len(picked) < 28:  # at most 10 lines of one licence
            per_kind[kind] += 1
            picked.append(t)
    # stdlib: skip the generated codec tables of encodings/, which would fill every slot
    stdlib = [t for t in _frequent_lines([c for c in code if "/encodings/" not in c[0]], 25, 90) if t[0] >= 4]
    picked += stdlib[: EXAMPLES - len(picked)]
    out = []
    for i, (n, line, prev, doc_id) in enumerate(picked):
        m = list(re.finditer(r"\S+", line))
        cut = m[max(2, len(m) // 2) - 1].end()
        prompt = (prev + "\n" if prev else "") + line[:cut]
        out.append({"id": i, "prompt": prompt, "target": line[cut:], "documents": n, "source_doc": doc_id})
    return out


def build(out_dir: Path = DATA_DIR) -> dict[str, int]:
    """Write the three demo JSONL files into out_dir; returns examples per file."""
    from llm360.data.embedded import iter_embedded

    licences = list(iter_embedded("licenses"))
    code = list(iter_embedded("code"))
    docs = list(iter_embedded("docs"))
    files = {
        "licence_mc.jsonl": licence_mc(licences, random.Random(SEED)),
        "next_line_mc.jsonl": next_line_mc(code, docs, random.Random(SEED + 1)),
        "complete_line.jsonl": complete_line(licences, code),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
        (out_dir / name).write_text(text, encoding="utf-8")
    return {name: len(rows) for name, rows in files.items()}


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name, n in build().items():
        logging.getLogger("llm360.eval.demo").info("wrote %d examples to %s", n, DATA_DIR / name)
