"""Loader for llm360's demo tasks: JSONL files shipped beside these YAML files, read offline.

Used by the task YAML as ``custom_dataset: !function utils.load_jsonl``; lm-eval calls it with
the task's ``dataset_kwargs`` (``file``: a name in ``data/``) and ``metadata``. The rows are
built in memory, so nothing is downloaded and nothing is written to the datasets cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent / "data"


def load_jsonl(file: str, split: str = "test", **_metadata: Any) -> Any:
    """A DatasetDict with one split (`split`) holding the rows of data/<file>."""
    import datasets

    path = DATA_DIR / file
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})
