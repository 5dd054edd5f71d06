"""`llm360 run`: every stage, in order, on one run directory; each stage resumes or skips itself."""

from __future__ import annotations

import logging
from pathlib import Path

from llm360.config import RunConfig

logger = logging.getLogger(__name__)


def run_all(cfg: RunConfig, run_dir: Path, *, workers: int = 1) -> None:
    """Prepare the data, then the later stages; a finished stage says so and is skipped."""
    from llm360.data.prepare import prepare
    from llm360.train.loop import train

    logger.info("stage 1: prepare")
    prepare(cfg, run_dir, workers=workers)
    logger.info("stage 2: train")
    train(cfg, run_dir)
    from llm360.eval import evaluate

    logger.info("stage 3: eval")
    evaluate(run_dir, None, cfg.eval)
