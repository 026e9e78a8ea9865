"""The Trainer integration refuses a transformers whose Trainer it cannot patch, at once.

SavePointsCallback replaces private Trainer methods; a release that removes or re-signs
one must fail when the callback attaches, with the method's name, not mid-training.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from savepoints import SavePoints
from savepoints.errors import IncompatibleTransformersError, SavePointsError

transformers = pytest.importorskip("transformers")
from savepoints.integrations.transformers import (  # noqa: E402
    MIN_TRANSFORMERS,
    REPLACED_METHODS,
)
from savepoints.transformers import SavePointsCallback  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def tiny_trainer(tmp_path: Path, cls: type | None = None, callbacks: list | None = None):
    from transformers import GPT2Config, GPT2ForSequenceClassification, TrainingArguments

    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(
        GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, num_labels=2, pad_token_id=0)
    )
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), report_to=[], use_cpu=True)
    return (cls or transformers.Trainer)(model=model, args=args, callbacks=callbacks)


@pytest.mark.parametrize("name", sorted(REPLACED_METHODS))
def test_attach_names_a_missing_trainer_method_and_changes_nothing(tmp_path, monkeypatch, name):
    trainer = tiny_trainer(tmp_path)
    monkeypatch.delattr(transformers.Trainer, name)
    callback = SavePointsCallback(SavePoints(tmp_path / "run"), preemption=False)
    with pytest.raises(IncompatibleTransformersError) as err:
        callback.attach(trainer)
    e = err.value
    assert isinstance(e, SavePointsError) and isinstance(e, RuntimeError)
    assert e.method == name and e.version == transformers.__version__
    assert f"Trainer.{name} does not exist in transformers {transformers.__version__}" in e.message
    assert f"transformers>={MIN_TRANSFORMERS}" in e.hint
    # Nothing was patched and the callback is still free: the Trainer is as it was.
    assert callback.trainer is None and callback not in trainer.callback_handler.callbacks
    assert not {"train", "_save_checkpoint", "_load_best_model", *REPLACED_METHODS} & set(
        vars(trainer)
    )


@pytest.mark.parametrize("name", sorted(REPLACED_METHODS))
def test_passing_the_callback_to_an_incompatible_trainer_fails_in_its_constructor(
    tmp_path, monkeypatch, name
):
    monkeypatch.delattr(transformers.Trainer, name)
    callback = SavePointsCallback(SavePoints(tmp_path / "run"), preemption=False)
    with pytest.raises(IncompatibleTransformersError, match=rf"Trainer\.{name} does not exist"):
        tiny_trainer(tmp_path, callbacks=[callback])


def test_a_re_signed_method_is_refused_with_both_signatures(tmp_path):
    class OldStyleTrainer(transformers.Trainer):
        # transformers < 4.47 called _save_checkpoint(model, trial, metrics=metrics): a
        # replacement taking (model, trial) would fail at the first save.
        def _save_checkpoint(self, model, trial, metrics=None):
            raise AssertionError("never called")

    trainer = tiny_trainer(tmp_path, cls=OldStyleTrainer)
    callback = SavePointsCallback(SavePoints(tmp_path / "run"), preemption=False)
    with pytest.raises(IncompatibleTransformersError) as err:
        callback.attach(trainer)
    assert err.value.method == "_save_checkpoint"
    assert "takes (model, trial, metrics), not (model, trial)" in err.value.message


def test_the_installed_trainer_passes_the_check(tmp_path):
    trainer = tiny_trainer(tmp_path)
    callback = SavePointsCallback(SavePoints(tmp_path / "run"), preemption=False)
    assert callback.attach(trainer) is trainer
    assert set(REPLACED_METHODS) <= set(vars(trainer))


def test_a_newer_release_is_told_to_stay_below_itself_an_older_one_to_upgrade():
    new = IncompatibleTransformersError("_load_scaler", "does not exist", "9.1.0", "4.50")
    assert "pip install 'transformers>=4.50,<9.1.0'" in new.hint
    old = IncompatibleTransformersError("_load_scaler", "does not exist", "4.48.3", "4.50")
    assert "pip install 'transformers>=4.50'." in old.hint


def test_the_minimum_is_stated_once_everywhere():
    """pyproject's floors are the versions CI pins in scripts/min-versions.txt, and the
    integration names the same transformers."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = dict(
        line.split("==")
        for line in (ROOT / "scripts" / "min-versions.txt").read_text().splitlines()
        if "==" in line and not line.lstrip().startswith("#")
    )
    extras = project["optional-dependencies"]
    floors = {}
    for spec in [*project["dependencies"], *extras["transformers"], *extras["test"]]:
        name, _, floor = spec.partition(">=")
        floors.setdefault(name, floor)
        assert floors[name] == floor, f"{name}: two floors in pyproject.toml"
    for spec in [*project["dependencies"], *extras["transformers"]]:
        name, _, floor = spec.partition(">=")
        assert name in pins, f"{name} is not pinned in scripts/min-versions.txt"
        wanted = floor.split(".")
        assert pins[name].split(".")[: len(wanted)] == wanted, (name, floor, pins[name])
    assert floors["transformers"] == MIN_TRANSFORMERS
