"""``savepoints demo``: the whole story in under a minute, on a tiny model.

A small GPT-2 sequence classifier (built from a config, no download) and a byte-level
BPE tokenizer are trained on a tiny tweet-like sample written for this demo. Training
runs in a child process that saves a save point per epoch and is killed on purpose
(SIGKILL) in the middle of training; the demo then resumes from the last committed
save point, finishes, loads the best save point with plain ``from_pretrained`` and
predicts, and shows verification catching a flipped bit.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.panel import Panel

from savepoints import Keep, SavePoints, verify
from savepoints.cli import cli
from savepoints.cli.inspect import list_cmd
from savepoints.errors import InvalidArgumentError

console = Console(highlight=False)

LABELS = ["negative", "neutral", "positive"]
_POS = ["love", "adore", "really enjoy", "can't stop smiling about", "am so happy with"]
_NEG = ["hate", "can't stand", "am so angry about", "am really disappointed by", "regret buying"]
_NEU = ["just saw", "am reading about", "was told about", "noticed", "walked past"]
_THINGS = [
    "the new phone",
    "this coffee",
    "my team's game",
    "the update",
    "the weather today",
    "this concert",
    "the train",
    "the movie",
    "our new office",
    "the pizza here",
]
_ENDS = ["!", " #monday", " lol", ".", " @user", " today"]
MARKER = "demo-run"


def demo_data(seed: int = 0) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """A tiny tweet-like sample, written for this demo (train, eval)."""
    rng = random.Random(seed)
    rows = []
    for label, verbs in ((0, _NEG), (1, _NEU), (2, _POS)):
        for verb in verbs:
            for thing in _THINGS:
                rows.append((f"I {verb} {thing}{rng.choice(_ENDS)}", label))
    rng.shuffle(rows)
    return rows[:120], rows[120:]


def _build(workdir: Path) -> tuple[Any, Any]:
    """A tiny GPT-2 classifier and a BPE tokenizer trained on the demo texts."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

    tok_dir = workdir / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        train, _ = demo_data()
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        bpe.train_from_iterator(
            [t for t, _ in train],
            trainers.BpeTrainer(
                vocab_size=400,
                special_tokens=["<|endoftext|>"],
                show_progress=False,
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            ),
        )
        PreTrainedTokenizerFast(
            tokenizer_object=bpe,
            eos_token="<|endoftext|>",
            bos_token="<|endoftext|>",
            pad_token="<|endoftext|>",
        ).save_pretrained(tok_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    torch.manual_seed(0)
    options: dict[str, Any] = dict(
        n_layer=2,
        n_head=2,
        n_embd=64,
        n_positions=64,
        vocab_size=len(tokenizer),
        num_labels=3,
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = GPT2Config(**options)
    return GPT2ForSequenceClassification(config), tokenizer


def _train(
    run: Path,
    workdir: Path,
    epochs: int,
    on_epoch: Callable[[dict[str, Any]], None],
    on_resume: Callable[[str], None] = lambda msg: None,
) -> None:
    """Train with a save point per epoch; resume from the latest one if there is one."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    model, tokenizer = _build(workdir)
    train, evaluation = demo_data()
    batch_size = 8
    steps_per_epoch = len(train) // batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    scheduler = get_linear_schedule_with_warmup(optimizer, 10, epochs * steps_per_epoch)

    def encode(rows: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        enc = tokenizer([t for t, _ in rows], padding=True, return_tensors="pt")
        enc["labels"] = torch.tensor([y for _, y in rows])
        return dict(enc)

    keep = Keep(last=2, best=1, metric="eval_loss", mode="min")
    with SavePoints(run, keep=keep) as points:
        epoch = 0
        latest = points.latest()
        if latest is not None:
            state = points.restore(latest, model=model, optimizer=optimizer, scheduler=scheduler)
            epoch = state["epoch"]
            on_resume(
                f"restored step {latest.step} (epoch {epoch}): weights, AdamW state, "
                "warmup schedule and RNG"
            )
        while epoch < epochs:
            model.train()
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(epoch))
            for b in range(steps_per_epoch):
                batch = encode([train[i] for i in order[b * batch_size : (b + 1) * batch_size]])
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            epoch += 1
            model.eval()
            with torch.no_grad():
                out = model(**encode(evaluation))
            accuracy = (
                (out.logits.argmax(-1) == torch.tensor([y for _, y in evaluation]))
                .float()
                .mean()
                .item()
            )
            step = epoch * steps_per_epoch
            points.save(
                step,
                model=model,
                tokenizer=tokenizer,
                optimizer=optimizer,
                scheduler=scheduler,
                metrics={"eval_loss": round(out.loss.item(), 4), "accuracy": round(accuracy, 4)},
                state={"epoch": epoch},
            )
            on_epoch(
                {"epoch": epoch, "step": step, "eval_loss": out.loss.item(), "accuracy": accuracy}
            )


@cli.command("demo")
@click.option(
    "--run",
    "run",
    type=click.Path(path_type=Path),
    default=Path("savepoints-demo"),
    show_default=True,
    help="Run folder the demo writes (replaced if it is an earlier demo run).",
)
@click.option("--epochs", type=click.IntRange(2, 50), default=4, show_default=True)
def demo_cmd(run: Path, epochs: int) -> None:
    """Train a tiny GPT-2 classifier with save points, kill it, resume, predict."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise InvalidArgumentError(
            "The demo needs transformers and tokenizers, which are not installed.",
            "pip install 'savepoints[transformers]'",
        ) from None
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


def _narrate(run: Path, workdir: Path, epochs: int) -> None:
    console.print(
        Panel.fit(
            "savepoints demo: a tiny GPT-2 sequence classifier on tweet-like texts.\n"
            f"Save points go to [bold]{run}[/], one per epoch, keeping the last 2 and the "
            "best by eval_loss.",
            border_style="cyan",
        )
    )
    _step(1, f"Training in a child process ({epochs} epochs); it will be killed after epoch 2.")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    _build(workdir)  # trains the tokenizer once, before the child needs it
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from savepoints.cli.demo import _child; _child()",
            str(run),
            str(workdir),
            str(epochs),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert child.stdout is not None
    for line in child.stdout:
        if not line.startswith(_ROW):
            continue  # anything else a library printed
        row = json.loads(line[len(_ROW) :])
        _print_epoch(row)
        if row["epoch"] == 2:
            break
    child.send_signal(signal.SIGKILL)  # mid-way through epoch 3, maybe mid-save
    child.wait()
    console.print(
        f"  [red]✗ killed[/] the training process with SIGKILL (exit {child.returncode})."
    )

    _step(2, "What survived: only committed save points are visible.")
    with SavePoints(run, readonly=True) as points:
        survivors = points.list()
    console.print(
        f"  latest() = step {survivors[-1].step}; every listed save point verifies: "
        f"{all(p.verify().ok for p in survivors)}"
    )

    _step(3, "Running the same training again resumes exactly where it stopped.")
    _train(
        run,
        workdir,
        epochs,
        on_epoch=_print_epoch,
        on_resume=lambda msg: console.print(f"  [green]✓[/] {msg}"),
    )

    straight = workdir / "uninterrupted"
    _train(straight, workdir, epochs, on_epoch=lambda row: None)
    with SavePoints(run, readonly=True) as a, SavePoints(straight, readonly=True) as b:
        same = _same_files(a.list()[-1].path, b.list()[-1].path, "model.safetensors")
    console.print(
        f"  an uninterrupted run of the same training ends with bit-identical weights: "
        f"[bold]{same}[/]"
    )

    _step(4, f"The save points (`savepoints list {run}`):")
    list_cmd.callback(run=run, metric=None, as_json=False)  # type: ignore[misc]

    _step(5, "Load the best one with plain Transformers and predict.")
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    with SavePoints(run, readonly=True) as points:
        best = points.best()
    assert best is not None
    console.print(f"  AutoModelForSequenceClassification.from_pretrained('{best.path}')")
    model = AutoModelForSequenceClassification.from_pretrained(best.path).eval()
    tokenizer = AutoTokenizer.from_pretrained(best.path)
    texts = ["I love the new phone!", "I hate the train today", "I just saw the movie."]
    with torch.no_grad():
        probs = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
    for text, p in zip(texts, probs):
        i = int(p.argmax())
        console.print(f"  {text!r:32} → [bold]{model.config.id2label[i]}[/] ({p[i]:.0%})")

    _step(6, "Verification catches a single flipped bit.")
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

    console.print(
        Panel.fit(
            f"Done. Look around: [bold]savepoints list {run}[/], "
            f"[bold]savepoints show {run} best[/], [bold]savepoints verify {run}[/]",
            border_style="green",
        )
    )


def _same_files(a: Path, b: Path, name: str) -> bool:
    return (a / name).read_bytes() == (b / name).read_bytes()


def _print_epoch(row: dict[str, Any]) -> None:
    console.print(
        f"  epoch {row['epoch']}: save point at step {row['step']}, eval_loss "
        f"{row['eval_loss']:.4f}, accuracy {row['accuracy']:.2%}"
    )


_ROW = "@savepoints-demo "


def _child() -> None:
    """The training child process: reports each epoch as one marked JSON line."""
    _train(
        Path(sys.argv[1]),
        Path(sys.argv[2]),
        int(sys.argv[3]),
        on_epoch=lambda row: print(_ROW + json.dumps(row), flush=True),
    )
