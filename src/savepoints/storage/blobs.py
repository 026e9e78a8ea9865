"""Content-addressed blobs: identical bytes are stored once per run.

Every file of a save point (except its manifest) is also a blob,
``RUN/.savepoints/blobs/<2 hex>/<blake3 hex>``, and the file in the save point folder is
a hard link to it. A save point folder therefore stays a plain folder that any tool and
``from_pretrained`` read, while a file that did not change since the last save point (a
frozen layer's shard, the tokenizer, the config) costs no new bytes.

Reference counting is the file system's own: a blob whose link count is 1 is referenced
by no save point and may go. So deleting a save point can never break another (it only
drops links), and garbage collection is crash-safe: it removes only blobs nobody links
to, one unlink at a time, and a kill midway leaves only garbage for the next pass.

Blobs are made read-only, because a program that writes into a save point's file *in
place* would change every save point that shares it (editors that write a new file and
rename it are harmless). ``verify`` would report such a change in each of them.

Where hard links are not available (some network and FUSE file systems, or a run split
across devices) the files simply stay copies: the save point is identical, it only is
not deduplicated (``SavePoints.dedup`` reports which applies).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from savepoints.manifest import FileEntry

# Errors that mean "this file system cannot hard-link here": fall back to copies.
_NO_LINKS = {errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK,
             errno.ENOSYS, errno.EACCES}  # fmt: skip
_READ_ONLY = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.linking = True  # turned off for the run when the file system refuses links

    def blob_path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def intern(self, path: Path, entry: FileEntry) -> bool:
        """Make ``path`` a hard link of its blob, creating the blob from it if new.
        Returns False when the file stays a copy (no hard links here)."""
        if not self.linking:
            return False
        blob = self.blob_path(entry.hash)
        try:
            if blob.exists() and blob.stat().st_size == entry.size:
                if os.path.samefile(blob, path):
                    return True  # already a link to it
                # Swap the new copy for a link to the stored bytes (same content: hash).
                tmp = path.with_name(path.name + ".link")
                os.link(blob, tmp)
                os.replace(tmp, path)
            else:
                blob.parent.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(FileNotFoundError):
                    blob.unlink()  # a damaged blob of the wrong size: replace it
                os.chmod(path, _READ_ONLY)
                os.link(path, blob)
        except OSError as e:
            if e.errno in _NO_LINKS:
                self.linking = False
                return False
            raise
        return True

    def intern_all(self, folder: Path, files: Mapping[str, FileEntry]) -> int:
        """Intern every listed file of a staging folder; returns how many were linked."""
        return sum(self.intern(folder / rel, entry) for rel, entry in files.items())

    def blobs(self) -> Iterator[Path]:
        if not self.root.is_dir():
            return
        for sub in sorted(self.root.iterdir()):
            if sub.is_dir():
                yield from sorted(p for p in sub.iterdir() if p.is_file())

    def collect(self) -> tuple[int, int]:
        """Delete blobs no save point links to. Returns (blobs removed, bytes freed)."""
        removed = freed = 0
        for blob in self.blobs():
            st = blob.stat()
            if st.st_nlink <= 1:
                blob.unlink()
                removed += 1
                freed += st.st_size
        for sub in self.root.iterdir() if self.root.is_dir() else ():
            with contextlib.suppress(OSError):
                sub.rmdir()  # only empty ones go
        return removed, freed


@dataclass
class Usage:
    """What ``savepoints du`` reports."""

    logical: int = 0
    """Bytes of all save points' files, as if each were a separate copy."""
    physical: int = 0
    """Bytes actually on disk for them (each stored file counted once)."""
    unique: dict[int, int] = field(default_factory=dict)
    """Per step: bytes that only this save point holds (freed if it alone is deleted)."""
    garbage: int = 0
    """Bytes of blobs no save point references (``savepoints gc`` frees them)."""

    @property
    def ratio(self) -> float:
        return self.logical / self.physical if self.physical else 1.0


def usage(points: Mapping[int, Path], files: Mapping[int, Mapping[str, FileEntry]],
          store: BlobStore) -> Usage:  # fmt: skip
    """Logical and physical bytes of the save points ``{step: folder}``."""
    out = Usage()
    sizes: dict[tuple[int, int], int] = {}
    owners: dict[tuple[int, int], set[int]] = {}
    for step, folder in points.items():
        out.unique[step] = 0
        for rel, entry in files[step].items():
            out.logical += entry.size
            try:
                st = os.stat(folder / rel)
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            owners.setdefault(key, set()).add(step)
            sizes[key] = st.st_size
    out.physical = sum(sizes.values())
    for key, steps in owners.items():
        if len(steps) == 1:
            out.unique[next(iter(steps))] += sizes.get(key, 0)
    for blob in store.blobs():
        st = blob.stat()
        if st.st_nlink <= 1:
            out.garbage += st.st_size
    return out
