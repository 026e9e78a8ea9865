"""Preemption: SIGTERM / SIGUSR1 -> emergency save point at the next step -> exit 75."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from savepoints import InvalidArgumentError, SavePoints
from savepoints.preemption import EXIT_DEADLINE, EXIT_PREEMPTED, Preemption

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "resume_plain_loop.py"


def test_a_signal_is_recorded_not_acted_on_and_exit_uses_the_documented_code():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        with pytest.raises(SystemExit) as exit_info, Preemption(deadline=30) as preemption:
            assert not preemption.requested
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.01)
            assert preemption.requested and preemption.received == signal.SIGUSR1
            assert 0 < preemption.remaining <= 30
            os.kill(os.getpid(), signal.SIGUSR1)  # a second signal changes nothing
            preemption.exit()
        assert exit_info.value.code == EXIT_PREEMPTED == 75
        assert seen == []  # the exit handled the request: nothing delivered again
        # the handler that was there before is back
        assert signal.getsignal(signal.SIGUSR1) is not preemption._handle
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_request_never_acted_on_is_delivered_to_the_previous_handler():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    try:
        with Preemption() as preemption:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            assert preemption.requested and seen == []
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_bad_preemption_settings_are_refused():
    with pytest.raises(InvalidArgumentError, match="Unknown signal"):
        Preemption(["SIGNOPE"])
    with pytest.raises(InvalidArgumentError, match="deadline"):
        Preemption(deadline=0)
    assert Preemption(["usr1", signal.SIGTERM]).signals == (signal.SIGUSR1, signal.SIGTERM)


def test_the_deadline_ends_a_loop_that_never_reaches_a_step_boundary(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, signal, time
        from savepoints import SavePoints
        from savepoints.preemption import Preemption
        with SavePoints({str(tmp_path / "run")!r}) as points, Preemption(deadline=0.5):
            points.save(1, state={{"x": 1}})
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)   # a step that never ends
        """
    )
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == EXIT_DEADLINE == 76, proc.stderr
    assert time.monotonic() - started < 30
    assert "deadline" in proc.stderr and "Committed save points are intact" in proc.stderr
    with SavePoints(tmp_path / "run") as points:  # the lock is free again, step 1 intact
        assert [p.step for p in points.list()] == [1] and points.verify().ok


def run_example(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_plain_loop_saves_on_preemption_exits_75_and_resumes_exactly(tmp_path, sig):
    steps = "400"
    straight = run_example("--run", str(tmp_path / "a"), "--steps", steps, "--save-every", "1000",
                           "--out", str(tmp_path / "a.safetensors"))  # fmt: skip
    assert straight.returncode == 0, straight.stderr

    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--run", str(tmp_path / "b"), "--steps", steps,
         "--save-every", "1000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    first = []
    for line in proc.stdout:
        first.append(json.loads(line))
        if first[-1]["step"] == 5:
            proc.send_signal(sig)  # from outside, at whatever moment of step 6 this lands
    assert proc.wait() == EXIT_PREEMPTED, proc.stderr.read()
    err = proc.stderr.read()
    stopped = first[-1]["step"]
    assert 5 <= stopped < int(steps)
    assert f"stopped on {sig.name} after an emergency save point at step {stopped}" in err
    with SavePoints(tmp_path / "b", readonly=True) as points:
        assert [p.step for p in points.list()] == [stopped]  # save-every 1000: only this one

    second = run_example("--run", str(tmp_path / "b"), "--steps", steps, "--save-every", "1000",
                         "--out", str(tmp_path / "b.safetensors"))  # fmt: skip
    assert second.returncode == 0, second.stderr
    assert f"resumed from save point at step {stopped}" in second.stderr
    losses = first + [json.loads(line) for line in second.stdout.splitlines()]
    assert losses == [json.loads(line) for line in straight.stdout.splitlines()]
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
