"""The one restore path: check everything, then apply.

``SavePoints.restore`` and the Trainer callback's loaders both come through
:func:`restore_into`, so a save point is read and checked the same way whichever loads it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from savepoints.compact import expanded_view
from savepoints.errors import NothingToRestoreError
from savepoints.savepoint import SavePoint
from savepoints.serialize import reading
from savepoints.training_state import prepare_object, prepare_optimizer, read_tree, restore_rng
from savepoints.weights import prepare_model


def restore_into(
    point: SavePoint,
    *,
    model: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
    rng: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Load ``point`` into the live objects given (None: leave that one alone).

    Two phases: every file is read and checked against its object first (names,
    shapes, dtypes, classes, parameter groups), and only then is anything changed; so a
    bad optimizer file does not leave the model restored and the optimizer not. A
    compacted save point reads through a view with its originals rebuilt.
    """
    contents = point.manifest.contents
    extra = dict(extra or {})
    saved_extra = contents.get("extra", {})
    wanted = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    absent = [k for k, v in wanted.items() if v is not None and k not in contents]
    absent += [f"extra[{k!r}]" for k in extra if k not in saved_extra]
    if absent:
        raise NothingToRestoreError(point.path, absent, list(contents))
    with reading(point.path), expanded_view(point.path, point.manifest) as folder:
        apply: list[Callable[[], None]] = []
        if model is not None:
            apply.append(prepare_model(model, folder, contents["model"]))
        if optimizer is not None:
            opt_state = prepare_optimizer(optimizer, folder, contents["optimizer"])
            apply.append(functools.partial(optimizer.load_state_dict, opt_state))
        loads: list[tuple[str, Any, Mapping[str, Any]]] = []
        if scheduler is not None:
            loads.append(("scheduler", scheduler, contents["scheduler"]))
        loads += [(name, obj, saved_extra[name]) for name, obj in extra.items()]
        for name, obj, info in loads:
            obj_state = prepare_object(name, obj, folder, info)
            apply.append(functools.partial(obj.load_state_dict, obj_state))
        if rng and "rng" in contents:
            rng_state = read_tree(folder, contents["rng"])
            apply.append(functools.partial(restore_rng, rng_state, folder))
        for step in apply:
            step()
