"""``savepoints log`` (the run journal) and ``savepoints report`` (the HTML page)."""

from __future__ import annotations

import contextlib
import webbrowser
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from savepoints import InvalidArgumentError, RunNotFoundError
from savepoints.cli.output import (
    console,
    echo_json_lines,
    err_console,
    esc,
    fmt_metric,
    human_bytes,
    json_option,
    table,
)
from savepoints.cli.resolve import is_point_folder
from savepoints.journal import EVENTS, read_journal
from savepoints.layout import RunLayout, parse_step


def _run_folder(run: Path) -> Path:
    """``run``, or a clear error when it is no run (a file, a save point, another folder)."""
    if is_point_folder(run):
        raise InvalidArgumentError(
            f"{run} is a save point folder, not a run.", f"Pass its run folder: {run.parent}."
        )
    if run.exists() and not run.is_dir():
        raise InvalidArgumentError(
            f"{run} is a file, not a run folder.", "Pass the folder given to --run or SavePoints()."
        )
    if not run.is_dir():
        raise RunNotFoundError(run)
    if not RunLayout(run).private.is_dir() and not any(
        parse_step(child.name) is not None for child in run.iterdir()
    ):
        runs = sorted(c.name for c in run.iterdir() if RunLayout(c).private.is_dir())[:5]
        raise InvalidArgumentError(
            f"{run} is not a savepoints run: it holds no save points and no journal.",
            f"Pass one of the runs in it: {', '.join(runs)}." if runs else
            "Pass the folder given to --run or SavePoints().",
        )  # fmt: skip
    return run


def _metrics(values: dict[str, Any], limit: int = 6) -> str:
    shown = [f"{k} {fmt_metric(v)}" for k, v in values.items() if v is not None][:limit]
    more = len(values) - len(shown)
    return ", ".join(shown) + (f" (+{more})" if more > 0 else "")


def describe(e: dict[str, Any]) -> str:
    """One line of details for a journal event."""
    kind = e.get("event")
    if kind == "open":
        return f"pid {e.get('pid')} on {e.get('host')}: {' '.join(e.get('argv') or [])}"
    if kind == "save":
        parts = [_metrics(e.get("metrics") or {})] if e.get("metrics") else []
        if e.get("size") is not None:
            parts.append(f"{human_bytes(e['size'])} ({human_bytes(e.get('new_bytes') or 0)} new)")
        if e.get("stall_s") is not None:
            parts.append(f"stalled {e['stall_s']:.3f} s, background {e.get('background_s', 0):.3f}"
                         f" s ({e.get('mode')}, {e.get('snapshot')})")  # fmt: skip
        if e.get("tags"):
            parts.append("tags " + ", ".join(e["tags"]))
        if e.get("preempted"):
            parts.append(f"emergency save on {e['preempted']}")
        return " · ".join(parts)
    if kind == "retention":
        return str(e.get("rule", ""))
    if kind in ("tag", "untag"):
        return str(e.get("tag"))
    if kind == "log":
        return _metrics(e.get("values") or {})
    if kind == "storage":
        logical, physical = e.get("logical") or 0, e.get("physical") or 0
        ratio = logical / physical if physical else 1.0
        return (f"{human_bytes(physical)} on disk, {human_bytes(logical)} as copies "
                f"(dedup {ratio:.1f}x), {e.get('points')} save points")  # fmt: skip
    if kind == "preempted":
        return f"{e.get('signal')}, exit code {e.get('exit_code')}"
    if kind == "save_failed":
        return str(e.get("error", ""))
    return ""


#: A journal longer than this is printed as plain lines, not a table.
PLAIN_ABOVE = 500


def _stamp(e: dict[str, Any]) -> str:
    t = e.get("time")
    return (
        datetime.fromtimestamp(t).strftime("%m-%d %H:%M:%S") if isinstance(t, (int, float)) else "?"
    )


@click.command("log")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--event", "kinds", multiple=True, type=click.Choice(sorted(EVENTS)),
              help="Only these events (repeat the option for several).")  # fmt: skip
@click.option("--no-metrics", is_flag=True, help="Leave out the metrics the loop logged.")
@click.option("--last", type=click.IntRange(min=1), help="Only the last N events.")
@json_option("One JSON object per line, as in the journal.")
def log_cmd(
    run: Path, kinds: tuple[str, ...], no_metrics: bool, last: int | None, as_json: bool
) -> None:
    """Print RUN's journal: saves, retention decisions, deletes, tags, restores,
    preemptions and logged metrics, oldest first. Safe while the run trains."""
    journal = read_journal(_run_folder(run))
    events = [e for e in journal if (not kinds or e["event"] in kinds)
              and not (no_metrics and e["event"] == "log")]  # fmt: skip
    if last:
        events = events[-last:]
    if as_json:
        echo_json_lines(events)
        return
    if not journal.events:
        console.print(f"{esc(str(run))} has no journal yet (runs written by savepoints 0.3 "
                      "and later have one).")  # fmt: skip
        return
    sessions: dict[str, int] = {}
    if len(events) > PLAIN_ABOVE:  # a table of thousands of rows takes rich many seconds
        for e in events:
            n = sessions.setdefault(str(e.get("session")), len(sessions) + 1)
            step = "" if e.get("step") is None else e["step"]
            click.echo(f"{_stamp(e)}  #{n}  {e['event']:<11} {step!s:>8}  {describe(e)}")
        return
    t = table(f"{run} — {len(events)} of {len(journal)} events", ("time", "left"), "proc",
              "event", ("step", "right"), "details")  # fmt: skip
    for e in events:
        n = sessions.setdefault(str(e.get("session")), len(sessions) + 1)
        stamp = _stamp(e)
        kind = str(e["event"])
        style = {"save": "green", "retention": "yellow", "delete": "yellow", "preempted": "red",
                 "save_failed": "red", "restore": "cyan", "open": "bold"}.get(kind, "")  # fmt: skip
        shown = f"[{style}]{kind}[/]" if style else kind
        step = "" if e.get("step") is None else str(e["step"])
        t.add_row(stamp, f"#{n}", shown, step, esc(describe(e)))
    console.print(t)
    if journal.skipped:
        err_console.print(f"[yellow]{journal.skipped} damaged or unfinished line(s) skipped.[/]")


@contextlib.contextmanager
def progress_bar() -> Iterator[Callable[[str, int, int], None]]:
    """Progress of a report (re-hashing, comparing layers), on stderr."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=err_console, transient=True) as bar:  # fmt: skip
        tasks: dict[str, Any] = {}

        def tell(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done, total=total)

        yield tell


def wrote(path: Path, what: str = "report") -> None:
    size = path.stat().st_size
    console.print(f"[green]✓[/] {what}: [bold]{esc(str(path))}[/] ({human_bytes(size)}, "
                  "self-contained: opens offline)")  # fmt: skip


@click.command("report")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path, dir_okay=False),
              help="Where to write the page (default RUN/report.html; with --compare, "
              "compare.html in RUN).")  # fmt: skip
@click.option(
    "--compare",
    "other",
    type=click.Path(path_type=Path),
    help="A second run: both runs' curves on the same axes.",
)
@click.option("--no-verify", is_flag=True, help="Do not re-hash the save points.")
@click.option("--no-layers", is_flag=True, help="Leave out the per-layer heatmap (reads weights).")
@click.option("--open", "open_page", is_flag=True, help="Open the page in a browser.")
def report_cmd(
    run: Path, out: Path | None, other: Path | None, no_verify: bool, no_layers: bool,
    open_page: bool,
) -> None:  # fmt: skip
    """Write an HTML report of RUN: curves with every save point marked, the save points,
    storage, what changed layer by layer, settings. One self-contained file."""
    from savepoints.report import write_comparison, write_report

    _run_folder(run)
    with progress_bar() as tell:
        if other is not None:
            _run_folder(other)
            path = write_comparison(run, other, out or run / "compare.html", progress=tell)
        else:
            path = write_report(run, out, verify=not no_verify, heatmap=not no_layers,
                                progress=tell)  # fmt: skip
    wrote(path)
    if open_page:
        webbrowser.open(path.resolve().as_uri())
