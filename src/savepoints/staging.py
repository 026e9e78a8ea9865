"""The staging writer: files written into a save point's private staging folder, each
recorded with its size and hash for the manifest.

Synchronous saves write and fsync each file at once. Asynchronous ones copy tensors into
:class:`HostBuffers` (the snapshot: the only part that blocks training) and write them
later, in the background, through :meth:`FileRecorder.flush`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from savepoints.integrity import StreamHasher, hash_file
from savepoints.manifest import FileEntry
from savepoints.serialize import write_safetensors, write_safetensors_stream


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

    def write_tensor_stream(
        self,
        rel: str,
        specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
        fetch: Callable[[str], torch.Tensor],
        metadata: Mapping[str, str] | None,
    ) -> None:
        """Write a tensor file at once, asking ``fetch`` for one tensor at a time (in
        sorted name order): see :func:`~savepoints.serialize.write_safetensors_stream`."""
        h = StreamHasher()
        size = write_safetensors_stream(self.path(rel), specs, fetch, metadata, hasher=h)
        self.files[rel] = FileEntry(size, h.hexdigest())

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
