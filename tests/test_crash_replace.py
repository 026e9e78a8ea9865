"""The CI-sized run of bench/crash_replace.py: SIGKILL while a step that already exists is
replaced (``save(step, overwrite=True)``, ``compact``, ``compact(expand=True)``), then open
the run for writing (which recovers what the crash left) and check every step.

Half of the kills land at a uniformly random moment, half right after the kernel reports
a step folder moved out of the run (the moment the old version leaves its place), so the
few milliseconds in which a step could be lost are hit on every such trial, not by luck.
``SAVEPOINTS_CRASH_REPLACE_TRIALS`` sets the trials per mode (default 25: 50 kills in
all); the full run is ``python bench/crash_replace.py``.
"""

from __future__ import annotations

import os
import sys

import pytest

from conftest import load_bench

TRIALS = int(os.environ.get("SAVEPOINTS_CRASH_REPLACE_TRIALS", "25"))

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="forks workers and watches them with inotify"
)


@pytest.fixture(scope="module")
def crash_replace():
    return load_bench("crash_replace")


@pytest.fixture(scope="module")
def zygote(crash_replace):
    """One process that imported torch once and forks every worker of the module."""
    zyg = crash_replace.Zygote()
    yield zyg
    zyg.close()


@pytest.mark.parametrize("mode", ["replace", "compact"])
def test_sigkill_while_a_step_is_replaced_leaves_its_old_or_its_new_version(
    crash_replace, zygote, tmp_path, mode
):
    if mode == "compact":
        pytest.importorskip("zstandard")
    tally = crash_replace.run_trials(
        mode, TRIALS, base=tmp_path, max_delay=0.5, chain=TRIALS, seed=11, zygote=zygote
    )
    print(tally)  # the figures, with -s or -rA
    assert tally.trials == TRIALS
    # The kills did land inside replaces, and the aimed half was aimed: else this proves
    # nothing about the moment the old version is out of its place.
    assert tally.kills_at_move == TRIALS // 2, tally
    assert tally.killed_in_replace >= TRIALS // 2, tally
    assert tally.steps_lost == 0, tally
    assert tally.steps_not_verifying == 0, tally
    assert tally.wrong_content == 0, tally
    assert not tally.errors, tally
    assert tally.old_kept + tally.new_kept >= TRIALS // 2, tally
