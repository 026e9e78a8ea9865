"""What goes into a save point, and how it comes back out.

Each component (model, tokenizer, optimizer, scheduler, RNG) has a *write* that puts its
files into a staging folder and returns a small description for the manifest's
``contents``, and a *restore* that checks everything fits before it changes anything.

Transformers models are recognised by duck typing (a ``config`` with
``save_pretrained``), never by importing transformers: the core stays free of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from savepoints.errors import (
    CorruptSavePointError,
    SavePointGoneError,
    SavePointsError,
    StateMismatchError,
    UnserializableStateError,
)
from savepoints.integrity import StreamHasher, hash_file
from savepoints.layout import MANIFEST_NAME, TRAINING_STATE_DIR
from savepoints.manifest import FileEntry, is_safe_relpath
from savepoints.serialize import (
    DTYPE_FROM_NAME,
    decode_tree,
    encode_tree,
    read_safetensors,
    write_safetensors,
)

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
#: Weights this large are written one shard per layer, so unchanged layers deduplicate.
LAYER_SHARDS_ABOVE = 64 * 1024**2


class HostBuffers:
    """Host memory for snapshots, allocated on first use and reused by every later save
    of the same shapes (pinned when the source is on a GPU, for fast device-to-host
    copies). Reuse matters: copying into fresh memory runs at a fraction of the speed of
    copying into memory already mapped."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._cuda = False

    def copy(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        t = tensor.detach()
        buf = self._buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            pin = t.is_cuda and torch.cuda.is_available()
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
            self._buffers[key] = buf
        buf.copy_(t, non_blocking=t.is_cuda)
        self._cuda = self._cuda or t.is_cuda
        return buf

    def synchronize(self) -> None:
        """Wait for device-to-host copies still in flight."""
        if self._cuda:
            torch.cuda.synchronize()

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


@dataclass
class FileRecorder:
    """Collects the files written into a staging folder, with size and hash.

    With ``buffers`` (asynchronous saves), tensor files are not written at once: their
    tensors are copied into reused host buffers (the snapshot, the only part that blocks
    training) and written by :meth:`flush`, later, in the background.
    """

    root: Path
    files: dict[str, FileEntry] = field(default_factory=dict)
    buffers: HostBuffers | None = None
    pending: list[tuple[str, dict[str, torch.Tensor], Mapping[str, str] | None]] = field(
        default_factory=list
    )
    #: Small files written but not yet fsynced: with buffers, fsync waits for the
    #: background too (on a busy disk one fsync can take seconds).
    unsynced: list[Path] = field(default_factory=list)

    def _sync_or_defer(self, f: Any, path: Path) -> None:
        if self.buffers is None:
            os.fsync(f.fileno())
        else:
            self.unsynced.append(path)

    def path(self, rel: str) -> Path:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_tensors(
        self, rel: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
    ) -> None:
        if self.buffers is not None:
            snap = {k: self.buffers.copy(f"{rel}\0{k}", v) for k, v in tensors.items()}
            self.pending.append((rel, snap, metadata))
            return
        self._write_tensor_file(rel, {k: v.detach().cpu() for k, v in tensors.items()}, metadata)

    def flush(self) -> None:
        """Write the tensor files whose snapshots were deferred, fsync deferred files."""
        while self.pending:
            rel, tensors, metadata = self.pending.pop(0)
            self._write_tensor_file(rel, tensors, metadata)
        while self.unsynced:
            with open(self.unsynced.pop(), "rb") as f:
                os.fsync(f.fileno())

    def _write_tensor_file(
        self, rel: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
    ) -> None:
        h = StreamHasher()
        size = write_safetensors(self.path(rel), tensors, metadata, hasher=h)
        self.files[rel] = FileEntry(size, h.hexdigest())

    def write_json(self, rel: str, data: Any) -> None:
        self.write_bytes(rel, json.dumps(data, indent=1, allow_nan=False).encode())

    def write_bytes(self, rel: str, raw: bytes) -> None:
        path = self.path(rel)
        with open(path, "xb") as f:
            f.write(raw)
            f.flush()
            self._sync_or_defer(f, path)
        h = StreamHasher()
        h.update(raw)
        self.files[rel] = FileEntry(len(raw), h.hexdigest())

    def copy_file(self, rel: str, source: Path) -> None:
        """Copy a file in (streamed, not read whole into memory), fsync and hash it."""
        path = self.path(rel)
        with open(source, "rb") as src, open(path, "xb") as dst:
            shutil.copyfileobj(src, dst, 16 * 1024 * 1024)
            dst.flush()
            os.fsync(dst.fileno())
        size, digest = hash_file(path)
        self.files[rel] = FileEntry(size, digest)

    def adopt_new_files(self) -> list[str]:
        """Record (hash and fsync) files that third-party code wrote into the folder."""
        added = []
        for dirpath, _, filenames in os.walk(self.root):
            for name in filenames:
                full = Path(dirpath) / name
                rel = full.relative_to(self.root).as_posix()
                if rel in self.files:
                    continue
                if full.is_symlink():
                    raise OSError(
                        f"{rel} was written as a symbolic link; save points hold files only"
                    )
                with open(full, "rb") as f:
                    self._sync_or_defer(f, full)
                size, digest = hash_file(full)
                self.files[rel] = FileEntry(size, digest)
                added.append(rel)
        return sorted(added)


# --------------------------------------------------------------------------------------
# Model


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
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
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
) -> dict[str, Any]:
    model = unwrap_model(model)
    tensors, tied = model_tensors(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    info: dict[str, Any] = {"class": f"{type(model).__module__}.{type(model).__qualname__}"}
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
        _write_transformers_config(rec, model)
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
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if layer_shards_above is not None and total >= layer_shards_above:
        shards = _layer_shards(tensors, max_shard_bytes, trainable)
    else:
        shards = _plan_shards(tensors, max_shard_bytes)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        rec.write_tensors(prefix + WEIGHTS_NAME, shards[0], metadata)
        return [prefix + WEIGHTS_NAME]
    weight_map: dict[str, str] = {}
    names = []
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        rec.write_tensors(prefix + fname, shard, metadata)
        weight_map.update({k: fname for k in shard})
        names.append(prefix + fname)
    rec.write_json(
        prefix + WEIGHTS_INDEX_NAME,
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
    )
    return [prefix + WEIGHTS_INDEX_NAME, *names]


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


def _write_transformers_config(rec: FileRecorder, model: Any) -> None:
    # What save_pretrained records, so from_pretrained and pipelines find the class and
    # dtype; done through the model's own objects, so transformers is never imported.
    config = model.config
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        config.dtype = str(dtype).removeprefix("torch.")
    config.architectures = [type(model).__name__]
    config.save_pretrained(str(rec.root))
    can_generate = getattr(model, "can_generate", None)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and callable(can_generate) and can_generate():
        generation_config.save_pretrained(str(rec.root))
    rec.adopt_new_files()


def write_tokenizer(rec: FileRecorder, tokenizer: Any) -> dict[str, Any]:
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


#: JSON state files larger than this are refused unread (a hostile or broken file).
MAX_STATE_JSON_BYTES = 256 * 1024 * 1024


@contextlib.contextmanager
def reading(folder: Path) -> Iterator[None]:
    """Reading a save point's files: whatever a malformed file makes a reader raise
    (safetensors, JSON, the state decoder, load_state_dict) becomes one clear
    CorruptSavePointError naming the save point; if the save point vanished meanwhile
    (pruned by the process writing the run), a SavePointGoneError. Our own errors, and
    other OSErrors (a full disk while writing a copy), pass through as they are."""
    try:
        yield
    except SavePointsError:
        raise
    except (Exception, RecursionError) as e:
        if not (folder / MANIFEST_NAME).exists():
            raise SavePointGoneError(folder) from e  # a reader racing a pruning writer
        if isinstance(e, OSError):
            raise
        text = str(e).splitlines()[0][:300] if str(e) else ""
        raise CorruptSavePointError(
            folder, [f"{type(e).__name__}: {text}" if text else type(e).__name__],
            failed="cannot be read",
        ) from e  # fmt: skip


def component_path(folder: Path, rel: str) -> Path:
    """``folder / rel`` for reading, refused when it could lead outside the folder: an
    unsafe name, or a symbolic link on the way (checked even with ``verify=False``)."""
    if not isinstance(rel, str) or not is_safe_relpath(rel):
        raise CorruptSavePointError(folder, [f"{rel!r}: leaves the save point folder"],
                                    failed="cannot be read")  # fmt: skip
    path = folder
    for part in rel.split("/"):
        path = path / part
        if path.is_symlink():
            raise CorruptSavePointError(folder, [f"{rel}: is a symbolic link"],
                                        failed="cannot be read")  # fmt: skip
    return path


def read_model_tensors(folder: Path, info: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for rel in info.get("files", [WEIGHTS_NAME]):
        if rel.endswith(".safetensors"):
            tensors.update(read_safetensors(component_path(folder, rel)))
    return tensors


def restore_model(model: torch.nn.Module, folder: Path, info: Mapping[str, Any]) -> None:
    """Copy a save point's weights into ``model``, in place.

    Everything is checked from the safetensors headers first (names, shapes, dtypes), so
    a mismatch changes nothing; then each tensor is read from the memory-mapped file and
    copied straight into the live parameter, one at a time: the extra memory is one
    tensor, not a second model."""
    prepare_model(model, folder, info)()


def prepare_model(
    model: torch.nn.Module, folder: Path, info: Mapping[str, Any]
) -> Callable[[], None]:
    """Check the save point's weights against ``model`` (raising on any mismatch) and
    return the function that copies them in."""
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
                        live[name].copy_(f.get_tensor(name))

    return apply


# --------------------------------------------------------------------------------------
# Optimizer, scheduler and other objects with state_dict()


def write_state(rec: FileRecorder, name: str, obj: Any) -> dict[str, Any]:
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
) -> dict[str, Any]:
    base = f"{TRAINING_STATE_DIR}/{name}"
    files = [f"{base}.json"]
    rec.write_json(f"{base}.json", skeleton)
    if tensors:
        rec.write_tensors(f"{base}.safetensors", tensors, {"format": "pt"})
        files.append(f"{base}.safetensors")
    info: dict[str, Any] = {"files": files}
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


def restore_optimizer(optimizer: Any, folder: Path, info: Mapping[str, Any]) -> None:
    optimizer.load_state_dict(prepare_optimizer(optimizer, folder, info))


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


def restore_object(what: str, obj: Any, folder: Path, info: Mapping[str, Any]) -> None:
    obj.load_state_dict(prepare_object(what, obj, folder, info))


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
