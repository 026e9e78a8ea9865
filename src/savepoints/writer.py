"""The save pipeline: snapshot -> write into staging -> hash -> manifest last -> commit
-> retention.

:class:`Writer` runs it for one run, synchronously or with the writing in a background
thread (``async_save``): then only the snapshot (snapshot.py: tensors copied into reused
host buffers, now or, deferred, while the next step computes; small files written)
blocks the caller, and one save is in flight at a time.
A background failure is never silent: it is logged at once and raised again by the next
``save()``, ``wait()`` or ``close()``. At interpreter exit the save in flight is
finished; a killed process leaves it uncommitted, which no reader ever sees.

What goes into a save point is :func:`write_components`; where the bytes go is the
storage seam (storage/). Arguments reach this module already checked (validate.py).
"""

from __future__ import annotations

import errno
import logging
import os
import platform
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

import torch

from savepoints.errors import (
    DiskFullError,
    InvalidArgumentError,
    RunNotWritableError,
    SavePointExistsError,
    SavePointsError,
)
from savepoints.journal import Journal
from savepoints.lineage import Ancestry, LineageSource, lineage_for
from savepoints.manifest import Contents, FileEntry, Manifest
from savepoints.preemption import preemption_request
from savepoints.savepoint import PendingSave, SavePoint
from savepoints.snapshot import SnapshotMode, Snapshotter
from savepoints.staging import FileRecorder, LinkFn
from savepoints.storage import Storage
from savepoints.training_state import capture_rng, write_rng, write_state
from savepoints.version import __version__
from savepoints.weights import write_model, write_tokenizer

log = logging.getLogger("savepoints")

#: Fills a staging folder through the recorder and returns the manifest's ``contents``.
WriteFn = Callable[[FileRecorder], Contents]

WORKER_PREFIX = "savepoints-save"
COPY_PREFIX = "savepoints-copy"
#: How much the background writer yields to training (a nice value added to its thread).
BACKGROUND_NICENESS = 10


def _yield_to_training() -> None:
    """Lower the calling thread's scheduling priority (Linux: niceness is per thread)."""
    if sys.platform != "linux":
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICENESS)
    except OSError as e:  # a sandbox may refuse it: the save works all the same
        log.debug("savepoints: could not lower the writer thread's priority: %s", e)


def write_components(
    rec: FileRecorder,
    *,
    model: torch.nn.Module | None,
    tokenizer: Any,
    optimizer: Any,
    scheduler: Any,
    rng: bool,
    extra: Mapping[str, Any],
    files: Mapping[str, bytes],
    max_shard_size: int,
    layer_shards_above: int | None,
) -> Contents:
    """Write every component given into the staging folder; return ``contents``."""
    contents: Contents = {}
    if rec.snapshot is not None:
        # What the optimizers own may be copied later (deferred); frozen weights reused.
        rec.snapshot.declare(model, [optimizer, *extra.values()])
    if model is not None:
        contents["model"] = write_model(rec, model, max_shard_size, layer_shards_above)
    if tokenizer is not None:
        contents["tokenizer"] = write_tokenizer(rec, tokenizer)
    if optimizer is not None:
        contents["optimizer"] = write_state(rec, "optimizer", optimizer)
    if scheduler is not None:
        contents["scheduler"] = write_state(rec, "scheduler", scheduler)
    if rng:
        contents["rng"] = write_rng(rec, capture_rng())
    if extra:
        contents["extra"] = {name: write_state(rec, name, obj) for name, obj in extra.items()}
    for rel, raw in files.items():
        if rec.has(rel):
            raise InvalidArgumentError(
                f"files={{{rel!r}: ...}} would replace a file savepoints itself writes.",
                "Pick another file name.",
            )
        rec.write_bytes(rel, raw)
    if files:
        contents["files"] = sorted(files)
    return contents


class Continues:
    """What a writer knows of the save point its next one continues from: ``ancestry``
    (the last save or restore, and the chain before it). Shared by :class:`Writer` and
    :class:`savepoints.distributed.RankWriter`."""

    ancestry: Ancestry

    @property
    def parent(self) -> int | None:
        """Step of the save point the next one continues from (the last save or restore)."""
        return self.ancestry.parent

    @parent.setter
    def parent(self, step: int | None) -> None:
        self.ancestry = Ancestry(step)  # what came before it is unknown

    def continue_from(self, point: SavePoint, *, this_run: bool = True) -> None:
        """The next save point continues from ``point`` (just restored), and inherits its
        chain; of another run (a warm start), its folder is recorded too."""
        self.ancestry = continued_from(point, this_run=this_run)


class Writer(Continues):
    """Writes the save points of one run, one at a time, through ``storage``."""

    def __init__(
        self,
        storage: Storage,
        *,
        async_save: bool,
        snapshot: SnapshotMode = "eager",
        keep_record: Callable[[], dict[str, Any]],
        after_commit: Callable[[int, int, int], None],
        journal: Journal | None = None,
        lineage: LineageSource | None = None,
    ) -> None:
        self.storage = storage
        self.journal = journal
        #: What each manifest records of its origin (None: no ``lineage`` in them).
        self.lineage = lineage
        self.async_save = async_save
        self._keep_record = keep_record
        self._after_commit = after_commit
        self._snapshots = Snapshotter(snapshot)
        self._inflight: PendingSave | None = None
        #: The last save handed to the background, whoever waited for it: a new save
        #: never starts (and reuses the host buffers) before it has ended.
        self._last: Future[SavePoint] | None = None
        self._wait_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._copy_pool: ThreadPoolExecutor | None = None
        #: The save point the next one continues from (the last save or restore).
        self.ancestry = Ancestry()

    @property
    def snapshot(self) -> SnapshotMode:
        return self._snapshots.mode

    @snapshot.setter
    def snapshot(self, mode: SnapshotMode) -> None:
        self._snapshots.mode = mode

    @property
    def busy(self) -> bool:
        return self._inflight is not None and not self._inflight.done()

    def save(
        self,
        step: int,
        write: WriteFn,
        *,
        metrics: dict[str, float],
        state: dict[str, Any],
        tags: tuple[str, ...],
        overwrite: bool,
    ) -> SavePoint:
        """Run ``write`` into a staged folder and commit it. Synchronous: everything
        happens here. Asynchronous: ``write`` only snapshots; the rest runs in the
        background and a :class:`PendingSave` is returned at once."""
        if self._last is not None:
            futures_wait([self._last])  # its error is raised by wait(), not here
        started = time.perf_counter()
        preempted = preemption_request()
        replace = replaces(self.storage, step, overwrite)
        snap = self._snapshots.begin(step, buffered=self.async_save)
        try:
            staged = self.storage.stage(step)
        except BaseException as e:
            snap.abandon()
            _raise_clearly(e, self.storage.root, step)
        try:
            rec = FileRecorder(staged.path, snapshot=snap, link=self._linker())
            contents = write(rec)
            snap.taken()
        except BaseException as e:
            snap.abandon()
            staged.abort()
            _raise_clearly(e, self.storage.root, step)
        parent = self.ancestry.parent
        session = None if self.lineage is None else self.lineage.session
        self.ancestry, chain = self.ancestry.then(step, session)
        # The deferred copy runs at normal priority (the next optimizer step may wait for
        # it); writing and hashing at a lower one (see _executor).
        copied = self._copier().submit(snap.copy_deferred) if snap.deferred else None
        # How long the caller waited (filled in before the background starts, for async).
        stalled: list[float] = []

        def finish() -> SavePoint:
            began = time.perf_counter()
            try:
                if copied is not None:
                    copied.result()
                elif snap.buffered:
                    snap.copy_deferred()  # waits for device copies, spot-checks reuse
                rec.flush()
                manifest = Manifest(
                    step=step,
                    created=datetime.now(timezone.utc),
                    files=dict(rec.files),
                    metrics=metrics,
                    tags=tags,
                    state=state,
                    parent=parent,
                    contents=contents,
                    versions=versions(),
                    keep=self._keep_record(),
                    preempted=preempted,
                    lineage=lineage_for(self.lineage, chain),
                )
                snap.before_commit()
                new = new_bytes(self.storage, manifest.files)
                self.storage.commit(staged, manifest, replace=replace)
            except BaseException as e:
                staged.abort()
                if self.journal is not None:
                    self.journal.record("save_failed", step=step, error=str(e)[:500])
                if self.async_save:
                    # Never silent: logged now, raised again by the next save/wait/close.
                    log.error("savepoints: saving step %d in the background failed: %s", step, e)
                _raise_clearly(e, self.storage.root, step)
            point = SavePoint(staged.final, manifest)
            if self.journal is not None:
                ended = time.perf_counter()
                record_save(
                    self.journal, manifest, new_bytes=new,
                    stall=stalled[0] if stalled else ended - started,
                    background=ended - began if stalled else 0.0,
                    mode="async" if stalled else "sync",
                    snapshot="deferred" if snap.deferred else "eager", replaced=replace,
                )  # fmt: skip
            log.info(
                "savepoints: committed step %d (%.1f MB in %.2f s) at %s",
                step, point.size / 1e6, time.perf_counter() - started, staged.final,
            )  # fmt: skip
            self._after_commit(step, manifest.total_size, new)
            return point

        if not snap.buffered:
            return finish()
        stalled.append(time.perf_counter() - started)
        self._last = self._executor().submit(finish)
        self._inflight = PendingSave(step, staged.final, self._last)
        _WITH_SAVES_IN_FLIGHT.add(self)
        return self._inflight

    def wait(self) -> SavePoint | None:
        """Block until the save in flight is committed; raise its error, once."""
        if in_worker():
            return None  # called from the save itself (retention): never wait for oneself
        with self._wait_lock:  # one caller takes the save (and its error)
            pending, self._inflight = self._inflight, None
        point = None if pending is None else pending.result()
        for late in self._snapshots.late_failures():
            raise late  # found at an optimizer step after the save was committed
        return point

    def settle(self) -> None:
        """Wait until the save in flight has ended, without taking its result: its error
        stays for the next ``save()``, ``wait()`` or ``close()``. For readers, any thread."""
        last = self._last
        if last is not None and not in_worker():
            futures_wait([last])

    def close(self) -> None:
        """Finish the save in flight (raising its error), then stop the thread."""
        try:
            self.wait()
        finally:
            self._snapshots.close()
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            if self._copy_pool is not None:
                self._copy_pool.shutdown(wait=True)
                self._copy_pool = None

    def _linker(self) -> LinkFn | None:
        """Links a stored blob into a staging folder (for files that did not change)."""
        blob_path = getattr(self.storage, "blob_path", None)
        if blob_path is None:
            return None

        def link(path: Path, entry: FileEntry) -> bool:
            blob = blob_path(entry.hash)
            try:
                if blob is None or os.stat(blob).st_size != entry.size:
                    return False
                os.link(blob, path)
            except OSError:
                return False  # collected meanwhile, or no hard links: written instead
            return True

        return link

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            # One worker: saves commit in order, and the snapshot buffers are reused only
            # once the save that filled them is written. It runs at a lower priority:
            # where cores are few, writing and hashing take the cycles training leaves,
            # instead of slowing its steps down (and when training waits, it runs at
            # full speed all the same).
            self._pool = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=WORKER_PREFIX, initializer=_yield_to_training
            )
        return self._pool

    def _copier(self) -> ThreadPoolExecutor:
        if self._copy_pool is None:
            self._copy_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=COPY_PREFIX)
        return self._copy_pool


def continued_from(point: SavePoint, *, this_run: bool) -> Ancestry:
    """The ancestry of a save point written after restoring ``point``."""
    elsewhere = None
    if not this_run:
        try:
            elsewhere = str(point.path.resolve())
        except OSError:
            elsewhere = str(point.path.absolute())
    return Ancestry.restored(point.manifest, elsewhere)


def replaces(storage: Storage, step: int, overwrite: bool) -> bool:
    """Whether a save of ``step`` replaces a folder in the way (only with ``overwrite``)."""
    found = storage.state_of(step)
    if found == "absent":
        return False
    if overwrite:
        return True
    raise SavePointExistsError(storage.point_dir(step), step, committed=found == "committed")


def new_bytes(storage: Storage, files: Mapping[str, FileEntry]) -> int:
    """Bytes of ``files`` the run does not hold yet (what a commit adds to the disk)."""
    blob_path = getattr(storage, "blob_path", None)
    seen: set[str] = set()
    new = 0
    for entry in files.values():
        if entry.hash in seen:
            continue
        seen.add(entry.hash)
        blob = None if blob_path is None else blob_path(entry.hash)
        if blob is None or not blob.exists():
            new += entry.size
    return new


def record_save(
    journal: Journal, manifest: Manifest, *, new_bytes: int, stall: float, background: float,
    mode: str, snapshot: str, replaced: bool,
) -> None:  # fmt: skip
    """The journal's line for a committed save point."""
    journal.record(
        "save", step=manifest.step, metrics=manifest.metrics, tags=list(manifest.tags),
        size=manifest.total_size, files=len(manifest.files), new_bytes=new_bytes,
        stall_s=round(stall, 4), background_s=round(background, 4), mode=mode,
        snapshot=snapshot, parent=manifest.parent, preempted=manifest.preempted,
        replaced=replaced,
    )  # fmt: skip


def in_worker() -> bool:
    """Whether this code runs in a background save (retention after a commit)."""
    return threading.current_thread().name.startswith(WORKER_PREFIX)


def versions() -> dict[str, str]:
    """Library versions recorded in each manifest."""
    found = {
        "savepoints": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for name in ("safetensors", "numpy", "transformers", "tokenizers"):
        # Only what is already imported: the core never imports transformers itself.
        module = sys.modules.get(name)
        if module is not None:
            found[name] = str(getattr(module, "__version__", "?"))
    return found


def clear_error(e: BaseException, run: Path, step: int) -> BaseException:
    """The typed error a user can act on for an error of a failed save (chained)."""
    clear: BaseException | None = None
    if isinstance(e, PermissionError) and not isinstance(e, SavePointsError):
        clear = RunNotWritableError(run, e.strerror or "permission denied")
    elif isinstance(e, OSError) and not isinstance(e, SavePointsError) and e.errno == errno.ENOSPC:
        clear = DiskFullError(run, step)
    if clear is None:
        return e
    clear.__cause__ = e
    return clear


def _raise_clearly(e: BaseException, run: Path, step: int) -> NoReturn:
    """Re-raise an error of a failed save as the typed error a user can act on."""
    raise clear_error(e, run, step)


_WITH_SAVES_IN_FLIGHT: weakref.WeakSet[Writer] = weakref.WeakSet()


def finish_saves_in_flight() -> None:
    """Let the asynchronous saves in flight commit (their errors are logged already).
    Run at interpreter exit, registered with threading's exit hooks, which run before
    thread pools stop taking work (atexit would run too late). A save that cannot finish
    stays uncommitted, never visible."""
    for writer in list(_WITH_SAVES_IN_FLIGHT):
        try:
            writer.wait()
        except BaseException as e:  # already logged by the background thread
            log.debug("savepoints: save in flight at exit failed: %s", e)


_register = getattr(threading, "_register_atexit", None)
if _register is not None:
    _register(finish_saves_in_flight)
else:  # pragma: no cover - very old or unusual Pythons
    import atexit

    atexit.register(finish_saves_in_flight)
