"""Several ranks, one save point: coordination over ``torch.distributed``.

When a process group is initialised (``torchrun``, ``accelerate launch``, or
``torch.distributed.init_process_group`` by hand), every rank opens the same run with
``SavePoints(path)`` and calls ``save()`` and ``restore()`` together, as with torch DCP.
:class:`Ranks` is how they talk: small JSON messages carried in uint8 tensors over a gloo
group of our own (never ``broadcast_object_list``, which pickles), each call bounded by a
timeout, so a rank that never comes ends in :class:`~savepoints.errors.RanksTimeoutError`
instead of a hang.

The commit of one save point (:class:`RankWriter`), in order:

1. every rank states the step; ranks that disagree all get ``RanksDisagreeError``;
2. rank 0 (which holds the run's lock) creates the staging folder and tells the others
   where it is;
3. every rank writes and fsyncs its own files into it (its share of the weights and
   optimizer state, its RNG and per-rank objects);
4. all ranks vote: one failure (an exception, a full disk, a rank gone) and rank 0
   removes the staging folder and every rank raises; nothing became visible;
5. the ranks send rank 0 their file lists with sizes and hashes; rank 0 checks that it
   sees every file, writes the manifest last, renames the folder into place and applies
   retention; a last vote tells every rank whether the commit happened.

Ranks must see the same run folder (one machine, or a shared file system on several).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

import torch

from savepoints.errors import (
    InvalidArgumentError,
    RankFailedError,
    RanksDisagreeError,
    RanksError,
    RanksTimeoutError,
)
from savepoints.journal import Journal
from savepoints.layout import MANIFEST_NAME
from savepoints.lineage import Ancestry, LineageSource, lineage_for
from savepoints.manifest import (
    Contents,
    FileEntry,
    Manifest,
    RanksInfo,
    RngInfo,
    parse_manifest,
    read_manifest,
)
from savepoints.preemption import preemption_request
from savepoints.savepoint import SavePoint
from savepoints.staging import FileRecorder
from savepoints.storage import Storage
from savepoints.writer import (
    Continues,
    clear_error,
    new_bytes,
    record_save,
    replaces,
    versions,
)

log = logging.getLogger("savepoints")

#: Seconds a rank waits for the others at each step of a collective save or restore.
#: It must exceed the longest write of one rank (a slow disk, a large model).
DEFAULT_TIMEOUT = 600.0
TIMEOUT_ENV = "SAVEPOINTS_TIMEOUT"


def default_timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise InvalidArgumentError(
            f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds.",
            f"Set e.g. {TIMEOUT_ENV}=1800, or unset it for the default {DEFAULT_TIMEOUT:g} s.",
        )
    return value


class Ranks:
    """The processes of one ``torch.distributed`` job, as savepoints coordinates them.

    ``rank`` and ``world`` are the default group's. Messages go through a gloo group
    created here (so they work whatever the training backend, NCCL included) whose
    timeout is ``timeout`` seconds, created at the first message (creating it is itself
    collective, and so are the calls that send messages) and shared by every run of the
    process that uses the same timeout: opening a run read-only on one rank (to list it,
    say) involves no other rank.
    """

    def __init__(self, timeout: float | None = None) -> None:
        import torch.distributed as dist

        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.timeout = default_timeout() if timeout is None else float(timeout)

    @classmethod
    def detect(cls, timeout: float | None = None) -> Ranks | None:
        """The ranks of the process group in use, or None outside of one."""
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise InvalidArgumentError(
                f"timeout={timeout!r} is not a positive number of seconds.",
                "Pass e.g. SavePoints(path, timeout=1800).",
            )
        try:
            import torch.distributed as dist
        except ImportError:  # pragma: no cover - torch built without distributed
            return None
        if not (dist.is_available() and dist.is_initialized()):
            return None
        return cls(timeout)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _group(self, during: str) -> Any:
        import torch.distributed as dist

        key = (self.timeout, id(dist.group.WORLD))
        group = _GROUPS.get(key)
        if group is None:

            def create() -> None:
                _GROUPS[key] = dist.new_group(
                    backend="gloo", timeout=timedelta(seconds=self.timeout)
                )

            self._run(create, during)
            group = _GROUPS[key]
        return group

    # ------------------------------------------------------------------ messages

    def _run(self, op: Callable[[], Any], during: str) -> None:
        try:
            op()
        except RuntimeError as e:
            text = str(e)
            if "timed out" in text.lower() or "timeout" in text.lower():
                raise RanksTimeoutError(
                    self.rank, self.world, during, self.timeout, _short(text)
                ) from e
            raise RanksError(
                f"Rank {self.rank} of {self.world} lost the other ranks during {during} "
                f"({_short(text)}): a rank died or left the job. Nothing committed was "
                "changed.",
                "Restart the job; it resumes from the last committed save point.",
            ) from e

    def all_gather_json(self, value: Any, during: str) -> list[Any]:
        """Every rank's ``value`` (JSON), in rank order, on every rank."""
        if self.world == 1:
            return [json.loads(json.dumps(value))]
        import torch.distributed as dist

        group = self._group(during)
        data = json.dumps(value, allow_nan=False).encode()
        size = torch.tensor([len(data)], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        self._run(lambda: dist.all_gather(sizes, size, group=group), during)
        longest = max(int(s.item()) for s in sizes)
        buf = torch.zeros(longest, dtype=torch.uint8)
        if data:
            buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        bufs = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.world)]
        self._run(lambda: dist.all_gather(bufs, buf, group=group), during)
        return [json.loads(b[: int(s.item())].numpy().tobytes()) for b, s in zip(bufs, sizes)]

    def broadcast_json(self, value: Any, during: str) -> Any:
        """Rank 0's ``value``, on every rank (the others pass anything, e.g. None)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        group = self._group(during)
        data = json.dumps(value if self.is_main else None, allow_nan=False).encode()
        size = torch.tensor([len(data) if self.is_main else 0], dtype=torch.int64)
        self._run(lambda: dist.broadcast(size, src=0, group=group), during)
        buf = torch.zeros(int(size.item()), dtype=torch.uint8)
        if self.is_main and data:
            buf[:] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self._run(lambda: dist.broadcast(buf, src=0, group=group), during)
        return json.loads(buf.numpy().tobytes())

    def agree(self, what: str, value: Any, during: str) -> None:
        """Raise :class:`RanksDisagreeError` on every rank unless all passed ``value``."""
        values = self.all_gather_json(value, during)
        if any(v != values[0] for v in values):
            raise RanksDisagreeError(what, during, values)

    def any(self, flag: bool, during: str) -> bool:
        """True on every rank when ``flag`` is True on at least one."""
        return builtin_any(self.all_gather_json(bool(flag), during))

    def vote(self, failure: BaseException | None, during: str) -> None:
        """Every rank says whether its part succeeded; if one failed, every rank raises:
        a rank that failed raises its own error, the others :class:`RankFailedError`
        naming which rank failed and why."""
        said = None if failure is None else _short(f"{type(failure).__name__}: {failure}", 400)
        votes = self.all_gather_json(said, during)
        failures = [(r, why) for r, why in enumerate(votes) if why is not None]
        if not failures:
            return
        if failure is not None:
            raise failure
        raise RankFailedError(during, failures)

    def barrier(self, during: str) -> None:
        self.all_gather_json(None, during)


builtin_any = any
#: The gloo groups savepoints talks over, by (timeout, default group): one per process.
_GROUPS: dict[tuple[float, int], Any] = {}


def check_not_in_a_job(run: Path) -> None:
    """Refuse to open a run from one rank of a launcher's job (torchrun and accelerate
    set ``WORLD_SIZE``) before ``torch.distributed`` is initialised: every rank would
    then act as the only writer, and all but one would fail on the run's lock."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        rank = os.environ.get("RANK", "?")
        raise InvalidArgumentError(
            f"SavePoints({str(run)!r}) was opened on rank {rank} of a {world}-process job "
            "before torch.distributed was initialised, so the ranks cannot write the run "
            "together.",
            "Open it after torch.distributed.init_process_group(...), or after creating "
            "the TrainingArguments (which initialise it under torchrun and accelerate).",
        )


def _short(text: str, limit: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RankWriter(Continues):
    """Writes the save points of a run from every rank of a job (see the module's
    docstring for the protocol). The same ``save`` as :class:`~savepoints.writer.Writer`,
    synchronous only; rank 0 alone touches the storage's commit side."""

    async_save = False
    busy = False

    def __init__(
        self,
        storage: Storage,
        ranks: Ranks,
        *,
        keep_record: Callable[[], dict[str, Any]],
        after_commit: Callable[[int, int, int], None],
        journal: Journal | None = None,
        lineage: LineageSource | None = None,
    ) -> None:
        self.storage = storage
        self.journal = journal
        self.ranks = ranks
        self._keep_record = keep_record
        self._after_commit = after_commit
        #: Rank 0's (which writes the manifests, and alone runs git and hashes the data);
        #: None on the other ranks.
        self.lineage = lineage
        #: Kept on every rank (they restore and save the same steps); rank 0's is written.
        self.ancestry = Ancestry()

    def wait(self) -> SavePoint | None:
        return None

    def close(self) -> None:
        return None

    def save(
        self,
        step: int,
        write: Callable[[FileRecorder], Contents],
        *,
        metrics: dict[str, float],
        state: dict[str, Any],
        tags: tuple[str, ...],
        overwrite: bool,
    ) -> SavePoint:
        ranks = self.ranks
        started = time.perf_counter()
        during = f"save(step={step})"
        ranks.agree("the step", step, during)
        session = None if self.lineage is None else self.lineage.session
        after, chain = self.ancestry.then(step, session)
        staged = None
        failure: BaseException | None = None
        replace = False
        added = 0  # bytes the commit adds to the disk (rank 0 knows)
        if ranks.is_main:
            try:
                replace = replaces(self.storage, step, overwrite)
                staged = self.storage.stage(step)
            except BaseException as e:
                failure = clear_error(e, self.storage.root, step)
        ranks.vote(failure, during)
        where = Path(ranks.broadcast_json(str(staged.path) if staged else None, during))
        rec = FileRecorder(where)
        contents: Contents = {}
        try:
            contents = write(rec)
        except BaseException as e:
            failure = clear_error(e, self.storage.root, step)
        try:
            ranks.vote(failure, during)
            parts = ranks.all_gather_json(_rank_part(rec, contents), during)
            manifest = None
            if staged is not None:
                try:
                    manifest = Manifest(
                        step=step,
                        created=datetime.now(timezone.utc),
                        files=_merge_files(staged.path, parts),
                        metrics=metrics,
                        tags=tags,
                        state=state,
                        parent=self.parent,
                        contents=_merge_contents(contents, parts),
                        versions=versions(),
                        keep=self._keep_record(),
                        preempted=preemption_request(),
                        lineage=lineage_for(self.lineage, chain),
                    )
                    # What other ranks sent is checked as any reader would, before it counts.
                    parse_manifest(manifest.to_json(), staged.final / MANIFEST_NAME)
                    added = new_bytes(self.storage, manifest.files)
                    self.storage.commit(staged, manifest, replace=replace)
                    if self.journal is not None:
                        record_save(
                            self.journal, manifest, new_bytes=added,
                            stall=time.perf_counter() - started, background=0.0,
                            mode=f"{ranks.world} ranks", snapshot="eager", replaced=replace,
                        )  # fmt: skip
                except BaseException as e:
                    failure = clear_error(e, self.storage.root, step)
            ranks.vote(failure, f"{during}, committing")
        except BaseException:
            if staged is not None:
                staged.abort()
            raise
        self.ancestry = after
        final = self.storage.point_dir(step)
        if manifest is None:
            manifest = read_manifest(final / MANIFEST_NAME)
        point = SavePoint(final, manifest)
        if ranks.is_main:
            log.info("savepoints: committed step %d from %d ranks at %s", step, ranks.world, final)
            self._after_commit(step, manifest.total_size, added)
        return point


def _rank_part(rec: FileRecorder, contents: Contents) -> dict[str, Any]:
    """What one rank tells rank 0 about its part of a save point."""
    return {
        "files": {rel: [e.size, e.hash] for rel, e in rec.files.items()},
        "rng": contents.get("rng"),
        "extra": contents.get("extra", {}),
    }


def _merge_files(staging: Path, parts: Sequence[dict[str, Any]]) -> dict[str, FileEntry]:
    """Every rank's files, each written by exactly one rank and seen by rank 0."""
    files: dict[str, FileEntry] = {}
    for rank, part in enumerate(parts):
        for rel, (size, digest) in part["files"].items():
            if rel in files:
                raise RanksError(
                    f"{rel} was written by two ranks (rank {rank} and another); a save point "
                    "file has one writer.",
                    "Give per-rank objects names of their own, or report this as a bug.",
                )
            try:
                seen = (staging / rel).stat().st_size
            except FileNotFoundError:
                seen = -1
            if seen != size:
                raise RanksError(
                    f"Rank 0 does not see {rel} as rank {rank} wrote it into {staging} "
                    f"({size} bytes written, {'none' if seen < 0 else seen} seen).",
                    "Every rank must see the same run folder: use a path on a shared file "
                    "system when the ranks run on several machines.",
                )
            files[rel] = FileEntry(int(size), str(digest))
    return files


def _merge_contents(main: Contents, parts: Sequence[dict[str, Any]]) -> Contents:
    """Rank 0's ``contents`` (the components written once) plus the per-rank parts."""
    merged = cast(Contents, dict(main))
    ranks: RanksInfo = {
        "world_size": len(parts),
        "written": [{"files": sorted(p["files"])} for p in parts],
    }
    if any(p["rng"] is not None for p in parts):
        ranks["rng"] = [cast(RngInfo, p["rng"] or {"files": [], "generators": []}) for p in parts]
    if any(p["extra"] for p in parts):
        ranks["extra"] = [p["extra"] for p in parts]
    merged["ranks"] = ranks
    return merged
