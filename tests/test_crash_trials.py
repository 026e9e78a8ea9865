"""The CI-sized run of bench/crash_trials.py: SIGKILL while saving, then resume.

The full run (200 trials each of sync, async and deferred saves, plus the Trainer
comparison) is ``python bench/crash_trials.py``; its figures are in the README and
BENCHMARKS.md.
"""

from __future__ import annotations

import pytest

from conftest import load_bench


@pytest.fixture(scope="module")
def crash_trials():
    return load_bench("crash_trials")


@pytest.mark.parametrize("mode", ["sync", "async", "deferred"])
def test_sigkill_at_random_moments_of_saving_never_breaks_resume_or_loses_a_save_point(
    crash_trials, tmp_path, mode
):
    tally = crash_trials.run_trials(mode, 8, base=tmp_path, max_delay=1.0, chain=4, seed=7)
    assert tally.trials == 8
    # The kills did land inside saves (save every step): otherwise this proves nothing.
    assert tally.killed_during_save >= 4, tally
    assert tally.broken_resumes == 0, tally.errors
    assert tally.inexact_resumes == 0, tally
    assert tally.lost_save_points == 0, tally
    assert tally.corrupt_save_points == 0, tally
    assert tally.committed_seen > 0 and not tally.errors, tally
