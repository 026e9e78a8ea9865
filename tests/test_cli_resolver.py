"""The CLI's one resolver (RUN [STEP|TAG|latest|best] and FOLDER), its one error table and
its one command list."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from savepoints import (
    CorruptSavePointError,
    DataFileError,
    InvalidArgumentError,
    MetricNotFoundError,
    MissingDependencyError,
    RunLockedError,
    RunNotFoundError,
    SavePoints,
    SavePointsError,
    TagInUseError,
    UnsupportedFormatError,
)
from savepoints.cli import cli
from savepoints.cli.main import exit_code
from savepoints.cli.resolve import pick, resolve, resolve_best_or_latest
from test_cli import invoke, make_run


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """Steps 10, 20 (tagged "milestone", the best by eval_loss) and 30."""
    return make_run(tmp_path / "run")


@pytest.mark.parametrize(
    ("ref", "step"),
    [("10", 10), ("milestone", 20), ("latest", 30), ("best", 20), (None, 30)],
)
def test_a_number_is_a_step_a_name_a_tag_and_latest_best_are_what_they_say(run, ref, step):
    assert resolve(run, ref).step == step
    assert pick(SavePoints(run, readonly=True), ref).step == step


def test_a_folder_with_a_manifest_is_one_save_point(run):
    assert resolve(run / "step-00000010").step == 10
    with pytest.raises(InvalidArgumentError, match="save point folder"):
        resolve(run / "step-00000010", "20")


@pytest.mark.parametrize(
    ("ref", "error"), [("99", "has no save point 99"), ("nope", "has no save point 'nope'")]
)
def test_unknown_refs_are_the_librarys_not_found_error(run, ref, error):
    for command in (["show", run, ref], ["verify", run, ref], ["tag", run, ref, "x"],
                    ["rm", run, ref], ["diff", run, "10", ref],
                    ["export", run, run.parent / "out", "--step", ref]):  # fmt: skip
        code, out, err = invoke(*command)
        assert code == 2 and error in err and "Traceback" not in err + out, command


def test_best_without_a_recorded_metric_is_a_clear_error_and_export_takes_the_latest(tmp_path):
    with SavePoints(tmp_path / "run") as points:
        for step in (1, 2):
            points.save(step, model=torch.nn.Linear(2, 2))
    code, _, err = invoke("show", tmp_path / "run", "best")
    assert code == 1 and "records no metric to pick its best save point by" in err
    assert "hint: Name a step, a tag or 'latest'" in err
    assert resolve_best_or_latest(tmp_path / "run", None, latest=False).step == 2


def test_predict_and_export_default_to_best_and_take_step_or_latest(run):
    assert resolve_best_or_latest(run, None, latest=False).step == 20
    assert resolve_best_or_latest(run, None, latest=True).step == 30
    assert resolve_best_or_latest(run, "milestone", latest=False).step == 20
    assert resolve_best_or_latest(run / "step-00000010", None, latest=True).step == 10
    with pytest.raises(InvalidArgumentError, match="--step and --latest"):
        resolve_best_or_latest(run, "10", latest=True)


def test_every_command_takes_the_same_refs(run, tmp_path):
    code, out, _ = invoke("show", run, "best", "--json")
    assert code == 0 and json.loads(out)["step"] == 20
    code, out, _ = invoke("verify", run, "latest", "--json")
    assert code == 0 and json.loads(out)["path"].endswith("step-00000030")
    code, out, _ = invoke("diff", run, "milestone", "latest", "--json")
    assert code == 0 and json.loads(out)["a"] == "step 20 (milestone)"
    code, out, _ = invoke("diff", run, run / "step-00000010", "best")
    assert code == 0 and "step 20" in out
    code, out, _ = invoke("tag", run, "best", "keeper")
    assert code == 0 and "step 20 tagged 'keeper'" in out
    code, out, _ = invoke("untag", run, "keeper", "milestone")
    assert code == 0 and "removed tag 'milestone' from step 20" in out
    code, out, _ = invoke("export", run, tmp_path / "out", "--step", "keeper")
    assert code == 0 and "exported step 20" in out
    code, out, _ = invoke("rm", run, "latest")
    assert code == 0 and "deleted step 30" in out
    assert [p.step for p in SavePoints(run, readonly=True).list()] == [10, 20]


def test_rm_finds_every_step_before_deleting_any_and_each_once(run):
    code, _, err = invoke("rm", run, "10", "typo")
    assert code == 2 and "has no save point 'typo'" in err
    code, out, _ = invoke("rm", run, "10", "10", "30")
    assert code == 0 and out.count("deleted step 10") == 1 and "deleted step 30" in out
    code, _, err = invoke("rm", run, "milestone")
    assert code == 1 and "are tagged; nothing was deleted" in err
    assert [p.step for p in SavePoints(run, readonly=True).list()] == [20]


def test_writing_commands_refuse_a_save_point_folder_and_leave_it_intact(run):
    folder = run / "step-00000020"
    for command in (["tag", folder, "20", "x"], ["rm", folder, "20"], ["gc", folder],
                    ["train", run / "data.csv", "--run", folder]):  # fmt: skip
        code, _, err = invoke(*command)
        assert code == 1 and "is a save point folder, not a run" in err
        assert f"hint: Pass its run folder and the step: {run} 20" in err
    assert not (folder / ".savepoints").exists()
    assert invoke("verify", folder)[0] == 0


def test_a_failed_delete_is_an_error_not_a_success(run, monkeypatch):
    def refuse(self, step):
        raise PermissionError(errno.EACCES, "Permission denied", str(run / "step-00000010"))

    monkeypatch.setattr(SavePoints, "delete", refuse)
    code, out, err = invoke("rm", run, "10")
    assert code == 1 and "deleted" not in out and "Permission denied" in err


def read_only_folders_stop_this_process(base: Path) -> bool:
    """False for root (or a process with CAP_DAC_OVERRIDE), which writes into them anyway."""
    probe = base / "read-only-probe"
    probe.mkdir()
    probe.chmod(0o555)
    try:
        (probe / "x").mkdir()
    except PermissionError:
        return True
    finally:
        probe.chmod(0o755)
    return False


def test_rm_in_a_read_only_run_exits_non_zero_and_keeps_the_save_point(run, tmp_path):
    if not read_only_folders_stop_this_process(tmp_path):
        pytest.skip("this process deletes from read-only folders (root)")
    run.chmod(0o555)
    try:
        code, out, err = invoke("rm", run, "10")
    finally:
        run.chmod(0o755)
    assert code != 0 and "deleted step 10" not in out and err.startswith("error:")
    assert 10 in [p.step for p in SavePoints(run, readonly=True).list()]


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (CorruptSavePointError(Path("p"), ["x"]), 3),
        (UnsupportedFormatError(Path("p"), 9, 1, "9.0"), 4),
        (RunLockedError(Path("p"), "pid 1"), 5),
        (RunNotFoundError(Path("p")), 2),
        (MetricNotFoundError(Path("p"), "m", []), 2),
        (TagInUseError(Path("p"), "t", 1), 1),
        (DataFileError(Path("d.csv"), "why", "hint", line=3), 1),
        (MissingDependencyError("x", "y", "z"), 1),
        (InvalidArgumentError("m", "h"), 1),
        (PermissionError("denied"), 1),
        (RuntimeError("boom"), 1),
    ],
)
def test_one_table_maps_errors_to_exit_codes(error, code):
    assert exit_code(error) == code


def test_errors_print_message_and_hint_each_once(run):
    code, _, err = invoke("show", run, "99")
    first, hint = err.strip().splitlines()
    assert code == 2 and first.startswith("error: Run ") and hint.startswith("hint: Pick one")
    assert "Pick one" not in first


def test_a_missing_transformers_is_a_missing_dependency_error(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)
    for args in (["train", tmp_path / "d.csv", "--run", tmp_path / "run"],
                 ["predict", tmp_path, "hello"], ["demo", "--run", tmp_path / "demo"]):  # fmt: skip
        code, _, err = invoke(*args)
        assert code == 1 and "needs the package 'transformers'" in err, args
        assert "hint: pip install 'savepoints[transformers]'" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "demo").exists()


def test_commands_are_registered_in_one_list():
    ctx = click.Context(cli)
    names = cli.list_commands(ctx)
    assert set(names) == {
        "list", "show", "verify", "train", "predict", "export", "import", "tag", "untag",
        "rm", "diff", "du", "gc", "compact", "expand", "demo", "push", "pull", "publish", "log",
        "report", "sign",
    }  # fmt: skip
    assert all(cli.get_command(ctx, name).name == name for name in names)
    assert cli.get_command(ctx, "nonsense") is None
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0 and all(name in result.stdout for name in names)


def test_show_describes_every_kind_of_contents_entry(run):
    """Entries of ``contents`` are objects, or plain lists of file names (a Trainer's
    extra files): show names both, and --json gives the manifest as it is."""
    from savepoints.cli.inspect import describe_component

    assert describe_component("files", ["trainer_state.json"]) == "trainer_state.json"
    assert describe_component("rng", {"generators": ["numpy", "torch"]}) == "numpy, torch"
    assert describe_component("model", {"class": "M", "kind": "torch", "tensors": 2}) == (
        "M  (torch, 2 tensors)"
    )
    assert describe_component("odd", 3) == "3"


def test_json_outputs_are_plain_json(run):
    for args in (["list", run, "--json"], ["show", run, "--json"], ["du", run, "--json"],
                 ["verify", run, "--json"], ["diff", run, "10", "20", "--json"]):  # fmt: skip
        code, out, _ = invoke(*args)
        assert code == 0
        json.loads(out)


def test_errors_other_than_ours_are_one_line_too(run, monkeypatch):
    def boom(self):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(SavePoints, "usage", boom)
    code, _, err = invoke("du", run)
    assert code == 1 and err.splitlines() == [
        "error: RuntimeError: disk on fire",
        "hint: set SAVEPOINTS_DEBUG=1 to see the full traceback.",
    ]
    assert issubclass(MissingDependencyError, (SavePointsError, ImportError))


def test_predict_on_a_save_point_without_a_classifier_is_a_clear_error(run):
    pytest.importorskip("transformers")
    code, out, err = invoke("predict", run, "hello", "--step", "10")
    assert code == 1 and "Traceback" not in out + err
    assert "Save point step 10" in err and "cannot be loaded as a text classifier" in err
    assert "hint: predict needs a save point of a Transformers" in err


def test_rich_markup_in_paths_and_hints_is_printed_as_it_is(tmp_path, monkeypatch):
    data = tmp_path / "[bold]d.csv"
    data.write_text("text,label\nx,1\ny,1\n")
    code, _, err = invoke("train", data, "--run", tmp_path / "run")
    assert code == 1 and f"Cannot read {data}: every example has the label '1'" in err
    code, _, err = invoke("show", tmp_path / "[red]missing")
    assert code == 2 and f"Run folder {tmp_path / '[red]missing'} does not exist" in err
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)
    _, _, err = invoke("predict", tmp_path, "x")
    assert "pip install 'savepoints[transformers]'" in err


def test_refs_in_a_run_without_save_points_say_so(tmp_path):
    SavePoints(tmp_path / "empty").close()
    for ref in ("latest", "best"):
        code, _, err = invoke("show", tmp_path / "empty", ref)
        assert code == 2 and "it has no committed save points yet" in err, ref
