"""Everything the commands print: the consoles, the shared formats, tables and ``--json``.

Results go to stdout (``console``, ``echo_json``); progress, errors and hints go to stderr
(``err_console``), so ``savepoints ... --json | jq`` always gets clean JSON.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any, Literal

import click
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

# Piped output is not cut to 80 columns: tables stay whole in logs and files.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

Justify = Literal["left", "right"]

# Paths, texts, names and messages are printed with ``esc``: a "[bold]" in a tweet or a
# "[transformers]" in a hint is text, not rich markup.
esc = escape


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def when(dt: datetime, short: bool = False) -> str:
    return dt.astimezone().strftime("%m-%d %H:%M" if short else "%Y-%m-%d %H:%M:%S")


def fmt_metric(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def table(title: str, *columns: str | tuple[str, Justify]) -> Table:
    """A table in the one style every command uses; a column is a name, or a
    ``(name, "right")`` pair for numbers."""
    t = Table(title=esc(title) or None, title_justify="left", box=box.SIMPLE_HEAD)
    for col in columns:
        if isinstance(col, str):
            t.add_column(col)
        else:
            t.add_column(col[0], justify=col[1])
    return t


def json_option(help: str = "Print JSON instead of text.") -> Callable[[Any], Any]:
    """The ``--json`` flag (parameter ``as_json``) every command that prints data takes."""
    return click.option("--json", "as_json", is_flag=True, help=help)


def echo_json(data: Any) -> None:
    """The ``--json`` output of a command: one indented JSON document on stdout."""
    click.echo(json.dumps(data, indent=2, default=str))


def echo_json_lines(rows: Sequence[Any]) -> None:
    """One compact JSON object per line (``predict --json``), for streaming consumers."""
    for row in rows:
        click.echo(json.dumps(row, ensure_ascii=False, default=str))


def done(message: str, indent: int = 0) -> None:
    """A line saying something was done (``✓ deleted step 20``)."""
    console.print(f"{' ' * indent}[green]✓[/] {esc(message)}")


def event(message: str) -> None:
    """A line of the library's own narration (resuming, loading...)."""
    console.print(f"[cyan]savepoints[/] {esc(message)}")


def print_error(message: str, hint: str = "") -> None:
    err_console.print(f"[bold red]error:[/] {esc(message)}")
    if hint:
        err_console.print(f"[dim]hint:[/] {esc(hint)}")


def spinner(text: str) -> contextlib.AbstractContextManager[Any]:
    """A spinner on stderr while something slow runs; nothing when stderr is not a terminal."""
    return err_console.status(text) if err_console.is_terminal else contextlib.nullcontext()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence stdout (the console included) for a while."""
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        yield


@contextlib.contextmanager
def transfer_bar(what: str, total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar of bytes moved (hashed, sent, fetched), on stderr; yields the
    callback that advances it (safe to call from worker threads)."""
    with Progress(
        "[progress.description]{task.description}", BarColumn(), DownloadColumn(),
        TransferSpeedColumn(), console=err_console, transient=True,
    ) as bar:  # fmt: skip
        task = bar.add_task(what, total=total or None)
        yield lambda n: bar.advance(task, n)
