"""``savepoints export`` and ``savepoints import``."""

from __future__ import annotations

from pathlib import Path

import click

from savepoints import InvalidArgumentError, SavePoint
from savepoints.cli.inspect import print_points_table
from savepoints.cli.output import console, done, esc, spinner
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
    type=click.Choice(["hf", "hf-trainer", "onnx"]),
    default="hf",
    show_default=True,
    help="hf: a deployment bundle; hf-trainer: a folder plain Trainer resumes from; onnx: "
    "a sequence classifier for ONNX Runtime (checked against PyTorch).",
)
@click.option(
    "--quantize",
    type=click.Choice(["int8"]),
    help="With --format onnx: int8 weights (ONNX Runtime dynamic quantization).",
)
@click.option(
    "--check-texts",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="With --format onnx: texts (one per line) the parity check classifies "
    "(default: a built-in set).",
)
def export_cmd(target: Path, out: Path, step: str | None, latest: bool, dtype: str | None,
               fmt: str, quantize: str | None, check_texts: Path | None) -> None:  # fmt: skip
    """Export the best save point of TARGET (a run; or --step/--latest), or a save point
    FOLDER, to the new folder OUT."""
    if fmt != "onnx" and (quantize or check_texts):
        raise InvalidArgumentError(
            "--quantize and --check-texts go with --format onnx.", "Add --format onnx."
        )
    point = resolve_best_or_latest(target, step, latest)
    if fmt == "onnx":
        _export_onnx(point, out, dtype, quantize, check_texts)
        return
    from savepoints.export import export

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


def _export_onnx(point: SavePoint, out: Path, dtype: str | None, quantize: str | None,
                 check_texts: Path | None) -> None:  # fmt: skip
    from savepoints.cli.predict import need_transformers, read_texts
    from savepoints.interop.onnx import export_onnx

    if dtype is not None:
        raise InvalidArgumentError(
            "--dtype does not apply to --format onnx (the graph is fp32).",
            "Leave --dtype out; --quantize int8 makes it smaller.",
        )
    need_transformers("export --format onnx")
    texts = read_texts((), check_texts) if check_texts else None
    with spinner("exporting to ONNX and checking it against PyTorch"):
        parity = export_onnx(point, out, quantize=quantize, texts=texts)  # type: ignore[arg-type]
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    done(f"exported step {point.step} ({point.path}) to {out} as ONNX "
         f"{quantize or 'fp32'}: {size / 1e6:.1f} MB")  # fmt: skip
    if parity.tolerance is not None:
        said = f"max |Δ logit| {parity.max_abs_diff:.2g} (limit {parity.tolerance:g})"
    else:
        said = (f"labels agree on {parity.agreement:.0%} (at least {parity.min_agreement:.0%}), "
                f"max |Δ logit| {parity.max_abs_diff:.2g}")  # fmt: skip
    console.print(f"  parity with PyTorch on {parity.texts} texts: {said}")


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
