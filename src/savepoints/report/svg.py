"""SVG charts for ``savepoints report``: pure functions from numbers to markup.

The report is one offline HTML file light enough to mail, so the charts are SVG written
here (a few KB each, no script library, prints well) rather than an inlined plotting
library (plotly alone is ~3.5 MB). Names, tags and labels come from users and are always
escaped; the output is well-formed XML, which is also how the tests read it.

The page's small hover script reads what is put here: ``data-tip``/``data-step`` on
markers and heatmap cells, the data and pixel ranges on each line chart's ``<svg>``
(``data-x0``... ``data-py1``, in viewBox units) and the downsampled points in the
chart's ``<script type="application/json" class="chart-data">``.
"""

from __future__ import annotations

import html
import itertools
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Series:
    """One curve. A resumed run is several series (segments) sharing a name."""

    name: str
    points: Sequence[tuple[float, float]]
    color: str
    faded: bool = False
    dashed: bool = False


@dataclass(frozen=True)
class Marker:
    """A save point event at ``step``; ``value`` places a copy on the curve too."""

    step: float
    value: float | None
    kind: str
    label: str
    href: str | None = None


MARKER_KINDS: dict[str, str] = {
    "kept": "kept save point",
    "latest": "latest save point",
    "best": "best save point",
    "tagged": "tagged",
    "deleted": "deleted by retention",
    "preempted": "saved on preemption",
}

_NS = 'xmlns="http://www.w3.org/2000/svg"'
_FONT = 'font-family="system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif" font-size="11"'
_INK = "#444"
_CHAR_W = 6.2  # mean glyph width at 11px: only used to make room for labels, never exact
_KINDS_ORDER = tuple(MARKER_KINDS)
#: Above this many save points a chart draws no guide line per save point.
MAX_GUIDES = 60

# Shapes centred on (0, 0). Colours are attributes so a saved bare SVG looks the same.
_KEPT = "#35608f"
_STAR = "M0-6L1.5-2L5.7-1.9L2.4 .8L3.5 4.9L0 2.5L-3.5 4.9L-2.4 .8L-5.7-1.9L-1.5-2Z"  # radii 6, 2.5
_SYMBOLS: dict[str, str] = {
    "kept": f'<circle r="4" fill="{_KEPT}" stroke="#fff"/>',
    "latest": (
        f'<circle r="6.5" fill="none" stroke="{_KEPT}" stroke-width="1.5"/>'
        f'<circle r="3.5" fill="{_KEPT}"/>'
    ),
    "deleted": (
        '<circle r="4" fill="#fff" stroke="#999"/>'
        '<path d="M-2.2-2.2L2.2 2.2M-2.2 2.2L2.2-2.2" stroke="#999"/>'
    ),
    "best": f'<path d="{_STAR}" fill="#f2b300" stroke="#8a6500" stroke-width=".8"/>',
    "tagged": '<path d="M0-5L5 0L0 5L-5 0Z" fill="#8e44ad" stroke="#fff" stroke-width=".8"/>',
    "preempted": '<path d="M1.5-6.5L-4 1H0L-1.5 6.5L4-1H0Z" fill="#d62728"/>',
}
_UNKNOWN_SYMBOL = '<circle r="4" fill="#777" stroke="#fff"/>'

# Characters XML forbids (C0 controls, lone surrogates): a stray one in a tag from a log
# would make the SVG unreadable to any XML tool, so they are dropped.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _e(text: str) -> str:
    """Escaped for text and attributes alike (quotes too), and valid XML."""
    return html.escape(_NOT_XML.sub("", text))


# ---------------------------------------------------------------- numbers and text


def _c(v: float) -> str:
    """A pixel coordinate: a tenth of a pixel is invisible and keeps paths short."""
    s = f"{v:.1f}"
    if s.endswith(".0"):
        s = s[:-2]
    return "0" if s == "-0" else s


def _json_num(v: float) -> float | int:
    """A data value: steps stay integers so ``data-step="200"`` reads naturally."""
    if float(v).is_integer() and abs(v) < 1e15:
        return int(v)
    return float(f"{v:.5g}")


def _num(v: float) -> str:
    return str(_json_num(v))


def _text_w(text: str, size: float = 11) -> float:
    return len(text) * _CHAR_W * size / 11


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def human_bytes(n: float) -> str:
    """``12.3 MB``: 1000-based units, as disk and network tools count."""
    if not math.isfinite(n):
        return str(n)
    sign, v = ("-" if n < 0 else ""), abs(float(n))
    if v < 999.5:
        return f"{sign}{v:.0f} B"
    for unit in ("KB", "MB", "GB", "TB", "PB"):
        v /= 1000
        # 999.7 KB would print as "1e+03 KB": promote before the rounding does.
        if v < 999.5 or unit == "PB":
            return f"{sign}{v:.3g} {unit}"
    raise AssertionError("unreachable")


def _tick_label(v: float, step: float) -> str:
    if abs(v) < step * 1e-6:
        return "0"
    if step >= 1 and abs(v) >= 1e4:
        for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(v) >= div:
                return f"{v / div:.4g}{suffix}"
    if step >= 1 or 1e-3 <= abs(v) < 1e4:
        decimals = max(0, -math.floor(math.log10(step) + 1e-9))
        return f"{v:.{decimals}f}"
    return f"{v:.3g}"


def _safe_href(href: str | None) -> str | None:
    # Relative paths and web/file links only: a javascript: URL would run on click.
    if not href:
        return None
    m = re.match(r"\s*([a-zA-Z][a-zA-Z0-9+.-]*):", href)
    if m and m.group(1).lower() not in ("http", "https", "file"):
        return None
    return href


def _ok(v: float | None) -> bool:
    # Beyond 1e300 a range (hi - lo) overflows to inf and every coordinate turns into NaN.
    return v is not None and math.isfinite(v) and abs(v) <= 1e300


def _finite(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(x, y) for x, y in points if _ok(x) and _ok(y)]


def downsample(
    points: Sequence[tuple[float, float]], max_points: int = 600
) -> list[tuple[float, float]]:
    """Min/max per bucket over equal step-width buckets: keeps first and last point and every
    spike; returns the input unchanged when it has <= max_points points.

    Non-finite points are dropped first (a NaN would poison the min/max comparisons), and
    so are values beyond 1e300, which no chart can scale.
    """
    pts = _finite(points)
    if len(pts) <= max_points:
        return pts
    n_buckets = max(1, (max_points - 2) // 2)
    # min/max rather than first/last: out-of-order steps must not land outside the buckets.
    x_lo = min(x for x, _ in pts)
    span = max(x for x, _ in pts) - x_lo
    lo: list[int] = [-1] * n_buckets
    hi: list[int] = [-1] * n_buckets
    for i in range(1, len(pts) - 1):
        b = 0 if span <= 0 else int((pts[i][0] - x_lo) / span * n_buckets)
        b = min(max(b, 0), n_buckets - 1)
        y = pts[i][1]
        if lo[b] < 0 or y < pts[lo[b]][1]:
            lo[b] = i
        if hi[b] < 0 or y > pts[hi[b]][1]:
            hi[b] = i
    keep = {0, len(pts) - 1, *lo, *hi}
    keep.discard(-1)
    return [pts[i] for i in sorted(keep)]


# ---------------------------------------------------------------- axes (shared by all charts)


def _nice_ticks(
    lo: float, hi: float, target: int, integer: bool = False
) -> tuple[list[float], float]:
    """Ticks at 1/2/5 x 10^k inside [lo, hi], about ``target`` of them."""
    span = hi - lo if hi > lo else 1.0
    raw = span / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if raw <= m * mag * (1 + 1e-9))
    if integer:
        step = max(step, 1.0)
    first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    return [k * step for k in range(first, last + 1)], step


@dataclass(frozen=True)
class _Frame:
    """The plot area in pixels and the data ranges mapped onto it."""

    left: float
    top: float
    right: float
    bottom: float
    x0: float
    x1: float
    y0: float
    y1: float

    def sx(self, x: float) -> float:
        return self.left + (x - self.x0) / (self.x1 - self.x0) * (self.right - self.left)

    def sy(self, y: float) -> float:
        return self.bottom - (y - self.y0) / (self.y1 - self.y0) * (self.bottom - self.top)

    def data_attrs(self) -> str:
        x = f'data-x0="{_num(self.x0)}" data-x1="{_num(self.x1)}"'
        px = f'data-px0="{_c(self.left)}" data-px1="{_c(self.right)}"'
        y = f'data-y0="{_num(self.y0)}" data-y1="{_num(self.y1)}"'
        py = f'data-py0="{_c(self.bottom)}" data-py1="{_c(self.top)}"'
        return f"{x} {px} {y} {py}"


def _pad_range(lo: float, hi: float, *, integral: bool, frac: float = 0.05) -> tuple[float, float]:
    if hi > lo:
        pad = (hi - lo) * frac
        return lo - pad, hi + pad
    pad = abs(lo) * 0.05 or 1.0
    if integral:
        pad = max(1.0, float(math.ceil(pad)))
    return lo - pad, hi + pad


def _axes(
    fr: _Frame,
    x_ticks: tuple[list[float], float],
    y_ticks: tuple[list[float], float],
    y_fmt: Callable[[float, float], str],
    x_label_y: float,
) -> list[str]:
    xs, x_step = x_ticks
    ys, y_step = y_ticks
    grid = "".join(f"M{_c(fr.sx(x))} {_c(fr.top)}V{_c(fr.bottom)}" for x in xs)
    grid += "".join(f"M{_c(fr.left)} {_c(fr.sy(y))}H{_c(fr.right)}" for y in ys)
    out = [f'<path class="grid" d="{grid}" stroke="#e8e8e8" fill="none"/>'] if grid else []
    axis = f"M{_c(fr.left)} {_c(fr.top)}V{_c(fr.bottom)}H{_c(fr.right)}"
    out.append(f'<path class="axis" d="{axis}" stroke="#999" fill="none"/>')
    out.append('<g class="ticks" fill="#555" text-anchor="end">')
    for y in ys:
        out.append(
            f'<text x="{_c(fr.left - 6)}" y="{_c(fr.sy(y) + 3.5)}">{_e(y_fmt(y, y_step))}</text>'
        )
    out.append("</g>")
    out.append('<g class="ticks" fill="#555" text-anchor="middle">')
    for x in xs:
        label, px = _tick_label(x, x_step), fr.sx(x)
        # The last label would poke out of the right edge centred.
        anchor = ' text-anchor="end"' if px + _text_w(label) / 2 > fr.right + 12 else ""
        out.append(f'<text x="{_c(px)}" y="{_c(x_label_y)}"{anchor}>{_e(label)}</text>')
    out.append("</g>")
    return out


def _axis_titles(fr: _Frame, x_label: str, y_label: str, height: float) -> list[str]:
    out = []
    if x_label:
        x = _c((fr.left + fr.right) / 2)
        out.append(
            f'<text class="axis-label" x="{x}" y="{_c(height - 5)}" text-anchor="middle" '
            f'fill="{_INK}">{_e(x_label)}</text>'
        )
    if y_label:
        y = _c((fr.top + fr.bottom) / 2)
        out.append(
            f'<text class="axis-label" transform="translate(13 {y}) rotate(-90)" '
            f'text-anchor="middle" fill="{_INK}">{_e(y_label)}</text>'
        )
    return out


def _legend(
    items: Sequence[tuple[str, str]], x0: float, y0: float, max_x: float
) -> tuple[str, float]:
    """Items are (swatch centred on 0,0 within +-9px, text); wraps into 16px rows."""
    parts = ['<g class="legend">']
    x, y = x0, y0 + 8
    for swatch, text in items:
        shown = _clip(text, 48)
        w = 24 + _text_w(shown) + 16
        if x > x0 and x + w > max_x:
            x, y = x0, y + 16
        title = f"<title>{_e(text)}</title>" if shown != text else ""
        parts.append(
            f'<g transform="translate({_c(x + 9)} {_c(y)})">{swatch}'
            f'<text x="14" y="3.5" fill="{_INK}">{title}{_e(shown)}</text></g>'
        )
        x += w
    parts.append("</g>")
    return "".join(parts), (y + 8 - y0) if items else 0.0


def _svg_open(width: float, height: float, title: str, extra: str = "") -> str:
    return (
        f'<svg {_NS} viewBox="0 0 {_c(width)} {_c(height)}" width="{_c(width)}" '
        f'height="{_c(height)}" role="img" aria-label="{_e(title)}" {_FONT} '
        f'style="max-width:100%;height:auto"{extra}>'
    )


def _figure(cls: str, title: str, chart_id: str, body: str) -> str:
    ident = f' id="{_e(chart_id)}"' if chart_id else ""
    return f'<figure class="{cls}"{ident}><figcaption>{_e(title)}</figcaption>{body}</figure>'


def _empty(cls: str, title: str, chart_id: str, text: str) -> str:
    return _figure(cls, title, chart_id, f'<p class="empty">{_e(text)}</p>')


# ---------------------------------------------------------------- line charts


_Drawn = Sequence[tuple[Series, list[tuple[float, float]]]]  # series with their finite points


def _stroke_style(s: Series) -> str:
    if s.faded:
        return f'stroke="{_e(s.color)}" stroke-width="1" stroke-dasharray="4 3" opacity="0.4"'
    dash = ' stroke-dasharray="6 4"' if s.dashed else ""
    return f'stroke="{_e(s.color)}" stroke-width="1.75"{dash}'


def _marker_svg(m: Marker, x: float, y: float, on_plot: bool) -> str:
    kind = re.sub(r"[^a-z0-9_-]", "", m.kind.lower()) or "unknown"
    cls = f"marker marker-{kind}" + (" on-plot" if on_plot else "")
    tip = _e(m.label)
    g = (
        f'<g class="{cls}" data-step="{_num(m.step)}" data-tip="{tip}" '
        f'transform="translate({_c(x)} {_c(y)})"><title>{tip}</title>'
        f"{_SYMBOLS.get(kind, _UNKNOWN_SYMBOL)}</g>"
    )
    href = _safe_href(m.href)
    return f'<a href="{_e(href)}">{g}</a>' if href else g


def _lane_rows(xs: Sequence[float], max_rows: int = 3, gap: float = 10) -> list[int]:
    """Rows for lane symbols so nearby saves (e.g. kept + best + tagged) stay visible."""
    last: list[float] = []
    rows = []
    for x in xs:
        row = next((r for r, lx in enumerate(last) if x - lx >= gap), None)
        if row is None:
            if len(last) < max_rows:
                row = len(last)
                last.append(x)
            else:  # crowded: overwrite the row that has been free the longest
                row = min(range(len(last)), key=lambda r: last[r])
        last[row] = x
        rows.append(row)
    return rows


def _break_labels(fr: _Frame, breaks: Sequence[tuple[float, str]]) -> list[str]:
    out: list[str] = []
    taken: list[float] = []  # per row, the right end of the last label
    for step, label in sorted(breaks, key=lambda b: b[0]):
        x = fr.sx(step)
        w = _text_w(label, 10)
        anchor_end = x + 4 + w > fr.right
        x_start = x - 4 - w if anchor_end else x + 4
        row = next((r for r, end in enumerate(taken) if x_start > end + 4), len(taken))
        if row == len(taken):
            taken.append(0.0)
        taken[row] = x_start + w
        tx, anchor = (x - 4, ' text-anchor="end"') if anchor_end else (x + 4, "")
        out.append(
            f'<text class="break-label" x="{_c(tx)}" y="{_c(fr.top + 11 + 12 * row)}"{anchor} '
            f'font-size="10" fill="#666" stroke="#fff" stroke-width="3" paint-order="stroke">'
            f"{_e(label)}</text>"
        )
    return out


def line_chart(
    title: str,
    series: Sequence[Series],
    *,
    markers: Sequence[Marker] = (),
    breaks: Sequence[tuple[float, str]] = (),
    x_label: str = "step",
    y_label: str = "",
    width: int = 760,
    height: int = 300,
    chart_id: str = "",
) -> str:
    """A ``<figure class="chart">`` with one SVG line chart (see the module docstring)."""
    return _xy_chart(
        title, series, markers=markers, breaks=breaks, x_label=x_label, y_label=y_label,
        width=width, height=height, chart_id=chart_id,
    )  # fmt: skip


def _xy_chart(
    title: str,
    series: Sequence[Series],
    *,
    markers: Sequence[Marker] = (),
    breaks: Sequence[tuple[float, str]] = (),
    x_label: str = "step",
    y_label: str = "",
    width: int = 760,
    height: int = 300,
    chart_id: str = "",
    cls: str = "chart",
    y_fmt: Callable[[float, float], str] = _tick_label,
    y_from_zero: bool = False,
    underlay: Callable[[_Frame], str] | None = None,
    extra_legend: Sequence[tuple[str, str]] = (),
    corner: str = "",
    data_extra: dict[str, object] | None = None,
    empty: str = "no values logged yet",
) -> str:
    drawn = [(s, pts) for s in series if (pts := _finite(s.points))]
    if not drawn:
        return _empty(cls, title, chart_id, empty)
    marks = sorted((m for m in markers if _ok(m.step)), key=_mkey)
    brks = [b for b in breaks if _ok(b[0])]
    x0, x1, y0, y1, integral_x = _domain(drawn, marks, brks, y_from_zero)

    # Vertical layout, top to bottom: legend, plot, marker lane, tick labels, axis title.
    px_per_x = (width - 80) / (x1 - x0)  # the plot width is not known yet; close enough
    lane_rows = _lane_rows([(m.step - x0) * px_per_x for m in marks])
    lane_h = 18 + 11 * max(lane_rows, default=0) if marks else 0
    bottom_space = (lane_h + 3 if marks else 0) + 18 + (16 if x_label else 0)
    y_ticks = _nice_ticks(y0, y1, max(3, int((height - bottom_space - 40) / 40)))
    label_w = max((_text_w(y_fmt(v, y_ticks[1])) for v in y_ticks[0]), default=20)
    left, right = 10 + (16 if y_label else 0) + label_w + 6, width - 18
    corner_w = _text_w(corner) + 12 if corner else 0
    items = _legend_items(drawn, marks, extra_legend)
    legend, legend_h = _legend(items, left, 4, right - corner_w)

    fr = _Frame(left, 4 + legend_h + 8, right, height - bottom_space, x0, x1, y0, y1)
    x_ticks = _nice_ticks(x0, x1, max(2, int((right - left) / 90)), integer=integral_x)
    while len(x_ticks[0]) > 2:
        widest = max(_text_w(_tick_label(x, x_ticks[1])) for x in x_ticks[0])
        if (fr.sx(x0 + x_ticks[1]) - fr.sx(x0)) >= widest + 14:
            break
        x_ticks = _nice_ticks(x0, x1, len(x_ticks[0]) // 2, integer=integral_x)
    lane_top = fr.bottom + 3
    tick_y = (lane_top + lane_h if marks else fr.bottom) + 14

    parts = [_svg_open(width, height, title, " " + fr.data_attrs()), legend]
    if corner:
        parts.append(
            f'<text class="ratio" x="{_c(right)}" y="16" text-anchor="end" font-weight="600" '
            f'fill="{_INK}">{_e(corner)}</text>'
        )
    parts += _axes(fr, x_ticks, y_ticks, y_fmt, tick_y)
    parts += _axis_titles(fr, x_label, y_label, height)
    # A faint guide per save point helps up to a few dozen; beyond, they grey the plot.
    if marks and len({m.step for m in marks}) <= MAX_GUIDES:
        guides = "".join(
            f"M{_c(fr.sx(s))} {_c(fr.top)}V{_c(fr.bottom)}" for s in {m.step for m in marks}
        )
        parts.append(f'<path class="guide" d="{guides}" stroke="#000" stroke-opacity="0.07"/>')
    for step, _ in brks:
        x = _c(fr.sx(step))
        parts.append(
            f'<line class="break" x1="{x}" y1="{_c(fr.top)}" x2="{x}" y2="{_c(fr.bottom)}" '
            f'stroke="#888" stroke-dasharray="4 3"/>'
        )
    if underlay is not None:
        parts.append(underlay(fr))
    curves, data = _series_svg(fr, drawn)
    parts += curves
    parts += _markers_svg(fr, marks, lane_rows, lane_top, lane_h)
    parts += _break_labels(fr, brks)
    parts.append("</svg>")

    payload: dict[str, object] = {"series": data, **(data_extra or {})}
    # Inside <script> nothing is an entity, so "<" is written as a JSON escape: no "</script>"
    # can close the element early, and the figure stays well-formed XML.
    js = json.dumps(payload, separators=(",", ":"))  # ASCII: a lone surrogate cannot be written
    js = js.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    parts.append(f'<script type="application/json" class="chart-data">{js}</script>')
    return _figure(cls, title, chart_id, "".join(parts))


def _domain(
    drawn: _Drawn,
    marks: Sequence[Marker],
    brks: Sequence[tuple[float, str]],
    y_from_zero: bool,
) -> tuple[float, float, float, float, bool]:
    """x covers points, markers and breaks; y the values with 5% to spare."""
    xs = [x for _, pts in drawn for x, _ in pts] + [m.step for m in marks] + [b[0] for b in brks]
    ys = [y for _, pts in drawn for _, y in pts]
    ys += [m.value for m in marks if m.value is not None and _ok(m.value)]
    integral_x = all(float(x).is_integer() for x in xs)
    x0, x1 = min(xs), max(xs)
    if x1 <= x0:
        x0, x1 = _pad_range(x0, x1, integral=integral_x)
    y0, y1 = min(ys), max(ys)
    if y_from_zero and y0 >= 0:  # sizes read wrong against a baseline other than zero
        top = _pad_range(0.0, y1, integral=False)[1] if y1 > 0 else 1.0
        return x0, x1, 0.0, top, integral_x
    return x0, x1, *_pad_range(y0, y1, integral=False), integral_x


def _legend_items(
    drawn: _Drawn,
    marks: Sequence[Marker],
    extra: Sequence[tuple[str, str]],
) -> list[tuple[str, str]]:
    items: list[tuple[str, str]] = []
    seen: set[tuple[str, str, bool, bool]] = set()
    # A resumed curve is several segments under one name: one entry per curve, and one
    # shared entry for all superseded segments rather than a second "loss".
    current = {s.name for s, _ in drawn if not s.faded}
    superseded = False
    for s, _ in drawn:
        key = (s.name, s.color, s.faded, s.dashed)
        if s.faded and s.name in current:
            superseded = True
        elif key not in seen:
            seen.add(key)
            items.append((f'<path d="M-9 0H9" fill="none" {_stroke_style(s)}/>', s.name))
    if superseded:
        faded = _stroke_style(Series("", (), "#555", faded=True))
        items.append((f'<path d="M-9 0H9" fill="none" {faded}/>', "superseded by a resume"))
    items += extra
    present = {m.kind for m in marks}
    kinds = [k for k in _KINDS_ORDER if k in present] + sorted(present - set(_KINDS_ORDER))
    return items + [(_SYMBOLS.get(k, _UNKNOWN_SYMBOL), MARKER_KINDS.get(k, k)) for k in kinds]


def _series_svg(fr: _Frame, drawn: _Drawn) -> tuple[list[str], list[dict[str, object]]]:
    """One path per series, about a point per pixel, and the same points for the script."""
    parts, data = [], []
    for s, all_pts in drawn:
        pts = downsample(all_pts, max(50, int(fr.right - fr.left)))
        data.append({
            "name": s.name, "color": s.color, "faded": s.faded, "dashed": s.dashed,
            "points": [[_json_num(x), _json_num(y)] for x, y in pts],
        })  # fmt: skip
        name, extra = _e(s.name), " faded" if s.faded else ""
        if len(pts) == 1:
            cx, cy = _c(fr.sx(pts[0][0])), _c(fr.sy(pts[0][1]))
            opacity = ' opacity="0.4"' if s.faded else ""
            parts.append(
                f'<circle class="series{extra}" data-series="{name}" cx="{cx}" cy="{cy}" r="3" '
                f'fill="{_e(s.color)}"{opacity}/>'
            )
            continue
        d = "L".join(f"{_c(fr.sx(x))} {_c(fr.sy(y))}" for x, y in pts)
        parts.append(
            f'<path class="series{extra}" data-series="{name}" d="M{d}" fill="none" '
            f'stroke-linejoin="round" stroke-linecap="round" {_stroke_style(s)}/>'
        )
    return parts, data


def _markers_svg(
    fr: _Frame, marks: Sequence[Marker], rows: Sequence[int], lane_top: float, lane_h: float
) -> list[str]:
    if not marks:
        return []
    parts = ['<g class="markers">']
    # Reversed so that at a shared point the most telling symbol (best) ends up on top.
    for m in reversed(marks):
        if m.value is not None and _ok(m.value):
            parts.append(_marker_svg(m, fr.sx(m.step), fr.sy(m.value), on_plot=True))
    parts.append(
        f'<rect class="lane" x="{_c(fr.left)}" y="{_c(lane_top)}" '
        f'width="{_c(fr.right - fr.left)}" height="{lane_h}" fill="#f5f5f5"/>'
        f'<text class="lane-label" x="{_c(fr.left - 6)}" y="{_c(lane_top + 12)}" '
        f'text-anchor="end" font-size="9.5" fill="#888">saves</text>'
    )
    for m, row in zip(marks, rows):
        parts.append(_marker_svg(m, fr.sx(m.step), lane_top + 9 + 11 * row, on_plot=False))
    return [*parts, "</g>"]


# Stacking order at one step: the most telling symbol takes the lane row next to the axis.
_RANK = {k: i for i, k in enumerate(("best", "latest", "preempted", "tagged", "kept", "deleted"))}


def _mkey(m: Marker) -> tuple[float, int]:
    return (m.step, _RANK.get(m.kind, len(_RANK)))


# ---------------------------------------------------------------- storage


def storage_chart(
    title: str,
    steps: Sequence[float],
    logical: Sequence[int],
    physical: Sequence[int],
    *,
    chart_id: str = "",
) -> str:
    """Bytes as separate copies vs on disk, the gap (what dedup saved) shaded."""
    rows = [
        (float(s), float(lo), float(ph))
        for s, lo, ph in zip(steps, logical, physical)
        if all(_ok(v) for v in (s, lo, ph))
    ]
    logical_pts = [(s, lo) for s, lo, _ in rows]
    physical_pts = [(s, ph) for s, _, ph in rows]
    fill = "#1f77b4"

    def shade(fr: _Frame) -> str:
        if len(rows) < 2:
            return ""
        sample = rows[:: max(1, len(rows) // 1000)] + ([rows[-1]] if len(rows) > 1000 else [])
        top = "L".join(f"{_c(fr.sx(s))} {_c(fr.sy(lo))}" for s, lo, _ in sample)
        under = "L".join(f"{_c(fr.sx(s))} {_c(fr.sy(ph))}" for s, _, ph in reversed(sample))
        return f'<path class="saved" d="M{top}L{under}Z" fill="{fill}" fill-opacity="0.12"/>'

    corner = ""
    if rows and rows[-1][2] > 0:
        ratio = rows[-1][1] / rows[-1][2]
        corner = f"dedup {ratio:.1f}x" if ratio < 100 else f"dedup {ratio:.0f}x"
    area_swatch = f'<rect x="-9" y="-5" width="18" height="10" fill="{fill}" fill-opacity="0.12"/>'
    return _xy_chart(
        title,
        [
            Series("as separate copies", logical_pts, "#8c8c8c", dashed=True),
            Series("on disk", physical_pts, fill),
        ],
        chart_id=chart_id,
        cls="chart storage",
        y_fmt=lambda v, _step: human_bytes(v),
        y_from_zero=True,
        underlay=shade,
        extra_legend=[(area_swatch, "saved by dedup")],
        corner=corner,
        data_extra={"y_unit": "bytes"},
        empty="no save points yet",
    )


# ---------------------------------------------------------------- heatmap

# Light to dark blue; lightness falls at every stop so bigger changes always read darker.
_RAMP = (
    (0.0, (232, 241, 250)),
    (0.25, (189, 215, 238)),
    (0.5, (107, 174, 214)),
    (0.75, (33, 113, 181)),
    (1.0, (8, 48, 107)),
)


def _ramp(t: float) -> str:
    t = min(max(t, 0.0), 1.0)
    for (t0, c0), (t1, c1) in itertools.pairwise(_RAMP):
        if t <= t1:
            f = (t - t0) / (t1 - t0)
            return "#" + "".join(f"{round(a + (b - a) * f):02x}" for a, b in zip(c0, c1))
    return "#" + "".join(f"{v:02x}" for v in _RAMP[-1][1])


def heatmap(
    title: str,
    rows: Sequence[str],
    columns: Sequence[str],
    values: Sequence[Sequence[float | None]],
    *,
    chart_id: str = "",
    note: str = "",
) -> str:
    """Per-layer relative change between save points, on a log colour scale."""
    cls = "chart heatmap"
    if not rows or not columns:
        return _empty(cls, title, chart_id, "no layer changes computed yet")

    def cell(r: int, c: int) -> float | None:
        row = values[r] if r < len(values) else ()
        v = row[c] if c < len(row) else None
        return None if v is None or math.isnan(v) or v < 0 else float(v)

    grid = [[cell(r, c) for c in range(len(columns))] for r in range(len(rows))]
    positive = [v for row in grid for v in row if v is not None and 0 < v < math.inf]
    lo_e = math.floor(math.log10(min(positive))) if positive else -6
    hi_e = math.ceil(math.log10(max(positive))) if positive else 0
    hi_e = max(hi_e, lo_e + 1)
    lo_e = max(lo_e, hi_e - 12)  # a stray 1e-30 must not wash out everything else

    def color_t(v: float) -> float:
        return 1.0 if v == math.inf else (math.log10(v) - lo_e) / (hi_e - lo_e)

    row_w = max(_text_w(_clip(r, 24)) for r in rows)
    col_w = max(_text_w(c) for c in columns)
    left = 10 + row_w + 8
    cell_w = max(6.0, min(56.0, (760 - left - 16) / len(columns)))
    cell_h = max(6.0, min(18.0, 480 / len(rows)))
    rotated = col_w + 6 > cell_w
    if rotated:
        left = max(left, col_w * 0.72 + 4)
    width = max(760.0, left + cell_w * len(columns) + 16)
    top, grid_h = 8.0, cell_h * len(rows)
    # Rotated 45 degrees, neighbouring labels sit cell_w * 0.71 apart across the text.
    col_every = math.ceil(15 / (cell_w * 0.71)) if rotated else 1
    row_every = math.ceil(11 / cell_h)
    labels_h = col_w * 0.72 + 14 if rotated else 18
    bar_y = top + grid_h + labels_h + 12
    height = bar_y + 10 + 16

    parts = [_svg_open(width, height, title), '<g class="cells" stroke="#fff" stroke-width=".5">']
    hatch = []
    present = set()
    for r, name in enumerate(rows):
        for c, col in enumerate(columns):
            v = grid[r][c]
            x, y = left + c * cell_w, top + r * cell_h
            if v is None:
                kind, fill, tip, extra = "missing", "#f2f2f2", "not computed", ""
                hatch.append(f"M{_c(x)} {_c(y + cell_h)}L{_c(x + cell_w)} {_c(y)}")
            elif v == 0:
                kind, fill, tip, extra = "zero", "#fff", "0 (unchanged)", ' stroke="#d4d4d4"'
            else:
                kind, fill, tip, extra = "", _ramp(color_t(v)), f"{v:.1e}", ""
            present.add(kind)
            tip = _e(f"{name} · {col}: {tip}")
            parts.append(
                f'<rect class="cell{" " + kind if kind else ""}" x="{_c(x)}" y="{_c(y)}" '
                f'width="{_c(cell_w)}" height="{_c(cell_h)}" fill="{fill}"{extra} '
                f'data-tip="{tip}"><title>{tip}</title></rect>'
            )
    parts.append("</g>")
    if hatch:
        parts.append(
            f'<path class="hatch" d="{"".join(hatch)}" stroke="#c8c8c8" pointer-events="none"/>'
        )

    size = ' font-size="10"' if cell_h < 14 else ""
    parts.append(f'<g class="row-labels" fill="{_INK}" text-anchor="end"{size}>')
    for r, name in enumerate(rows):
        if r % row_every:
            continue
        shown = _clip(name, 24)
        title_el = f"<title>{_e(name)}</title>" if shown != name else ""
        y = top + r * cell_h + cell_h / 2 + 3.5
        parts.append(f'<text x="{_c(left - 6)}" y="{_c(y)}">{title_el}{_e(shown)}</text>')
    parts.append("</g>")
    anchor = "end" if rotated else "middle"
    parts.append(f'<g class="col-labels" fill="{_INK}" text-anchor="{anchor}">')
    label_y = top + grid_h + 13
    for c, col in enumerate(columns):
        if c % col_every:
            continue
        x = left + c * cell_w + cell_w / 2
        rot = f' transform="rotate(-45 {_c(x)} {_c(label_y)})"' if rotated else ""
        parts.append(
            f'<text x="{_c(x + (3 if rotated else 0))}" y="{_c(label_y)}"{rot}>{_e(col)}</text>'
        )
    parts.append("</g>")
    parts += _color_legend(left, bar_y, lo_e, hi_e, present)
    parts.append("</svg>")
    note_el = f'<p class="note">{_e(note)}</p>' if note else ""
    return _figure(cls, title, chart_id, note_el + "".join(parts))


def _color_legend(x: float, y: float, lo_e: int, hi_e: int, present: set[str]) -> list[str]:
    bar_w, n = 180.0, 24
    out = [
        f'<g class="color-legend" fill="{_INK}">',
        f'<text x="{_c(x)}" y="{_c(y + 9)}">relative change</text>',
    ]
    x += _text_w("relative change") + 10
    out += [
        f'<rect x="{_c(x + i * bar_w / n)}" y="{_c(y)}" width="{_c(bar_w / n + 0.4)}" height="10" '
        f'fill="{_ramp(i / (n - 1))}"/>'
        for i in range(n)
    ]
    stride = math.ceil((hi_e - lo_e) / 4)
    for e in range(lo_e, hi_e + 1, stride):
        tx = x + (e - lo_e) / (hi_e - lo_e) * bar_w
        label = "1" if e == 0 else f"1e{e}"
        out.append(
            f'<text x="{_c(tx)}" y="{_c(y + 22)}" text-anchor="middle" font-size="10">'
            f"{label}</text>"
        )
    x += bar_w + 24
    for kind, fill, text in (("zero", "#fff", "0"), ("missing", "#f2f2f2", "not computed")):
        if kind in present:
            hatch = f'<path d="M{_c(x)} {_c(y + 10)}L{_c(x + 10)} {_c(y)}" stroke="#c8c8c8"/>'
            out.append(
                f'<rect x="{_c(x)}" y="{_c(y)}" width="10" height="10" fill="{fill}" '
                f'stroke="#d4d4d4"/>{hatch if kind == "missing" else ""}'
                f'<text x="{_c(x + 14)}" y="{_c(y + 9)}">{text}</text>'
            )
            x += 14 + _text_w(text) + 16
    out.append("</g>")
    return out
