"""``savepoints predict``: classify texts with a save point (PyTorch and Transformers) or
with an ONNX bundle (ONNX Runtime and ``tokenizers`` only: this module imports neither
torch nor transformers at the top, and the bundle path never does)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from savepoints.cli.output import console, echo_json_lines, esc, json_option
from savepoints.errors import InvalidArgumentError, MissingDependencyError
from savepoints.interop.onnx_bundle import OnnxBundle, is_bundle
from savepoints.textfile import non_blank_lines

BATCH = 32


def need_transformers(command: str) -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            f"`savepoints {command}`", "transformers", "transformers"
        ) from None


def read_texts(texts: tuple[str, ...], file: Path | None) -> list[str]:
    """The texts to classify: the arguments, then the lines of ``file``; else stdin."""
    out = list(texts)
    if file is not None:
        out += non_blank_lines(file.read_bytes(), file)
    if not out and not sys.stdin.isatty():
        out = non_blank_lines(sys.stdin.buffer.read(), Path("<stdin>"))
    if not out:
        raise InvalidArgumentError(
            "No texts to classify.",
            "Pass texts as arguments, a file with --file (one per line), or lines on stdin.",
        )
    return out


def load_classifier(path: Path, step: int) -> tuple[Any, Any]:
    """The model and tokenizer of a save point, or a clear error when it holds none that
    Transformers can load as a text classifier."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InvalidArgumentError(
            f"Save point step {step} ({path}) cannot be loaded as a text classifier: {why}",
            "predict needs a save point of a Transformers ...ForSequenceClassification model "
            "with its tokenizer, such as `savepoints train` writes.",
        ) from None
    return model, tokenizer


@click.command("predict")
@click.argument("target", type=click.Path(path_type=Path))
@click.argument("texts", nargs=-1)
@click.option(
    "--file",
    "file",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="Read texts from this file, one per line.",
)
@click.option("--step", help="Use this save point: a step, a tag, 'latest' or 'best'.")
@click.option("--latest", is_flag=True, help="Use the latest save point instead of the best.")
@click.option("--no-verify", is_flag=True, help="Skip re-hashing the save point first.")
@click.option("--key", "keys", multiple=True, type=click.Path(path_type=Path),
              help="Refuse the model unless it is signed (savepoints sign) by this public "
              "key (PEM); repeat for several trusted signers.")  # fmt: skip
@json_option("One JSON object per line, one line per text.")
def predict_cmd(
    target: Path,
    texts: tuple[str, ...],
    file: Path | None,
    step: str | None,
    latest: bool,
    no_verify: bool,
    keys: tuple[Path, ...],
    as_json: bool,
) -> None:
    """Classify texts with the best save point of TARGET (a run), a save point FOLDER, or
    an ONNX bundle (from `export --format onnx`: runs with ONNX Runtime, without torch)."""
    if is_bundle(target):
        if step is not None or latest:
            raise InvalidArgumentError(
                f"{target} is an ONNX bundle: it holds one model, so --step and --latest do "
                "not apply.",
                "Drop them, or point predict at the run the bundle was exported from.",
            )
        rows = _predict_onnx(target, read_texts(texts, file), no_verify, keys, as_json)
    else:
        rows = _predict_torch(target, texts, file, step, latest, no_verify, keys, as_json)
    if as_json:
        echo_json_lines(rows)
        return
    for r in rows:
        label, text = esc(f"{r['label']:>12}"), esc(r["text"])
        console.print(f"[bold]{label}[/] {r['probability']:6.1%}  {text}")


def require_signed(folder: Path, keys: tuple[Path, ...], as_json: bool) -> None:
    """With --key: refuse ``folder`` unless one of ``keys`` signed exactly its files."""
    if not keys:
        return
    from savepoints.interop.signing import check_trusted

    sig = check_trusted(folder, keys)
    if not as_json:
        console.print(f"[dim]signed by {esc(str(sig.key))} (key {sig.key_id[:16]}), "
                      f"{sig.files_covered} files[/]")  # fmt: skip


def _predict_onnx(
    target: Path, inputs: list[str], no_verify: bool, keys: tuple[Path, ...], as_json: bool
) -> list[dict[str, Any]]:
    bundle = OnnxBundle(target)
    if not no_verify:
        bundle.raise_if_altered()
    require_signed(target, keys, as_json)
    if not as_json:
        src = bundle.source
        precision = bundle.quantize or "fp32"
        origin = f", exported from step {src['step']}" if "step" in src else ""
        console.print(f"[dim]ONNX bundle {esc(str(target))} ({precision}{origin})[/]")
    return [p.as_dict() for p in bundle.classify(inputs, BATCH)]


def _predict_torch(
    target: Path,
    texts: tuple[str, ...],
    file: Path | None,
    step: str | None,
    latest: bool,
    no_verify: bool,
    keys: tuple[Path, ...],
    as_json: bool,
) -> list[dict[str, Any]]:
    need_transformers("predict")
    import torch
    from transformers.utils import logging as hf_logging

    from savepoints.cli.resolve import resolve_best_or_latest
    from savepoints.compact import require_plain

    hf_logging.disable_progress_bar()
    point = resolve_best_or_latest(target, step, latest)
    require_plain(point.path, point.manifest, "predict")
    inputs = read_texts(texts, file)
    if not no_verify:
        point.verify().raise_if_failed()
    require_signed(point.path, keys, as_json)
    model, tokenizer = load_classifier(point.path, point.step)
    if not as_json:
        metrics = ", ".join(
            f"{k} {v:.4g}" for k, v in point.metrics.items() if k.startswith("eval_")
        )
        suffix = f"; {metrics}" if metrics else ""
        console.print(f"[dim]save point step {point.step} ({esc(str(point.path))}){suffix}[/]")
    results = []
    with torch.no_grad():
        for start in range(0, len(inputs), BATCH):
            batch = inputs[start : start + BATCH]
            enc = tokenizer(
                batch, padding=True, truncation=True, max_length=512, return_tensors="pt"
            )
            probs = model(**enc).logits.softmax(-1)
            for text, p in zip(batch, probs):
                i = int(p.argmax())
                results.append(
                    {
                        "text": text,
                        "label": model.config.id2label[i],
                        "probability": round(float(p[i]), 4),
                    }
                )
    return results
