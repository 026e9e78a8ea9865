"""Argument checks shared by every way into a save: ``SavePoints.save``, the Trainer
callback, ``savepoints import``. Each returns the cleaned value or raises an
:class:`~savepoints.errors.InvalidArgumentError` that names the argument, before any I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from savepoints.errors import InvalidArgumentError
from savepoints.layout import MANIFEST_NAME
from savepoints.manifest import is_safe_relpath

#: Names a save point uses for its own components: not available to ``extra=``.
RESERVED_NAMES = {"model", "tokenizer", "optimizer", "scheduler", "rng"}


def check_step(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, int):
        raise InvalidArgumentError(
            f"step must be a whole number, not {step!r} ({type(step).__name__}).",
            "Pass the global training step, e.g. save(step=global_step, ...).",
        )
    if step < 0:
        raise InvalidArgumentError(
            f"step must be 0 or more, not {step}.",
            "Pass the global training step (counting from 0).",
        )
    return step


def _number(name: object, value: object, hint: str) -> float:
    """A metric's value as a Python number (a one-element tensor or numpy scalar too)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if hasattr(value, "item") and not isinstance(value, (int, float)):
        value = value.item()
    if not isinstance(name, str) or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentError(f"metric {name!r} = {value!r} is not a number.", hint)
    return value


def check_logged(values: Mapping[str, float]) -> dict[str, float]:
    """Values for ``SavePoints.log``: numbers. NaN and infinities are accepted (logging a
    loss that diverged must not stop training); the journal writes them as null."""
    hint = "Pass numbers, e.g. points.log(step, loss=0.41, learning_rate=3e-5)."
    return {name: _number(name, value, hint) for name, value in values.items()}


def check_metrics(metrics: Mapping[str, float] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, value in (metrics or {}).items():
        value = _number(name, value, "Pass metrics as {name: number}, e.g. {'eval_loss': 0.41}.")
        if value != value or value in (float("inf"), float("-inf")):
            raise InvalidArgumentError(
                f"metric {name!r} is {value}, which cannot rank save points.",
                "Record a finite value, or leave the metric out of this save.",
            )
        out[name] = value
    return out


def check_tags(tags: Sequence[str]) -> tuple[str, ...]:
    if isinstance(tags, str):
        tags = [tags]
    out: list[str] = []
    for tag in tags:
        if (
            not isinstance(tag, str)
            or not re.fullmatch(r"[\w.@+-]+", tag)
            or tag.isdigit()
            or tag in ("latest", "best")
        ):
            raise InvalidArgumentError(
                f"tag {tag!r} is not allowed.",
                "Use letters, digits, '.', '_', '-', '+' or '@' (not only digits, not "
                "'latest' or 'best'), e.g. 'warmup-done' or 'release-1'.",
            )
        if tag not in out:
            out.append(tag)
    return tuple(out)


def check_extra(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    out = dict(extra or {})
    for name, obj in out.items():
        if (
            not isinstance(name, str)
            or not re.fullmatch(r"[A-Za-z0-9_.-]+", name)
            or (name in RESERVED_NAMES)
        ):
            raise InvalidArgumentError(
                f"extra name {name!r} is not allowed.",
                "Use letters, digits, '_', '-' or '.', and none of "
                + ", ".join(sorted(RESERVED_NAMES)),
            )
        if not callable(getattr(obj, "state_dict", None)):
            raise InvalidArgumentError(
                f"extra[{name!r}] is a {type(obj).__name__}, which has no state_dict().",
                "Pass objects with state_dict()/load_state_dict(), or put plain values in state=.",
            )
    return out


def check_files(files: Mapping[str, bytes | str] | None) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for rel, data in (files or {}).items():
        if not isinstance(rel, str) or not is_safe_relpath(rel) or rel == MANIFEST_NAME:
            raise InvalidArgumentError(
                f"files={{{rel!r}: ...}}: the name must be a relative path inside the save point.",
                "Use a plain relative name such as 'trainer_state.json'.",
            )
        out[rel] = data.encode() if isinstance(data, str) else bytes(data)
    return out


def check_model(model: object) -> torch.nn.Module | None:
    if model is not None and not isinstance(model, torch.nn.Module):
        raise InvalidArgumentError(
            f"model must be a torch.nn.Module, not {type(model).__name__}.",
            "Pass the model object itself (e.g. trainer.model).",
        )
    return model
