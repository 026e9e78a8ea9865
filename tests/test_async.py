"""Asynchronous saves: snapshot in save(), the rest in the background."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import savepoints.serialize
import savepoints.staging
from savepoints import SavePoints
from savepoints.savepoint import PendingSave


def net_and_opt():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 3))
    opt = torch.optim.AdamW(net.parameters())
    net(torch.randn(2, 64)).sum().backward()
    opt.step()
    return net, opt


def test_async_save_snapshots_at_once_and_commits_in_the_background(tmp_path, monkeypatch):
    net, opt = net_and_opt()
    expected = {k: v.clone() for k, v in net.state_dict().items()}
    # Hold the background writer until the weights have changed: without the gate the
    # worker could finish before the mutation and the test would pass whatever we copy.
    gate = threading.Event()
    real = savepoints.staging.write_safetensors

    def held(*args, **kwargs):
        assert gate.wait(30), "the test never released the writer"
        return real(*args, **kwargs)

    monkeypatch.setattr(savepoints.staging, "write_safetensors", held)
    with SavePoints(tmp_path / "a", async_save=True) as points:
        pending = points.save(1, model=net, optimizer=opt, metrics={"loss": 0.5})
        assert isinstance(pending, PendingSave) and pending.step == 1
        with torch.no_grad():  # training goes on and changes the weights at once
            for p in net.parameters():
                p.add_(1.0)
        assert not pending.done() and points.busy  # nothing was written yet
        gate.set()
        committed = points.wait()
        assert committed is not None and committed.step == 1 and committed.verify()
        assert points.latest().step == 1 and pending.metrics == {"loss": 0.5}
        restored = net_and_opt()[0]
        points.restore(model=restored)
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in expected.items())


def test_async_and_sync_saves_write_the_same_bytes(tmp_path):
    net, opt = net_and_opt()
    with SavePoints(tmp_path / "sync") as s, SavePoints(tmp_path / "async", async_save=True) as a:
        sync_point = s.save(1, model=net, optimizer=opt, rng=False)
        async_point = a.save(1, model=net, optimizer=opt, rng=False).result()
    for rel, entry in sync_point.manifest.files.items():
        assert async_point.manifest.files[rel] == entry, rel


def test_host_buffers_are_allocated_once_and_reused(tmp_path):
    net, opt = net_and_opt()
    with SavePoints(tmp_path / "run", async_save=True) as points:
        points.save(1, model=net, optimizer=opt)
        points.wait()
        buffers = dict(points._writer._snapshots.buffers._buffers)
        size = points._writer._snapshots.buffers.nbytes
        for step in (2, 3):
            points.save(step, model=net, optimizer=opt)
        points.wait()
        assert points._writer._snapshots.buffers.nbytes == size
        assert all(points._writer._snapshots.buffers._buffers[k] is b for k, b in buffers.items())
        state_bytes = sum(v.numel() * v.element_size() for v in net.state_dict().values()) * 3
        assert size <= 1.1 * state_bytes + 64 * 1024  # weights + two AdamW moments (+ rng)


def test_background_failure_is_raised_on_the_next_call_and_leaves_nothing(tmp_path, monkeypatch):
    net, _opt = net_and_opt()
    points = SavePoints(tmp_path / "run", async_save=True)
    points.save(1, model=net)
    points.wait()
    real = savepoints.serialize.write_safetensors

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(savepoints.staging, "write_safetensors", disk_full)
    points.save(2, model=net)  # returns at once; the failure happens in the background
    with pytest.raises(OSError, match="No space left"):
        points.save(3, model=net)
    monkeypatch.setattr(savepoints.staging, "write_safetensors", real)
    assert [p.step for p in points.list()] == [1]
    assert not any((tmp_path / "run" / ".savepoints" / "staging").iterdir())
    points.save(3, model=net)
    points.close()
    assert [p.step for p in SavePoints(tmp_path / "run", readonly=True).list()] == [1, 3]


def test_if_busy_skip_drops_a_save_while_one_is_in_flight(tmp_path, monkeypatch):
    net, _ = net_and_opt()
    gate = threading.Event()
    real = savepoints.staging.write_safetensors

    def slow(*args, **kwargs):
        gate.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(savepoints.staging, "write_safetensors", slow)
    with SavePoints(tmp_path / "run", async_save=True, if_busy="skip") as points:
        first = points.save(1, model=net)
        assert points.busy and points.save(2, model=net) is None
        gate.set()
        assert first.result().step == 1
        assert points.save(3, model=net) is not None
    assert [p.step for p in SavePoints(tmp_path / "run", readonly=True).list()] == [1, 3]


def test_interpreter_exit_finishes_the_save_in_flight(tmp_path):
    code = textwrap.dedent(
        f"""
        import torch
        from savepoints import SavePoints
        points = SavePoints({str(tmp_path / "run")!r}, async_save=True)
        points.save(7, model=torch.nn.Linear(512, 512))
        # no wait(), no close(): the interpreter exits with the save in flight
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    with SavePoints(tmp_path / "run", readonly=True) as points:
        assert [p.step for p in points.list()] == [7] and points.latest().verify()


def test_async_saves_apply_retention_in_the_background(tmp_path):
    from savepoints import Keep

    net, _ = net_and_opt()
    with SavePoints(tmp_path / "run", async_save=True, keep=Keep(last=2)) as points:
        for step in range(1, 6):
            points.save(step, model=net)
        points.wait()
        assert [p.step for p in points.list()] == [4, 5]
        assert points.usage().garbage == 0
