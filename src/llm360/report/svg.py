"""The parts every inline SVG chart of the report is made of, with no dependency.

Escaping, colours, number formats and axis ticks; :func:`decimate`, which thins a long series; the
linear or log :class:`Scale`; the parameters of a line chart (:class:`Series`, :class:`VLine`,
:class:`Mark`, :class:`Legend`); and the SVG pieces a chart assembles: the opening tag, axes,
markers, paths, bands and vertical lines. The charts themselves are :mod:`llm360.report.charts`.

Charts use a fixed ``viewBox`` and scale to the page width. Every text is escaped; every id is
given by the caller so one page never repeats one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

WIDTH = 960
"""viewBox width of every chart (it scales to the container's width)."""
MAX_POINTS = 1000
"""Most points drawn per series; longer series are thinned to bucket means with a min/max band."""
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#bab0ac")  # fmt: skip
"""Tableau 10: distinguishable, colour-blind friendlier than most."""
LEFT, RIGHT, TOP, BOTTOM = 62, 18, 16, 42
"""Margins of a chart's plot area inside its viewBox, in viewBox units."""


def esc(value: object) -> str:
    """HTML-escaped text of any value (quotes included, so it is safe in attributes too)."""
    return escape(str(value), quote=True)


def color(i: int) -> str:
    """The i-th colour of the palette (cycling)."""
    return PALETTE[i % len(PALETTE)]


def sequential(t: float) -> str:
    """A colour on a plasma-like ramp, t in [0, 1]: early checkpoints dark blue, late ones orange.

    The ramp stops before plasma's pale yellow, which would vanish on a white page.
    """
    stops = ((13, 8, 135), (106, 0, 168), (177, 42, 144), (225, 100, 98), (245, 150, 40))
    return _ramp(stops, t)


def diverging(t: float) -> str:
    """Blue (-1) - white (0) - red (+1) for t in [-1, 1]."""
    stops = ((33, 102, 172), (146, 197, 222), (247, 247, 247), (244, 165, 130), (178, 24, 43))
    return _ramp(stops, (t + 1) / 2)


def _ramp(stops: Sequence[tuple[int, int, int]], t: float) -> str:
    t = min(1.0, max(0.0, t if math.isfinite(t) else 0.0)) * (len(stops) - 1)
    i = min(int(t), len(stops) - 2)
    f = t - i
    rgb = (round(a + (b - a) * f) for a, b in zip(stops[i], stops[i + 1], strict=True))
    return "#" + "".join(f"{c:02x}" for c in rgb)


# --------------------------------------------------------------------------------- numbers


_HUGE = 1e300
"""Larger magnitudes are treated as garbage, not numbers: sums and scales of them would overflow."""


def finite(v: object) -> bool:
    """An int or float of sensible magnitude (bools, numeric strings, NaN, inf and |v| >= 1e300 are not)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return -_HUGE < v < _HUGE
    except OverflowError:  # pragma: no cover - comparisons of ints with floats do not overflow
        return False


def to_float(v: object) -> float:
    """v as a float when finite() holds, else NaN (fast path for the long series of a run)."""
    if v.__class__ is float:
        return v if -_HUGE < v < _HUGE else math.nan  # type: ignore[return-value,operator]
    return float(v) if finite(v) else math.nan  # type: ignore[arg-type]


def fmt_si(v: float, digits: int = 3) -> str:
    """Compact number: 1234 -> 1.23k, 1.26e12 -> 1.26T; small numbers with `digits` significant digits."""
    if not finite(v):
        return str(v)
    a = abs(v)
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if a >= div:
            return f"{v / div:.{digits}g}{suffix}"
    if a == int(a) and a < 1e3:
        return str(int(v))
    return f"{v:.{digits}g}"


def fmt_value(v: object, digits: int = 4) -> str:
    """A value for tables and tooltips: ints with thousands separators, floats with 4 significant digits."""
    if isinstance(v, bool) or v is None:
        return "—" if v is None else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if 1e4 <= abs(v) < 1e15:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = mag * 10
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            step = m * mag
            break
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    v = first
    while v <= hi + step * 1e-9 and len(ticks) < 50:
        ticks.append(0.0 if abs(v) < step * 1e-9 else v)
        v += step
    return ticks


def tick_label(v: float, ticks: Sequence[float]) -> str:
    """Label of tick v: same decimals on every tick of the axis, SI suffixes for large values."""
    if len(ticks) >= 2:
        step = abs(ticks[1] - ticks[0])
        if max(abs(t) for t in ticks) >= 1e4:
            return fmt_si(v, 4)
        decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 0
        if step * 10**decimals % 1 > 1e-6:  # 2.5 steps need one more decimal
            decimals += 1
        if decimals < 5:
            return f"{v:.{decimals}f}"
        for digits in range(2, 12):  # tiny steps: the fewest significant digits that tell the ticks apart
            if len({f"{t:.{digits}g}" for t in ticks}) == len(ticks):
                return f"{v:.{digits}g}"
    return fmt_si(v)


def log_ticks(lo: float, hi: float) -> list[float]:
    """Powers of ten between 10**lo and 10**hi (plus 2 and 5 when there are few decades)."""
    a, b = math.floor(lo), math.ceil(hi)
    mults = (1, 2, 5) if b - a <= 3 else (1,)
    out = [m * 10.0**e for e in range(a, b + 1) for m in mults]
    return [t for t in out if lo - 1e-9 <= math.log10(t) <= hi + 1e-9]


@dataclass
class Thinned:
    """A series ready to draw: the points, and per point the min and max it stands for when thinned."""

    x: list[float]
    y: list[float]
    lo: list[float] | None = None
    hi: list[float] | None = None


def decimate(xs: list[float], ys: list[float], max_points: int = MAX_POINTS) -> Thinned:
    """The points as they are when there are at most max_points; else max_points buckets of consecutive
    points, each drawn at its mean x and mean y with its min and max kept (drawn as a band), so that a
    spike in one step still shows. A bucket without a finite value is a gap."""
    n = len(xs)
    if n <= max_points:
        return Thinned(list(xs), list(ys))
    out = Thinned([], [], [], [])
    assert out.lo is not None and out.hi is not None
    size = n / max_points
    for b in range(max_points):
        lo, hi = int(b * size), int((b + 1) * size) if b < max_points - 1 else n
        vals = [v for v in ys[lo:hi] if math.isfinite(v)]
        out.x.append((xs[lo] + xs[hi - 1]) / 2)
        if vals:
            out.y.append(math.fsum(vals) / len(vals))
            out.lo.append(min(vals))
            out.hi.append(max(vals))
        else:
            out.y.append(math.nan)
            out.lo.append(math.nan)
            out.hi.append(math.nan)
    return out


@dataclass
class Scale:
    """Linear (or log10) map from a data interval to a pixel interval."""

    d0: float
    d1: float
    r0: float
    r1: float
    log: bool = False

    def __call__(self, v: float) -> float:
        if self.log:
            v = math.log10(v) if v > 0 else self.d0
        if self.d1 == self.d0:
            return (self.r0 + self.r1) / 2
        return self.r0 + (v - self.d0) / (self.d1 - self.d0) * (self.r1 - self.r0)


# --------------------------------------------------------------------------------- parts


@dataclass
class Series:
    """One line of a line chart."""

    name: str
    x: Sequence[float]
    y: Sequence[float]
    color: str = PALETTE[0]
    width: float = 1.6
    dash: str | None = None
    markers: bool = False
    """Draw a dot at every point (for short series such as evaluations over checkpoints)."""
    hover: bool = True
    """Show this series' value in the hover readout."""
    opacity: float = 1.0


@dataclass
class VLine:
    """A vertical line at data x (chunk boundaries, stage starts)."""

    x: float
    label: str = ""
    title: str = ""
    color: str = "var(--grid-strong)"
    dash: str = "3 3"
    strong: bool = False
    """Always drawn and labelled first (stage starts), where plain lines may be thinned."""


@dataclass
class Mark:
    """A marker at (x, y); y None puts it on the top edge (events)."""

    x: float
    y: float | None
    title: str
    color: str = "#e15759"
    shape: str = "triangle"
    css: str = "mark"


@dataclass
class Legend:
    items: list[tuple[str, str]] = field(default_factory=list)
    """(label, colour)."""

    def html(self) -> str:
        if not self.items:
            return ""
        spans = "".join(
            f'<span class="key"><i style="background:{esc(c)}"></i>{esc(label)}</span>' for label, c in self.items
        )
        return f'<div class="legend">{spans}</div>'


def svg_open(cid: str, height: int, kind: str, aria: str, extra: str = "", width: int = WIDTH) -> str:
    """The opening ``<svg>`` tag of a chart: class ``chart <kind>``, its id, viewBox and accessible label."""
    return (
        f'<svg class="chart {kind}" id="{esc(cid)}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{esc(aria)}" preserveAspectRatio="xMidYMid meet"{extra}>'
    )


def marker(x: float, y: float, shape: str, fill: str, css: str, title: str) -> str:
    """A point marker: triangle, diamond, square, or else a circle, with a hover title."""
    t = f"<title>{esc(title)}</title>"
    if shape == "triangle":
        pts = f"{x:.1f},{y + 5:.1f} {x - 5:.1f},{y - 4:.1f} {x + 5:.1f},{y - 4:.1f}"
        return f'<polygon class="{css}" points="{pts}" fill="{esc(fill)}">{t}</polygon>'
    if shape == "diamond":
        pts = f"{x:.1f},{y - 6:.1f} {x + 5:.1f},{y:.1f} {x:.1f},{y + 6:.1f} {x - 5:.1f},{y:.1f}"
        return f'<polygon class="{css}" points="{pts}" fill="{esc(fill)}">{t}</polygon>'
    if shape == "square":
        return f'<rect class="{css}" x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" fill="{esc(fill)}">{t}</rect>'
    return f'<circle class="{css}" cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{esc(fill)}">{t}</circle>'


def axes(
    xs: Scale, ys: Scale, xticks: Sequence[float], yticks: Sequence[float], height: int, xlabel: str, ylabel: str,
    x_format: str = "auto", y_log: bool = False,
) -> list[str]:  # fmt: skip
    """Grid lines, ticks and labels of both axes, and the x axis line."""
    out = ['<g class="axes">']
    x0, x1 = xs.r0, xs.r1
    y0 = ys.r0
    for t in yticks:
        py = ys(t)
        label = fmt_si(t) if y_log else tick_label(t, yticks)
        out.append(f'<line class="grid" x1="{x0:.1f}" x2="{x1:.1f}" y1="{py:.1f}" y2="{py:.1f}"/>')
        out.append(f'<text class="tick" x="{x0 - 6:.1f}" y="{py + 3.5:.1f}" text-anchor="end">{esc(label)}</text>')
    for t in xticks:
        px = xs(t)
        label = str(int(t)) if x_format == "int" else tick_label(t, xticks)
        out.append(f'<line class="tickmark" x1="{px:.1f}" x2="{px:.1f}" y1="{y0:.1f}" y2="{y0 + 4:.1f}"/>')
        out.append(f'<text class="tick" x="{px:.1f}" y="{y0 + 16:.1f}" text-anchor="middle">{esc(label)}</text>')
    out.append(f'<line class="axis" x1="{x0:.1f}" x2="{x1:.1f}" y1="{y0:.1f}" y2="{y0:.1f}"/>')
    if xlabel:
        out.append(f'<text class="label" x="{(x0 + x1) / 2:.1f}" y="{height - 6}" text-anchor="middle">'
                   f"{esc(xlabel)}</text>")  # fmt: skip
    if ylabel:
        cy = (ys.r0 + ys.r1) / 2
        out.append(f'<text class="label" transform="translate(13 {cy:.1f}) rotate(-90)" text-anchor="middle">'
                   f"{esc(ylabel)}</text>")  # fmt: skip
    out.append("</g>")
    return out


def path_data(points: Sequence[tuple[float, float]]) -> str:
    """SVG path data; a NaN y breaks the line."""
    parts: list[str] = []
    pen_up = True
    for x, y in points:
        if not math.isfinite(y):
            pen_up = True
            continue
        parts.append(f"{'M' if pen_up else 'L'}{x:.1f} {y:.1f}")
        pen_up = False
    return "".join(parts)


def band(px: Sequence[float], lo: Sequence[float], hi: Sequence[float]) -> str:
    """Closed SVG path(s) between the lo and hi curves; a NaN breaks the band."""
    parts, run = [], []
    for i in range(len(px) + 1):
        if i < len(px) and math.isfinite(lo[i]) and math.isfinite(hi[i]):
            run.append(i)
            continue
        if run:
            up = "L".join(f"{px[j]:.1f} {hi[j]:.1f}" for j in run)
            down = "L".join(f"{px[j]:.1f} {lo[j]:.1f}" for j in reversed(run))
            parts.append(f"M{up}L{down}Z")
            run = []
    return "".join(parts)


def vline_marks(vlines: Sequence[VLine], xs: Scale, height: int, W: int) -> list[str]:
    """Vertical lines, thinned to one every 5 px or more, labelled where there is room (stage lines first)."""
    out: list[str] = []
    strong = [v for v in vlines if v.strong]
    plain = [v for v in vlines if not v.strong]
    keep_every = max(1, math.ceil(len(plain) * 5 / max(W - LEFT - RIGHT, 1)))
    labelled: list[tuple[float, float]] = []  # (start, end) of the labels written
    for group, every in ((strong, 1), (plain, keep_every)):
        for i, v in enumerate(group):
            if i % every:
                continue
            px = xs(v.x)
            title = f"<title>{esc(v.title)}</title>" if v.title else ""
            out.append(f'<line class="vline" x1="{px:.1f}" x2="{px:.1f}" y1="{TOP}" y2="{height - BOTTOM}" '
                       f'stroke="{esc(v.color)}" stroke-dasharray="{esc(v.dash)}">{title}</line>')  # fmt: skip
            start, end = px + 2, px + 2 + 5.8 * len(v.label)  # about 5.8 units per character at 9.5 px
            if v.label and end <= W and all(end + 4 <= a or start >= b + 4 for a, b in labelled):
                labelled.append((start, end))
                out.append(f'<text class="vlabel" x="{start:.1f}" y="{TOP + 8}">{esc(v.label)}</text>')
    return out


def json_number(v: float) -> float | int:
    """A number for a chart's hover data: an int where it is one, else 6 significant digits."""
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) < 2**53):
        return int(v)
    return float(f"{v:.6g}")
