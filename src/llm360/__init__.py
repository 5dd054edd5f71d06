"""llm360: fully transparent LLM pretraining.

Every stage reads and writes one run directory (see ``llm360.rundir.layout``): data chunks in training
order, one complete checkpoint per chunk, metrics, evaluations and analyses, so a run can be
released and verified by replay.
"""

__version__ = "0.2.0"
