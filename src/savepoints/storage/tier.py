"""A local run with a remote tier: the local run stays what it is (atomic commits, dedup,
async saves), each committed save point is pushed to the remote in the background, and
save points only the remote holds are pulled into the local run when they are asked for.

Pushes run in one background thread, in step order. A push that fails (after the
client's own retries with backoff) never stops training: it is logged, the save point
stays local and queued, and it is tried again after the next commit; ``wait()`` and
``close()`` try once more and raise :class:`~savepoints.errors.RemotePushError` naming
what is still only local. Local retention never deletes a save point that is not on the
remote yet; retention on the remote applies the run's ``Keep`` to the remote save points
(tags protect), deleting manifests first and collecting blobs past a grace period.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from savepoints import keep as keep_mod
from savepoints.errors import (
    RemoteConflictError,
    RemoteError,
    RemotePushError,
    SavePointNotFoundError,
    SavePointsError,
)
from savepoints.keep import Keep, PointInfo
from savepoints.layout import MANIFEST_NAME
from savepoints.manifest import Manifest, read_manifest
from savepoints.storage.local import LocalStorage
from savepoints.storage.remote import DEFAULT_GC_GRACE, PushReport, RemoteRun

log = logging.getLogger("savepoints")


class RemoteTier:
    """Pushes a local run's save points to ``remote`` and pulls them back."""

    def __init__(
        self, local: LocalStorage, remote: RemoteRun, *, keep: Callable[[], Keep],
        after_push: Callable[[], None] = lambda: None, gc_grace: timedelta = DEFAULT_GC_GRACE,
        flush_first: Callable[[], object] = lambda: None,
        known: Mapping[int, Manifest] | None = None,
    ) -> None:  # fmt: skip
        self.local = local
        self.remote = remote
        self._keep = keep
        self._after_push = after_push
        #: Commits what is still being saved (async): run before the exit hook pushes.
        self._flush_first = flush_first
        self.gc_grace = gc_grace
        #: The remote's save points as last seen (read when the run opens, then kept up
        #: to date by our own pushes and deletions: one writer per run).
        self.known: dict[int, Manifest] = dict(remote.points() if known is None else known)
        #: What each push did, in order (for reports and benchmarks).
        self.reports: list[PushReport] = []
        self._unpushed: set[int] = set()
        self._error: BaseException | None = None
        #: Steps the remote refuses for good (a different save point holds the step):
        #: not tried again, kept locally, raised by settle().
        self._refused: dict[int, SavePointsError] = {}
        #: Remote retention or gc failed (the pushes themselves went through).
        self._cleanup_error: BaseException | None = None
        self._cond = threading.Condition()
        self._queued = 0
        self._busy = False
        self._thread: threading.Thread | None = None
        self._closed = False
        _finish_at_exit(self)

    @property
    def url(self) -> str:
        return self.remote.url

    def remote_points(self) -> dict[int, Manifest]:
        """A copy of :attr:`known`: the push thread changes it while others read."""
        with self._cond:
            return dict(self.known)

    # ------------------------------------------------------------------ pushing

    def catch_up(self) -> None:
        """Queue the local save points newer than the remote's newest: those a process
        that died (or lost the network) committed but did not push."""
        newest = max(self.known, default=-1)
        for _, manifest in self.local.committed():
            if manifest.step > newest:
                self.submit(manifest.step)

    def submit(self, step: int) -> None:
        """Queue the committed local save point ``step`` for pushing."""
        with self._cond:
            self._unpushed.add(step)
            self._queued += 1
            self._cond.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="savepoints-push", daemon=True
                )
                self._thread.start()

    def unpushed(self) -> set[int]:
        """Steps that are only local: queued, failed, or refused by the remote."""
        with self._cond:
            return set(self._unpushed) | set(self._refused)

    def wait(self, timeout: float | None = None) -> list[int]:
        """Block until the queue is empty (or ``timeout`` seconds passed); returns the
        steps that are still only local."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queued or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(left)
            return sorted(set(self._unpushed) | set(self._refused))

    def settle(self) -> None:
        """Wait for the pushes; retry what failed once; raise if anything is still only
        local, or if remote retention failed."""
        if self.wait():
            self._push_pending()
        left = sorted(self.unpushed())
        if left:
            errors = [*self._refused.values(), *([self._error] if self._error else [])]
            why = "; ".join(_said(e) for e in errors) or "the push did not finish"
            raise RemotePushError(self.url, left, why, run=self.local.root)
        failure, self._cleanup_error = self._cleanup_error, None
        if failure is not None:
            raise RemoteError(
                self.url,
                f"Every save point is on the remote {self.url}, but its retention or "
                f"garbage collection failed: {_said(failure)}",
                "Check the credentials' right to delete objects; `savepoints rm` and "
                "`savepoints gc` on the URL do the same by hand.",
            ) from failure

    def close(self) -> None:
        try:
            self.settle()
        finally:
            self._stop()

    def abandon(self) -> list[int]:
        """Stop without waiting (an exception is leaving the run): say what is only
        local; a later open of the run pushes it."""
        left = sorted(self.unpushed())
        if left:
            log.warning(
                "savepoints: step(s) %s committed in %s are not on %s yet; they are pushed "
                "when the run is opened again, or with `savepoints push %s %s`.",
                ", ".join(map(str, left)), self.local.root, self.url, self.local.root,
                self.url,
            )  # fmt: skip
        self._stop()
        return left

    @property
    def stopped(self) -> bool:
        return self._closed

    def _stop(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queued and not self._closed:
                    self._cond.wait()
                if self._closed and not self._queued:
                    return
                self._queued = 0
                self._busy = True
            try:
                self._push_pending()
            except BaseException as e:  # never let the thread die: say it, keep it for wait()
                log.error("savepoints: pushing to %s failed: %s", self.url, e)
                self._error = e
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _push_pending(self) -> None:
        pushed = False
        with self._cond:
            pending = sorted(self._unpushed)
        for step in pending:
            folder = self.local.point_dir(step)
            try:
                manifest = read_manifest(folder / MANIFEST_NAME)
            except SavePointsError:
                log.warning(
                    "savepoints: step %d left %s before it was pushed to %s (deleted?); "
                    "it is not pushed.", step, self.local.root, self.url,
                )  # fmt: skip
                self._done(step)
                continue
            try:
                report = self.remote.push(folder, manifest)
            except RemoteConflictError as e:
                # For good: trying again cannot help, and must not hold up newer steps.
                log.error("savepoints: step %d is not pushed: %s", step, _said(e))
                with self._cond:
                    self._unpushed.discard(step)
                    self._refused[step] = e
                continue
            except (SavePointsError, OSError) as e:
                self._error = e
                log.warning(
                    "savepoints: could not push step %d to %s: %s It is safe locally and "
                    "is pushed again after the next save, or by wait()/close().",
                    step, self.url, _said(e),
                )  # fmt: skip
                break  # in step order: the newer ones wait for this one
            self.reports.append(report)
            with self._cond:
                self.known[step] = manifest
            self._done(step)
            self._catch_up_tags(step, manifest)
            pushed = True
            log.info(
                "savepoints: pushed step %d to %s (%.1f MB sent, %.1f MB already there, "
                "%.2f s)", step, self.url, report.uploaded_bytes / 1e6,
                report.skipped_bytes / 1e6, report.seconds,
            )  # fmt: skip
        if pushed:
            self._error = None
            try:
                self.apply_retention()
            except (SavePointsError, OSError) as e:
                log.error("savepoints: retention on %s failed: %s", self.url, _said(e))
                self._cleanup_error = e
            self._after_push()

    def _done(self, step: int) -> None:
        with self._cond:
            self._unpushed.discard(step)

    def _catch_up_tags(self, step: int, pushed: Manifest) -> None:
        """Tags changed while the push was in flight (push_tags saw it queued): the
        local manifest has them now."""
        try:
            now = read_manifest(self.local.point_dir(step) / MANIFEST_NAME).tags
        except SavePointsError:
            return
        if now != pushed.tags:
            self.remote.set_tags(step, now)
            with self._cond:
                self.known[step] = pushed.with_tags(now)

    def push_tags(self, step: int, tags: tuple[str, ...]) -> None:
        """Tags changed locally: change them on the remote now when the save point is
        there (a save point still queued carries its tags with it)."""
        if step in self.known and step not in self.unpushed():
            self.remote.set_tags(step, tags)
            with self._cond:
                self.known[step] = self.known[step].with_tags(tags)

    # ------------------------------------------------------------------ remote side

    def apply_retention(self) -> None:
        keep = self._keep()
        if not keep.prunes:
            return
        known = self.remote_points()
        infos = [PointInfo(s, m.metrics, m.tags) for s, m in sorted(known.items())]
        doomed = keep_mod.to_delete(infos, keep)
        for step in doomed:
            log.info("savepoints: retention deletes step %d of %s", step, self.url)
            self.remote.delete(step)
            with self._cond:
                self.known.pop(step, None)
        if doomed:
            self.remote.collect(self.gc_grace)

    def delete(self, step: int) -> None:
        if step in self.known:
            self.remote.delete(step)
            with self._cond:
                self.known.pop(step, None)

    # ------------------------------------------------------------------ pulling

    def pull(
        self, step: int, *, progress: Callable[[int], None] | None = None
    ) -> tuple[Path, Manifest]:
        """Fetch the remote save point ``step`` into the local run (verifying every file
        as it arrives; files the local blob store has are linked, not downloaded) and
        commit it there like any save point."""
        manifest = self.known.get(step)
        if manifest is None:
            manifest = self.remote.manifest(step)
        with self.local.stage(step) as staged:
            self.remote.fetch(
                manifest, staged.path, local_blob=self.local.blob_path, progress=progress
            )
            self.local.commit(staged, manifest, replace=False)
        log.info("savepoints: pulled step %d from %s", step, self.url)
        return self.local.point_dir(step), manifest


def _said(e: BaseException) -> str:
    """An error's message, without its hint, as one sentence."""
    text = e.message if isinstance(e, SavePointsError) else str(e)
    return text.rstrip(".") + "."


def _finish_at_exit(tier: RemoteTier) -> None:
    """A script that ends without ``close()`` still gets its pushes finished (or told
    what is only local). Registered with threading's exit hooks, which run before those
    of ``concurrent.futures`` (registered earlier, run later): the uploads' thread pool
    still works then; plain ``atexit`` runs too late for it."""
    ref = weakref.ref(tier)

    def finish() -> None:
        tier = ref()
        if tier is None or tier._closed:
            return
        try:
            tier._flush_first()  # an async save still being written: commit it first
        except BaseException as e:  # its own thread has said why
            log.debug("savepoints: save in flight at exit failed: %s", e)
        try:
            tier.close()
        except SavePointsError as e:
            log.error("savepoints: at exit: %s", e)

    register = getattr(threading, "_register_atexit", None)
    with contextlib.suppress(RuntimeError):  # the interpreter is shutting down already
        (register or atexit.register)(finish)


def push_run(
    run: Path, url: str, steps: Sequence[int] | None = None, *,
    storage_options: Mapping[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[PushReport]:  # fmt: skip
    """Push the committed save points of the local run ``run`` (all, or ``steps``) to
    ``url``, in step order, each only once its files are all there. Reads the run
    without its lock (a training process may be writing it)."""
    local = LocalStorage(Path(run))
    found = {m.step: (folder, m) for folder, m in local.committed()}
    missing = [s for s in steps or () if s not in found]
    if missing:
        raise SavePointNotFoundError(Path(run), missing[0], sorted(found))
    remote = RemoteRun.open(url, storage_options, writable=True)
    chosen = sorted(found) if not steps else sorted(set(steps))
    return [remote.push(*found[step], progress=progress) for step in chosen]


def pull_run(
    url: str | RemoteRun, run: Path, steps: Sequence[int] | None = None, *,
    storage_options: Mapping[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    known: Mapping[int, Manifest] | None = None,
) -> list[tuple[Path, Manifest]]:  # fmt: skip
    """Fetch save points of ``url`` (all that the local run lacks, or ``steps``) into the
    local run ``run`` (created if needed; its write lock is taken), verifying every file
    as it arrives. Nothing is pushed. ``url`` may be a remote already open, ``known``
    its save points already read (not read again)."""
    local = LocalStorage(Path(run))
    local.open_for_writing()
    try:
        remote = url if isinstance(url, RemoteRun) else RemoteRun.open(url, storage_options)
        tier = RemoteTier(local, remote, keep=Keep, known=known)
        url = remote.url
        here = {m.step for _, m in local.committed()}
        missing = [s for s in steps or () if s not in tier.known]
        if missing:
            raise SavePointNotFoundError(url, missing[0], sorted(tier.known))
        chosen = sorted(set(steps)) if steps else sorted(set(tier.known) - here)
        out = []
        for step in chosen:
            if step in here:
                continue
            folder, manifest = tier.pull(step, progress=progress)
            out.append((folder, manifest))
        return out
    finally:
        local.close()
