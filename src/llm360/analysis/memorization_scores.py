"""The memorization score of rows under one model, exactly as greedy generation would give it.

The score (LLM360 paper, section 4.3, after Biderman et al. 2023): take a training row, give its
first ``k`` tokens as the prompt, generate ``l`` tokens greedily, and count the share of generated
tokens equal to the row's true tokens ``k .. k+l-1`` at the same position. A row is
*k-extractible* when the score is 1. :mod:`llm360.analysis.memorization` scores every checkpoint
of a run with it.

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
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llm360.analysis import AnalysisError
from llm360.log import ProgressTask
from llm360.model.llama import KVCache, Llama, decode_step


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
