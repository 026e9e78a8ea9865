"""``SavePoints``: save, list, pick and restore the save points of one run.

The facade: each public method runs the shared guards once (arguments checked before any
I/O by validate.py, the write lock, closed/read-only checks) and hands the work on: a save
to the pipeline (writer.py), a restore to the one check-then-apply path (restore.py),
files to the storage seam (storage/), retention decisions to the pure policies
(keep.py). A ``save()`` flows in one direction: here -> writer -> weights/training_state
-> staging -> storage -> atomic.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import functools
import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from savepoints import keep as keep_mod
from savepoints.distributed import Ranks, RankWriter, check_not_in_a_job
from savepoints.errors import (
    CorruptSavePointError,
    InvalidArgumentError,
    ManifestError,
    MetricNotFoundError,
    NotARunError,
    ReadOnlyRunError,
    RunClosedError,
    RunNotFoundError,
    SavePointNotFoundError,
    TagInUseError,
)
from savepoints.integrity import Problem, VerifyReport, verify, verify_point, verify_run
from savepoints.journal import Journal, session_fields
from savepoints.keep import Keep, Mode, PointInfo
from savepoints.layout import MANIFEST_NAME
from savepoints.lineage import LineageSource, check_data_files
from savepoints.restore import restore_into
from savepoints.savepoint import PendingSave, SavePoint
from savepoints.serialize import check_json
from savepoints.sharded import write_ranked
from savepoints.snapshot import SNAPSHOT_MODES, SnapshotMode
from savepoints.storage import LocalStorage, Storage, Usage
from savepoints.storage.remote import RemoteRun
from savepoints.storage.tier import RemoteTier
from savepoints.validate import (
    check_extra,
    check_files,
    check_logged,
    check_metrics,
    check_model,
    check_step,
    check_tags,
)
from savepoints.version import __version__
from savepoints.weights import DEFAULT_MAX_SHARD_BYTES, LAYER_SHARDS_ABOVE
from savepoints.writer import WriteFn, Writer, write_components

__all__ = ["PendingSave", "SavePoint", "SavePoints", "__version__", "verify"]

log = logging.getLogger("savepoints")


class SavePoints:
    """The save points of one run folder.

    ``SavePoints(path)`` opens the run for writing: it creates the folder if needed,
    takes a lock so that no second process writes into it, and undoes what crashed
    writers left in its private area (a replace a crash interrupted is put back to the
    old version; uncommitted staging folders are removed). ``readonly=True`` opens an
    existing run to read and restore only (no lock: safe while another process trains).

    Options: ``keep`` (retention, default keep all); ``max_shard_size`` (bytes per
    weights shard); ``layer_shards_above`` (weights of at least this many bytes are
    written one shard per layer, so unchanged layers are stored once; None turns it off);
    ``dedup`` (store identical files once through hard links; on by default);
    ``async_save`` (``save()`` only snapshots the state into host buffers that are
    allocated once and reused, and returns a :class:`PendingSave`; writing, hashing,
    commit and retention run in a background thread, one save at a time); ``if_busy``
    (what an asynchronous ``save()`` does while the previous one is still being written:
    ``"wait"`` for it, or ``"skip"`` this save and return None).

    **Several ranks** (a ``torch.distributed`` process group is initialised): every rank
    opens the run and calls ``save()`` and ``restore()`` together, with the same step.
    Rank 0 holds the lock and commits; each rank writes its share of the weights and
    optimizer state (DDP or FSDP2) and its own RNG; a failure on any rank is an error on
    every rank and leaves nothing visible. ``timeout`` (seconds, default 600 or
    ``SAVEPOINTS_TIMEOUT``) bounds how long a rank waits for the others at each step, so
    a call made on one rank only ends in ``RanksTimeoutError`` instead of a hang. A run
    opened ``readonly=True`` is read by this process alone (nothing is collective); its
    ``restore()`` reads this rank's RNG (``RANK``).

    **A remote tier** (``remote="s3://bucket/prefix/run"``, also ``gs://``, ``az://``,
    ``file://`` or a folder; ``pip install 'savepoints[remote]'``): the local run stays as
    it is, and every committed save point is pushed to the remote in the background
    (blobs once, the manifest last with a create-only put). Credentials come from the
    environment as usual (``AWS_*``...) or from ``storage_options``, and are checked when
    the run opens. Save points only the remote holds are listed, and ``latest()``,
    ``best()``, ``get()`` and ``restore()`` fetch them into the local folder, verifying
    every byte: a new machine with an empty folder resumes where another stopped.
    ``wait()`` and ``close()`` return once every committed save point is on the remote,
    or raise :class:`~savepoints.errors.RemotePushError`; a failed push never stops
    training (it is logged and tried again after the next save). ``Keep`` applies to the
    remote too, and local retention never deletes what is not pushed yet.

    **Lineage**: every manifest records where its save point came from (the git commit
    of the training code and whether it had uncommitted changes, the command, host and
    session, the chain of save points it descends from across resumes; see
    savepoints.lineage). ``data_files`` (paths of the files the training reads: files or
    folders) adds their sizes, BLAKE3 hashes and one fingerprint; they are hashed once,
    in the background, when the run opens.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        keep: Keep | None = None,
        readonly: bool = False,
        max_shard_size: int = DEFAULT_MAX_SHARD_BYTES,
        layer_shards_above: int | None = LAYER_SHARDS_ABOVE,
        dedup: bool = True,
        async_save: bool | None = None,
        snapshot: SnapshotMode | None = None,
        if_busy: Literal["wait", "skip"] = "wait",
        timeout: float | None = None,
        remote: str | os.PathLike[str] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        data_files: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None = None,
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
        if snapshot is not None and snapshot not in SNAPSHOT_MODES:
            raise InvalidArgumentError(
                f"snapshot={snapshot!r} is not allowed.",
                "Use snapshot='eager' (copy everything before save() returns) or "
                "snapshot='deferred' (copy while the next step computes).",
            )
        if snapshot == "deferred" and async_save is False:
            raise InvalidArgumentError(
                "snapshot='deferred' needs async_save=True: a synchronous save writes "
                "everything before it returns, so there is nothing to defer.",
                "Leave async_save at its default (True) or pass snapshot='eager'.",
            )
        if if_busy not in ("wait", "skip"):
            raise InvalidArgumentError(
                f"if_busy={if_busy!r} is not allowed.", "Use if_busy='wait' or if_busy='skip'."
            )
        data = check_data_files(data_files)
        self.path = Path(path)
        self.keep = keep or Keep()
        # Integrations fill in a Keep from their own settings only when none was given.
        self._keep_given = keep is not None
        self.readonly = readonly
        self.max_shard_size = max_shard_size
        self.layer_shards_above = layer_shards_above
        self._async_save = async_save is not False
        # Integrations choose a snapshot mode only when none was given.
        self._snapshot_given = snapshot is not None
        self._snapshot: SnapshotMode = snapshot or "eager"
        self.if_busy = if_busy
        self._storage: Storage = LocalStorage(self.path, dedup=dedup)
        self._writer: Writer | RankWriter | None = None
        self._closed = False
        self._tier: RemoteTier | None = None
        self._retention_lock = threading.Lock()
        self._listeners: builtins.list[Callable[[int], None]] = []
        #: The run journal (journal.py): written by the process that writes the run.
        self._journal: Journal | None = None
        # Bytes on disk for the journal's storage lines, kept up to date commit by commit
        # (computing them afresh reads every manifest: quadratic over a long run).
        self._usage_lock = threading.Lock()
        self._sizes: dict[int, int] | None = None
        self._physical = 0
        self._since_usage = 0
        # A run opened read-only is read by this process alone (to list it, or restore
        # into one rank's objects): only a writable run makes calls collective.
        self._ranks = None if readonly else Ranks.detect(timeout)
        self._rank = int(os.environ.get("RANK", "0")) if os.environ.get("RANK", "").isdigit() else 0
        if self._ranks is None and not readonly:
            check_not_in_a_job(self.path)
        if self._ranks is not None and async_save is None:
            self._async_save = False  # the ranks write one save point together
        if self._ranks is not None and async_save:
            raise InvalidArgumentError(
                "async_save=True is not supported in a multi-rank run yet: the ranks write "
                "one save point together, synchronously.",
                "Leave async_save off under torch.distributed.",
            )
        if self.path.exists() and not self.path.is_dir():
            raise NotARunError(self.path, "it is a file, not a folder")
        if readonly:
            if remote is not None:
                self._tier = self._open_remote(remote, storage_options, writable=False)
            elif not self.path.is_dir():
                raise RunNotFoundError(self.path)
            return
        if self._ranks is not None:
            failure: BaseException | None = None
            if self._ranks.is_main:  # rank 0 alone holds the lock and recovers the run
                try:
                    self._storage.open_for_writing()
                    if remote is not None:  # rank 0 alone pushes and pulls
                        self._tier = self._open_remote(remote, storage_options, writable=True)
                        # The ranks resume from the shared run folder: the remote's newest
                        # save point is fetched now, before any rank looks for it.
                        newest = max(self._tier.remote_points(), default=-1)
                        if newest > max((p.step for p in self._local_points()), default=-1):
                            self.latest()
                except BaseException as e:
                    failure = e
            self._ranks.vote(failure, f"opening the run {self.path}")
            if self._ranks.is_main:
                self._open_journal()
            self._writer = RankWriter(
                self._storage,
                self._ranks,
                keep_record=lambda: dataclasses.asdict(self.keep),
                after_commit=self._committed,
                journal=self._journal,
                lineage=self._lineage_source(data),
            )
            return
        self._storage.open_for_writing()
        if remote is not None:
            try:
                self._tier = self._open_remote(remote, storage_options, writable=True)
            except BaseException:
                self._storage.close()
                raise
        self._open_journal()
        self._writer = Writer(
            self._storage,
            async_save=self._async_save,
            snapshot=self._snapshot,
            keep_record=lambda: dataclasses.asdict(self.keep),
            after_commit=self._committed,
            journal=self._journal,
            lineage=self._lineage_source(data),
        )

    def _lineage_source(self, data: tuple[Path, ...]) -> LineageSource | None:
        """What this session's manifests record of their origin: gathered by the process
        that writes them (rank 0), under the journal's session id."""
        if self._journal is None:
            return None
        return LineageSource(self._journal.session, data)

    def _open_journal(self) -> None:
        self._journal = Journal(self.path)
        self._journal.record(
            "open", **session_fields(), version=__version__, remote=self.remote,
            ranks=None if self._ranks is None else self._ranks.world,
        )  # fmt: skip

    def _open_remote(
        self, remote: str | os.PathLike[str], options: Mapping[str, Any] | None, *,
        writable: bool,
    ) -> RemoteTier:  # fmt: skip
        local = self._storage
        assert isinstance(local, LocalStorage)
        tier = RemoteTier(
            local, RemoteRun.open(remote, options, writable=writable),
            keep=lambda: self.keep, after_push=self._apply_retention,
            flush_first=lambda: self._writer.wait() if self._writer is not None else None,
        )  # fmt: skip
        if writable:
            tier.catch_up()  # what a previous process committed but did not push
        return tier

    @property
    def journal(self) -> Journal | None:
        """The run journal this process writes (``RUN/.savepoints/journal.jsonl``); None
        for a run opened read-only, and on ranks other than 0. Read it with
        :func:`savepoints.journal.read_journal` or ``savepoints log RUN``."""
        return self._journal

    def log(self, step: int, metrics: Mapping[str, float] | None = None, **values: float) -> None:
        """Record metrics a training loop logged at ``step`` (a loss every N steps, an
        evaluation) in the run journal: ``savepoints report`` draws them as curves, with
        the save points marked on them. Cheap (one appended line); a no-op on a read-only
        run and on ranks other than 0."""
        step = check_step(step)
        clean = check_logged({**(metrics or {}), **values})
        if self._journal is not None and clean:
            self._journal.record("log", step=step, values=clean)

    def on_commit(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(step)`` after each save point this process commits (in the
        thread that committed it: the background one for asynchronous saves). A listener
        that raises is logged; it never fails the save."""
        self._listeners.append(listener)

    def _committed(self, step: int, size: int = 0, added: int = 0) -> None:
        """After each local commit of ``size`` bytes, ``added`` of them new on disk (in the
        writing thread): retention, the journal's storage line, the listeners (who then
        see the run as retention left it), the push."""
        self._apply_retention()
        if self._journal is not None:
            self._record_storage(step, size, added)
        for listener in self._listeners:
            try:
                listener(step)
            except Exception as e:
                log.warning("savepoints: a commit listener failed: %s", e)
        if self._tier is not None:
            self._tier.submit(step)

    #: Every this many commits the storage line is computed afresh from the disk (other
    #: processes, compact and gc change it too); in between it is kept up to date.
    USAGE_RESYNC = 64

    def _record_storage(self, step: int, size: int, added: int) -> None:
        assert self._journal is not None
        try:
            with self._usage_lock:
                if self._sizes is None or self._since_usage >= self.USAGE_RESYNC:
                    points = self._local_points()
                    used = self._storage.usage([(p.step, p.path, p.manifest) for p in points])
                    self._sizes = {p.step: p.manifest.total_size for p in points}
                    self._physical, self._since_usage = used.physical, 0
                else:
                    self._sizes[step] = size
                    self._physical += added
                    self._since_usage += 1
                logical = sum(self._sizes.values())
                physical = self._physical if self._storage.dedup else logical
                count = len(self._sizes)
        except Exception as e:  # a record only: a folder deleted meanwhile must not fail a save
            log.warning("savepoints: could not measure the run's bytes for the journal: %s", e)
            return
        self._journal.record("storage", step=step, logical=logical, physical=physical,
                             points=count)  # fmt: skip

    def _forget(self, steps: Iterable[int], freed: int) -> None:
        """Deleted save points leave the storage bookkeeping (``freed``: blob bytes)."""
        with self._usage_lock:
            if self._sizes is not None:
                for step in steps:
                    self._sizes.pop(step, None)
                self._physical = max(0, self._physical - freed)

    # ---------------------------------------------------------------- context / lock

    def __enter__(self) -> SavePoints:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None and self._tier is not None and not self._closed:
            # An exception (a preemption's SystemExit(75), say) is leaving the block: it
            # must stay the one that leaves. What is not pushed yet is said, and pushed
            # when the run is opened again.
            self._tier.abandon()
        self.close()

    def close(self) -> None:
        """Finish the save in flight (raising its error, if it failed) and, with a remote,
        the pushes (raising :class:`~savepoints.errors.RemotePushError` for what is still
        only local); then release the run's write lock. Idempotent."""
        try:
            if self._writer is not None:
                self._writer.close()
        finally:
            try:
                if self._tier is not None and not self._closed and not self._tier.stopped:
                    self._tier.close()
            finally:
                if self._journal is not None and not self._closed:
                    self._journal.record("close")
                    self._journal.close()
                self._storage.close()
                self._closed = True

    def wait(self, *, remote: bool = True) -> SavePoint | None:
        """Block until the asynchronous save in flight is committed, and return it (None
        when nothing is in flight). A background failure is raised here, once. With a
        remote, also wait until every committed save point is pushed (``remote=False``:
        don't), raising :class:`~savepoints.errors.RemotePushError` for what is not."""
        point = None if self._writer is None else self._writer.wait()
        if remote and self._tier is not None:
            self._tier.settle()
        return point

    def wait_pushed(self, timeout: float | None = None) -> builtins.list[int]:
        """Wait up to ``timeout`` seconds for the pushes in flight; return the steps that
        are still only local (empty without a remote). Never raises for a failed push;
        the save in flight ends first."""
        self._settle()
        return [] if self._tier is None else self._tier.wait(timeout)

    @property
    def remote(self) -> str | None:
        """The URL of this run's remote tier (None: local only)."""
        return None if self._tier is None else self._tier.url

    @property
    def async_save(self) -> bool:
        """Whether ``save()`` returns after the snapshot, the rest written in the
        background (the default, except under torch.distributed)."""
        return self._async_save

    @async_save.setter
    def async_save(self, value: bool) -> None:
        if value and self._ranks is not None:
            raise InvalidArgumentError(
                "async_save=True is not supported in a multi-rank run yet.",
                "Leave async_save off under torch.distributed.",
            )
        self._async_save = bool(value)
        if isinstance(self._writer, Writer):
            self._writer.async_save = self._async_save

    @property
    def snapshot(self) -> SnapshotMode:
        """When an asynchronous save copies the tensors: ``"eager"`` (before ``save()``
        returns) or ``"deferred"`` (what the optimizer owns, while the next step
        computes; see savepoints.snapshot)."""
        return self._snapshot

    @snapshot.setter
    def snapshot(self, mode: SnapshotMode) -> None:
        if mode not in SNAPSHOT_MODES:
            raise InvalidArgumentError(
                f"snapshot={mode!r} is not allowed.", "Use 'eager' or 'deferred'."
            )
        self._snapshot = mode
        if isinstance(self._writer, Writer):
            self._writer.snapshot = mode

    @property
    def busy(self) -> bool:
        """Whether an asynchronous save is still being written."""
        return self._writer is not None and self._writer.busy

    def __del__(self) -> None:
        with contextlib.suppress(BaseException):  # nothing can be reported from a finalizer
            self.close()

    def _check_writable(self, action: str) -> Writer | RankWriter:
        if self.readonly or self._writer is None:
            raise ReadOnlyRunError(self.path, action)
        if self._closed:
            raise RunClosedError(self.path, action)
        self._writer.wait()  # one writer at a time: the save in flight first (and its error)
        return self._writer

    # ---------------------------------------------------------------- reading

    def list(self) -> list[SavePoint]:
        """Committed save points, sorted by step. Folders without a valid manifest
        (uncommitted, damaged, or of an unknown format) are left out. With a remote, the
        save points only it holds are listed too (their ``remote`` says so). A save of
        this process still in flight is waited for first."""
        self._settle()
        points = self._local_points()
        if self._tier is not None:
            here = {p.step for p in points}
            points += [
                SavePoint(self._storage.point_dir(step), manifest, remote=self._tier.url)
                for step, manifest in self._tier.remote_points().items() if step not in here
            ]  # fmt: skip
            points.sort(key=lambda p: p.step)
        return points

    def _settle(self) -> None:
        """This process's reads see its own saves: the one in flight is waited for (its
        error is left for the next save(), wait() or close(); readers may be threads)."""
        if isinstance(self._writer, Writer) and not self._closed:
            self._writer.settle()

    def _local_points(self) -> builtins.list[SavePoint]:
        return [SavePoint(folder, manifest) for folder, manifest in self._storage.committed()]

    def latest(self) -> SavePoint | None:
        """The newest save point (fetched from the remote when only it holds it; a remote
        one that fails verification on download is skipped, with a warning)."""
        points = self.list()
        for point in reversed(points):
            if point.remote is None:
                return point
            try:
                return self._here(point)
            except (CorruptSavePointError, ManifestError) as e:
                warnings.warn(
                    f"savepoints: the remote save point of step {point.step} failed "
                    f"verification on download ({e.message}); trying the one before.",
                    stacklevel=2,
                )
        return None

    def _here(self, point: SavePoint) -> SavePoint:
        """``point`` in the local folder: fetched from the remote when only it has it."""
        if point.remote is None or self._tier is None:
            return point
        if self.readonly:
            raise ReadOnlyRunError(self.path, f"fetch step {point.step} from {point.remote}")
        folder, manifest = self._tier.pull(point.step)
        return SavePoint(folder, manifest)

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
        return self._here(next(p for p in points if p.step == step))

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
        name (``get("release-1")``); a clear error when there is none. A save point only
        the remote holds is fetched."""
        return self._here(self._find(step))

    def _find(self, step: int | str) -> SavePoint:
        points = self.list()
        for p in points:
            if (p.step == step and not isinstance(step, str)) or (
                isinstance(step, str) and step in p.tags
            ):
                return p
        if isinstance(step, str) and step.isdigit():
            return self._find(int(step))
        raise SavePointNotFoundError(self.path, step, [p.step for p in points])

    def tag(self, step: int | str, name: str) -> SavePoint:
        """Add tag ``name`` to a save point. Tagged save points are kept by retention; a
        tag names one save point in the run, so it can be used instead of a step."""
        self._check_writable("tag a save point")
        (clean,) = check_tags([name])
        point = self.get(step)
        holder = self._tag_holder(clean)
        if holder is not None and holder.step != point.step:
            raise TagInUseError(self.path, clean, holder.step)
        if clean in point.tags:
            return point
        tagged = self._rewrite_tags(point, (*point.tags, clean))
        if self._journal is not None:
            self._journal.record("tag", step=point.step, tag=clean)
        return tagged

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
        if self._journal is not None:
            self._journal.record("untag", step=point.step, tag=name)
        self._apply_retention()
        return updated

    def _tag_holder(self, name: str) -> SavePoint | None:
        return next((p for p in self.list() if name in p.tags), None)

    def _rewrite_tags(self, point: SavePoint, tags: tuple[str, ...]) -> SavePoint:
        # The manifest is replaced in one rename: readers see the old one or the new one.
        manifest = point.manifest.with_tags(tags)
        self._storage.rewrite_manifest(point.path, manifest)
        if self._tier is not None:
            self._tier.push_tags(point.step, tags)
        return SavePoint(point.path, manifest)

    def compact(self, step: int | str, *, expand: bool = False) -> SavePoint:
        """Compress a save point's tensor files losslessly (byte grouping + zstd), or with
        ``expand=True`` rebuild the originals. The save point is replaced atomically;
        ``restore()`` reads compacted save points, ``from_pretrained`` needs them expanded."""
        from savepoints import compact as compact_mod

        self._check_writable("compact a save point")
        point = self.get(step)
        with self._storage.stage(point.step) as staged:
            manifest = compact_mod.rewrite(point.path, point.manifest, staged.path, not expand)
            self._storage.commit(staged, manifest, replace=True)
        self._storage.collect()
        return SavePoint(point.path, manifest)

    def folder_for(self, step: int) -> Path:
        """Where the save point of ``step`` lives (whether or not it exists yet)."""
        return self._storage.point_dir(check_step(step))

    def verify(self) -> VerifyReport:
        """Verify every save point folder of the run."""
        return verify_run(self.path)

    def verify_point(self, point: SavePoint) -> VerifyReport:
        """Verify one save point; in a multi-rank run (collective: every rank calls it)
        each rank hashes a share of its files and every rank gets the whole report."""
        return point.verify() if self._ranks is None else self._verify_together(point)

    @property
    def ranks(self) -> Ranks | None:
        """The ranks of the ``torch.distributed`` job writing this run (None: one process)."""
        return self._ranks

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
        step = check_step(step)
        model = check_model(model)
        extra = check_extra(extra)
        files = check_files(files)
        write = functools.partial(
            write_components, model=model, tokenizer=tokenizer, optimizer=optimizer,
            scheduler=scheduler, rng=rng, extra=extra, files=files,
            max_shard_size=self.max_shard_size, layer_shards_above=self.layer_shards_above,
        )  # fmt: skip
        if self._ranks is not None:
            write = functools.partial(
                write_ranked, ranks=self._ranks, model=model, tokenizer=tokenizer,
                optimizer=optimizer, scheduler=scheduler, rng=rng, extra=extra, files=files,
                max_shard_size=self.max_shard_size, layer_shards_above=self.layer_shards_above,
            )  # fmt: skip
        return self.save_with(
            step, write, metrics=metrics, state=state, tags=tags, overwrite=overwrite
        )

    def save_with(
        self,
        step: int,
        write: WriteFn,
        *,
        metrics: Mapping[str, float] | None = None,
        state: Mapping[str, Any] | None = None,
        tags: Sequence[str] = (),
        overwrite: bool = False,
    ) -> SavePoint:
        """:meth:`save` for code that writes the files itself (importers):
        ``write(recorder)`` fills the staging folder through the recorder
        (``savepoints.staging.FileRecorder``) and returns the manifest's ``contents``.
        Arguments are checked as in :meth:`save`; the same commit protocol follows."""
        writer = self._check_writable("save")
        step = check_step(step)
        clean_metrics = check_metrics(metrics)
        clean_state = check_json(dict(state or {}), "state")
        clean_tags = check_tags(tags)
        for name in clean_tags:
            holder = self._tag_holder(name)
            if holder is not None and not (overwrite and holder.step == step):
                raise TagInUseError(self.path, name, holder.step)
        return writer.save(
            step, write, metrics=clean_metrics, state=clean_state, tags=clean_tags,
            overwrite=overwrite,
        )  # fmt: skip

    def _apply_retention(self) -> None:
        if not self.keep.prunes:
            return
        # Called by the save's thread and by the push thread: one pass at a time.
        with self._retention_lock:
            self._apply_retention_locally()

    def _apply_retention_locally(self) -> None:
        doomed = keep_mod.to_delete(_infos(self._local_points()), self.keep)
        if self._tier is not None:
            # What is not on the remote yet stays until it is (the push then runs this).
            unpushed = self._tier.unpushed()
            doomed = [step for step in doomed if step not in unpushed]
        for step in doomed:
            log.info("savepoints: retention deletes step %d of %s", step, self.path)
            try:
                self._storage.delete(step)
                if self._journal is not None:
                    self._journal.record("retention", step=step, rule=keep_mod.deletion_rule(
                        self.keep), keep=dataclasses.asdict(self.keep))  # fmt: skip
            except OSError as e:
                # A failed delete must not fail the save that triggered it: the new save
                # point is committed already. The next retention pass tries again.
                log.warning(
                    "savepoints: could not delete save point %d in %s: %s", step, self.path, e
                )
        if doomed:
            # Not gc(): this may run in the background thread, which must not wait for itself.
            _, freed = self._storage.collect()
            self._forget(doomed, freed)

    @property
    def dedup(self) -> bool:
        """Whether unchanged files are stored once (hard links into the blob store); False
        when turned off or when this file system refuses hard links (then files are copies)."""
        return self._storage.dedup

    def gc(self) -> tuple[int, int]:
        """Free blobs that no save point references. Returns (blobs, bytes) freed."""
        self._check_writable("collect garbage")
        return self._storage.collect()  # garbage: never counted in the journal's bytes

    def usage(self) -> Usage:
        """Logical vs physical bytes, each save point's unique bytes, garbage."""
        self._settle()
        return self._storage.usage([(p.step, p.path, p.manifest) for p in self._local_points()])

    def delete(self, step: int | str) -> None:
        """Delete one committed save point (atomically: it is gone or intact), here and
        on the remote. Raises when it cannot be deleted; nothing is changed then."""
        self._check_writable("delete a save point")
        point = self._find(step)
        if self._tier is not None:
            # The remote first: a local copy deleted while the remote kept its own would
            # be fetched back by the next latest(). Pushes in flight end before.
            self._tier.wait()
            self._tier.delete(point.step)
        if point.remote is None:
            self._storage.delete(point.step)
            log.info("savepoints: deleted step %d of %s", point.step, self.path)
            _, freed = self._storage.collect()
            self._forget([point.step], freed)
        if self._journal is not None:
            self._journal.record("delete", step=point.step)

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
        trusted_keys: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    ) -> dict[str, Any]:
        """Load a save point into live objects and return its user ``state``.

        ``savepoint`` is a :class:`SavePoint`, a step, a tag, ``"latest"``/``"best"``, a
        save point folder, or None for the latest. Every file is verified first
        (``verify=False`` skips that), and every object is checked to fit before any of
        them is changed. When the latest is asked
        for and it fails verification, the newest save point that verifies is restored
        instead, with a warning naming what was wrong (``fallback=False`` raises).

        ``trusted_keys`` (public key files, PEM; ``pip install 'savepoints[sign]'``):
        restore only a save point signed (``model.sig``, OpenSSF Model Signing) by one of
        these keys and whose files are exactly the signed ones; otherwise a
        :class:`~savepoints.errors.SigningError` (unsigned, signed by another key,
        altered) and nothing is changed. The signature is checked on the save point the
        hash check settled on: a latest that fails *verification* (a crash, bit rot)
        falls back as above, and the older one must then be signed too; a latest that
        verifies but is unsigned or untrusted is refused, never skipped for an older
        signed one. Damage is something to recover from; a save point nobody vouched for
        is a decision for the caller (restore a signed one by step or tag), and going
        back in time without being asked would hide it.
        """
        from savepoints.interop.signing import load_trusted_keys, require_trusted

        # Bad key files fail here, before anything is hashed; model_signing is imported
        # only when keys are given.
        trust = None if trusted_keys is None else load_trusted_keys(trusted_keys)
        if self._ranks is not None:
            point = self._resolve_together(savepoint, verify, fallback)
            if trust is not None:
                require_trusted(point, trust, ranks=self._ranks)
            restore_into(point, model=model, optimizer=optimizer, scheduler=scheduler, rng=rng,
                         extra=extra, ranks=self._ranks)  # fmt: skip
            self._restored(point)
            return point.state
        point = self._resolve(savepoint)
        if verify:
            report = point.verify()
            if not report.ok and savepoint is None and fallback:
                point = self._newest_verifying(point, report)
            elif not report.ok:
                report.raise_if_failed()
        if trust is not None:
            require_trusted(point, trust)
        restore_into(point, model=model, optimizer=optimizer, scheduler=scheduler, rng=rng,
                     extra=extra, rank=self._rank)  # fmt: skip
        self._restored(point)
        return point.state

    def _restored(self, point: SavePoint) -> None:
        # A save point of another run (a warm start) is no resume of this one.
        try:
            this_run = point.path.resolve().parent == self.path.resolve()
        except OSError:
            this_run = False
        if self._writer is not None:
            # The next save point's parent, and its lineage's chain.
            self._writer.continue_from(point, this_run=this_run)
        if self._journal is not None:
            self._journal.record("restore", step=point.step, pid=os.getpid(),
                                 path=str(point.path), this_run=this_run)  # fmt: skip

    def _resolve_together(
        self, savepoint: SavePoint | int | str | os.PathLike[str] | None, verify: bool,
        fallback: bool,
    ) -> SavePoint:  # fmt: skip
        """Every rank restores the same save point: rank 0 picks it (they must have asked
        for the same one), the ranks verify a share of its files each, and when the
        latest fails, they fall back together to the newest that verifies."""
        ranks = self._ranks
        assert ranks is not None
        during = "restore()"
        asked = str(savepoint.path) if isinstance(savepoint, SavePoint) else savepoint
        ranks.agree("the save point to restore", None if asked is None else str(asked), during)
        failure: BaseException | None = None
        candidates: builtins.list[str] = []
        if ranks.is_main:
            try:
                point = self._resolve(savepoint)
                candidates = [str(point.path)]
                if savepoint is None and fallback and verify:
                    candidates += [str(p.path) for p in reversed(self.list())
                                   if p.step < point.step]  # fmt: skip
            except BaseException as e:
                failure = e
        ranks.vote(failure, during)
        candidates = ranks.broadcast_json(candidates, during)
        first: VerifyReport | None = None
        for path in candidates:
            point = SavePoint.open(path)
            if not verify:
                return point
            report = self._verify_together(point)
            if report.ok:
                if first is not None:
                    problems = "; ".join(str(p) for p in first.all_problems()[:5])
                    warnings.warn(
                        f"savepoints: the latest save point ({first.path}) failed "
                        f"verification ({problems}); restoring step {point.step}, the newest "
                        "that verifies. Pass fallback=False to get an error instead.",
                        stacklevel=3,
                    )
                return point
            first = first or report
            if savepoint is not None or not fallback:
                break
        assert first is not None
        first.raise_if_failed()
        raise AssertionError("unreachable")  # pragma: no cover

    def _verify_together(self, point: SavePoint) -> VerifyReport:
        """Each rank hashes a share of the files; every rank gets the whole report."""
        ranks = self._ranks
        assert ranks is not None
        mine = verify_point(point.path, share=(ranks.rank, ranks.world))
        said = [[p.kind, p.path, p.detail] for p in mine.problems]
        heard = ranks.all_gather_json([said, mine.files_checked, mine.bytes_checked],
                                      f"restore(), verifying {point.path}")  # fmt: skip
        report = VerifyReport(path=point.path)
        for problems, files, size in heard:
            report.problems += [Problem(kind, path, detail) for kind, path, detail in problems]
            report.files_checked += files
            report.bytes_checked += size
        return report

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
            return self._here(savepoint)
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
            f"Cannot restore {savepoint!r}: expected a SavePoint, a step, a tag, a folder or None.",
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


def _infos(points: Iterable[SavePoint]) -> list[PointInfo]:
    return [PointInfo(p.step, p.metrics, p.tags) for p in points]
