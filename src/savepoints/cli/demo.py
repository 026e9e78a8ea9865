"""``savepoints demo``: the whole story in about a minute, on a tiny model.

It fine-tunes the default small GPT-2 classifier (built from a config, no download) on a
tweet-like sample that ships with the package, exactly as ``savepoints train`` does: a
save point per epoch. The training runs in a child process that is killed on purpose
(SIGKILL) after its second save point; the demo then runs the same training again, which
resumes from the last committed save point, checks that the result is bit-identical to an
uninterrupted run, loads the best save point with plain ``from_pretrained`` and predicts,
and shows verification catching a flipped bit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import click
from rich.panel import Panel

from savepoints import InvalidArgumentError, SavePoints, verify
from savepoints.cli.output import console, esc, quiet
from savepoints.cli.predict import need_transformers
from savepoints.cli.train import train_cmd

MARKER = "demo-run"
SAMPLE = "data/demo_tweets.csv"
TEXTS = [
    "absolutely loved the concert, best night ever!",
    "so disappointed with my flight, awful service",
    "checking the opening hours of the museum",
]


def sample_path() -> Path:
    """The demo's tweet-like sample (written for savepoints), shipped in the package."""
    return Path(str(resources.files("savepoints") / SAMPLE))


def train_options(run: Path, epochs: int) -> list[str]:
    return [
        str(sample_path()), "--run", str(run), "--epochs", str(epochs), "--eval-fraction",
        "0.2", "--batch-size", "8", "--max-length", "48", "--lr", "1e-3", "--seed", "7",
    ]  # fmt: skip


@click.command("demo")
@click.option(
    "--run",
    "run",
    type=click.Path(path_type=Path),
    default=Path("savepoints-demo"),
    show_default=True,
    help="Run folder the demo writes (replaced if it is an earlier demo run).",
)
@click.option("--epochs", type=click.IntRange(3, 30), default=6, show_default=True)
def demo_cmd(run: Path, epochs: int) -> None:
    """Fine-tune a tiny GPT-2 on tweet-like texts with save points, kill it, resume, predict."""
    need_transformers("demo")
    _prepare_run_dir(run)
    workdir = Path(tempfile.mkdtemp(prefix="savepoints-demo-"))
    try:
        _narrate(run, workdir, epochs)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _prepare_run_dir(run: Path) -> None:
    if run.exists():
        if not (run / ".savepoints" / MARKER).exists():
            raise InvalidArgumentError(
                f"{run} already exists and is not an earlier demo run; the demo will not touch it.",
                "Pass --run with a new folder name.",
            )
        shutil.rmtree(run)
    (run / ".savepoints").mkdir(parents=True)
    (run / ".savepoints" / MARKER).write_text("written by `savepoints demo`; safe to delete\n")


def _step(n: int, text: str) -> None:
    console.print(f"\n[bold cyan]{n}.[/] [bold]{text}[/]")


def _train_in_process(run: Path, epochs: int, silent: bool = False) -> None:
    """Exactly `savepoints train ...`, in this process."""
    with quiet() if silent else contextlib.nullcontext():
        train_cmd.main(args=train_options(run, epochs), standalone_mode=False)


def _narrate(run: Path, workdir: Path, epochs: int) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    console.print(Panel.fit(
        "savepoints demo: fine-tune a small GPT-2 classifier on tweet-like texts\n"
        f"({sample_path().name}, shipped with savepoints), one save point per epoch, in "
        f"[bold]{run}[/].",
        border_style="cyan",
    ))  # fmt: skip

    cmd = ["savepoints", "train", *train_options(run, epochs)]
    _step(1, "Training in a child process; it gets SIGKILLed after its second save point:")
    console.print(f"  [dim]$ {' '.join(cmd)}[/]")
    child = subprocess.Popen(
        [sys.executable, "-m", "savepoints", *cmd[1:]], stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )  # fmt: skip
    assert child.stdout is not None
    commits = 0
    for line in child.stdout:
        if line.strip().startswith("step") or "save point committed" in line:
            console.print(f"  {line.strip()}")
        if "save point committed" in line:
            commits += 1
            if commits == 2:
                break
    child.send_signal(signal.SIGKILL)  # in the middle of epoch 3, maybe mid-save
    child.wait()
    console.print(
        f"  [red]✗ killed[/] the training process with SIGKILL (exit {child.returncode})."
    )

    _step(2, "What survived: only committed save points are visible, and they verify.")
    with SavePoints(run, readonly=True) as points:
        survivors = points.list()
    console.print(
        f"  {len(survivors)} save points, latest() = step {survivors[-1].step}; "
        f"all verify: {all(p.verify().ok for p in survivors)}"
    )

    _step(3, "Running the same command again resumes where it stopped:")
    console.print(f"  [dim]$ {' '.join(cmd)}[/]")
    _train_in_process(run, epochs)
    straight = workdir / "uninterrupted"
    _train_in_process(straight, epochs, silent=True)
    with SavePoints(run, readonly=True) as a, SavePoints(straight, readonly=True) as b:
        same = (a.list()[-1].path / "model.safetensors").read_bytes() == (
            b.list()[-1].path / "model.safetensors"
        ).read_bytes()
    console.print(
        "  an uninterrupted run of the same training ends with bit-identical weights: "
        f"[bold]{same}[/]"
    )

    _step(
        4,
        f"Load the best one with plain Transformers and predict (`savepoints predict {run} ...`):",
    )
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    with SavePoints(run, readonly=True) as points:
        best = points.best()
    assert best is not None
    console.print(f"  AutoModelForSequenceClassification.from_pretrained('{best.path}')")
    model: Any = AutoModelForSequenceClassification.from_pretrained(best.path).eval()
    tokenizer = AutoTokenizer.from_pretrained(best.path)
    with torch.no_grad():
        probs = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits.softmax(-1)
    for text, p in zip(TEXTS, probs):
        i = int(p.argmax())
        label = esc(f"{model.config.id2label[i]:>9}")
        console.print(f"  [bold]{label}[/] {float(p[i]):5.0%}  {text}")

    _step(5, "Verification catches a single flipped bit.")
    copy = workdir / "tampered"
    shutil.copytree(best.path, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    report = verify(copy)
    for problem in report.problems:
        console.print(f"  [red]{problem.kind}[/] {problem.path}: {problem.detail}")
    console.print(
        f"  verify(original) ok: {verify(best.path).ok}; verify(tampered copy) ok: {report.ok}"
    )

    page = run / "report.html"
    console.print(Panel.fit(
        f"Done. See the run at a glance: open [bold]{page}[/] in a browser (curves with "
        "every save point,\nthe resume after the kill, storage, what changed layer by "
        f"layer). Look around: [bold]savepoints list {run}[/], "
        f"[bold]savepoints show {run} best[/], [bold]savepoints verify {run}[/],\n"
        f"[bold]savepoints predict {run} \"some text\"[/], "
        f"[bold]savepoints export {run} my-model[/]",
        border_style="green",
    ))  # fmt: skip
