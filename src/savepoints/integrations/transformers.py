"""Hugging Face ``Trainer`` integration: save points instead of ``checkpoint-N`` folders.

    from savepoints import SavePoints
    from savepoints.transformers import SavePointsCallback, resume_path

    points = SavePoints("runs/tweets")
    trainer = Trainer(model=model, args=args, ..., callbacks=[SavePointsCallback(points)])
    trainer.train(resume_from_checkpoint=resume_path(points))   # None on a fresh run

How it works: the callback attaches itself to its Trainer (found when the Trainer
finishes ``__init__``; or call ``callback.attach(trainer)``) and takes over the private
methods through which the Trainer writes and reads checkpoints, on that instance only
(after checking that this transformers has each of them, with the parameters it relies
on: see :data:`REPLACED_METHODS`):

* ``_save_checkpoint`` writes a save point (model, processing class, optimizer,
  scheduler, grad scaler, RNG, ``trainer_state.json``, eval metrics) whenever the Trainer
  would have written ``checkpoint-N`` (``save_strategy`` steps/epoch/best,
  ``save_steps``), and no ``checkpoint-N`` at all: no double writes, no pickles.
* ``_load_from_checkpoint``, ``_load_optimizer_and_scheduler``, ``_load_rng_state`` and
  ``_load_scaler`` read a save point pickle-free (after verifying it) when
  ``resume_from_checkpoint`` is one, at exactly the moments the Trainer would have read
  its own files, which is what makes the resume bit-exact. Any other folder goes to the
  Trainer's own code.

Everything else (``trainer_state.json``, skipping the data already seen,
``load_best_model_at_end``) is the Trainer's own logic, fed with our folders.
"""

from __future__ import annotations

import inspect
import json
import math
import threading
import types
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from savepoints.compact import require_plain
from savepoints.errors import IncompatibleTransformersError, InvalidArgumentError
from savepoints.keep import Keep
from savepoints.layout import MANIFEST_NAME
from savepoints.manager import SavePoint, SavePoints
from savepoints.preemption import Preemption
from savepoints.restore import restore_into
from savepoints.snapshot import SnapshotMode

TRAINER_STATE_NAME = "trainer_state.json"
#: The oldest transformers the integration works with: CI runs the Trainer tests against
#: it (scripts/min-versions.txt, which says why older ones fail) and the newest release.
MIN_TRANSFORMERS = "4.52"
#: The private Trainer methods that ``attach`` replaces, with the parameters (after
#: ``self``) that the Trainer calls them with and that the replacements take. A release
#: that renames, removes or re-signs one of them gets an IncompatibleTransformersError at
#: attach time instead of a Trainer that silently writes or reads the wrong thing.
REPLACED_METHODS: dict[str, tuple[str, ...]] = {
    "_save_checkpoint": ("model", "trial"),
    "_load_from_checkpoint": ("resume_from_checkpoint", "model"),
    "_load_optimizer_and_scheduler": ("checkpoint",),
    "_load_rng_state": ("checkpoint",),
    "_load_scaler": ("checkpoint",),
    "_load_best_model": (),
}
# Eval outputs that describe speed, not quality: never recorded as metrics.
_NOT_METRICS = ("_runtime", "_per_second", "epoch")


def resume_path(points: SavePoints) -> str | None:
    """The folder to pass as ``Trainer.train(resume_from_checkpoint=...)``: the latest
    save point, or None when the run has none yet (a fresh start)."""
    latest = points.latest()
    return str(latest.path) if latest is not None else None


def _best_metric_key(args: Any) -> str | None:
    """The eval metric that ``TrainingArguments`` ranks checkpoints by, as logged."""
    metric = args.metric_for_best_model
    if metric is None and getattr(args, "load_best_model_at_end", False):
        metric = "loss"
    if metric is not None and not metric.startswith("eval_"):
        metric = f"eval_{metric}"
    return metric


def keep_from_args(args: Any) -> Keep:
    """The retention that ``TrainingArguments`` asks of Trainer's own checkpoints."""
    metric = _best_metric_key(args)
    greater = getattr(args, "greater_is_better", None)
    if greater is None and metric is not None:
        greater = not metric.endswith("loss")
    return Keep(
        last=args.save_total_limit or None,
        metric=metric,
        mode=("max" if greater else "min") if metric else None,
    )


def is_savepoint(folder: str | Path | None) -> bool:
    return folder is not None and (Path(folder) / MANIFEST_NAME).is_file()


class SavePointsCallback(TrainerCallback):
    """Makes a ``transformers.Trainer`` save and resume through savepoints.

    ``points``: the run to write into. When it was opened without a ``Keep``, retention
    follows ``save_total_limit``, ``metric_for_best_model`` and ``greater_is_better``.
    ``state``: JSON values added to every save point's user state. ``async_save``: write
    save points in the background (training waits only for the snapshot); the default
    is the SavePoints' own setting (True unless chosen otherwise). ``snapshot``: when the
    tensors are copied (see :mod:`savepoints.snapshot`); when neither this nor the
    SavePoints chose, ``"deferred"`` for a model on a GPU (the Trainer changes weights
    and optimizer state only in its optimizer's ``step()``, so the copy runs on its own
    CUDA stream while the next forward and backward compute, and the step waits for it)
    and ``"eager"`` on a CPU (where the copy would compete with the step for the same
    cores).
    ``preemption``: while ``train()`` runs, SIGTERM and SIGUSR1 make the Trainer take an
    emergency save point at the end of the current optimizer step and the process exit
    with code 75 (:data:`savepoints.preemption.EXIT_PREEMPTED`); running the script again
    resumes exactly there. Pass a :class:`~savepoints.preemption.Preemption` to choose
    the signals or the deadline (default 25 s), or False to leave signals alone.
    """

    def __init__(
        self,
        points: SavePoints,
        *,
        state: Mapping[str, Any] | None = None,
        async_save: bool | None = None,
        snapshot: SnapshotMode | None = None,
        preemption: Preemption | bool = True,
    ) -> None:
        if not isinstance(points, SavePoints):
            raise InvalidArgumentError(
                f"SavePointsCallback needs a SavePoints, not {type(points).__name__}.",
                "Pass SavePointsCallback(SavePoints('runs/my-run')).",
            )
        self.points = points
        if async_save is not None:
            points.async_save = async_save
        if snapshot is not None:
            points.snapshot = snapshot
        # Chosen when training starts, from where the model is (see on_train_begin).
        self._choose_snapshot = snapshot is None and not points._snapshot_given
        self.state = dict(state or {})
        self.trainer: Any = None
        self._last_eval: tuple[int, dict[str, float]] | None = None
        self._last_log: tuple[int, dict[str, float]] | None = None
        self._verified: set[Path] = set()
        if preemption is True:
            preemption = Preemption()
        elif preemption is not False and not isinstance(preemption, Preemption):
            raise InvalidArgumentError(
                f"SavePointsCallback(preemption=...) takes a Preemption, True or False, not "
                f"{type(preemption).__name__}.",
                "Pass preemption=Preemption(deadline=60), or leave the default.",
            )
        self.preemption: Preemption | None = preemption or None
        self._emergency_step: int | None = None

    # ------------------------------------------------------------------ attaching

    def attach(self, trainer: Any) -> Any:
        """Route ``trainer``'s checkpoint writes and reads through savepoints. Idempotent;
        called by itself when the callback was passed to ``Trainer(callbacks=[...])``."""
        if self.trainer is trainer:
            return trainer
        if self.trainer is not None:
            raise InvalidArgumentError(
                "This SavePointsCallback is already attached to another Trainer.",
                "Create one SavePointsCallback per Trainer.",
            )
        check_trainer(trainer)  # before anything is changed on it
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self._originals = {
            name: getattr(trainer, name)
            for name in (
                "_save_checkpoint",
                "_load_from_checkpoint",
                "_load_optimizer_and_scheduler",
                "_load_rng_state",
                "_load_scaler",
            )
        }
        trainer._save_checkpoint = types.MethodType(_save_checkpoint, self)
        original_load_best = trainer._load_best_model

        def load_best_model() -> Any:
            # The best save point may still be on its way to disk (not to the remote:
            # a push that fails must not stop the end of training).
            self.points.wait(remote=False)
            return original_load_best()

        trainer._load_best_model = load_best_model
        original_train = trainer.train

        def train(*args: Any, **kwargs: Any) -> Any:
            # The handlers live exactly as long as train(): also when it raises.
            failed = True
            try:
                result = original_train(*args, **kwargs)
                failed = False
                return result
            finally:
                if self.preemption is not None:
                    self.preemption.uninstall(deliver_pending=not failed)

        trainer.train = train
        for name in ("_load_from_checkpoint", "_load_optimizer_and_scheduler", "_load_rng_state",
                     "_load_scaler"):  # fmt: skip
            setattr(trainer, name, types.MethodType(_LOADERS[name], self))
        if not getattr(self.points, "_keep_given", True):
            self.points.keep = keep_from_args(trainer.args)
        return trainer

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = _calling_trainer()
        if trainer is not None:
            self.attach(trainer)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer is None:
            trainer = _calling_trainer()
            if trainer is None:
                raise InvalidArgumentError(
                    "SavePointsCallback could not find the Trainer it belongs to.",
                    "Call callback.attach(trainer) before trainer.train().",
                )
            if state.global_step > 0:
                raise InvalidArgumentError(
                    "SavePointsCallback was attached after the Trainer had resumed, too late "
                    "to restore the optimizer, scheduler and RNG.",
                    "Pass it in Trainer(callbacks=[...]) or call callback.attach(trainer) "
                    "before trainer.train().",
                )
            self.attach(trainer)
        if self._choose_snapshot:
            # Measured (BENCHMARKS.md): on a GPU the deferred copy runs on the copy engine
            # beside the next step (half the stall of an eager one); on a CPU it would
            # compete with the step for the same cores, and the eager copy, which torch
            # spreads over all of them, stalls less.
            model = kwargs.get("model")
            on_gpu = model is not None and any(p.is_cuda for p in model.parameters())
            self.points.snapshot = "deferred" if on_gpu else "eager"
        if self.preemption is not None and not self.preemption.installed:
            if threading.current_thread() is threading.main_thread():
                self.preemption.install()
            else:
                warnings.warn(
                    "savepoints: the Trainer runs outside the main thread, where Python "
                    "cannot receive signals; SIGTERM/SIGUSR1 will not take an emergency save "
                    "point. Run training in the main thread, or pass preemption=False to "
                    "silence this.",
                    stacklevel=2,
                )
                self.preemption = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Every rank asks, every step: a signal to any rank stops them all at this step.
        if self.preemption is not None and self.preemption.should_stop(self.points):
            # A step boundary: save now (whatever save_strategy says) and stop.
            control.should_save = True
            control.should_training_stop = True
            self._emergency_step = state.global_step

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.preemption is not None and self._emergency_step == state.global_step:
            self.preemption.exit(self.points, step=state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.points.wait()  # with a remote: until every save point is there too
        if self.preemption is not None:
            self.preemption.uninstall()

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: Any = None, **kw: Any
    ) -> None:
        if metrics:
            self._last_eval = (state.global_step, _numeric(metrics))

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        if logs:
            # The Trainer's log_history, line by line: the report's curves.
            self.points.log(state.global_step, _numeric(logs))
        if logs and "loss" in logs:
            self._last_log = (state.global_step, _numeric(logs))

    # ------------------------------------------------------------------ helpers

    def metrics_at(self, step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self._last_log and self._last_log[0] == step and "loss" in self._last_log[1]:
            metrics["loss"] = self._last_log[1]["loss"]
        if self._last_eval and self._last_eval[0] == step:
            metrics.update(
                {k: v for k, v in self._last_eval[1].items() if not k.endswith(_NOT_METRICS)}
            )
        return metrics

    def _savepoint(self, folder: str) -> SavePoint:
        """Open a save point to resume from, verifying it once per process."""
        point = SavePoint.open(folder)
        require_plain(point.path, point.manifest, "resume a Trainer")
        if point.path not in self._verified:
            # In a multi-rank run the ranks hash a share of the files each.
            self.points.verify_point(point).raise_if_failed()
            self._verified.add(point.path)
        return point


def _numeric(values: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def check_trainer(trainer: Any) -> None:
    """Raise IncompatibleTransformersError unless ``trainer`` has every method in
    :data:`REPLACED_METHODS`, taking exactly the parameters listed there."""
    for name, expected in REPLACED_METHODS.items():
        method = getattr(trainer, name, None)
        if not callable(method):
            raise IncompatibleTransformersError(name, "does not exist", _transformers_version(),
                                                MIN_TRANSFORMERS)  # fmt: skip
        try:
            params = tuple(inspect.signature(method).parameters)
        except (TypeError, ValueError):  # a builtin or C method: no signature to compare
            params = None
        if params is not None and params != expected:
            raise IncompatibleTransformersError(
                name,
                f"takes ({', '.join(params)}), not ({', '.join(expected)})",
                _transformers_version(),
                MIN_TRANSFORMERS,
            )


def _transformers_version() -> str:
    import transformers

    return str(getattr(transformers, "__version__", "unknown"))


def _calling_trainer() -> Any:
    """The Trainer whose method is running up the stack (the callback is not given it)."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if (
                candidate is not None
                and hasattr(candidate, "callback_handler")
                # not a method attach() replaces: a Trainer lacking one must still be
                # found, so that attach() can say which one it lacks
                and hasattr(candidate, "add_callback")
            ):
                return candidate
            frame = frame.f_back
    finally:
        del frame
    return None


# ---------------------------------------------------------------------- the methods


def _save_checkpoint(cb: SavePointsCallback, model: Any, trial: Any) -> None:
    """Replaces ``Trainer._save_checkpoint``: one save point, no ``checkpoint-N``."""
    trainer = cb.trainer
    args, state = trainer.args, trainer.state
    if trainer.hp_search_backend is None and trial is None:
        trainer.store_flos()
    step = state.global_step
    best_step = getattr(state, "best_global_step", None)
    if best_step != step and _is_new_best(cb, args, state, step):
        # Before transformers 5.4, save_strategy="best" leaves best_global_step unset (so
        # the Trainer never learns where its best checkpoint is); record it as 5.4 does.
        best_step = state.best_global_step = step
    if best_step:
        best = cb.points.folder_for(best_step)
        if best_step == step or best.is_dir():
            state.best_model_checkpoint = str(best)
    # As Trainer does: stateful callbacks (early stopping...) record their state in it.
    from transformers.trainer_callback import ExportableState

    for cb_obj in [*trainer.callback_handler.callbacks, trainer.control]:
        if isinstance(cb_obj, ExportableState):
            name = cb_obj.__class__.__name__
            if isinstance(state.stateful_callbacks.get(name), list):
                state.stateful_callbacks[name].append(cb_obj.state())
            else:
                state.stateful_callbacks[name] = cb_obj.state()
    trainer_state = json.dumps(asdict(state), indent=2, sort_keys=True) + "\n"
    full = not args.save_only_model
    scaler = getattr(trainer.accelerator, "scaler", None)
    if not args.should_save and cb.points.ranks is None:
        return  # another process of a distributed run writes the save point
    cb.points.save(
        step,
        model=trainer.model,
        tokenizer=trainer.processing_class,
        optimizer=trainer.optimizer if full else None,
        scheduler=trainer.lr_scheduler if full else None,
        rng=full,
        extra={"scaler": scaler} if full and scaler is not None else None,
        metrics=cb.metrics_at(step),
        state={**cb.state, "global_step": step, "epoch": state.epoch},
        files={TRAINER_STATE_NAME: trainer_state},
        overwrite=True,
    )


def _is_new_best(cb: SavePointsCallback, args: Any, state: Any, step: int) -> bool:
    """Under ``save_strategy="best"`` (which saves only on a new best), whether the eval
    of this very step is the best one so far."""
    key = _best_metric_key(args)
    if args.save_strategy != "best" or key is None or state.best_metric is None:
        return False
    last = cb._last_eval
    return last is not None and last[0] == step and last[1].get(key) == float(state.best_metric)


# The Trainer calls its loaders one at a time (model first, optimizer and scheduler once
# they exist, RNG at the start of the epoch); each goes through the same check-then-apply
# path as SavePoints.restore, for what the save point holds.


def _restore_model(cb: SavePointsCallback, point: SavePoint, model: Any = None) -> None:
    # Through the facade, so that the next save point records this one as its parent
    # (verified once already, in _savepoint).
    target = model if model is not None else cb.trainer.model
    cb.points.restore(point, model=target, rng=False, verify=False)


def _restore_optimizer_and_scheduler(cb: SavePointsCallback, point: SavePoint) -> None:
    contents = point.manifest.contents
    restore_into(
        point,
        optimizer=cb.trainer.optimizer if "optimizer" in contents else None,
        scheduler=cb.trainer.lr_scheduler if "scheduler" in contents else None,
        names_from=cb.trainer.model,
        ranks=cb.points.ranks,
    )


def _restore_rng(cb: SavePointsCallback, point: SavePoint) -> None:
    # In a multi-rank run, each rank its own generators (as Trainer's rng_state_N.pth).
    restore_into(point, rng=True, ranks=cb.points.ranks)


def _restore_scaler(cb: SavePointsCallback, point: SavePoint) -> None:
    scaler = getattr(cb.trainer.accelerator, "scaler", None)
    contents = point.manifest.contents
    saved = contents.get("extra", {})
    per_rank = contents.get("ranks", {}).get("extra")
    if per_rank and cb.points.ranks is not None:
        saved = per_rank[cb.points.ranks.rank] if cb.points.ranks.rank < len(per_rank) else {}
    if "scaler" in saved and scaler is not None:
        restore_into(point, extra={"scaler": scaler}, ranks=cb.points.ranks)


def _save_point_or_original(name: str, restore: Callable[..., None]) -> Callable[..., Any]:
    """A Trainer loader that reads save points itself and leaves any other folder (a
    ``checkpoint-N`` of HF's own) to the Trainer's original method."""

    def load(cb: SavePointsCallback, checkpoint: str | None, *args: Any) -> Any:
        if checkpoint is None or not is_savepoint(checkpoint):
            return cb._originals[name](checkpoint, *args)
        restore(cb, cb._savepoint(checkpoint), *args)
        return None

    return load


_LOADERS: dict[str, Callable[..., Any]] = {
    name: _save_point_or_original(name, restore)
    for name, restore in (
        ("_load_from_checkpoint", _restore_model),
        ("_load_optimizer_and_scheduler", _restore_optimizer_and_scheduler),
        ("_load_rng_state", _restore_rng),
        ("_load_scaler", _restore_scaler),
    )
}
