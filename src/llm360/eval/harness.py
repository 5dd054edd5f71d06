"""Glue to lm-eval: offline mode, finding tasks, checking they can run, running one on a model.

Task YAML files are found in llm360's own task folder (the ``demo`` tasks), the folders of
``eval.task_paths`` and, only when a task is not in those (indexing them takes seconds), lm-eval's
built-in tasks. Before any checkpoint is evaluated every lm-eval task is built once -- which loads
its dataset -- so a task whose data is missing or whose file is broken is reported up front, with
what to do, and the other tasks still run.

Unless ``eval.allow_downloads`` is set, everything runs with the Hugging Face Hub offline: datasets
come from the local cache or the task's own files, and nothing waits on the network.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import math
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llm360.config import EvalConfig
from llm360.eval.demo import TASKS_DIR
from llm360.eval.specs import TaskSpec

logger = logging.getLogger(__name__)

_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
# Module constants that datasets and huggingface_hub read from the environment at import time.
_OFFLINE_CONSTANTS = (
    ("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
    ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
)
_LM_EVAL_LOGGERS = ("lm_eval", "lm-eval")
_WORD = re.compile(r"[A-Za-z0-9_.\-]+")
_BUILTIN_WORDS: frozenset[str] | None = None


@contextmanager
def hub_access(allow_downloads: bool) -> Iterator[None]:
    """Within the block the Hugging Face Hub is offline, unless allow_downloads.

    Sets the ``HF_*_OFFLINE`` variables and the constants datasets / huggingface_hub read from them
    when first imported (so it works after they were imported); all restored on exit.
    """
    if allow_downloads:
        yield
        return
    saved_env = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    patched: list[tuple[Any, str, Any]] = []
    try:
        for k in _OFFLINE_ENV:
            os.environ[k] = "1"
        for module_name, attrs in _OFFLINE_CONSTANTS:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            for attr in attrs:
                if hasattr(module, attr):
                    patched.append((module, attr, getattr(module, attr)))
                    setattr(module, attr, True)
        yield
    finally:
        for module, attr, value in reversed(patched):
            setattr(module, attr, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """lm-eval's own INFO/WARNING chatter and per-task tqdm bars off, unless llm360 logs at DEBUG (-v).

    llm360 shows its own progress bars; lm-eval's build loop has a tqdm bar with no switch, so its
    module's ``tqdm`` name is pointed at a disabled one for the duration of the block.
    """
    if logging.getLogger("llm360").isEnabledFor(logging.DEBUG):
        yield
        return
    import functools

    import tqdm

    loggers = [logging.getLogger(n) for n in _LM_EVAL_LOGGERS]
    levels = [lg.level for lg in loggers]
    patched = []
    for module_name in ("lm_eval.api.task",):
        module = sys.modules.get(module_name)
        if module is not None and getattr(module, "tqdm", None) is tqdm.tqdm:
            patched.append(module)
            module.tqdm = functools.partial(tqdm.tqdm, disable=True)  # type: ignore[attr-defined]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        for module in patched:
            module.tqdm = tqdm.tqdm  # type: ignore[attr-defined]


def describe_error(e: BaseException) -> str:
    """One line naming the exception and its cause chain (lm-eval wraps dataset errors)."""
    import yaml

    parts, seen = [], set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        text = str(cur).strip().splitlines()[0] if str(cur).strip() else ""
        if isinstance(cur, yaml.MarkedYAMLError) and cur.problem_mark is not None:
            mark = cur.problem_mark
            text = f"{cur.problem} at line {mark.line + 1}, column {mark.column + 1}"
            if cur.context:
                text += f" ({cur.context})"
        parts.append(f"{type(cur).__name__}: {text}" if text else type(cur).__name__)
        cur = cur.__cause__ or cur.__context__
    return " <- ".join(parts[:3])


def _offline_missing(e: BaseException) -> bool:
    cur: BaseException | None = e
    seen = set()
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        name = type(cur).__name__
        if name in ("OfflineModeIsEnabled", "ConnectionError", "DatasetNotFoundError", "LocalEntryNotFoundError"):
            return True
        if "offline" in str(cur).lower() or "couldn't reach" in str(cur).lower():
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _dataset_name(path: str, config: str | None) -> str:
    return f"{path} ({config})" if config else path


def missing_dataset_message(dataset: str | None, allow_downloads: bool) -> str:
    """What to tell the user when a task's dataset cannot be loaded."""
    what = f"its dataset {dataset}" if dataset else "its dataset"
    if allow_downloads:
        return f"{what} could not be downloaded or loaded"
    cache = os.environ.get("HF_HOME") or "~/.cache/huggingface"
    return (
        f"{what} is not in the local Hugging Face cache ({cache}) and downloads are off; run once with "
        "`--set eval.allow_downloads=true` on a machine with network, or copy a cache that has it (HF_HOME)"
    )


class TaskRunner:
    """Finds, checks and runs the lm-eval tasks of one `llm360 eval` call."""

    def __init__(self, cfg: EvalConfig) -> None:
        self.cfg = cfg
        self._local: Any = None
        self._full: Any = None
        self.parse_errors: dict[str, str] = {}
        """Task YAML files in the task folders that lm-eval cannot read: path -> error."""

    # ------------------------------------------------------------------ task managers
    def task_dirs(self) -> list[Path]:
        dirs = [TASKS_DIR]
        for p in self.cfg.task_paths:
            path = Path(p).expanduser()
            if not path.is_dir():
                logger.warning("eval.task_paths: %s is not a folder; its tasks are not available", path)
                continue
            dirs.append(path)
        return dirs

    def _scan_parse_errors(self, dirs: list[Path]) -> None:
        from lm_eval.tasks._yaml_loader import load_yaml

        for d in dirs:
            for path in sorted(d.glob("**/*.yaml")):
                try:
                    load_yaml(path, resolve_func=False)
                except Exception as e:  # lm-eval skips such files silently; we report them
                    self.parse_errors[str(path)] = describe_error(e)

    def manager(self, *, builtin: bool) -> Any:
        """An lm-eval TaskManager over the task folders (and lm-eval's own tasks if builtin)."""
        from lm_eval.tasks import TaskManager

        if builtin:
            if self._full is None:
                logger.info("indexing lm-eval's built-in tasks (takes a few seconds)")
                self._full = TaskManager(include_path=[str(d) for d in self.task_dirs()])
            return self._full
        if self._local is None:
            dirs = self.task_dirs()
            self._scan_parse_errors(dirs)
            self._local = TaskManager(include_path=[str(d) for d in dirs], include_defaults=False)
        return self._local

    def _builtin_words(self) -> frozenset[str]:
        """Every word in lm-eval's built-in task YAML files (read as text: 20x faster than indexing).

        A name that is not among them cannot be a built-in task, tag or group (their names are
        written out in the YAML), so a typo is reported without the seconds-long full index.
        """
        global _BUILTIN_WORDS
        if _BUILTIN_WORDS is None:
            import lm_eval.tasks

            root = Path(lm_eval.tasks.__file__).parent
            words: set[str] = set()
            for path in root.glob("**/*.yaml"):
                try:
                    words.update(_WORD.findall(path.read_text(encoding="utf-8", errors="replace")))
                except OSError:
                    continue
            _BUILTIN_WORDS = frozenset(words)
        return _BUILTIN_WORDS

    def _manager_for(self, spec: TaskSpec) -> Any:
        if spec.name.endswith((".yaml", ".yml")) or spec.name in self.manager(builtin=False).all_tasks:
            return self.manager(builtin=False)
        return self.manager(builtin=True)

    # ------------------------------------------------------------------ checks
    def _fast_dataset_check(self, spec: TaskSpec) -> str | None:
        """For tasks with a known Hub dataset, offline: is it in the local cache? (error or None)"""
        if spec.hub_dataset is None or self.cfg.allow_downloads:
            return None
        import datasets

        path, config = spec.hub_dataset
        try:
            datasets.load_dataset_builder(path, config)
        except Exception as e:
            if _offline_missing(e):
                return missing_dataset_message(_dataset_name(path, config), False)
            logger.debug("fast dataset check of %s: %s", path, describe_error(e))
        return None

    def _unknown_task_message(self, spec: TaskSpec, known: list[str]) -> str:
        msg = f"lm-eval has no task, group or tag named {spec.name!r}"
        close = difflib.get_close_matches(spec.name, known, n=3)
        if close:
            msg += f" (did you mean {', '.join(close)}?)"
        broken = list(self.parse_errors)
        if broken:
            msg += "; these task files could not be read, it may be in one of them: " + "; ".join(
                f"{p}: {self.parse_errors[p]}" for p in broken[:5]
            )
        return msg

    def _yaml_problem(self, spec: TaskSpec) -> str | None:
        from lm_eval.tasks._yaml_loader import load_yaml

        path = Path(spec.name)
        if not path.is_file():
            return f"task file {path} not found"
        try:
            cfg = load_yaml(path, resolve_func=False)
        except Exception as e:
            return f"task file {path} does not parse: {describe_error(e)}"
        if "task" not in cfg and "group" not in cfg:
            return f"task file {path} has neither a `task:` nor a `group:` name"
        return None

    def check(self, specs: list[TaskSpec]) -> dict[str, str]:
        """Build every lm-eval task once (loading its data); {key: why it cannot run} for the others."""
        problems: dict[str, str] = {}
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            why = "lm-eval is not installed: `pip install 'lm-eval>=0.4.13,<0.5'` (the llm360[eval] extra)"
            return {s.key: why for s in specs if s.kind == "lm-eval"}
        with quiet_lm_eval():
            for spec in specs:
                if spec.kind != "lm-eval":
                    continue
                if spec.name.endswith((".yaml", ".yml")):
                    problem = self._yaml_problem(spec)
                    if problem:
                        problems[spec.key] = problem
                        continue
                problem = self._fast_dataset_check(spec)
                if problem:
                    problems[spec.key] = problem
                    continue
                if (
                    not spec.name.endswith((".yaml", ".yml"))
                    and spec.name not in self.manager(builtin=False).all_tasks
                    and spec.name not in self._builtin_words()
                ):
                    names = list(self.manager(builtin=False).all_tasks) + sorted(self._builtin_words())
                    problems[spec.key] = self._unknown_task_message(spec, names)
                    continue
                try:
                    manager = self._manager_for(spec)
                except Exception as e:
                    problems[spec.key] = f"cannot index the lm-eval tasks: {describe_error(e)}"
                    continue
                if not spec.name.endswith((".yaml", ".yml")) and spec.name not in manager.all_tasks:
                    problems[spec.key] = self._unknown_task_message(spec, manager.all_tasks)
                    continue
                try:
                    loaded = manager.load([spec.name])
                except Exception as e:
                    logger.debug("building task %s failed", spec.name, exc_info=True)
                    if _offline_missing(e):
                        entry = manager.task_index.get(spec.name)
                        cfg = (entry.cfg or {}) if entry is not None else {}
                        ds = cfg.get("dataset_path")
                        problems[spec.key] = missing_dataset_message(
                            _dataset_name(ds, cfg.get("dataset_name")) if ds else None, self.cfg.allow_downloads
                        )
                    else:
                        problems[spec.key] = f"lm-eval cannot build task {spec.name!r}: {describe_error(e)}"
                    continue
                unsafe = sorted(n for n, t in loaded["tasks"].items() if t.get_config("unsafe_code"))
                if unsafe and not self.cfg.allow_code_execution:
                    problems[spec.key] = (
                        f"{', '.join(unsafe)} execute{'s' if len(unsafe) == 1 else ''} the model's generated code; "
                        "set eval.allow_code_execution=true to run it (do so only in a sandbox)"
                    )
        return problems

    # ------------------------------------------------------------------ running
    def run(self, lm: Any, spec: TaskSpec) -> dict[str, Any]:
        """Evaluate one task on lm with lm-eval's evaluator; returns lm-eval's results dict.

        The task settings are applied as ``simple_evaluate`` applies them (a shot count never
        overrides a task that fixes 0 shots; tasks without one get 0), minus its environment report,
        which runs subprocesses and would cost a second per (checkpoint, task).
        """
        import random

        import numpy as np
        from lm_eval.evaluator import evaluate as lm_eval_evaluate

        with quiet_lm_eval():
            loaded = self._manager_for(spec).load([spec.name])
            for task in loaded["tasks"].values():
                own = task.get_config("num_fewshot")
                if spec.num_fewshot is not None and own != 0:
                    task.set_config(key="num_fewshot", value=spec.num_fewshot)
                elif own is None:
                    task.set_config(key="num_fewshot", value=0)
                task.set_fewshot_seed(seed=self.cfg.fewshot_seed)
            random.seed(0)  # simple_evaluate's seeds, for tasks that shuffle with the global RNGs
            np.random.seed(1234)
            code = self.cfg.allow_code_execution
            saved = os.environ.get("HF_ALLOW_CODE_EVAL")
            if code:  # the `code_eval` metric refuses to run without it
                os.environ["HF_ALLOW_CODE_EVAL"] = "1"
            try:
                results = lm_eval_evaluate(
                    lm=lm,
                    task_dict=loaded,
                    limit=self.cfg.limit,
                    bootstrap_iters=self.cfg.bootstrap_iters,
                    log_samples=self.cfg.log_samples,
                    confirm_run_unsafe_code=code,
                )
            finally:
                if code and saved is None:
                    os.environ.pop("HF_ALLOW_CODE_EVAL", None)
        if results is None:
            raise RuntimeError("lm-eval returned no results")
        return results


# ------------------------------------------------------------------------------ results


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        try:
            import numpy as np

            if isinstance(v, np.generic):
                v = v.item()
            else:
                return None
        except ImportError:
            return None
    v = float(v)
    return v if math.isfinite(v) else None


def top_level_names(results: dict[str, Any]) -> list[str]:
    """The tasks/groups of a results dict that are not inside another group (what was asked for)."""
    names = list(results.get("results", {}))
    children = {c for subs in (results.get("group_subtasks") or {}).values() for c in subs}
    return [n for n in names if n not in children]


def extract_metrics(results: dict[str, Any], spec: TaskSpec) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """(metrics, stderr) of a task's lm-eval results: ``acc``, ``acc_norm``, ... (``task/metric`` for a tag).

    lm-eval keys metrics as ``metric,filter``; the default filter ``none`` is dropped from the
    name, any other is kept as ``metric[filter]``.
    """
    tops = top_level_names(results)
    metrics: dict[str, float | None] = {}
    stderr: dict[str, float | None] = {}
    for top in tops:
        for k, v in results["results"][top].items():
            if "," not in k:
                continue
            metric, _, filt = k.partition(",")
            base = metric.removesuffix("_stderr")
            name = base if filt == "none" else f"{base}[{filt}]"
            if len(tops) > 1:
                name = f"{top}/{name}"
            (stderr if metric.endswith("_stderr") else metrics)[name] = _number(v)
    if spec.primary_metric in metrics:  # the headline number first
        metrics = {spec.primary_metric: metrics[spec.primary_metric], **metrics}
    return metrics, stderr


def details_of(results: dict[str, Any]) -> dict[str, Any]:
    """The parts of lm-eval's results worth keeping beside the numbers (prompts, versions, sizes)."""
    keep = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples")
    return {k: results[k] for k in keep if k in results}


def lm_eval_version() -> str | None:
    mod = sys.modules.get("lm_eval")
    return getattr(mod, "__version__", None)
