"""The savepoints command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from savepoints import Keep, SavePoints
from savepoints.cli import cli


def make_run(folder: Path) -> Path:
    """Steps 10, 20 (tagged "milestone", the best by eval_loss) and 30 of a tiny model."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    with SavePoints(folder, keep=Keep(metric="eval_loss", mode="min")) as points:
        for step, loss in ((10, 0.7), (20, 0.3), (30, 0.5)):
            with torch.no_grad():
                net.weight.add_(1.0)  # each save point has weights of its own
            points.save(
                step,
                model=net,
                optimizer=opt,
                metrics={"eval_loss": loss},
                state={"epoch": step // 10},
                tags=["milestone"] if step == 20 else [],
            )
    return folder


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return make_run(tmp_path / "run")


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_list_shows_a_table_with_latest_and_best_marked(run):
    code, out, _ = invoke("list", run)
    assert code == 0
    rows = {
        line.split()[0]: line
        for line in out.splitlines()
        if line.split() and line.split()[0].isdigit()
    }
    assert set(rows) == {"10", "20", "30"}
    assert "best" in rows["20"] and "milestone" in rows["20"] and "latest" in rows["30"]
    assert "eval_loss" in out


def test_list_json_is_machine_readable(run):
    code, out, _ = invoke("list", run, "--json")
    assert code == 0
    data = json.loads(out)
    assert [d["step"] for d in data] == [10, 20, 30]
    assert [d["step"] for d in data if d["best"]] == [20]
    assert [d["step"] for d in data if d["latest"]] == [30]
    assert data[1]["tags"] == ["milestone"] and data[0]["size"] > 0


def test_show_prints_files_metrics_state_and_versions(run):
    code, out, _ = invoke("show", run, "20")
    assert code == 0
    for fragment in (
        "step 20",
        "model.safetensors",
        "training_state/optimizer.json",
        "eval_loss",
        '"epoch": 2',
        "torch",
        "parent",
    ):
        assert fragment in out, fragment
    code, out, _ = invoke("show", run)
    assert "step 30" in out
    code, out, _ = invoke("show", run, "best")
    assert "step 20" in out
    code, out, _ = invoke("show", run / "step-00000010")
    assert code == 0 and "step 10" in out


def test_show_json_is_the_manifest(run):
    _code, out, _ = invoke("show", run, "10", "--json")
    data = json.loads(out)
    assert data["step"] == 10 and "model.safetensors" in data["files"]
    assert data["hash_algorithm"] == "blake3"


def test_verify_exits_zero_only_when_everything_verifies(run):
    code, out, _ = invoke("verify", run)
    assert code == 0 and "all 3 save point(s) verified" in out
    code, out, _ = invoke("verify", run / "step-00000020", "--json")
    assert code == 0 and json.loads(out)["ok"] is True
    target = run / "step-00000020" / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    code, out, _ = invoke("verify", run)
    assert code == 3
    assert "FAILED" in out and "model.safetensors" in out and "altered" in out
    code, out, _ = invoke("verify", run, "--json")
    report = json.loads(out)
    assert code == 3 and report["ok"] is False
    bad = [sp for sp in report["save_points"] if not sp["ok"]]
    assert len(bad) == 1 and bad[0]["problems"][0] == {
        "kind": "altered",
        "file": "model.safetensors",
        "detail": "content hash differs",
    }


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["list", "{tmp}/missing"], 2, "does not exist"),
        (["show", "{run}", "99"], 2, "has no save point 99"),
        (["show", "{run}", "soon"], 2, "has no save point 'soon'"),
        (["verify", "{tmp}/missing"], 2, "does not exist"),
    ],
)
def test_errors_are_one_line_with_a_hint_and_no_traceback(run, tmp_path, args, code, fragment):
    args = [a.format(tmp=tmp_path, run=run) for a in args]
    exit_code, out, err = invoke(*args)
    assert exit_code == code
    assert fragment in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("error:") and lines[-1].startswith("hint:")
    assert "Traceback" not in err + out


def test_console_script_is_installed_and_debug_shows_tracebacks(tmp_path):
    env_run = subprocess.run(
        [sys.executable, "-m", "savepoints", "list", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
    )
    assert (
        env_run.returncode == 2 and "error:" in env_run.stderr and "Traceback" not in env_run.stderr
    )
    debug = subprocess.run(
        [sys.executable, "-m", "savepoints", "list", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        env={"SAVEPOINTS_DEBUG": "1", "PATH": ""},
    )
    assert "Traceback" in debug.stderr and "RunNotFoundError" in debug.stderr


def test_readers_do_not_create_or_lock_anything(tmp_path, run):
    invoke("list", tmp_path / "not-there")
    assert not (tmp_path / "not-there").exists()
    with SavePoints(run):  # a writer holds the lock; the CLI still reads
        code, out, _ = invoke("list", run)
        assert code == 0 and "30" in out


def test_demo_runs_end_to_end_and_resumes_bit_exactly(tmp_path):
    # The shortest demo (3 epochs; README's `scripts/demo.sh` runs the default 6).
    demo = [sys.executable, "-m", "savepoints", "demo", "--run", str(tmp_path / "demo"),
            "--epochs", "3"]  # fmt: skip
    out = subprocess.run(demo, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "killed the training process with SIGKILL" in text
    assert "Resuming from the save point at step 48" in text
    assert "ends with bit-identical weights: True" in text
    assert "verify(original) ok: True; verify(tampered copy) ok: False" in text
    with SavePoints(tmp_path / "demo", readonly=True) as points:
        assert points.latest().step == 72 and points.verify().ok
        assert [p.step for p in points.list()] == [24, 48, 72]
    # Running it again replaces its own earlier run (the same call the command makes
    # first), but never a folder it did not write.
    from savepoints.cli.demo import MARKER, _prepare_run_dir

    _prepare_run_dir(tmp_path / "demo")
    assert [p.name for p in (tmp_path / "demo").rglob("*")] == [".savepoints", MARKER]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("mine")
    refused = CliRunner().invoke(cli, ["demo", "--run", str(tmp_path / "mine")])
    assert refused.exit_code == 1 and "is not an earlier demo run" in refused.output
    assert (tmp_path / "mine" / "keep.txt").read_text() == "mine"
