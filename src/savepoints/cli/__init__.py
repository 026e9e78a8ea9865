"""The ``savepoints`` command: a thin layer over the public API.

Every command calls the library; one table turns exceptions into a one-line message,
a hint and an exit code. Tracebacks only with ``SAVEPOINTS_DEBUG=1``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
from rich.console import Console

from savepoints import errors

F = TypeVar("F", bound=Callable[..., Any])

DEBUG_ENV = "SAVEPOINTS_DEBUG"

# exception type -> exit code. The first match in order wins, so subclasses come first.
EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (errors.CorruptSavePointError, 3),
    (errors.ManifestError, 3),
    (errors.UnsupportedFormatError, 4),
    (errors.RunLockedError, 5),
    (errors.RunNotFoundError, 2),
    (errors.SavePointNotFoundError, 2),
    (errors.SavePointGoneError, 2),
    (errors.MetricNotFoundError, 2),
    (errors.SavePointsError, 1),
    (PermissionError, 1),
    (OSError, 1),
]

err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def report_error(exc: BaseException) -> int:
    """Print one line (plus a hint) for ``exc`` and return the exit code."""
    code = next((c for t, c in EXIT_CODES if isinstance(exc, t)), 1)
    if isinstance(exc, errors.SavePointsError):
        message = str(exc)
        if exc.hint and message.endswith(exc.hint):
            message = message[: -len(exc.hint)].rstrip()
        err_console.print(f"[bold red]error:[/] {message}")
        if exc.hint:
            err_console.print(f"[dim]hint:[/] {exc.hint}")
    else:
        name = type(exc).__name__
        err_console.print(f"[bold red]error:[/] {name}: {exc}")
        err_console.print(f"[dim]hint:[/] set {DEBUG_ENV}=1 to see the full traceback.")
    return code


class Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]: nothing committed was changed.")
            sys.exit(130)
        except Exception as exc:
            if os.environ.get(DEBUG_ENV):
                raise
            sys.exit(report_error(exc))


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="savepoints")
def cli() -> None:
    """Atomic, verified, pickle-free save points for Transformers training runs."""


def main() -> None:
    cli(prog_name="savepoints")


from savepoints.cli import demo as _demo  # noqa: E402  (registers the commands)
from savepoints.cli import inspect as _inspect  # noqa: E402
from savepoints.cli import manage as _manage  # noqa: E402
from savepoints.cli import train as _train  # noqa: E402
from savepoints.cli import transfer as _transfer  # noqa: E402

__all__ = ["cli", "main"]
_ = (_demo, _inspect, _manage, _train, _transfer)
