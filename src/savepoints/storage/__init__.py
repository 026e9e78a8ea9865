"""The storage seam: everything the save and restore paths do to a run's files.

:class:`Storage` is the narrow interface the write pipeline (writer.py) and the facade
(manager.py) use: open the run for writing (lock, recovery), list what is committed,
stage a new save point, commit it (content-addressed store, manifest last, atomic
rename), rewrite a manifest, delete, collect garbage, report usage. The local file
system (:class:`~savepoints.storage.local.LocalStorage`) is the first implementation;
object storage and several ranks writing one save point are further implementations of
the same interface, not branches in the pipeline.

Save point folders are always local paths (for a remote tier: a local cache), so
readers (``from_pretrained``, verify, restore) see plain folders.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from savepoints.atomic import PointState, Recovery, Staged
from savepoints.manifest import Manifest
from savepoints.storage.local import LocalStorage, Usage


class Storage(Protocol):
    """Where the save points of one run live."""

    root: Path

    @property
    def dedup(self) -> bool:
        """Whether identical files are stored once (False where it cannot be done)."""
        ...

    def open_for_writing(self) -> Recovery:
        """Create the run if needed, take the single-writer lock, undo what a crashed
        writer left. Raises a typed error when the run cannot be written."""
        ...

    def close(self) -> None:
        """Release the writer's lock (idempotent)."""
        ...

    def committed(self) -> list[tuple[Path, Manifest]]:
        """Committed save points, by step: folders whose manifest is valid and names
        their own step. Anything else does not exist for readers."""
        ...

    def point_dir(self, step: int) -> Path:
        """Where the save point of ``step`` lives (whether or not it exists)."""
        ...

    def state_of(self, step: int) -> PointState:
        """``"absent"``, ``"committed"``, or ``"uncommitted"`` (a folder without a valid
        manifest is in the way)."""
        ...

    def stage(self, step: int) -> Staged:
        """A new, empty staging folder for ``step``, invisible to readers."""
        ...

    def commit(self, staged: Staged, manifest: Manifest, *, replace: bool) -> None:
        """Store the staged files, write ``manifest`` last, make the folder visible."""
        ...

    def rewrite_manifest(self, folder: Path, manifest: Manifest) -> None:
        """Replace a committed save point's manifest atomically (tags changed)."""
        ...

    def delete(self, step: int) -> None:
        """Make a committed save point disappear atomically; raises if it cannot."""
        ...

    def collect(self) -> tuple[int, int]:
        """Free stored contents no save point references: (items, bytes)."""
        ...

    def usage(self, points: Sequence[tuple[int, Path, Manifest]]) -> Usage:
        """Logical and physical bytes of the given save points."""
        ...


__all__ = ["LocalStorage", "Storage", "Usage"]
