"""Pickle-free state: tensors to safetensors, everything else to JSON.

Two pieces:

* :func:`write_safetensors` writes a standard safetensors file itself (8-byte header
  length, JSON header, raw little-endian tensor bytes) so that it can hash the bytes
  while they stream to disk and fsync once at the end. Any safetensors reader (the Rust
  crate, ``safetensors.torch.load_file``, ``from_pretrained``) reads the result.
* :func:`encode_tree` / :func:`decode_tree` turn a nested state (an optimizer's
  ``state_dict()``, a scheduler's, RNG states) into a JSON skeleton plus a flat dict of
  tensors. JSON cannot tell a tuple from a list, has no integer dict keys and no NaN, so
  those are tagged; anything else is refused with the key that holds it, because the
  only general way to store an arbitrary object is pickle.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from savepoints.errors import (
    CorruptSavePointError,
    SavePointGoneError,
    SavePointsError,
    UnserializableStateError,
)
from savepoints.integrity import StreamHasher
from savepoints.layout import MANIFEST_NAME
from savepoints.manifest import is_safe_relpath

# The one dtype table: safetensors code -> (torch dtype name, bytes per element). The
# widths are part of the format (compacted files group bytes by them), so they are
# written here, not asked of the installed torch. The format is little-endian and so is
# every platform torch ships for, so tensor memory is written as is.
SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "U16": ("uint16", 2),
    "U32": ("uint32", 4),
    "U64": ("uint64", 8),
}
#: The codes this torch can load (older releases lack some dtypes).
DTYPE_FROM_NAME: dict[str, torch.dtype] = {
    code: getattr(torch, name)
    for code, (name, _) in SAFETENSORS_DTYPES.items()
    if isinstance(getattr(torch, name, None), torch.dtype)
}
_DTYPE_NAMES: dict[torch.dtype, str] = {dtype: code for code, dtype in DTYPE_FROM_NAME.items()}


def dtype_width(code: str) -> int:
    """Bytes per element of a safetensors dtype code (1 for codes we do not know)."""
    return SAFETENSORS_DTYPES.get(code, ("", 1))[1]


#: The names users give for casting (``savepoints export --dtype``).
DTYPE_ALIASES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


# Writes go out in pieces of this size: large enough for sequential throughput, small
# enough that hashing one piece overlaps well with the kernel writing the previous one.
_CHUNK = 64 * 1024 * 1024


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor, without a copy when it is already contiguous."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    raw: Any = flat.view(torch.uint8).numpy()
    return memoryview(raw).cast("B")


def write_safetensors(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    hasher: StreamHasher,
) -> int:
    """Write ``tensors`` to ``path`` in safetensors format, hashing and fsyncing it.

    Tensors must be on the CPU. Returns the file size; ``hasher`` has seen every byte.
    """
    for name, t in tensors.items():
        if t.device.type != "cpu":
            raise ValueError(f"tensor {name!r} is on {t.device}; snapshot it to the CPU first")
    specs = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
    return write_safetensors_stream(path, specs, tensors.__getitem__, metadata, hasher=hasher)


def write_safetensors_stream(
    path: Path,
    specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    fetch: Callable[[str], torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    hasher: StreamHasher,
) -> int:
    """Write a safetensors file whose header comes from ``specs`` (name: dtype, shape)
    and whose tensors are asked of ``fetch`` one at a time, in sorted name order, each
    as a CPU tensor: at most one tensor needs to be in memory (a tensor gathered from
    several ranks, say). Hashes and fsyncs like :func:`write_safetensors`."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    # Sorted by name so the same state always gives the same bytes (and the same hash).
    names = sorted(specs)
    for name in names:
        dtype, shape = specs[name]
        code = _DTYPE_NAMES.get(dtype)
        if code is None:
            raise UnserializableStateError(
                "tensor", name, dtype, f"dtype {dtype} has no safetensors equivalent"
            )
        size = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": code,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    head = struct.pack("<Q", len(raw)) + raw

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    pipe = _HashPipe(hasher)
    try:
        with os.fdopen(fd, "wb", buffering=0) as f:
            pipe.feed(memoryview(head))
            _write_all(f, memoryview(head))
            for name in names:
                t = fetch(name)
                if (
                    t.device.type != "cpu"
                    or t.dtype != specs[name][0]
                    or tuple(t.shape) != tuple(specs[name][1])
                ):
                    raise ValueError(f"tensor {name!r} is not the CPU tensor its header describes")
                data = tensor_bytes(t)
                for start in range(0, len(data), _CHUNK):
                    chunk = data[start : start + _CHUNK]
                    pipe.feed(chunk)
                    _write_all(f, chunk)
                del t, data
            pipe.finish()
            os.fsync(f.fileno())
    except BaseException:
        pipe.abandon()
        path.unlink(missing_ok=True)
        raise
    return len(head) + offset


def _write_all(f: Any, data: memoryview) -> None:
    while len(data):
        n = f.write(data)
        data = data[n:]


_hash_pool: ThreadPoolExecutor | None = None
_hash_pool_lock = threading.Lock()
# Chunks below this are hashed inline: handing them to a thread costs more than it saves.
_PIPELINE_MIN = 1024 * 1024


class _HashPipe:
    """Hash chunk N in a helper thread while chunk N is being written.

    BLAKE3 releases the GIL on large inputs, so on this machine the hash of a 1 GB write
    costs ~7% of its time instead of ~40% when done in line (bench/save_overhead.py).
    Chunks are hashed strictly in order: each waits for the previous one.
    """

    def __init__(self, hasher: StreamHasher) -> None:
        self.hasher = hasher
        self.pending: Future[None] | None = None

    def feed(self, chunk: memoryview) -> None:
        self._wait()
        if len(chunk) < _PIPELINE_MIN:
            self.hasher.update(chunk)
            return
        try:
            self.pending = _pool().submit(self.hasher.update, chunk)
        except RuntimeError:  # interpreter shutting down: no new threads; hash in line
            self.hasher.update(chunk)

    def finish(self) -> None:
        self._wait()

    def abandon(self) -> None:
        with contextlib.suppress(BaseException):
            self._wait()

    def _wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()


def _pool() -> ThreadPoolExecutor:
    global _hash_pool
    with _hash_pool_lock:
        if _hash_pool is None:
            _hash_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="savepoints-hash")
        return _hash_pool


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file onto the CPU (memory-mapped read)."""
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


# --------------------------------------------------------------------------------------
# Nested state <-> JSON skeleton + tensors

_TAG = "__sp__"  # the key that marks a tagged value; a plain dict never uses it


def encode_tree(tree: Any, where: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split ``tree`` into a JSON-serialisable skeleton and ``{key: tensor}``.

    ``where`` names the state in error messages ("optimizer state", ...).
    """
    tensors: dict[str, torch.Tensor] = {}

    def enc(value: Any, key: str) -> Any:
        if isinstance(value, torch.Tensor):
            ref = key or "root"
            tensors[ref] = value.detach()
            return {_TAG: "tensor", "key": ref}
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            if math.isfinite(value):
                return value
            return {_TAG: "float", "value": repr(value)}
        if isinstance(value, np.generic):
            return enc(value.item(), key)
        if isinstance(value, np.ndarray):
            return {
                _TAG: "ndarray",
                "dtype": value.dtype.str,
                "shape": list(value.shape),
                "data": enc(value.tolist(), key),
            }
        if isinstance(value, torch.dtype):
            return {_TAG: "dtype", "name": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {_TAG: "device", "name": str(value)}
        if isinstance(value, tuple):
            return {_TAG: "tuple", "items": [enc(v, f"{key}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [enc(v, f"{key}.{i}") for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            if all(isinstance(k, str) for k in value) and _TAG not in value:
                return {k: enc(v, _join(key, k)) for k, v in value.items()}
            items = []
            for k, v in value.items():
                if not isinstance(k, (str, int, float, bool)) and k is not None:
                    raise UnserializableStateError(
                        where, _join(key, repr(k)), k, f"dict key of type {type(k).__name__}"
                    )
                items.append([enc(k, key), enc(v, _join(key, str(k)))])
            return {_TAG: "dict", "items": items}
        raise UnserializableStateError(where, key or "(root)", value)

    return enc(tree, ""), tensors


def tensor_ref(node: Any) -> str | None:
    """The tensor key a skeleton node refers to (from :func:`encode_tree`), else None."""
    if isinstance(node, dict) and node.get(_TAG) == "tensor" and isinstance(node.get("key"), str):
        return str(node["key"])
    return None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def decode_tree(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_tree`."""

    def dec(value: Any) -> Any:
        if isinstance(value, list):
            return [dec(v) for v in value]
        if not isinstance(value, dict):
            return value
        tag = value.get(_TAG)
        if tag is None:
            return {k: dec(v) for k, v in value.items()}
        if tag == "tensor":
            return tensors[value["key"]]
        if tag == "tuple":
            return tuple(dec(v) for v in value["items"])
        if tag == "dict":
            return {dec(k): dec(v) for k, v in value["items"]}
        if tag == "float":
            return float(value["value"])
        if tag == "ndarray":
            arr = np.array(dec(value["data"]), dtype=np.dtype(value["dtype"]))
            return arr.reshape(value["shape"])
        if tag == "dtype":
            dtype = getattr(torch, str(value["name"]), None)
            if not isinstance(dtype, torch.dtype):  # never any other attribute of torch
                raise ValueError(f"{value['name']!r} is not a torch dtype")
            return dtype
        if tag == "device":
            return torch.device(value["name"])
        raise ValueError(f"unknown tagged value {tag!r} in saved state")

    return dec(skeleton)


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object from a small file written by others, or None if it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def check_json(value: Any, where: str, key: str = "") -> Any:
    """Return ``value`` as plain JSON (tuples become lists), or raise naming the bad key.

    Used for the user ``state``, ``metrics`` and tags, which live in the manifest and
    must read back as the same plain values.
    """
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise UnserializableStateError(
                where, key or "(root)", value, f"{value} is not a finite number"
            )
        return value
    if isinstance(value, np.generic):
        return check_json(value.item(), where, key)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return check_json(value.item(), where, key)
    if isinstance(value, (list, tuple)):
        return [check_json(v, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise UnserializableStateError(
                    where, _join(key, repr(k)), k, "JSON object keys must be strings"
                )
            out[k] = check_json(v, where, _join(key, k))
        return out
    raise UnserializableStateError(where, key or "(root)", value)


# --------------------------------------------------------------------------------------
# Reading a save point's files safely


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
