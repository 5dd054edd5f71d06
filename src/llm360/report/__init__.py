"""`llm360 report`: one self-contained HTML page that shows what a run (or a release) holds.

:func:`build_report` reads a run directory -- config, data manifest, checkpoints, metrics and
events, evaluations, memorization and contamination analyses -- and writes ``report/index.html``:
a transparency table filled from the files present (after the LLM360 paper's Table 1), the
architecture, the data mix per chunk, the training curves with chunk boundaries and events, and
the evaluation and analysis results over checkpoints. Charts are inline SVG drawn in Python; the
page loads nothing (no CDN, no fonts) and opens from disk, offline.

* :mod:`llm360.report.collect` -- read the folder, tolerating missing and malformed files
* :mod:`llm360.report.transparency` -- the yes / partial / no table and its evidence
* :mod:`llm360.report.html` -- the building blocks of a section (tables, figures, tolerant readers)
* :mod:`llm360.report.sections` -- the sections that describe the run (transparency, config, architecture, data)
* :mod:`llm360.report.training` -- the training curves and events
* :mod:`llm360.report.results` -- evaluations, memorization and contamination
* :mod:`llm360.report.charts` -- the charts, drawn from the parts in :mod:`llm360.report.svg`
* :mod:`llm360.report.page` -- the page, and :func:`build_report`
"""

from __future__ import annotations

from llm360.report.page import build_report

__all__ = ["build_report"]
