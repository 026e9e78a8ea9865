"""``savepoints train`` and ``savepoints predict``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from savepoints.cli.inspect import print_points_table
from savepoints.cli.output import console, esc, event
from savepoints.cli.predict import need_transformers
from savepoints.cli.report import progress_bar, wrote
from savepoints.cli.resolve import open_run, refuse_point_folder
from savepoints.preemption import DEFAULT_DEADLINE, Preemption
from savepoints.report import LiveReport, write_report
from savepoints.writer import finish_saves_in_flight


@click.command("train")
@click.argument("data", type=click.Path(path_type=Path))
@click.option(
    "--run",
    "run",
    type=click.Path(path_type=Path),
    required=True,
    help="Run folder for the save points (resumes if it has some).",
)
@click.option(
    "--eval",
    "eval_file",
    type=click.Path(path_type=Path),
    help="Evaluation file; without it --eval-fraction of DATA is held out.",
)
@click.option("--eval-fraction", type=float, default=0.1, show_default=True)
@click.option("--text-column", default="text", show_default=True)
@click.option("--label-column", default="label", show_default=True)
@click.option("--model", help="Model id or local folder (default: a small GPT-2 built here).")
@click.option("--epochs", type=float, default=3.0, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option(
    "--lr",
    "learning_rate",
    type=float,
    default=None,
    help="Learning rate (default 5e-5 for --model, 1e-3 for the built-in model).",
)
@click.option("--max-length", type=int, default=128, show_default=True)
@click.option("--gradient-accumulation", type=int, default=1, show_default=True)
@click.option("--save-every", type=int, help="Save every N steps (default: every epoch).")
@click.option("--keep-last", type=int, help="Keep only the last N save points (plus the best).")
@click.option("--keep-best", type=int, help="Keep the N best save points (the best always stays).")
@click.option(
    "--metric",
    type=click.Choice(["accuracy", "macro_f1"]),
    default="accuracy",
    show_default=True,
    help="Metric that picks the best save point.",
)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--max-train-examples", type=int)
@click.option("--max-eval-examples", type=int)
@click.option(
    "--remote",
    help="Push every save point to this URL too (s3://bucket/prefix, gs://, az://, "
    "file://); an empty --run folder resumes from it. Credentials: the usual AWS_* "
    "(or GOOGLE_*, AZURE_*) variables.",
)
@click.option(
    "--preemption-deadline",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_DEADLINE,
    show_default=True,
    help="Seconds after SIGTERM/SIGUSR1 within which the emergency save point must be "
    "committed (set it below your scheduler's grace period).",
)
@click.option(
    "--report-every-save",
    is_flag=True,
    help="Rewrite RUN/report.html after every save point (a page that reloads itself); "
    "the report is written at the end of training either way.",
)
def train_cmd(
    data: Path, run: Path, remote: str | None, preemption_deadline: float,
    report_every_save: bool, **options: Any,
) -> None:  # fmt: skip
    """Fine-tune a text classifier on DATA (CSV or JSONL of text and label) with save points.

    Run the same command again after any interruption (Ctrl-C, SIGTERM, SIGKILL): it
    resumes from the last committed save point. On SIGTERM or SIGUSR1 (a scheduler
    preempting the job) it first takes an emergency save point at the end of the current
    step and exits with code 75.
    """
    need_transformers("train")
    from savepoints.integrations.finetune import FinetuneConfig, finetune

    refuse_point_folder(run)

    if options["learning_rate"] is None:
        options["learning_rate"] = 5e-5 if options["model"] else 1e-3
    for name in ("eval_file",):
        if options[name] is not None:
            options[name] = str(options[name])
    cfg = FinetuneConfig(train_file=str(data), run=str(run), **options)
    # SIGTERM / SIGUSR1 (a scheduler preempting the job): an emergency save point at the
    # end of the current step, then exit code 75. Ctrl-C stops at once: a save in flight
    # is abandoned and its staging removed; committed save points are untouched.
    # Under torchrun / accelerate launch every rank runs this; rank 0 alone talks.
    main = os.environ.get("RANK", "0") == "0"
    live = LiveReport(run) if main and report_every_save else None

    def on_commit(step: int) -> None:
        committed(step)
        if live is not None:
            live(step)

    try:
        try:
            points = finetune(
                cfg,
                on_event=event if main else lambda _: None,
                callbacks=[_progress_callback()] if main else [],
                preemption=Preemption(deadline=preemption_deadline),
                remote=remote,
                on_commit=on_commit if main else None,
            )
            points.close()  # with a remote: returns once every save point is there
        except KeyboardInterrupt:
            finish_saves_in_flight()  # the save being written commits first (seconds at most)
            latest = open_run(run).latest() if run.is_dir() else None
            where = f"step {latest.step}" if latest else "the start (nothing was committed yet)"
            console.print(
                f"\n[yellow]Interrupted.[/] Committed save points are intact; run the same "
                f"command again to resume from {where}."
            )
            sys.exit(130)
    except BaseException:
        if live is not None:  # interrupted, preempted, failed: the page stops reloading
            live.close(settle=True)
        raise
    if live is not None:
        live.close()
    if main:
        console.print()
        print_points_table(run)
        try:
            with progress_bar() as tell:
                page = write_report(run, progress=tell)
        except Exception as e:  # the training succeeded: a report that fails is only said
            console.print(f"[yellow]warning:[/] could not write the report: {esc(str(e))}; "
                          f"`savepoints report {esc(str(run))}` tries again.")  # fmt: skip
        else:
            wrote(page, "report (curves, save points, storage, layers)")
    _leave_together()


def _leave_together() -> None:
    """Under torchrun, the ranks leave together, then close their process group: rank 0
    may still be writing the report, and a rank that exits while another still uses the
    group can abort in gloo's teardown ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _progress_callback() -> Any:
    """A rich progress bar for the Trainer, and one line per evaluation and save point."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from transformers import TrainerCallback

    class RichProgress(TrainerCallback):
        progress: Progress | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.progress = Progress(
                TextColumn("[bold]training[/]"), BarColumn(), MofNCompleteColumn(),
                TextColumn("steps · epoch {task.fields[epoch]:.2f} · loss {task.fields[loss]}"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
            )  # fmt: skip
            self.progress.start()
            self.task = self.progress.add_task(
                "train", total=state.max_steps, completed=state.global_step, epoch=state.epoch or 0,
                loss="—",
            )  # fmt: skip

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.progress is not None:
                self.progress.update(self.task, completed=state.global_step, epoch=state.epoch)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if self.progress is not None and logs and "loss" in logs:
                self.progress.update(self.task, loss=f"{logs['loss']:.4f}")

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None,
                        **kw: Any) -> None:  # fmt: skip
            shown = "  ".join(
                f"{k.removeprefix('eval_')} {v:.4f}" for k, v in (metrics or {}).items()
                if isinstance(v, float) and not k.endswith(("runtime", "per_second", "epoch"))
            )  # fmt: skip
            console.print(f"  step {state.global_step:>6}  epoch {state.epoch:5.2f}  {shown}")

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.progress is not None:
                self.progress.stop()

    return RichProgress()


def committed(step: int) -> None:
    """Said once a save point is committed (saves are written in the background)."""
    console.print(f"  [green]✓[/] save point committed at step {step}")
