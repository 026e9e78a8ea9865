"""The staging writer: files written into a save point's private staging folder, each
recorded with its size and hash for the manifest.

Synchronous saves write and fsync each file at once. Asynchronous ones take tensors
through a :class:`~savepoints.snapshot.Snapshot` (copied into host buffers now, or later
in the background) and write them later, in the background, through
:meth:`FileRecorder.flush`. A weights file whose tensors are all unchanged since it was
last written is linked to the stored blob instead of written again.
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
from savepoints.snapshot import HostBuffers, Snapshot

__all__ = ["FileRecorder", "HostBuffers"]

#: Puts the stored blob of a file entry at a path of the staging folder; False when it
#: cannot (no blob store, or the blob was collected).
LinkFn = Callable[[Path, FileEntry], bool]


@dataclass
class FileRecorder:
    """Collects the files written into a staging folder, with size and hash.

    With a buffered ``snapshot`` (asynchronous saves), tensor files are not written at
    once: their tensors are taken into reused host buffers (the only part that may block
    training) and written by :meth:`flush`, later, in the background.
    """

    root: Path
    files: dict[str, FileEntry] = field(default_factory=dict)
    #: Asynchronous (buffered) and incremental saves take tensors through a snapshot.
    snapshot: Snapshot | None = None
    link: LinkFn | None = None
    pending: list[tuple[str, dict[str, str], Mapping[str, str] | None, FileEntry | None]] = field(
        default_factory=list
    )
    #: Small files written but not yet fsynced: when buffered, fsync waits for the
    #: background too (on a busy disk one fsync can take seconds).
    unsynced: list[Path] = field(default_factory=list)

    @property
    def buffered(self) -> bool:
        return self.snapshot is not None and self.snapshot.buffered

    def has(self, rel: str) -> bool:
        """Whether ``rel`` is written already, or will be by :meth:`flush`."""
        return rel in self.files or any(p[0] == rel for p in self.pending)

    def _sync_or_defer(self, f: Any, path: Path) -> None:
        if not self.buffered:
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
        snap = self.snapshot
        if snap is None:
            self._write_tensor_file(rel, _on_cpu(tensors), metadata)
            return
        keys = {name: f"{rel}\0{name}" for name in tensors}
        taken = [snap.take(keys[name], t) for name, t in tensors.items()]
        reuse = None
        if taken and all(kind == "reused" for kind in taken):
            reuse = snap.owner.reusable_file(rel, keys.values())
        if snap.buffered:
            self.pending.append((rel, keys, metadata, reuse))
        elif not self._reuse(rel, reuse):
            self._write_tensor_file(rel, _on_cpu(tensors), metadata)
            snap.owner.wrote(rel, keys.values(), self.files[rel])

    def _reuse(self, rel: str, entry: FileEntry | None) -> bool:
        """Link the stored blob of an unchanged file instead of writing it again."""
        if entry is None or self.link is None or not self.link(self.path(rel), entry):
            return False
        self.files[rel] = entry
        return True

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
            rel, keys, metadata, reuse = self.pending.pop(0)
            if self._reuse(rel, reuse):
                continue
            assert self.snapshot is not None
            owner = self.snapshot.owner
            snap = {name: owner.buffers.get(key) for name, key in keys.items()}
            self._write_tensor_file(rel, snap, metadata)
            owner.wrote(rel, keys.values(), self.files[rel])
        while self.unsynced:
            with open(self.unsynced.pop(), "rb") as f:
                os.fsync(f.fileno())

    def _write_tensor_file(
        self, rel: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
    ) -> None:
        # In the background, one hashing thread (at the writer's low priority): a pool of
        # hashing threads would compete with training for every core.
        h = StreamHasher(threads=1 if self.buffered else None)
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


def _on_cpu(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in tensors.items()}
