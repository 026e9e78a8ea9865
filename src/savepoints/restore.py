"""The one restore path: check everything, then apply.

``SavePoints.restore`` and the Trainer callback's loaders both come through
:func:`restore_into`, so a save point is read and checked the same way whichever loads it.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from savepoints.compact import expanded_view
from savepoints.errors import InvalidArgumentError, NothingToRestoreError, StateMismatchError
from savepoints.manifest import Contents
from savepoints.savepoint import SavePoint
from savepoints.serialize import reading
from savepoints.sharded import prepare_named_optimizer
from savepoints.training_state import prepare_object, prepare_optimizer, read_tree, restore_rng
from savepoints.weights import is_dtensor, prepare_model, unwrap_model

if TYPE_CHECKING:
    from savepoints.distributed import Ranks


def restore_into(
    point: SavePoint,
    *,
    model: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
    rng: bool = False,
    extra: Mapping[str, Any] | None = None,
    ranks: Ranks | None = None,
    names_from: Any = None,
    rank: int = 0,
) -> None:
    """Load ``point`` into the live objects given (None: leave that one alone).

    Two phases: every file is read and checked against its object first (names,
    shapes, dtypes, classes, parameter groups), and only then is anything changed; so a
    bad optimizer file does not leave the model restored and the optimizer not. A
    compacted save point reads through a view with its originals rebuilt.

    With ``ranks`` (a multi-rank job; every rank calls this together), the ranks vote
    after checking and after applying: one rank's failure is every rank's error, before
    anything changed when the check failed. Each rank reads its own RNG and per-rank
    objects, and of sharded tensors only its slice. ``names_from``: the model whose
    parameter names key an optimizer state saved by name, when ``model`` is not given.
    ``rank``: whose RNG and per-rank objects to read when no ``ranks`` are given (one
    rank restoring on its own).
    """
    contents = point.manifest.contents
    extra = dict(extra or {})
    rank = ranks.rank if ranks is not None else rank
    per_rank = contents.get("ranks", {})
    saved_extra = contents.get("extra", {})
    if per_rank.get("extra"):
        saved_extra = per_rank["extra"][rank] if rank < len(per_rank["extra"]) else {}
    wanted = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    absent = [k for k, v in wanted.items() if v is not None and k not in contents]
    absent += [f"extra[{k!r}]" for k in extra if k not in saved_extra]
    if absent:
        raise NothingToRestoreError(point.path, absent, list(contents))
    during = f"restore(step {point.step})"
    with reading(point.path), expanded_view(point.path, point.manifest) as folder:
        apply: list[Callable[[], None]] = []
        failure: BaseException | None = None
        try:
            if model is not None:
                apply.append(prepare_model(model, folder, contents["model"]))
            if optimizer is not None:
                apply.append(_prepare_optimizer(optimizer, model or names_from, folder,
                                                contents["optimizer"]))  # fmt: skip
            loads: list[tuple[str, Any, Mapping[str, Any]]] = []
            if scheduler is not None:
                loads.append(("scheduler", scheduler, contents["scheduler"]))
            loads += [(name, obj, saved_extra[name]) for name, obj in extra.items()]
            for name, obj, info in loads:
                obj_state = prepare_object(name, obj, folder, info)
                apply.append(functools.partial(obj.load_state_dict, obj_state))
            if rng:
                rng_info = _rng_of(contents, rank, point)
                if rng_info is not None:
                    rng_state = read_tree(folder, rng_info)
                    apply.append(functools.partial(restore_rng, rng_state, folder))
        except BaseException as e:
            failure = e
        _settle(ranks, failure, f"{during}, checking")
        try:
            for step in apply:
                step()
        except BaseException as e:
            failure = e
        _settle(ranks, failure, f"{during}, loading")


def _settle(ranks: Ranks | None, failure: BaseException | None, during: str) -> None:
    """Raise ``failure``; with several ranks, first let every rank learn of any rank's."""
    if ranks is not None:
        ranks.vote(failure, during)
    elif failure is not None:
        raise failure


def _prepare_optimizer(
    optimizer: Any, model: Any, folder: Path, info: Mapping[str, Any]
) -> Callable[[], None]:
    if info.get("keys") == "names":
        if model is None:
            raise InvalidArgumentError(
                f"The optimizer state in {folder} is stored by parameter name (it was saved "
                "by several ranks), so restoring it needs the model too.",
                "Pass model=model to restore() along with optimizer=.",
            )
        return prepare_named_optimizer(model, optimizer, folder, info)
    if model is not None and any(is_dtensor(p) for p in unwrap_model(model).parameters()):
        raise StateMismatchError(
            "optimizer", folder, why="it was saved by a single process and the parameters "
            "here are sharded (DTensor); that restore is not supported yet",
        )  # fmt: skip
    opt_state = prepare_optimizer(optimizer, folder, info)
    return functools.partial(optimizer.load_state_dict, opt_state)


def _rng_of(contents: Contents, rank: int, point: SavePoint) -> Mapping[str, Any] | None:
    """This rank's RNG state: its own when several ranks saved, else the one there is."""
    per_rank = contents.get("ranks", {}).get("rng")
    if per_rank:
        if rank < len(per_rank):
            return per_rank[rank]
        warnings.warn(
            f"savepoints: {point.path} was saved by {len(per_rank)} rank(s) and holds no "
            f"random number state for rank {rank}; its random numbers will differ from a "
            "run that never stopped.",
            stacklevel=4,
        )
        return None
    return contents.get("rng")
