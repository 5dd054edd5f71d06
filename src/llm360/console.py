"""Where a command's results go: stdout, for a person (rich) or for a script (one JSON document).

Logs and progress bars go to stderr (:mod:`llm360.log`); what a command answers -- a table, a
verdict, the rows of a step -- goes to a :class:`Results` on stdout, so ``llm360 inspect batch ... |
less`` and ``llm360 eval ... > scores.txt`` capture the answer and nothing else. With ``--json`` the
answer is one JSON document (:meth:`Results.json`) and nothing else is written to stdout.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from rich.console import Console


def jsonable(obj: Any) -> Any:
    """obj with what JSON cannot hold made plain: NaN and infinities -> None, paths -> str,
    numpy scalars and arrays -> numbers and lists, dataclasses -> dicts, tuples and sets -> lists.

    Raises TypeError for anything else JSON cannot encode.
    """
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj) if isinstance(obj, (set, frozenset)) else obj
        return [jsonable(v) for v in items]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return jsonable(obj.tolist())
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


class Results:
    """A command's answer on one stream (stdout): rich text for people, or one JSON document."""

    def __init__(self, file: IO[str]) -> None:
        self.file = file
        self.console = Console(file=file, highlight=False)
        """Rich console on the results stream: colours only when it is a terminal."""

    @property
    def is_terminal(self) -> bool:
        return self.console.is_terminal

    def print(self, *objects: Any, **kwargs: Any) -> None:
        """Console.print on the results stream (markup allowed, lines never hard-wrapped)."""
        kwargs.setdefault("soft_wrap", True)
        self.console.print(*objects, **kwargs)

    def table(self, table: Any) -> None:
        """A rich Table, laid out to the terminal's width (80 columns when piped)."""
        self.console.print(table)

    def write(self, text: str) -> None:
        """Plain text as it is (a YAML document, tab-separated lines)."""
        self.file.write(text)
        self.file.flush()

    def json(self, obj: Any) -> None:
        """obj as one JSON document on one line (see :func:`jsonable` for what is converted)."""
        self.write(json.dumps(jsonable(obj), ensure_ascii=False, allow_nan=False) + "\n")
