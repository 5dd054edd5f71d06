"""Memorization of the training data, checkpoint by checkpoint (LLM360's Analysis360).

The score (LLM360 paper, section 4.3, after Biderman et al. 2023): take a training row, give its
first ``k`` tokens as the prompt, generate ``l`` tokens greedily, and count the share of generated
tokens equal to the row's true tokens ``k .. k+l-1`` at the same position. A row is
*k-extractible* when the score is 1. The paper uses k = l = 32 and 1000 rows per chunk, and scores
every checkpoint on every chunk, those it has seen (chunks ``0..i`` for ``ckpt_i``, less those a
guard skipped: :func:`~llm360.rundir.data.read_training_record`) and the rest.

How each checkpoint's rows are scored (exactly, and faster than generating):
:mod:`llm360.analysis.memorization_scores`.

Files, under ``<run>/analysis/memorization/`` (NumPy and JSON, no pickle)::

    samples.npz / samples.json  the sampled rows: chunk (int32), row (int64), in chunk order
    ckpt_NNN.npz                chunk, row, matched (int16: tokens equal to the truth),
                                first_mismatch (int16: l when none), score (float32: matched / l)
                                [, generated (rows x l int32) with save_generated]
    ckpt_NNN.json               settings, dtype, device, model sha256, timing -- written after the
                                .npz: a checkpoint's result exists when its .json does
    summary.json                the paper's figures 7-9 as numbers, rebuilt on every call

A second call computes only checkpoints without a result (or whose weights changed since).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from llm360.analysis import AnalysisError, AnalysisResult
from llm360.analysis.memorization_scores import (
    MemorizationScores,
    memorization_scores,
    reference_scores_transformers,
)
from llm360.config import MemorizationConfig
from llm360.errors import CheckpointError, Llm360Error
from llm360.executor import Shard, Task, TaskError, make_executor, parse_shard
from llm360.log import ProgressTask
from llm360.model.load import load_model, resolve_device
from llm360.rundir.atomic import atomic_path, write_json
from llm360.rundir.checkpoint import model_sha256, verify_model_files
from llm360.rundir.data import DataStore, read_training_record
from llm360.rundir.layout import SUMMARY, RunDir, list_checkpoint_files, list_checkpoints
from llm360.utils import read_json

__all__ = [  # the score itself is memorization_scores', here too for this module's callers
    "MemorizationScores", "analyze_memorization", "memorization_scores", "reference_scores_transformers",
    "sample_rows", "write_summary",
]  # fmt: skip

logger = logging.getLogger(__name__)

FORMAT = "llm360-memorization"
VERSION = 1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Settings that make two results comparable; any difference means "computed differently".
_IDENTITY = ("prompt_tokens", "continuation_tokens", "rows_per_chunk", "seed", "dtype", "suppress_eos",
             "data_fingerprint")
_SAMPLE_IDENTITY = ("rows_per_chunk", "seed", "data_fingerprint")


# ------------------------------------------------------------------------------------ samples


def sample_rows(rows_per_chunk: Sequence[int], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(chunk, row) of n rows drawn without replacement from every chunk (all rows if fewer).

    Chunk c's draw uses its own generator seeded with (seed, c), so adding chunks never changes the
    rows drawn from the others. Rows are sorted within each chunk; chunks are in order.
    """
    chunks, rows = [], []
    for c, total in enumerate(rows_per_chunk):
        take = min(n, int(total))
        pick = np.sort(np.random.default_rng([seed, c]).choice(int(total), size=take, replace=False))
        chunks.append(np.full(take, c, dtype=np.int32))
        rows.append(pick.astype(np.int64))
    if not chunks:
        return np.zeros(0, np.int32), np.zeros(0, np.int64)
    return np.concatenate(chunks), np.concatenate(rows)


def _data_fingerprint(store: DataStore) -> str:
    shas = [str(c.get("sha256", c.get("file"))) for c in store.manifest["chunks"]]
    return hashlib.sha256(json.dumps(shas).encode()).hexdigest()


def _gather(store: DataStore, chunk_N: np.ndarray, row_N: np.ndarray, width: int) -> np.ndarray:
    out = np.empty((len(row_N), width), dtype=np.int64)
    for c in np.unique(chunk_N):
        sel = np.flatnonzero(chunk_N == c)
        out[sel] = store.chunk(int(c))[row_N[sel], :width]
    return out


# ------------------------------------------------------------------------------- checkpoints


def find_checkpoints(checkpoints_dir: Path) -> list[tuple[int, str, Path]]:
    """(chunk index, name, folder) of every ``ckpt_NNN`` folder, by index (temporary folders ignored)."""
    return [(i, p.name, p) for i, p in list_checkpoints(checkpoints_dir)]


def check_complete(folder: Path) -> None:
    """Raise CheckpointError unless folder is a complete checkpoint whose model files (weights, configs)
    match its marker; checked once per process (:func:`~llm360.rundir.checkpoint.verify_model_files`)."""
    verify_model_files(folder)


def _model_sha256(folder: Path) -> str | None:
    """The weights' sha256 as the checkpoint's marker lists it; None without a (valid) marker."""
    try:
        return model_sha256(folder)
    except (CheckpointError, KeyError):
        return None


# ---------------------------------------------------------------------------------- files


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez to a temporary file, fsync, rename: a reader sees the old file or the new one."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _differences(have: dict, want: dict, keys: Sequence[str]) -> list[str]:
    return [f"{k}: {have.get(k)!r} there, {want.get(k)!r} now" for k in keys if have.get(k) != want.get(k)]


def _status(out: Path, name: str, settings: dict, model_sha: str | None) -> str | None:
    """None: no usable result (absent or unreadable); "ok": up to date; "changed": computed for other
    weights; "other-settings": computed with other settings."""
    meta_path, npz_path = out / f"{name}.json", out / f"{name}.npz"
    if not (meta_path.is_file() and npz_path.is_file()):
        return None
    try:
        meta = read_json(meta_path)
        with np.load(npz_path, allow_pickle=False) as z:
            if not {"chunk", "row", "matched"} <= set(z.files):
                return None
    except (OSError, ValueError, zipfile.BadZipFile):
        return None
    if meta.get("format") != FORMAT or _differences(meta.get("settings", {}), settings, _IDENTITY):
        return "other-settings"
    if model_sha is not None and meta.get("model_sha256") not in (None, model_sha):
        return "changed"
    return "ok"


# ------------------------------------------------------------------------------------ driver


def analyze_memorization(
    run_dir: str | Path,
    cfg: MemorizationConfig | None = None,
    *,
    checkpoints: Sequence[str] | None = None,
    force: bool = False,
    executor: str = "local",
    workers: int = 1,
    gpus_per_task: float = 0.0,
    ray_address: str | None = None,
    shard: str | Shard | None = None,
) -> AnalysisResult:
    """Score every complete checkpoint of a run on rows sampled from every chunk; write the summary.

    ``checkpoints`` restricts the work to those names (e.g. ``["ckpt_003"]``); the summary always
    covers every result on disk. Checkpoints with a result are skipped; one whose weights changed
    since is recomputed. A checkpoint that is incomplete or unreadable is reported in
    ``result.failed`` and the others go on. Results computed with other settings (k, l, rows, seed,
    dtype, EOS handling, data) raise AnalysisError before anything is touched, unless ``force``,
    which recomputes everything.

    Each checkpoint is a task (:func:`memorize_checkpoint`) of the executor ``executor`` (``local``
    or ``ray``; ``workers``, ``ray_address``: :func:`llm360.executor.make_executor`), with
    ``gpus_per_task`` GPUs each on Ray. ``shard`` (``"I/N"``): only every N-th checkpoint folder
    (by position among the folders, done or not), starting at I; the summary still covers every
    result on disk, so the shards of a Slurm array merge.
    """
    cfg = cfg or MemorizationConfig()
    run = RunDir(run_dir)
    store = DataStore(run.data)
    k, L = cfg.prompt_tokens, cfg.continuation_tokens
    if k + L > store.row_length:
        raise AnalysisError(
            f"k + l = {k} + {L} tokens do not fit in a training row of {store.row_length} tokens; "
            "lower analysis.memorization.prompt_tokens / continuation_tokens"
        )
    out = run.memorization_dir
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "prompt_tokens": k, "continuation_tokens": L, "rows_per_chunk": cfg.rows_per_chunk, "seed": cfg.seed,
        "dtype": cfg.dtype, "suppress_eos": cfg.suppress_eos, "data_fingerprint": _data_fingerprint(store),
    }  # fmt: skip
    chunk_N, row_N = _samples(out, store, cfg, settings, force)
    result = AnalysisResult("memorization", out)
    skipped = sorted(read_training_record(run.root).skipped_chunks)  # a guard skipped them: never seen

    found = find_checkpoints(run.checkpoints)
    if checkpoints is not None:
        wanted = set(checkpoints)
        unknown = sorted(wanted - {name for _, name, _ in found})
        for name in unknown:
            result.failed[name] = f"no checkpoint folder {run.checkpoints / name}"
        found = [c for c in found if c[1] in wanted]
    part = parse_shard(shard) if isinstance(shard, str) else shard
    found = [c for i, c in enumerate(found) if part is None or i % part.count == part.index]
    todo = []
    for idx, name, path in found:
        status = _status(out, name, settings, _model_sha256(path))
        if status == "other-settings" and not force:
            have = read_json(out / f"{name}.json").get("settings", {})
            raise AnalysisError(
                f"{out / name}.json was computed with other settings ("
                + "; ".join(_differences(have, settings, _IDENTITY))
                + "); restore them, or pass --force to recompute every checkpoint with the new ones"
            )
        if status == "ok" and not force:
            result.reused.append(name)
            continue
        if status == "changed":
            logger.warning("%s: the weights changed since its memorization was computed; recomputing", name)
        todo.append((idx, name, path))

    if todo:
        resolve_device(cfg.device, where="analysis.memorization.device")  # fails before any task runs
        tasks = [Task(f"memorization:{name}", memorize_checkpoint,
                      (str(run.root), cfg, idx, name, str(path), settings, tuple(skipped)), num_gpus=gpus_per_task)
                 for idx, name, path in todo]  # fmt: skip
        with make_executor(executor, workers, ray_address) as ex:
            ex.check_visible(run.root)
            outcomes = ex.run(tasks, progress_label="memorization: checkpoints", unit="checkpoints", keep_going=True)
        for (_, name, _), outcome in zip(todo, outcomes, strict=True):
            if isinstance(outcome, TaskError):  # the task itself broke (a bug, a worker lost for good)
                result.failed[name] = f"failed: {outcome.error_type}: {outcome.message}"
            elif outcome is not None:
                result.failed[name] = f"skipped: {outcome}"  # reported by the caller (result.failed)
            else:
                result.computed.append(name)
    result.summary = write_summary(out, store.num_chunks, settings, skipped)
    return result


def _samples(out: Path, store: DataStore, cfg: MemorizationConfig, settings: dict, force: bool):
    chunk_N, row_N = sample_rows(store.rows_per_chunk, cfg.rows_per_chunk, cfg.seed)
    meta_path = out / "samples.json"
    if meta_path.is_file() and not force:
        have = read_json(meta_path).get("settings", {})
        diff = _differences(have, settings, _SAMPLE_IDENTITY)
        if diff:
            raise AnalysisError(
                f"{out}/samples.* were drawn with other settings ({'; '.join(diff)}); "
                "restore them, or pass --force to redraw and recompute everything"
            )
        return chunk_N, row_N
    _save_npz(out / "samples.npz", chunk=chunk_N, row=row_N)
    write_json(meta_path, {
        "format": FORMAT, "version": VERSION, "rows": len(row_N),
        "settings": {k: settings[k] for k in _SAMPLE_IDENTITY},
        "how": "rows drawn without replacement from each chunk c with numpy default_rng([seed, c]), sorted",
    })  # fmt: skip
    return chunk_N, row_N


_rows_cache: tuple[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray, int | None]] | None = None


def _sampled_rows(run: RunDir, cfg: MemorizationConfig, settings: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, int | None]:
    """(chunk_N, row_N, ids_NT, eos_id) of the sampled rows, read once per process for these settings."""
    global _rows_cache
    key = (str(run.root.resolve()), json.dumps(settings, sort_keys=True))
    if _rows_cache is None or _rows_cache[0] != key:
        store = DataStore(run.data)
        chunk_N, row_N = sample_rows(store.rows_per_chunk, cfg.rows_per_chunk, cfg.seed)
        ids_NT = _gather(store, chunk_N, row_N, cfg.prompt_tokens + cfg.continuation_tokens)
        eos_id = int(store.manifest["eos_id"]) if cfg.suppress_eos else None
        _rows_cache = (key, (chunk_N, row_N, ids_NT, eos_id))
    return _rows_cache[1]


def memorize_checkpoint(
    run_dir: str, cfg: MemorizationConfig, idx: int, name: str, path: str, settings: dict, skipped: Sequence[int]
) -> str | None:
    """Score one checkpoint and write its result (an executor task); None when done, else why it was
    skipped (incomplete, damaged, unreadable: the others go on)."""
    run = RunDir(run_dir)
    try:
        chunk_N, row_N, ids_NT, eos_id = _sampled_rows(run, cfg, settings)
        device = resolve_device(cfg.device, where="analysis.memorization.device")
        _one_checkpoint(run.memorization_dir, idx, name, Path(path), ids_NT, chunk_N, row_N, cfg, settings, device,
                        eos_id, None, skipped)  # fmt: skip
    except Llm360Error as e:
        logger.debug("%s: skipped: %s", name, e)
        return str(e)
    return None


def _one_checkpoint(
    out: Path, idx: int, name: str, path: Path, ids_NT: np.ndarray, chunk_N: np.ndarray, row_N: np.ndarray,
    cfg: MemorizationConfig, settings: dict, device: torch.device, eos_id: int | None, bar: ProgressTask | None,
    skipped: Sequence[int] = (),
) -> None:  # fmt: skip
    check_complete(path)
    model_sha = _model_sha256(path)
    model = load_model(path, _DTYPES[cfg.dtype], device)
    t0 = time.perf_counter()
    scores = memorization_scores(
        model, ids_NT, cfg.prompt_tokens, cfg.continuation_tokens, batch_size=cfg.batch_size, eos_id=eos_id, bar=bar
    )
    seconds = time.perf_counter() - t0
    arrays = {"chunk": chunk_N, "row": row_N, "matched": scores.matched, "first_mismatch": scores.first_mismatch,
              "score": scores.score}  # fmt: skip
    if cfg.save_generated:
        arrays["generated"] = scores.generated.astype(np.int32)
    (out / f"{name}.json").unlink(missing_ok=True)  # the .json marks a finished result: drop it first
    _save_npz(out / f"{name}.npz", **arrays)
    seen = (chunk_N <= idx) & ~np.isin(chunk_N, skipped)
    write_json(out / f"{name}.json", {
        "format": FORMAT, "version": VERSION, "checkpoint": name, "chunk": idx,
        "settings": settings, "device": str(device), "torch": torch.__version__,
        "model_sha256": model_sha, "rows": len(row_N), "seconds": round(seconds, 3),
        "rows_per_second": round(len(row_N) / seconds, 2) if seconds > 0 else None,
        "mean_score_seen": _mean(scores.score[seen]), "mean_score_unseen": _mean(scores.score[~seen]),
        "extractible_seen": int((scores.first_mismatch[seen] == cfg.continuation_tokens).sum()),
    })  # fmt: skip
    logger.info("%s: %d rows in %.1f s, mean score on seen chunks %s", name, len(row_N), seconds,
                _mean(scores.score[seen]))


def _mean(x: np.ndarray) -> float | None:
    return round(float(x.mean()), 6) if x.size else None


# ------------------------------------------------------------------------------------ summary


def write_summary(out: Path, num_chunks: int, settings: dict, skipped_chunks: Sequence[int] = ()) -> Path | None:
    """Rebuild ``summary.json`` from every per-checkpoint result with these settings; None if none.

    A checkpoint has seen the chunks up to its own, except ``skipped_chunks`` (skipped by a guard).

    * ``distribution`` (fig. 7): per checkpoint, over the rows of the chunks it has seen: how many
      rows scored j/l for j = 0..l, the mean score and the share of k-extractible rows (score 1);
      the same over the chunks it has not seen under ``distribution_unseen``.
    * ``per_chunk`` (fig. 8): per checkpoint, mean score and extractible share of every chunk, with
      ``latest_seen_chunk`` (chunks after it are not yet trained on).
    * ``correlation`` (fig. 9): Pearson correlation between two checkpoints of the per-row scores
      and of the per-row extractibility (0/1), over the rows of the chunks both have seen.
    """
    names, idx, scores, matched = [], [], [], []
    L = settings["continuation_tokens"]
    chunk_N = None
    for _, meta_path in list_checkpoint_files(out, ".json"):
        name = meta_path.stem
        try:
            meta = read_json(meta_path)
            if meta.get("format") != FORMAT or _differences(meta.get("settings", {}), settings, _IDENTITY):
                continue
            arr = _load_npz(out / f"{name}.npz")
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            logger.warning("%s: unreadable result left out of the summary: %s", name, e)
            continue
        if chunk_N is None:
            chunk_N = arr["chunk"]
        elif not np.array_equal(chunk_N, arr["chunk"]):
            logger.warning("%s: sampled rows differ from the other results; left out of the summary", name)
            continue
        names.append(name)
        idx.append(int(meta["chunk"]))
        matched.append(arr["matched"].astype(np.int64))
        scores.append(arr["matched"] / L)
    if not names or chunk_N is None:
        return None
    order = np.argsort(idx, kind="stable")
    names = [names[i] for i in order]
    ckpt_chunk = np.asarray([idx[i] for i in order])
    X_CN = np.stack([scores[i] for i in order])
    M_CN = np.stack([matched[i] for i in order])
    E_CN = (M_CN == L).astype(np.float64)
    chunks = np.arange(num_chunks)
    dist, dist_unseen, per_chunk = {}, {}, {}
    for j, name in enumerate(names):
        seen = (chunk_N <= ckpt_chunk[j]) & ~np.isin(chunk_N, skipped_chunks)
        for target, sel in ((dist, seen), (dist_unseen, ~seen)):
            target[name] = {
                "rows": int(sel.sum()),
                "counts": np.bincount(M_CN[j, sel], minlength=L + 1).tolist(),
                "mean": _mean(X_CN[j, sel]),
                "extractible": int(E_CN[j, sel].sum()),
                "extractible_share": _mean(E_CN[j, sel]),
            }
        per_chunk[name] = {
            "latest_seen_chunk": int(min(ckpt_chunk[j], num_chunks - 1)),
            "mean": [_mean(X_CN[j, chunk_N == c]) for c in chunks],
            "extractible_share": [_mean(E_CN[j, chunk_N == c]) for c in chunks],
        }
    summary = {
        "format": FORMAT + "-summary", "version": VERSION, "settings": settings,
        "checkpoints": names, "checkpoint_chunk": ckpt_chunk.tolist(), "num_chunks": num_chunks,
        "rows_per_chunk": np.bincount(chunk_N, minlength=num_chunks).tolist(),
        "skipped_chunks": [int(c) for c in skipped_chunks],
        "score_values": [j / L for j in range(L + 1)],
        "distribution": dist, "distribution_unseen": dist_unseen, "per_chunk": per_chunk,
        "correlation": {
            "rows": "rows of the chunks both checkpoints have seen (chunks 0..min(i, j))",
            "score_pearson": _nested(_pearson_seen(X_CN, chunk_N, ckpt_chunk, skipped_chunks)),
            "extractible_pearson": _nested(_pearson_seen(E_CN, chunk_N, ckpt_chunk, skipped_chunks)),
        },
    }  # fmt: skip
    path = out / SUMMARY
    write_json(path, summary)
    return path


def _nested(m: np.ndarray) -> list[list[float | None]]:
    return [[None if not np.isfinite(v) else round(float(v), 6) for v in row] for row in m]


def _pearson_seen(
    X_CN: np.ndarray, chunk_N: np.ndarray, ckpt_chunk: np.ndarray, skipped_chunks: Sequence[int] = ()
) -> np.ndarray:
    """Pearson r of rows a and b of X over the samples of chunks <= min(ckpt_chunk[a], ckpt_chunk[b]),
    less the chunks a guard skipped.

    Running sums over chunks in order (one C x C Gram matrix update per chunk), so C checkpoints
    cost one pass over the N x C scores. NaN where a vector is constant.
    """
    C = X_CN.shape[0]
    r = np.full((C, C), np.nan)
    S_CC = np.zeros((C, C))
    s_C = np.zeros(C)
    n = 0
    last = int(ckpt_chunk.max()) if C else -1
    bounds = np.searchsorted(chunk_N, np.arange(last + 2), side="left")
    for c in range(last + 1):
        if c not in skipped_chunks:
            X = X_CN[:, bounds[c] : bounds[c + 1]].astype(np.float64)
            S_CC += X @ X.T
            s_C += X.sum(axis=1)
            n += X.shape[1]
        for a in np.flatnonzero(ckpt_chunk == c):
            bs = np.flatnonzero(ckpt_chunk >= c)
            if n < 2:
                continue
            cov = S_CC[a, bs] - s_C[a] * s_C[bs] / n
            var_a = S_CC[a, a] - s_C[a] ** 2 / n
            var_b = S_CC[bs, bs] - s_C[bs] ** 2 / n
            ok = (var_a > 1e-12 * n) & (var_b > 1e-12 * n)
            vals = np.where(ok, cov / np.sqrt(np.where(ok, var_a * var_b, 1.0)), np.nan)
            r[a, bs] = vals
            r[bs, a] = vals
    return r
