"""Typed run configuration: one place that says what every field means.

Every field carries a one-line docstring. Those strings are the documentation: they become the
comments of the resolved ``config.yaml`` written into each run directory, the text of
``llm360 config show``, and part of every validation error.

A config comes from (in order) a preset, a YAML file, and ``--set a.b.c=value`` overrides. List
items can be addressed by index or, where they have a ``name`` (sources, stages) or ``source``
(mix entries), by that name: ``--set data.sources.code.paths=[a.jsonl]``.

Modules, one job each (this package imports no stage package, so every stage can import it):

* :mod:`~llm360.config.base` -- the :class:`Section` base, :func:`stable_hash`, the validation
  error message and field-doc lookups;
* the sections' schemas: :mod:`~llm360.config.data`, :mod:`~llm360.config.model`,
  :mod:`~llm360.config.train`, :mod:`~llm360.config.eval`, :mod:`~llm360.config.analysis`,
  :mod:`~llm360.config.finetune`, and :mod:`~llm360.config.run` (the whole :class:`RunConfig`);
* :mod:`~llm360.config.presets` -- every named preset: runs, model architectures, fine-tuning recipes;
* :mod:`~llm360.config.overrides` -- ``--set`` parsing and the merge of a file over a preset;
* :mod:`~llm360.config.load` -- :func:`load_config`, :func:`validate_config`, :func:`finetune_config`;
* :mod:`~llm360.config.document` -- :func:`to_yaml` and :func:`field_docs`.
"""

from llm360.config.analysis import AnalysisConfig, ContaminationConfig, MemorizationConfig
from llm360.config.base import Section, stable_hash
from llm360.config.data import (
    DataConfig,
    EmbeddedPart,
    MixEntry,
    SourceConfig,
    SourceKind,
    StageConfig,
    TokenizerConfig,
)
from llm360.config.document import field_docs, to_yaml
from llm360.config.eval import EvalConfig
from llm360.config.finetune import (
    FINETUNE_KINDS,
    DpoConfig,
    FinetuneConfig,
    FinetuneKind,
    SftConfig,
    check_output_name,
)
from llm360.config.load import finetune_config, load_config, preset_dict, validate_config
from llm360.config.model import ModelConfig, MupConfig, parametrization_text
from llm360.config.overrides import apply_override, parse_override
from llm360.config.presets import AMBER_MIX_BTOKENS, FINETUNE_PRESETS, MODEL_PRESETS, PRESETS
from llm360.config.run import RunConfig
from llm360.config.train import GuardConfig, TrainConfig

__all__ = [
    "AMBER_MIX_BTOKENS",
    "FINETUNE_KINDS",
    "FINETUNE_PRESETS",
    "MODEL_PRESETS",
    "PRESETS",
    "AnalysisConfig",
    "ContaminationConfig",
    "DataConfig",
    "DpoConfig",
    "EmbeddedPart",
    "EvalConfig",
    "FinetuneConfig",
    "FinetuneKind",
    "GuardConfig",
    "MemorizationConfig",
    "MixEntry",
    "ModelConfig",
    "MupConfig",
    "RunConfig",
    "Section",
    "SftConfig",
    "SourceConfig",
    "SourceKind",
    "StageConfig",
    "TokenizerConfig",
    "TrainConfig",
    "apply_override",
    "check_output_name",
    "field_docs",
    "finetune_config",
    "load_config",
    "parametrization_text",
    "parse_override",
    "preset_dict",
    "stable_hash",
    "to_yaml",
    "validate_config",
]
