"""The whole run config: one section per stage, the checks between sections, and the hash that names a data set."""

from __future__ import annotations

from pydantic import Field, model_validator

from llm360.config.analysis import AnalysisConfig
from llm360.config.base import Section, stable_hash
from llm360.config.data import DataConfig
from llm360.config.eval import EvalConfig
from llm360.config.finetune import FinetuneConfig
from llm360.config.model import ModelConfig
from llm360.config.train import TrainConfig


class RunConfig(Section):
    name: str = "llm360-run"
    """Run name, used in the release and the model card."""
    preset: str | None = None
    """Preset this config started from (informational)."""
    data: DataConfig
    """Data preparation: sources, tokenizer, mix, stages and chunking."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """Model architecture."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Optimizer, schedule, precision, checkpointing and guards."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Evaluation of every checkpoint: tasks, batch size, device, watch mode."""
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    """Analysis360: memorization over checkpoints and chunks, contamination of evaluation sets."""
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    """Fine-tuning of checkpoints (`llm360 finetune sft|dpo`): AmberChat's SFT and AmberSafe's DPO recipes."""

    @model_validator(mode="after")
    def _check_model_fits_data(self) -> RunConfig:
        """What the model section must agree on with the data section, checked before any stage runs
        (training checks the same against the prepared data)."""
        m, d = self.model, self.data
        if m.max_seq_len is not None and m.max_seq_len < d.seq_len:
            raise ValueError(
                f"model.max_seq_len = {m.max_seq_len} is shorter than data.seq_len = {d.seq_len}; "
                "set it to null (take data.seq_len) or to at least the sequence length"
            )
        if m.vocab_size is not None and d.tokenizer.kind != "file" and m.vocab_size < d.tokenizer.vocab_size:
            raise ValueError(
                f"model.vocab_size = {m.vocab_size} is smaller than data.tokenizer.vocab_size = "
                f"{d.tokenizer.vocab_size}; set it to null (take the tokenizer's) or to a larger, padded size"
            )
        r = m.rotary_dims_per_head()
        if r != int(r) or int(r) % 2 or r < 2:
            raise ValueError(
                f"model.rope_fraction = {m.rope_fraction} gives {r:g} rotary dims of each head's "
                f"{m.hidden_size // m.num_heads} (hidden_size / num_heads); it must be a positive even integer"
            )
        return self

    def data_hash(self) -> str:
        """sha256 of the data section: two configs with the same hash prepare the same data."""
        return stable_hash(self.data.model_dump(mode="json"))

