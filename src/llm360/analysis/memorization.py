"""Memorization of the training data, checkpoint by checkpoint (LLM360's Analysis360).

The score (LLM360 paper, section 4.3, after Biderman et al. 2023): take a training row, give its
first ``k`` tokens as the prompt, generate ``l`` tokens greedily, and count the share of generated
tokens equal to the row's true tokens ``k .. k+l-1`` at the same position. A row is
*k-extractible* when the score is 1. The paper uses k = l = 32 and 1000 rows per chunk, and scores
every checkpoint on every chunk, those it has seen (chunks ``0..i`` for ``ckpt_i``, less those a
guard skipped: :func:`~llm360.rundir.data.read_training_record`) and the rest.

Exact and fast. Greedy generation equals the true continuation up to the first position where the
model's prediction given the *true* prefix is wrong. So a teacher-forced forward pass over
``prompt + true continuation`` (with a KV cache) gives, for every row, the predictions at all l
positions at once (it runs in stages of 1, 2, 4, ... positions so that rows leaving the truth
early stop being teacher-forced early):

* rows whose l predictions all equal the truth are settled: greedy generation reproduces the
  truth, score 1, no generation at all;
* every other row has a first mismatch ``m``: its greedy output is ``truth[:m] + [pred[m]]`` and
  the cache already holds the keys and values of ``prompt + truth[:m]`` (identical to what
  generation would have computed), so generation continues from position ``k + m`` with the
  mismatched token, for only ``l - 1 - m`` more steps.

The continuing rows are decoded together in one batch although each sits at its own position:
:func:`~llm360.model.llama.decode_step` gives every row its own rotary position and its own attention length. Rows
are sorted by how many steps they need, so the rows still running are always a prefix of the
batch (views, never copies). "Exact" means the same arithmetic as step-by-step greedy decoding;
two implementations can still disagree where two logits tie to within rounding, as any two
greedy decoders can (the parity test and benchmark compare with transformers' ``generate``).

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

import copy
import hashlib
import json
import logging
import math
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llm360.analysis import AnalysisError, AnalysisResult
from llm360.config import MemorizationConfig
from llm360.errors import CheckpointError, Llm360Error
from llm360.log import ProgressTask, progress
from llm360.model.llama import KVCache, Llama, decode_step
from llm360.model.load import load_model, resolve_device
from llm360.rundir.atomic import atomic_path, write_json
from llm360.rundir.checkpoint import read_marker, verify_checkpoint
from llm360.rundir.data import DataStore, read_training_record
from llm360.rundir.layout import MODEL_FILE, RunDir, list_checkpoints
from llm360.utils import read_json

logger = logging.getLogger(__name__)

FORMAT = "llm360-memorization"
VERSION = 1
OUT_SUBDIR = ("analysis", "memorization")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Settings that make two results comparable; any difference means "computed differently".
_IDENTITY = ("prompt_tokens", "continuation_tokens", "rows_per_chunk", "seed", "dtype", "suppress_eos",
             "data_fingerprint")
_SAMPLE_IDENTITY = ("rows_per_chunk", "seed", "data_fingerprint")


# ------------------------------------------------------------------------------------ scores


@dataclass
class MemorizationScores:
    """Per-row results for N rows with continuation length l."""

    matched: np.ndarray
    """(N,) int16: generated tokens equal to the true continuation at the same position."""
    first_mismatch: np.ndarray
    """(N,) int16: first position (0..l-1) where generation leaves the truth; l if it never does."""
    generated: np.ndarray
    """(N, l) int64: the greedy continuation."""

    @property
    def score(self) -> np.ndarray:
        """(N,) float32: matched / l, the memorization score."""
        return (self.matched / self.generated.shape[1]).astype(np.float32)


def _argmax(logits: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    if eos_id is not None:
        logits = logits.clone()
        logits[..., eos_id] = -math.inf
    return logits.argmax(dim=-1)


def _teacher_stages(k: int, L: int) -> list[tuple[int, int]]:
    """Position ranges of the teacher-forced passes: the prompt, then blocks of 1, 2, 4, ... truth tokens."""
    stages, start, size = [(0, k)], k, 1
    while start < k + L - 1:
        stages.append((start, min(start + size, k + L - 1)))
        start, size = start + size, 2 * size
    return stages


def _score_batch(model: Llama, ids_BT: torch.Tensor, k: int, L: int, eos_id: int | None) -> torch.Tensor:
    """Greedy continuations (B, l) of the k-token prompts of ids_BT (see the module docstring).

    Teacher forcing runs in stages (the prompt, then 1, 2, 4, ... truth tokens), each over only
    the rows that have matched the truth so far, which are kept at the front of the cache: a row
    that leaves the truth at continuation position m has cost about m teacher-forced positions
    more than greedy decoding itself, instead of l.
    """
    p = next(model.parameters())
    B = ids_BT.shape[0]
    cache = KVCache(model.cfg, B, k + L - 1, p.device, p.dtype)
    big_k, big_v = cache.k_BKSE, cache.v_BKSE
    rows = torch.arange(B, device=ids_BT.device)  # cache slot -> row
    ids = ids_BT
    pred_BL = ids_BT.new_zeros(B, L)
    first_B = torch.full((B,), L, dtype=torch.long, device=ids_BT.device)
    n = B  # slots 0..n-1 hold the rows that still match the truth
    for start, end in _teacher_stages(k, L):
        cache.k_BKSE, cache.v_BKSE = [t[:n] for t in big_k], [t[:n] for t in big_v]
        cache.length = start
        h_nTD = model.model(ids[:n, start:end], cache)
        j0 = start - (k - 1)  # continuation index predicted by this stage's first position
        h_nTD = h_nTD[:, max(0, -j0) :]
        j0 = max(j0, 0)
        pred = _argmax(model._head(h_nTD), eos_id)  # (n, positions of this stage with a prediction)
        if pred.shape[1] == 0:
            continue
        j1 = j0 + pred.shape[1]
        miss = pred != ids[:n, k + j0 : k + j1]
        left = miss.any(dim=1)
        pred_BL[rows[:n], j0:j1] = pred
        first_B[rows[:n][left]] = j0 + miss[left].int().argmax(dim=1)
        if left.any():  # move the rows still matching to the front (one copy of the cache rows)
            perm = torch.cat((torch.nonzero(~left).squeeze(1), torch.nonzero(left).squeeze(1)))
            for t in big_k + big_v:
                t[:n] = t[:n].index_select(0, perm)
            rows[:n] = rows[:n][perm]
            ids = ids.clone() if ids is ids_BT else ids
            ids[:n] = ids[:n][perm]
            n = int((~left).sum())
        if n == 0:
            break
    gen_BL = pred_BL  # right up to and including the first mismatch; later positions are decoded below
    slot_of = torch.empty_like(rows)
    slot_of[rows] = torch.arange(B, device=rows.device)
    active = torch.nonzero(first_B < L - 1).squeeze(1)
    if active.numel() == 0:
        return gen_BL
    active = active[torch.argsort(first_B[active], stable=True)]  # fewest steps last: running rows = a prefix
    first_A = first_B[active]
    steps = (L - 1 - first_A).tolist()
    k_cache = [t.index_select(0, slot_of[active]) for t in big_k]
    v_cache = [t.index_select(0, slot_of[active]) for t in big_v]
    del cache, big_k, big_v
    tok = pred_BL[active, first_A]  # the first wrong token: generation's input at position k + m
    pos = k + first_A
    n = len(steps)
    for s in range(steps[0]):
        while n and steps[n - 1] <= s:
            n -= 1
        tok = _argmax(decode_step(model, tok[:n], pos[:n] + s, k_cache, v_cache), eos_id)
        gen_BL[active[:n], first_A[:n] + 1 + s] = tok
    return gen_BL


@torch.no_grad()
def memorization_scores(
    model: Llama,
    ids: np.ndarray | torch.Tensor,
    prompt_tokens: int,
    continuation_tokens: int,
    *,
    batch_size: int = 64,
    eos_id: int | None = None,
    bar: ProgressTask | None = None,
) -> MemorizationScores:
    """Memorization scores of N rows: prompt ``ids[:, :k]``, truth ``ids[:, k:k+l]``.

    ``ids`` is (N, >= k + l) token ids. ``eos_id`` set: that token is never generated (transformers'
    ``min_new_tokens``); None: plain greedy. Runs on the model's device and dtype, in eval mode
    (restored after). Batches of ``batch_size`` rows; the result never depends on it.
    """
    k, L = prompt_tokens, continuation_tokens
    ids_NT = torch.as_tensor(np.asarray(ids) if not isinstance(ids, torch.Tensor) else ids).long()
    if ids_NT.ndim != 2 or ids_NT.shape[1] < k + L:
        raise AnalysisError(f"rows of shape {tuple(ids_NT.shape)} are too short for k={k} + l={L} tokens")
    if k + L - 1 > (model.cfg.max_seq_len or 0):
        raise AnalysisError(f"k + l = {k + L} tokens exceed the model's max_seq_len {model.cfg.max_seq_len}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, ids_NT.shape[0], batch_size):
            batch = ids_NT[i : i + batch_size, : k + L].to(device)
            out.append(_score_batch(model, batch, k, L, eos_id).cpu())
            if bar is not None:
                bar.advance(batch.shape[0])
    finally:
        model.train(was_training)
    gen_NL = torch.cat(out) if out else torch.zeros(0, L, dtype=torch.long)
    return _scores_of(gen_NL.numpy(), ids_NT[:, k : k + L].numpy())


def _scores_of(gen_NL: np.ndarray, truth_NL: np.ndarray) -> MemorizationScores:
    eq = gen_NL == truth_NL
    first = np.where(eq.all(axis=1), gen_NL.shape[1], np.argmin(eq, axis=1))
    return MemorizationScores(eq.sum(axis=1).astype(np.int16), first.astype(np.int16), gen_NL.astype(np.int64))


@torch.no_grad()
def reference_scores_transformers(
    folder: str | Path | torch.nn.Module,
    ids: np.ndarray | torch.Tensor,
    prompt_tokens: int,
    continuation_tokens: int,
    *,
    batch_size: int = 32,
    suppress_eos: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> MemorizationScores:
    """The same scores the Analysis360 way: ``AutoModelForCausalLM.generate`` on the folder, greedy.

    ``folder`` may also be a model already loaded with ``from_pretrained`` (to time generation alone).

    The reference for the parity test and the benchmark. Without ``suppress_eos`` EOS stopping is
    switched off (generation_config.eos_token_id = None), so every row gets exactly l tokens and
    EOS is an ordinary token; with it, ``min_new_tokens = l`` (transformers then masks EOS at every
    step). ``pad_token_id`` is set so generate never warns or pads.
    """
    from transformers import AutoModelForCausalLM

    k, L = prompt_tokens, continuation_tokens
    ids_NT = torch.as_tensor(np.asarray(ids) if not isinstance(ids, torch.Tensor) else ids).long()
    if isinstance(folder, torch.nn.Module):
        ref = folder.eval()
        device = next(ref.parameters()).device
    else:
        ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(device).eval()
    # Set on the model's own generation_config: transformers fills what a passed config leaves unset
    # (eos_token_id = None among them) from the model's, so passing a modified copy does not switch
    # EOS stopping off. Restored afterwards.
    gen_cfg = ref.generation_config
    saved = copy.deepcopy(gen_cfg)
    eos = gen_cfg.eos_token_id
    gen_cfg.pad_token_id = eos if isinstance(eos, int) else 0
    kwargs: dict[str, Any] = {"do_sample": False, "num_beams": 1, "max_new_tokens": L}
    if suppress_eos:
        kwargs["min_new_tokens"] = L
    else:
        gen_cfg.eos_token_id = None
    out = []
    try:
        for i in range(0, ids_NT.shape[0], batch_size):
            prompt = ids_NT[i : i + batch_size, :k].to(device)
            res = ref.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
            out.append(res[:, k:].cpu())
    finally:
        ref.generation_config = saved
    gen_NL = torch.cat(out) if out else torch.zeros(0, L, dtype=torch.long)
    if gen_NL.shape[1] != L:
        raise AnalysisError(f"transformers generated {gen_NL.shape[1]} tokens per row, expected {L}")
    return _scores_of(gen_NL.numpy(), ids_NT[:, k : k + L].numpy())


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
    """Raise CheckpointError unless folder is a complete checkpoint (marker present, every hash right)."""
    verify_checkpoint(folder)


def _model_sha256(folder: Path) -> str | None:
    """The weights' sha256 as the checkpoint's marker lists it; None without a (valid) marker."""
    try:
        return str(read_marker(folder)[MODEL_FILE]["sha256"])
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
) -> AnalysisResult:
    """Score every complete checkpoint of a run on rows sampled from every chunk; write the summary.

    ``checkpoints`` restricts the work to those names (e.g. ``["ckpt_003"]``); the summary always
    covers every result on disk. Checkpoints with a result are skipped; one whose weights changed
    since is recomputed. A checkpoint that is incomplete or unreadable is reported in
    ``result.failed`` and the others go on. Results computed with other settings (k, l, rows, seed,
    dtype, EOS handling, data) raise AnalysisError before anything is touched, unless ``force``,
    which recomputes everything.
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
    out = run.root.joinpath(*OUT_SUBDIR)
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

    eos_id = int(store.manifest["eos_id"]) if cfg.suppress_eos else None
    if todo:
        device = resolve_device(cfg.device, where="analysis.memorization.device")
        ids_NT = _gather(store, chunk_N, row_N, k + L)
        with progress("memorization", total=len(todo) * len(row_N), unit="rows") as bar:
            for idx, name, path in todo:
                try:
                    _one_checkpoint(out, idx, name, path, ids_NT, chunk_N, row_N, cfg, settings, device, eos_id, bar,
                                    skipped)
                    result.computed.append(name)
                except Llm360Error as e:
                    result.failed[name] = f"skipped: {e}"  # reported by the caller (result.failed)
                    logger.debug("%s: skipped: %s", name, e)
                    bar.advance(len(row_N))
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


def _one_checkpoint(
    out: Path, idx: int, name: str, path: Path, ids_NT: np.ndarray, chunk_N: np.ndarray, row_N: np.ndarray,
    cfg: MemorizationConfig, settings: dict, device: torch.device, eos_id: int | None, bar: ProgressTask,
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
    for meta_path in sorted(out.glob("ckpt_*.json")):
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
    path = out / "summary.json"
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
