"""Atomic commit, crashes, and verification."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import savepoints
from conftest import same_weights, train_steps
from savepoints import CorruptSavePointError, RunNotWritableError, SavePoints, verify


def _saved_run(tmp_path: Path, model) -> tuple[SavePoints, savepoints.SavePoint]:
    points = SavePoints(tmp_path / "run", async_save=False)  # errors raised by save() itself
    opt = torch.optim.AdamW(model.parameters())
    train_steps(model, opt, steps=1)
    sp = points.save(1, model=model, optimizer=opt, metrics={"loss": 1.0})
    return points, sp


def test_crash_before_commit_leaves_latest_on_the_previous_save_point(
    tmp_path, gpt2_cls, monkeypatch
):
    points, first = _saved_run(tmp_path, gpt2_cls)

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash before the rename")

    monkeypatch.setattr(savepoints.atomic, "_rename", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        points.save(2, model=gpt2_cls)
    assert points.latest().step == 1 and [p.step for p in points.list()] == [1]
    assert not (tmp_path / "run" / "step-00000002").exists()
    assert not any((tmp_path / "run" / ".savepoints" / "staging").iterdir())  # cleaned up
    assert first.verify()


def test_half_written_staging_of_a_killed_writer_is_invisible_and_removed_on_reopen(
    tmp_path, gpt2_cls, monkeypatch
):
    points, _ = _saved_run(tmp_path, gpt2_cls)
    # A killed process never runs its cleanup: emulate that by making cleanup a no-op.
    monkeypatch.setattr(savepoints.atomic, "remove_tree", lambda path: None)
    monkeypatch.setattr(savepoints.atomic, "_rename", lambda *a: os.kill(os.getpid(), 0) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        points.save(2, model=gpt2_cls)
    monkeypatch.undo()
    staging = list((tmp_path / "run" / ".savepoints" / "staging").iterdir())
    assert (
        len(staging) == 1 and (staging[0] / "savepoint.json").is_file()
    )  # fully written, not renamed
    assert [p.step for p in points.list()] == [1]
    assert SavePoints(tmp_path / "run", readonly=True).latest().step == 1
    points.close()
    with SavePoints(tmp_path / "run") as again:
        assert not any((tmp_path / "run" / ".savepoints" / "staging").iterdir())
        assert again.latest().step == 1


def test_folder_without_a_valid_manifest_is_invisible(tmp_path, gpt2_cls):
    points, _sp = _saved_run(tmp_path, gpt2_cls)
    points.save(2, model=gpt2_cls, metrics={"loss": 0.1})
    points.save(3, model=gpt2_cls, metrics={"loss": 0.5})
    (points.get(3).path / "savepoint.json").unlink()  # damaged after commit
    (points.get(2).path / "savepoint.json").write_text("{not json")
    (tmp_path / "run" / "step-00000009").mkdir()  # copied in by hand, never committed
    assert [p.step for p in points.list()] == [1]
    assert points.latest().step == 1
    assert points.best(metric="loss").step == 1
    # and verify reports each of them
    report = verify(tmp_path / "run")
    assert not report.ok
    bad = {c.path.name for c in report.children if not c.ok}
    assert bad == {"step-00000002", "step-00000003", "step-00000009"}


def test_verify_names_each_missing_extra_truncated_and_altered_file(tmp_path, gpt2_cls, tokenizer):
    with SavePoints(tmp_path / "run") as points:
        sp = points.save(
            1,
            model=gpt2_cls,
            tokenizer=tokenizer,
            optimizer=torch.optim.SGD(gpt2_cls.parameters(), lr=0.1),
        )
    assert sp.verify().ok and verify(sp.path).ok and verify(tmp_path / "run").ok
    (sp.path / "config.json").unlink()
    (sp.path / "notes.txt").write_text("extra")
    weights = sp.path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    tok = sp.path / "tokenizer.json"
    tok.write_bytes(tok.read_bytes()[:-10])
    report = sp.verify()
    found = {(p.kind, p.path) for p in report.problems}
    assert found == {
        ("missing", "config.json"),
        ("extra", "notes.txt"),
        ("altered", "model.safetensors"),
        ("truncated", "tokenizer.json"),
    }
    assert not report and not verify(tmp_path / "run")


def test_restore_verifies_first_and_refuses_a_corrupt_save_point(tmp_path, gpt2_cls):
    from transformers import GPT2ForSequenceClassification

    from conftest import tiny_gpt2_config

    points, sp = _saved_run(tmp_path, gpt2_cls)
    opt_file = sp.path / "training_state" / "optimizer.safetensors"
    data = bytearray(opt_file.read_bytes())
    data[-1] ^= 0xFF
    opt_file.write_bytes(bytes(data))
    fresh = GPT2ForSequenceClassification(tiny_gpt2_config())
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CorruptSavePointError, match="optimizer.safetensors: altered") as err:
        points.restore(model=fresh)
    assert isinstance(err.value, ValueError)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    points.restore(model=fresh, verify=False)  # weights themselves are intact
    assert same_weights(fresh, gpt2_cls)


def test_manifest_with_paths_leaving_the_folder_is_rejected(tmp_path, gpt2_cls):
    points, sp = _saved_run(tmp_path, gpt2_cls)
    manifest = json.loads((sp.path / "savepoint.json").read_text())
    for evil in ("../../etc/passwd", "/etc/passwd", "a/../../x"):
        m = dict(manifest, files={**manifest["files"], evil: {"size": 1, "hash": "00"}})
        (sp.path / "savepoint.json").write_text(json.dumps(m))
        assert points.list() == []
        report = verify(sp.path)
        assert not report.ok and report.problems[0].kind == "manifest"


def test_symlinked_file_in_a_save_point_is_reported_not_followed(tmp_path, gpt2_cls):
    _points, sp = _saved_run(tmp_path, gpt2_cls)
    outside = tmp_path / "outside.json"
    outside.write_text((sp.path / "config.json").read_text())
    (sp.path / "config.json").unlink()
    (sp.path / "config.json").symlink_to(outside)
    report = sp.verify()
    assert ("unsafe", "config.json") in {(p.kind, p.path) for p in report.problems}


_KILL_CHILD = textwrap.dedent(
    """
    import sys, torch
    from savepoints import SavePoints, Keep
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(8)])
    opt = torch.optim.AdamW(model.parameters())
    with SavePoints(sys.argv[1], keep=Keep(last=2)) as points:
        step = points.latest().step if points.latest() else 0
        while True:
            step += 1
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.001)
            points.save(step, model=model, optimizer=opt, state={"step": step})
            print(step, flush=True)
    """
)


def test_sigkill_during_saves_never_leaves_a_broken_latest(tmp_path):
    """A CI-sized crash test: kill a saving process at random moments, then resume."""
    script = tmp_path / "child.py"
    script.write_text(_KILL_CHILD)
    run = tmp_path / "run"
    committed_before = 0
    rng = __import__("random").Random(42)
    for trial in range(6):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(run)], stdout=subprocess.PIPE, text=True
        )
        # wait until it has committed at least one new save point, then kill at a random moment
        assert proc.stdout is not None
        proc.stdout.readline()
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with SavePoints(run, readonly=True) as points:
            listed = points.list()
            assert listed, f"trial {trial}: no save point survived"
            assert listed[-1].step >= committed_before
            committed_before = listed[-1].step
            for sp in listed:
                assert sp.verify().ok, f"trial {trial}: {sp.path} does not verify"
            model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(8)])
            opt = torch.optim.AdamW(model.parameters())
            assert points.restore(model=model, optimizer=opt)["step"] == listed[-1].step


@contextlib.contextmanager
def _unwritable(*folders: Path):
    """Make folders unwritable, also for root (who ignores permission bits): chattr +i."""
    if os.geteuid() == 0:
        if not shutil.which("chattr"):
            pytest.skip("running as root without chattr: cannot make a folder unwritable")
        done = []
        try:
            for f in folders:
                if subprocess.run(["chattr", "+i", str(f)], capture_output=True).returncode:
                    pytest.skip("this file system does not support chattr +i")
                done.append(f)
            yield
        finally:
            for f in done:
                subprocess.run(["chattr", "-i", str(f)], check=True)
    else:
        modes = {f: f.stat().st_mode for f in folders}
        try:
            for f in folders:
                os.chmod(f, 0o555)
            yield
        finally:
            for f, mode in modes.items():
                os.chmod(f, mode)


def test_unwritable_run_folder_gets_a_clear_error_and_loses_nothing(tmp_path):
    run = tmp_path / "run"
    with SavePoints(run) as points:
        sp = points.save(1, state={"a": 1})
    (tmp_path / "locked").mkdir()
    with _unwritable(
        run, run / ".savepoints", run / ".savepoints" / "staging", tmp_path / "locked"
    ):
        with SavePoints(run) as points, pytest.raises(RunNotWritableError) as err:
            points.save(2, state={"a": 2})
        assert isinstance(err.value, PermissionError)
        assert f"Cannot write save points into {run}" in str(err.value)
        assert "Nothing already saved was touched" in str(err.value)
        with pytest.raises(RunNotWritableError):
            SavePoints(tmp_path / "locked" / "new-run")
    assert [p.step for p in SavePoints(run, readonly=True).list()] == [1]
    assert sp.verify().ok
