"""The built-in corpus depends only on llm360 and the Python that runs it, never on what else is installed."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from llm360.data import embedded

FAKE_DIST = "llm360-fake-extra"
_MIT = (
    "MIT License\n\nCopyright (c) 2024 Somebody Else\n\n"
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software.\n"
)


def _fake_distribution(root: Path) -> Path:
    """A folder holding one extra installed distribution (METADATA with a description, a LICENSE)."""
    meta = root / "llm360_fake_extra-1.0.dist-info"
    meta.mkdir(parents=True)
    (meta / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: llm360-fake-extra\nVersion: 1.0\nSummary: A distribution only this test installs\n"
        "License-File: LICENSE\n\n# llm360-fake-extra\n\nA long description that an installed-packages corpus would read.\n",
        encoding="utf-8",
    )
    (meta / "LICENSE").write_text(_MIT, encoding="utf-8")
    (meta / "RECORD").write_text("", encoding="utf-8")
    return root


def _env(extra_path: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(extra_path), env.get("PYTHONPATH")) if p)
    return env


def _run(code: str, extra_path: Path | None, timeout: float = 120) -> str:
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=_env(extra_path), capture_output=True,
                       text=True, timeout=timeout)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


_SEES_FAKE = f"""
    import importlib.metadata as md
    assert md.distribution({FAKE_DIST!r}).read_text("LICENSE").startswith("MIT License"), "fake dist not visible"
"""


def test_licence_files_fill_every_template_and_keep_duplicates() -> None:
    files = embedded.licence_files()
    ids = [f.doc_id for f in files]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    items = list(embedded.iter_embedded("licenses"))
    assert [i for i, _ in items] == ids
    assert all("${" not in text and text.strip() for _, text in items)
    by_licence = collections.Counter(f.license for f in files)
    assert by_licence["mit"] >= 20 and by_licence["apache-2.0"] >= 10  # the natural duplicates
    bodies = collections.Counter(text for _, text in items)
    assert max(bodies.values()) > 1  # Apache's licence files carry no copyright line: identical copies
    templates = {p.stem for p in (embedded.TEXTS_DIR / "licenses").glob("*.txt")}
    assert set(by_licence) == templates  # every shipped text is used, every used text is shipped


def test_package_docs_document_llm360_itself() -> None:
    docs = dict(embedded.iter_embedded("package-docs"))
    assert docs and all(i.startswith("pkg:llm360") for i in docs)
    text = docs["pkg:llm360.data.embedded"]
    assert text.startswith("llm360.data.embedded\n====") and "iter_embedded(part)" in text
    assert "The built-in corpus" in text


def test_api_doc_names_arguments_only() -> None:
    src = 'def f(a: int, /, b=1, *args, c: str = "x", **kw):\n    """Doc of f."""\n\nclass _Hidden:\n    """No."""\n'
    assert embedded.api_doc("m", src) == "m\n=\n\nf(a, b, *args, c, **kw)\n    Doc of f.\n"
    assert embedded.api_doc("m", "x = 1\n") == ""


def test_corpus_record_ignores_installed_distributions(tmp_path: Path) -> None:
    """Every part's hash is the same with an extra distribution on sys.path (which the old corpus read)."""
    extra = _fake_distribution(tmp_path / "site")
    code = (
        _SEES_FAKE
        + """
    import json
    from llm360.data.embedded import PARTS, corpus_record
    print(json.dumps(corpus_record(PARTS)))
    """
    )
    with_extra = json.loads(_run(code, extra))
    without = embedded.corpus_record(embedded.PARTS)
    assert with_extra == without
    assert set(without["parts"]) == set(embedded.PARTS)
    assert {p: v["from"] for p, v in without["parts"].items()} == {
        "code": "python", "docs": "python", "package-docs": "llm360", "licenses": "llm360"}  # fmt: skip
    assert without["python"] in without["reproduce"]


def test_embedded_default_prepares_byte_identical_data_whatever_is_installed(tmp_path: Path) -> None:
    """The embedded default prepared twice, once with an extra distribution installed: the same bytes."""
    extra = _fake_distribution(tmp_path / "site")
    manifests = []
    for name, path in (("plain", None), ("extra", extra)):
        run = tmp_path / name
        code = (
            (_SEES_FAKE if path is not None else "")
            + f"""
    import sys
    from llm360.cli import main
    sys.exit(main(["--no-progress", "prepare", "--run-dir", {str(run)!r}]))
    """
        )
        _run(code, path, timeout=300)
        manifests.append(json.loads((run / "data" / "manifest.json").read_text()))
    plain, with_extra = manifests
    assert plain["files"] == with_extra["files"]  # every data file, by sha256
    assert plain["chunks"] == with_extra["chunks"] and plain["sources"] == with_extra["sources"]
    assert plain.get("embedded") == with_extra.get("embedded")
    for rel in ("chunk_000.npy", "tokenizer/tokenizer.json", "sources/licenses.jsonl.gz"):
        assert (tmp_path / "plain" / "data" / rel).read_bytes() == (
            tmp_path / "extra" / "data" / rel
        ).read_bytes()
