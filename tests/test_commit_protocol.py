"""The one commit protocol (atomic.Staged) and the defects issue 10 found around it.

Crashes are injected at the protocol's renames (``atomic._rename``), with cleanup made a
no-op the way a killed process never runs its cleanup; the SIGKILL trials are in
tests/test_crash_replace.py.
"""

from __future__ import annotations

import os

import pytest
import torch

import savepoints.atomic
from conftest import same_weights, train_steps
from savepoints import (
    RunNotWritableError,
    SavePointNotFoundError,
    SavePoints,
    TagInUseError,
)
from savepoints.savepoint import PendingSave


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, not even except-clauses for Exception."""


def _kill_at_rename(monkeypatch, nth: int) -> list:
    """Make the ``nth`` rename of the protocol (1-based) kill the process, and every
    cleanup a no-op, as after a real SIGKILL."""
    calls: list = []
    real = savepoints.atomic._rename

    def rename(source, target):
        calls.append((source, target))
        if len(calls) >= nth:  # dead: nothing after the kill happens, the put-back neither
            raise Killed
        real(source, target)

    monkeypatch.setattr(savepoints.atomic, "_rename", rename)
    monkeypatch.setattr(savepoints.atomic, "remove_tree", lambda path: None)
    monkeypatch.setattr(savepoints.atomic.Staged, "abort", lambda self: None)
    return calls


def _two_versions(tmp_path, gpt2_cls):
    points = SavePoints(tmp_path / "run", async_save=False)
    points.save(5, model=gpt2_cls, metrics={"version": 1.0})
    old = {k: v.clone() for k, v in gpt2_cls.state_dict().items()}
    opt = torch.optim.AdamW(gpt2_cls.parameters())
    train_steps(gpt2_cls, opt, steps=1)
    return points, old


@pytest.mark.parametrize("nth", [1, 2])
def test_a_crash_inside_a_replacing_save_leaves_the_old_or_the_new_version_never_neither(
    tmp_path, gpt2_cls, monkeypatch, nth
):
    points, old = _two_versions(tmp_path, gpt2_cls)
    calls = _kill_at_rename(monkeypatch, nth)
    with pytest.raises(Killed):
        points.save(5, model=gpt2_cls, metrics={"version": 2.0}, overwrite=True)
    monkeypatch.undo()
    assert len(calls) >= nth
    if nth == 2:  # the window: old version in the trash, new one not yet in place
        assert not (tmp_path / "run" / "step-00000005").exists()
    points.close()
    with SavePoints(tmp_path / "run", async_save=False) as again:  # recovery runs on open
        sp = again.get(5)
        assert sp.metrics == {"version": 1.0} and sp.verify()
        model = type(gpt2_cls)(gpt2_cls.config)
        again.restore(5, model=model)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in old.items())
        assert not any((tmp_path / "run" / ".savepoints" / "trash").iterdir())


def test_a_crash_after_the_new_version_is_in_place_keeps_the_new_one(
    tmp_path, gpt2_cls, monkeypatch
):
    points, _old = _two_versions(tmp_path, gpt2_cls)
    # No crash in the renames, but the old version's deletion never happens (killed).
    monkeypatch.setattr(savepoints.atomic, "remove_tree", lambda path: None)
    points.save(5, model=gpt2_cls, metrics={"version": 2.0}, overwrite=True)
    monkeypatch.undo()
    trash = list((tmp_path / "run" / ".savepoints" / "trash").iterdir())
    assert len(trash) == 1 and trash[0].name.endswith(".replaced")
    points.close()
    with SavePoints(tmp_path / "run", async_save=False) as again:
        assert again.get(5).metrics == {"version": 2.0} and again.get(5).verify()
        assert not any((tmp_path / "run" / ".savepoints" / "trash").iterdir())


@pytest.mark.parametrize("nth", [1, 2])
def test_a_crash_inside_compact_leaves_the_save_point_whole(tmp_path, gpt2_cls, monkeypatch, nth):
    pytest.importorskip("zstandard")
    points = SavePoints(tmp_path / "run", async_save=False)
    points.save(3, model=gpt2_cls)
    _kill_at_rename(monkeypatch, nth)
    with pytest.raises(Killed):
        points.compact(3)
    monkeypatch.undo()
    points.close()
    with SavePoints(tmp_path / "run", async_save=False) as again:
        sp = again.get(3)
        assert sp.verify() and "compacted" not in sp.contents
        model = type(gpt2_cls)(gpt2_cls.config)
        again.restore(3, model=model)
        assert same_weights(model, gpt2_cls)


def test_a_deleted_save_point_is_not_brought_back_by_recovery(tmp_path, gpt2_cls, monkeypatch):
    points = SavePoints(tmp_path / "run", async_save=False)
    points.save(1, model=gpt2_cls)
    points.save(2, model=gpt2_cls)
    monkeypatch.setattr(savepoints.atomic, "remove_tree", lambda path: None)  # killed mid-delete
    points.delete(1)
    monkeypatch.undo()
    points.close()
    with SavePoints(tmp_path / "run", async_save=False) as again:
        assert [p.step for p in again.list()] == [2]


def test_tag_rewrites_replace_only_the_manifest_and_leave_no_scratch(tmp_path, gpt2_cls):
    with SavePoints(tmp_path / "run", async_save=False) as points:
        points.save(1, model=gpt2_cls)
        points.save(2, model=gpt2_cls)
        points.tag(1, "release-1")
        with pytest.raises(TagInUseError, match="release-1") as err:
            points.tag(2, "release-1")
        assert err.value.step == 1 and "untag" in err.value.hint
        assert points.get("release-1").step == 1 and points.get(1).verify()
        assert not any((tmp_path / "run" / ".savepoints" / "staging").iterdir())


def test_restore_of_a_tag_or_a_step_string_resolves_in_the_run_not_the_working_dir(
    tmp_path, gpt2_cls, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    with SavePoints(tmp_path / "run", async_save=False) as points:
        points.save(5, model=gpt2_cls, state={"at": 5})
        points.save(7, model=gpt2_cls, state={"at": 7}, tags=["release-1"])
        model = type(gpt2_cls)(gpt2_cls.config)
        assert points.restore("release-1", model=model) == {"at": 7}
        assert points.restore("5", model=model) == {"at": 5}
        assert points.restore("latest", model=model) == {"at": 7}
        with pytest.raises(SavePointNotFoundError, match="nope"):
            points.restore("nope", model=model)
        # A folder path still works, as a Path or as a string naming a save point folder.
        assert points.restore(str(tmp_path / "run" / "step-00000005"), model=model) == {"at": 5}


@pytest.mark.skipif(os.geteuid() == 0, reason="root deletes from read-only folders")
def test_delete_that_fails_raises_and_keeps_the_save_point(tmp_path, gpt2_cls):
    points = SavePoints(tmp_path / "run", async_save=False)
    points.save(1, model=gpt2_cls)
    (tmp_path / "run").chmod(0o555)
    try:
        with pytest.raises(RunNotWritableError):
            points.delete(1)
    finally:
        (tmp_path / "run").chmod(0o755)
    assert [p.step for p in points.list()] == [1] and points.get(1).verify()
    points.close()


def test_delete_that_fails_raises_even_as_root(tmp_path, gpt2_cls, monkeypatch):
    points = SavePoints(tmp_path / "run", async_save=False)
    points.save(1, model=gpt2_cls)

    def refuse(source, target):
        raise PermissionError(13, "Permission denied", str(source))

    monkeypatch.setattr(savepoints.atomic, "_rename", refuse)
    with pytest.raises(RunNotWritableError, match="Permission denied|permission denied"):
        points.delete(1)
    monkeypatch.undo()
    assert [p.step for p in points.list()] == [1] and points.get(1).verify()
    points.close()


def test_pending_save_compares_and_hashes_without_waiting_for_the_commit(tmp_path, gpt2_cls):
    from concurrent.futures import Future

    never: Future = Future()  # a save that never commits: waiting would hang the test
    a = PendingSave(3, tmp_path / "step-00000003", never)
    b = PendingSave(3, tmp_path / "step-00000003", Future())
    assert a == a and a != b and len({a, b, a}) == 2
    assert not a.done()
