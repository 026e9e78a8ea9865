"""``savepoints list``, ``show`` and ``verify``: read-only views of a run."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import click
from rich import box
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from savepoints.cli import cli
from savepoints.errors import InvalidArgumentError, SavePointNotFoundError, SavePointsError
from savepoints.integrity import VerifyReport
from savepoints.layout import MANIFEST_NAME, parse_step
from savepoints.manager import SavePoint, SavePoints, verify

# Piped output is not cut to 80 columns: tables stay whole in logs and files.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _when(dt: datetime, short: bool = False) -> str:
    return dt.astimezone().strftime("%m-%d %H:%M" if short else "%Y-%m-%d %H:%M:%S")


def _fmt_metric(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _open_run(run: Path) -> SavePoints:
    return SavePoints(run, readonly=True)


def _best_step(points: SavePoints, listed: list[SavePoint], metric: str | None) -> int | None:
    try:
        best = points.best(metric=metric)
    except SavePointsError:
        return None
    return best.step if best and best in listed else None


def point_summary(sp: SavePoint, latest: bool = False, best: bool = False) -> dict[str, Any]:
    return {
        "step": sp.step,
        "path": str(sp.path),
        "created": sp.created.isoformat(),
        "metrics": sp.metrics,
        "tags": list(sp.tags),
        "size": sp.size,
        "latest": latest,
        "best": best,
    }


@cli.command("list")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--metric", help="Metric that defines the best save point (default: the run's).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_cmd(run: Path, metric: str | None, as_json: bool) -> None:
    """List the committed save points of RUN: step, time, metrics, size, tags."""
    points = _open_run(run)
    listed = points.list()
    latest = listed[-1].step if listed else None
    best = _best_step(points, listed, metric)
    if as_json:
        _echo_json([point_summary(p, p.step == latest, p.step == best) for p in listed])
        return
    print_table(run, listed, latest, best)


def print_points_table(run: Path, metric: str | None = None) -> None:
    """The ``savepoints list`` table, for other commands to end with."""
    points = _open_run(run)
    listed = points.list()
    print_table(
        run, listed, listed[-1].step if listed else None, _best_step(points, listed, metric)
    )


def print_table(run: Path, listed: list[SavePoint], latest: int | None, best: int | None) -> None:
    if not listed:
        console.print(f"No committed save points in {run}.")
        return
    metric_names: list[str] = []
    for p in listed:
        metric_names.extend(m for m in p.metrics if m not in metric_names)
    columns: list[tuple[str, str]] = [("step", "right"), ("created", "left")]
    columns += [(m, "right") for m in metric_names]
    columns += [("size", "right"), ("tags", "left"), ("", "left")]
    rows = []
    for p in listed:
        marks = " ".join(
            mark for mark, on in (("latest", p.step == latest), ("★ best", p.step == best)) if on
        )
        rows.append(
            [
                str(p.step),
                _when(p.created, short=True),
                *[_fmt_metric(p.metrics[m]) if m in p.metrics else "" for m in metric_names],
                human_bytes(p.size),
                ", ".join(p.tags),
                marks,
            ]
        )
    # Columns that say nothing are left out, and "created" goes first when the table
    # would not fit: cut-off metric names and values would be worse.
    keep = [
        i for i, (name, _) in enumerate(columns) if name in ("step", "") or any(r[i] for r in rows)
    ]
    widths = {i: max(len(columns[i][0]), *(len(r[i]) for r in rows)) + 3 for i in keep}
    if sum(widths.values()) > console.width and 1 in keep:
        keep.remove(1)
    table = Table(
        title=f"{run}  ({len(listed)} save points)", title_justify="left", box=box.SIMPLE_HEAD
    )
    for i in keep:
        name, justify = columns[i]
        table.add_column(name, justify=justify, no_wrap=True, style="bold" if i == 0 else None)  # type: ignore[arg-type]
    for r in rows:
        styled = [
            r[i].replace("latest", "[cyan]latest[/]").replace("★ best", "[green]★ best[/]")
            if i == len(columns) - 1
            else r[i]
            for i in keep
        ]
        table.add_row(*styled)
    console.print(table)


def _resolve_point(run: Path, step: str | None) -> SavePoint:
    if (run / MANIFEST_NAME).exists():
        if step is not None:
            raise InvalidArgumentError(
                f"{run} is a save point folder, so STEP ({step}) cannot be used with it.",
                "Pass the run folder with a STEP, or the save point folder alone.",
            )
        return SavePoint.open(run)
    points = _open_run(run)
    if step in (None, "latest"):
        sp = points.latest()
    elif step == "best":
        sp = points.best()
    else:
        return points.get(int(step) if step.isdigit() else step)
    if sp is None:
        raise SavePointNotFoundError(run, step or "latest", [])
    return sp


@cli.command("show")
@click.argument("run", type=click.Path(path_type=Path))
@click.argument("step", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def show_cmd(run: Path, step: str | None, as_json: bool) -> None:
    """Show one save point of RUN (default the latest; STEP may be a number, a tag,
    'latest' or 'best'), or a save point FOLDER: files, sizes, metrics, state, versions."""
    sp = _resolve_point(run, step)
    if as_json:
        _echo_json({"path": str(sp.path), **sp.manifest.to_json()})
        return
    m = sp.manifest
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("save point", f"step {sp.step}")
    head.add_row("path", str(sp.path))
    head.add_row("created", _when(sp.created))
    head.add_row("parent", "—" if sp.parent is None else f"step {sp.parent}")
    head.add_row("size", f"{human_bytes(sp.size)} in {len(m.files)} files")
    head.add_row("tags", ", ".join(sp.tags) or "—")
    console.print(head)
    if sp.metrics:
        mt = Table(title="metrics", title_justify="left")
        mt.add_column("metric")
        mt.add_column("value", justify="right")
        for k, v in sp.metrics.items():
            mt.add_row(k, _fmt_metric(v))
        console.print(mt)
    if sp.state:
        console.print("[bold]state[/]")
        console.print_json(json.dumps(sp.state))
    tree = Tree("[bold]contents[/]")
    for name, info in m.contents.items():
        desc = info.get("class", "") or ", ".join(info.get("generators", []))
        if name == "model":
            desc += f"  ({info.get('kind')}, {info.get('tensors')} tensors"
            if info.get("tied"):
                desc += f", {len(info['tied'])} tied"
            desc += ")"
        tree.add(f"{name}: {desc}")
    console.print(tree)
    ft = Table(title="files", title_justify="left")
    ft.add_column("file")
    ft.add_column("size", justify="right")
    ft.add_column(f"{m.hash_algorithm}", style="dim")
    for rel, e in sorted(m.files.items()):
        ft.add_row(rel, human_bytes(e.size), e.hash[:16])
    console.print(ft)
    console.print(
        "[bold]versions[/]  " + "  ".join(f"{k} {v}" for k, v in sorted(m.versions.items()))
    )


def _report_json(r: VerifyReport) -> dict[str, Any]:
    return {
        "path": str(r.path),
        "ok": r.ok,
        "files_checked": r.files_checked,
        "bytes_checked": r.bytes_checked,
        "problems": [{"kind": p.kind, "file": p.path, "detail": p.detail} for p in r.problems],
        **({"save_points": [_report_json(c) for c in r.children]} if r.children else {}),
    }


@cli.command("verify")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify_cmd(path: Path, as_json: bool) -> None:
    """Re-hash every file of a run's save points (or of one save point FOLDER).

    Exit status 0 only when everything verifies, 3 when anything is missing, extra,
    truncated or altered.
    """
    err = Console(stderr=True)
    spinner = err.status(f"verifying {path} ...") if err.is_terminal else contextlib.nullcontext()
    with spinner:
        report = verify(path)
    if as_json:
        _echo_json(_report_json(report))
    else:
        one_point = (path / MANIFEST_NAME).exists() or parse_step(path.name) is not None
        reports = [report] if one_point else report.children
        if not reports:
            console.print(f"No save point folders in {path}.")
        for r in reports:
            status = "[green]OK[/]" if r.ok else "[bold red]FAILED[/]"
            console.print(
                f"{status}  {r.path}  ({r.files_checked} files, {human_bytes(r.bytes_checked)})"
            )
            for p in r.problems:
                console.print(f"    [red]{p.kind:9}[/] {p.path}: {p.detail}")
        bad = sum(1 for r in reports if not r.ok)
        if reports:
            summary = (
                f"[green]all {len(reports)} save point(s) verified[/]"
                if not bad
                else f"[bold red]{bad} of {len(reports)} save point(s) failed verification[/]"
            )
            console.print(summary)
    if not report.ok:
        sys.exit(3)


def _bar(value: float, top: float, width: int = 24) -> str:
    if top <= 0 or not math.isfinite(value):
        return ""
    return "█" * max(1, round(width * min(value, top) / top)) if value > 0 else ""


@cli.command("diff")
@click.argument("run", type=click.Path(path_type=Path))
@click.argument("a")
@click.argument("b")
@click.option("--top", type=int, default=15, show_default=True, help="Changed tensors to list.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole comparison as JSON.")
def diff_cmd(run: Path, a: str, b: str, top: int, as_json: bool) -> None:
    """What changed from A to B (steps or tags of RUN, or folders): config, tensors
    (relative L2 change per tensor and per layer), metrics."""
    from savepoints.diff import diff_models, resolve, to_json_text

    report = diff_models(resolve(run, a), resolve(run, b))
    if as_json:
        click.echo(to_json_text(report))
        return
    console.print(f"[bold]{report.a}[/] → [bold]{report.b}[/]")
    if report.metric_changes:
        t = Table(title="metrics", title_justify="left", box=box.SIMPLE_HEAD)
        for col in ("metric", "A", "B", "Δ"):
            t.add_column(col, justify="left" if col == "metric" else "right")
        for k, (va, vb) in report.metric_changes.items():
            d = "" if va is None or vb is None else f"{vb - va:+.4g}"
            t.add_row(k, "—" if va is None else f"{va:.4g}", "—" if vb is None else f"{vb:.4g}", d)
        console.print(t)
    if report.config_changes:
        t = Table(title="config", title_justify="left", box=box.SIMPLE_HEAD)
        for col in ("key", "A", "B"):
            t.add_column(col)
        for k, (va, vb) in report.config_changes.items():
            t.add_row(k, json.dumps(va), json.dumps(vb))
        console.print(t)
    for label, names in (("added", report.added), ("removed", report.removed)):
        if names:
            console.print(f"[bold]{label}[/] ({len(names)}): " + ", ".join(names[:top]))
    for name, (sa, sb) in report.reshaped.items():
        console.print(f"[bold]reshaped[/] {name}: {sa} → {sb}")
    if report.layers:
        t = Table(title="relative L2 change per layer", title_justify="left", box=box.SIMPLE_HEAD)
        t.add_column("layer")
        t.add_column("change", justify="right")
        t.add_column("")
        top_layer = max((v for v in report.layers.values() if math.isfinite(v)), default=0.0)
        for layer, v in sorted(report.layers.items(), key=lambda kv: -kv[1])[:top]:
            t.add_row(layer, f"{v:.3e}" if v else "0", _bar(v, top_layer))
        console.print(t)
    if report.changed:
        t = Table(title=f"most changed tensors (top {min(top, len(report.changed))} of "
                  f"{len(report.changed)})", title_justify="left", box=box.SIMPLE_HEAD)  # fmt: skip
        t.add_column("tensor")
        t.add_column("relative L2", justify="right")
        t.add_column("params", justify="right")
        for c in report.changed[:top]:
            t.add_row(c.name, f"{c.relative_l2:.3e}", f"{c.numel:,}")
        console.print(t)
    console.print(
        f"{report.unchanged} tensor(s) unchanged ({human_bytes(report.unchanged_bytes)}), "
        f"{len(report.changed)} changed."
    )
