"""Held-out perplexity: mean token NLL on the validation rows of each source, and its exp.

``prepare`` holds out a share of each source's documents (``data.valid_fraction``) and packs them
into ``data/valid/<source>.npy``, rows of ``seq_len + 1`` tokens. Every row is scored the way
training scores a row (inputs ``row[:-1]``, targets ``row[1:]``), so the numbers compare directly
with the training loss. The first ``max_rows`` rows of each source are used, always the same ones,
so two checkpoints are scored on identical tokens. ``overall`` is exp(total NLL / total tokens)
over the rows scored of all sources.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llm360.errors import DataError
from llm360.log import progress
from llm360.model.llama import Llama
from llm360.rundir.data import DataStore
from llm360.rundir.layout import data_manifest


def validation_sources(data_dir: Path) -> tuple[DataStore | None, list[str], str | None]:
    """(store, sources with held-out rows, why perplexity cannot run or None)."""
    if not data_manifest(data_dir).is_file():
        return None, [], (
            f"no prepared data in {data_dir}: perplexity needs the run's held-out split "
            "(run `llm360 prepare` on this run directory, or leave `perplexity` out of the tasks)"
        )
    try:
        store = DataStore(data_dir)
    except DataError as e:
        return None, [], f"cannot read the prepared data: {e}"
    valid = store.manifest.get("valid") or {}
    sources = [s for s, meta in valid.items() if meta and int(meta.get("rows", 0)) > 0]
    if not sources:
        frac = (store.manifest.get("data_config") or {}).get("valid_fraction")
        if frac:  # asked for, but too few documents fell in the held-out share to fill one row
            return store, [], (
                f"this run has no validation rows: data.valid_fraction = {frac} held out less than one "
                "sequence of tokens per source; held-out perplexity is skipped; prepare with a larger "
                "data.valid_fraction to get it"
            )
        return store, [], (
            "this run has no validation split"
            + (f" (data.valid_fraction = {frac} when it was prepared)" if frac is not None else "")
            + ": held-out perplexity is skipped; prepare with data.valid_fraction > 0 to get it"
        )
    return store, sources, None


@torch.no_grad()
def heldout_perplexity(
    model: Llama,
    store: DataStore,
    sources: list[str],
    *,
    max_rows: int | None,
    batch_size: int,
) -> dict[str, Any]:
    """Per source and overall: rows, tokens, summed and mean NLL (nats/token) and perplexity."""
    device = next(model.parameters()).device
    vocab = model.cfg.vocab_size
    assert vocab is not None
    per_source: dict[str, dict[str, Any]] = {}
    plan = {}
    for src in sources:
        rows = store.valid(src)
        if rows is None or len(rows) == 0:
            continue
        plan[src] = (rows, len(rows) if max_rows is None else min(max_rows, len(rows)))
    with progress("perplexity", total=sum(n for _, n in plan.values()), unit="rows") as bar:
        for src, (rows, n) in plan.items():
            nll, tokens = 0.0, 0
            for start in range(0, n, batch_size):
                batch = torch.from_numpy(np.asarray(rows[start : min(start + batch_size, n)], dtype=np.int64))
                if int(batch.max()) >= vocab:
                    raise DataError(
                        f"held-out rows of {src!r} hold token id {int(batch.max())}, beyond the model's "
                        f"vocabulary of {vocab}: this checkpoint was not trained with this run's tokenizer"
                    )
                batch = batch.to(device)
                _, loss = model(batch[:, :-1], batch[:, 1:], reduction="sum")
                nll += float(loss)
                tokens += batch[:, 1:].numel()
                bar.advance(batch.shape[0])
            per_source[src] = _stats(nll, tokens, n, len(rows))
    total_nll = sum(s["nll_sum"] for s in per_source.values())
    total_tokens = sum(s["tokens"] for s in per_source.values())
    overall = _stats(total_nll, total_tokens, sum(s["rows"] for s in per_source.values()),
                     sum(s["rows_available"] for s in per_source.values()))  # fmt: skip
    return {"overall": overall, "sources": per_source}


def _stats(nll: float, tokens: int, rows: int, available: int) -> dict[str, Any]:
    mean = nll / tokens if tokens else float("nan")
    return {
        "rows": rows,
        "rows_available": available,
        "tokens": tokens,
        "nll_sum": nll,
        "mean_nll": mean,
        "perplexity": math.exp(mean) if tokens and mean < 700 else None,
    }
