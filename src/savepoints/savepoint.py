"""One save point, committed (:class:`SavePoint`) or being written in the background
(:class:`PendingSave`)."""

from __future__ import annotations

import os
from concurrent.futures import Future
from datetime import datetime
from pathlib import Path
from typing import Any

from savepoints.integrity import VerifyReport, verify_point
from savepoints.layout import MANIFEST_NAME
from savepoints.manifest import Manifest, read_manifest


class SavePoint:
    """One committed save point: a folder that ``from_pretrained`` loads, plus training state.

    Cheap to create; holds the parsed manifest, never the tensors.
    """

    #: The run's remote URL when this save point is only there so far (``path`` is where
    #: it will be once fetched: ``SavePoints.latest()``, ``get()``... fetch it).
    remote: str | None = None

    def __init__(self, path: Path, manifest: Manifest, *, remote: str | None = None) -> None:
        self._path = path
        self._manifest = manifest
        self.remote = remote

    @property
    def path(self) -> Path:
        """The save point's folder."""
        return self._path

    @property
    def manifest(self) -> Manifest:
        """The parsed ``savepoint.json``."""
        return self._manifest

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> SavePoint:
        """Open a save point folder directly (no run needed)."""
        folder = Path(path)
        return cls(folder, read_manifest(folder / MANIFEST_NAME))

    @property
    def step(self) -> int:
        return self.manifest.step

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self.manifest.metrics)

    @property
    def tags(self) -> tuple[str, ...]:
        return self.manifest.tags

    @property
    def created(self) -> datetime:
        return self.manifest.created

    @property
    def preempted(self) -> str | None:
        """The signal that asked for this emergency save point (None: a regular one)."""
        return self.manifest.preempted

    @property
    def state(self) -> dict[str, Any]:
        """The user state saved with ``save(state=...)``."""
        return dict(self.manifest.state)

    @property
    def parent(self) -> int | None:
        """Step of the save point this one continued from, when known."""
        return self.manifest.parent

    @property
    def size(self) -> int:
        """Bytes of all files listed in the manifest."""
        return self.manifest.total_size

    @property
    def contents(self) -> dict[str, Any]:
        return dict(self.manifest.contents)

    def verify(self) -> VerifyReport:
        """Re-hash every file; the report names each missing, extra, truncated or altered one."""
        return verify_point(self.path)

    def __repr__(self) -> str:
        where = f", remote={self.remote!r}" if self.remote else ""
        path = str(self.path)
        return f"SavePoint(step={self.step}, path={path!r}{where}, metrics={self.metrics})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, SavePoint)
            and other.path.resolve() == self.path.resolve()
            and other.manifest.created == self.manifest.created
        )

    def __hash__(self) -> int:
        return hash((str(self.path.resolve()), self.manifest.created))


class PendingSave(SavePoint):
    """What an asynchronous ``save()`` returns: ``step`` at once; anything that needs the
    files or the manifest (``path``, metrics, verify...) waits for the commit, so
    ``from_pretrained(points.save(...).path)`` works as with a synchronous save (and
    raises the save's error if it failed). ``result()`` waits and returns the committed
    :class:`SavePoint`; ``destination`` is the folder it will have, without waiting."""

    def __init__(self, step: int, path: Path, future: Future[SavePoint]) -> None:
        self._destination = path
        self._step = step
        self._future = future

    @property
    def path(self) -> Path:
        return self.result().path

    @property
    def destination(self) -> Path:
        """Where the save point will be once committed (no wait)."""
        return self._destination

    @property
    def step(self) -> int:
        return self._step

    @property
    def manifest(self) -> Manifest:
        return self.result().manifest

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> SavePoint:
        return self._future.result(timeout)

    # Equality and hashing never wait for the commit (SavePoint's compare the manifests):
    # a pending save is the same as another only when it is the same save in flight.
    def __eq__(self, other: object) -> bool:
        return isinstance(other, PendingSave) and other._future is self._future

    def __hash__(self) -> int:
        return hash((str(self._destination), self._step, id(self._future)))

    def __repr__(self) -> str:
        state = "committed" if self.done() else "in flight"
        return f"PendingSave(step={self.step}, path={str(self._destination)!r}, {state})"
