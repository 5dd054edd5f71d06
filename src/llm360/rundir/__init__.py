"""The run directory's on-disk format, in one place.

Every stage reads and writes a run directory (and a release) only through this package:

- :mod:`~llm360.rundir.layout`: every name in a run directory and a release, and which checkpoints
  a folder holds;
- :mod:`~llm360.rundir.atomic`: whole-or-nothing writes of files and folders, the one leftover
  recovery rule, and the run lock;
- :mod:`~llm360.rundir.checkpoint`: the checkpoint folder: save, verify, load, the marker, latest
  complete; with :mod:`~llm360.rundir.optimizer_state` (optimizer state by parameter name) and
  :mod:`~llm360.rundir.rng_state` (every RNG's state);
- :mod:`~llm360.rundir.tensorio`: the tensor I/O engine (streaming safetensors, hashing while
  writing and reading, O_DIRECT);
- :mod:`~llm360.rundir.data`: the data manifest, :class:`~llm360.rundir.data.DataStore` and the step index.

It imports no stage package.
"""
