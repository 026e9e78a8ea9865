"""Resume determinism: N steps straight == k steps, exit, new process, restore, the rest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "resume_plain_loop.py"


def run_example(*args: str) -> tuple[list[dict], str]:
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return [json.loads(line) for line in out.stdout.splitlines()], out.stderr


DEFERRED = ("--snapshot", "deferred", "--accumulate", "2", "--freeze-embeddings")


@pytest.mark.parametrize(
    ("stop_after", "flags"),
    [(17, ()), (24, ()), (13, DEFERRED)],
    ids=["mid-epoch", "epoch-boundary", "deferred-incremental-accumulating"],
)
def test_interrupted_and_resumed_run_is_bit_identical_to_a_straight_run(
    tmp_path, stop_after, flags
):
    straight_losses, _ = run_example(
        "--run", str(tmp_path / "a"), "--steps", "40", "--out", str(tmp_path / "a.safetensors"),
        *flags,
    )  # fmt: skip
    first, _ = run_example(
        "--run", str(tmp_path / "b"), "--steps", "40", "--stop-after", str(stop_after), *flags
    )
    assert [r["step"] for r in first] == list(range(1, stop_after + 1))
    second, log = run_example(
        "--run", str(tmp_path / "b"), "--steps", "40", "--out", str(tmp_path / "b.safetensors"),
        *flags,
    )  # fmt: skip
    assert f"resumed from save point at step {stop_after}" in log
    assert [r["step"] for r in second] == list(range(stop_after + 1, 41))
    # losses are compared as exact floats, weights bit for bit
    assert first + second == straight_losses
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        assert a[k].numpy().tobytes() == b[k].numpy().tobytes(), k


def test_resumed_training_does_not_modify_the_save_point_it_came_from(tmp_path):
    """Restored optimizer state must be a copy, never a view into the save point's files."""
    from savepoints import SavePoints

    run_example("--run", str(tmp_path / "r"), "--steps", "40", "--stop-after", "10")
    run_example("--run", str(tmp_path / "r"), "--steps", "40")
    with SavePoints(tmp_path / "r", readonly=True) as points:
        assert [p.step for p in points.list()] == [30, 40]
        assert points.verify().ok
