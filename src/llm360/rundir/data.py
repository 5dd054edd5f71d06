"""Reading prepared data, and the one answer to "which rows did step N train on".

The global batch sequence is a pure function of the manifest and ``global_batch_sequences``:
step ``s`` is a full batch of consecutive positions of one chunk, chunks are walked in order, and
the positions of a chunk that do not fill a last full batch are not trained on (the trainer
records them). Rank ``r`` of ``W`` takes positions ``[r*B/W, (r+1)*B/W)`` of each global batch, so
which rows make up a step never depends on the number of processes, the micro-batch size or
accumulation.

A position is a row of the chunk file unless a guard reseeded the chunk: after ``k`` reseeds,
position ``p`` of chunk ``c`` holds file row ``chunk_row_order(c, rows, k, seed)[p]``.
The trainer reads its rows through that one function, and :func:`trained_rows` answers for a run
directory what was really trained at every step: its :class:`TrainingRecord` (the guard decisions
in the latest complete checkpoint and the events of ``metrics/events.jsonl``) applied to the step
index of the run's global batch.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from llm360.errors import CheckpointError, ConfigError, DataError
from llm360.rundir.layout import CONFIG, TRAINER_STATE, RunDir, data_manifest, documents_file
from llm360.utils import read_json

logger = logging.getLogger(__name__)

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
PROVENANCE_FIM_DTYPE = np.dtype([*PROVENANCE_DTYPE.descr, ("fim", "<u2")])
"""The provenance of a data set with fill-in-the-middle copies: ``fim`` = 0 for a span of a document
as it is, k for a span of its k-th FIM-transformed copy (entry k of the ``fim`` list of its line in
data/documents/<source>.jsonl.gz, which says how the copy's tokens map to the original text)."""


def chunk_row_order(chunk: int, rows: int, reseeds: int, seed: int) -> np.ndarray | None:
    """File rows of a chunk in training order after `reseeds` reseeds by a guard; None: file order.

    ``np.random.default_rng([seed, chunk, reseeds]).permutation(rows)`` with ``seed`` the run's
    ``train.seed``: position p of the chunk trains file row ``order[p]``. The trainer, inspect,
    replay and the analyses all ask this function; none recomputes the order.
    """
    if reseeds <= 0:
        return None
    return np.random.default_rng([seed, chunk, reseeds]).permutation(rows)


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
        mpath = data_manifest(self.dir)
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

    def rows_in_training_order(self, chunk: int, start: int, end: int, *, reseeds: int, seed: int) -> np.ndarray:
        """Positions [start, end) of a chunk in its training order after `reseeds` reseeds, as int64 ids.

        With no reseed these are file rows [start, end); otherwise the rows
        :func:`chunk_row_order` puts there (``seed`` is ``train.seed``).
        """
        order = chunk_row_order(chunk, self.rows_per_chunk[chunk], reseeds, seed)
        if order is None:
            return self.rows(chunk, start, end)
        return np.asarray(self.chunk(chunk)[order[start:end]], dtype=np.int64)

    def batch(self, step: int, global_batch: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """This rank's rows of global step `step` in file order: int64 array (rows, seq_len + 1).

        The data's own order, before any guard decision; what a run trained is :func:`trained_rows`.
        """
        loc = self.step_index(global_batch).locate(step)
        lo, hi = loc.rank_slice(rank, world_size)
        return self.rows(loc.chunk, lo, hi)

    def provenance(self, i: int) -> np.ndarray:
        path = self.dir / self.manifest["chunks"][i]["provenance"]
        arr = np.load(path, allow_pickle=False)
        if arr.dtype not in (PROVENANCE_DTYPE, PROVENANCE_FIM_DTYPE):
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
                **({"fim": int(rec["fim"])} if "fim" in recs.dtype.names else {}),
            })
        return out

    def document(self, source: str, n: int) -> dict:
        """Line n of data/documents/<source>.jsonl.gz (streamed)."""
        return self.documents(source, {n})[n]

    def documents(self, source: str, numbers: set[int]) -> dict[int, dict]:
        """The given lines of data/documents/<source>.jsonl.gz, in one streamed pass."""
        path = documents_file(self.dir, source)
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


# ------------------------------------------------------------------------ what was really trained

StepStatus = Literal["trained", "skipped_step", "skipped_chunk", "not_trained_yet", "unused", "data_only"]
TRAINED: StepStatus = "trained"
"""The step's rows were trained on (their loss is in metrics/train.jsonl, the update applied)."""
SKIPPED_STEP: StepStatus = "skipped_step"
"""A guard skipped the step (policy skip_step): its loss was computed, no update was applied."""
SKIPPED_CHUNK: StepStatus = "skipped_chunk"
"""A guard rolled back and skipped the whole chunk (rollback_skip_chunk): none of its rows was trained."""
NOT_TRAINED_YET: StepStatus = "not_trained_yet"
"""No complete checkpoint covers the step: training has not reached it (or stopped before it)."""
UNUSED: StepStatus = "unused"
"""A row among the last rows of a chunk that do not fill a global batch: never trained."""
DATA_ONLY: StepStatus = "data_only"
"""Asked at another global batch than the run's: the data's own order, not what the run trained."""


def _read_events(path: Path) -> tuple[dict, ...]:
    """The JSON-object lines of an events.jsonl; other lines (a torn last line) are skipped."""
    if not path.is_file():
        return ()
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return tuple(out)


@dataclass(frozen=True)
class TrainingRecord:
    """What a run's guards decided, as training recorded it.

    The decisions are those of ``trainer_state.json`` in the run's latest complete checkpoint: it
    covers every step before ``step``, every finished chunk included, and holds no decision of an
    attempt that a rollback abandoned. ``events`` are the lines of ``metrics/events.jsonl``; they
    give the reasons, never the decisions (an abandoned attempt's lines stay in that file).
    """

    step: int = 0
    """Steps [0, step) are done, trained or skipped by a guard; training continues at this step."""
    chunk_reseeds: Mapping[int, int] = field(default_factory=dict)
    """chunk -> how many times a guard reseeded it (rollback_reseed); absent: trained in file order."""
    skipped_chunks: frozenset[int] = frozenset()
    skipped_steps: frozenset[int] = frozenset()
    global_batch: int | None = None
    """train.global_batch_sequences the checkpoint was trained with (None: not recorded)."""
    data_dir: str | None = None
    """The data directory trained on when it is not the run's own ``data/`` (``train --data``)."""
    checkpoint: Path | None = None
    """The checkpoint folder the decisions were read from (None: no checkpoint yet)."""
    events: tuple[dict, ...] = ()

    @classmethod
    def from_trainer_state(
        cls, state: Mapping[str, Any], *, checkpoint: Path | None = None, events: Iterable[dict] = ()
    ) -> TrainingRecord:
        """The record of one trainer_state.json; a missing field means no such decision was made.

        Raises DataError when a field is malformed.
        """
        try:
            gb = state.get("global_batch_sequences")
            return cls(
                step=int(state.get("step", 0)),
                chunk_reseeds={int(c): int(k) for c, k in (state.get("chunk_reseeds") or {}).items() if int(k) > 0},
                skipped_chunks=frozenset(int(c) for c in state.get("skipped_chunks") or ()),
                skipped_steps=frozenset(int(s) for s in state.get("skipped_steps") or ()),
                global_batch=None if gb is None else int(gb),
                data_dir=state.get("data_dir") or None,
                checkpoint=checkpoint,
                events=tuple(events),
            )
        except (TypeError, ValueError, AttributeError) as e:
            where = checkpoint / TRAINER_STATE if checkpoint is not None else TRAINER_STATE
            raise DataError(f"{where} holds malformed guard decisions ({e}); that checkpoint is corrupt") from None

    def reseeds(self, chunk: int) -> int:
        """How many times a guard reseeded `chunk` (0: trained in file order)."""
        return self.chunk_reseeds.get(chunk, 0)

    def last_event(self, kind: str, *, step: int | None = None, chunk: int | None = None) -> dict | None:
        """The latest events.jsonl line of this kind (for this step and/or chunk), or None."""
        for ev in reversed(self.events):
            if ev.get("event") == kind and step in (None, ev.get("step")) and chunk in (None, ev.get("chunk")):
                return ev
        return None


def read_training_record(run_dir: str | Path) -> TrainingRecord:
    """The guard decisions and events of a run directory or a release; empty before any checkpoint.

    Reads ``trainer_state.json`` of the latest complete checkpoint (marker present, files of the
    listed names and sizes; the weights are not hashed and nothing is cleaned up, so it is safe
    while training runs) and ``metrics/events.jsonl``. Raises DataError when that
    trainer_state.json is unreadable.
    """
    from llm360.rundir import checkpoint as ckpt  # imports torch: only readers of a training record pay

    rd = RunDir(run_dir)
    events = _read_events(rd.events)
    latest = ckpt.latest_complete_checkpoint(rd.checkpoints, cleanup=False, verify=False)
    if latest is None:
        return TrainingRecord(events=events)
    try:
        state = ckpt.read_trainer_state(latest)
    except CheckpointError as e:
        raise DataError(f"{e}; the guard decisions of {latest.name} cannot be read") from None
    return TrainingRecord.from_trainer_state(state, checkpoint=latest, events=events)


@dataclass(frozen=True)
class TrainedStep:
    """What global step `step` trained on: file rows of one chunk, in the order trained, and a status."""

    where: StepRows
    """The step's positions [row_start, row_end) in its chunk's training order."""
    rows: np.ndarray
    """File row of each position, in the order trained (int64, global_batch of them)."""
    status: StepStatus
    reseeds: int
    """How many times a guard reseeded the chunk (0: file order)."""
    reason: str
    """Why the rows were not trained (empty when status is trained)."""
    event: dict | None = None
    """The events.jsonl line of the guard decision that concerns the step, when there is one."""

    @property
    def step(self) -> int:
        return self.where.step

    @property
    def chunk(self) -> int:
        return self.where.chunk

    @property
    def step_in_chunk(self) -> int:
        return self.where.step_in_chunk

    @property
    def trained(self) -> bool:
        return self.status == TRAINED

    def rank_rows(self, rank: int, world_size: int) -> np.ndarray:
        """File rows rank `rank` of `world_size` processes took at this step (see StepRows.rank_slice)."""
        lo, hi = self.where.rank_slice(rank, world_size)
        return self.rows[lo - self.where.row_start : hi - self.where.row_start]


@dataclass(frozen=True)
class RowPlace:
    """Where file row `row` of a chunk was trained: its position in the chunk's training order and step."""

    chunk: int
    row: int
    position: int
    """Position in the chunk's training order (equals `row` unless the chunk was reseeded)."""
    step: int | None
    """Global step of that position; None for the last rows that do not fill a global batch."""
    index_in_step: int | None
    """Index among the step's global batch (rank r of W takes a contiguous slice of them)."""
    status: StepStatus
    reseeds: int
    reason: str
    event: dict | None = None


class TrainedIndex:
    """Which file rows a run trained at each step, its guards' decisions applied; see :func:`trained_rows`.

    ``global_batch`` is the batch to map steps with; when it is not ``run_global_batch`` (the
    run's) the index explores the data only: file order, no decision applies, status data_only.
    """

    def __init__(
        self,
        rows_per_chunk: list[int],
        global_batch: int,
        *,
        seed: int | None,
        record: TrainingRecord | None = None,
        run_global_batch: int | None = None,
        store: DataStore | None = None,
    ) -> None:
        self.index = StepIndex(rows_per_chunk, global_batch)
        self.record = record if record is not None else TrainingRecord()
        self.seed = seed
        self.run_global_batch = run_global_batch
        self.from_run = run_global_batch is None or run_global_batch == global_batch
        """Whether the steps are the run's (False: another global batch, data only)."""
        self.store = store
        if self.from_run and self.record.chunk_reseeds and seed is None:
            raise DataError("the run reseeded chunks but its train.seed is unknown (no config.yaml in the run "
                            "or its checkpoint); the trained row order cannot be told")

    @property
    def global_batch(self) -> int:
        return self.index.global_batch

    @property
    def total_steps(self) -> int:
        return self.index.total_steps

    def reseeds(self, chunk: int) -> int:
        """How many times the run reseeded `chunk` (0 when exploring at another global batch)."""
        return self.record.reseeds(chunk) if self.from_run else 0

    def reseed_event(self, chunk: int) -> dict | None:
        """The events.jsonl line of the reseed that gave the chunk its trained order, when there is one."""
        k = self.reseeds(chunk)
        for ev in reversed(self.record.events):
            if ev.get("event") == "rollback_reseed" and ev.get("chunk") == chunk and ev.get("reseed") in (k, None):
                return ev
        return None

    def row_order(self, chunk: int) -> np.ndarray:
        """File rows of `chunk` in the order trained: position p trained file row ``row_order(chunk)[p]``."""
        if not 0 <= chunk < len(self.index.rows_per_chunk):
            raise DataError(f"chunk {chunk} does not exist; the data has chunks 0..{len(self.index.rows_per_chunk) - 1}")
        n = self.index.rows_per_chunk[chunk]
        order = chunk_row_order(chunk, n, self.reseeds(chunk), self.seed or 0)
        return np.arange(n, dtype=np.int64) if order is None else order.astype(np.int64)

    def chunk_status(self, chunk: int) -> tuple[StepStatus, str, dict | None]:
        """(status, reason, event) of a whole chunk: trained (possibly in part), skipped, not trained yet."""
        if not self.from_run:
            return DATA_ONLY, (f"global batch {self.global_batch} is not the run's ({self.run_global_batch}): rows "
                               "in the data's file order at that batch, not what the run trained"), None
        if chunk in self.record.skipped_chunks:
            ev = self.record.last_event("rollback_skip_chunk", chunk=chunk)
            why = f": {ev.get('reason')}" if ev and ev.get("reason") else " (no line for it in metrics/events.jsonl)"
            return SKIPPED_CHUNK, f"chunk {chunk:03d} was skipped by a guard (rollback_skip_chunk{why}); not trained", ev
        if int(self.index.first_step[chunk]) >= self.record.step:
            return NOT_TRAINED_YET, f"chunk {chunk:03d} is not trained yet ({self._progress(chunk)})", None
        return TRAINED, "", None

    def _progress(self, chunk: int) -> str:
        done = ("the run has no complete checkpoint" if self.record.checkpoint is None else
                f"the latest complete checkpoint, {self.record.checkpoint.name}, covers steps 0..{self.record.step - 1}")
        ev = self.record.last_event("rollback_reseed", chunk=chunk)
        if ev is not None and int(ev.get("reseed") or 0) > self.reseeds(chunk):  # decided, not yet checkpointed
            done += "; metrics/events.jsonl has a later reseed of this chunk, so the order shown may not be the one used"
        return done

    def _step_status(self, step: int, chunk: int) -> tuple[StepStatus, str, dict | None]:
        status, reason, event = self.chunk_status(chunk)
        if status != TRAINED:
            return status, reason, event
        if step in self.record.skipped_steps:
            ev = self.record.last_event("skip_step", step=step)
            why = f": {ev.get('reason')}" if ev and ev.get("reason") else " (no line for it in metrics/events.jsonl)"
            return SKIPPED_STEP, f"step {step} was skipped by a guard (skip_step{why}); no update was applied", ev
        if step >= self.record.step:
            return NOT_TRAINED_YET, f"step {step} is not trained yet ({self._progress(chunk)})", None
        return TRAINED, "", None

    def locate(self, step: int) -> TrainedStep:
        """What global step `step` trained on. Raises DataError for a step outside the data."""
        where = self.index.locate(step)
        status, reason, event = self._step_status(step, where.chunk)
        rows = self.row_order(where.chunk)[where.row_start : where.row_end]
        return TrainedStep(where, rows, status, self.reseeds(where.chunk), reason, event)

    def place(self, chunk: int, row: int) -> RowPlace:
        """Where file row `row` of `chunk` was trained. Raises DataError for a row or chunk that does not exist."""
        order = self.row_order(chunk)
        if not 0 <= row < len(order):
            raise DataError(f"row {row} does not exist: chunk {chunk:03d} has rows 0..{len(order) - 1}")
        position = int(np.flatnonzero(order == row)[0])
        k, index_in_step = divmod(position, self.global_batch)
        if k >= self.index.steps_per_chunk[chunk]:
            reason = (f"not trained: position {position} is among the last {self.index.unused_rows(chunk)} rows of "
                      f"chunk {chunk:03d}, which do not fill a global batch of {self.global_batch}")
            status, _, event = self.chunk_status(chunk)
            return RowPlace(chunk, row, position, None, None, status if status == DATA_ONLY else UNUSED,
                            self.reseeds(chunk), reason, event)
        step = int(self.index.first_step[chunk]) + k
        status, reason, event = self._step_status(step, chunk)
        return RowPlace(chunk, row, position, step, index_in_step, status, self.reseeds(chunk), reason, event)


def place_rows(index: TrainedIndex, chunk: int, rows: Iterable[int]) -> list[RowPlace]:
    """Where each of the file rows `rows` of `chunk` was trained: ``[index.place(chunk, r) for r in rows]``
    with the chunk's training order inverted once instead of searched for every row (a long document
    spans thousands of rows). Raises DataError for a row or chunk that does not exist."""
    order = index.row_order(chunk)
    wanted = np.asarray(list(rows), dtype=np.int64)
    outside = wanted[(wanted < 0) | (wanted >= len(order))]
    if outside.size:
        index.place(chunk, int(outside[0]))  # raises, naming the row
    position = np.empty_like(order)
    position[order] = np.arange(len(order), dtype=np.int64)
    first, steps = int(index.index.first_step[chunk]), index.index.steps_per_chunk[chunk]
    out = []
    for row, pos in zip(wanted.tolist(), position[wanted].tolist(), strict=True):
        k, index_in_step = divmod(pos, index.global_batch)
        if k >= steps:  # among the last rows that fill no global batch: the one-row answer says why
            out.append(index.place(chunk, row))
            continue
        status, reason, event = index._step_status(first + k, chunk)
        out.append(RowPlace(chunk, row, pos, first + k, index_in_step, status, index.reseeds(chunk), reason, event))
    return out


def _train_settings(rd: RunDir, record: TrainingRecord) -> tuple[int | None, int | None]:
    """(train.global_batch_sequences, train.seed) of the config that trained: the latest checkpoint's
    config.yaml, else the run's; (None, None) when there is neither."""
    candidates = [record.checkpoint / CONFIG] if record.checkpoint is not None else []
    for path in [*candidates, rd.config]:
        if path.is_file():
            from llm360.config import load_config  # the full schema knows every default

            train = load_config(path).train
            return int(train.global_batch_sequences), int(train.seed)
    return None, None


def trained_rows(run_dir: str | Path, global_batch: int | None = None) -> TrainedIndex:
    """What the run in `run_dir` (or a release) really trained at every step.

    The step index of the run's global batch (the latest checkpoint's, else config.yaml's
    ``train.global_batch_sequences``) with the guard decisions of :func:`read_training_record`
    applied: reseeded chunks in their reseeded order, skipped steps and chunks marked. Passing a
    ``global_batch`` other than the run's explores the data at that batch instead (status
    data_only). Raises DataError when there is no prepared data, or no global batch to read and
    none given; ConfigError when the run's config.yaml is invalid.
    """
    rd = RunDir(run_dir)
    record = read_training_record(rd.root)
    run_batch, seed = _train_settings(rd, record)
    if record.global_batch is not None:
        run_batch = record.global_batch
    if global_batch is None:
        if run_batch is None:
            raise DataError(f"{rd.root} has no config.yaml and no checkpoint to read the global batch from; "
                            "pass --global-batch")
        global_batch = run_batch
    if global_batch < 1:
        raise ConfigError(f"global batch must be >= 1 sequence, got {global_batch}")
    data = rd.data
    if record.data_dir is not None:
        if data_manifest(record.data_dir).is_file():
            data = Path(record.data_dir)
        else:
            logger.warning("%s was trained on %s, which is not here; reading %s instead",
                           rd.root, record.data_dir, data)
    store = DataStore(data)
    return TrainedIndex(store.rows_per_chunk, global_batch, seed=seed, record=record,
                        run_global_batch=run_batch, store=store)
