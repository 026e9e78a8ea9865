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


@pytest.mark.parametrize(
    ("stop_at", "mode"),
    [(12, "sync"), (8, "sync"), (12, "async")],
    ids=["mid-epoch", "epoch-boundary", "mid-epoch-async-saves"],
)
def test_interrupted_trainer_resumes_bit_exactly(tokenizer_dir, tmp_path, straight, stop_at, mode):
    base, expected = straight
    # Async saves with deferred snapshots: the copy overlaps the next step.
    flags = ["--async-save", "--snapshot", "deferred"] if mode == "async" else []
    first, _ = train(
        tokenizer_dir, tmp_path / "run", tmp_path / "first.safetensors", "--stop-at", str(stop_at),
        *flags,
    )  # fmt: skip
    assert [s for s, _ in first["losses"]][-1] == stop_at
    second, log = train(tokenizer_dir, tmp_path / "run", tmp_path / "final.safetensors", *flags)
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
        "--async-save",
    )
    with SavePoints(tmp_path / "run", readonly=True) as points:
        steps = [p.step for p in points.list()]
        best = points.best()
    assert steps[-2:] == [20, 24] and len(steps) <= 3
    assert best is not None and best.step in steps and str(best.path) == result["best"]
    # load_best_model_at_end loaded the best save point's weights into the model
    assert same_file_tensors(tmp_path / "w.safetensors", best.path / "model.safetensors")


def test_save_strategy_best_saves_only_new_bests(tokenizer_dir, tmp_path):
    result, _ = train(tokenizer_dir, tmp_path / "run", tmp_path / "w.safetensors",
                      "--save-strategy", "best")  # fmt: skip
    with SavePoints(tmp_path / "run", readonly=True) as points:
        listed = points.list()
        accuracies = [p.metrics["eval_accuracy"] for p in listed]
        best = points.best()
    assert 0 < len(listed) < 6  # not every evaluation was a new best
    assert accuracies == sorted(accuracies) and len(set(accuracies)) == len(accuracies)
    assert result["best"] == str(best.path) == str(listed[-1].path)


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


def sp_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "savepoints", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_export_hf_trainer_lets_plain_trainer_resume_exactly(tokenizer_dir, tmp_path, straight):
    """People leaving savepoints: export, then plain Trainer (no callback) resumes."""
    base, expected = straight
    train(tokenizer_dir, tmp_path / "run", tmp_path / "first.safetensors", "--stop-at", "12")
    out = sp_cli(
        "export",
        tmp_path / "run",
        tmp_path / "checkpoint-12",
        "--step",
        "12",
        "--format",
        "hf-trainer",
    )
    assert out.returncode == 0, out.stderr
    names = {p.name for p in (tmp_path / "checkpoint-12").iterdir()}
    assert {
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "trainer_state.json",
        "model.safetensors",
        "config.json",
    } <= names
    assert "savepoint.json" not in names and "training_state" not in names
    result, _log = train(
        tokenizer_dir,
        tmp_path / "plain",
        tmp_path / "final.safetensors",
        "--plain",
        "--resume-from",
        str(tmp_path / "checkpoint-12"),
    )
    assert result["losses"] == expected["losses"]
    assert same_file_tensors(tmp_path / "final.safetensors", base / "final.safetensors")


def test_imported_hf_checkpoints_resume_exactly_without_unpickling(
    tokenizer_dir, tmp_path, straight
):
    base, expected = straight
    hf_out = tmp_path / "hf"
    train(tokenizer_dir, hf_out, tmp_path / "first.safetensors", "--plain", "--stop-at", "12")
    assert sorted(p.name for p in hf_out.glob("checkpoint-*")) == [
        "checkpoint-12",
        "checkpoint-4",
        "checkpoint-8",
    ]
    (hf_out / "checkpoint-12" / "training_args.bin").write_bytes(b"not a pickle: never read")
    out = sp_cli("import", hf_out, tmp_path / "run")
    assert out.returncode == 0, out.stderr
    assert "never read: training_args.bin" in " ".join(out.stdout.split())
    with SavePoints(tmp_path / "run", readonly=True) as points:
        assert [p.step for p in points.list()] == [4, 8, 12]
        sp = points.get(12)
        assert {"model", "optimizer", "scheduler", "rng"} <= set(sp.contents)
        assert {"eval_loss", "eval_accuracy", "loss"} <= set(sp.metrics)
        assert points.verify().ok
    assert not [f for f in (tmp_path / "run").rglob("*") if f.suffix in (".pt", ".pth", ".bin")]
    result, _ = train(tokenizer_dir, tmp_path / "run", tmp_path / "final.safetensors")
    assert result["losses"] == expected["losses"]
    assert same_file_tensors(tmp_path / "final.safetensors", base / "final.safetensors")


def test_export_hf_is_a_deployable_bundle(tmp_path, straight):
    import transformers
    from transformers import AutoModelForSequenceClassification, pipeline

    base, _ = straight
    out = sp_cli("export", base / "run", tmp_path / "bundle")
    assert out.returncode == 0, out.stderr
    names = {p.name for p in (tmp_path / "bundle").iterdir()}
    assert "training_state" not in names and "savepoint.json" not in names
    assert "trainer_state.json" not in names and "README.md" in names
    card = (tmp_path / "bundle" / "README.md").read_text()
    with SavePoints(base / "run", readonly=True) as points:
        best = points.best()
    assert f"step {best.step}" in card and "eval_accuracy" in card and "## Lineage" in card
    classify = pipeline("text-classification", model=str(tmp_path / "bundle"))
    assert classify("what a day")[0]["label"]
    half = sp_cli("export", base / "run", tmp_path / "half", "--dtype", "bf16", "--latest")
    assert half.returncode == 0, half.stderr
    # transformers 5 loads in the saved dtype by default; 4.x only when asked to
    major = int(transformers.__version__.split(".")[0])
    auto = {"dtype": "auto"} if major >= 5 else {"torch_dtype": "auto"}
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "half", **auto)
    assert next(model.parameters()).dtype == torch.bfloat16
    again = sp_cli("export", base / "run", tmp_path / "half")
    assert again.returncode == 1 and "not empty" in again.stderr


def test_import_of_a_plain_model_folder_converts_bin_weights(tmp_path):
    from transformers import (
        AutoModelForSequenceClassification,
        GPT2Config,
        GPT2ForSequenceClassification,
    )

    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(
        GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, num_labels=2, pad_token_id=0)
    )
    folder = tmp_path / "exported"
    model.save_pretrained(folder)
    # an old-style pickled weights file instead of model.safetensors
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    out = sp_cli("import", folder, tmp_path / "run")
    assert out.returncode == 0, out.stderr
    with SavePoints(tmp_path / "run", readonly=True) as points:
        (sp,) = points.list()
    assert sp.step == 0 and (sp.path / "model.safetensors").is_file()
    assert not (sp.path / "pytorch_model.bin").exists()
    loaded = AutoModelForSequenceClassification.from_pretrained(sp.path)
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values())
    )
    (tmp_path / "empty").mkdir()
    bad = sp_cli("import", tmp_path / "empty", tmp_path / "r2")
    assert bad.returncode == 1 and "no checkpoint-N folders" in bad.stderr
    assert not (tmp_path / "r2").exists()


@pytest.mark.parametrize(
    ("sig", "step", "mode"),
    [("SIGTERM", 7, "sync"), ("SIGUSR1", 10, "async")],
    ids=["SIGTERM-sync", "SIGUSR1-async"],
)
def test_preempted_trainer_saves_at_the_step_boundary_exits_75_and_resumes_exactly(
    tokenizer_dir, tmp_path, straight, sig, step, mode
):
    base, expected = straight
    flags = ["--async-save"] if mode == "async" else []
    run = tmp_path / "run"
    first = subprocess.run(
        [sys.executable, str(SCRIPT), "--tokenizer", str(tokenizer_dir), "--run", str(run),
         "--out", str(tmp_path / "x.safetensors"), "--signal-during", str(step),
         "--signal", sig, *flags],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert first.returncode == 75, first.stderr[-3000:]
    assert f"stopped on {sig} after an emergency save point at step {step}" in first.stderr
    with SavePoints(run, readonly=True) as points:
        # save_steps=4: the regular ones, then the emergency one (not a multiple of 4)
        assert [p.step for p in points.list()] == [s for s in (4, 8) if s < step] + [step]
        assert points.latest().step == step and points.verify().ok
    second, log = train(tokenizer_dir, run, tmp_path / "final.safetensors", *flags)
    assert f"resuming from {run / f'step-{step:08d}'}" in log
    assert second["losses"] == expected["losses"]
    assert same_file_tensors(tmp_path / "final.safetensors", base / "final.safetensors")
