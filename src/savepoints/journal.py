"""The run journal: what happened to a run, one JSON object a line, append-only.

``RUN/.savepoints/journal.jsonl`` is written by the process that holds the run's write
lock (rank 0 under torch.distributed): every save (step, metrics, sizes, new bytes, how
long training stalled and how long the background took), every retention decision and
delete with the rule behind it, tags, restores, preemptions, and the metrics a training
loop logs (the Trainer's ``log_history``, ``SavePoints.log()``). The report draws its
curves and markers from it; ``savepoints log RUN`` prints it.

Each line is written with one ``write`` on a file opened ``O_APPEND`` and fsynced, so a
reader (any process, any time, without the lock) sees whole lines only, except a last
line a crash cut short: readers ignore a line without its newline and any line that is
not a JSON object, and the next writer starts on a fresh line. The journal is a record,
never a source of truth: a save point exists when its manifest does, whatever the journal
says, and a journal that cannot be written costs a warning, never a save.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import secrets
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from savepoints.layout import RunLayout

log = logging.getLogger("savepoints")

#: Every kind of line, and what it means (``savepoints log`` shows these words).
EVENTS: dict[str, str] = {
    "open": "a process opened the run to write",
    "save": "a save point was committed",
    "save_failed": "a save failed; nothing of it is visible",
    "retention": "retention deleted a save point",
    "delete": "a save point was deleted by hand",
    "tag": "a tag was added",
    "untag": "a tag was removed",
    "restore": "a save point was loaded into live objects (a resume when training goes on)",
    "preempted": "the process stopped on a preemption request, after an emergency save",
    "log": "metrics logged by the training loop",
    "storage": "bytes on disk after a save and its retention",
    "close": "the process closed the run",
}


def _clean(value: Any) -> Any:
    """JSON for the journal: non-finite floats become None (JSON has no NaN); anything
    else that is not JSON (a numpy or one-element torch scalar aside) becomes its text."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    numel = getattr(value, "numel", None)
    if hasattr(value, "item") and (numel is None or numel() == 1):
        return _clean(value.item())
    return str(value)


class Journal:
    """Appends events to one run's journal. Thread-safe; one per process and run."""

    def __init__(self, root: Path) -> None:
        self.path = RunLayout(root).journal
        #: Tells this process's lines from those of earlier and later processes.
        self.session = secrets.token_hex(4)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._closed = False
        #: A write failed part-way: the next line starts on a fresh one.
        self._torn = False
        self._warned = False

    def record(self, event: str, **fields: Any) -> None:
        """Append one event (fsynced). Never raises: the journal is a record, and a line
        that cannot be written costs a warning (once), never a save."""
        try:
            line = {**_clean(fields), "time": round(time.time(), 3), "event": event,
                    "session": self.session}  # fmt: skip
            # ASCII: a name that is not valid Unicode (a surrogate from a bytes path)
            # is escaped, not a reason to lose the line.
            data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
            with self._lock:
                if self._closed:
                    return  # after close() the run may belong to another writer
                fd = self._open()
                if self._torn:
                    data = b"\n" + data
                self._torn = True
                _write_all(fd, data)
                os.fsync(fd)
                self._torn = False
        except Exception as e:
            if not self._warned:  # once: a full disk would say it at every step
                log.warning("savepoints: could not write the run journal %s: %s", self.path, e)
                self._warned = True

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                # A crash may have cut the last line short: start on a fresh line, so
                # that the torn one stays alone (and skipped) instead of swallowing ours.
                if size:
                    with open(self.path, "rb") as f:
                        f.seek(size - 1)
                        self._torn = f.read(1) != b"\n"
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
        return self._fd

    def close(self) -> None:
        """Stop writing (later records are dropped) and close the file."""
        with self._lock:
            self._closed = True
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def session_fields() -> dict[str, Any]:
    """What an ``open`` line says of the process: who, where, with what command (its
    secrets masked: see :func:`redact_argv`)."""
    return {
        "pid": os.getpid(),
        "host": platform.node(),
        "argv": redact_argv([os.path.basename(sys.argv[0]), *sys.argv[1:]] if sys.argv else []),
        "python": platform.python_version(),
    }


#: Options whose value is a secret (``--hub_token X``, ``--password=X``, ``--api-key X``).
_SECRET_OPTION = re.compile(r"^--?[\w-]*(token|passw|secret|api[-_]?key|auth|credential)",
                            re.IGNORECASE)  # fmt: skip
MASK = "***"


def redact_argv(argv: list[str]) -> list[str]:
    """``argv`` as it may be written down (journal, manifests, published model cards):
    the values of options named like a secret masked, and URLs without their user
    part and query (``https://user:token@host/...``, ``...?sig=SAS``)."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next and not arg.startswith("-"):
            out.append(MASK)
            hide_next = False
            continue
        hide_next = False
        name, eq, _ = arg.partition("=")
        if _SECRET_OPTION.match(name):
            if eq:
                out.append(f"{name}={MASK}")
            else:
                out.append(arg)
                hide_next = True
            continue
        out.append(url_without_secrets(arg) if "://" in arg else arg)
    return out


def url_without_secrets(url: str) -> str:
    """``url`` without the user name and password it may carry and with its query masked
    (a signed URL's signature, a token parameter)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return MASK
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = MASK if parts.query else ""
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


@dataclass
class JournalText:
    """A journal as read: its events in order, and how many lines were skipped."""

    events: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0
    """Lines that were not whole JSON objects (a torn write, damage): left out."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.events)

    def __len__(self) -> int:
        return len(self.events)

    def of(self, *kinds: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") in kinds]


def read_journal(root: str | os.PathLike[str]) -> JournalText:
    """The journal of the run at ``root`` (empty when it has none). Safe while another
    process writes it: a last line still being written (or torn by a crash) is left out."""
    path = RunLayout(Path(root)).journal
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return JournalText()
    out = JournalText()
    lines = data.split(b"\n")
    if lines and lines[-1]:
        out.skipped += 1  # no newline yet: being written, or cut short by a crash
    for raw in lines[:-1]:
        if not raw.strip():
            continue
        try:
            event = json.loads(raw)
        except ValueError:
            out.skipped += 1
            continue
        if isinstance(event, dict) and isinstance(event.get("event"), str):
            out.events.append(event)
        else:
            out.skipped += 1
    return out
