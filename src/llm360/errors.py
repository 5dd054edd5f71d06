"""User-facing errors.

Anything a user can cause (a bad config, a malformed file, a missing checkpoint) raises an
:class:`Llm360Error` whose message says what was wrong, where, and what to do. The CLI prints it
without a traceback; any other exception is a bug in llm360 and keeps its traceback.
"""

from __future__ import annotations


class Llm360Error(Exception):
    """An error caused by input or state the user controls; the message is the whole story."""

    exit_code = 2


class ConfigError(Llm360Error):
    """The config (file, preset or ``--set`` override) is invalid."""


class DataError(Llm360Error):
    """Input data or a prepared data directory is missing, malformed or inconsistent."""


class RunDirError(Llm360Error):
    """The run directory holds something that conflicts with what was asked."""


class CheckpointError(Llm360Error):
    """A checkpoint is missing, incomplete, corrupt or belongs to another run."""
