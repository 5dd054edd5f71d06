"""Dependency-free inline SVG charts: line charts, stacked bars, share bars, bar charts (histograms), heatmaps.

Everything is drawn here, in Python, as static SVG, so the page needs no library, no network and no
script to show its numbers (the page's small script only adds a hover readout to line charts, from
the ``data-hover`` attribute written below). The parts they are made of are :mod:`llm360.report.svg`.

Long series (a 360-chunk run logs hundreds of thousands of steps) are thinned: ``MAX_POINTS``
buckets of consecutive steps, each drawn at its mean with a light band from its min to its max, so
a spike in a single step stays visible while the page stays small.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence

from llm360.report.svg import (
    BOTTOM,
    LEFT,
    PALETTE,
    RIGHT,
    TOP,
    WIDTH,
    Mark,
    Scale,
    Series,
    Thinned,
    VLine,
    axes,
    band,
    decimate,
    diverging,
    esc,
    finite,
    fmt_value,
    json_number,
    log_ticks,
    marker,
    nice_ticks,
    path_data,
    svg_open,
    to_float,
    vline_marks,
)


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
    xs = Scale(x_lo, x_hi, LEFT, W - RIGHT)
    ys = Scale(y_lo, y_hi, height - BOTTOM, TOP, log=log_y)

    def py(y: float) -> float:
        if not math.isfinite(y):
            return math.nan
        return ys(min(y, clip) if clip is not None else y)

    xticks = nice_ticks(x_lo, x_hi, 7 if W >= WIDTH else 5)
    if x_format == "int":
        xticks = sorted({int(round(t)) for t in xticks if abs(t - round(t)) < 1e-9}) or [int(x_lo), int(x_hi)]
    yticks = log_ticks(y_lo, y_hi) if log_y else nice_ticks(y_lo, y_hi, 5)
    out = [""]
    out.append(f'<defs><clipPath id="{esc(cid)}-clip"><rect x="{LEFT}" y="{TOP - 2}" '
               f'width="{W - LEFT - RIGHT}" height="{height - TOP - BOTTOM + 4}"/></clipPath></defs>')  # fmt: skip
    out += axes(xs, ys, xticks, yticks, height, xlabel, ylabel, x_format, log_y)
    out += vline_marks(vlines, xs, height, W)
    for y, label in hlines:
        if finite(y) and (y > 0 or not log_y):
            hy = ys(y)
            out.append(f'<line class="vline" x1="{LEFT}" x2="{W - RIGHT}" y1="{hy:.1f}" y2="{hy:.1f}" '
                       f'stroke="var(--grid-strong)" stroke-dasharray="6 3"><title>{esc(label)}</title></line>')
            out.append(f'<text class="vlabel" x="{W - RIGHT - 2}" y="{hy - 3:.1f}" text-anchor="end">'
                       f"{esc(label)}</text>")  # fmt: skip
    out.append(f'<g clip-path="url(#{esc(cid)}-clip)">')
    hover = []
    for s, t in drawn:
        px = [xs(x) for x in t.x]
        if t.lo is not None and t.hi is not None:
            out.append(f'<path class="band" d="{band(px, [py(v) for v in t.lo], [py(v) for v in t.hi])}" '
                       f'fill="{esc(s.color)}" fill-opacity="0.2" stroke="none"><title>{esc(s.name)}: min to max '
                       f"of each {esc(xlabel or 'x')} range</title></path>")  # fmt: skip
        pts = [(x, py(y)) for x, y in zip(px, t.y, strict=True)]
        dash = f' stroke-dasharray="{esc(s.dash)}"' if s.dash else ""
        op = f' stroke-opacity="{s.opacity}"' if s.opacity < 1 and t.lo is None else ""
        out.append(f'<path class="series" d="{path_data(pts)}" stroke="{esc(s.color)}" stroke-width="{s.width}"'
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
                "py": [round(pts[i][1], 1) for i in keep], "v": [json_number(t.y[i]) for i in keep],
                "x": [json_number(t.x[i]) for i in keep],
            })  # fmt: skip
    out.append("</g>")
    if clip is not None:
        for s, t in drawn:
            tops = t.hi if t.hi is not None else t.y
            for x, y in zip(t.x, tops, strict=True):
                if math.isfinite(y) and y > clip:
                    out.append(marker(xs(x), TOP + 4, "triangle", s.color, "clipped",
                                       f"{s.name} = {fmt_value(y)} at {xlabel or 'x'} {fmt_value(x)} (off the chart)"))
    for m in marks:
        if not finite(m.x):
            continue
        my = TOP + 5 if m.y is None or not finite(m.y) else py(m.y)
        out.append(marker(xs(m.x), my, m.shape, m.color, m.css, m.title))
    out.append("</svg>")
    attr = ""
    if hover:
        payload: dict[str, object] = {"xl": xlabel, "s": hover, "top": TOP, "bottom": height - BOTTOM}
        if x_extra is not None:
            extra = {}
            for h in hover:
                for x in h["x"]:
                    text = x_extra(x)
                    if text:
                        extra[str(x)] = text
            payload["xe"] = extra
        attr = f' data-hover="{esc(json.dumps(payload, separators=(",", ":"), allow_nan=False))}"'
    out[0] = svg_open(cid, height, "line", aria, attr, W)
    return "".join(out)


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
    ys = Scale(0.0, y_hi * 1.04, height - BOTTOM, TOP)
    plot_w = WIDTH - LEFT - RIGHT
    slot = plot_w / n
    bw = min(slot, 80.0)  # a few categories: bars stay bars, not walls
    gap = min(2.0, bw * 0.15)
    xs = Scale(0, n, LEFT, WIDTH - RIGHT)
    step = max(1, math.ceil(n / 12))
    out = [svg_open(cid, height, "bars", aria)]
    out += axes(xs, ys, [], nice_ticks(0, y_hi * 1.04, 5), height, xlabel, ylabel)
    for i in range(0, n, step):
        out.append(f'<text class="tick" x="{xs(i + 0.5):.1f}" y="{height - BOTTOM + 16}" text-anchor="middle">'
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
        out.append(f'<line class="vline" x1="{px:.1f}" x2="{px:.1f}" y1="{TOP}" y2="{height - BOTTOM}" '
                   f'stroke="var(--fg)" stroke-dasharray="4 3"><title>{esc(label)}</title></line>')  # fmt: skip
        out.append(f'<text class="vlabel" x="{px + 3:.1f}" y="{TOP + 9}">{esc(label)}</text>')
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
    xs = Scale(0.0, 1.0, left, WIDTH - RIGHT)
    out = [svg_open(cid, height, "bars", aria)]
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
    ys = Scale(0.0, hi * 1.12, height - BOTTOM, TOP)
    xs = Scale(0, n, left, width - 10)
    bw = (width - 10 - left) / n
    gap = min(2.0, bw * 0.2)
    out = [svg_open(cid, height, "bars", aria, width=width)]
    out += axes(xs, ys, [], nice_ticks(0, hi * 1.12, 4), height, xlabel, ylabel)
    step = max(1, math.ceil(n / 9))
    for i in range(n):
        v = values[i] if finite(values[i]) else 0.0
        y = ys(v)
        col = colors[i] if colors else PALETTE[0]
        title = titles[i] if titles else f"{labels[i]}: {fmt_value(v)}"
        out.append(f'<rect class="bar" x="{xs(i) + gap / 2:.2f}" y="{y:.2f}" width="{max(bw - gap, 0.5):.2f}" '
                   f'height="{max(ys(0) - y, 0.0):.2f}" fill="{esc(col)}"><title>{esc(title)}</title></rect>')  # fmt: skip
        if i % step == 0 or i == n - 1:
            out.append(f'<text class="tick" x="{xs(i + 0.5):.1f}" y="{height - BOTTOM + 14}" '
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
    out = [svg_open(cid, h, "heat", aria, f' style="max-width:{w}px"', w)]
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
