"""What a report shows, gathered from a run folder: its journal, its manifests, its disk.

Read-only and safe while the run trains (the journal's last line may be in progress; a
save point is what has a manifest). Runs written before the journal existed still get a
report: their curves then come from the metrics of each save point.
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
import platform
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

from savepoints.journal import read_journal
from savepoints.savepoint import SavePoint

#: Logged values that are bookkeeping, not curves (the Trainer's end-of-run summary...).
_NOT_CURVES = ("runtime", "per_second", "total_flos", "epoch")
#: The Trainer's end-of-training summary line (an average loss, throughput): not a curve.
_SUMMARY_KEY = "train_runtime"
#: The heatmap diffs at most this many pairs of save points (evenly spread over the run).
HEATMAP_COLUMNS = 24

Progress = Callable[[str, int, int], None]


@dataclass
class PointRow:
    """One save point the run has had: committed now, or deleted since."""

    step: int
    created: datetime | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    size: int | None = None
    new_bytes: int | None = None
    """What its commit added to the disk (files no earlier save point had)."""
    unique: int | None = None
    """What only it holds now (freed if it alone were deleted)."""
    stall_s: float | None = None
    background_s: float | None = None
    parent: int | None = None
    preempted: str | None = None
    path: Path | None = None
    """Its folder, while it exists."""
    deleted: str | None = None
    """Why it is gone: retention's rule, or "deleted by hand"."""
    best: bool = False
    latest: bool = False
    verified: bool | None = None
    """None: not checked for this report."""
    problems: list[str] = field(default_factory=list)

    @property
    def kept(self) -> bool:
        return self.deleted is None


@dataclass
class Session:
    """One process that wrote the run (from its ``open`` line to its ``close``)."""

    id: str
    started: float | None = None
    pid: int | None = None
    host: str | None = None
    argv: list[str] = field(default_factory=list)
    resumed_from: int | None = None
    first_step: int | None = None
    last_step: int | None = None
    ended: str = "closed"
    """closed, preempted (signal), running, or killed."""


@dataclass
class Curve:
    """One logged value (``loss``, ``eval_accuracy``...): a segment per session."""

    name: str
    segments: list[tuple[str, list[tuple[float, float]], bool]] = field(default_factory=list)
    """(session, points, superseded): superseded points were redone after a resume."""

    @property
    def count(self) -> int:
        return sum(len(points) for _, points, _ in self.segments)

    def value_at(self, step: int, *, between: bool = False) -> float | None:
        """The value logged at ``step`` (not one redone after a resume); with
        ``between``, else the straight line between the values logged around it (where a
        marker sits on a curve logged every few steps)."""
        for _, points, superseded in reversed(self.segments):
            if superseded:
                continue
            # Sorted by step: a bisection (a report of a long run asks for every save point).
            i = bisect.bisect_left(points, (step, -math.inf))
            if i < len(points) and points[i][0] == step:
                return points[i][1]
            if between and 0 < i < len(points):
                (s0, v0), (s1, v1) = points[i - 1], points[i]
                return v0 + (v1 - v0) * (step - s0) / (s1 - s0)
        return None


@dataclass
class Heatmap:
    layers: list[str]
    columns: list[str]
    values: list[list[float | None]]
    note: str = ""


@dataclass
class RunData:
    """Everything a report of one run shows."""

    run: Path
    points: list[PointRow]
    curves: dict[str, Curve]
    sessions: list[Session]
    storage: list[tuple[int, int, int]]
    """(step, logical bytes, physical bytes) after each save and its retention."""
    heatmap: Heatmap | None
    best_rule: tuple[str, str] | None
    """(metric, mode) that picks the best save point."""
    settings: dict[str, Any]
    settings_source: str
    versions: dict[str, str]
    keep: dict[str, Any] | None
    generated: datetime
    journal_lines: int
    journal_skipped: int
    events: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return self.run.resolve().name or str(self.run)

    @property
    def kept(self) -> list[PointRow]:
        return [p for p in self.points if p.kept]

    @property
    def resumes(self) -> list[tuple[int, str]]:
        """(step, label) of each resume: where the curves break."""
        return [(s.resumed_from, f"resumed from {s.resumed_from}") for s in self.sessions
                if s.resumed_from is not None]  # fmt: skip


def _natural(text: str) -> list[Any]:
    """Sort key: ``layer 2`` before ``layer 10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def gather(
    run: str | os.PathLike[str], *, verify: bool = True, heatmap: bool = True,
    progress: Progress | None = None,
) -> RunData:  # fmt: skip
    """Read everything the report of ``run`` shows. ``verify`` re-hashes every kept save
    point (``progress(what, done, total)`` is told as it goes)."""
    from savepoints.manager import SavePoints

    root = Path(run)
    journal = read_journal(root)
    events = journal.events
    with SavePoints(root, readonly=True) as points:
        committed = points.list()
        usage = points.usage()
        try:
            best = points.best()
            best_rule = points._best_rule(committed, None, None)
        except Exception:  # no metric named anywhere, or none recorded: no best
            best, best_rule = None, None
    rows = _point_rows(committed, events, usage.unique)
    if best is not None:
        for row in rows:
            row.best = row.step == best.step
    if committed:
        next(r for r in rows if r.step == committed[-1].step).latest = True
    if verify:
        manifests = {p.step: p.manifest for p in committed}
        kept = [r for r in rows if r.path is not None]
        for i, row in enumerate(kept):
            if progress is not None:
                progress("verifying", i, len(kept))
            assert row.path is not None
            report = SavePoint(row.path, manifests[row.step]).verify()
            if not report.ok and not row.path.exists():
                # Retention of the training process deleted it while this report was read.
                row.path, row.deleted = None, "deleted while this report was written"
                continue
            row.verified = report.ok
            row.problems = [str(p) for p in report.all_problems()[:5]]
        if progress is not None:
            progress("verifying", len(kept), len(kept))
    sessions = _sessions(events, root)
    curves = _curves(events, sessions, committed)
    fields = ("step", "logical", "physical")
    storage = [(e["step"], e["logical"], e["physical"]) for e in events if e["event"] == "storage"
               and all(isinstance(e.get(k), int) for k in fields)]  # fmt: skip
    if not storage and committed:
        storage = [(committed[-1].step, usage.logical, usage.physical)]
    newest = committed[-1].manifest if committed else None
    settings, source = _settings(newest.state if newest else {})
    return RunData(
        run=root,
        points=rows,
        curves=curves,
        sessions=sessions,
        storage=storage,
        heatmap=_heatmap(committed, progress) if heatmap else None,
        best_rule=best_rule,
        settings=settings,
        settings_source=source,
        versions=dict(newest.versions) if newest else {},
        keep=newest.keep if newest else None,
        generated=datetime.now(timezone.utc),
        journal_lines=len(journal),
        journal_skipped=journal.skipped,
        events=events,
    )


def _point_rows(
    committed: list[SavePoint], events: list[dict[str, Any]], unique: Mapping[int, int]
) -> list[PointRow]:
    """Every save point the run has had; what the journal says of it, then its manifest."""
    rows: dict[int, PointRow] = {}
    for e in events:
        kind, step = e["event"], e.get("step")
        if not isinstance(step, int):
            continue
        if kind == "save":
            row = rows[step] = PointRow(step)  # a save of a step again replaces it
            stamp = e.get("time")
            if isinstance(stamp, (int, float)):
                row.created = datetime.fromtimestamp(stamp, timezone.utc)
            row.metrics = {k: v for k, v in (e.get("metrics") or {}).items()
                           if isinstance(v, (int, float))}  # fmt: skip
            row.tags = list(e.get("tags") or [])
            row.size, row.new_bytes = e.get("size"), e.get("new_bytes")
            row.stall_s, row.background_s = e.get("stall_s"), e.get("background_s")
            row.parent, row.preempted = e.get("parent"), e.get("preempted")
        elif kind in ("retention", "delete") and step in rows:
            rows[step].deleted = (
                f"retention: {e.get('rule', '')}" if kind == "retention" else "deleted by hand"
            )
        elif kind == "tag" and step in rows and e.get("tag") not in rows[step].tags:
            rows[step].tags.append(str(e.get("tag")))
        elif kind == "untag" and step in rows:
            rows[step].tags = [t for t in rows[step].tags if t != e.get("tag")]
        elif kind == "preempted" and step in rows:
            rows[step].preempted = rows[step].preempted or str(e.get("signal"))
    for point in committed:
        row = rows.setdefault(point.step, PointRow(point.step))
        row.created = point.created
        row.metrics = dict(point.metrics)
        row.tags = list(point.tags)
        row.size = point.size
        row.parent = point.parent
        row.preempted = point.preempted
        row.path = point.path
        row.deleted = None
        row.unique = unique.get(point.step)
    for row in rows.values():
        if row.path is None and row.deleted is None:
            row.deleted = "gone (deleted outside savepoints, or by a crash before its journal)"
    return sorted(rows.values(), key=lambda r: r.step)


def _alive(pid: int | None, host: str | None) -> bool:
    if pid is None or host != platform.node():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sessions(events: list[dict[str, Any]], root: Path) -> list[Session]:
    """The processes that wrote the run, in order, with where each resumed and ended."""
    sessions: dict[str, Session] = {}
    restores: dict[str, list[int]] = {}
    for e in events:
        sid = str(e.get("session"))
        s = sessions.get(sid)
        if s is None:
            s = sessions[sid] = Session(sid, started=e.get("time"), ended="")
        kind, step = e["event"], e.get("step")
        if kind == "open":
            s.pid, s.host, s.argv = e.get("pid"), e.get("host"), list(e.get("argv") or [])
        elif kind == "close":
            s.ended = s.ended or "closed"
        elif kind == "preempted":
            s.ended = f"preempted ({e.get('signal')}) at step {step}"
        elif kind == "restore" and isinstance(step, int) and e.get("this_run", True):
            restores.setdefault(sid, []).append(step)
        if kind in ("log", "save") and isinstance(step, int):
            if s.first_step is None:
                # A restore before the first logged step is where this process resumed
                # (one after it is loading a model to use, not a resume).
                before = restores.get(sid, [])
                s.resumed_from = before[-1] if before else None
            s.first_step = step if s.first_step is None else min(s.first_step, step)
            s.last_step = step if s.last_step is None else max(s.last_step, step)
    ordered = list(sessions.values())
    for i, s in enumerate(ordered):
        if s.ended:
            continue
        if i < len(ordered) - 1:
            s.ended = "killed"  # another process opened the run after it, without a close
        elif s.host not in (None, platform.node()):
            s.ended = f"no close yet (running on {s.host}, or killed)"
        else:
            s.ended = "running" if _alive(s.pid, s.host) else "killed"
    return ordered


def _keys_of(values: Mapping[str, Any]) -> Iterable[tuple[str, float]]:
    for key, value in values.items():
        if key.endswith(_NOT_CURVES) or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            yield key, float(value)


def _curves(
    events: list[dict[str, Any]], sessions: list[Session], committed: list[SavePoint]
) -> dict[str, Curve]:
    """Each logged value as segments per session; what a later resume redid is marked."""
    per: dict[str, dict[str, dict[int, float]]] = {}  # name -> session -> step -> value
    for e in events:
        step = e.get("step")
        if not isinstance(step, int):
            continue
        values = e.get("values") if e["event"] == "log" else None
        if values and _SUMMARY_KEY in values:
            continue
        if e["event"] == "save":
            values = e.get("metrics")
        for key, value in _keys_of(values or {}):
            per.setdefault(key, {}).setdefault(str(e.get("session")), {})[step] = value
    # Save points from before the journal (an older savepoints wrote them): their metrics.
    journaled = {e.get("step") for e in events if e["event"] == "save"}
    for point in committed:
        if point.step not in journaled:
            for key, value in _keys_of(point.metrics):
                per.setdefault(key, {}).setdefault("", {})[point.step] = value
    order = ["", *(s.id for s in sessions)]
    # Where each later session restarted from: what earlier ones logged past it was redone.
    restart: list[float] = [math.inf]  # the save points from before the journal
    for s in sessions:
        if s.resumed_from is not None:
            restart.append(s.resumed_from)
        elif s.first_step is not None:
            restart.append(s.first_step - 1)
        else:
            restart.append(math.inf)
    curves: dict[str, Curve] = {}
    for name, by_session in per.items():
        curve = curves[name] = Curve(name)
        for i, sid in enumerate(order):
            values = by_session.get(sid)
            if not values:
                continue
            cut = min(restart[i + 1 :], default=math.inf)
            points = sorted(values.items())
            live = [(float(s), v) for s, v in points if s <= cut]
            redone = [(float(s), v) for s, v in points if s > cut]
            if live:
                curve.segments.append((sid, live, False))
            if redone:
                curve.segments.append((sid, redone, True))
    return curves


def _settings(state: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The run's settings: ``savepoints train``'s arguments, else the user state's scalars."""
    finetune = state.get("finetune")
    if isinstance(finetune, dict):
        return dict(finetune), "savepoints train"
    scalars = {k: v for k, v in state.items()
               if isinstance(v, (str, int, float, bool)) or v is None}  # fmt: skip
    return scalars, "the save points' state"


def _heatmap(committed: list[SavePoint], progress: Progress | None) -> Heatmap | None:
    """Relative change per layer between consecutive save points (as ``savepoints diff``)."""
    from savepoints.compact import compacted

    with_model = [p for p in committed if "model" in p.contents
                  and not compacted(p.manifest)]  # fmt: skip
    if len(with_model) < 2:
        return None
    note = ""
    skipped = len([p for p in committed if "model" in p.contents]) - len(with_model)
    if skipped:
        note = f"{skipped} compacted save point(s) left out (`savepoints expand` them to compare)."
    if len(with_model) > HEATMAP_COLUMNS + 1:
        n = len(with_model)
        # Every stride-th save point and the last: a stride that only doubles keeps the
        # same pairs from one report to the next (they are cached), as the run grows.
        stride = 1
        while (n - 1) / stride > HEATMAP_COLUMNS:
            stride *= 2
        picks = sorted({*range(0, n, stride), n - 1})
        note = (
            f"{n} save points: every {stride}th and the last are compared "
            f"({len(picks) - 1} columns, each spanning the steps it names). {note}"
        ).strip()
        with_model = [with_model[i] for i in picks]
    columns: list[str] = []
    layers: dict[str, dict[int, float]] = {}
    pairs = list(itertools.pairwise(with_model))
    for i, (a, b) in enumerate(pairs):
        if progress is not None:
            progress("comparing layers", i, len(pairs))
        columns.append(f"{a.step}→{b.step}")
        try:
            changes = _layer_changes(str(a.path), a.manifest.created.timestamp(),
                                     str(b.path), b.manifest.created.timestamp())  # fmt: skip
        except Exception as e:  # one pair that cannot be read leaves its column empty
            note = (note + " " if note else "") + f"{a.step}→{b.step}: not compared ({e})."
            continue
        for layer, value in changes.items():
            layers.setdefault(layer, {})[i] = value
    if progress is not None:
        progress("comparing layers", len(pairs), len(pairs))
    names = sorted(layers, key=_natural)
    values = [[layers[n].get(i) for i in range(len(pairs))] for n in names]
    return Heatmap(names, columns, values, note)


@lru_cache(maxsize=256)
def _layer_changes(a: str, a_created: float, b: str, b_created: float) -> dict[str, float]:
    """Cached per pair of save points (a refresh during training diffs only the new pair)."""
    from savepoints.diff import ModelView, diff_models

    report = diff_models(ModelView.open(Path(a), "a"), ModelView.open(Path(b), "b"))
    return dict(report.layers)


def report_path(run: str | os.PathLike[str]) -> Path:
    """Where ``savepoints report RUN`` writes by default: ``RUN/report.html``."""
    return Path(run) / "report.html"
