"""The examples of evaluation sets, as text: JSONL files and lm-eval tasks, read offline.

:func:`load_tasks` turns each task spec of ``analysis.contamination.tasks`` into a :class:`TaskDocs`:

* a JSONL file (``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``, ``.json``, ``.ndjson``): the
  ``text_field`` of every line (:func:`read_jsonl_task`);
* an lm-eval task name, or an lm-eval task YAML file: every evaluation document as one text, its
  decontamination query where the task defines one, else prompt, delimiter and gold answer
  (:class:`LmEvalTasks`). Hugging Face datasets are read from the local cache only; a task whose data
  is not there is reported with what to do.

A spec that cannot be read is reported by name with the reason, and the others are still read.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm360.analysis import AnalysisError
from llm360.config import ContaminationConfig
from llm360.errors import Llm360Error

logger = logging.getLogger(__name__)

_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".ndjson")
_YAML_SUFFIXES = (".yaml", ".yml")


@dataclass
class TaskDocs:
    """The examples of one evaluation set, as text."""

    name: str
    """Output name (``analysis/contamination/<name>.json``)."""
    source: str
    """Where they came from: ``jsonl:<path>`` or ``lm-eval:<task>``."""
    texts: list[str]


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "task"


def _is_file_spec(spec: str) -> bool:
    low = spec.lower()
    return low.endswith(_JSONL_SUFFIXES + _YAML_SUFFIXES) or Path(spec).is_file()


def read_jsonl_task(path: str | Path, text_field: str = "text", limit: int | None = None) -> list[str]:
    """The ``text_field`` of every line of a JSONL file (.gz/.zst too); AnalysisError names the bad line."""
    from llm360.data.sources import _open_lines

    p = Path(path)
    if not p.is_file():
        raise AnalysisError(f"task file {p} not found")
    texts: list[str] = []
    try:
        raw, stream, _ = _open_lines(p)
    except Llm360Error as e:
        raise AnalysisError(str(e)) from None
    lineno = 0
    try:
        for lineno, line in enumerate(stream, 1):  # noqa: B007 (used in the except below)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except UnicodeDecodeError:
                raise AnalysisError(f"{p} line {lineno}: not UTF-8 text") from None
            except json.JSONDecodeError as e:
                raise AnalysisError(
                    f"{p} line {lineno}: not valid JSON ({e.msg} at column {e.colno}); fix or remove that line"
                ) from None
            value = obj.get(text_field) if isinstance(obj, dict) else None
            if not isinstance(value, str):
                what = f"fields: {', '.join(sorted(obj))}" if isinstance(obj, dict) else f"a JSON {type(obj).__name__}"
                raise AnalysisError(
                    f"{p} line {lineno}: no text field '{text_field}' ({what}); "
                    "set analysis.contamination.text_field to the field that holds the example"
                )
            texts.append(value)
            if limit is not None and len(texts) >= limit:
                break
    except (OSError, EOFError, ValueError) as e:
        raise AnalysisError(f"{p}: cannot read past line {lineno}: {e}") from None
    finally:
        stream.close()
        raw.close()
    return texts


def _offline() -> None:
    """No network at run time: Hugging Face datasets and hub calls are answered from the cache only."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import sys

    if "datasets" in sys.modules:  # already imported: its constants were read at import time
        try:
            import datasets.config

            datasets.config.HF_DATASETS_OFFLINE = True
            datasets.config.HF_HUB_OFFLINE = True
        except (ImportError, AttributeError):
            pass
    if "huggingface_hub" in sys.modules:
        try:
            import huggingface_hub.constants

            huggingface_hub.constants.HF_HUB_OFFLINE = True
        except (ImportError, AttributeError):
            pass


class LmEvalTasks:
    """lm-eval task loading, offline; the (slow to build) task index is made once, when first needed."""

    def __init__(self, include_path: str | None) -> None:
        self.include_path = include_path
        self._managers: dict[bool, Any] = {}

    def manager(self, defaults: bool) -> Any:
        if defaults not in self._managers:
            _offline()
            try:
                from lm_eval.tasks import TaskManager
            except ImportError:
                raise AnalysisError(
                    "lm-eval is not installed, so lm-eval task names cannot be read; `pip install lm-eval`, "
                    "or give the examples as a JSONL file"
                ) from None
            from llm360.eval.demo import TASKS_DIR  # llm360's own demo tasks can always be named

            paths = [str(TASKS_DIR)] + ([self.include_path] if self.include_path else [])
            self._managers[defaults] = TaskManager(include_path=paths, include_defaults=defaults)
        return self._managers[defaults]

    def load(self, spec: str, limit: int | None) -> list[TaskDocs]:
        is_yaml = spec.lower().endswith(_YAML_SUFFIXES)
        if is_yaml and not Path(spec).is_file():
            raise AnalysisError(f"task file {spec} not found")
        tm = self.manager(defaults=not is_yaml)  # a task file needs no index of lm-eval's own tasks
        if not is_yaml and spec not in tm.all_tasks:
            close = difflib.get_close_matches(spec, tm.all_tasks, n=3, cutoff=0.75)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise AnalysisError(f"task '{spec}' is neither a file nor an lm-eval task name{hint}")
        try:
            loaded = tm.load([spec])["tasks"]
        except Exception as e:  # lm-eval / datasets raise many types; all mean "cannot load this task"
            raise AnalysisError(_lm_eval_failure(spec, e)) from None
        out = []
        for name, task in loaded.items():
            try:
                docs = task.eval_docs
                texts = []
                for doc in docs:
                    texts.append(_doc_text(task, doc))
                    if limit is not None and len(texts) >= limit:
                        break
            except Exception as e:
                raise AnalysisError(_lm_eval_failure(name, e)) from None
            out.append(TaskDocs(_safe_name(name), f"lm-eval:{name}", texts))
        return out


def _lm_eval_failure(name: str, e: Exception) -> str:
    text = f"{type(e).__name__}: {e}"
    offline = any(s in text for s in ("Offline", "offline", "Couldn't reach", "ConnectionError", "not found in cache"))
    if offline or isinstance(e, (ConnectionError, FileNotFoundError)):
        return (
            f"the data of lm-eval task '{name}' is not available offline ({text.splitlines()[0][:300]}). "
            "llm360 never downloads at run time: fetch it once where there is network (run lm-eval on the "
            "task, or datasets.load_dataset on its dataset) so that it is in the Hugging Face datasets cache, "
            "or give its examples as a JSONL file"
        )
    return f"lm-eval could not load task '{name}': {text.splitlines()[0][:300]}"


def _doc_text(task: Any, doc: Any) -> str:
    """An lm-eval example as one text: its decontamination query if the task defines one, else
    the prompt text, the target delimiter and the gold answer."""
    cfg = getattr(task, "config", None)
    if getattr(task, "should_decontaminate", lambda: False)():
        q = task.doc_to_decontamination_query(doc)
        if isinstance(q, str):
            return q
    choices = None
    if cfg is not None and getattr(cfg, "doc_to_choice", None) is not None:
        choices = task.doc_to_choice(doc)
    text = task.doc_to_text(doc)
    if isinstance(text, int) and choices:
        text = choices[text]
    target = task.doc_to_target(doc)
    if isinstance(target, int) and choices:
        target = choices[target]
    elif isinstance(target, list):
        target = " ".join(str(choices[t]) if isinstance(t, int) and choices else str(t) for t in target)
    delimiter = getattr(cfg, "target_delimiter", " ") if cfg is not None else " "
    return f"{text}{delimiter}{target}"


def load_tasks(specs: Sequence[str], cfg: ContaminationConfig) -> tuple[list[TaskDocs], dict[str, str]]:
    """The examples of each task spec, and spec -> message for those that cannot be read."""
    docs: list[TaskDocs] = []
    failed: dict[str, str] = {}
    lm = LmEvalTasks(cfg.lm_eval_include_path)
    for spec in specs:
        try:
            low = spec.lower()
            if low.endswith(_YAML_SUFFIXES):
                docs += lm.load(spec, cfg.limit)
            elif _is_file_spec(spec):
                name = _safe_name(re.sub(r"(\.jsonl|\.json|\.ndjson)(\.gz|\.zst)?$", "", Path(spec).name))
                docs.append(TaskDocs(name, f"jsonl:{spec}", read_jsonl_task(spec, cfg.text_field, cfg.limit)))
            else:
                docs += lm.load(spec, cfg.limit)
        except Llm360Error as e:
            failed[spec] = str(e)  # reported by the caller (result.failed), not logged twice
            logger.debug("task %s: %s", spec, e)
    seen: dict[str, int] = {}
    for d in docs:  # two specs with the same name get distinct output files
        if d.name in seen:
            seen[d.name] += 1
            d.name = f"{d.name}-{seen[d.name]}"
        else:
            seen[d.name] = 0
    return docs, failed
