"""Reliability: corruption sweep, fallback on restore, full disks, locks of dead writers."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import uuid

import pytest
import torch

from savepoints import CorruptSavePointError, DiskFullError, ManifestError, SavePoints, verify
from savepoints.errors import SavePointGoneError
from savepoints.layout import MANIFEST_NAME


def small_run(path, n=2):
    torch.manual_seed(0)
    net = torch.nn.Linear(16, 4)
    opt = torch.optim.AdamW(net.parameters())
    points = SavePoints(path)
    for step in range(1, n + 1):
        net(torch.randn(2, 16)).sum().backward()
        opt.step()
        points.save(step, model=net, optimizer=opt, state={"step": step})
    return points, net, opt


def test_every_single_byte_change_truncation_deletion_and_extra_file_is_detected(tmp_path):
    """Sweeps every file of a save point, its manifest included: verify() reports each
    injected corruption, and restore() refuses it before changing a single weight."""
    points, net, _ = small_run(tmp_path / "run", n=1)
    sp = points.latest()
    pristine = tmp_path / "pristine"
    shutil.copytree(sp.path, pristine)
    fresh = torch.nn.Linear(16, 4)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    sizes = {rel: e.size for rel, e in sp.manifest.files.items()}
    sizes[MANIFEST_NAME] = (sp.path / MANIFEST_NAME).stat().st_size
    injected = detected = refused = 0
    for rel, size in sizes.items():
        for offset in sorted({0, 1, size // 3, size // 2, size - 2, size - 1}):
            for mutate in ("flip", "truncate", "delete", "extra"):
                shutil.rmtree(sp.path)
                shutil.copytree(pristine, sp.path)
                target = sp.path / rel
                if mutate == "flip":
                    data = bytearray(target.read_bytes())
                    data[offset] ^= 0x01
                    target.write_bytes(bytes(data))
                elif mutate == "truncate":
                    target.write_bytes(target.read_bytes()[:offset])
                elif mutate == "delete":
                    target.unlink()
                else:
                    (sp.path / f"extra-{uuid.uuid4().hex[:6]}").write_bytes(b"x")
                injected += 1
                detected += not sp.verify().ok
                try:
                    points.restore(sp.path, model=fresh, optimizer=torch.optim.AdamW(
                        fresh.parameters()), fallback=False)  # fmt: skip
                except (CorruptSavePointError, ManifestError):
                    refused += 1
                assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    print(
        f"corruption sweep: {detected}/{injected} detected by verify, {refused} refused by restore"
    )
    assert injected > 100 and detected == injected and refused == injected
    # and the pristine copy still restores
    shutil.rmtree(sp.path)
    shutil.copytree(pristine, sp.path)
    assert points.restore(sp.path, model=fresh) == {"step": 1}
    assert all(torch.equal(net.state_dict()[k], v) for k, v in fresh.state_dict().items())
    points.close()


def test_any_single_byte_change_of_the_manifest_is_detected(tmp_path):
    points, _, _ = small_run(tmp_path / "run", n=1)
    path = points.latest().path / MANIFEST_NAME
    pristine = path.read_bytes()
    assert points.latest().verify().ok
    changed = 0
    for offset in range(len(pristine)):
        # The lowest bit (a digit or letter one off) and the case bit (a letter's case,
        # a digit into a control character): every byte, two ways.
        for new in (pristine[offset] ^ 0x01, pristine[offset] ^ 0x20):
            data = bytearray(pristine)
            data[offset] = new
            path.write_bytes(bytes(data))
            assert not verify(path.parent).ok, (offset, bytes([new]))
            changed += 1
    print(f"manifest sweep: {changed}/{changed} single-byte changes detected")
    path.write_bytes(pristine)
    assert verify(path.parent).ok
    points.close()


def test_restore_of_the_latest_falls_back_to_the_newest_that_verifies(tmp_path):
    points, net, opt = small_run(tmp_path / "run", n=3)
    (points.get(3).path / "model.safetensors").chmod(0o644)
    with open(points.get(3).path / "model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\xff")
    with pytest.warns(UserWarning, match=r"step 3.*altered.*restoring step 2"):
        state = points.restore(model=net, optimizer=opt)
    assert state == {"step": 2}
    with pytest.raises(CorruptSavePointError):
        points.restore(model=net, fallback=False)
    with pytest.raises(CorruptSavePointError):
        points.restore(3, model=net)  # an explicit step never silently becomes another
    points.close()


@pytest.fixture
def tiny_fs(tmp_path):
    """A 2 MiB tmpfs, when this machine lets us mount one (root in a container)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True
        ).returncode
    ):
        pytest.skip("cannot mount a size-limited tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_a_full_disk_fails_clearly_keeps_earlier_save_points_and_training_goes_on(tiny_fs):
    small = torch.nn.Linear(64, 64)  # ~17 KB
    big = torch.nn.Linear(1024, 1024)  # ~4 MB: does not fit
    with SavePoints(tiny_fs / "run", async_save=False) as points:
        points.save(1, model=small)
        with pytest.raises(DiskFullError, match="No space left") as err:
            points.save(2, model=big)
        assert isinstance(err.value, OSError) and err.value.errno == 28
        assert "intact" in str(err.value) and "gc" in str(err.value)
        assert [p.step for p in points.list()] == [1] and points.latest().verify()
        assert not any((tiny_fs / "run" / ".savepoints" / "staging").iterdir())
        points.save(3, model=small)  # space is back: saving goes on
        assert [p.step for p in points.list()] == [1, 3]


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from savepoints import SavePoints
    points = SavePoints(sys.argv[1])
    print("locked", flush=True)
    time.sleep(60)
    """
)


def test_the_lock_of_a_killed_writer_is_recovered(tmp_path):
    script = tmp_path / "holder.py"
    script.write_text(_HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run")],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    from savepoints import RunLockedError

    with pytest.raises(RunLockedError, match=f"pid {proc.pid}"):
        SavePoints(tmp_path / "run")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with SavePoints(tmp_path / "run") as points:  # the kernel released the dead lock
        points.save(1)


def test_a_full_disk_during_an_async_save_is_raised_on_the_next_call_and_cleaned(tiny_fs):
    small = torch.nn.Linear(64, 64)
    big = torch.nn.Linear(1024, 1024)
    with SavePoints(tiny_fs / "run", async_save=True) as points:
        points.save(1, model=small).result()
        pending = points.save(2, model=big)  # the snapshot fits in memory; the disk does not
        with pytest.raises(DiskFullError, match="No space left"):
            points.wait()  # the background failure, raised once, here
        assert pending.done()
        with pytest.raises(DiskFullError):
            pending.result()  # and to whoever holds the pending save
        assert [p.step for p in points.list()] == [1] and points.latest().verify()
        assert not any((tiny_fs / "run" / ".savepoints" / "staging").iterdir())
        points.save(3, model=small).result()  # training goes on
        assert [p.step for p in points.list()] == [1, 3]


_WRITER = textwrap.dedent(
    """
    import sys, torch
    from savepoints import Keep, SavePoints
    net = torch.nn.Linear(256, 256)
    with SavePoints(sys.argv[1], keep=Keep(last=2), async_save=sys.argv[2] == "async") as points:
        print("started", flush=True)
        for step in range(1, 41):
            with torch.no_grad():
                net.weight.fill_(step)
            points.save(step, model=net, state={"step": step})
    """
)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_readers_never_see_a_partial_save_point_while_a_writer_saves_and_prunes(tmp_path, mode):
    run = tmp_path / "run"
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(run), mode],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
    seen, checked = set(), 0
    while proc.poll() is None or checked == 0:
        if not run.is_dir():
            continue
        for point in SavePoints(run, readonly=True).list():
            report = point.verify()
            # Either whole and verifying, or already gone again (pruned by retention):
            # never a folder that is listed but half written.
            assert report.ok or not (point.path / "savepoint.json").exists(), report
            if report.ok:
                net = torch.nn.Linear(256, 256)
                try:
                    state = SavePoints(run, readonly=True).restore(point, model=net, verify=False)
                except SavePointGoneError:
                    continue  # pruned between verify and restore: said so, nothing changed
                assert state == {"step": point.step}
                assert torch.equal(net.weight, torch.full_like(net.weight, point.step))
                seen.add(point.step)
                checked += 1
    assert proc.wait() == 0
    assert checked > 0 and len(seen) > 1
