"""The ``savepoints`` command group: every command is registered here, and one table turns
exceptions into an exit code plus a one-line message and a hint.

Tracebacks only with ``SAVEPOINTS_DEBUG=1``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from savepoints import errors
from savepoints.cli import demo, inspect, manage, publish, remote, report, train, transfer
from savepoints.cli.output import err_console, print_error

DEBUG_ENV = "SAVEPOINTS_DEBUG"

# exception type -> exit code. The first match in order wins, so subclasses come first.
# Every other error of ours (a bad argument or data file, a tag in use, a missing
# package...) and any OSError exits 1; Ctrl-C 130; click's usage errors 2.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (errors.CorruptSavePointError, 3),  # verification failed: something was altered
    (errors.ManifestError, 3),
    (errors.UnsupportedFormatError, 4),  # written by a newer savepoints
    (errors.RunLockedError, 5),  # another process is writing the run
    (errors.RemoteAccessError, 6),  # the object store refused us (credentials, bucket)
    (errors.RunNotFoundError, 2),  # what was named is not there
    (errors.SavePointNotFoundError, 2),
    (errors.SavePointGoneError, 2),
    (errors.MetricNotFoundError, 2),
    (errors.SavePointsError, 1),
    (OSError, 1),
)


def exit_code(exc: BaseException) -> int:
    return next((code for kind, code in EXIT_CODES if isinstance(exc, kind)), 1)


def report_error(exc: BaseException) -> int:
    """Print one line (plus a hint) for ``exc`` and return the exit code."""
    if isinstance(exc, errors.SavePointsError):
        print_error(exc.message, exc.hint)
    else:
        print_error(f"{type(exc).__name__}: {exc}", f"set {DEBUG_ENV}=1 to see the full traceback.")
    return exit_code(exc)


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


for command in (
    inspect.list_cmd,
    inspect.show_cmd,
    inspect.verify_cmd,
    inspect.diff_cmd,
    report.log_cmd,
    report.report_cmd,
    train.train_cmd,
    train.predict_cmd,
    transfer.export_cmd,
    transfer.import_cmd,
    publish.publish_cmd,
    remote.push_cmd,
    remote.pull_cmd,
    manage.tag_cmd,
    manage.untag_cmd,
    manage.rm_cmd,
    manage.du_cmd,
    manage.gc_cmd,
    manage.compact_cmd,
    manage.expand_cmd,
    demo.demo_cmd,
):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="savepoints")
