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

from llm360.log import progress
from llm360.rundir.data import DataStore
from llm360.rundir.layout import index_name

logger = logging.getLogger(__name__)


def export_llm360_jsonl(data_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Write train_NNN.jsonl for every chunk plus import.yaml; returns the chunk files."""
    store = DataStore(data_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = store.manifest["source_names"]
    files = []
    with progress("exporting chunks", total=store.num_chunks, unit="chunks") as bar:
        for c in range(store.num_chunks):
            arr = store.chunk(c)
            prov = store.provenance(c)
            # majority source per row, by tokens (ties: the lower source index)
            weights = np.zeros((arr.shape[0], len(names)), dtype=np.int64)
            np.add.at(weights, (prov["row"].astype(np.int64), prov["source"].astype(np.int64)), prov["length"])
            label = weights.argmax(axis=1)
            path = out / f"train_{index_name(c)}.jsonl"
            with open(path, "w", encoding="utf-8") as f:
                for r in range(arr.shape[0]):
                    f.write(json.dumps({"token_ids": arr[r].tolist(), "source": names[int(label[r])]},
                                       separators=(",", ":")) + "\n")
            files.append(path)
            bar.advance(1)
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
