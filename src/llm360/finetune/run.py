"""`llm360 finetune sft|dpo`: fine-tune a checkpoint with TRL and write the result into the run directory.

::

    <run>/finetune/<name>/          a Hugging Face model folder, complete or absent
      config.json, generation_config.json, model.safetensors (fp32; safetensors only)
      tokenizer.json, tokenizer_config.json, chat_template.jinja (the template it was trained with)
      lineage.json                  base checkpoint + its COMPLETE.json sha256, data file + sha256,
                                    the resolved config, chat template, library versions, summary
      finetune.yaml                 the resolved config, every field documented
      metrics.jsonl                 one line per logged optimizer step (step, loss, grad_norm, lr, ...)
      train_data.jsonl              only for built-in data: the exact records trained on
      trainer_state.json, rng_state.*, COMPLETE.json   as in every llm360 checkpoint

The folder is written by :func:`llm360.rundir.checkpoint.save_checkpoint`: into a hidden temporary
folder, fsynced, renamed, with ``COMPLETE.json`` (sha256 of every file) written last, so
``verify_checkpoint`` and every stage that reads checkpoints (``llm360 eval``) treat it like one.
While training, TRL's scratch files and the metrics live in ``finetune/.<name>.work-<pid>/``,
removed at the end.

Everything runs offline (no hub calls, no telemetry, no W&B) and on CPU in fp32; bf16 autocast is
used only on a GPU that supports it, with fp32 weights saved either way. This module resolves the
inputs, runs the training and writes the folder with its lineage; the TRL trainers themselves are
built in :mod:`llm360.finetune.trainer`. The folder's file names are :mod:`llm360.rundir.layout`'s.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm360.config import DpoConfig, SftConfig, check_output_name
from llm360.config import FinetuneKind as Kind
from llm360.errors import CheckpointError, ConfigError, DataError, Llm360Error, RunDirError
from llm360.finetune import builtin
from llm360.finetune.records import Records, load_records
from llm360.finetune.trainer import (
    MetricsCallback,
    library_warnings_quiet,
    load_hf_model,
    make_trainer,
    offline_env,
    training_args,
    use_bf16,
)
from llm360.rundir.atomic import staged
from llm360.rundir.layout import (
    FINETUNE_BUILTIN_DATA,
    FINETUNE_CONFIG,
    FINETUNE_METRICS,
    HF_CONFIG,
    LINEAGE,
    MARKER,
    MODEL_META,
    TRAINER_STATE,
    RunDir,
    has_marker,
    list_checkpoints,
)
from llm360.train.parallel import (
    DistInfo,
    barrier,
    destroy_distributed,
    init_distributed,
    launched_rank,
    together,
)
from llm360.utils import sha256_file

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_COPIED_FROM_BASE = (MODEL_META,)  # how llm360 reads the weights back (e.g. muP folded)
_VERSIONED = ("llm360", "torch", "transformers", "trl", "datasets", "accelerate", "tokenizers", "safetensors")


@dataclass
class FinetuneResult:
    """What a fine-tuning run produced."""

    folder: Path
    """The output Hugging Face folder, finetune/<name>."""
    kind: str
    """sft or dpo."""
    steps: int
    """Optimizer steps taken."""
    metrics: list[dict[str, Any]] = field(default_factory=list)
    """The rows of metrics.jsonl."""
    lineage: dict[str, Any] = field(default_factory=dict)
    """The content of lineage.json."""


# ------------------------------------------------------------------------------------- inputs


def resolve_base(run_dir: str | Path, base: str | Path) -> Path:
    """The checkpoint folder `base` names: a path, `ckpt_012`, `12`, `latest`, or a fine-tuned model's name.

    Looked up, in order: as a path (absolute, or relative to the working directory or the run
    directory), in ``checkpoints/``, in ``finetune/``. Raises CheckpointError listing what exists.
    """
    run = Path(run_dir)
    rd = RunDir(run)
    text = str(base)
    if text == "latest":
        from llm360.rundir.checkpoint import latest_complete_checkpoint

        found = latest_complete_checkpoint(rd.checkpoints, include_steps=False, cleanup=False)
        if found is None:
            raise CheckpointError(f"--from latest: no complete checkpoint in {rd.checkpoints}")
        return found
    as_path = Path(text)
    named = [rd.checkpoints / text, rd.finetune_model(text), run / text]
    if text.isdigit():
        named.insert(0, rd.ckpt_dir(int(text)))
    # A bare name means this run's checkpoint; something with a folder in it is a path first.
    is_path = as_path.is_absolute() or len(as_path.parts) > 1
    candidates = [as_path, *named] if is_path else [*named, as_path]
    for c in candidates:
        if c.is_dir():
            return c
    have = [p.name for _, p in list_checkpoints(rd.checkpoints)]
    tuned = sorted(p.name for p in rd.finetune_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) if rd.finetune_dir.is_dir() else []  # fmt: skip
    listing = ", ".join(have[:3] + (["..."] if len(have) > 4 else []) + have[3:][-1:]) if have else "none"
    extra = f"; fine-tuned models: {', '.join(tuned)}" if tuned else ""
    raise CheckpointError(
        f"checkpoint {text!r} not found (looked for it as a path and in {rd.checkpoints} and "
        f"{rd.finetune_dir}); checkpoints there: {listing}{extra}"
    )


def verify_base(folder: Path) -> str:
    """Check that a checkpoint folder is complete and intact; returns the sha256 of its COMPLETE.json."""
    if not has_marker(folder):
        raise CheckpointError(
            f"checkpoint {folder} is incomplete or not an llm360 checkpoint: it has no {MARKER} (written last, "
            "when a save finishes), so it will not be loaded"
        )
    from llm360.rundir.checkpoint import marker_sha256, verify_checkpoint

    verify_checkpoint(folder)  # every file's sha256 against the marker
    if not (folder / HF_CONFIG).is_file():
        raise CheckpointError(
            f"checkpoint {folder} has no config.json, so it is not a Hugging Face model folder; "
            "checkpoints written by `llm360 train` have one"
        )
    return marker_sha256(folder)


def _data_file(data: str | Path, kind: str, work: Path) -> tuple[Path, str | None]:
    """(file to read, built-in set name or None); a built-in set is written into the work folder."""
    text = str(data)
    if not text.startswith(builtin.PREFIX):
        return Path(text), None
    name = text[len(builtin.PREFIX) :]
    if name not in builtin.NAMES:
        raise DataError(
            f"unknown built-in data set {text!r}; there are {', '.join(builtin.PREFIX + n for n in builtin.NAMES)}"
        )
    if builtin.NAMES[name] != kind:
        right = next(builtin.PREFIX + n for n, k in builtin.NAMES.items() if k == kind)
        raise DataError(f"{text} is a {builtin.NAMES[name]} data set; for {kind} use {right}")
    path = work / FINETUNE_BUILTIN_DATA
    path.write_bytes(builtin.to_jsonl(builtin.build(name)))
    return path, name


# -------------------------------------------------------------------------------------- entry


def finetune(
    kind: Kind,
    run_dir: str | Path,
    base: str | Path,
    data: str | Path,
    cfg: SftConfig | DpoConfig | None = None,
    *,
    force: bool = False,
    device: str | None = None,
) -> FinetuneResult:
    """Fine-tune checkpoint `base` of the run in `run_dir` on `data`, into ``<run>/finetune/<name>``.

    - `kind`: ``sft`` (TRL SFTTrainer) or ``dpo`` (TRL DPOTrainer, the base checkpoint as reference).
    - `base`: a checkpoint folder or its name (``ckpt_012``, ``12``, ``latest``, a fine-tuned model).
    - `data`: a JSONL/Parquet file (shapes in :mod:`llm360.finetune.records`) or
      ``builtin:instructions`` / ``builtin:preferences``.
    - `cfg`: the run's ``finetune.sft`` / ``finetune.dpo`` section (default: AmberChat / AmberSafe).
    - `force`: replace an existing output folder of the same name.
    - `device`: ``cpu`` or ``cuda`` (pick the GPU with CUDA_VISIBLE_DEVICES); default: cuda when available.

    Raises CheckpointError (missing, incomplete or unreadable base), DataError (data or tokenizer
    unusable, with file, line and field), RunDirError (the output exists), ConfigError.
    """
    if kind not in ("sft", "dpo"):
        raise ConfigError(f"unknown fine-tuning kind {kind!r}; use sft or dpo")
    if cfg is None:
        cfg = SftConfig() if kind == "sft" else DpoConfig()
    expected = SftConfig if kind == "sft" else DpoConfig
    if not isinstance(cfg, expected):
        raise ConfigError(
            f"{kind} needs a finetune.{kind} config ({expected.__name__}), got {type(cfg).__name__}"
        )
    with offline_env():
        return _finetune(kind, run_dir, base, data, cfg, force=force, device=device)


def _finetune(
    kind: str,
    run_dir: str | Path,
    base: str | Path,
    data: str | Path,
    cfg: SftConfig | DpoConfig,
    *,
    force: bool,
    device: str | None,
) -> FinetuneResult:
    run = Path(run_dir)
    if not run.is_dir():
        raise RunDirError(f"run directory {run} does not exist")
    world = launched_rank()[1]
    if cfg.gradient_accumulation % world:
        ok = cfg.gradient_accumulation * world
        raise ConfigError(
            f"finetune.{kind}.gradient_accumulation = {cfg.gradient_accumulation} does not split over {world} ranks: "
            f"the optimizer batch is micro_batch_size x gradient_accumulation records whatever the number of ranks, "
            f"each rank running gradient_accumulation / {world} micro-batches; set it to a multiple of {world} "
            f"(e.g. {ok}) or run on a divisor of it"
        )
    base_dir = resolve_base(run, base)
    marker_sha = verify_base(base_dir)
    name = check_output_name(cfg.name or f"{kind}-{base_dir.name}")
    cfg = cfg.model_copy(update={"name": name})  # the lineage records the resolved config
    out_dir = RunDir(run).finetune_model(name)
    from llm360.rundir.checkpoint import clean_leftovers

    # Under torchrun: one process group for the ranks (the Trainer's DDP joins it); rank 0 cleans up
    # and writes the folder, the others wait for it.
    info = init_distributed(device) if world > 1 else DistInfo()
    try:
        with together(info):
            if info.is_main:
                clean_leftovers(RunDir(run).finetune_dir)  # what killed runs left: work folders, unfinished saves
        barrier(info)  # before any rank stages its own work folder
        if out_dir.exists() and not force:
            raise RunDirError(
                f"{out_dir} already exists; pass --force to replace it, or choose another name with "
                f"--set finetune.{kind}.name=NEW_NAME"
            )
        if out_dir.resolve() == base_dir.resolve():
            raise RunDirError(f"the output {out_dir} is the base checkpoint itself; choose another name")

        with staged(out_dir, kind="work") as work:  # scratch space (one per rank), removed however the run ends
            return _run(kind, run, base_dir, marker_sha, data, cfg, name, out_dir, work, device, info)
    finally:
        if info.enabled:
            destroy_distributed()


def sft(
    run_dir: str | Path, base: str | Path, data: str | Path, cfg: SftConfig | None = None, **kwargs: Any
) -> FinetuneResult:
    """Supervised fine-tuning (AmberChat's recipe by default); see :func:`finetune`."""
    return finetune("sft", run_dir, base, data, cfg, **kwargs)


def dpo(
    run_dir: str | Path, base: str | Path, data: str | Path, cfg: DpoConfig | None = None, **kwargs: Any
) -> FinetuneResult:
    """Direct preference optimization (AmberSafe's recipe by default); see :func:`finetune`."""
    return finetune("dpo", run_dir, base, data, cfg, **kwargs)


# -------------------------------------------------------------------------------------- model


def _load_tokenizer(base_dir: Path, run: Path) -> tuple[Any, Path]:
    from transformers import AutoTokenizer

    for folder in (base_dir, RunDir(run).tokenizer):
        if any((folder / f).is_file() for f in _TOKENIZER_FILES):
            try:
                tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            except (OSError, ValueError, TypeError) as e:
                raise DataError(f"cannot load the tokenizer in {folder}: {e}") from None
            return tok, folder
    raise DataError(
        f"no tokenizer found: neither {base_dir} nor {RunDir(run).tokenizer} has tokenizer.json / tokenizer_config.json"
    )


# ---------------------------------------------------------------------------------- training


def _run(
    kind: str,
    run: Path,
    base_dir: Path,
    marker_sha: str,
    data: str | Path,
    cfg: SftConfig | DpoConfig,
    name: str,
    out_dir: Path,
    work: Path,
    device_arg: str | None,
    info: DistInfo,
) -> FinetuneResult:
    import torch

    from llm360.finetune.chat import ensure_chat_template, template_sha256
    from llm360.model.load import resolve_device

    t_start = time.time()
    resolved = resolve_device(device_arg, where="device")
    if resolved.type not in ("cpu", "cuda") or resolved.index is not None:  # the Trainer places the models
        raise ConfigError(f"device {device_arg!r}: use cpu or cuda (choose the GPU with CUDA_VISIBLE_DEVICES)")
    device = resolved.type
    bf16 = use_bf16(cfg.precision, device)
    data_path, builtin_name = _data_file(data, kind, work)
    records = load_records(data_path, kind, format=cfg.format, max_records=cfg.max_records)
    for note in records.notes:
        logger.info("%s: %s", data, note)

    tokenizer, tok_dir = _load_tokenizer(base_dir, run)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if records.conversational:
        template = ensure_chat_template(tokenizer, cfg.chat_template, where=str(tok_dir))
    elif isinstance(getattr(tokenizer, "chat_template", None), str) and tokenizer.chat_template:
        template = {
            "source": "tokenizer (not used: plain-text records)",
            "sha256": template_sha256(tokenizer.chat_template),
        }
    else:
        template = {"source": "none (plain-text records)", "sha256": ""}

    model = load_hf_model(base_dir)
    context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    max_length = cfg.max_length or context or 1024
    if context and max_length > context:
        logger.warning(
            "max_length %d exceeds the model's context (%d); using %d", max_length, context, context
        )
        max_length = context

    logger.info(
        "%s: %s from %s on %d records of %s (%s), %s, %s",
        kind.upper(), name, base_dir, len(records.rows), data, records.shape, device, "bf16 autocast" if bf16 else "fp32",
    )  # fmt: skip
    metrics_path = work / FINETUNE_METRICS
    callback = MetricsCallback(metrics_path, kind, enabled=info.is_main)
    args_common = training_args(cfg, work, device, bf16, max_length)
    # the same optimizer batch on any number of ranks (the Trainer's DDP averages their gradients)
    args_common["gradient_accumulation_steps"] = cfg.gradient_accumulation // info.world_size
    if info.enabled:
        logger.info("%s on %d ranks (DDP): %d micro-batch(es) of %d records a rank per optimizer step",
                    kind.upper(), info.world_size, args_common["gradient_accumulation_steps"], cfg.micro_batch_size)
    with library_warnings_quiet():
        trainer = make_trainer(kind, cfg, model, tokenizer, records, args_common, callback, base_dir)
    try:
        with library_warnings_quiet():
            result = trainer.train()
    except (ValueError, RuntimeError) as e:
        if "out of memory" in str(e).lower():
            raise Llm360Error(
                f"{kind} ran out of memory: {e}; lower finetune.{kind}.micro_batch_size or max_length"
            ) from None
        raise
    finally:
        callback.close()
    steps = int(trainer.state.global_step)

    policy = trainer.accelerator.unwrap_model(trainer.model)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in policy.state_dict().items()}
    if getattr(policy.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # one matrix, stored once (as transformers does)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise Llm360Error(
            f"{kind} diverged: non-finite weights after {steps} steps ({', '.join(bad[:3])}); nothing was written. "
            f"Lower finetune.{kind}.lr (now {cfg.lr}); metrics are in {metrics_path}"
        )

    out = FinetuneResult(out_dir, kind, steps, [], {})  # what the other ranks return
    # rank 0 writes the folder (every rank holds the same weights); a failure there stops every rank
    with together(info):
        if info.is_main:
            policy.config.use_cache = True  # the trainer turns the KV cache off; generation wants it on
            hf_dir = work / "hf"
            policy.config.save_pretrained(str(hf_dir))
            if getattr(policy, "generation_config", None) is not None:
                policy.generation_config.save_pretrained(str(hf_dir))
            tokenizer.save_pretrained(str(hf_dir))
            extra: dict[str, Any] = {p.name: p.read_bytes() for p in sorted(hf_dir.iterdir()) if p.is_file()}
            for fname in _COPIED_FROM_BASE:
                if (base_dir / fname).is_file() and fname not in extra:
                    extra[fname] = (base_dir / fname).read_bytes()
            extra[FINETUNE_METRICS] = metrics_path.read_bytes() if metrics_path.is_file() else b""
            from llm360.config import to_yaml

            extra[FINETUNE_CONFIG] = to_yaml(cfg)
            if builtin_name is not None:
                extra[FINETUNE_BUILTIN_DATA] = data_path.read_bytes()

            metrics = [json.loads(line) for line in extra[FINETUNE_METRICS].decode().splitlines() if line.strip()]
            summary = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
            lineage = _lineage(
                kind=kind, name=name, run=run, base_dir=base_dir, marker_sha=marker_sha, data=data, records=records,
                builtin_name=builtin_name, cfg=cfg, template=template, device=device, bf16=bf16, max_length=max_length,
                steps=steps, epochs=float(trainer.state.epoch or 0.0), summary=summary, last=metrics[-1] if metrics else {},
                seconds=time.time() - t_start, world_size=info.world_size,
            )  # fmt: skip
            extra[LINEAGE] = json.dumps(lineage, indent=2, sort_keys=True, ensure_ascii=False) + "\n"

            from llm360.rundir.checkpoint import save_checkpoint

            trainer_state = {
                "step": steps,
                "kind": kind,
                "epoch": float(trainer.state.epoch or 0.0),
                "records": len(records.rows),
                "base_checkpoint": lineage["base_checkpoint"]["path"],
            }
            save_checkpoint(out_dir, model_state=state, trainer_state=trainer_state, extra_files=extra)
            logger.info("wrote %s (%d steps, %.0f s)", out_dir, steps, time.time() - t_start)
            out = FinetuneResult(out_dir, kind, steps, metrics, lineage)
    return out


# ----------------------------------------------------------------------------------- lineage


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in _VERSIONED:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _rel(path: Path, run: Path) -> str:
    try:
        return path.resolve().relative_to(run.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def _lineage(
    *,
    kind: str,
    name: str,
    run: Path,
    base_dir: Path,
    marker_sha: str,
    data: str | Path,
    records: Records,
    builtin_name: str | None,
    cfg: SftConfig | DpoConfig,
    template: dict[str, str],
    device: str,
    bf16: bool,
    max_length: int,
    steps: int,
    epochs: float,
    summary: dict[str, Any],
    last: dict[str, Any],
    seconds: float,
    world_size: int = 1,
) -> dict[str, Any]:
    base: dict[str, Any] = {
        "path": _rel(base_dir, run),
        "absolute_path": str(base_dir.resolve()),
        "complete_json_sha256": marker_sha,
    }
    state_file = base_dir / TRAINER_STATE
    if state_file.is_file():
        try:
            base["step"] = json.loads(state_file.read_text(encoding="utf-8")).get("step")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            pass
    if (base_dir / LINEAGE).is_file():  # fine-tuned from a fine-tuned model: keep the chain
        base["lineage_sha256"] = sha256_file(base_dir / LINEAGE)
        try:
            base["lineage"] = json.loads((base_dir / LINEAGE).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    return {
        "format": "llm360-finetune",
        "version": 1,
        "kind": kind,
        "trainer": "trl.SFTTrainer" if kind == "sft" else "trl.DPOTrainer",
        "name": name,
        "base_checkpoint": base,
        "data": {
            "source": str(data),
            "path": FINETUNE_BUILTIN_DATA if builtin_name else str(records.path.resolve()),
            "sha256": records.sha256,
            "builtin": builtin_name,
            "shape": records.shape,
            "conversational": records.conversational,
            "records_in_file": records.records_in_file,
            "records_used": len(records.rows),
            "notes": records.notes,
        },
        "config": cfg.model_dump(mode="json"),
        "chat_template": template,
        "max_length": max_length,
        "device": device,
        "world_size": world_size,
        "precision": "bf16 autocast, fp32 weights" if bf16 else "fp32",
        "steps": steps,
        "epochs": epochs,
        "final_metrics": last,
        "summary": summary,
        "seconds": round(seconds, 3),
        "versions": _versions(),
    }
