"""The built-in corpus: text that comes with Python and with llm360 itself, read fully offline.

Its content depends only on llm360's version and the Python that runs it, never on what else is
installed, so two demo runs on the same llm360 and the same Python are byte-comparable. Four
parts, each in a fixed, deterministic order:

- ``code``: the standard library's ``.py`` files, ids ``stdlib/<relative path>``, sorted.
  Tests, ``idlelib``, ``lib2to3``, ``pydoc_data`` (the ``docs`` part as code), ``site-packages``/
  ``dist-packages`` and ``__pycache__`` are left out. From the running Python.
- ``docs``: the topics of ``pydoc_data.topics`` (the language reference sections ``help()`` shows),
  one document per topic, ids ``pydoc:<topic>``, sorted. From the running Python.
- ``package-docs``: llm360's own API documentation, one document per module of the installed
  llm360 package (its docstring, then the docstrings of its public classes, methods and
  functions, pydoc-style), ids ``pkg:<module>``, sorted. Ships with llm360.
- ``licenses``: licence files of fictional projects as a package index holds them, listed in
  ``embedded_texts/licenses.json`` (project, file name, licence, year, holder) and filled in from
  the standard licence texts in ``embedded_texts/licenses/`` (MIT, BSD 2- and 3-clause, Apache
  2.0 and its notice, ISC, PSF 2.0, the GPL 3.0, LGPL 2.1 and MPL 2.0 notices, zlib, Unlicense);
  ids ``license:<project>/<file>``, sorted. Ships with llm360. Many projects share a licence and
  some licence files (Apache's) are identical: those duplicates make memorization measurable.

So ``package-docs`` and ``licenses`` are a function of llm360's version alone; ``code`` and ``docs``
of the Python build (its exact version: the standard library changes between patch releases, and
a distribution may patch it). :func:`corpus_record` says which, with a hash per part, and the
data manifest keeps it under ``embedded``.

Everything is read as strict UTF-8. An item that is not UTF-8 is reported, never dropped silently:
:func:`iter_embedded_items` yields it as :class:`Undecodable` (``iter_source`` turns that into a
``Rejected`` with reason ``invalid_utf8``); :func:`iter_embedded` skips it with a warning.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import string
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from llm360.errors import DataError

logger = logging.getLogger(__name__)

PARTS: tuple[str, ...] = ("code", "docs", "package-docs", "licenses")
"""The parts of the built-in corpus, in the order the embedded preset lists them."""

TEXTS_DIR = Path(__file__).resolve().parent / "embedded_texts"
"""The licence texts and the list of licence files llm360 ships (package data)."""
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
"""The installed ``llm360`` package folder, whose modules the ``package-docs`` part documents."""

_FROM_PYTHON = frozenset({"code", "docs"})

# Folders of the standard library that are not part of the `code` corpus: installed third-party
# packages, the (huge, repetitive) test suites, two legacy tools, and `pydoc_data`, whose one
# module is the `docs` part as a string literal (keeping it would put every docs document, the
# held-out ones included, into the code source's training data).
_STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "pydoc_data"}
)


@dataclass(frozen=True, slots=True)
class Undecodable:
    """An embedded item whose bytes are not valid UTF-8."""

    detail: str
    """Where decoding failed (the codec's message)."""


def iter_embedded(part: str) -> Iterator[tuple[str, str]]:
    """Yield ``(doc_id, text)`` for one part of the built-in corpus, in deterministic order.

    Items that are not valid UTF-8 are skipped with a warning; use :func:`iter_embedded_items`
    to see them.
    """
    for doc_id, text in iter_embedded_items(part):
        if isinstance(text, Undecodable):
            logger.warning("embedded %s: skipped %s (not UTF-8: %s)", part, doc_id, text.detail)
            continue
        yield doc_id, text


def iter_embedded_items(part: str) -> Iterator[tuple[str, str | Undecodable]]:
    """Yield ``(doc_id, text or Undecodable)`` for one part of the built-in corpus.

    Raises :class:`DataError` for an unknown part, when this Python lacks what the part reads, or
    when llm360's shipped texts are missing or damaged (a broken installation).
    """
    if part == "code":
        yield from _iter_code()
    elif part == "docs":
        yield from _iter_docs()
    elif part == "package-docs":
        yield from _iter_package_docs()
    elif part == "licenses":
        yield from _iter_licenses()
    else:
        raise DataError(f"unknown embedded corpus part {part!r}; the parts are {', '.join(PARTS)}")


def corpus_record(parts: Iterable[str]) -> dict:
    """What the given parts of the built-in corpus were built from: versions, and a hash per part.

    ``{"llm360": version, "python": "3.11.7", "python_implementation": "CPython",
    "parts": {part: {"documents": n, "sha256": ..., "from": "python" | "llm360"}},
    "sha256": hash of the parts' hashes, "reproduce": one sentence}``. A part's hash covers every
    ``(doc_id, text)`` in order (an undecodable item by its id and codec message); equal hashes
    mean byte-identical input documents. Reads each part once (about a second for ``code``).
    """
    from llm360 import __version__

    wanted = [p for p in PARTS if p in set(parts)]
    out: dict[str, dict] = {}
    for part in wanted:
        h = hashlib.sha256()
        n = 0
        for doc_id, text in iter_embedded_items(part):
            body = f"undecodable: {text.detail}" if isinstance(text, Undecodable) else text
            h.update(doc_id.encode("utf-8") + b"\0" + body.encode("utf-8") + b"\0")
            n += 1
        out[part] = {
            "documents": n,
            "sha256": h.hexdigest(),
            "from": "python" if part in _FROM_PYTHON else "llm360",
        }
    total = hashlib.sha256(json.dumps({p: v["sha256"] for p, v in out.items()}, sort_keys=True).encode())
    python, impl = platform.python_version(), platform.python_implementation()
    needs_python = any(p in _FROM_PYTHON for p in out)
    reproduce = f"llm360 {__version__}" + (f" on {impl} {python} (the standard library's code and docs)"
                                           if needs_python else "")  # fmt: skip
    return {
        "llm360": __version__,
        "python": python,
        "python_implementation": impl,
        "parts": out,
        "sha256": total.hexdigest(),
        "reproduce": f"{reproduce} gives these documents byte for byte",
    }


def _read_utf8(path: Path) -> str | Undecodable:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(
            f"embedded corpus: cannot read {path}: {e.strerror or e}; check its permissions"
        ) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        return Undecodable(str(e))


# --------------------------------------------------------------------------------------- code


def stdlib_root() -> Path:
    """The standard library folder of the running Python."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[str]:
    """Relative POSIX paths of the standard library's ``.py`` files in the ``code`` part, sorted."""
    root = stdlib_root()
    if not root.is_dir():
        raise DataError(
            f"embedded code: the standard library folder {root} does not exist; "
            "this Python installation has no source files to read (use another source kind)"
        )
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_EXCLUDED_DIRS]
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if name.endswith(".py"):
                found.append((rel_dir / name).as_posix())
    found.sort()
    return found


def _iter_code() -> Iterator[tuple[str, str | Undecodable]]:
    root = stdlib_root()
    files = stdlib_files()
    if not files:
        raise DataError(f"embedded code: no .py files under the standard library folder {root}")
    for rel in files:
        yield f"stdlib/{rel}", _read_utf8(root / rel)


# --------------------------------------------------------------------------------------- docs


def _iter_docs() -> Iterator[tuple[str, str | Undecodable]]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise DataError(
            "embedded docs: this Python has no `pydoc_data` module (some minimal installations "
            "strip it); install the full standard library or drop the `docs` source"
        ) from None
    for topic in sorted(topics):
        yield f"pydoc:{topic}", topics[topic]


# ------------------------------------------------------------------------------- package-docs


def package_modules() -> list[tuple[str, Path]]:
    """``(dotted module name, file)`` of every module of the installed llm360 package, by name."""
    found = []
    for path in PACKAGE_ROOT.rglob("*.py"):
        rel = path.relative_to(PACKAGE_ROOT).with_suffix("")
        if any(p.startswith(".") for p in rel.parts):
            continue  # editors' and tools' temporary files, never modules
        parts = [p for p in rel.parts if p != "__init__"] if rel.name == "__init__" else list(rel.parts)
        found.append((".".join(["llm360", *parts]), path))
    return sorted(found)


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    # argument names only: annotations and defaults would make the text depend on ast.unparse,
    # which formats differently across Python versions
    a = node.args
    names = [x.arg for x in (*a.posonlyargs, *a.args)]
    if a.vararg:
        names.append("*" + a.vararg.arg)
    elif a.kwonlyargs:
        names.append("*")
    names += [x.arg for x in a.kwonlyargs]
    if a.kwarg:
        names.append("**" + a.kwarg.arg)
    return f"{node.name}({', '.join(names)})"


def _indent(text: str) -> str:
    return "\n".join(("    " + ln) if ln.strip() else "" for ln in text.splitlines())


def api_doc(module: str, source: str) -> str:
    """A module's documentation as pydoc prints it: its docstring, then each public class (with its
    public methods) and function that has a docstring. Empty when the module documents nothing.

    Raises DataError when ``source`` is not valid Python.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise DataError(f"embedded package-docs: {module} does not parse ({e}); reinstall llm360") from None
    blocks = []
    doc = ast.get_docstring(tree)
    if doc:
        blocks.append(doc)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            if d := ast.get_docstring(node):
                blocks.append(f"{_signature(node)}\n{_indent(d)}")
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            members = [f"class {node.name}"]
            if d := ast.get_docstring(node):
                members.append(_indent(d))
            for sub in node.body:
                if (
                    isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and not sub.name.startswith("_")
                    and (d := ast.get_docstring(sub))
                ):
                    members.append(_indent(f"{_signature(sub)}\n{_indent(d)}"))
            if len(members) > 1:
                blocks.append("\n".join(members))
    if not blocks:
        return ""
    return f"{module}\n{'=' * len(module)}\n\n" + "\n\n".join(blocks) + "\n"


def _iter_package_docs() -> Iterator[tuple[str, str | Undecodable]]:
    modules = package_modules()
    if not modules:
        raise DataError(f"embedded package-docs: no modules under {PACKAGE_ROOT}; reinstall llm360")
    for module, path in modules:
        source = _read_utf8(path)
        if isinstance(source, Undecodable):
            yield f"pkg:{module}", source
            continue
        text = api_doc(module, source)
        if text:
            yield f"pkg:{module}", text


# ----------------------------------------------------------------------------------- licenses


@dataclass(frozen=True, slots=True)
class LicenceFile:
    """One licence file of the ``licenses`` part (an entry of ``embedded_texts/licenses.json``)."""

    project: str
    file: str
    """File name in the project, e.g. ``LICENSE``, ``NOTICE``, ``COPYING``."""
    license: str
    """Template name: a file ``embedded_texts/licenses/<license>.txt``."""
    year: str
    holder: str

    @property
    def doc_id(self) -> str:
        return f"license:{self.project}/{self.file}"


def licence_files() -> list[LicenceFile]:
    """Every licence file of the ``licenses`` part, sorted by document id.

    Raises DataError when the shipped list is missing or malformed (a broken installation).
    """
    path = TEXTS_DIR / "licenses.json"
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["documents"]
        files = [LicenceFile(**{k: str(e[k]) for k in ("project", "file", "license", "year", "holder")})
                 for e in entries]  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(
            f"embedded licenses: {path} is missing or malformed ({e}); reinstall llm360"
        ) from None
    return sorted(files, key=lambda f: f.doc_id)


def licence_template(name: str) -> str:
    """The standard text of one licence, with ``${project}``, ``${year}`` and ``${holder}`` unfilled."""
    path = TEXTS_DIR / "licenses" / f"{name}.txt"
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"embedded licenses: cannot read {path} ({e}); reinstall llm360") from None


def _iter_licenses() -> Iterator[tuple[str, str | Undecodable]]:
    templates: dict[str, string.Template] = {}
    for f in licence_files():
        if f.license not in templates:
            templates[f.license] = string.Template(licence_template(f.license))
        try:
            text = templates[f.license].substitute(project=f.project, year=f.year, holder=f.holder)
        except (KeyError, ValueError) as e:
            raise DataError(
                f"embedded licenses: template {f.license}.txt has a bad placeholder ({e})"
            ) from None
        yield f.doc_id, text


# ------------------------------------------------------- installed distributions (not the corpus)


def normalize_name(name: str) -> str:
    """PEP 503 normalized distribution name: ``Foo_Bar.baz`` -> ``foo-bar-baz``."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True, slots=True)
class _Dist:
    name: str
    """PEP 503 normalized name."""
    dist: importlib.metadata.Distribution
    metadata: importlib.metadata.PackageMetadata | None
    """None when the METADATA file is not UTF-8 (see `error`)."""
    error: str = ""


def _distributions() -> list[_Dist]:
    """Installed distributions, one per normalized name, sorted by name.

    Not part of the pretraining corpus (which must not depend on what is installed); the built-in
    fine-tuning sets ask about the installed packages. When a name is installed twice, the first
    on ``sys.path`` wins (the one ``import`` would use).
    """
    seen: dict[str, _Dist] = {}
    for dist in importlib.metadata.distributions():
        try:
            metadata = dist.metadata
            name = metadata["Name"]
            error = ""
        except UnicodeDecodeError as e:
            metadata, error = None, f"METADATA: {e}"
            meta_dir = _metadata_dir(dist)
            name = _name_from_folder(meta_dir) if meta_dir is not None else None
        if not name:
            continue
        key = normalize_name(name)
        if key not in seen:
            seen[key] = _Dist(key, dist, metadata, error)
    return [seen[k] for k in sorted(seen)]


def _name_from_folder(meta_dir: Path) -> str | None:
    # `foo_bar-1.0.dist-info`, `foo.egg-info`, `foo-1.0-py3.11.egg-info`
    stem = re.sub(r"\.(dist|egg)-info$", "", meta_dir.name)
    return stem.split("-", 1)[0] or None


def _metadata_dir(dist: importlib.metadata.Distribution) -> Path | None:
    # PathDistribution (the only kind importlib ships) keeps its .dist-info/.egg-info folder here.
    path = getattr(dist, "_path", None)
    if path is None:
        return None
    path = Path(str(path))
    return path if path.is_dir() else None
