"""``SavePoints``: save, list, pick and restore the save points of one run.

The public methods are templates: each runs the shared guards once (argument checks
before any I/O, the write lock, closed/read-only checks) and then the private steps
(``_write_components``, ``_commit``, ``_apply_retention``). Tests inject crashes by
patching those steps.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import errno
import functools
import logging
import os
import platform
import re
import socket
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, NoReturn

import torch

from savepoints import atomic, components
from savepoints import keep as keep_mod
from savepoints.errors import (
    DiskFullError,
    InvalidArgumentError,
    MetricNotFoundError,
    NotARunError,
    NothingToRestoreError,
    ReadOnlyRunError,
    RunClosedError,
    RunLockedError,
    RunNotFoundError,
    RunNotWritableError,
    SavePointExistsError,
    SavePointNotFoundError,
    SavePointsError,
    TagInUseError,
)
from savepoints.integrity import Problem, VerifyReport, verify_files
from savepoints.keep import Keep, Mode, PointInfo
from savepoints.layout import MANIFEST_NAME, RunLayout, parse_step
from savepoints.manifest import (
    Manifest,
    encode_manifest,
    is_safe_relpath,
    manifest_hash_problem,
    read_manifest,
    read_manifest_bytes,
    write_manifest,
)
from savepoints.serialize import check_json, encode_tree
from savepoints.store import BlobStore, Usage, usage

log = logging.getLogger("savepoints")

__version__ = "0.2.0"


class SavePoint:
    """One committed save point: a folder that ``from_pretrained`` loads, plus training state.

    Cheap to create; holds the parsed manifest, never the tensors.
    """

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self._manifest = manifest

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
        return _verify_point(self.path)

    def __repr__(self) -> str:
        return f"SavePoint(step={self.step}, path={str(self.path)!r}, metrics={self.metrics})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, SavePoint)
            and other.path.resolve() == self.path.resolve()
            and other.manifest.created == self.manifest.created
        )

    def __hash__(self) -> int:
        return hash((str(self.path.resolve()), self.manifest.created))


class PendingSave(SavePoint):
    """What an asynchronous ``save()`` returns: ``step`` and ``path`` at once; anything
    that needs the manifest (metrics, files, verify...) waits for the commit.
    ``result()`` waits and returns the committed :class:`SavePoint`."""

    def __init__(self, step: int, path: Path, future: Future[SavePoint]) -> None:
        self.path = path
        self._step = step
        self._future = future

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
        return hash((str(self.path), self._step, id(self._future)))

    def __repr__(self) -> str:
        state = "committed" if self.done() else "in flight"
        return f"PendingSave(step={self.step}, path={str(self.path)!r}, {state})"


class SavePoints:
    """The save points of one run folder.

    ``SavePoints(path)`` opens the run for writing: it creates the folder if needed,
    takes a lock so that no second process writes into it, and removes what crashed
    writers left in its private staging area. ``readonly=True`` opens an existing run
    to read and restore only (no lock: safe while another process trains).

    Options: ``keep`` (retention, default keep all); ``max_shard_size`` (bytes per
    weights shard); ``layer_shards_above`` (weights of at least this many bytes are
    written one shard per layer, so unchanged layers are stored once; None turns it off);
    ``dedup`` (store identical files once through hard links; on by default);
    ``async_save`` (``save()`` only snapshots the state into host buffers that are
    allocated once and reused, and returns a :class:`PendingSave`; writing, hashing,
    commit and retention run in a background thread, one save at a time); ``if_busy``
    (what an asynchronous ``save()`` does while the previous one is still being written:
    ``"wait"`` for it, or ``"skip"`` this save and return None).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        keep: Keep | None = None,
        readonly: bool = False,
        max_shard_size: int = components.DEFAULT_MAX_SHARD_BYTES,
        layer_shards_above: int | None = components.LAYER_SHARDS_ABOVE,
        dedup: bool = True,
        async_save: bool = False,
        if_busy: Literal["wait", "skip"] = "wait",
    ) -> None:
        if keep is not None and not isinstance(keep, Keep):
            raise InvalidArgumentError(
                f"keep must be a savepoints.Keep, not {type(keep).__name__}.",
                "Pass keep=Keep(last=3, best=1, metric='eval_loss', mode='min').",
            )
        if not isinstance(max_shard_size, int) or max_shard_size < 1:
            raise InvalidArgumentError(
                f"max_shard_size={max_shard_size!r} is not a positive number of bytes.",
                "Pass e.g. max_shard_size=2 * 1024**3 for 2 GiB shards.",
            )
        self.path = Path(path)
        self.keep = keep or Keep()
        # Integrations fill in a Keep from their own settings only when none was given.
        self._keep_given = keep is not None
        self.readonly = readonly
        if if_busy not in ("wait", "skip"):
            raise InvalidArgumentError(
                f"if_busy={if_busy!r} is not allowed.", "Use if_busy='wait' or if_busy='skip'."
            )
        self.max_shard_size = max_shard_size
        self.async_save = async_save
        self.if_busy = if_busy
        self._buffers = components.HostBuffers()
        self._inflight: PendingSave | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.layer_shards_above = layer_shards_above
        self._layout = RunLayout(self.path)
        self._store = BlobStore(self._layout.blobs)
        self._store.linking = dedup
        self._lock_fd: int | None = None
        self._closed = False
        self._parent: int | None = None
        if self.path.exists() and not self.path.is_dir():
            raise NotARunError(self.path, "it is a file, not a folder")
        if readonly:
            if not self.path.is_dir():
                raise RunNotFoundError(self.path)
            return
        try:
            self._layout.private.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise NotARunError(self.path, "a part of the path is a file") from None
        except PermissionError as e:
            raise RunNotWritableError(self.path, e.strerror or "permission denied") from None
        except OSError as e:
            raise RunNotWritableError(self.path, e.strerror or str(e)) from None
        self._acquire_lock()
        recovery = atomic.recover(self._layout, _is_committed)
        if recovery.removed:
            log.warning(
                "savepoints: removed %d uncommitted leftover(s) of an earlier writer in %s",
                len(recovery.removed),
                self._layout.private,
            )

    # ---------------------------------------------------------------- context / lock

    def __enter__(self) -> SavePoints:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Finish the save in flight (raising its error, if it failed), then release the
        run's write lock. Idempotent."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            if self._lock_fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._lock_fd)
                self._lock_fd = None
            self._closed = True

    def wait(self) -> SavePoint | None:
        """Block until the asynchronous save in flight is committed, and return it (None
        when nothing is in flight). A background failure is raised here, once."""
        if threading.current_thread().name.startswith(_WORKER_PREFIX):
            return None  # called from the save itself (retention): never wait for oneself
        pending, self._inflight = self._inflight, None
        return None if pending is None else pending.result()

    @property
    def busy(self) -> bool:
        """Whether an asynchronous save is still being written."""
        return self._inflight is not None and not self._inflight.done()

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            # One worker: saves commit in order, and the snapshot buffers are reused only
            # once the save that filled them is written.
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=_WORKER_PREFIX)
        return self._pool

    def __del__(self) -> None:
        with contextlib.suppress(BaseException):
            self.close()

    def _acquire_lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; one writer per run is on the user
            return
        try:
            fd = os.open(self._layout.lock, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError as e:
            raise RunNotWritableError(self.path, e.strerror or "permission denied") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 256).decode(errors="replace").strip() or "unknown process"
            finally:
                os.close(fd)
            raise RunLockedError(self.path, holder) from None
        # The lock dies with the process (even on SIGKILL), so a stale lock never blocks.
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._lock_fd = fd

    def _check_writable(self, action: str) -> None:
        if self.readonly:
            raise ReadOnlyRunError(self.path, action)
        if self._closed:
            raise RunClosedError(self.path, action)
        self.wait()  # one writer at a time: the save in flight first (and its error)

    # ---------------------------------------------------------------- reading

    def list(self) -> list[SavePoint]:
        """Committed save points, sorted by step. Folders without a valid manifest
        (uncommitted, damaged, or of an unknown format) are left out."""
        points = []
        for step, folder in self._layout.candidate_dirs():
            try:
                manifest = read_manifest(folder / MANIFEST_NAME)
            except SavePointsError as e:
                log.debug("savepoints: skipping %s: %s", folder, e)
                continue
            if manifest.step != step:
                log.debug("savepoints: skipping %s: manifest says step %d", folder, manifest.step)
                continue
            points.append(SavePoint(folder, manifest))
        return points

    def latest(self) -> SavePoint | None:
        points = self.list()
        return points[-1] if points else None

    def best(self, metric: str | None = None, mode: Mode | None = None) -> SavePoint | None:
        """The best save point by ``metric`` (default: the ``Keep``'s), or None if the
        run has none. Raises when no save point recorded that metric."""
        points = self.list()
        metric, mode = self._best_rule(points, metric, mode)
        if not points:
            return None
        ranked = keep_mod.rank_best(_infos(points), metric, mode)
        if not ranked:
            raise MetricNotFoundError(self.path, metric, [m for p in points for m in p.metrics])
        step = ranked[0].step
        return next(p for p in points if p.step == step)

    def _best_rule(
        self, points: builtins.list[SavePoint], metric: str | None, mode: Mode | None
    ) -> tuple[str, Mode]:
        """The metric and mode that define "best": given, else this run's Keep, else
        the Keep recorded in the newest save point (so readers need not repeat it)."""
        rule: dict[str, Any] = {}
        if self.keep.metric:
            rule = {"metric": self.keep.metric, "mode": self.keep.mode}
        elif points and points[-1].manifest.keep and points[-1].manifest.keep.get("metric"):
            rule = points[-1].manifest.keep
        metric = metric or rule.get("metric")
        if metric is None:
            raise InvalidArgumentError(
                "best() needs a metric, and this run's Keep names none.",
                "Call best(metric='eval_loss', mode='min'), or open the run with "
                "keep=Keep(metric=..., mode=...).",
            )
        if mode is None:
            same = metric == rule.get("metric") and rule.get("mode")
            mode = rule["mode"] if same else keep_mod.default_mode(metric)
        if mode not in ("min", "max"):
            raise InvalidArgumentError(
                f"best(mode={mode!r}) is not allowed.", "Use mode='min' or mode='max'."
            )
        return metric, mode

    def get(self, step: int | str) -> SavePoint:
        """The committed save point of ``step``, or the one tagged ``step`` when it is a
        name (``get("release-1")``); a clear error when there is none."""
        points = self.list()
        for p in points:
            if (p.step == step and not isinstance(step, str)) or (
                isinstance(step, str) and step in p.tags
            ):
                return p
        if isinstance(step, str) and step.isdigit():
            return self.get(int(step))
        raise SavePointNotFoundError(self.path, step, [p.step for p in points])

    def tag(self, step: int | str, name: str) -> SavePoint:
        """Add tag ``name`` to a save point. Tagged save points are kept by retention; a
        tag names one save point in the run, so it can be used instead of a step."""
        self._check_writable("tag a save point")
        (clean,) = _check_tags([name])
        point = self.get(step)
        holder = self._tag_holder(clean)
        if holder is not None and holder.step != point.step:
            raise TagInUseError(self.path, clean, holder.step)
        if clean in point.tags:
            return point
        return self._rewrite_tags(point, (*point.tags, clean))

    def untag(self, step: int | str, name: str) -> SavePoint:
        """Remove tag ``name`` from a save point (retention may then delete it)."""
        self._check_writable("untag a save point")
        point = self.get(step)
        if name not in point.tags:
            raise InvalidArgumentError(
                f"Step {point.step} of {self.path} has no tag {name!r} "
                f"(its tags: {', '.join(point.tags) or 'none'}).",
                "Check the name with `savepoints list RUN`.",
            )
        updated = self._rewrite_tags(point, tuple(t for t in point.tags if t != name))
        self._apply_retention()
        return updated

    def _tag_holder(self, name: str) -> SavePoint | None:
        return next((p for p in self.list() if name in p.tags), None)

    def _rewrite_tags(self, point: SavePoint, tags: tuple[str, ...]) -> SavePoint:
        # The manifest is replaced in one rename: readers see the old one or the new one.
        manifest = point.manifest.with_tags(tags)
        atomic.replace_file(point.path / MANIFEST_NAME, encode_manifest(manifest),
                            self._layout.staging)  # fmt: skip
        return SavePoint(point.path, manifest)

    def compact(self, step: int | str, *, expand: bool = False) -> SavePoint:
        """Compress a save point's tensor files losslessly (byte grouping + zstd), or with
        ``expand=True`` rebuild the originals. The save point is replaced atomically;
        ``restore()`` reads compacted save points, ``from_pretrained`` needs them expanded."""
        from savepoints import compact as compact_mod

        self._check_writable("compact a save point")
        point = self.get(step)
        with atomic.stage_point(self._layout, point.step).begin() as staged:
            manifest = compact_mod.rewrite(point.path, point.manifest, staged.path, not expand)
            self._store.intern_all(staged.path, manifest.files)
            self._commit(staged, manifest, replace=True)
        self._store.collect()
        return SavePoint(point.path, manifest)

    def folder_for(self, step: int) -> Path:
        """Where the save point of ``step`` lives (whether or not it exists yet)."""
        return self._layout.point_dir(_check_step(step))

    def verify(self) -> VerifyReport:
        """Verify every save point folder of the run."""
        return _verify_run(self.path)

    # ---------------------------------------------------------------- saving

    def save(
        self,
        step: int,
        *,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        optimizer: Any = None,
        scheduler: Any = None,
        metrics: Mapping[str, float] | None = None,
        state: Mapping[str, Any] | None = None,
        tags: Sequence[str] = (),
        rng: bool = True,
        extra: Mapping[str, Any] | None = None,
        files: Mapping[str, bytes | str] | None = None,
        overwrite: bool = False,
    ) -> SavePoint:
        """Write a save point for ``step`` and commit it atomically; then apply retention.

        ``extra`` names further objects with ``state_dict()`` (a grad scaler, an EMA
        model...), stored pickle-free like the optimizer and restored with
        ``restore(extra=...)``. ``files`` places small extra files in the folder as
        they are (e.g. ``trainer_state.json``); they are hashed and verified like the rest.

        Returns the committed :class:`SavePoint`; with ``async_save``, a
        :class:`PendingSave` as soon as the snapshot is taken (or None when
        ``if_busy="skip"`` drops this save). If anything fails, nothing committed before
        is touched and no partial save point becomes visible.
        """
        if self.if_busy == "skip" and self.busy:
            log.info("savepoints: skipped save of step %s: the previous save is in flight", step)
            return None  # type: ignore[return-value]
        self._check_writable("save")
        step = _check_step(step)
        clean_metrics = _check_metrics(metrics)
        clean_state = check_json(dict(state or {}), "state")
        clean_tags = _check_tags(tags)
        for name in clean_tags:
            holder = self._tag_holder(name)
            if holder is not None and not (overwrite and holder.step == step):
                raise TagInUseError(self.path, name, holder.step)
        extra = _check_extra(extra)
        files = _check_files(files)
        if model is not None and not isinstance(model, torch.nn.Module):
            raise InvalidArgumentError(
                f"model must be a torch.nn.Module, not {type(model).__name__}.",
                "Pass the model object itself (e.g. trainer.model).",
            )

        def write(rec: components.FileRecorder) -> dict[str, Any]:
            return self._write_components(
                rec, model=model, tokenizer=tokenizer, optimizer=optimizer,
                scheduler=scheduler, rng=rng, extra=extra, files=files,
            )  # fmt: skip

        return self._save_with(
            step, write, metrics=clean_metrics, state=clean_state, tags=clean_tags,
            overwrite=overwrite,
        )  # fmt: skip

    def _save_with(
        self,
        step: int,
        write: Callable[[components.FileRecorder], dict[str, Any]],
        *,
        metrics: dict[str, float],
        state: dict[str, Any],
        tags: tuple[str, ...],
        overwrite: bool,
    ) -> SavePoint:
        """The commit protocol around ``write``, which fills the staging folder and returns
        the manifest's ``contents``. Arguments are already checked.

        Synchronous: everything happens here. Asynchronous: ``write`` only snapshots the
        tensors into reused host buffers (and writes the small files); writing, hashing,
        the manifest, the commit and retention run in the background thread."""
        started = time.perf_counter()
        staged = atomic.stage_point(self._layout, step)
        existing = self._existing(staged.final, step, overwrite)
        buffers = self._buffers if self.async_save else None
        try:
            staged.begin()
            rec = components.FileRecorder(staged.path, buffers=buffers)
            contents = write(rec)
            if buffers is not None:
                buffers.synchronize()
        except BaseException as e:
            staged.abort()
            _raise_clearly(e, self.path, step)
        parent, self._parent = self._parent, step

        def finish() -> SavePoint:
            return self._finish(
                step, staged, rec, contents, existing, started,
                metrics=metrics, state=state, tags=tags, parent=parent,
            )  # fmt: skip

        if buffers is None:
            return finish()
        self._inflight = PendingSave(step, staged.final, self._executor().submit(finish))
        _WITH_SAVES_IN_FLIGHT.add(self)
        return self._inflight

    def _finish(
        self,
        step: int,
        staged: atomic.Staged,
        rec: components.FileRecorder,
        contents: dict[str, Any],
        existing: bool,
        started: float,
        *,
        metrics: dict[str, float],
        state: dict[str, Any],
        tags: tuple[str, ...],
        parent: int | None,
    ) -> SavePoint:
        final = staged.final
        try:
            rec.flush()
            self._store.intern_all(staged.path, rec.files)
            manifest = Manifest(
                step=step,
                created=datetime.now(timezone.utc),
                files=dict(rec.files),
                metrics=metrics,
                tags=tags,
                state=state,
                parent=parent,
                contents=contents,
                versions=_versions(),
                keep=dataclasses.asdict(self.keep),
            )
            self._commit(staged, manifest, replace=existing)
        except BaseException as e:
            staged.abort()
            if self.async_save:
                # Never silent: logged now, raised again by the next save()/wait()/close().
                log.error("savepoints: saving step %d in the background failed: %s", step, e)
            _raise_clearly(e, self.path, step)
        point = SavePoint(final, manifest)
        log.info(
            "savepoints: committed step %d (%.1f MB in %.2f s) at %s",
            step, point.size / 1e6, time.perf_counter() - started, final,
        )  # fmt: skip
        self._apply_retention()
        return point

    def _existing(self, final: Path, step: int, overwrite: bool) -> bool:
        if not final.exists():
            return False
        if overwrite:
            return True
        try:
            read_manifest(final / MANIFEST_NAME)
        except SavePointsError:
            raise SavePointExistsError(final, step, committed=False) from None
        raise SavePointExistsError(final, step)

    def _write_components(
        self,
        rec: components.FileRecorder,
        *,
        model: torch.nn.Module | None,
        tokenizer: Any,
        optimizer: Any,
        scheduler: Any,
        rng: bool,
        extra: Mapping[str, Any],
        files: Mapping[str, bytes],
    ) -> dict[str, Any]:
        contents: dict[str, Any] = {}
        if model is not None:
            contents["model"] = components.write_model(
                rec, model, self.max_shard_size, self.layer_shards_above
            )
        if tokenizer is not None:
            contents["tokenizer"] = components.write_tokenizer(rec, tokenizer)
        if optimizer is not None:
            contents["optimizer"] = components.write_state(rec, "optimizer", optimizer)
        if scheduler is not None:
            contents["scheduler"] = components.write_state(rec, "scheduler", scheduler)
        if rng:
            skeleton, tensors = encode_tree(components.capture_rng(), "rng state")
            contents["rng"] = components.write_tree(rec, "rng", skeleton, tensors)
            contents["rng"]["generators"] = sorted(skeleton)
        if extra:
            contents["extra"] = {
                name: components.write_state(rec, name, obj) for name, obj in extra.items()
            }
        for rel, raw in files.items():
            if rel in rec.files:
                raise InvalidArgumentError(
                    f"files={{{rel!r}: ...}} would replace a file savepoints itself writes.",
                    "Pick another file name.",
                )
            rec.write_bytes(rel, raw)
        if files:
            contents["files"] = sorted(files)
        return contents

    def _commit(self, staged: atomic.Staged, manifest: Manifest, *, replace: bool) -> None:
        # The manifest is the commit record: written last, then the folder is renamed.
        staged.commit(record=functools.partial(write_manifest, manifest=manifest,
                                               name=MANIFEST_NAME), replace=replace)  # fmt: skip

    def _apply_retention(self) -> None:
        if not self.keep.prunes:
            return
        points = self.list()
        doomed = keep_mod.to_delete(_infos(points), self.keep)
        for step in doomed:
            self._delete(step)
        if doomed:
            # Not gc(): this may run in the background thread, which must not wait for itself.
            self._store.collect()

    @property
    def dedup(self) -> bool:
        """Whether unchanged files are stored once (hard links into the blob store); False
        when turned off or when this file system refuses hard links (then files are copies)."""
        return self._store.linking

    def gc(self) -> tuple[int, int]:
        """Free blobs that no save point references. Returns (blobs, bytes) freed."""
        self._check_writable("collect garbage")
        return self._store.collect()

    def usage(self) -> Usage:
        """Logical vs physical bytes, each save point's unique bytes, garbage."""
        listed = self.list()
        return usage(
            {p.step: p.path for p in listed}, {p.step: p.manifest.files for p in listed},
            self._store,
        )  # fmt: skip

    def delete(self, step: int | str) -> None:
        """Delete one committed save point (atomically: it is gone or intact). Raises
        when it cannot be deleted; nothing is changed then."""
        self._check_writable("delete a save point")
        point = self.get(step)
        try:
            atomic.retire(point.path, self._layout.new_trash_dir(point.step))
        except PermissionError as e:
            raise RunNotWritableError(self.path, e.strerror or "permission denied") from e
        log.info("savepoints: deleted step %d of %s", point.step, self.path)
        self.gc()

    def _delete(self, step: int) -> None:
        log.info("savepoints: retention deletes step %d of %s", step, self.path)
        try:
            atomic.retire(self._layout.point_dir(step), self._layout.new_trash_dir(step))
        except OSError as e:
            # A failed delete must not fail the save that triggered it: the new save
            # point is committed already. The next retention pass tries again.
            log.warning("savepoints: could not delete save point %d in %s: %s", step, self.path, e)

    # ---------------------------------------------------------------- restoring

    def restore(
        self,
        savepoint: SavePoint | int | str | os.PathLike[str] | None = None,
        *,
        model: torch.nn.Module | None = None,
        optimizer: Any = None,
        scheduler: Any = None,
        rng: bool = True,
        extra: Mapping[str, Any] | None = None,
        verify: bool = True,
        fallback: bool = True,
    ) -> dict[str, Any]:
        """Load a save point into live objects and return its user ``state``.

        ``savepoint`` is a :class:`SavePoint`, a step, a folder path, or None for the
        latest. Every file is verified first (``verify=False`` skips that), and every
        object is checked to fit before any of them is changed. When the latest is asked
        for and it fails verification, the newest save point that verifies is restored
        instead, with a warning naming what was wrong (``fallback=False`` raises).
        """
        point = self._resolve(savepoint)
        if verify:
            report = point.verify()
            if not report.ok and savepoint is None and fallback:
                point = self._newest_verifying(point, report)
            elif not report.ok:
                report.raise_if_failed()
        _restore_into(
            point, model=model, optimizer=optimizer, scheduler=scheduler, rng=rng,
            extra=dict(extra or {}),
        )  # fmt: skip
        self._parent = point.step
        return point.state

    def _newest_verifying(self, bad: SavePoint, report: VerifyReport) -> SavePoint:
        problems = "; ".join(str(p) for p in report.all_problems()[:5])
        for candidate in reversed(self.list()):
            if candidate.step < bad.step and candidate.verify().ok:
                warnings.warn(
                    f"savepoints: the latest save point (step {bad.step}, {bad.path}) failed "
                    f"verification ({problems}); restoring step {candidate.step}, the newest "
                    "that verifies. Pass fallback=False to get an error instead.",
                    stacklevel=3,
                )
                return candidate
        report.raise_if_failed()
        raise AssertionError("unreachable")  # pragma: no cover

    def _resolve(self, savepoint: SavePoint | int | str | os.PathLike[str] | None) -> SavePoint:
        if isinstance(savepoint, SavePoint):
            return savepoint
        if savepoint is None:
            latest = self.latest()
            if latest is None:
                raise SavePointNotFoundError(self.path, "latest", [])
            return latest
        if isinstance(savepoint, int) and not isinstance(savepoint, bool):
            return self.get(savepoint)
        if isinstance(savepoint, str):
            # A name is what get() understands (a step, a tag, "latest", "best") before
            # it is a folder path: restore("release-1") means the tag, not ./release-1.
            try:
                return self._by_name(savepoint)
            except SavePointNotFoundError:
                if not (Path(savepoint) / MANIFEST_NAME).is_file():
                    raise
            return SavePoint.open(savepoint)
        if isinstance(savepoint, os.PathLike):
            return SavePoint.open(savepoint)
        raise InvalidArgumentError(
            f"Cannot restore {savepoint!r}: expected a SavePoint, a step, a tag, a folder "
            "or None.",
            "Pass points.latest(), points.best(), a step number, a tag, or a save point folder.",
        )

    def _by_name(self, name: str) -> SavePoint:
        """A save point named the way users name them: a step, a tag, latest or best."""
        if name in ("latest", "best"):
            found = self.latest() if name == "latest" else self.best()
            if found is None:
                raise SavePointNotFoundError(self.path, name, [])
            return found
        return self.get(name)

    def __repr__(self) -> str:
        mode = "readonly" if self.readonly else "writable"
        return f"SavePoints({str(self.path)!r}, keep={self.keep}, {mode})"


# -------------------------------------------------------------------------- helpers

_WITH_SAVES_IN_FLIGHT: weakref.WeakSet[SavePoints] = weakref.WeakSet()
_WORKER_PREFIX = "savepoints-save"


def _finish_saves_at_exit() -> None:
    """At interpreter exit, let asynchronous saves in flight commit. Registered with
    threading's exit hooks, which run before thread pools stop taking work (atexit
    would run too late). A save that cannot finish stays uncommitted, never visible."""
    for points in list(_WITH_SAVES_IN_FLIGHT):
        try:
            points.wait()
        except BaseException as e:  # already logged by the background thread
            log.debug("savepoints: save in flight at exit failed: %s", e)


_register = getattr(threading, "_register_atexit", None)
if _register is not None:
    _register(_finish_saves_at_exit)
else:  # pragma: no cover - very old or unusual Pythons
    import atexit

    atexit.register(_finish_saves_at_exit)


def _raise_clearly(e: BaseException, run: Path, step: int) -> NoReturn:
    """Re-raise an error of a failed save as the typed error a user can act on."""
    if isinstance(e, PermissionError):
        raise RunNotWritableError(run, e.strerror or "permission denied") from e
    if isinstance(e, OSError) and not isinstance(e, SavePointsError) and e.errno == errno.ENOSPC:
        raise DiskFullError(run, step) from e
    raise e


def _restore_into(
    point: SavePoint,
    *,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    rng: bool,
    extra: Mapping[str, Any],
) -> None:
    contents = point.manifest.contents
    saved_extra = contents.get("extra", {})
    wanted = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    absent = [k for k, v in wanted.items() if v is not None and k not in contents]
    absent += [f"extra[{k!r}]" for k in extra if k not in saved_extra]
    if absent:
        raise NothingToRestoreError(point.path, absent, list(contents))
    from savepoints.compact import expanded_view

    with components.reading(point.path), expanded_view(point.path, point.manifest) as folder:
        # A compacted save point reads through a view with its originals rebuilt.
        # Two phases: read and check everything, then change the live objects, so that a
        # bad optimizer file does not leave the model restored and the optimizer not.
        apply: list[Callable[[], None]] = []
        if model is not None:
            apply.append(components.prepare_model(model, folder, contents["model"]))
        if optimizer is not None:
            opt_state = components.prepare_optimizer(optimizer, folder, contents["optimizer"])
            apply.append(functools.partial(optimizer.load_state_dict, opt_state))
        loads: list[tuple[str, Any, Mapping[str, Any]]] = []
        if scheduler is not None:
            loads.append(("scheduler", scheduler, contents["scheduler"]))
        loads += [(name, obj, saved_extra[name]) for name, obj in extra.items()]
        for name, obj, info in loads:
            obj_state = components.prepare_object(name, obj, folder, info)
            apply.append(functools.partial(obj.load_state_dict, obj_state))
        if rng and "rng" in contents:
            rng_state = components.read_tree(folder, contents["rng"])
            apply.append(functools.partial(components.restore_rng, rng_state, folder))
        for step in apply:
            step()


def _is_committed(folder: Path) -> bool:
    try:
        read_manifest(folder / MANIFEST_NAME)
    except SavePointsError:
        return False
    return True


def _infos(points: Iterable[SavePoint]) -> list[PointInfo]:
    return [PointInfo(p.step, p.metrics, p.tags) for p in points]


def _check_step(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, int):
        raise InvalidArgumentError(
            f"step must be a whole number, not {step!r} ({type(step).__name__}).",
            "Pass the global training step, e.g. save(step=global_step, ...).",
        )
    if step < 0:
        raise InvalidArgumentError(
            f"step must be 0 or more, not {step}.",
            "Pass the global training step (counting from 0).",
        )
    return step


def _check_metrics(metrics: Mapping[str, float] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, value in (metrics or {}).items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if hasattr(value, "item") and not isinstance(value, (int, float)):
            value = value.item()
        if (
            not isinstance(name, str)
            or isinstance(value, bool)
            or not isinstance(value, (int, float))
        ):
            raise InvalidArgumentError(
                f"metric {name!r} = {value!r} is not a number.",
                "Pass metrics as {name: number}, e.g. {'eval_loss': 0.41}.",
            )
        if value != value or value in (float("inf"), float("-inf")):
            raise InvalidArgumentError(
                f"metric {name!r} is {value}, which cannot rank save points.",
                "Record a finite value, or leave the metric out of this save.",
            )
        out[name] = value
    return out


def _check_tags(tags: Sequence[str]) -> tuple[str, ...]:
    if isinstance(tags, str):
        tags = [tags]
    out: list[str] = []
    for tag in tags:
        if (
            not isinstance(tag, str)
            or not re.fullmatch(r"[\w.@+-]+", tag)
            or tag.isdigit()
            or tag in ("latest", "best")
        ):
            raise InvalidArgumentError(
                f"tag {tag!r} is not allowed.",
                "Use letters, digits, '.', '_', '-', '+' or '@' (not only digits, not "
                "'latest' or 'best'), e.g. 'warmup-done' or 'release-1'.",
            )
        if tag not in out:
            out.append(tag)
    return tuple(out)


_RESERVED = {"model", "tokenizer", "optimizer", "scheduler", "rng"}


def _check_extra(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    out = dict(extra or {})
    for name, obj in out.items():
        if (
            not isinstance(name, str)
            or not re.fullmatch(r"[A-Za-z0-9_.-]+", name)
            or (name in _RESERVED)
        ):
            raise InvalidArgumentError(
                f"extra name {name!r} is not allowed.",
                "Use letters, digits, '_', '-' or '.', and none of " + ", ".join(sorted(_RESERVED)),
            )
        if not callable(getattr(obj, "state_dict", None)):
            raise InvalidArgumentError(
                f"extra[{name!r}] is a {type(obj).__name__}, which has no state_dict().",
                "Pass objects with state_dict()/load_state_dict(), or put plain values in state=.",
            )
    return out


def _check_files(files: Mapping[str, bytes | str] | None) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for rel, data in (files or {}).items():
        if not isinstance(rel, str) or not is_safe_relpath(rel) or rel == MANIFEST_NAME:
            raise InvalidArgumentError(
                f"files={{{rel!r}: ...}}: the name must be a relative path inside the save point.",
                "Use a plain relative name such as 'trainer_state.json'.",
            )
        out[rel] = data.encode() if isinstance(data, str) else bytes(data)
    return out


def _versions() -> dict[str, str]:
    versions = {
        "savepoints": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for name in ("safetensors", "numpy", "transformers", "tokenizers"):
        # Only what is already imported: the core never imports transformers itself.
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = str(getattr(module, "__version__", "?"))
    return versions


# -------------------------------------------------------------------------- verify


def _verify_point(folder: Path) -> VerifyReport:
    try:
        manifest, raw = read_manifest_bytes(folder / MANIFEST_NAME)
    except SavePointsError as e:
        report = VerifyReport(path=folder)
        report.problems.append(Problem("manifest", MANIFEST_NAME, str(e)))
        return report
    expected = {rel: (e.size, e.hash) for rel, e in manifest.files.items()}
    report = verify_files(folder, expected, ignore={MANIFEST_NAME})
    why = manifest_hash_problem(raw, manifest)
    if why is not None:
        report.problems.insert(0, Problem("manifest", MANIFEST_NAME, why))
    return report


def _verify_run(root: Path) -> VerifyReport:
    report = VerifyReport(path=root)
    for _step, folder in RunLayout(root).candidate_dirs():
        child = _verify_point(folder)
        report.children.append(child)
        report.files_checked += child.files_checked
        report.bytes_checked += child.bytes_checked
    return report


def verify(path: str | os.PathLike[str]) -> VerifyReport:
    """Verify a save point folder, or every save point folder of a run folder.

    The report is truthy when everything verified; ``report.all_problems()`` names each
    missing, extra, truncated or altered file.
    """
    folder = Path(path)
    if not folder.exists():
        raise RunNotFoundError(folder)
    if not folder.is_dir():
        raise NotARunError(folder, "it is a file, not a folder")
    if (folder / MANIFEST_NAME).exists():
        return _verify_point(folder)
    if parse_step(folder.name) is not None:
        # Named like a save point but without a manifest: uncommitted or damaged.
        report = VerifyReport(path=folder)
        report.problems.append(
            Problem("manifest", MANIFEST_NAME, "missing: this folder was never committed")
        )
        return report
    return _verify_run(folder)
