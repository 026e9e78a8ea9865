"""Retention policies: pure functions, no files."""

from __future__ import annotations

import pytest

from savepoints import InvalidArgumentError, Keep
from savepoints.keep import PointInfo, rank_best, select, to_delete


def pts(*specs):
    """specs: step, or (step, loss), or (step, loss, tags)."""
    out = []
    for s in specs:
        if isinstance(s, int):
            out.append(PointInfo(s))
        else:
            step, loss, *rest = s
            metrics = {} if loss is None else {"loss": loss}
            out.append(PointInfo(step, metrics, tuple(rest[0]) if rest else ()))
    return out


@pytest.mark.parametrize(
    ("keep", "points", "kept"),
    [
        # default keeps everything
        (Keep(), pts(1, 2, 3), {1, 2, 3}),
        (Keep(metric="loss"), pts(1, 2, 3), {1, 2, 3}),
        # last N
        (Keep(last=2), pts(1, 2, 3, 4), {3, 4}),
        (Keep(last=10), pts(1, 2), {1, 2}),
        (Keep(last=1), pts(5), {5}),
        # order of input does not matter
        (Keep(last=2), pts(4, 1, 3, 2), {3, 4}),
        # best K, min and max
        (Keep(best=1, metric="loss"), pts((1, 0.5), (2, 0.1), (3, 0.9)), {2, 3}),
        (Keep(best=2, metric="loss"), pts((1, 0.5), (2, 0.1), (3, 0.9), (4, 0.7)), {1, 2, 4}),
        (
            Keep(best=1, metric="loss", mode="max"),
            pts((1, 0.5), (2, 0.1), (3, 0.9), (4, 0.2)),
            {3, 4},
        ),
        # union of last and best
        (Keep(last=1, best=1, metric="loss"), pts((1, 0.1), (2, 0.5), (3, 0.9)), {1, 3}),
        # the best is kept even without best=..., as long as a metric is set
        (Keep(last=1, metric="loss"), pts((1, 0.1), (2, 0.5), (3, 0.9)), {1, 3}),
        # points without the metric are never "best"
        (Keep(last=1, best=1, metric="loss"), pts((1, None), (2, 0.3), (3, None)), {2, 3}),
        # ties go to the earlier step (the first to reach the value)
        (Keep(last=1, best=1, metric="loss"), pts((1, 0.2), (2, 0.2), (3, 0.9)), {1, 3}),
        # milestones
        (Keep(every=10), pts(5, 10, 15, 20, 25), {10, 20, 25}),
        (Keep(last=1, every=100), pts(50, 100, 150, 199), {100, 199}),
        # tags protect
        (Keep(last=1), pts((1, None, ["release"]), (2, None), (3, None)), {1, 3}),
        (Keep(last=1, keep_tagged=False), pts((1, None, ["release"]), (2, None), (3, None)), {3}),
        # everything at once
        (
            Keep(last=2, best=1, metric="loss", every=4),
            pts((1, 0.3), (2, 0.05, ["x"]), (3, 0.2), (4, 0.9), (5, 0.01), (6, 0.8), (7, 0.7)),
            {2, 4, 5, 6, 7},
        ),
        # nothing to select from
        (Keep(last=1), [], set()),
    ],
)
def test_select_keeps_the_union_of_rules_plus_newest_and_best(keep, points, kept):
    assert select(points, keep) == kept
    assert to_delete(points, keep) == sorted({p.step for p in points} - kept)


def test_newest_and_best_survive_any_policy():
    points = pts((1, 0.0), (2, 5.0), (3, 4.0), (4, 3.0))
    for keep in (
        Keep(last=1, metric="loss"),
        Keep(every=1000, metric="loss"),
        Keep(best=1, metric="loss"),
    ):
        kept = select(points, keep)
        assert 4 in kept and 1 in kept


def test_rank_best_orders_by_metric_then_earlier_step():
    ranked = rank_best(pts((1, 0.2), (2, 0.1), (3, 0.2), (4, None)), "loss", "min")
    assert [p.step for p in ranked] == [2, 1, 3]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"last": 0}, "last must be a whole number"),
        ({"last": -1}, "last must be a whole number"),
        ({"every": 0}, "every must be"),
        ({"best": 1}, "needs a metric"),
        ({"best": 2.5, "metric": "x"}, "best must be"),
        ({"mode": "lowest"}, "mode must be 'min' or 'max'"),
        ({"last": True}, "last must be"),
    ],
)
def test_bad_keep_is_rejected_at_construction(kwargs, fragment):
    with pytest.raises(InvalidArgumentError, match=fragment) as err:
        Keep(**kwargs)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    ("metric", "mode"),
    [("eval_loss", "min"), ("loss", "min"), ("eval_accuracy", "max"), ("f1", "max"), (None, "min")],
)
def test_mode_defaults_to_transformers_greater_is_better_rule(metric, mode):
    assert Keep(metric=metric).mode == mode
    assert Keep(metric=metric, mode="max").mode == "max"


def test_keep_is_keyword_only_and_frozen():
    with pytest.raises(TypeError):
        Keep(3)  # type: ignore[misc]
    keep = Keep(last=3)
    with pytest.raises(AttributeError):
        keep.last = 4  # type: ignore[misc]
