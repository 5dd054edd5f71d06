"""How the ``demo`` task data shipped in ``llm360/eval/tasks/data/`` was made, and each task's chance level.

The demo tasks are written for the embedded default corpus (standard-library code, pydoc topics,
llm360's API docs, licence files), so a model trained on ``llm360 run`` with no config is
evaluated on text of the kind it saw. The JSONL files are generated once and shipped (a task must
not change with the Python it runs on); this module is the recipe, kept so anyone can see and redo
it::

    python -m llm360.eval.demo            # rewrites src/llm360/eval/tasks/data/*.jsonl

Three tasks, drawn with a fixed seed:

* ``llm360_demo_licence_mc`` (40 examples) -- multiple choice: the header of a licence file of a
  project that is *not* in the corpus (a new name, year and holder), which of four openings
  follows it. Right when the model has learned which text goes with which licence header.
* ``llm360_demo_next_line_mc`` (100 examples) -- multiple choice: three lines of stdlib code,
  pydoc text or a licence file, which of four lines comes next (the distractors are lines of
  other documents of the same part).
* ``llm360_demo_complete_line`` (40 examples) -- generative, exact match: the start of a line that
  recurs across many licence files or stdlib modules (the corpus' duplicates), complete the line.

Chance is 1/4 for the two multiple-choice tasks and 0 for exact match; each task's YAML carries it
as ``metadata.chance`` (lm-eval copies it into every result file), so a report can say whether a
score is above chance from the result alone (:func:`chance_level`).

These examples come from the training corpus on purpose: they measure what the model learned and
memorized from it, not generalisation. Do not read them as benchmark scores.
"""

from __future__ import annotations

import collections
import json
import random
import re
import string
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).parent / "tasks"
"""The folder of llm360's lm-eval task YAML files (pass it to ``TaskManager(include_path=...)``)."""
DATA_DIR = TASKS_DIR / "data"
SEED = 360
LICENCE_EXAMPLES = 40
NEXT_LINE_EXAMPLES = {"code": 40, "docs": 30, "licenses": 30}
COMPLETE_LINE_EXAMPLES = 40
CHOICES = 4

# Where the body of each licence text starts: the header before it (title, copyright line) is
# the prompt of licence_mc, the first words from here on are its choices. Licences whose body
# opens like another's (BSD 2-clause like 3-clause) or that have no header (Unlicense) are left out.
LICENCE_BODY_STARTS = {
    "mit": "Permission is hereby granted",
    "bsd-3-clause": "Redistribution and use",
    "isc": "Permission to use, copy",
    "zlib": "This software is provided",
    "psf-2.0": "1. This LICENSE AGREEMENT",
    "apache-2.0": "TERMS AND CONDITIONS",
    "apache-2.0-notice": "Licensed under the Apache",
    "gpl-3.0-notice": "This program is free software",
    "lgpl-2.1-notice": "This library is free software",
    "mpl-2.0-notice": "This Source Code Form",
}
_OPENING_WORDS = 3

# Names for the projects of licence_mc's headers: none of them occurs in the corpus' licence list.
_NEW_PROJECT_PARTS = (
    ["acorn", "birch", "cobalt", "dune", "fjord", "garnet", "heron", "lichen", "mica", "tundra"],
    ["bridge", "compass", "ledger", "lantern", "mosaic", "paddle", "quarry", "signal"],
)
_NEW_PEOPLE = (
    ["Alma", "Basil", "Cleo", "Dario", "Esme", "Felix", "Greta", "Hugo", "Ilse", "Jasper"],
    ["Arkwright", "Bellamy", "Corrigan", "Delacroix", "Ellsworth", "Fairbanks", "Galloway", "Hartigan"],
)


def chance_level(result: Mapping[str, Any]) -> float | None:
    """The chance score of an lm-eval result file's primary metric, from the task's ``metadata.chance``.

    ``result`` is a parsed ``eval/<checkpoint>/<task>.json``; None when the task does not declare
    its chance level (lm-eval's own tasks do not).
    """
    details = result.get("details")
    configs = details.get("configs") if isinstance(details, Mapping) else None
    cfg = configs.get(result.get("task")) if isinstance(configs, Mapping) else None
    meta = cfg.get("metadata") if isinstance(cfg, Mapping) else None
    chance = meta.get("chance") if isinstance(meta, Mapping) else None
    return float(chance) if isinstance(chance, (int, float)) else None


# --------------------------------------------------------------------------------- licence_mc


def _split_licence(template: str, kind: str) -> tuple[str, str]:
    """(header, opening): the text before the licence's body, and the body's first words (as spaced there).

    Few words, so that an answer fits the short context of the tiny models the tests evaluate.
    """
    at = template.index(LICENCE_BODY_STARTS[kind])
    words = list(re.finditer(r"\S+", template[at:]))
    return template[:at], template[at : at + words[_OPENING_WORDS - 1].end()]


def licence_mc(templates: Mapping[str, str], rng: random.Random) -> list[dict]:
    """Headers of licence files of new projects, with the true opening of the licence and three others."""
    kinds = sorted(LICENCE_BODY_STARTS)
    split = {k: _split_licence(templates[k], k) for k in kinds}
    out: list[dict] = []
    for i in range(LICENCE_EXAMPLES):
        kind = kinds[i % len(kinds)]
        project = (
            rng.choice(_NEW_PROJECT_PARTS[0]) + rng.choice(["-", "_", ""]) + rng.choice(_NEW_PROJECT_PARTS[1])
        )
        holder = f"{rng.choice(_NEW_PEOPLE[0])} {rng.choice(_NEW_PEOPLE[1])}"
        header = string.Template(split[kind][0]).substitute(project=project, year=str(rng.randrange(2008, 2026)),
                                                            holder=holder)  # fmt: skip
        others = rng.sample([k for k in kinds if k != kind], CHOICES - 1)
        choices = [split[k][1] for k in [kind, *others]]
        rng.shuffle(choices)
        out.append(
            {"header": header, "choices": choices, "label": choices.index(split[kind][1]), "license": kind}
        )
    rng.shuffle(out)
    return [{"id": i, **e} for i, e in enumerate(out)]


# ------------------------------------------------------------------------------- next_line_mc


def _lines(text: str) -> list[str]:
    return [ln.rstrip() for ln in text.splitlines() if ln.strip()]


def next_line_mc(parts: Mapping[str, list[tuple[str, str]]], rng: random.Random) -> list[dict]:
    """Three lines of context, the true next line and three lines of other documents of the same part."""
    out: list[dict] = []
    for part, wanted in NEXT_LINE_EXAMPLES.items():
        items = parts[part]
        if part == "code":
            items = [c for c in items if "/encodings/" not in c[0]]  # generated codec tables, not code
        pool = [(doc_id, ln) for doc_id, text in items for ln in _lines(text) if 15 <= len(ln.strip()) <= 90]
        made = 0
        tries = 0
        while made < wanted and tries < 5000:
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
            while len(distractors) < CHOICES - 1:
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


# ------------------------------------------------------------------------------ complete_line


def _frequent_lines(
    items: Iterable[tuple[str, str]], min_len: int, max_len: int
) -> list[tuple[int, str, str, str]]:
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


def complete_line(
    licences: list[tuple[str, str]], kind_of: Mapping[str, str], code: list[tuple[str, str]]
) -> list[dict]:
    """Lines that recur in many documents, split after about half their words.

    ``kind_of`` maps a licence document id to its licence; at most 6 lines of one licence are taken.
    """
    picked: list[tuple[int, str, str, str]] = []
    per_kind: collections.Counter[str] = collections.Counter()
    for t in _frequent_lines(licences, 30, 90):
        kind = kind_of[t[3]]
        if t[0] >= 5 and per_kind[kind] < 6 and len(picked) < 28:
            per_kind[kind] += 1
            picked.append(t)
    # stdlib: skip the generated codec tables of encodings/, which would fill every slot
    stdlib = [t for t in _frequent_lines([c for c in code if "/encodings/" not in c[0]], 25, 90) if t[0] >= 4]
    picked += stdlib[: COMPLETE_LINE_EXAMPLES - len(picked)]
    out = []
    for i, (n, line, prev, doc_id) in enumerate(picked):
        m = list(re.finditer(r"\S+", line))
        cut = m[max(2, len(m) // 2) - 1].end()
        prompt = (prev + "\n" if prev else "") + line[:cut]
        out.append({"id": i, "prompt": prompt, "target": line[cut:], "documents": n, "source_doc": doc_id})
    return out


# ---------------------------------------------------------------------------------------- build


def build(out_dir: Path = DATA_DIR) -> dict[str, int]:
    """Write the three demo JSONL files into out_dir; returns examples per file."""
    from llm360.data.embedded import iter_embedded, licence_files, licence_template

    licences = list(iter_embedded("licenses"))
    code = list(iter_embedded("code"))
    docs = list(iter_embedded("docs"))
    kind_of = {f.doc_id: f.license for f in licence_files()}
    templates = {k: licence_template(k) for k in LICENCE_BODY_STARTS}
    files = {
        "licence_mc.jsonl": licence_mc(templates, random.Random(SEED)),
        "next_line_mc.jsonl": next_line_mc(
            {"code": code, "docs": docs, "licenses": licences}, random.Random(SEED + 1)
        ),
        "complete_line.jsonl": complete_line(licences, kind_of, code),
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
