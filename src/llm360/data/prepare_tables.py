"""Prepare's per-source *table* task: a source's documents table, snapshot and validation rows.

``documents/<source>.jsonl.gz`` (and ``sources/<source>.jsonl.gz``) is one gzip stream per source,
written with a fixed header (no name, mtime 0) so equal content gives equal bytes: this task
streams the pieces' parts into it in read order, filling in each line's document number from the
piece's base. It is the only step whose time grows with a source's size (about 100 bytes of JSON
per document through zlib at level 6, fed line by line); it runs beside the scatter tasks.

``valid/<source>.npy``: the held-out documents' tokens, concatenated in read order and cut into
rows of ``seq_len + 1``; what does not fill a last row is counted as dropped.
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llm360.data.prepare_shuffle import _npy_header
from llm360.rundir.atomic import atomic_path, write_json
from llm360.rundir.layout import DOCUMENTS_DIR, SOURCES_DIR
from llm360.utils import sha256_file

VALID_DIR = "valid"


@dataclass(frozen=True)
class TableSpec:
    name: str
    snapshot: bool
    parts: tuple[tuple[str, int], ...]
    """(map output folder, number of its first document) of every piece, in read order."""
    row_length: int
    dtype: str
    out_dir: str
    result: str


def _inflate(path: Path) -> Iterator[bytes]:
    z = zlib.decompressobj()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            yield z.decompress(block)
    yield z.flush()


def _numbered(blob: bytes, base: int) -> bytes:
    """Lines ``head NUL tail`` -> ``head <number> tail``, numbered from base."""
    parts = blob.split(b"\x00")
    if len(parts) == 1:
        return blob
    out: list[bytes] = [b""] * (2 * len(parts) - 1)
    out[0::2] = parts
    out[1::2] = [str(n).encode() for n in range(base, base + len(parts) - 1)]
    return b"".join(out)


class _GzipLines:
    """A gzip stream with a fixed header (no name, mtime 0) written one line at a time.

    zlib's output depends on how its input is cut into calls, so the lines go through a text
    wrapper one by one, as a line-at-a-time writer would: equal lines give equal bytes.
    """

    def __init__(self, path: Path) -> None:
        self.raw = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.gz = gzip.GzipFile(filename="", mode="wb", fileobj=self.raw, mtime=0, compresslevel=6)
        self.text = io.TextIOWrapper(self.gz, encoding="utf-8", newline="\n")

    def write_lines(self, blob: bytes) -> None:
        """Write ``blob`` (whole UTF-8 lines, each ending in a newline) line by line."""
        if not blob:
            return
        lines = blob.decode("utf-8").split("\n")
        write = self.text.write
        for line in lines[:-1]:  # JSON escapes newlines: each one ends a line
            write(line + "\n")

    def close(self) -> None:
        self.text.close()
        self.raw.close()


def write_tables(spec: TableSpec) -> dict:
    """Write a source's documents table, snapshot and validation rows; returns
    ``{"files": {rel: {sha256, bytes}}, "valid_rows": n, "valid_partial_row": tokens}``."""
    out = Path(spec.out_dir)
    files: dict[str, dict] = {}

    def done(rel: str) -> None:
        p = out / rel
        files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}

    rel = f"{DOCUMENTS_DIR}/{spec.name}.jsonl.gz"
    with atomic_path(out / rel) as tmp:
        gz = _GzipLines(tmp)
        try:
            for folder, base in spec.parts:
                gz.write_lines(_numbered(b"".join(_inflate(Path(folder) / "docs.z")), base))
        finally:
            gz.close()
    done(rel)
    if spec.snapshot:
        rel = f"{SOURCES_DIR}/{spec.name}.jsonl.gz"
        with atomic_path(out / rel) as tmp:
            gz = _GzipLines(tmp)
            try:
                for folder, _ in spec.parts:
                    gz.write_lines(b"".join(_inflate(Path(folder) / "snapshot.z")))
            finally:
                gz.close()
        done(rel)

    dtype, L = np.dtype(spec.dtype), spec.row_length
    sizes = [(Path(folder) / "valid.bin").stat().st_size // dtype.itemsize for folder, _ in spec.parts]
    total = sum(sizes)
    rows = total // L
    if rows:
        rel = f"{VALID_DIR}/{spec.name}.npy"
        left = rows * L * dtype.itemsize
        with atomic_path(out / rel) as tmp, open(tmp, "wb") as f:
            f.write(_npy_header((rows, L), dtype))
            for folder, _ in spec.parts:
                with open(Path(folder) / "valid.bin", "rb") as src:
                    while left > 0 and (block := src.read(min(left, 16 << 20))):
                        f.write(block)
                        left -= len(block)
        done(rel)
    result = {"files": files, "valid_rows": rows, "valid_partial_row": total - rows * L}
    write_json(Path(spec.result), result)
    return result
