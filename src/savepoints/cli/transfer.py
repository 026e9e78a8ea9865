"""``savepoints export`` and ``savepoints import``."""

from __future__ import annotations

from pathlib import Path

import click

from savepoints.cli.inspect import print_points_table
from savepoints.cli.output import console, done, esc
from savepoints.cli.resolve import open_run, resolve_best_or_latest


@click.command("export")
@click.argument("target", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--step", help="Export this save point: a step, a tag, 'latest' or 'best'.")
@click.option("--latest", is_flag=True, help="Export the latest save point instead of the best.")
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "fp16", "bf16"]),
    help="Cast floating-point weights (format hf only).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["hf", "hf-trainer"]),
    default="hf",
    show_default=True,
    help="hf: a deployment bundle; hf-trainer: a folder plain Trainer resumes from.",
)
def export_cmd(target: Path, out: Path, step: str | None, latest: bool, dtype: str | None,
               fmt: str) -> None:  # fmt: skip
    """Export the best save point of TARGET (a run; or --step/--latest), or a save point
    FOLDER, to the new folder OUT."""
    from savepoints.export import export

    point = resolve_best_or_latest(target, step, latest)
    export(point, out, fmt=fmt, dtype=dtype)  # type: ignore[arg-type]
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    done(
        f"exported step {point.step} ({point.path}) to {out} "
        f"as {fmt}{f', {dtype}' if dtype else ''}: {size / 1e6:.1f} MB"
    )
    if fmt == "hf":
        console.print(f'  load it: pipeline("text-classification", model="{esc(str(out))}")')
    else:
        console.print(f'  resume it: trainer.train(resume_from_checkpoint="{esc(str(out))}")')


@click.command("import")
@click.argument("source", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace save points of the same steps.")
def import_cmd(source: Path, run: Path, overwrite: bool) -> None:
    """Adopt Hugging Face Trainer checkpoint-N folders in SOURCE (or a save_pretrained
    folder) as save points of RUN, converting their pickled states."""
    from savepoints.hf_import import find_checkpoints, import_hf

    find_checkpoints(source)  # a clear error before the run folder is created
    with open_run(run, write=True) as points:
        imported = import_hf(
            source, points, overwrite=overwrite, on_event=lambda msg: done(msg, indent=2)
        )
    console.print(f"Imported {len(imported)} save point(s) into {esc(str(run))}.\n")
    print_points_table(run)
