"""The page's stylesheet and script, inlined into every report (the page loads nothing from anywhere).

They live in a Python module rather than in data files so that every installation of the package
has them, without package-data settings.

The script is small and optional: every chart is already drawn as SVG. It adds a hover readout to
line charts, records script errors into the page (``#js-errors`` and ``data-errors``), and, once
done, sets ``data-ok`` on ``<html>`` along with how many charts have visible geometry
(``data-charts``, ``data-drawn``, ``data-lines``) -- which the browser test reads back with
``--dump-dom``.
"""

CSS = """
:root {
  --bg: #ffffff; --fg: #1f2328; --muted: #656d76; --card: #f6f8fa; --border: #d0d7de;
  --grid: #e6e9ed; --grid-strong: #b8c0c8; --accent: #4e79a7; --na: #e8e8e8;
  --yes: #1a7f37; --yes-bg: #dafbe1; --partial: #9a6700; --partial-bg: #fff8c5; --no: #6e7781; --no-bg: #eaeef2;
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #0d1117; --fg: #e6edf3; --muted: #8d96a0; --card: #161b22; --border: #30363d;
    --grid: #21262d; --grid-strong: #484f58; --na: #30363d;
    --yes: #3fb950; --yes-bg: #12261e; --partial: #d29922; --partial-bg: #272115; --no: #8d96a0; --no-bg: #21262d;
  }
}
* { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%; }
body {
  margin: 0; background: var(--bg); color: var(--fg); line-height: 1.5;
  font: 15px/1.5 -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
}
main, header.top, footer { max-width: 1120px; margin: 0 auto; padding: 0 20px; }
header.top { padding-top: 28px; padding-bottom: 8px; }
header.top h1 { margin: 0 0 4px; font-size: 28px; letter-spacing: -0.01em; }
header.top .sub { color: var(--muted); margin: 0 0 12px; }
nav.toc { display: flex; flex-wrap: wrap; gap: 6px 14px; padding: 10px 0; border-bottom: 1px solid var(--border); }
nav.toc a { color: var(--accent); text-decoration: none; font-size: 14px; }
nav.toc a.off { color: var(--muted); }
nav.toc a:hover { text-decoration: underline; }
section { padding: 18px 0 8px; border-bottom: 1px solid var(--border); }
section h2 { font-size: 21px; margin: 6px 0 10px; }
section h3 { font-size: 16px; margin: 18px 0 6px; }
p.lead { color: var(--muted); margin: 0 0 10px; max-width: 820px; }
p.na { color: var(--muted); font-style: italic; margin: 6px 0; }
p.finding { margin: 2px 0 14px; max-width: 820px; }
.small { font-size: 13px; color: var(--muted); }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; }
pre { background: var(--card); border: 1px solid var(--border); border-radius: 6px; padding: 10px; overflow: auto;
      max-height: 480px; }
table { border-collapse: collapse; margin: 8px 0 12px; font-size: 14px; }
.scroll { overflow-x: auto; max-width: 100%; }
th, td { padding: 5px 10px; border-bottom: 1px solid var(--border); text-align: left; vertical-align: top; }
th { font-weight: 600; background: var(--card); position: sticky; top: 0; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:nth-child(even) td { background: color-mix(in srgb, var(--card) 55%, transparent); }
table.transparency td:first-child { white-space: nowrap; font-weight: 500; }
.badge { display: inline-block; min-width: 58px; text-align: center; padding: 1px 8px; border-radius: 12px;
         font-weight: 600; font-size: 13px; }
.badge.yes { color: var(--yes); background: var(--yes-bg); }
.badge.partial { color: var(--partial); background: var(--partial-bg); }
.badge.no { color: var(--no); background: var(--no-bg); }
dl.kv { display: grid; grid-template-columns: repeat(auto-fill, minmax(250px, 1fr)); gap: 6px 18px; margin: 8px 0; }
dl.kv div { border-bottom: 1px dotted var(--border); padding: 2px 0; display: flex; justify-content: space-between;
            gap: 10px; }
dl.kv dt { color: var(--muted); }
dl.kv dd { margin: 0; font-variant-numeric: tabular-nums; text-align: right; overflow-wrap: anywhere; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(330px, 1fr)); gap: 14px 20px; }
.grid.two { grid-template-columns: repeat(auto-fill, minmax(480px, 1fr)); }
figure { margin: 8px 0 14px; }
figure.card { background: var(--card); border: 1px solid var(--border); border-radius: 8px; padding: 8px 10px; margin: 0; }
figcaption { font-weight: 600; font-size: 14px; margin: 2px 0 4px; }
figcaption .small { font-weight: 400; }
svg.chart { width: 100%; height: auto; display: block; overflow: visible; }
svg.chart.heat { max-width: 640px; }
svg.chart text { fill: var(--fg); font-family: inherit; }
svg.chart .tick { font-size: 11px; fill: var(--muted); }
svg.chart .label { font-size: 12px; fill: var(--muted); }
svg.chart .vlabel { font-size: 9.5px; fill: var(--muted); }
svg.chart .annot { font-size: 10.5px; font-weight: 600; }
svg.chart .grid { stroke: var(--grid); stroke-width: 1; }
svg.chart .axis, svg.chart .tickmark { stroke: var(--grid-strong); stroke-width: 1; }
svg.chart .vline { stroke-width: 1; opacity: 0.75; }
svg.chart .series { stroke-linejoin: round; stroke-linecap: round; }
svg.chart .mark { stroke: var(--bg); stroke-width: 1; cursor: help; }
svg.chart .bar:hover, svg.chart .cell:hover { opacity: 0.75; }
svg.chart .hover line { stroke: var(--grid-strong); stroke-width: 1; }
.legend { display: flex; flex-wrap: wrap; gap: 4px 14px; font-size: 13px; margin: 2px 0 6px; }
.legend .key i { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin-right: 5px;
                 vertical-align: -1px; }
details { margin: 8px 0; }
details > summary { cursor: pointer; color: var(--accent); }
.tip { position: absolute; z-index: 10; pointer-events: none; background: var(--bg); color: var(--fg);
       border: 1px solid var(--border); border-radius: 6px; padding: 6px 9px; font-size: 12.5px;
       box-shadow: 0 4px 14px rgba(0,0,0,.12); max-width: 340px; }
.tip i { display: inline-block; width: 9px; height: 9px; border-radius: 2px; margin-right: 5px; }
#js-errors { color: #cf222e; }
ul.notes { margin: 6px 0; padding-left: 20px; }
footer { color: var(--muted); font-size: 13px; padding: 18px 20px 40px; }
@media (max-width: 640px) {
  .grid, .grid.two { grid-template-columns: 1fr; }
  header.top h1 { font-size: 22px; }
  th, td { padding: 4px 6px; }
  table.transparency td:first-child { white-space: normal; }
}
@media print { nav.toc, .tip { display: none; } section { break-inside: avoid-page; } }
"""

JS = r"""
(function () {
  "use strict";
  var root = document.documentElement;
  var errors = [];
  function record() {
    root.setAttribute("data-errors", String(errors.length));
    var box = document.getElementById("js-errors");
    if (box) { box.textContent = errors.join("\n"); box.hidden = errors.length === 0; }
  }
  window.addEventListener("error", function (ev) {
    errors.push(String(ev.message) + " (line " + ev.lineno + ":" + ev.colno + ")");
    record();
    root.setAttribute("data-ok", "0");
  });
  function esc(s) {
    return String(s).replace(/[&<>"']/g, function (c) {
      return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c];
    });
  }
  function fmt(v) {
    if (typeof v !== "number" || !isFinite(v)) { return String(v); }
    if (Number.isInteger(v)) { return v.toLocaleString("en-US"); }
    var a = Math.abs(v);
    if (a !== 0 && (a >= 1e6 || a < 1e-3)) { return v.toExponential(3); }
    return String(Number(v.toPrecision(4)));
  }
  function nearest(xs, x) {
    var lo = 0, hi = xs.length - 1;
    if (hi < 0) { return -1; }
    while (hi - lo > 1) { var mid = (lo + hi) >> 1; if (xs[mid] < x) { lo = mid; } else { hi = mid; } }
    return Math.abs(xs[lo] - x) <= Math.abs(xs[hi] - x) ? lo : hi;
  }
  var NS = "http://www.w3.org/2000/svg";
  function hover(svg, d, tip) {
    var g = document.createElementNS(NS, "g");
    g.setAttribute("class", "hover");
    g.style.display = "none";
    var guide = document.createElementNS(NS, "line");
    guide.setAttribute("y1", d.top); guide.setAttribute("y2", d.bottom);
    g.appendChild(guide);
    var dots = d.s.map(function (s) {
      var c = document.createElementNS(NS, "circle");
      c.setAttribute("r", "3.5"); c.setAttribute("fill", s.c);
      g.appendChild(c);
      return c;
    });
    svg.appendChild(g);
    function hide() { g.style.display = "none"; tip.hidden = true; }
    svg.addEventListener("mousemove", function (ev) {
      var ctm = svg.getScreenCTM();
      if (!ctm) { return; }
      var pt = svg.createSVGPoint();
      pt.x = ev.clientX; pt.y = ev.clientY;
      var p = pt.matrixTransform(ctm.inverse());
      var rows = [], best = null, bestDist = Infinity;
      d.s.forEach(function (s, k) {
        var i = nearest(s.px, p.x);
        if (i < 0 || Math.abs(s.px[i] - p.x) > 30) { dots[k].style.display = "none"; return; }
        dots[k].style.display = "";
        dots[k].setAttribute("cx", s.px[i]); dots[k].setAttribute("cy", s.py[i]);
        rows.push([s, i]);
        var dist = Math.abs(s.px[i] - p.x);
        if (dist < bestDist) { bestDist = dist; best = [s, i]; }
      });
      if (!best) { hide(); return; }
      var gx = best[0].px[best[1]], xv = best[0].x[best[1]];
      guide.setAttribute("x1", gx); guide.setAttribute("x2", gx);
      g.style.display = "";
      var html = "<b>" + esc(d.xl || "x") + " " + esc(fmt(xv)) + "</b>";
      if (d.xe && d.xe[String(xv)]) { html += "<br><span>" + esc(d.xe[String(xv)]) + "</span>"; }
      rows.forEach(function (r) {
        html += "<br><i style=\"background:" + esc(r[0].c) + "\"></i>" + esc(r[0].n) + ": " + esc(fmt(r[0].v[r[1]]));
      });
      tip.innerHTML = html;
      tip.hidden = false;
      var left = ev.pageX + 14;
      if (ev.clientX + 260 > window.innerWidth) { left = ev.pageX - 14 - tip.offsetWidth; }
      tip.style.left = left + "px";
      tip.style.top = (ev.pageY + 12) + "px";
    });
    svg.addEventListener("mouseleave", hide);
  }
  function setup() {
    var tip = document.getElementById("tip");
    var charts = document.querySelectorAll("svg.chart");
    var drawn = 0, lines = 0;
    charts.forEach(function (svg) {
      var box = svg.getBBox();
      if (box.width > 0 && box.height > 0) { drawn += 1; }
      svg.querySelectorAll("path.series").forEach(function (p) {
        var b = p.getBBox();
        if (p.getAttribute("d") && (b.width > 0 || b.height > 0)) { lines += 1; }
      });
      if (svg.getAttribute("data-hover") && tip) {
        hover(svg, JSON.parse(svg.getAttribute("data-hover")), tip);
      }
    });
    root.setAttribute("data-charts", String(charts.length));
    root.setAttribute("data-drawn", String(drawn));
    root.setAttribute("data-lines", String(lines));
    record();
    root.setAttribute("data-ok", errors.length ? "0" : "1");
  }
  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", setup); } else { setup(); }
})();
"""
