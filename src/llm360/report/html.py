"""The building blocks of the report's sections: the section itself, tables, key-value lists, figures,
and readers that take whatever a file holds without failing (a JSON file can hold anything; the page
must not care). Every text that comes from a file goes through :func:`~llm360.report.svg.esc`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from llm360.report.svg import esc, finite, fmt_value


@dataclass
class Section:
    """One section of the page: its HTML body, or a "not available" line when its files are not there."""

    id: str
    title: str
    body: str
    available: bool
    failed: bool = False
    """Its files parsed but held the wrong shapes (marked ``data-failed`` on the page)."""

    def html(self) -> str:
        failed = ' data-failed="yes"' if self.failed else ""
        return (f'<section id="{esc(self.id)}" data-available="{"yes" if self.available else "no"}"{failed}>'
                f"<h2>{esc(self.title)}</h2>{self.body}</section>")  # fmt: skip


class Ids:
    """Unique element ids for the charts of one page (deterministic: same run, same page)."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}-{self.n}"


def na(why: str) -> str:
    """The "not available: <why>" line of a section or a part of one."""
    return f'<p class="na">not available: {esc(why)}</p>'


def table(
    headers: Sequence[str], rows: Iterable[Sequence[Any]], *, numeric: Iterable[int] = (), cls: str = ""
) -> str:
    """An HTML table; cells are escaped unless given as ``Raw``; ``numeric`` columns are right-aligned."""
    num = set(numeric)
    head = "".join(f'<th{" class=num" if i in num else ""}>{esc(h)}</th>' for i, h in enumerate(headers))
    body = []
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            text = v.html if isinstance(v, Raw) else esc(fmt_value(v) if not isinstance(v, str) else v)
            cells.append(f'<td{" class=num" if i in num else ""}>{text}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table class="{esc(cls)}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")  # fmt: skip


@dataclass
class Raw:
    """Cell content that is already HTML."""

    html: str


def kv(items: Iterable[tuple[str, Any]]) -> str:
    """A definition list of (label, value); empty values are left out."""
    cells = [f"<div><dt>{esc(k)}</dt><dd>{esc(v if isinstance(v, str) else fmt_value(v))}</dd></div>"
             for k, v in items if v is not None and v != ""]  # fmt: skip
    return f'<dl class="kv">{"".join(cells)}</dl>' if cells else ""


def figure(chart: str, caption: str, sub: str = "", legend: str = "", cls: str = "") -> str:
    """A chart with its caption, a smaller subtitle and its legend."""
    small = f' <span class="small">{esc(sub)}</span>' if sub else ""
    return f'<figure class="{esc(cls)}"><figcaption>{esc(caption)}{small}</figcaption>{legend}{chart}</figure>'


def get_in(d: Any, *keys: str) -> Any:
    """d[k1][k2]..., or None where a level is missing or not an object."""
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def as_dict(x: Any) -> dict[str, Any]:
    """x if it is a JSON object, else an empty one: files can hold anything, the page must not care."""
    return x if isinstance(x, dict) else {}


def as_list(x: Any) -> list[Any]:
    return x if isinstance(x, list) else []


def as_int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def as_num(x: Any) -> float | None:
    """A finite number as float, else None (bools, strings, NaN and inf are not numbers here)."""
    return float(x) if finite(x) else None


def as_text(x: Any, default: str = "") -> str:
    return default if x is None else str(x)


def pct(x: Any) -> str:
    v = as_num(x)
    return f"{v:.1%}" if v is not None else "—"


def pick(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n), first and last included."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def duration(seconds: float) -> str:
    """Seconds as "12.3 s", "4m 05s" or "2h 03m 09s"."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"
