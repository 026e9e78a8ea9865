"""A run on the local file system: today's behaviour behind the storage seam.

Save points are folders of the run (``step-N``), written through the commit protocol
(atomic.py) into ``.savepoints/staging`` and renamed into place; their files are hard
links into the content-addressed blob store (blobs.py), so unchanged bytes are stored
once; one writer at a time holds ``.savepoints/lock`` (an ``flock`` the kernel releases
when its holder dies, so a killed writer's lock never needs cleaning).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import threading
from collections.abc import Sequence
from pathlib import Path

from savepoints import atomic
from savepoints.atomic import PointState
from savepoints.errors import (
    NotARunError,
    RunLockedError,
    RunNotWritableError,
    SavePointsError,
)
from savepoints.layout import MANIFEST_NAME, RunLayout
from savepoints.manifest import Manifest, encode_manifest, read_manifest, write_manifest
from savepoints.storage.blobs import BlobStore, Usage, usage

log = logging.getLogger("savepoints")


class LocalStorage:
    """The save points of one run folder on a local (or network-mounted) file system."""

    def __init__(self, root: Path, *, dedup: bool = True) -> None:
        self.root = root
        self.layout = RunLayout(root)
        self._blobs = BlobStore(self.layout.blobs)
        self._blobs.linking = dedup
        self._lock_fd: int | None = None
        # Garbage collection (retention, also run by a remote's push thread) and the
        # interning of a commit's files into the blob store must not interleave: a
        # collect could remove a blob folder between intern's mkdir and its link.
        self._blob_lock = threading.Lock()

    @property
    def dedup(self) -> bool:
        return self._blobs.linking

    # ------------------------------------------------------------------ open / close

    def open_for_writing(self) -> atomic.Recovery:
        try:
            self.layout.private.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise NotARunError(self.root, "a part of the path is a file") from None
        except PermissionError as e:
            raise RunNotWritableError(self.root, e.strerror or "permission denied") from None
        except OSError as e:
            raise RunNotWritableError(self.root, e.strerror or str(e)) from None
        self._acquire_lock()
        # The run is being resumed: the mark a preempted exit left has been read.
        self.layout.preempted.unlink(missing_ok=True)
        recovery = atomic.recover(self.layout, _is_committed)
        if recovery.removed:
            log.warning(
                "savepoints: removed %d uncommitted leftover(s) of an earlier writer in %s",
                len(recovery.removed),
                self.layout.private,
            )
        return recovery

    def _acquire_lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; one writer per run is on the user
            return
        try:
            fd = os.open(self.layout.lock, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError as e:
            raise RunNotWritableError(self.root, e.strerror or "permission denied") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 256).decode(errors="replace").strip() or "unknown process"
            finally:
                os.close(fd)
            raise RunLockedError(self.root, holder) from None
        # The lock dies with the process (even on SIGKILL), so a stale lock never blocks.
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None

    # ------------------------------------------------------------------ reading

    def committed(self) -> list[tuple[Path, Manifest]]:
        found = []
        for step, folder in self.layout.candidate_dirs():
            try:
                manifest = read_manifest(folder / MANIFEST_NAME)
            except SavePointsError as e:
                log.debug("savepoints: skipping %s: %s", folder, e)
                continue
            if manifest.step != step:
                log.debug("savepoints: skipping %s: manifest says step %d", folder, manifest.step)
                continue
            found.append((folder, manifest))
        return found

    def point_dir(self, step: int) -> Path:
        return self.layout.point_dir(step)

    def state_of(self, step: int) -> PointState:
        folder = self.layout.point_dir(step)
        if not folder.exists():
            return "absent"
        return "committed" if _is_committed(folder) else "uncommitted"

    # ------------------------------------------------------------------ writing

    def stage(self, step: int) -> atomic.Staged:
        return atomic.stage_point(self.layout, step).begin()

    def commit(self, staged: atomic.Staged, manifest: Manifest, *, replace: bool) -> None:
        with self._blob_lock:
            self._blobs.intern_all(staged.path, manifest.files)
            # The manifest is the commit record: written last, then the folder is renamed.
            staged.commit(
                record=functools.partial(write_manifest, manifest=manifest, name=MANIFEST_NAME),
                replace=replace,
            )

    def rewrite_manifest(self, folder: Path, manifest: Manifest) -> None:
        atomic.replace_file(folder / MANIFEST_NAME, encode_manifest(manifest), self.layout.staging)

    def delete(self, step: int) -> None:
        try:
            atomic.retire(self.layout.point_dir(step), self.layout.new_trash_dir(step))
        except PermissionError as e:
            raise RunNotWritableError(self.root, e.strerror or "permission denied") from e

    def collect(self) -> tuple[int, int]:
        with self._blob_lock:
            return self._blobs.collect()

    def blob_path(self, digest: str) -> Path | None:
        """The stored blob of ``digest`` (None when this run keeps no blobs)."""
        return self._blobs.blob_path(digest) if self._blobs.linking else None

    def usage(self, points: Sequence[tuple[int, Path, Manifest]]) -> Usage:
        return usage(
            {step: folder for step, folder, _ in points},
            {step: manifest.files for step, _, manifest in points},
            self._blobs,
        )


def _is_committed(folder: Path) -> bool:
    try:
        read_manifest(folder / MANIFEST_NAME)
    except SavePointsError:
        return False
    return True
