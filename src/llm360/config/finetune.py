"""The `finetune` section: SFT (AmberChat's recipe) and DPO (AmberSafe's) with their defaults.

The defaults *are* the paper's recipes, so ``llm360 finetune sft`` with no overrides follows
AmberChat and ``llm360 finetune dpo`` follows AmberSafe; any field can be overridden
(``--set finetune.sft.lr=1e-4``). :data:`llm360.config.presets.FINETUNE_PRESETS` names them, for
configs that want to say so.

Values the paper states: AmberChat SFT lr 2e-5, 3 epochs, warmup ratio 0.04, gradient accumulation
16; AmberSafe DPO beta 0.1, lr 5e-7, gradient accumulation 4. Everything else is this framework's
choice and documented as such in the field's docstring.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from llm360.config.base import Section, seed_field

FinetuneKind = Literal["sft", "dpo"]
FINETUNE_KINDS: tuple[str, ...] = ("sft", "dpo")


class _TrainingSection(Section):
    """Fields shared by SFT and DPO."""

    name: str | None = None
    """Output folder under `finetune/` in the run directory; null: `<kind>-<base checkpoint name>`, e.g. `sft-ckpt_012`."""
    epochs: float = Field(3.0, gt=0)
    """Passes over the training records (fractions allowed); ignored when max_steps is set."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps (overrides epochs); null: train for `epochs`."""
    lr: float = Field(2e-5, gt=0)
    """Peak learning rate of AdamW (AmberChat: 2e-5)."""
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after warmup (our choice: cosine to 0, as FastChat's AmberChat recipe)."""
    warmup_ratio: float = Field(0.04, ge=0.0, lt=1.0)
    """Fraction of the optimizer steps spent in linear warmup from 0 to lr."""
    micro_batch_size: int = Field(2, ge=1)
    """Records per forward pass (per device; our choice: 2); the optimizer batch is micro_batch_size x gradient_accumulation."""
    gradient_accumulation: int = Field(16, ge=1)
    """Micro-batches per optimizer step, over all ranks (under torchrun each rank runs gradient_accumulation / ranks of them; it must divide)."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay (our choice: 0, as usual for fine-tuning)."""
    grad_clip: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value; null disables."""
    max_length: int | None = Field(None, ge=8)
    """Longest tokenized record (prompt + response) in tokens, longer ones are cut at the end; null: the model's context length."""
    max_records: int | None = Field(None, ge=1)
    """Use only the first N records of the data (in file order); null: all."""
    format: Literal["chat", "raw"] = "chat"
    """chat: plain-string prompts and responses become user/assistant turns rendered by the chat template; raw: plain strings are trained on as they are (messages are refused)."""
    chat_template: str = "auto"
    """auto: the tokenizer's own chat template, else llm360's plain-text one (`<|user|>`/`<|assistant|>` markers, no new tokens); llm360: always llm360's; or a path to a Jinja file."""
    seed: int = seed_field(42)
    """Seed of the data order and of every RNG the trainer uses."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast with fp32 weights on a GPU that supports it, fp32 on CPU; saved weights are always fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (slower)."""
    log_every: int = Field(1, ge=1)
    """Write a metrics line (finetune/<name>/metrics.jsonl) and a log line every N optimizer steps."""

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str | None) -> str | None:
        return None if v is None else check_output_name(v)


class SftConfig(_TrainingSection):
    """Supervised fine-tuning with TRL's SFTTrainer; defaults: AmberChat."""

    loss_on: Literal["assistant", "all"] = "assistant"
    """assistant: loss only on assistant turns / completions (as AmberChat's FastChat recipe); all: on every token."""


class DpoConfig(_TrainingSection):
    """Direct preference optimization with TRL's DPOTrainer; defaults: AmberSafe."""

    epochs: float = Field(3.0, gt=0)
    """Passes over the preference pairs (our choice: 3, as AmberChat; the paper gives none for DPO); ignored when max_steps is set."""
    lr: float = Field(5e-7, gt=0)
    """Peak learning rate of AdamW (AmberSafe: 5e-7)."""
    gradient_accumulation: int = Field(4, ge=1)
    """Micro-batches per optimizer step, over all ranks as for SFT (AmberSafe: 4)."""
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    """Fraction of the optimizer steps spent in linear warmup (our choice: 0.1, the common DPO setting)."""
    beta: float = Field(0.1, gt=0)
    """DPO temperature: higher keeps the policy closer to the reference (the base checkpoint). AmberSafe: 0.1."""
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust"] = "sigmoid"
    """DPO loss: sigmoid (the DPO paper's), hinge, ipo or robust."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    """Probability that a preference label is flipped (robust DPO); 0 for plain DPO."""


class FinetuneConfig(Section):
    """Fine-tuning of a pretrained checkpoint: `llm360 finetune sft|dpo`."""

    sft: SftConfig = Field(default_factory=SftConfig)
    """Supervised fine-tuning (defaults: AmberChat — lr 2e-5, 3 epochs, warmup ratio 0.04, gradient accumulation 16)."""
    dpo: DpoConfig = Field(default_factory=DpoConfig)
    """Direct preference optimization (defaults: AmberSafe — beta 0.1, lr 5e-7, gradient accumulation 4)."""


def check_output_name(name: str) -> str:
    """name, checked to be one plain folder name (letters, digits, `-`, `_`, `.`; not hidden);
    raises ValueError (which pydantic reports as a field error) otherwise."""
    ok = name and not name.startswith(".") and all(c.isalnum() or c in "-_." for c in name)
    if not ok:
        raise ValueError(
            f"output name {name!r} must be a plain folder name (letters, digits, '-', '_', '.'; not starting with '.')"
        )
    return name
