"""The ``savepoints`` command group: every command is registered here, and one table turns
exceptions into an exit code plus a one-line message and a hint.

A command's module is imported when the command runs (or ``--help`` lists them all), so
``savepoints predict`` on an ONNX bundle imports neither torch nor transformers.

Tracebacks only with ``SAVEPOINTS_DEBUG=1``.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

from savepoints import errors
from savepoints.cli.output import err_console, print_error

DEBUG_ENV = "SAVEPOINTS_DEBUG"

# exception type -> exit code. The first match in order wins, so subclasses come first.
# Every other error of ours (a bad argument or data file, a tag in use, a missing
# package...) and any OSError exits 1; Ctrl-C 130; click's usage errors 2.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (errors.CorruptSavePointError, 3),  # verification failed: something was altered
    (errors.KeyFileError, 1),  # a key file that cannot be used: a bad argument
    (errors.SigningError, 3),  # unsigned, signed by another key, or altered since
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


#: command name -> "module:attribute", in the order ``--help`` lists them.
COMMANDS = {
    "list": "inspect:list_cmd",
    "show": "inspect:show_cmd",
    "verify": "inspect:verify_cmd",
    "diff": "inspect:diff_cmd",
    "log": "report:log_cmd",
    "report": "report:report_cmd",
    "train": "train:train_cmd",
    "predict": "predict:predict_cmd",
    "sign": "sign:sign_cmd",
    "export": "transfer:export_cmd",
    "import": "transfer:import_cmd",
    "publish": "publish:publish_cmd",
    "push": "remote:push_cmd",
    "pull": "remote:pull_cmd",
    "tag": "manage:tag_cmd",
    "untag": "manage:untag_cmd",
    "rm": "manage:rm_cmd",
    "du": "manage:du_cmd",
    "gc": "manage:gc_cmd",
    "compact": "manage:compact_cmd",
    "expand": "manage:expand_cmd",
    "demo": "demo:demo_cmd",
}


def _unavailable(name: str, package: str) -> click.Command:
    def fail(args: tuple[str, ...]) -> None:
        missing = errors.MissingDependencyError(f"`savepoints {name}`", package, package)
        missing.hint = (
            f"pip install {package} (savepoints needs it for all but running and signing an "
            "ONNX bundle)."
        )
        raise missing

    return click.Command(name, callback=fail, help=f"(Needs {package}, not installed here.)",
                         context_settings={"ignore_unknown_options": True},
                         params=[click.Argument(["args"], nargs=-1)])  # fmt: skip


class Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, _, attr = COMMANDS[cmd_name].partition(":")
        try:
            command = getattr(importlib.import_module(f"savepoints.cli.{module}"), attr)
        except ImportError as e:
            # A deployment with ONNX Runtime but no torch runs `predict BUNDLE`; the
            # commands that need torch still list (--help) and say what is missing.
            return _unavailable(cmd_name, (e.name or str(e)).split(".")[0])
        assert isinstance(command, click.Command) and command.name == cmd_name
        return command

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
