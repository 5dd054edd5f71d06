"""Reading prepared data, and the one function that maps a training step to rows.

The global batch sequence is a pure function of the manifest and ``global_batch_sequences``:
step ``s`` is a full batch of consecutive rows of one chunk, chunks are walked in order, and the
rows of a chunk that do not fill a last full batch are not trained on (the trainer records them).
Rank ``r`` of ``W`` takes rows ``[r*B/W, (r+1)*B/W)`` of each global batch, so which rows make
up a step never depends on the number of processes, the micro-batch size or accumulation.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llm360.errors import DataError
from llm360.rundir.layout import RunDir
from llm360.utils import read_json

MANIFEST_VERSION = 1

# One record per (row, document span): which tokens of which document sit where in a row.
PROVENANCE_DTYPE = np.dtype(
    [
        ("row", "<u4"),  # row within the chunk
        ("row_offset", "<u4"),  # first position in the row
        ("length", "<u4"),  # tokens of this span (the document's EOS included)
        ("source", "<u2"),  # index into manifest["source_names"]: whose tokens these are
        ("table", "<u2"),  # index into manifest["sources"]: which documents table `doc` refers to
        ("doc", "<u8"),  # document number n in data/documents/<table source>.jsonl.gz
        ("doc_offset", "<u4"),  # token offset within that document
    ]
)


@dataclass(frozen=True)
class StepRows:
    """The rows global step `step` trains on: rows [row_start, row_end) of chunk `chunk`."""

    step: int
    chunk: int
    step_in_chunk: int
    row_start: int
    row_end: int

    def rank_slice(self, rank: int, world_size: int) -> tuple[int, int]:
        """Rows [start, end) of this step that rank `rank` of `world_size` processes."""
        n = self.row_end - self.row_start
        if n % world_size:
            raise DataError(f"global batch of {n} rows does not split evenly over {world_size} ranks")
        per = n // world_size
        return self.row_start + rank * per, self.row_start + (rank + 1) * per


class StepIndex:
    """Maps global steps to chunk rows for a given global batch size (in sequences)."""

    def __init__(self, rows_per_chunk: list[int], global_batch: int) -> None:
        if global_batch < 1:
            raise DataError(f"global batch must be >= 1 sequence, got {global_batch}")
        self.global_batch = global_batch
        self.rows_per_chunk = list(rows_per_chunk)
        self.steps_per_chunk = [r // global_batch for r in self.rows_per_chunk]
        self.first_step = np.concatenate([[0], np.cumsum(self.steps_per_chunk)]).astype(np.int64)
        empty = [i for i, s in enumerate(self.steps_per_chunk) if s == 0]
        if empty:
            raise DataError(
                f"chunk {empty[0]:03d} has {self.rows_per_chunk[empty[0]]} rows, fewer than one global "
                f"batch of {global_batch} sequences; lower train.global_batch_sequences or use fewer chunks"
            )

    @property
    def total_steps(self) -> int:
        return int(self.first_step[-1])

    def unused_rows(self, chunk: int) -> int:
        """Rows at the end of a chunk that do not fill a global batch."""
        return self.rows_per_chunk[chunk] - self.steps_per_chunk[chunk] * self.global_batch

    def locate(self, step: int) -> StepRows:
        """The chunk and rows of global step `step` (0-based)."""
        if not 0 <= step < self.total_steps:
            raise DataError(f"step {step} is outside the data: it has {self.total_steps} steps "
                            f"at a global batch of {self.global_batch}")
        chunk = int(np.searchsorted(self.first_step, step, side="right") - 1)
        k = step - int(self.first_step[chunk])
        start = k * self.global_batch
        return StepRows(step, chunk, k, start, start + self.global_batch)


class DataStore:
    """A prepared data directory: manifest, memory-mapped chunks, provenance and documents."""

    def __init__(self, data_dir: str | Path) -> None:
        self.dir = Path(data_dir)
        mpath = self.dir / "manifest.json"
        if not mpath.is_file():
            raise DataError(
                f"no prepared data in {self.dir} (missing manifest.json); run `llm360 prepare` "
                "on this run directory first"
            )
        try:
            self.manifest = read_json(mpath)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{mpath} is not valid JSON ({e}); the data directory is corrupt") from None
        if self.manifest.get("format") != "llm360-data":
            raise DataError(f"{mpath} is not an llm360 data manifest")
        self.dtype = np.dtype(self.manifest["token_dtype"])
        self.row_length = int(self.manifest["row_length"])
        self.seq_len = int(self.manifest["seq_len"])
        self._chunks: dict[int, np.ndarray] = {}
        for ch in self.manifest["chunks"]:
            if not (self.dir / ch["file"]).is_file():
                raise DataError(f"chunk file missing: {self.dir / ch['file']} (listed in manifest.json)")

    @classmethod
    def for_run(cls, run_dir: str | Path) -> DataStore:
        return cls(RunDir(run_dir).data)

    @property
    def num_chunks(self) -> int:
        return int(self.manifest["num_chunks"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def rows_per_chunk(self) -> list[int]:
        return [int(c["rows"]) for c in self.manifest["chunks"]]

    def step_index(self, global_batch: int) -> StepIndex:
        return StepIndex(self.rows_per_chunk, global_batch)

    def chunk(self, i: int) -> np.ndarray:
        """Chunk i as a read-only memmap of shape (rows, seq_len + 1)."""
        if not 0 <= i < self.num_chunks:
            raise DataError(f"chunk {i} does not exist; the data has chunks 0..{self.num_chunks - 1}")
        if i not in self._chunks:
            path = self.dir / self.manifest["chunks"][i]["file"]
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as e:
                raise DataError(f"{path} is not a readable chunk: {e}") from None
            if arr.ndim != 2 or arr.shape[1] != self.row_length or arr.dtype != self.dtype:
                raise DataError(f"{path} has shape {arr.shape} {arr.dtype}, manifest says "
                                f"(rows, {self.row_length}) {self.dtype}")
            self._chunks[i] = arr
        return self._chunks[i]

    def rows(self, chunk: int, start: int, end: int) -> np.ndarray:
        """Rows [start, end) of a chunk as int64 token ids."""
        return np.asarray(self.chunk(chunk)[start:end], dtype=np.int64)

    def batch(self, step: int, global_batch: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """This rank's rows of global step `step`: int64 array (rows, seq_len + 1)."""
        loc = self.step_index(global_batch).locate(step)
        lo, hi = loc.rank_slice(rank, world_size)
        return self.rows(loc.chunk, lo, hi)

    def provenance(self, i: int) -> np.ndarray:
        path = self.dir / self.manifest["chunks"][i]["provenance"]
        arr = np.load(path, allow_pickle=False)
        if arr.dtype != PROVENANCE_DTYPE:
            raise DataError(f"{path} has an unexpected record layout {arr.dtype}")
        return arr

    def row_provenance(self, chunk: int, row: int) -> list[dict]:
        """The document spans of one row: source, document id and offsets."""
        prov = self.provenance(chunk)
        lo, hi = np.searchsorted(prov["row"], [row, row + 1])
        sources = self.manifest["data_config"]["sources"]
        names = self.manifest["source_names"]
        recs = prov[lo:hi]
        wanted: dict[str, set[int]] = {}
        for rec in recs:
            wanted.setdefault(sources[int(rec["table"])]["name"], set()).add(int(rec["doc"]))
        found = {table: self.documents(table, ns) for table, ns in wanted.items()}
        out = []
        for rec in recs:
            table = sources[int(rec["table"])]["name"]
            out.append({
                "source": names[int(rec["source"])],
                "table": table,
                "doc": int(rec["doc"]),
                "doc_id": found[table][int(rec["doc"])].get("id"),
                "row_offset": int(rec["row_offset"]),
                "length": int(rec["length"]),
                "doc_offset": int(rec["doc_offset"]),
            })
        return out

    def document(self, source: str, n: int) -> dict:
        """Line n of data/documents/<source>.jsonl.gz (streamed)."""
        return self.documents(source, {n})[n]

    def documents(self, source: str, numbers: set[int]) -> dict[int, dict]:
        """The given lines of data/documents/<source>.jsonl.gz, in one streamed pass."""
        path = self.dir / "documents" / f"{source}.jsonl.gz"
        out: dict[int, dict] = {}
        last = max(numbers, default=-1)
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i in numbers:
                    out[i] = json.loads(line)
                if i >= last:
                    break
        missing = sorted(numbers - set(out))
        if missing:
            raise DataError(f"document {missing[0]} not found in {path}")
        return out

    def valid(self, source: str) -> np.ndarray | None:
        meta = self.manifest.get("valid", {}).get(source)
        if not meta:
            return None
        return np.load(self.dir / meta["file"], mmap_mode="r", allow_pickle=False)
