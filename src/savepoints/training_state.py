"""Training state in a save point: optimizer, scheduler, other objects with
``state_dict()``, and the random number generators, all pickle-free (tensors in
safetensors, the rest in JSON) under ``training_state/``.

Each has a *write* that returns its entry for the manifest's ``contents`` and a
*prepare* that reads and checks the saved state against the live object without changing
it; applying it is a separate step (see restore.py), so a bad file changes nothing.
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from savepoints.errors import CorruptSavePointError, StateMismatchError, UnserializableStateError
from savepoints.layout import TRAINING_STATE_DIR
from savepoints.manifest import ComponentInfo, RngInfo
from savepoints.serialize import component_path, decode_tree, encode_tree, read_safetensors
from savepoints.staging import FileRecorder

#: JSON state files larger than this are refused unread (a hostile or broken file).
MAX_STATE_JSON_BYTES = 256 * 1024 * 1024


def write_state(rec: FileRecorder, name: str, obj: Any) -> ComponentInfo:
    """Write ``obj.state_dict()`` as ``training_state/<name>.json`` (+ ``.safetensors``)."""
    getter = getattr(obj, "state_dict", None)
    if not callable(getter):
        raise UnserializableStateError(
            name, type(obj).__name__, obj, "it has no state_dict() method"
        )
    skeleton, tensors = encode_tree(getter(), f"{name} state")
    return write_tree(rec, name, skeleton, tensors, cls=type(obj))


def write_tree(
    rec: FileRecorder,
    name: str,
    skeleton: Any,
    tensors: Mapping[str, torch.Tensor],
    cls: type | None = None,
) -> ComponentInfo:
    base = f"{TRAINING_STATE_DIR}/{name}"
    files = [f"{base}.json"]
    rec.write_json(f"{base}.json", skeleton)
    if tensors:
        rec.write_tensors(f"{base}.safetensors", tensors, {"format": "pt"})
        files.append(f"{base}.safetensors")
    info: ComponentInfo = {"files": files}
    if cls is not None:
        info["class"] = f"{cls.__module__}.{cls.__qualname__}"
    return info


def read_tree(folder: Path, info: Mapping[str, Any]) -> Any:
    files = list(info.get("files", []))
    skeleton_file = component_path(folder, next(f for f in files if f.endswith(".json")))
    if skeleton_file.stat().st_size > MAX_STATE_JSON_BYTES:
        raise CorruptSavePointError(
            folder, [f"{skeleton_file.name}: over the {MAX_STATE_JSON_BYTES} byte limit"],
            failed="cannot be read",
        )  # fmt: skip
    skeleton = json.loads(skeleton_file.read_text(encoding="utf-8"))
    tensors: dict[str, torch.Tensor] = {}
    for rel in files:
        if rel.endswith(".safetensors"):
            tensors.update(read_safetensors(component_path(folder, rel)))
    return decode_tree(skeleton, tensors)


def prepare_optimizer(optimizer: Any, folder: Path, info: Mapping[str, Any]) -> Any:
    """Read the optimizer state and check that it fits ``optimizer``; return it."""
    saved = read_tree(folder, info)
    _check_class("optimizer", optimizer, folder, info)
    groups = optimizer.state_dict()["param_groups"]
    saved_groups = saved.get("param_groups", [])
    if len(groups) != len(saved_groups):
        raise StateMismatchError(
            "optimizer",
            folder,
            why=f"it has {len(groups)} parameter group(s), the save point {len(saved_groups)}",
        )
    for i, (g, s) in enumerate(zip(groups, saved_groups)):
        if len(g["params"]) != len(s["params"]):
            raise StateMismatchError(
                "optimizer",
                folder,
                why=f"parameter group {i} has {len(g['params'])} parameters, the save point "
                f"{len(s['params'])}",
            )
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_ids = [i for s in saved_groups for i in s["params"]]
    mismatched = []
    for pid, param in zip(saved_ids, params):
        for key, value in saved.get("state", {}).get(pid, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                mismatched.append(
                    f"state[{pid}].{key} (saved {tuple(value.shape)}, parameter "
                    f"{tuple(param.shape)})"
                )
    if mismatched:
        raise StateMismatchError("optimizer", folder, mismatched=mismatched)
    return saved


def prepare_object(what: str, obj: Any, folder: Path, info: Mapping[str, Any]) -> Any:
    _check_class(what, obj, folder, info)
    return read_tree(folder, info)


def _check_class(what: str, obj: Any, folder: Path, info: Mapping[str, Any]) -> None:
    saved = info.get("class")
    live = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if saved and saved != live:
        raise StateMismatchError(
            what, folder, why=f"it is a {live}, but the save point holds a {saved}"
        )


# --------------------------------------------------------------------------------------
# Random number generators

#: Our generator names -> the keys of Hugging Face Trainer's ``rng_state.pth``; import
#: and export translate through this one table.
RNG_HF_KEYS = {"python": "python", "numpy": "numpy", "torch": "cpu", "cuda": "cuda"}


def write_rng(rec: FileRecorder, state: Mapping[str, Any], name: str = "rng") -> RngInfo:
    """Write RNG states (``{generator: state}``) as ``training_state/<name>.*``."""
    skeleton, tensors = encode_tree(dict(state), "rng state")
    return {"files": write_tree(rec, name, skeleton, tensors)["files"],
            "generators": sorted(state)}  # fmt: skip


def rng_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Trainer's ``rng_state.pth`` contents as our RNG state (CUDA always a list)."""
    ours = {name: hf[key] for name, key in RNG_HF_KEYS.items() if key in hf}
    if "cuda" in ours and not isinstance(ours["cuda"], (list, tuple)):
        ours["cuda"] = [ours["cuda"]]
    elif "cuda" in ours:
        ours["cuda"] = list(ours["cuda"])
    return ours


def rng_to_hf(ours: Mapping[str, Any]) -> dict[str, Any]:
    """Our RNG state as Trainer's ``rng_state.pth`` expects it (one device: not a list)."""
    hf = {key: ours[name] for name, key in RNG_HF_KEYS.items() if name in ours}
    if "cuda" in hf and len(hf["cuda"]) == 1:
        hf["cuda"] = hf["cuda"][0]
    return hf


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    # Only when CUDA is already in use: initialising it just to read its RNG would
    # be slow and can fail in forked workers.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        state["mps"] = mps.get_rng_state()
    return state


def restore_rng(state: Mapping[str, Any], folder: Path) -> None:
    setters: dict[str, Callable[[Any], None]] = {
        "python": random.setstate,
        "numpy": np.random.set_state,
        "torch": torch.set_rng_state,
    }
    for key, setter in setters.items():
        if key in state:
            setter(state[key])
    if "cuda" in state:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(state["cuda"]):
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            warnings.warn(
                f"{folder} holds CUDA RNG states for {len(state['cuda'])} device(s) but "
                f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} are "
                "available here; CUDA random numbers will differ from the original run.",
                stacklevel=3,
            )
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])
