"""Retention: which committed save points to keep.

Pure functions over small records (step, metrics, tags), so they are tested table by
table with no files at all. The manager only applies the decision, and only to
committed save points.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from savepoints.errors import InvalidArgumentError

Mode = Literal["min", "max"]


@dataclass(frozen=True, kw_only=True)
class Keep:
    """What to keep after each save. The default keeps everything.

    When any of ``last``, ``best`` or ``every`` is set, retention keeps the union of the
    last ``last`` save points, the ``best`` best by ``metric``, every save point whose
    step is a multiple of ``every``, and every tagged one; the newest save point and the
    best one (when ``metric`` is set) are never deleted, whatever the numbers.
    """

    last: int | None = None
    """Keep the newest N save points (by step)."""

    best: int | None = None
    """Keep the N best save points by ``metric``; needs ``metric``."""

    metric: str | None = None
    """The metric that ranks save points, e.g. ``"eval_loss"``. Also what ``best()``
    uses when it is called without a metric."""

    mode: Mode | None = None
    """``"min"`` when smaller is better (losses), ``"max"`` when larger is (accuracy).
    Left out, it follows Transformers' rule for ``greater_is_better``: ``"min"`` for a
    metric whose name ends in ``loss``, ``"max"`` for any other."""

    every: int | None = None
    """Keep every save point whose step is a multiple of this (milestones)."""

    keep_tagged: bool = field(default=True)
    """Keep every save point that has at least one tag."""

    def __post_init__(self) -> None:
        if self.mode is None:
            object.__setattr__(self, "mode", default_mode(self.metric or "loss"))
        for name in ("last", "best", "every"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise InvalidArgumentError(
                    f"Keep({name}={value!r}) is not allowed: {name} must be a whole number "
                    "of at least 1.",
                    f"Pass {name}=1 or more, or leave it out (None) to not use that rule.",
                )
        if self.mode not in ("min", "max"):
            raise InvalidArgumentError(
                f"Keep(mode={self.mode!r}) is not allowed: mode must be 'min' or 'max'.",
                "Use mode='min' for losses (lower is better), mode='max' for accuracy.",
            )
        if self.best is not None and not self.metric:
            raise InvalidArgumentError(
                f"Keep(best={self.best}) needs a metric to rank save points by.",
                "Pass metric='eval_loss' (or the metric you record) and mode='min'/'max'.",
            )

    @property
    def prunes(self) -> bool:
        """Whether this policy ever deletes anything."""
        return any(v is not None for v in (self.last, self.best, self.every))


@dataclass(frozen=True)
class PointInfo:
    """What retention needs to know of one committed save point."""

    step: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    tags: Sequence[str] = ()


def default_mode(metric: str) -> Mode:
    """Transformers' convention: lower is better for losses, higher for anything else."""
    return "min" if metric.endswith("loss") else "max"


def rank_best(points: Iterable[PointInfo], metric: str, mode: Mode) -> list[PointInfo]:
    """Points that recorded ``metric``, best first; a tie goes to the earlier step, the
    first to reach that value (as Transformers' Trainer picks its best checkpoint)."""
    scored = [p for p in points if metric in p.metrics]
    sign = 1.0 if mode == "min" else -1.0
    return sorted(scored, key=lambda p: (sign * p.metrics[metric], p.step))


def select(points: Sequence[PointInfo], keep: Keep) -> set[int]:
    """The steps to keep. Everything else may be deleted."""
    steps = {p.step for p in points}
    if not keep.prunes or not points:
        return steps
    by_step = sorted(points, key=lambda p: p.step)
    kept = {by_step[-1].step}  # the newest is never deleted
    if keep.last is not None:
        kept.update(p.step for p in by_step[-keep.last :])
    if keep.metric:
        ranked = rank_best(points, keep.metric, keep.mode or default_mode(keep.metric))
        kept.update(p.step for p in ranked[: max(keep.best or 0, 1)])
    if keep.every is not None:
        kept.update(p.step for p in points if p.step % keep.every == 0)
    if keep.keep_tagged:
        kept.update(p.step for p in points if p.tags)
    return kept


def deletion_rule(keep: Keep) -> str:
    """Why retention deletes a save point, in words: every rule it falls outside of."""
    parts = []
    if keep.last is not None:
        parts.append(f"not among the last {keep.last}")
    if keep.metric:
        best = max(keep.best or 0, 1)
        among = "the best" if best == 1 else f"the {best} best"
        parts.append(f"not {among} by {keep.metric} ({keep.mode})")
    if keep.every is not None:
        parts.append(f"step not a multiple of {keep.every}")
    if keep.keep_tagged:
        parts.append("not tagged")
    return ", ".join(parts) + ", not the newest"


def to_delete(points: Sequence[PointInfo], keep: Keep) -> list[int]:
    """Steps that retention deletes, oldest first."""
    kept = select(points, keep)
    return sorted(p.step for p in points if p.step not in kept)
