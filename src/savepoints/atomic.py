"""Atomic commit of a folder, and cleanup of what a crash leaves behind.

The protocol (the same idea as orbax's atomicity module and torch DCP's ``.metadata``
written last):

1. every file is written into a private staging folder *inside the run* (the same file
   system, so the final rename is atomic) and fsynced as it is closed;
2. the staging folder and its subfolders are fsynced, so the entries exist on disk;
3. the manifest is written and fsynced last: it is the commit record;
4. the staging folder is renamed to its final name, and the run folder is fsynced so
   the rename itself survives a power cut.

A crash before step 4 leaves only a staging folder, which no reader looks at and which
the next writer removes. A crash after it leaves a complete, verified save point.
Deletion runs the other way: rename into the trash (one atomic step that makes the save
point disappear), fsync, then remove the files at leisure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


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


def commit(staging: Path, final: Path) -> None:
    """Rename a fully written staging folder (manifest included) to its final name."""
    os.rename(staging, final)
    fsync_dir(final.parent)
    fsync_dir(staging.parent)


def retire(folder: Path, trash_dir: Path) -> None:
    """Make a committed folder disappear at once, then delete its files."""
    trash_dir.parent.mkdir(parents=True, exist_ok=True)
    os.rename(folder, trash_dir)
    fsync_dir(folder.parent)
    remove_tree(trash_dir)


def remove_tree(path: Path) -> None:
    """Delete a folder; a failure leaves leftovers for the next cleanup, never raises."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path, ignore_errors=True)


def clean_private(*folders: Path) -> list[Path]:
    """Remove everything left in staging/trash folders by earlier, crashed writers.

    Only called by the process that holds the run's write lock, so nothing in them can
    belong to a live writer.
    """
    removed = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            remove_tree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            removed.append(entry)
    return removed
