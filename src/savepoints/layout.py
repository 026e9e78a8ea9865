"""The one place that names and parses the folders of a run.

A run folder holds::

    step-00000100/          a committed save point (has a valid savepoint.json)
    step-00000200/
    .savepoints/            private: never a save point
        lock                held (flock) by the one process writing the run
        preempted.json      left by a preempted exit until the run is next opened to write
        journal.jsonl       what happened to the run, one JSON object a line (journal.py)
        staging/            save points being written; anything here is uncommitted
        trash/              save points being deleted (renamed here first, so a crash
                            mid-delete never leaves a half-deleted folder in the run),
                            and old versions being replaced (``step-N.<rand>.replaced``:
                            put back on open when a crash left the step folder missing)
        blobs/              content-addressed file contents; save point files are hard
                            links to them, so unchanged files are stored once (store.py)

Steps are zero-padded to 8 digits so that ``ls`` sorts them; longer steps simply use
more digits, and parsing accepts any number of digits.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MANIFEST_NAME = "savepoint.json"
PRIVATE_DIR = ".savepoints"
STEP_PREFIX = "step-"
_STEP_RE = re.compile(r"^step-(\d+)$")
REPLACED_SUFFIX = ".replaced"
_REPLACED_RE = re.compile(r"^(step-\d+)\.[0-9a-f]+\.replaced$")
#: Training state kept next to the model files, in a subfolder that Transformers ignores.
TRAINING_STATE_DIR = "training_state"


def folder_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def parse_step(name: str) -> int | None:
    """The step a folder name stands for, or None when it is not a save point name."""
    m = _STEP_RE.match(name)
    if not m:
        return None
    step = int(m.group(1))
    # Only the canonical spelling counts, so two folders never claim the same step.
    return step if folder_name(step) == name else None


@dataclass(frozen=True)
class RunLayout:
    """Paths inside one run folder."""

    root: Path

    @property
    def private(self) -> Path:
        return self.root / PRIVATE_DIR

    @property
    def staging(self) -> Path:
        return self.private / "staging"

    @property
    def trash(self) -> Path:
        return self.private / "trash"

    @property
    def blobs(self) -> Path:
        return self.private / "blobs"

    @property
    def lock(self) -> Path:
        return self.private / "lock"

    @property
    def preempted(self) -> Path:
        """The mark a preempted exit leaves for schedulers and wrappers (JSON)."""
        return self.private / "preempted.json"

    @property
    def journal(self) -> Path:
        """The run journal: saves, retention, restores, logged metrics (append-only)."""
        return self.private / "journal.jsonl"

    def point_dir(self, step: int) -> Path:
        return self.root / folder_name(step)

    def new_staging_dir(self, step: int) -> Path:
        # A random suffix: a retried save of the same step never meets its own leftovers.
        return self.staging / f"{folder_name(step)}.{secrets.token_hex(4)}"

    def new_trash_dir(self, step: int) -> Path:
        return self.trash / f"{folder_name(step)}.{secrets.token_hex(4)}"

    def new_replaced_dir(self, step: int) -> Path:
        """Where the old version of a save point waits while a new one replaces it."""
        return self.trash / f"{folder_name(step)}.{secrets.token_hex(4)}{REPLACED_SUFFIX}"

    @staticmethod
    def parse_replaced(name: str) -> int | None:
        """The step of a replaced old version in the trash, or None for other names."""
        m = _REPLACED_RE.match(name)
        return parse_step(m.group(1)) if m else None

    def candidate_dirs(self) -> Iterator[tuple[int, Path]]:
        """Folders named like save points, sorted by step. Committed or not: callers
        check the manifest, since a folder without a valid one does not exist for them."""
        if not self.root.is_dir():
            return
        found = []
        for entry in self.root.iterdir():
            step = parse_step(entry.name)
            if step is not None and entry.is_dir() and not entry.is_symlink():
                found.append((step, entry))
        found.sort()
        yield from found
