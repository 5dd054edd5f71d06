"""Export chunks in LLM360's released format, and the config that imports them back.

One JSON object per line, ``{"token_ids": [... seq_len + 1 ids ...], "source": "<name>"}``, one
file per chunk (``train_000.jsonl`` ...). A row that spans documents of several sources is
labelled with the source holding most of its tokens. Preparing the written ``import.yaml``
reproduces the chunk files byte for byte.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import yaml

from llm360.executor import Executor, InProcessExecutor, Task
from llm360.rundir.atomic import atomic_path
from llm360.rundir.data import DataStore
from llm360.rundir.layout import index_name

logger = logging.getLogger(__name__)


def export_chunk(data_dir: str, chunk: int, path: str) -> str:
    """Write one chunk as LLM360 JSONL (under a temporary name, renamed when complete); returns the path.

    A task of :func:`export_llm360_jsonl`'s plan: one per chunk, so any executor gives the same files.
    """
    store = DataStore(data_dir)
    names = store.manifest["source_names"]
    arr = store.chunk(chunk)
    prov = store.provenance(chunk)
    # majority source per row, by tokens (ties: the lower source index)
    weights = np.zeros((arr.shape[0], len(names)), dtype=np.int64)
    np.add.at(weights, (prov["row"].astype(np.int64), prov["source"].astype(np.int64)), prov["length"])
    label = weights.argmax(axis=1)
    with atomic_path(Path(path)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in range(arr.shape[0]):
            f.write(json.dumps({"token_ids": arr[r].tolist(), "source": names[int(label[r])]},
                               separators=(",", ":")) + "\n")
    return path


def export_llm360_jsonl(data_dir: str | Path, out_dir: str | Path, *, executor: Executor | None = None) -> list[Path]:
    """Write train_NNN.jsonl for every chunk plus import.yaml; returns the chunk files.

    One task per chunk, run by ``executor`` (default: in this process); each file is written under
    a temporary name and renamed, so an interrupted export leaves no half file.
    """
    store = DataStore(data_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / f"train_{index_name(c)}.jsonl" for c in range(store.num_chunks)]
    tasks = [Task(f"export:chunk_{index_name(c)}", export_chunk, (str(store.dir), c, str(files[c])))
             for c in range(store.num_chunks)]
    ex = executor if executor is not None else InProcessExecutor(1)
    try:
        ex.run(tasks, progress_label="exporting chunks", unit="chunks")
    finally:
        if executor is None:
            ex.close()
    tok_dir = (store.dir / "tokenizer").resolve()
    import_cfg = {
        "name": "llm360-import",
        "data": {
            "seq_len": store.seq_len,
            "sources": [{"name": "llm360", "kind": "llm360", "paths": [str((out / "train_*.jsonl").resolve())]}],
            "chunks": store.num_chunks,
            "valid_fraction": 0.0,
            "token_dtype": store.dtype.name,
            "tokenizer": (
                {"kind": "file", "path": str(tok_dir), "eos_token": _eos_token(store)}
                if tok_dir.is_dir()
                else {"kind": "none", "vocab_size": store.vocab_size}
            ),
        },
    }
    (out / "import.yaml").write_text(yaml.safe_dump(import_cfg, sort_keys=False))
    logger.info("exported %d chunk files to %s (re-import with: llm360 prepare %s)",
                len(files), out, out / "import.yaml")
    return files


def _eos_token(store: DataStore) -> str:
    meta = json.loads((store.dir / "tokenizer" / "llm360_tokenizer.json").read_text())
    return str(meta["eos_token"])
