"""The model and tokenizer in a save point: written as a normal Transformers folder
(``config.json``, ``model.safetensors`` or shards plus index, the tokenizer's own files),
read back with every name, shape and dtype checked before a weight changes.

Transformers models are recognised by duck typing (a ``config`` with
``save_pretrained``), never by importing transformers: the core stays free of it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Set
from pathlib import Path
from typing import Any, cast

import torch

from savepoints.errors import StateMismatchError, UnserializableStateError
from savepoints.layout import TRAINING_STATE_DIR
from savepoints.manifest import ComponentInfo, ModelInfo
from savepoints.serialize import DTYPE_FROM_NAME, component_path, read_safetensors
from savepoints.staging import FileRecorder

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
#: Weights this large are written one shard per layer, so unchanged layers deduplicate.
LAYER_SHARDS_ABOVE = 64 * 1024**2


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module that holds the weights, under DDP/DataParallel and torch.compile."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = cast(torch.nn.Module, model._orig_mod)
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel") and isinstance(
            getattr(model, "module", None), torch.nn.Module
        ):
            model = cast(torch.nn.Module, model.module)
        else:
            return model


def model_class(model: torch.nn.Module) -> type:
    """The model's own class: FSDP2's ``fully_shard`` swaps in a subclass named
    ``FSDP<Class>`` that Transformers' ``from_pretrained`` would not know."""
    cls = type(model)
    if any(base.__name__ == "FSDPModule" for base in cls.__bases__):
        return next(b for b in cls.__bases__ if b.__name__ != "FSDPModule")
    return cls


def is_dtensor(t: object) -> bool:
    """A ``torch.distributed.tensor.DTensor`` (a parameter sharded by FSDP2, say)."""
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def local_part(t: torch.Tensor) -> torch.Tensor:
    """What this rank holds of ``t``: its local shard for a DTensor, else ``t``."""
    return cast(torch.Tensor, t.to_local()) if is_dtensor(t) else t  # type: ignore[attr-defined]


def local_slice(t: torch.Tensor) -> tuple[slice, ...] | None:
    """For a DTensor, the index of the global tensor that this rank holds; else None."""
    if not is_dtensor(t):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    dt: Any = t
    shape, offset = compute_local_shape_and_global_offset(dt.shape, dt.device_mesh, dt.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def is_peft_model(model: object) -> bool:
    """A ``peft.PeftModel`` (duck-typed: peft is never imported here)."""
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def is_transformers_model(model: object) -> bool:
    config = getattr(model, "config", None)
    return callable(getattr(model, "save_pretrained", None)) and callable(
        getattr(config, "save_pretrained", None)
    )


def _tied_names(model: torch.nn.Module) -> set[str]:
    """Names Transformers drops on save because they alias another weight."""
    names: set[str] = set()
    for attr in ("all_tied_weights_keys", "_tied_weights_keys"):
        tied = getattr(model, attr, None)
        if isinstance(tied, (Mapping, list, tuple, set)):
            names.update(str(k) for k in tied)
    return names


def alias_groups(state: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """Groups of state dict names that are the very same tensor (tied weights)."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name, t in state.items():
        if t.numel() == 0:
            continue
        local = local_part(t)
        key = (local.device, local.data_ptr(), t.dtype, tuple(t.shape), tuple(local.stride()))
        groups.setdefault(key, []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def model_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors to write (each stored once) and ``{dropped name: kept name}``."""
    return dedupe_aliases(model.state_dict(), _tied_names(model))


def write_model(
    rec: FileRecorder,
    model: torch.nn.Module,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    layer_shards_above: int | None = LAYER_SHARDS_ABOVE,
) -> ModelInfo:
    model = unwrap_model(model)
    tensors, tied = model_tensors(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    cls = model_class(model)
    info: ModelInfo = {"class": f"{cls.__module__}.{cls.__qualname__}"}
    prefix = ""
    if is_peft_model(model):
        # PEFT's own layout (adapter_config.json, adapter_model.safetensors) so that
        # PeftModel.from_pretrained(base, folder) works; the full state (frozen base
        # included, stored once across save points by layer) for exact restores.
        info["kind"] = "peft"
        model.save_pretrained(str(rec.root))  # type: ignore[operator]
        rec.adopt_new_files()
        prefix = f"{TRAINING_STATE_DIR}/model/"
    elif is_transformers_model(model):
        info["kind"] = "transformers"
        write_transformers_config(rec, model)
    else:
        info["kind"] = "torch"
    info["files"] = write_weights(
        rec, tensors, max_shard_bytes, layer_shards_above, prefix=prefix, trainable=trainable
    )
    info["tensors"] = len(tensors)
    info["bytes"] = sum(t.numel() * t.element_size() for t in tensors.values())
    if tied:
        info["tied"] = dict(sorted(tied.items()))
    return info


def write_weights(
    rec: FileRecorder,
    tensors: Mapping[str, torch.Tensor],
    max_shard_bytes: int,
    layer_shards_above: int | None = None,
    *,
    prefix: str = "",
    trainable: Set[str] = frozenset(),
) -> list[str]:
    """``model.safetensors``, or shards plus the standard index: one shard per layer
    (trainable and frozen tensors apart) when the weights reach ``layer_shards_above``
    bytes, so a part that did not change is the same file as before and is stored once;
    else shards only past ``max_shard_bytes``. ``prefix`` puts them in a subfolder."""
    files, index = plan_weight_files(tensors, max_shard_bytes, layer_shards_above, trainable)
    for rel, shard in files:
        rec.write_tensors(prefix + rel, shard, WEIGHTS_METADATA)
    if index is not None:
        rec.write_json(prefix + WEIGHTS_INDEX_NAME, index)
        return [prefix + WEIGHTS_INDEX_NAME, *(prefix + rel for rel, _ in files)]
    return [prefix + rel for rel, _ in files]


WEIGHTS_METADATA = {"format": "pt"}


def plan_weight_files(
    tensors: Mapping[str, torch.Tensor],
    max_shard_bytes: int,
    layer_shards_above: int | None = None,
    trainable: Set[str] = frozenset(),
) -> tuple[list[tuple[str, dict[str, torch.Tensor]]], dict[str, Any] | None]:
    """Which tensors go into which weights file (see :func:`write_weights`), and the
    standard index when there are several files (None for one ``model.safetensors``)."""
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if layer_shards_above is not None and total >= layer_shards_above:
        shards = _layer_shards(tensors, max_shard_bytes, trainable)
    else:
        shards = _plan_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        return [(WEIGHTS_NAME, shards[0])], None
    files = [
        (f"model-{i:05d}-of-{len(shards):05d}.safetensors", shard)
        for i, shard in enumerate(shards, 1)
    ]
    weight_map = {name: rel for rel, shard in files for name in shard}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    return files, index


def dedupe_aliases(
    state: Mapping[str, torch.Tensor], prefer_dropped: Set[str] = frozenset()
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Each tensor once: ``({name: tensor}, {dropped alias: kept name})``."""
    dropped: dict[str, str] = {}
    for group in alias_groups(state):
        keepers = [n for n in group if n not in prefer_dropped] or group
        for name in group:
            if name != keepers[0]:
                dropped[name] = keepers[0]
    return {k: v for k, v in state.items() if k not in dropped}, dropped


_LAYER = re.compile(r"^(.*?\.\d+)\.")


def layer_of(name: str) -> str:
    """The layer a tensor belongs to: its name up to the first numbered module
    (``transformer.h.11.attn.c_attn.weight`` -> ``transformer.h.11``), else its module."""
    m = _LAYER.match(name)
    if m:
        return m.group(1)
    return name.rsplit(".", 1)[0] if "." in name else name


def _layer_shards(
    tensors: Mapping[str, torch.Tensor], max_bytes: int, trainable: Set[str] = frozenset()
) -> list[dict[str, torch.Tensor]]:
    groups: dict[tuple[str, bool], dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        groups.setdefault((layer_of(name), name in trainable), {})[name] = t
    shards: list[dict[str, torch.Tensor]] = []
    for group in groups.values():
        shards.extend(_plan_shards(group, max_bytes))
    return shards


def _plan_shards(
    tensors: Mapping[str, torch.Tensor], max_bytes: int
) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def write_transformers_config(rec: FileRecorder, model: Any) -> None:
    # What save_pretrained records, so from_pretrained and pipelines find the class and
    # dtype; done through the model's own objects, so transformers is never imported.
    config = model.config
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        config.dtype = str(dtype).removeprefix("torch.")
    config.architectures = [model_class(model).__name__]
    config.save_pretrained(str(rec.root))
    can_generate = getattr(model, "can_generate", None)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and callable(can_generate) and can_generate():
        generation_config.save_pretrained(str(rec.root))
    rec.adopt_new_files()


def write_tokenizer(rec: FileRecorder, tokenizer: Any) -> ComponentInfo:
    save = getattr(tokenizer, "save_pretrained", None)
    if not callable(save):
        raise UnserializableStateError(
            "tokenizer",
            type(tokenizer).__name__,
            tokenizer,
            "it has no save_pretrained() method (pass a Transformers tokenizer or processor)",
        )
    save(str(rec.root))
    files = rec.adopt_new_files()
    return {"class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}", "files": files}


def read_model_tensors(folder: Path, info: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for rel in info.get("files", [WEIGHTS_NAME]):
        if rel.endswith(".safetensors"):
            tensors.update(read_safetensors(component_path(folder, rel)))
    return tensors


def prepare_model(
    model: torch.nn.Module, folder: Path, info: Mapping[str, Any]
) -> Callable[[], None]:
    """Check the save point's weights against ``model`` and return the function that
    copies them in, in place.

    Everything is checked from the safetensors headers first (names, shapes, dtypes), so
    a mismatch changes nothing; the returned function reads each tensor from the
    memory-mapped file and copies it straight into the live parameter, one at a time: the
    extra memory is one tensor, not a second model."""
    from safetensors import safe_open

    model = unwrap_model(model)
    saved: dict[str, tuple[str, tuple[int, ...], torch.dtype | None]] = {}
    for rel in info.get("files", [WEIGHTS_NAME]):
        if rel.endswith(".safetensors"):
            with safe_open(str(component_path(folder, rel)), "pt") as f:
                for k in f.keys():  # noqa: SIM118
                    sl = f.get_slice(k)
                    saved[k] = (rel, tuple(sl.get_shape()), DTYPE_FROM_NAME.get(sl.get_dtype()))
    live = model.state_dict()
    aliases: dict[str, str] = {}
    for group in alias_groups(live):
        present = [n for n in group if n in saved]
        for name in group:
            if name not in saved and present:
                aliases[name] = present[0]
    missing = sorted(k for k in live if k not in saved and k not in aliases)
    unexpected = sorted(k for k in saved if k not in live)
    mismatched = sorted(
        f"{k} (saved {shape} {dtype}, model {tuple(live[k].shape)} {live[k].dtype})"
        for k, (_, shape, dtype) in saved.items()
        if k in live and (shape != tuple(live[k].shape) or dtype != live[k].dtype)
    )
    if missing or unexpected or mismatched:
        raise StateMismatchError("model", folder, missing, unexpected, mismatched)
    # In place, so parameters keep their identity and the optimizer's references stay valid.
    by_file: dict[str, list[str]] = {}
    for name, (rel, _, _) in saved.items():
        by_file.setdefault(rel, []).append(name)

    def apply() -> None:
        with torch.no_grad():
            for rel, names in by_file.items():
                with safe_open(str(component_path(folder, rel)), "pt") as f:
                    for name in names:
                        target = live[name]
                        part = local_slice(target)
                        if part is None:
                            target.copy_(f.get_tensor(name))
                        else:  # only the slice this rank holds is read
                            local_part(target).copy_(f.get_slice(name)[part])

    return apply
