"""The one way every command finds "the save point the user meant".

``RUN [REF]``, where REF is a number (a step), a name (a tag), ``latest`` or ``best`` (by
the metric the run's retention recorded), or a save point ``FOLDER`` (any folder holding
a ``savepoint.json``). Failures are the library's own typed errors, never a raw exception.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from savepoints import (
    InvalidArgumentError,
    SavePoint,
    SavePointNotFoundError,
    SavePoints,
    SavePointsError,
)
from savepoints.layout import MANIFEST_NAME

Default = Literal["latest", "best"]
KEYWORDS = ("latest", "best")


def is_point_folder(path: Path) -> bool:
    """A single save point folder (as opposed to a run folder)."""
    return (path / MANIFEST_NAME).is_file()


def open_run(path: Path, *, write: bool = False) -> SavePoints:
    """The run at ``path``: read-only (no lock, nothing created) unless ``write``."""
    if write:
        refuse_point_folder(path)
        # A command's saves (import) are committed, or their error said, one by one.
        return SavePoints(path, async_save=False)
    return SavePoints(path, readonly=True)


def refuse_point_folder(path: Path) -> None:
    """Writing commands take a run: opening a save point folder as a run would create a
    run's private folder inside the save point, which would then fail verification."""
    if is_point_folder(path):
        raise InvalidArgumentError(
            f"{path} is a save point folder, not a run.",
            f"Pass its run folder and the step: {path.parent} {_folder_step(path)}.",
        )


def _folder_step(path: Path) -> str:
    try:
        return str(SavePoint.open(path).step)
    except (SavePointsError, OSError):  # only for the hint
        return "STEP"


def pick(points: SavePoints, ref: str | int | None, default: Default = "latest") -> SavePoint:
    """The save point of an open run that ``ref`` names (``None``: ``default``)."""
    ref = default if ref is None else ref
    if ref == "latest":
        latest = points.latest()
        if latest is None:
            raise SavePointNotFoundError(points.path, "latest", [])
        return latest
    if ref == "best":
        return _best(points)
    if isinstance(ref, str) and ref.isdigit():
        ref = int(ref)
    return points.get(ref)


def _best(points: SavePoints) -> SavePoint:
    if points.latest() is None:
        raise SavePointNotFoundError(points.path, "best", [])
    try:
        best = points.best()
    except InvalidArgumentError:
        raise InvalidArgumentError(
            f"Run {points.path} records no metric to pick its best save point by.",
            "Name a step, a tag or 'latest' instead (`savepoints list RUN` shows them).",
        ) from None
    if best is None:  # deleted meanwhile by the process writing the run
        raise SavePointNotFoundError(points.path, "best", [])
    return best


def resolve(target: Path, ref: str | None = None, default: Default = "latest") -> SavePoint:
    """``RUN [REF]`` or ``FOLDER``: the save point the user meant, read-only."""
    if is_point_folder(target):
        if ref is not None:
            raise InvalidArgumentError(
                f"{target} is a save point folder, so a step ({ref}) cannot be used with it.",
                "Pass the run folder with a step, or the save point folder alone.",
            )
        return SavePoint.open(target)
    return pick(open_run(target), ref, default)


def resolve_best_or_latest(target: Path, step: str | None, latest: bool) -> SavePoint:
    """What ``predict`` and ``export`` use: ``--step REF``, ``--latest``, or by default the
    best save point, or the latest when the run records no metric."""
    if step is not None and latest:
        raise InvalidArgumentError(
            "--step and --latest name different save points.", "Pass one of them."
        )
    if is_point_folder(target):
        return resolve(target, step)  # --latest names the folder itself; --step is refused
    if latest:
        step = "latest"
    if step is not None:
        return resolve(target, step)
    points = open_run(target)
    try:
        return _best(points)
    except InvalidArgumentError:  # no metric recorded: the latest is the natural choice
        return pick(points, "latest")
