"""Adopt Hugging Face Trainer ``checkpoint-N`` folders (and ``save_pretrained`` folders).

Model files, config, tokenizer and ``trainer_state.json`` are copied; optimizer,
scheduler, grad scaler and RNG states are converted from HF's ``torch.save`` files to the
pickle-free format. Those files are read only with ``torch.load(weights_only=True)``,
which refuses to construct arbitrary objects; ``training_args.bin`` (a pickled
``TrainingArguments``, which weights-only loading cannot read) is never opened.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from savepoints.errors import InvalidArgumentError
from savepoints.manager import SavePoint, SavePoints
from savepoints.manifest import ComponentInfo, Contents
from savepoints.serialize import encode_tree, read_json_object
from savepoints.staging import FileRecorder
from savepoints.training_state import rng_from_hf, write_rng, write_tree
from savepoints.validate import check_metrics
from savepoints.weights import WEIGHTS_INDEX_NAME, dedupe_aliases, write_weights
from savepoints.writer import WriteFn

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
NEVER_READ = {"training_args.bin"}
# HF's torch.save files and what they become here.
_STATE_FILES = {"optimizer.pt", "scheduler.pt"}
_WEIGHT_BINS = re.compile(r"^pytorch_model(-\d{5}-of-\d{5})?\.bin$")
_SKIP = re.compile(r"^(rng_state(_\d+)?\.pth|scaler\.pt|pytorch_model\.bin\.index\.json)$")


def find_checkpoints(source: Path) -> list[tuple[int, Path]]:
    """``checkpoint-N`` folders under ``source`` by step; or ``source`` itself when it is a
    plain model folder (``config.json`` and weights)."""
    if not source.is_dir():
        raise InvalidArgumentError(
            f"{source} is not a folder.",
            "Pass a Hugging Face Trainer output_dir (holding checkpoint-N folders) or a "
            "save_pretrained folder.",
        )
    found = []
    for entry in source.iterdir():
        m = _CHECKPOINT_RE.match(entry.name)
        if m and entry.is_dir():
            found.append((int(m.group(1)), entry))
    if found:
        return sorted(found)
    if (source / "config.json").is_file() and _has_weights(source):
        return [(_step_of(source), source)]
    raise InvalidArgumentError(
        f"{source} holds no checkpoint-N folders and is not a model folder "
        "(config.json plus model weights).",
        "Pass the Trainer's output_dir, one checkpoint-N folder, or a save_pretrained folder.",
    )


def _has_weights(folder: Path) -> bool:
    return any(
        (folder / n).is_file()
        for n in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                  "pytorch_model.bin.index.json")
    )  # fmt: skip


def _step_of(folder: Path) -> int:
    m = _CHECKPOINT_RE.match(folder.name)
    if m:
        return int(m.group(1))
    state = _trainer_state(folder)
    return int(state.get("global_step", 0)) if state else 0


def _trainer_state(folder: Path) -> dict[str, Any] | None:
    return read_json_object(folder / "trainer_state.json")


def _weights_only_load(path: Path) -> Any:
    """torch.load that builds tensors and plain containers only (no code runs), with the
    NumPy types that HF's RNG files hold allowed, as Trainer itself does."""
    np_core = getattr(np, "_core", None) or np.core
    allowed = [np_core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def _metrics_at(state: dict[str, Any] | None, step: int) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for entry in (state or {}).get("log_history", []):
        if not isinstance(entry, dict) or entry.get("step") != step:
            continue
        for k, v in entry.items():
            wanted = (k == "loss" or k.startswith("eval_")) and not k.endswith(
                ("_runtime", "_per_second")
            )
            if wanted and isinstance(v, (int, float)) and not isinstance(v, bool):
                metrics[k] = float(v)
    return check_metrics(metrics)


def _state_file(rec: FileRecorder, path: Path, name: str) -> ComponentInfo:
    skeleton, tensors = encode_tree(_weights_only_load(path), f"{name} state")
    return write_tree(rec, name, skeleton, tensors)


def _writer(folder: Path, max_shard: int) -> WriteFn:
    def write(rec: FileRecorder) -> Contents:
        contents: Contents = {}
        bins: list[Path] = []
        model_files: list[str] = []
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder).as_posix()
            if path.is_dir() or path.is_symlink() or rel.startswith(".savepoints"):
                continue
            name = path.name
            if name in NEVER_READ or _SKIP.match(name) or name in _STATE_FILES:
                continue
            if _WEIGHT_BINS.match(name):
                bins.append(path)
                continue
            rec.copy_file(rel, path)
            if name.endswith(".safetensors") or name == WEIGHTS_INDEX_NAME:
                model_files.append(rel)
        if bins:
            state: dict[str, torch.Tensor] = {}
            for b in bins:
                state.update(_weights_only_load(b))
            tensors, _ = dedupe_aliases(state)
            model_files = write_weights(rec, tensors, max_shard)
        if model_files:
            config = read_json_object(folder / "config.json")
            arch = (config.get("architectures") or ["?"])[0] if config else "?"
            contents["model"] = {
                "kind": "transformers" if config else "torch",
                "class": arch,
                "files": sorted(model_files, key=lambda f: not f.endswith(".json")),
            }
        if (folder / "optimizer.pt").is_file():
            contents["optimizer"] = _state_file(rec, folder / "optimizer.pt", "optimizer")
        if (folder / "scheduler.pt").is_file():
            contents["scheduler"] = _state_file(rec, folder / "scheduler.pt", "scheduler")
        if (folder / "rng_state.pth").is_file():
            hf_rng = _weights_only_load(folder / "rng_state.pth")
            contents["rng"] = write_rng(rec, rng_from_hf(hf_rng))
        if (folder / "scaler.pt").is_file():
            skeleton, tensors = encode_tree(_weights_only_load(folder / "scaler.pt"), "scaler")
            contents["extra"] = {"scaler": write_tree(rec, "scaler", skeleton, tensors)}
        return contents

    return write


def import_hf(
    source: str | Path,
    points: SavePoints,
    *,
    overwrite: bool = False,
    on_event: Callable[[str], None] = lambda msg: None,
) -> list[SavePoint]:
    """Import every ``checkpoint-N`` of ``source`` (or the model folder itself) into
    ``points``, oldest first. Returns the new save points."""
    source = Path(source)
    imported = []
    for step, folder in find_checkpoints(source):
        trainer_state = _trainer_state(folder)
        state: dict[str, Any] = {"global_step": step, "imported_from": str(folder.resolve())}
        if trainer_state and isinstance(trainer_state.get("epoch"), (int, float)):
            state["epoch"] = trainer_state["epoch"]
        skipped = sorted(n for n in NEVER_READ if (folder / n).exists())
        sp = points.save_with(
            step, _writer(folder, points.max_shard_size),
            metrics=_metrics_at(trainer_state, step), state=state, tags=(), overwrite=overwrite,
        )  # fmt: skip
        note = f" (never read: {', '.join(skipped)})" if skipped else ""
        on_event(f"imported {folder} as step {step}: {', '.join(sorted(sp.contents))}{note}")
        imported.append(sp)
    return imported
