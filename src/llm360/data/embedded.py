"""The built-in corpus: text every Python installation already has, read fully offline.

Four parts, each in a fixed, deterministic order (a pure function of the installation):

- ``code``: the standard library's ``.py`` files, ids ``stdlib/<relative path>``, sorted.
  Tests, ``idlelib``, ``lib2to3``, ``pydoc_data`` (the ``docs`` part as code), ``site-packages``/
  ``dist-packages`` and ``__pycache__`` are left out.
- ``docs``: the topics of ``pydoc_data.topics`` (the language reference sections ``help()`` shows),
  one document per topic, ids ``pydoc:<topic>``, sorted.
- ``package-docs``: the long description of every installed distribution, ids ``pkg:<name>``
  (normalized name), sorted, one per name, empty ones skipped.
- ``licenses``: the licence texts shipped in the distributions' metadata folders (``License-File``
  entries, ``licenses/``, files named ``LICENSE*``, ``LICENCE*``, ``COPYING*``, ``NOTICE*``) and the
  ``License`` metadata field when it holds a real text; ids ``license:<name>/<file>``. Many
  packages ship the same MIT or Apache text, and those duplicates are kept on purpose: they make
  memorization measurable.

Everything is read as strict UTF-8. An item that is not UTF-8 is reported, never dropped silently:
:func:`iter_embedded_items` yields it as :class:`Undecodable` (``iter_source`` turns that into a
``Rejected`` with reason ``invalid_utf8``); :func:`iter_embedded` skips it with a warning.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llm360.errors import DataError

logger = logging.getLogger(__name__)

PARTS: tuple[str, ...] = ("code", "docs", "package-docs", "licenses")
"""The parts of the built-in corpus, in the order the embedded preset lists them."""

# Folders of the standard library that are not part of the `code` corpus: installed third-party
# packages, the (huge, repetitive) test suites, two legacy tools, and `pydoc_data`, whose one
# module is the `docs` part as a string literal (keeping it would put every docs document, the
# held-out ones included, into the code source's training data).
_STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "pydoc_data"}
)
_LICENSE_PREFIXES = ("LICENSE", "LICENCE", "COPYING", "NOTICE")
# The `License` metadata field counts as a licence text (not just an SPDX name such as "MIT")
# when it is at least this long or spans several lines.
_LICENSE_FIELD_MIN_CHARS = 200


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

    Raises :class:`DataError` for an unknown part or when this Python lacks what the part reads.
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


# ------------------------------------------------------------------------------ distributions


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

    When a name is installed twice, the first on ``sys.path`` wins (the one ``import`` would use).
    """
    seen: dict[str, _Dist] = {}
    for dist in importlib.metadata.distributions():
        meta_dir = _metadata_dir(dist)
        try:
            metadata = dist.metadata
            name = metadata["Name"]
            error = ""
        except UnicodeDecodeError as e:
            metadata, error = None, f"METADATA: {e}"
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


def _description(metadata: importlib.metadata.PackageMetadata) -> str:
    payload = metadata.get_payload()  # type: ignore[attr-defined]
    if isinstance(payload, str) and payload.strip():
        return payload
    # Older metadata keeps the description in a header; importlib re-indents it for us.
    return metadata.get("Description") or ""


def _iter_package_docs() -> Iterator[tuple[str, str | Undecodable]]:
    for d in _distributions():
        if d.metadata is None:
            yield f"pkg:{d.name}", Undecodable(d.error)
            continue
        text = _description(d.metadata)
        if text.strip() and text.strip() != "UNKNOWN":
            yield f"pkg:{d.name}", text


def _metadata_dir(dist: importlib.metadata.Distribution) -> Path | None:
    # PathDistribution (the only kind importlib ships) keeps its .dist-info/.egg-info folder here.
    path = getattr(dist, "_path", None)
    if path is None:
        return None
    path = Path(str(path))
    return path if path.is_dir() else None


def _license_files(metadata: importlib.metadata.PackageMetadata | None, meta_dir: Path) -> list[str]:
    """Relative POSIX paths (inside the metadata folder) of the licence files, sorted."""
    found: set[str] = set()
    for entry in (metadata.get_all("License-File") or []) if metadata is not None else []:
        # PEP 639 puts them under licenses/, older setuptools at the folder's top level.
        for candidate in (meta_dir / "licenses" / entry, meta_dir / entry):
            if candidate.is_file():
                found.add(candidate.relative_to(meta_dir).as_posix())
                break
    for child in meta_dir.iterdir():
        if child.is_file() and child.name.upper().startswith(_LICENSE_PREFIXES):
            found.add(child.name)
    licenses_dir = meta_dir / "licenses"
    if licenses_dir.is_dir():
        for dirpath, _dirnames, filenames in os.walk(licenses_dir):
            for fname in filenames:
                found.add((Path(dirpath) / fname).relative_to(meta_dir).as_posix())
    return sorted(found)


def _iter_licenses() -> Iterator[tuple[str, str | Undecodable]]:
    for d in _distributions():
        meta_dir = _metadata_dir(d.dist)
        if meta_dir is not None:
            for rel in _license_files(d.metadata, meta_dir):
                yield f"license:{d.name}/{rel}", _read_utf8(meta_dir / rel)
        if d.metadata is None:
            continue  # its METADATA is reported (once) by the package-docs part
        field = d.metadata.get("License") or ""
        if len(field) >= _LICENSE_FIELD_MIN_CHARS or field.count("\n") >= 2:
            yield f"license:{d.name}/METADATA#License", field
