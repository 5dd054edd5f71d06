"""Dependency-free inline SVG charts: line charts, stacked bars, bar charts (histograms), heatmaps.

Everything is drawn here, in Python, as static SVG, so the page needs no library, no network and no
script to show its numbers (the page's small script only adds a hover readout to line charts, from
the ``data-hover`` attribute written below). Charts use a fixed ``viewBox`` and scale to the page
width. Every text is escaped; every id is given by the caller so one page never repeats one.

Long series (a 360-chunk run logs hundreds of thousands of steps) are thinned: ``MAX_POINTS``
buckets of consecutive steps, each drawn at its mean with a light band from its min to its max, so
a spike in a single step stays visible while the page stays small.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from html import escape

WIDTH = 960
"""viewBox width of every chart (it scales to the container's width)."""
MAX_POINTS = 1000
"""Most points drawn per series; longer series are thinned to bucket means with a min/max band."""
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#bab0ac")  # fmt: skip
"""Tableau 10: distinguishable, colour-blind friendlier than most."""
_LEFT, _RIGHT, _TOP, _BOTTOM = 62, 18, 16, 42


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


def _tick_label(v: float, ticks: Sequence[float]) -> str:
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


def _log_ticks(lo: float, hi: float) -> list[float]:
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


def _svg_open(cid: str, height: int, kind: str, aria: str, extra: str = "", width: int = WIDTH) -> str:
    return (
        f'<svg class="chart {kind}" id="{esc(cid)}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{esc(aria)}" preserveAspectRatio="xMidYMid meet"{extra}>'
    )


def _marker(x: float, y: float, shape: str, fill: str, css: str, title: str) -> str:
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


def _axes(
    xs: Scale, ys: Scale, xticks: Sequence[float], yticks: Sequence[float], height: int, xlabel: str, ylabel: str,
    x_format: str = "auto", y_log: bool = False,
) -> list[str]:  # fmt: skip
    out = ['<g class="axes">']
    x0, x1 = xs.r0, xs.r1
    y0 = ys.r0
    for t in yticks:
        py = ys(t)
        label = fmt_si(t) if y_log else _tick_label(t, yticks)
        out.append(f'<line class="grid" x1="{x0:.1f}" x2="{x1:.1f}" y1="{py:.1f}" y2="{py:.1f}"/>')
        out.append(f'<text class="tick" x="{x0 - 6:.1f}" y="{py + 3.5:.1f}" text-anchor="end">{esc(label)}</text>')
    for t in xticks:
        px = xs(t)
        label = str(int(t)) if x_format == "int" else _tick_label(t, xticks)
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


def _path(points: Sequence[tuple[float, float]]) -> str:
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


def _y_domain(values: list[float], log: bool, robust: bool, y_min: float | None, y_max: float | None):
    """(lo, hi, clip_above): the y range, and the value above which points are clipped (robust mode)."""
    vals = sorted(v for v in values if math.isfinite(v) and (v > 0 or not log))
    if not vals:
        return 0.0, 1.0, None
    lo, hi = vals[0], vals[-1]
    clip = None
    if robust and len(vals) >= 20:
        q = vals[min(len(vals) - 1, int(0.99 * (len(vals) - 1)))]
        if not log and hi > q + 2 * (q - lo) and q - lo > 1e-3 * abs(q):  # else: flat data, nothing to zoom into
            clip = q + 0.5 * (q - lo)
            hi = clip
        elif log and hi > q * 100:
            clip = q * 10
            hi = clip
    if log:
        lo, hi = math.log10(lo), math.log10(hi)
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        return lo, hi, clip
    if y_min is not None:
        lo = min(lo, y_min)
    if y_max is not None:
        hi = max(hi, y_max)
    if hi - lo < 1e-12:
        pad = abs(hi) * 0.05 or 0.5
        lo, hi = lo - pad, hi + pad
    else:
        pad = (hi - lo) * 0.04
        lo = lo - pad if (y_min is None or lo - pad >= y_min) else lo
        hi = hi + pad if (y_max is None or hi + pad <= y_max) else hi
    return lo, hi, clip


def line_chart(
    cid: str,
    series: Sequence[Series],
    *,
    xlabel: str = "",
    ylabel: str = "",
    height: int = 260,
    vlines: Sequence[VLine] = (),
    marks: Sequence[Mark] = (),
    log_y: bool = False,
    robust: bool = False,
    y_min: float | None = None,
    y_max: float | None = None,
    x_format: str = "auto",
    x_extra: Callable[[float], str | None] | None = None,
    hlines: Sequence[tuple[float, str]] = (),
    width: int = WIDTH,
    aria: str = "line chart",
) -> str:
    """An SVG line chart of one or more series sharing the axes.

    ``robust`` clips rare extreme values (loss spikes) at the top edge and marks them, so they do not
    flatten the rest; ``log_y`` uses a log10 axis (non-positive values are dropped). ``x_extra`` gives
    extra text for an x value in the hover readout (e.g. the chunk and tokens of a step); ``hlines``
    are (y, label) reference lines such as the gradient clipping threshold. ``width`` is the viewBox
    width: smaller for charts shown small, so their text stays legible.
    """
    W = width
    drawn: list[tuple[Series, Thinned]] = []
    raw_y: list[float] = []
    raw_x: list[float] = []
    for s in series:
        sx, sy = [], []
        for x, y in zip(s.x, s.y, strict=False):
            fx = to_float(x)
            if math.isfinite(fx):
                fy = to_float(y)
                sx.append(fx)
                sy.append(fy if not log_y or fy > 0 else math.nan)
        if any(b < a for a, b in zip(sx, sx[1:], strict=False)):
            order = sorted(range(len(sx)), key=sx.__getitem__)
            sx, sy = [sx[i] for i in order], [sy[i] for i in order]
        raw_y += [y for y in sy if math.isfinite(y)]
        raw_x += [sx[0], sx[-1]] if sx else []
        drawn.append((s, decimate(sx, sy)))
    all_x = raw_x + [v.x for v in vlines if finite(v.x)]
    if not all_x:
        return '<p class="na">no data points</p>'
    x_lo, x_hi = min(all_x), max(all_x)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    elif any(s.markers for s in series):  # room for the dots at both ends
        pad = (x_hi - x_lo) * 0.03
        x_lo, x_hi = x_lo - pad, x_hi + pad
    y_lo, y_hi, clip = _y_domain(raw_y + [y for y, _ in hlines if finite(y)], log_y, robust, y_min, y_max)
    xs = Scale(x_lo, x_hi, _LEFT, W - _RIGHT)
    ys = Scale(y_lo, y_hi, height - _BOTTOM, _TOP, log=log_y)

    def py(y: float) -> float:
        if not math.isfinite(y):
            return math.nan
        return ys(min(y, clip) if clip is not None else y)

    xticks = nice_ticks(x_lo, x_hi, 7 if W >= WIDTH else 5)
    if x_format == "int":
        xticks = sorted({int(round(t)) for t in xticks if abs(t - round(t)) < 1e-9}) or [int(x_lo), int(x_hi)]
    yticks = _log_ticks(y_lo, y_hi) if log_y else nice_ticks(y_lo, y_hi, 5)
    out = [""]
    out.append(f'<defs><clipPath id="{esc(cid)}-clip"><rect x="{_LEFT}" y="{_TOP - 2}" '
               f'width="{W - _LEFT - _RIGHT}" height="{height - _TOP - _BOTTOM + 4}"/></clipPath></defs>')  # fmt: skip
    out += _axes(xs, ys, xticks, yticks, height, xlabel, ylabel, x_format, log_y)
    out += _vlines(vlines, xs, height, W)
    for y, label in hlines:
        if finite(y) and (y > 0 or not log_y):
            hy = ys(y)
            out.append(f'<line class="vline" x1="{_LEFT}" x2="{W - _RIGHT}" y1="{hy:.1f}" y2="{hy:.1f}" '
                       f'stroke="var(--grid-strong)" stroke-dasharray="6 3"><title>{esc(label)}</title></line>')
            out.append(f'<text class="vlabel" x="{W - _RIGHT - 2}" y="{hy - 3:.1f}" text-anchor="end">'
                       f"{esc(label)}</text>")  # fmt: skip
    out.append(f'<g clip-path="url(#{esc(cid)}-clip)">')
    hover = []
    for s, t in drawn:
        px = [xs(x) for x in t.x]
        if t.lo is not None and t.hi is not None:
            out.append(f'<path class="band" d="{_band(px, [py(v) for v in t.lo], [py(v) for v in t.hi])}" '
                       f'fill="{esc(s.color)}" fill-opacity="0.2" stroke="none"><title>{esc(s.name)}: min to max '
                       f"of each {esc(xlabel or 'x')} range</title></path>")  # fmt: skip
        pts = [(x, py(y)) for x, y in zip(px, t.y, strict=True)]
        dash = f' stroke-dasharray="{esc(s.dash)}"' if s.dash else ""
        op = f' stroke-opacity="{s.opacity}"' if s.opacity < 1 and t.lo is None else ""
        out.append(f'<path class="series" d="{_path(pts)}" stroke="{esc(s.color)}" stroke-width="{s.width}"'
                   f'{dash}{op} fill="none"><title>{esc(s.name)}</title></path>')  # fmt: skip
        if s.markers:
            for (mx, my), x, y in zip(pts, t.x, t.y, strict=True):
                if math.isfinite(my):
                    out.append(f'<circle class="dot" cx="{mx:.1f}" cy="{my:.1f}" r="3" fill="{esc(s.color)}">'
                               f"<title>{esc(s.name)}: {esc(fmt_value(y))} at {esc(fmt_value(x))}</title></circle>")  # fmt: skip
        if s.hover:
            keep = [i for i, p in enumerate(pts) if math.isfinite(p[1])]
            name = s.name + (" (mean of range)" if t.lo is not None else "")
            hover.append({
                "n": name, "c": s.color, "px": [round(pts[i][0], 1) for i in keep],
                "py": [round(pts[i][1], 1) for i in keep], "v": [_round(t.y[i]) for i in keep],
                "x": [_round(t.x[i]) for i in keep],
            })  # fmt: skip
    out.append("</g>")
    if clip is not None:
        for s, t in drawn:
            tops = t.hi if t.hi is not None else t.y
            for x, y in zip(t.x, tops, strict=True):
                if math.isfinite(y) and y > clip:
                    out.append(_marker(xs(x), _TOP + 4, "triangle", s.color, "clipped",
                                       f"{s.name} = {fmt_value(y)} at {xlabel or 'x'} {fmt_value(x)} (off the chart)"))
    for m in marks:
        if not finite(m.x):
            continue
        my = _TOP + 5 if m.y is None or not finite(m.y) else py(m.y)
        out.append(_marker(xs(m.x), my, m.shape, m.color, m.css, m.title))
    out.append("</svg>")
    attr = ""
    if hover:
        payload: dict[str, object] = {"xl": xlabel, "s": hover, "top": _TOP, "bottom": height - _BOTTOM}
        if x_extra is not None:
            extra = {}
            for h in hover:
                for x in h["x"]:
                    text = x_extra(x)
                    if text:
                        extra[str(x)] = text
            payload["xe"] = extra
        attr = f' data-hover="{esc(json.dumps(payload, separators=(",", ":"), allow_nan=False))}"'
    out[0] = _svg_open(cid, height, "line", aria, attr, W)
    return "".join(out)


def _band(px: Sequence[float], lo: Sequence[float], hi: Sequence[float]) -> str:
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


def _vlines(vlines: Sequence[VLine], xs: Scale, height: int, W: int) -> list[str]:
    """Vertical lines, thinned to one every 5 px or more, labelled where there is room (stage lines first)."""
    out: list[str] = []
    strong = [v for v in vlines if v.strong]
    plain = [v for v in vlines if not v.strong]
    keep_every = max(1, math.ceil(len(plain) * 5 / max(W - _LEFT - _RIGHT, 1)))
    labelled: list[tuple[float, float]] = []  # (start, end) of the labels written
    for group, every in ((strong, 1), (plain, keep_every)):
        for i, v in enumerate(group):
            if i % every:
                continue
            px = xs(v.x)
            title = f"<title>{esc(v.title)}</title>" if v.title else ""
            out.append(f'<line class="vline" x1="{px:.1f}" x2="{px:.1f}" y1="{_TOP}" y2="{height - _BOTTOM}" '
                       f'stroke="{esc(v.color)}" stroke-dasharray="{esc(v.dash)}">{title}</line>')  # fmt: skip
            start, end = px + 2, px + 2 + 5.8 * len(v.label)  # about 5.8 units per character at 9.5 px
            if v.label and end <= W and all(end + 4 <= a or start >= b + 4 for a, b in labelled):
                labelled.append((start, end))
                out.append(f'<text class="vlabel" x="{start:.1f}" y="{_TOP + 8}">{esc(v.label)}</text>')
    return out


def _round(v: float) -> float | int:
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) < 2**53):
        return int(v)
    return float(f"{v:.6g}")


def stacked_bars(
    cid: str,
    categories: Sequence[str],
    stacks: Sequence[tuple[str, Sequence[float], str]],
    *,
    xlabel: str = "",
    ylabel: str = "",
    height: int = 260,
    boundaries: Sequence[tuple[int, str]] = (),
    aria: str = "stacked bar chart",
) -> str:
    """Vertical bars, one per category, each stacked from (name, values, colour) layers.

    ``boundaries``: (category index, label) where a dashed line is drawn before that bar (stages).
    """
    n = len(categories)
    if n == 0 or not stacks:
        return '<p class="na">no data points</p>'
    totals = [sum(v[i] for _, v, _ in stacks if finite(v[i])) for i in range(n)]
    y_hi = max(totals) or 1.0
    ys = Scale(0.0, y_hi * 1.04, height - _BOTTOM, _TOP)
    plot_w = WIDTH - _LEFT - _RIGHT
    slot = plot_w / n
    bw = min(slot, 80.0)  # a few categories: bars stay bars, not walls
    gap = min(2.0, bw * 0.15)
    xs = Scale(0, n, _LEFT, WIDTH - _RIGHT)
    step = max(1, math.ceil(n / 12))
    out = [_svg_open(cid, height, "bars", aria)]
    out += _axes(xs, ys, [], nice_ticks(0, y_hi * 1.04, 5), height, xlabel, ylabel)
    for i in range(0, n, step):
        out.append(f'<text class="tick" x="{xs(i + 0.5):.1f}" y="{height - _BOTTOM + 16}" text-anchor="middle">'
                   f"{esc(categories[i])}</text>")  # fmt: skip
    for i in range(n):
        base = 0.0
        x = xs(i) + (slot - bw) / 2 + gap / 2
        for name, values, col in stacks:
            v = values[i] if finite(values[i]) else 0.0
            if v <= 0:
                continue
            y_top, y_bot = ys(base + v), ys(base)
            share = v / totals[i] if totals[i] else 0.0
            out.append(
                f'<rect class="bar" x="{x:.2f}" y="{y_top:.2f}" width="{max(bw - gap, 0.5):.2f}" '
                f'height="{max(y_bot - y_top, 0.3):.2f}" fill="{esc(col)}"><title>{esc(categories[i])} · '
                f"{esc(name)}: {esc(fmt_value(v))} ({share:.1%})</title></rect>"
            )
            base += v
    for i, label in boundaries:
        px = xs(i)
        out.append(f'<line class="vline" x1="{px:.1f}" x2="{px:.1f}" y1="{_TOP}" y2="{height - _BOTTOM}" '
                   f'stroke="var(--fg)" stroke-dasharray="4 3"><title>{esc(label)}</title></line>')  # fmt: skip
        out.append(f'<text class="vlabel" x="{px + 3:.1f}" y="{_TOP + 9}">{esc(label)}</text>')
    out.append("</svg>")
    return "".join(out)


def share_bars(
    cid: str,
    labels: Sequence[str],
    parts: Sequence[tuple[str, Sequence[float], str]],
    *,
    aria: str = "shares",
) -> str:
    """One horizontal bar per label, split into (name, shares in [0, 1], colour) parts that sum to 1."""
    n = len(labels)
    if n == 0:
        return '<p class="na">no data points</p>'
    left = min(260, 16 + 6.5 * max(len(str(x)) for x in labels))
    row, top = 26, 8
    height = int(top + n * row + 30)
    xs = Scale(0.0, 1.0, left, WIDTH - _RIGHT)
    out = [f'<svg class="chart bars" id="{esc(cid)}" viewBox="0 0 {WIDTH} {height}" role="img" '
           f'aria-label="{esc(aria)}" preserveAspectRatio="xMidYMid meet">']  # fmt: skip
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        px = xs(t)
        out.append(f'<line class="grid" x1="{px:.1f}" x2="{px:.1f}" y1="{top}" y2="{top + n * row}"/>')
        out.append(f'<text class="tick" x="{px:.1f}" y="{top + n * row + 16}" text-anchor="middle">{t:.0%}</text>')
    for i, label in enumerate(labels):
        y = top + i * row + 4
        out.append(f'<text class="tick" x="{left - 6:.1f}" y="{y + 13:.1f}" text-anchor="end">{esc(label)}</text>')
        base = 0.0
        for name, shares, col in parts:
            v = shares[i] if finite(shares[i]) else 0.0
            if v <= 0:
                continue
            x0, x1 = xs(base), xs(min(base + v, 1.0))
            out.append(f'<rect class="bar" x="{x0:.2f}" y="{y}" width="{max(x1 - x0, 0.5):.2f}" height="{row - 8}" '
                       f'fill="{esc(col)}"><title>{esc(label)} · {esc(name)}: {v:.1%}</title></rect>')  # fmt: skip
            base += v
    out.append("</svg>")
    return "".join(out)


def bar_chart(
    cid: str,
    labels: Sequence[str],
    values: Sequence[float],
    *,
    titles: Sequence[str] | None = None,
    colors: Sequence[str] | None = None,
    xlabel: str = "",
    ylabel: str = "",
    height: int = 200,
    width: int = WIDTH,
    annotate: dict[int, str] | None = None,
    aria: str = "bar chart",
) -> str:
    """Vertical bars (a histogram when labels are bins); ``annotate`` writes text above chosen bars."""
    n = len(labels)
    if n == 0:
        return '<p class="na">no data points</p>'
    hi = max((v for v in values if finite(v)), default=0.0) or 1.0
    left = 48
    ys = Scale(0.0, hi * 1.12, height - _BOTTOM, _TOP)
    xs = Scale(0, n, left, width - 10)
    bw = (width - 10 - left) / n
    gap = min(2.0, bw * 0.2)
    out = [f'<svg class="chart bars" id="{esc(cid)}" viewBox="0 0 {width} {height}" role="img" '
           f'aria-label="{esc(aria)}" preserveAspectRatio="xMidYMid meet">']  # fmt: skip
    out += _axes(xs, ys, [], nice_ticks(0, hi * 1.12, 4), height, xlabel, ylabel)
    step = max(1, math.ceil(n / 9))
    for i in range(n):
        v = values[i] if finite(values[i]) else 0.0
        y = ys(v)
        col = colors[i] if colors else PALETTE[0]
        title = titles[i] if titles else f"{labels[i]}: {fmt_value(v)}"
        out.append(f'<rect class="bar" x="{xs(i) + gap / 2:.2f}" y="{y:.2f}" width="{max(bw - gap, 0.5):.2f}" '
                   f'height="{max(ys(0) - y, 0.0):.2f}" fill="{esc(col)}"><title>{esc(title)}</title></rect>')  # fmt: skip
        if i % step == 0 or i == n - 1:
            out.append(f'<text class="tick" x="{xs(i + 0.5):.1f}" y="{height - _BOTTOM + 14}" '
                       f'text-anchor="middle">{esc(labels[i])}</text>')  # fmt: skip
        if annotate and i in annotate:
            out.append(f'<text class="annot" x="{xs(i + 0.5):.1f}" y="{y - 4:.1f}" text-anchor="end">'
                       f"{esc(annotate[i])}</text>")  # fmt: skip
    out.append("</svg>")
    return "".join(out)


def heatmap(
    cid: str,
    labels: Sequence[str],
    matrix: Sequence[Sequence[float | None]],
    *,
    vmin: float = -1.0,
    vmax: float = 1.0,
    what: str = "value",
    aria: str = "heatmap",
) -> str:
    """A square matrix as coloured cells (diverging around the middle of [vmin, vmax]) with a colour bar."""
    n = len(labels)
    if n == 0:
        return '<p class="na">no data points</p>'
    left, top = 70, 10
    size = min(520, max(200, n * 26))
    cell = size / n
    bar_x = left + size + 24
    w = bar_x + 70
    h = top + size + 70
    out = [f'<svg class="chart heat" id="{esc(cid)}" viewBox="0 0 {w:.0f} {h:.0f}" role="img" '
           f'aria-label="{esc(aria)}" preserveAspectRatio="xMidYMid meet" style="max-width:{w:.0f}px">']  # fmt: skip
    mid = (vmin + vmax) / 2
    half = (vmax - vmin) / 2 or 1.0
    for i in range(n):
        for j in range(n):
            v = matrix[i][j] if i < len(matrix) and j < len(matrix[i]) else None
            fill = diverging((v - mid) / half) if finite(v) else "var(--na)"
            text = fmt_value(v) if finite(v) else "n/a (too few shared rows, or constant scores)"
            out.append(f'<rect class="cell" x="{left + j * cell:.2f}" y="{top + i * cell:.2f}" '
                       f'width="{cell + 0.05:.2f}" height="{cell + 0.05:.2f}" fill="{fill}">'
                       f"<title>{esc(labels[i])} × {esc(labels[j])}: {esc(what)} {esc(text)}</title></rect>")  # fmt: skip
    step = max(1, math.ceil(n / 20))
    for i in range(0, n, step):
        c = top + (i + 0.5) * cell
        out.append(f'<text class="tick" x="{left - 4}" y="{c + 3:.1f}" text-anchor="end">{esc(labels[i])}</text>')
        cx = left + (i + 0.5) * cell
        out.append(f'<text class="tick" transform="translate({cx:.1f} {top + size + 6}) rotate(45)">'
                   f"{esc(labels[i])}</text>")  # fmt: skip
    steps = 40
    for k in range(steps):
        t = 1 - k / (steps - 1)
        out.append(f'<rect x="{bar_x}" y="{top + k * size / steps:.2f}" width="14" height="{size / steps + 0.3:.2f}" '
                   f'fill="{diverging(2 * t - 1)}"/>')  # fmt: skip
    for v in (vmax, mid, vmin):
        y = top + (vmax - v) / (vmax - vmin or 1) * size
        out.append(f'<text class="tick" x="{bar_x + 18}" y="{y + 3.5:.1f}">{esc(fmt_value(v))}</text>')
    out.append("</svg>")
    return "".join(out)
