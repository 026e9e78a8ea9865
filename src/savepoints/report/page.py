"""The report as one self-contained HTML page: inline CSS, inline SVG, a little inline
script (tooltips, a hover readout, sortable tables, the live reload). No CDN, no library:
it opens offline, from a mail attachment, years later.
"""

from __future__ import annotations

import html
import json
import os
import urllib.parse
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from savepoints.report.data import Curve, PointRow, RunData
from savepoints.report.svg import Marker, Series, heatmap, human_bytes, line_chart, storage_chart
from savepoints.version import __version__

#: Colours of the curves, in the order names are met (loss and eval_loss first).
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b",
           "#e377c2", "#7f7f7f", "#bcbd22")  # fmt: skip
#: The second run of a comparison, drawn dashed in these.
PALETTE_B = ("#ff7f0e", "#9467bd", "#8c564b", "#17becf", "#2ca02c", "#d62728", "#1f77b4",
             "#bcbd22", "#e377c2", "#7f7f7f")  # fmt: skip
_LAST = ("learning_rate", "grad_norm")
_TABLE_METRICS = 6
#: More save points than this: the charts mark only those kept (the table has them all).
MAX_MARKED = 300
#: More deleted save points than this: the table folds them away.
MAX_DELETED_ROWS = 50
#: Charts sit two to a row: drawn at about the width they get, their text stays 11 px.
CHART_WIDTH = 560


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.4g}"


def _when(dt: datetime | None) -> str:
    return "—" if dt is None else dt.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def chart_groups(names: Iterable[str]) -> list[tuple[str, list[str]]]:
    """Which curves share a chart: the losses together, then one chart per other value
    (evaluation metrics first, learning rate and gradient norm last)."""
    names = set(names)
    groups: list[tuple[str, list[str]]] = []
    losses: list[str] = [n for n in ("loss", "eval_loss") if n in names]
    if losses:
        groups.append(("Loss", losses))
    rest = sorted(names - set(losses),
                  key=lambda n: (n in _LAST, not n.startswith("eval_"), n))  # fmt: skip
    groups.extend((n.removeprefix("eval_").replace("_", " ") + (" (eval)" if n.startswith(
        "eval_") else ""), [n]) for n in rest)  # fmt: skip
    return groups


def _status(row: PointRow) -> str:
    if row.best:
        return "best"
    if row.deleted is not None:
        return "deleted"
    if row.preempted:
        return "preempted"
    if row.tags:
        return "tagged"
    return "latest" if row.latest else "kept"


def _href(row: PointRow, out_dir: Path) -> str | None:
    if row.path is None:
        return None
    try:
        rel = os.path.relpath(row.path.resolve(), out_dir.resolve())
    except ValueError:  # another drive (Windows)
        return row.path.resolve().as_uri()
    return urllib.parse.quote(Path(rel).as_posix()) + "/"  # "my run #1" is a path, not a fragment


def _point_label(row: PointRow, metric: str | None, value: float | None) -> str:
    parts = [f"step {row.step}", _status(row)]
    if row.deleted:
        parts[-1] = row.deleted
    if metric and value is not None:
        parts.append(f"{metric} {value:.4g}")
    if row.size is not None:
        new = "" if row.new_bytes is None else f" ({human_bytes(row.new_bytes)} new)"
        parts.append(human_bytes(row.size) + new)
    if row.tags:
        parts.append("tags: " + ", ".join(row.tags))
    if row.preempted:
        parts.append(f"emergency save on {row.preempted}")
    return " · ".join(parts)


def markers_for(
    data: RunData, names: Sequence[str], out_dir: Path, prefix: str = ""
) -> list[Marker]:
    """A marker per save point the run has had, on the curve of its metric when it has one."""
    prefer = sorted(names, key=lambda n: not n.startswith("eval_"))
    out = []
    rows = data.points
    if len(rows) > MAX_MARKED:
        # Thousands of markers would bury the curves: the deleted ones are in the table.
        rows = [r for r in rows if r.kept]
    crowded = len(rows) > MAX_MARKED
    for row in rows:
        metric, value = None, None
        for name in prefer:
            curve = data.curves.get(name)
            # Evaluations are where they were measured; a training curve is logged every
            # few steps, and a save point between two logs sits on the line between them.
            between = not name.startswith("eval_")
            found = curve.value_at(row.step, between=between) if curve else None
            if found is None and name in row.metrics:
                found = row.metrics[name]
            if found is not None:
                metric, value = name, found
                break
        if crowded and _status(row) in ("kept", "deleted"):
            value = None  # under the chart only: the curve stays readable
        out.append(Marker(step=row.step, value=value, kind=_status(row),
                          label=prefix + _point_label(row, metric, value),
                          href=_href(row, out_dir)))  # fmt: skip
    return out


def series_for(curve: Curve, color: str, *, label: str = "", dashed: bool = False) -> list[Series]:
    name = label or curve.name
    return [Series(name=name if not redone else f"{name} (redone after a resume)",
                   points=points, color=color, faded=redone, dashed=dashed)
            for _, points, redone in curve.segments]  # fmt: skip


def _colors(names: Iterable[str], palette: Sequence[str]) -> dict[str, str]:
    ordered = [n for n in ("loss", "eval_loss") if n in names]
    ordered += sorted(set(names) - set(ordered))
    return {n: palette[i % len(palette)] for i, n in enumerate(ordered)}


def _chart_id(title: str) -> str:
    return "chart-" + "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")


def curves_section(data: RunData, out_dir: Path) -> str:
    if not data.curves:
        return ('<p class="empty">No metrics were logged yet: the Trainer logs them by itself; '
                "a plain loop calls <code>points.log(step, loss=...)</code> or passes "
                "<code>metrics=</code> to <code>save()</code>.</p>")  # fmt: skip
    colors = _colors(data.curves, PALETTE)
    charts = []
    for i, (title, names) in enumerate(chart_groups(data.curves)):
        series = [s for n in names for s in series_for(data.curves[n], colors[n])]
        charts.append(line_chart(
            title, series, markers=markers_for(data, names, out_dir), breaks=data.resumes,
            y_label=names[0] if len(names) == 1 else "", chart_id=f"{_chart_id(title)}-{i}",
            width=CHART_WIDTH,
        ))  # fmt: skip
    return '<div class="charts">' + "".join(charts) + "</div>"


def summary_cards(data: RunData) -> str:
    kept, gone = data.kept, [p for p in data.points if not p.kept]
    cards = [
        (
            "Save points",
            f"{len(kept)} kept",
            f"{len(gone)} deleted by retention or by hand" if gone else "none deleted",
        )
    ]
    best = next((p for p in data.points if p.best), None)
    if best is not None and data.best_rule:
        metric, mode = data.best_rule
        value = best.metrics.get(metric)
        cards.append(("Best", f"step {best.step}", f"{metric} {_fmt(value)} ({mode})"))
    latest = next((p for p in data.points if p.latest), None)
    if latest is not None:
        cards.append(("Latest", f"step {latest.step}", _when(latest.created)))
    resumes = sum(1 for s in data.sessions if s.resumed_from is not None)
    preempted = sum(1 for s in data.sessions if s.ended.startswith("preempted"))
    killed = sum(1 for s in data.sessions if s.ended == "killed")
    cards.append(("Processes", str(len(data.sessions)),
                  f"{resumes} resumed, {preempted} preempted, {killed} killed"))  # fmt: skip
    if data.storage:
        _, logical, physical = data.storage[-1]
        ratio = logical / physical if physical else 1.0
        cards.append(("On disk", human_bytes(physical),
                      f"{human_bytes(logical)} as copies · dedup {ratio:.1f}x"))  # fmt: skip
    checked = [p for p in kept if p.verified is not None]
    if checked:
        bad = [p for p in checked if not p.verified]
        cards.append(("Verified", "all intact" if not bad else f"{len(bad)} damaged",
                      f"{len(checked)} save points re-hashed"))  # fmt: skip
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="k">{esc(k)}</div><div class="v">{esc(v)}</div>'
        f'<div class="s">{esc(s)}</div></div>' for k, v, s in cards
    ) + "</div>"  # fmt: skip


def points_table(data: RunData, out_dir: Path) -> str:
    metrics: list[str] = []
    for row in data.points:
        metrics += [m for m in row.metrics if m not in metrics]
    metrics = sorted(metrics, key=lambda m: (not m.startswith("eval_"), m))[:_TABLE_METRICS]
    head = ["step", "saved", "status", *metrics, "size", "new bytes", "unique now",
            "stall s", "background s", "verify", "tags", "parent"]  # fmt: skip
    rows: list[str] = []
    folded: list[str] = []
    fold = sum(1 for r in data.points if r.deleted) > MAX_DELETED_ROWS
    for row in data.points:
        href = _href(row, out_dir)
        step = f'<a href="{esc(href)}">{row.step}</a>' if href else str(row.step)
        status = _status(row)
        chip = f'<span class="chip {status}">{"★ best" if status == "best" else status}</span>'
        if row.deleted:
            chip += f' <span class="why">{esc(row.deleted)}</span>'
        if row.preempted and status != "preempted":
            chip += ' <span class="chip preempted">preempted</span>'
        if row.verified is None:
            verify = '<span class="muted">—</span>'
        elif row.verified:
            verify = '<span class="ok">✓ intact</span>'
        else:
            verify = f'<span class="bad" title="{esc("; ".join(row.problems))}">✗ damaged</span>'
        saved = "—"
        if row.created is not None:
            stamp = row.created.timestamp()
            saved = f'<span data-sort="{stamp:.3f}">{esc(_when(row.created))}</span>'  # sortable
        cells = [step, saved, chip,
                 *(esc(_fmt(row.metrics.get(m))) for m in metrics),
                 _bytes_cell(row.size), _bytes_cell(row.new_bytes), _bytes_cell(row.unique),
                 _num_cell(row.stall_s), _num_cell(row.background_s), verify,
                 esc(", ".join(row.tags)),
                 "" if row.parent is None else str(row.parent)]  # fmt: skip
        cls = "gone" if row.deleted else ""
        (folded if fold and row.deleted else rows).append(
            f'<tr class="{cls}" data-step="{row.step}">'
            + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")  # fmt: skip
    header = "".join(f"<th>{esc(h)}</th>" for h in head)
    table = (f'<table class="sortable points"><thead><tr>{header}</tr></thead>'
             f'<tbody>{"".join(rows)}</tbody></table>')  # fmt: skip
    if folded:
        gone = "".join(folded)
        table += (f"<details><summary>{len(folded)} save points deleted since (by retention "
                  'or by hand)</summary><table class="sortable points gone-points"><thead><tr>'
                  f"{header}</tr></thead><tbody>{gone}</tbody></table></details>")  # fmt: skip
    return table


def _bytes_cell(n: int | None) -> str:
    return "—" if n is None else f'<span data-sort="{n}">{esc(human_bytes(n))}</span>'


def _num_cell(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def sessions_table(data: RunData) -> str:
    if not data.sessions:
        return '<p class="empty">This run has no journal (written before savepoints 0.3).</p>'
    rows = []
    for i, s in enumerate(data.sessions, 1):
        started = (datetime.fromtimestamp(float(s.started), timezone.utc)
                   if s.started is not None else None)  # fmt: skip
        steps = "—" if s.first_step is None else f"{s.first_step}–{s.last_step}"
        ended = s.ended
        cls = ("bad" if ended == "killed" else "warn" if ended.startswith("preempted")
               else "")  # fmt: skip
        rows.append(
            f"<tr><td>{i}</td><td>{esc(_when(started))}</td><td>{esc(s.host or '—')}</td>"
            f"<td>{esc(s.pid or '—')}</td><td><code>{esc(' '.join(s.argv))}</code></td>"
            f"<td>{esc('—' if s.resumed_from is None else s.resumed_from)}</td>"
            f'<td>{esc(steps)}</td><td class="{cls}">{esc(ended)}</td></tr>'
        )
    head = "".join(f"<th>{h}</th>" for h in ("#", "started", "host", "pid", "command",
                                              "resumed from", "steps", "ended"))  # fmt: skip
    body = "".join(rows)
    return f'<table class="sessions"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def lineage(data: RunData) -> str:
    """The chain of parents of the latest save point (what it was trained from)."""
    by_step = {p.step: p for p in data.points}
    latest = next((p for p in data.points if p.latest), None)
    chain, seen = [], set()
    while latest is not None and latest.step not in seen:
        seen.add(latest.step)
        chain.append(latest)
        latest = by_step.get(latest.parent) if latest.parent is not None else None
    if not chain:
        return ""
    links = " ← ".join(f'<span class="chip {_status(p)}">{p.step}</span>' for p in chain)
    return f'<p class="lineage">Latest save point and its parents: {links}</p>'


def kv_table(values: dict[str, Any], cls: str = "kv") -> str:
    if not values:
        return '<p class="empty">none recorded</p>'
    rows = "".join(f"<tr><th>{esc(k)}</th><td><code>{esc(json.dumps(v))}</code></td></tr>"
                   for k, v in values.items())  # fmt: skip
    return f'<table class="{cls}">{rows}</table>'


def storage_section(data: RunData) -> str:
    if not data.storage:
        return '<p class="empty">No save point yet.</p>'
    steps = [s for s, _, _ in data.storage]
    return storage_chart("Storage after each save", steps, [lg for _, lg, _ in data.storage],
                         [ph for _, _, ph in data.storage], chart_id="chart-storage")  # fmt: skip


def heatmap_section(data: RunData) -> str:
    hm = data.heatmap
    if hm is None:
        return '<p class="empty">Needs two save points with model weights.</p>'
    return heatmap("Relative change per layer between consecutive save points", hm.layers,
                   hm.columns, hm.values, chart_id="chart-layers",
                   note=hm.note or "‖Δw‖ / ‖w‖ per layer, as savepoints diff computes it.",
                   )  # fmt: skip


def render(data: RunData, out: Path, *, refresh: float | None = None) -> str:
    """The report page of one run, to be written at ``out`` (links are relative to it)."""
    out_dir = out.parent
    keep = data.keep or {}
    rule = ", ".join(f"{k}={v}" for k, v in keep.items() if v is not None) or "keep everything"
    sections = [
        ("curves", "Training curves", curves_section(data, out_dir)
         + '<p class="legend-note">Every save point is marked under each chart (hover for '
         "details, click to open its folder); dashed vertical lines are resumes; faded "
         "curves were redone after a resume.</p>"),
        ("points", f"Save points ({len(data.points)})", points_table(data, out_dir)
         + lineage(data)),
        ("storage", "Storage", storage_section(data)),
        ("layers", "What changed, layer by layer", heatmap_section(data)),
        ("processes", "Processes that wrote the run", sessions_table(data)),
        ("settings", "Settings", f"<p>From {esc(data.settings_source)}. Retention: "
         f"<code>{esc(rule)}</code>.</p>" + kv_table(data.settings)),
        ("versions", "Versions", kv_table(data.versions)),
    ]  # fmt: skip
    skipped = (f" {data.journal_skipped} damaged or unfinished journal line(s) were skipped."
               if data.journal_skipped else "")  # fmt: skip
    header = (f"<h1>{esc(data.name)}</h1><p class=\"sub\"><code>{esc(data.run.resolve())}"
              f"</code> · {data.journal_lines} journal lines</p>")  # fmt: skip
    body = header + summary_cards(data) + "".join(
        f'<section id="{sid}"><h2>{esc(title)}</h2>{content}</section>'
        for sid, title, content in sections
    ) + footer(data.generated, skipped)  # fmt: skip
    return page(f"{data.name} · savepoints report", body, refresh=refresh)


def footer(generated: datetime, extra: str = "") -> str:
    return (f'<footer>Written by savepoints {esc(__version__)} on {esc(_when(generated))}. '
            f"One self-contained file: no network needed.{esc(extra)}</footer>")  # fmt: skip


def render_comparison(a: RunData, b: RunData, out: Path) -> str:
    """Two runs' curves on the same axes (the second dashed), and their settings side by side."""
    out_dir = out.parent
    names = sorted(set(a.curves) | set(b.curves))
    colors_a, colors_b = _colors(names, PALETTE), _colors(names, PALETTE_B)
    la, lb = a.name, b.name if b.name != a.name else f"{b.name} (2)"
    charts = []
    for i, (title, group) in enumerate(chart_groups(names)):
        series: list[Series] = []
        for n in group:
            if n in a.curves:
                series += series_for(a.curves[n], colors_a[n], label=f"{la} · {n}")
            if n in b.curves:
                series += series_for(b.curves[n], colors_b[n], label=f"{lb} · {n}", dashed=True)
        markers = (markers_for(a, group, out_dir, f"{la}: ")
                   + markers_for(b, group, out_dir, f"{lb}: "))  # fmt: skip
        breaks = [(s, f"{la}: {t}") for s, t in a.resumes] + [(s, f"{lb}: {t}")
                                                               for s, t in b.resumes]  # fmt: skip
        charts.append(line_chart(title, series, markers=markers, breaks=breaks,
                                 chart_id=f"{_chart_id(title)}-{i}",
                                 width=CHART_WIDTH))  # fmt: skip
    keys = list(dict.fromkeys([*a.settings, *b.settings]))
    rows = []
    for k in keys:
        va, vb = a.settings.get(k), b.settings.get(k)
        cls = ' class="differs"' if va != vb else ""
        rows.append(f"<tr{cls}><th>{esc(k)}</th><td><code>{esc(json.dumps(va))}</code></td>"
                    f"<td><code>{esc(json.dumps(vb))}</code></td></tr>")  # fmt: skip
    settings = (f'<table class="kv compare"><thead><tr><th></th><th>{esc(la)}</th>'
                f'<th>{esc(lb)}</th></tr></thead><tbody>{"".join(rows)}</tbody>'
                "</table>")  # fmt: skip
    summary = '<div class="pair">' + "".join(
        f'<div><h3>{esc(label)}</h3><p class="sub"><code>{esc(d.run.resolve())}</code></p>'
        f"{summary_cards(d)}</div>" for label, d in ((la, a), (lb, b))
    ) + "</div>"  # fmt: skip
    body = (f"<h1>{esc(la)} vs {esc(lb)}</h1>" + summary
            + f'<section id="curves"><h2>Training curves</h2><div class="charts">{"".join(charts)}'
            f'</div><p class="legend-note">{esc(la)}: solid; {esc(lb)}: dashed.</p></section>'
            + f'<section id="points-a"><h2>Save points of {esc(la)}</h2>{points_table(a, out_dir)}'
            "</section>"
            + f'<section id="points-b"><h2>Save points of {esc(lb)}</h2>{points_table(b, out_dir)}'
            "</section>"
            + f'<section id="settings"><h2>Settings (differences highlighted)</h2>{settings}'
            "</section>" + footer(a.generated))  # fmt: skip
    return page(f"{la} vs {lb} · savepoints report", body)


def page(title: str, body: str, *, refresh: float | None = None) -> str:
    live = ""
    attrs = ""
    if refresh:
        attrs = f' data-refresh="{refresh:g}"'
        written = datetime.now().astimezone().strftime("%H:%M:%S")
        live = (f'<div class="live">● Live: this page reloads every {refresh:g} s while the '
                f"run trains (written at {written}; a time that stops moving means the "
                "training stopped); the final report replaces it.</div>")  # fmt: skip
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>"
        f"<body{attrs}>{live}<main>{body}</main><script>{SCRIPT}</script></body></html>\n"
    )


CSS = """
:root{--ink:#1d2430;--muted:#6b7280;--line:#e5e7eb;--bg:#fff;--panel:#f8fafc;--accent:#35608f}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;
color:var(--ink);background:var(--bg)}
main{max-width:1220px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:24px;margin:0 0 2px}h2{font-size:18px;margin:34px 0 10px;padding-bottom:4px;
border-bottom:1px solid var(--line)}h3{margin:0}
.sub{color:var(--muted);margin:0 0 14px}
code{font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.card{background:var(--panel);border:1px solid var(--line);border-radius:8px;padding:10px 14px;
min-width:150px}
.card .k{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.card .v{font-size:20px;font-weight:600}.card .s{color:var(--muted);font-size:12px}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:18px}
figure.chart{margin:0;background:var(--panel);border:1px solid var(--line);border-radius:8px;
padding:10px}
figure.chart figcaption{font-weight:600;margin:0 0 4px}
figure.chart svg{width:100%;height:auto;display:block}
.legend-note,.note,.lineage{color:var(--muted);font-size:12px}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid var(--line);vertical-align:top}
th{background:var(--panel);font-weight:600;white-space:nowrap}
table.sortable th{cursor:pointer}table.sortable th:hover{color:var(--accent)}
table.points td:first-child a{font-weight:600}
td span[data-sort],.ok,.bad{white-space:nowrap}
tr.gone td{color:var(--muted)}tr.gone td:first-child{text-decoration:line-through}
.chip{display:inline-block;padding:0 7px;border-radius:9px;font-size:12px;background:#e8eef6;
color:#35608f;white-space:nowrap}
.chip.best{background:#fff4cc;color:#8a6500}.chip.deleted{background:#eee;color:#777}
.chip.preempted{background:#fde2e2;color:#b42318}.chip.tagged{background:#efe5fb;color:#6b3fa0}
.chip.latest{background:#dff3e4;color:#1e7b3a}
.why{font-size:11px;color:var(--muted)}
.ok{color:#1e7b3a}.bad{color:#b42318}.warn{color:#a15c00}.muted{color:var(--muted)}
table.kv{width:auto;min-width:420px}table.kv th{width:220px}
tr.differs td,tr.differs th{background:#fff7e0}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:18px}
.empty{color:var(--muted);font-style:italic}
details summary{cursor:pointer;color:var(--muted);margin:8px 0}
.live{position:sticky;top:0;background:#e8f5e9;color:#1e7b3a;padding:6px 28px;font-size:13px;
border-bottom:1px solid #c8e6c9;z-index:2}
.tip{position:absolute;display:none;pointer-events:none;background:#1d2430;color:#fff;
font-size:12px;padding:5px 8px;border-radius:4px;max-width:420px;z-index:10;white-space:pre-line}
footer{margin-top:40px;color:var(--muted);font-size:12px}
@media print{.live{display:none}.charts{grid-template-columns:1fr}}
"""

# Tooltips for anything with data-tip; on line charts, a readout of every curve at the step
# under the pointer; tables sort by a click on a header; a live page reloads itself and
# keeps its scroll position. Written defensively: the report is checked for console errors.
SCRIPT = r"""
(function () {
  "use strict";
  var tip = document.createElement("div");
  tip.className = "tip";
  document.body.appendChild(tip);
  function show(text, e) {
    tip.textContent = text;
    tip.style.display = "block";
    tip.style.left = (e.pageX + 14) + "px";
    tip.style.top = (e.pageY + 14) + "px";
  }
  function hide() { tip.style.display = "none"; }
  document.addEventListener("mousemove", function (e) {
    var t = e.target && e.target.closest ? e.target.closest("[data-tip]") : null;
    if (t) { show(t.getAttribute("data-tip"), e); return; }
    var svg = e.target && e.target.closest ? e.target.closest("svg[data-x0]") : null;
    if (svg && svg.__readout) { svg.__readout(e); return; }
    hide();
  });
  function nearest(points, x) {
    var best = null, dist = Infinity;
    for (var i = 0; i < points.length; i++) {
      var d = Math.abs(points[i][0] - x);
      if (d < dist) { dist = d; best = points[i]; }
    }
    return best;
  }
  var figures = document.querySelectorAll("figure.chart");
  Array.prototype.forEach.call(figures, function (fig) {
    var svg = fig.querySelector("svg[data-x0]");
    var raw = fig.querySelector("script.chart-data");
    if (!svg || !raw) { return; }
    var data;
    try { data = JSON.parse(raw.textContent); } catch (err) { return; }
    var x0 = +svg.getAttribute("data-x0"), x1 = +svg.getAttribute("data-x1");
    var p0 = +svg.getAttribute("data-px0"), p1 = +svg.getAttribute("data-px1");
    if (!(p1 > p0)) { return; }
    svg.__readout = function (e) {
      var m = svg.getScreenCTM();
      if (!m) { return; }
      var pt = svg.createSVGPoint();
      pt.x = e.clientX; pt.y = e.clientY;
      var local = pt.matrixTransform(m.inverse());
      if (local.x < p0 || local.x > p1) { hide(); return; }
      var step = x0 + (local.x - p0) / (p1 - p0) * (x1 - x0);
      var lines = [], at = null;
      (data.series || []).forEach(function (s) {
        var p = nearest(s.points || [], step);
        if (p) { at = at === null ? p[0] : at; lines.push(s.name + ": " + (+p[1].toPrecision(4))); }
      });
      if (!lines.length) { hide(); return; }
      show("step " + Math.round(at) + "\n" + lines.join("\n"), e);
    };
  });
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    var heads = table.querySelectorAll("th");
    Array.prototype.forEach.call(heads, function (th, col) {
      th.addEventListener("click", function () {
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        var dir = th.getAttribute("data-dir") === "asc" ? -1 : 1;
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("data-dir"); });
        th.setAttribute("data-dir", dir === 1 ? "asc" : "desc");
        function key(row) {
          var cell = row.cells[col];
          var sorted = cell && cell.querySelector("[data-sort]");
          var text = sorted ? sorted.getAttribute("data-sort") : (cell ? cell.textContent : "");
          var n = parseFloat(text);
          return isNaN(n) ? text : n;
        }
        rows.sort(function (a, b) {
          var ka = key(a), kb = key(b);
          if (typeof ka === typeof kb) { return ka < kb ? -dir : ka > kb ? dir : 0; }
          return typeof ka === "number" ? -dir : dir;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
  var every = parseFloat(document.body.getAttribute("data-refresh") || "");
  if (every > 0) {
    var key = "savepoints-scroll:" + location.pathname;
    try {
      var y = sessionStorage.getItem(key);
      if (y !== null) { window.scrollTo(0, +y); }
    } catch (err) { /* storage refused (privacy settings): reload at the top */ }
    setTimeout(function () {
      try { sessionStorage.setItem(key, String(window.scrollY)); } catch (err) { /* idem */ }
      location.reload();
    }, every * 1000);
  }
})();
"""
