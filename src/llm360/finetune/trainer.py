"""TRL's trainers, built from llm360's fine-tuning config: offline, quiet, and logging in llm360's format.

* :func:`offline_env` -- no hub calls, no telemetry, no W&B while fine-tuning;
* :func:`load_hf_model` -- a checkpoint folder as transformers' ``AutoModelForCausalLM``, in fp32;
* :func:`training_args` and :func:`make_trainer` -- TRL's ``SFTTrainer`` or ``DPOTrainer`` (the base
  checkpoint as DPO's reference model) from a ``finetune.sft`` / ``finetune.dpo`` section, with
  transformers' own printers and progress bars removed;
* :class:`MetricsCallback` -- one JSON line per logged optimizer step (the rows of a fine-tuned
  model's ``metrics.jsonl``), a progress bar and a summary line in the log.

transformers, TRL and datasets are imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llm360.config import DpoConfig, SftConfig
from llm360.errors import CheckpointError, ConfigError, DataError
from llm360.finetune.records import Records

logger = logging.getLogger(__name__)

_OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "WANDB_MODE": "disabled",
    "WANDB_DISABLED": "true",
}


@contextlib.contextmanager
def offline_env() -> Iterator[None]:
    """No hub calls, no telemetry, no W&B while fine-tuning; the environment is restored afterwards."""
    saved = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    os.environ.update(_OFFLINE_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_hf_model(folder: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, local_files_only=True, use_safetensors=True
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"cannot load {folder} with transformers' AutoModelForCausalLM: {e}") from None
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    return model  # the Trainer moves it (and the DPO reference) to the training device


def use_bf16(precision: str, device: str) -> bool:
    import torch

    if precision == "fp32" or device == "cpu":
        if precision == "bf16" and device == "cpu":
            logger.warning("precision=bf16 asked for on CPU; training in fp32 there")
        return False
    supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if precision == "bf16" and not supported:
        raise ConfigError("precision=bf16, but this GPU does not support bf16; use precision=fp32 or auto")
    return supported


@contextlib.contextmanager
def library_warnings_quiet() -> Iterator[None]:
    """Silence the deprecation notices transformers and TRL give about their own internals."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", category=FutureWarning, module=r"(transformers|trl|accelerate)(\.|$)"
        )
        warnings.filterwarnings(
            "ignore", category=DeprecationWarning, module=r"(transformers|trl|accelerate)(\.|$)"
        )
        yield


def training_args(
    cfg: SftConfig | DpoConfig, work: Path, device: str, bf16: bool, max_length: int
) -> dict[str, Any]:
    """TrainingArguments shared by SFT and DPO, from our config (offline, no TRL checkpoints, fp32 on CPU)."""
    return {
        "output_dir": str(work / "trainer"),
        "num_train_epochs": cfg.epochs,
        "max_steps": cfg.max_steps if cfg.max_steps is not None else -1,
        "learning_rate": cfg.lr,
        "lr_scheduler_type": cfg.lr_scheduler,
        "warmup_steps": cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        "per_device_train_batch_size": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation,
        "weight_decay": cfg.weight_decay,
        "max_grad_norm": cfg.grad_clip if cfg.grad_clip is not None else 0.0,
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "bf16": bf16,
        "fp16": False,
        "use_cpu": device == "cpu",
        _checkpointing_arg(): cfg.gradient_checkpointing,
        "logging_strategy": "steps",
        "logging_steps": cfg.log_every,
        "logging_first_step": True,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "push_to_hub": False,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": device != "cpu",
        "max_length": max_length,
    }


def _checkpointing_arg() -> str:
    """transformers >= 5.x calls it activation_checkpointing (gradient_checkpointing is a deprecated alias)."""
    from transformers import TrainingArguments

    fields = getattr(TrainingArguments, "__dataclass_fields__", {})
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


def make_trainer(
    kind: str,
    cfg: SftConfig | DpoConfig,
    model: Any,
    tokenizer: Any,
    records: Records,
    args: dict[str, Any],
    callback: Any,
    base_dir: Path,
) -> Any:
    import datasets

    progress_was_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        dataset = datasets.Dataset.from_list(records.rows)
        if kind == "sft":
            from trl import SFTConfig, SFTTrainer

            assert isinstance(cfg, SftConfig)
            assistant = cfg.loss_on == "assistant"
            sft_args = SFTConfig(
                **args,
                assistant_only_loss=assistant and records.shape == "messages",
                completion_only_loss=assistant if records.shape == "prompt_completion" else None,
                packing=False,
            )
            try:
                trainer = SFTTrainer(
                    model=model,
                    args=sft_args,
                    train_dataset=dataset,
                    processing_class=tokenizer,
                    callbacks=[callback.callback],
                )
                return _quiet(trainer)
            except (ValueError, RuntimeError) as e:
                if "generation" in str(e) or "assistant" in str(e):
                    raise DataError(
                        f"loss_on=assistant needs a chat template that marks assistant turns with "
                        f"{{% generation %}}: {e}. Use finetune.sft.chat_template=llm360 or finetune.sft.loss_on=all"
                    ) from None
                raise
        from trl import DPOConfig as TrlDPOConfig
        from trl import DPOTrainer

        assert isinstance(cfg, DpoConfig)
        dpo_args = TrlDPOConfig(
            **args, beta=cfg.beta, loss_type=[cfg.loss_type], label_smoothing=cfg.label_smoothing
        )
        reference = load_hf_model(base_dir)  # loaded here, offline, rather than by TRL from the hub id
        reference.eval()
        trainer = DPOTrainer(
            model=model,
            ref_model=reference,
            args=dpo_args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[callback.callback],
        )
        kept = len(trainer.train_dataset)
        if kept == 0:
            raise DataError(
                f"every DPO record's prompt is at least max_length={args['max_length']} tokens long, so no answer "
                f"token is left to compare; raise finetune.dpo.max_length or shorten the prompts"
            )
        if kept < len(records.rows):
            logger.warning(
                "%d of %d DPO records dropped: their prompt alone fills max_length=%d tokens",
                len(records.rows) - kept, len(records.rows), args["max_length"],
            )  # fmt: skip
        return _quiet(trainer)
    finally:
        if progress_was_on:
            datasets.enable_progress_bars()


def _quiet(trainer: Any) -> Any:
    """Drop transformers' stdout printer: our callback logs and writes the metrics."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


class MetricsCallback:
    """Writes one JSON line per logged optimizer step, in the project's metrics format, and logs a summary.

    ``enabled=False`` (every rank but 0 under torchrun): nothing is written, shown or logged. The
    Trainer logs the loss averaged over the ranks on each of them.
    """

    def __init__(self, path: Path, kind: str, enabled: bool = True) -> None:
        from transformers import TrainerCallback

        # Subclassing at run time keeps transformers out of this module's import.
        outer = self

        class _CB(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                outer._begin(state)

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if outer._task is not None:
                    outer._task.advance(1)

            def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
                outer._log(state, logs or {})

        self.callback = _CB()
        self.path = path
        self.kind = kind
        self.enabled = enabled
        self._writer: Any = None
        self._t0 = time.perf_counter()
        self._progress: Any = None
        self._task: Any = None

    def _begin(self, state: Any) -> None:
        if not self.enabled:
            return
        from llm360.log import progress
        from llm360.train.metrics import JsonlWriter

        self._writer = JsonlWriter(self.path)
        self._t0 = time.perf_counter()
        self._progress = progress(f"{self.kind} fine-tuning", total=state.max_steps, unit="steps")
        self._task = self._progress.__enter__()

    def _log(self, state: Any, logs: dict[str, Any]) -> None:
        if "loss" not in logs or self._writer is None:
            return  # the end-of-training summary goes into lineage.json
        row: dict[str, Any] = {"step": int(state.global_step) - 1}  # 0-based, as metrics/train.jsonl
        for k, v in logs.items():
            key = {"learning_rate": "lr", "num_tokens": "tokens_seen"}.get(k, k)
            row[key] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
        row["epoch"] = float(state.epoch or 0.0)
        row["elapsed_s"] = round(time.perf_counter() - self._t0, 3)
        self._writer.write(row)
        loss = row.get("loss")
        extra = ""
        if "rewards/accuracies" in row:
            extra = f" reward acc {row['rewards/accuracies']:.3f} margin {row.get('rewards/margins', float('nan')):.4f}"
        logger.info(
            "%s step %d/%d loss %s grad %s lr %.3g%s",
            self.kind, row["step"], state.max_steps, _fmt(loss), _fmt(row.get("grad_norm")), row.get("lr", 0.0), extra,
        )  # fmt: skip

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._progress is not None:
            self._progress.__exit__(None, None, None)
            self._progress = None


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) and math.isfinite(v) else str(v)
