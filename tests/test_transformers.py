"""The Trainer integration: save points instead of checkpoint-N, bit-exact resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from savepoints import Keep, SavePoints
from savepoints.transformers import keep_from_args

SCRIPT = Path(__file__).with_name("trainer_run.py")
pytestmark = pytest.mark.skipif(
    not (SCRIPT.parents[2] / "shared" / "data" / "tweeteval").is_dir(),
    reason="needs the shared tweet data beside the repository",
)


def train(tokenizer_dir: Path, run: Path, out: Path, *extra: str) -> tuple[dict, str]:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tokenizer", str(tokenizer_dir), "--run", str(run),
         "--out", str(out), *extra],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.fixture(scope="module")
def straight(tokenizer_dir, tmp_path_factory) -> tuple[Path, dict]:
    base = tmp_path_factory.mktemp("straight")
    result, _ = train(tokenizer_dir, base / "run", base / "final.safetensors")
    return base, result


def same_file_tensors(a: Path, b: Path) -> bool:
    ta, tb = load_file(a), load_file(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("stop_at", [12, 8], ids=["mid-epoch", "epoch-boundary"])
def test_interrupted_trainer_resumes_bit_exactly(tokenizer_dir, tmp_path, straight, stop_at):
    base, expected = straight
    first, _ = train(
        tokenizer_dir, tmp_path / "run", tmp_path / "first.safetensors", "--stop-at", str(stop_at)
    )
    assert [s for s, _ in first["losses"]][-1] == stop_at
    second, log = train(tokenizer_dir, tmp_path / "run", tmp_path / "final.safetensors")
    assert f"resuming from {tmp_path / 'run' / f'step-{stop_at:08d}'}" in log
    assert second["losses"] == expected["losses"]  # the whole loss curve, exactly
    assert same_file_tensors(tmp_path / "final.safetensors", base / "final.safetensors")


def test_trainer_writes_save_points_and_no_checkpoint_folders(straight):
    base, result = straight
    assert not any((base / "hf-output").glob("checkpoint-*"))
    with SavePoints(base / "run", readonly=True) as points:
        steps = [p.step for p in points.list()]
        assert steps == [4, 8, 12, 16, 20, 24]
        sp = points.get(12)
        assert set(sp.metrics) >= {"loss", "eval_loss", "eval_accuracy"}
        assert not any(k.endswith(("_runtime", "_per_second")) for k in sp.metrics)
        state = json.loads((sp.path / "trainer_state.json").read_text())
        assert state["global_step"] == 12 and state["log_history"]
        assert {"optimizer", "scheduler", "rng", "model", "tokenizer"} <= set(sp.contents)
        # the best as the Trainer sees it is a save point folder, and list() agrees
        assert result["best"] == str(points.best().path)
        assert points.verify().ok
    for f in (base / "run").rglob("*"):
        assert f.suffix not in (".pt", ".pth", ".bin", ".pkl"), f


def test_retention_follows_training_arguments(tokenizer_dir, tmp_path):
    result, _ = train(
        tokenizer_dir,
        tmp_path / "run",
        tmp_path / "w.safetensors",
        "--save-total-limit",
        "2",
        "--load-best",
    )
    with SavePoints(tmp_path / "run", readonly=True) as points:
        steps = [p.step for p in points.list()]
        best = points.best()
    assert steps[-2:] == [20, 24] and len(steps) <= 3
    assert best is not None and best.step in steps and str(best.path) == result["best"]
    # load_best_model_at_end loaded the best save point's weights into the model
    assert same_file_tensors(tmp_path / "w.safetensors", best.path / "model.safetensors")


def test_keep_from_args_maps_trainer_options():
    from transformers import TrainingArguments

    args = TrainingArguments(
        output_dir="x",
        save_total_limit=3,
        metric_for_best_model="f1",
        eval_strategy="steps",
        save_strategy="steps",
        load_best_model_at_end=True,
        report_to=[],
    )
    assert keep_from_args(args) == Keep(last=3, metric="eval_f1", mode="max")
    args = TrainingArguments(output_dir="x", report_to=[])
    assert keep_from_args(args) == Keep()
    args = TrainingArguments(output_dir="x", metric_for_best_model="eval_loss", report_to=[])
    assert keep_from_args(args) == Keep(metric="eval_loss", mode="min")
