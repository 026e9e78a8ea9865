"""The commit protocol: one object that makes a folder appear whole or not at all.

Every folder savepoints makes visible (a save point, a compacted or expanded rewrite of
one, an export) goes through :class:`Staged` (the same idea as orbax's
``TemporaryPath`` and torch DCP's ``.metadata`` written last)::

    staged = Staged(path=private_staging_folder, final=where_it_belongs, trash=...)
    with staged:                 # an exception inside aborts: the staging folder goes
        ...write files into staged.path, each fsynced as it is closed...
        staged.commit(record=write_manifest, replace=False)

``commit`` runs the steps in this order:

1. every folder below ``staged.path`` is fsynced, so the files' entries exist on disk;
2. ``record`` writes the commit record (the manifest) *last*, and the folder is fsynced;
3. the staging folder is renamed to its final name (one atomic rename: the staging
   folder is inside the destination's file system), and the parent folder is fsynced so
   the rename survives a power cut.

A crash before step 3 leaves only a staging folder, which no reader looks at and which
the next writer removes. A crash after it leaves a complete, verified save point.

**Replacing** an existing folder (``replace=True``: ``save(..., overwrite=True)``,
compact/expand) never deletes the old version before the new one is in place:

a. the old folder is renamed into the trash under a *replaced* name (the step folder is
   absent for a moment, but the old version is whole in the trash);
b. the new folder is renamed into place; both folders are fsynced;
c. only then is the trashed old version deleted.

A crash between a and b leaves the step folder missing and the old version in the trash:
:func:`recover`, run when a writer opens the run, puts it back. So after any crash the
step holds the old or the new version, never neither. (Linux's
``renameat2(RENAME_EXCHANGE)`` would swap the two in one step, but Python does not
expose it and other systems lack it; the trash gives the same guarantee everywhere.)

**Deleting** runs the other way: rename into the trash (one atomic step that makes the
save point disappear), fsync, then remove the files at leisure. A deleted save point is
never put back: only *replaced* names are recovered.

**Replacing one file** (a manifest whose tags changed): :func:`replace_file` writes a
temporary file beside it, fsyncs it, renames it over the old one and fsyncs the folder;
readers see the old file or the new one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

from savepoints.layout import RunLayout

log = logging.getLogger("savepoints")


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (creations, renames) durable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # not supported on this platform (Windows); rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; nothing more can be done
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every folder below and including ``root`` (files were fsynced when written)."""
    for dirpath, _dirnames, _files in os.walk(root, topdown=False):
        fsync_dir(Path(dirpath))


def _rename(source: Path, target: Path) -> None:
    """Every rename of the protocol goes through here: the moments a crash test kills."""
    os.rename(source, target)


def remove_tree(path: Path) -> None:
    """Delete a folder; a failure leaves leftovers for the next cleanup, never raises."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path, ignore_errors=True)


#: What a step's folder is: missing, a committed save point, or something in the way.
PointState = Literal["absent", "committed", "uncommitted"]


@dataclass
class Staged:
    """A folder being written, invisible until :meth:`commit` renames it into place."""

    path: Path
    """Where the files are written: a private folder on the destination's file system."""
    final: Path
    """The name the folder has once committed."""
    trash: Path | None = None
    """Where a replaced old version waits until the new one is in place (needed for
    ``commit(replace=True)``); :func:`recover` puts it back after a crash."""
    state: Literal["open", "committed", "aborted"] = field(default="open", init=False)

    def begin(self) -> Staged:
        """Create the staging folder (and its parents)."""
        self.path.mkdir(parents=True)
        return self

    def __enter__(self) -> Staged:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()

    def commit(
        self, *, record: Callable[[Path], None] | None = None, replace: bool = False
    ) -> None:
        """Make the staged folder the final one: fsync, write ``record`` last, rename.

        ``replace=True`` replaces an existing final folder without ever leaving the step
        with neither version (see the module's docstring). Without it, an existing
        non-empty final folder makes the rename fail and nothing changes.
        """
        if self.state != "open":
            raise RuntimeError(f"staged folder {self.path} is already {self.state}")
        fsync_tree(self.path)
        if record is not None:
            record(self.path)
            fsync_dir(self.path)
        if replace and self.final.exists():
            if self.trash is None:
                raise ValueError("replacing a folder needs a trash path to keep the old one")
            self.trash.parent.mkdir(parents=True, exist_ok=True)
            _rename(self.final, self.trash)
            fsync_dir(self.final.parent)
            try:
                _rename(self.path, self.final)
            except BaseException:
                # Put the old version back: the step must never be left with neither.
                _rename(self.trash, self.final)
                raise
            self._made_durable()
            fsync_dir(self.trash.parent)
            self.state = "committed"
            remove_tree(self.trash)
            return
        _rename(self.path, self.final)
        self._made_durable()
        self.state = "committed"

    def _made_durable(self) -> None:
        fsync_dir(self.final.parent)
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        """Remove the staging folder; nothing visible changes. Idempotent."""
        if self.state == "open":
            remove_tree(self.path)
            self.state = "aborted"


def stage_point(layout: RunLayout, step: int) -> Staged:
    """A staged save point folder for ``step`` of the run at ``layout``."""
    return Staged(
        path=layout.new_staging_dir(step),
        final=layout.point_dir(step),
        trash=layout.new_replaced_dir(step),
    )


def stage_beside(final: Path) -> Staged:
    """A staged folder next to ``final`` (outside any run: an export)."""
    return Staged(path=final.parent / f".{final.name}.tmp-{secrets.token_hex(4)}", final=final)


def retire(folder: Path, trash_dir: Path) -> None:
    """Make a committed folder disappear at once, then delete its files.

    The rename is the delete: if it fails, the error is raised and nothing changed. A
    failure while removing the files afterwards leaves leftovers in the trash for the
    next writer to clean, never a half-deleted save point in the run.
    """
    trash_dir.parent.mkdir(parents=True, exist_ok=True)
    _rename(folder, trash_dir)
    fsync_dir(folder.parent)
    remove_tree(trash_dir)


def replace_file(path: Path, data: bytes, scratch: Path) -> None:
    """Replace one file atomically: readers see the old or the new bytes, never a mix.

    ``scratch`` is a private folder on the same file system for the temporary file.
    """
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = scratch / f"{path.name}.{secrets.token_hex(4)}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


@dataclass
class Recovery:
    """What :func:`recover` did when a writer opened a run."""

    restored: list[int] = field(default_factory=list)
    """Steps whose old version was put back (a crash in the middle of a replace)."""
    removed: list[Path] = field(default_factory=list)
    """Uncommitted staging folders and trash that crashed writers left."""


def recover(layout: RunLayout, is_committed: Callable[[Path], bool]) -> Recovery:
    """Undo what a crash in the middle of a commit left, and clean the private area.

    Only called by the process that holds the run's write lock, so nothing in staging or
    trash can belong to a live writer. A replaced old version whose step folder is
    missing (the crash came between the two renames of a replace) is renamed back;
    everything else in staging and trash is removed.
    """
    out = Recovery()
    if layout.trash.is_dir():
        for entry in sorted(layout.trash.iterdir()):
            step = layout.parse_replaced(entry.name)
            if step is None or entry.is_symlink() or not entry.is_dir():
                continue
            final = layout.point_dir(step)
            if final.exists() or not is_committed(entry):
                continue
            _rename(entry, final)
            fsync_dir(final.parent)
            out.restored.append(step)
            log.warning(
                "savepoints: put back step %d of %s: a crash interrupted replacing it, so "
                "its previous version is restored",
                step,
                layout.root,
            )
    for folder in (layout.staging, layout.trash):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                remove_tree(entry)
            else:
                entry.unlink()
            out.removed.append(entry)
    return out
