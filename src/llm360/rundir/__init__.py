"""The run directory's on-disk format, in one place.

Every stage reads and writes a run directory (and a release) only through this package:

- :mod:`~llm360.rundir.layout`: every name in a run directory and a release;
- :mod:`~llm360.rundir.atomic`: whole-or-nothing writes, leftover recovery and the run lock;
- :mod:`~llm360.rundir.checkpoint`: the checkpoint folder: save, verify, load, list, latest complete;
- :mod:`~llm360.rundir.data`: the data manifest, :class:`~llm360.rundir.data.DataStore` and the step index.

It imports no stage package.
"""
