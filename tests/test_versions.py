"""Versioning commands: tags, rm (and later du, gc, diff)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from savepoints import InvalidArgumentError, Keep, SavePointNotFoundError, SavePoints
from savepoints.cli import cli


def invoke(*args) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture
def run(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(8, 4)
    with SavePoints(tmp_path / "run") as points:
        for step in (10, 20, 30):
            with torch.no_grad():
                net.weight.add_(0.1)
            points.save(step, model=net, metrics={"loss": 1.0 / step})
    return tmp_path / "run"


def test_tags_resolve_protect_from_retention_and_show_in_list(run):
    with SavePoints(run) as points:
        points.tag(10, "release-1")
        assert points.get("release-1").step == 10
        assert points.get(10).tags == ("release-1",) and points.get(10).verify()
        points.keep = Keep(last=1)
        points.save(40)
        assert [p.step for p in points.list()] == [10, 40]  # the tag kept 10
    code, out, _ = invoke("list", run)
    assert code == 0 and "release-1" in out
    code, out, _ = invoke("show", run, "release-1")
    assert code == 0 and "step 10" in out


def test_a_tag_names_one_save_point_and_bad_names_are_refused(run):
    with SavePoints(run) as points:
        points.tag(20, "best-so-far")
        with pytest.raises(InvalidArgumentError, match="already on step 20"):
            points.tag(30, "best-so-far")
        with pytest.raises(InvalidArgumentError, match="already on step 20"):
            points.save(50, tags=["best-so-far"])
        for bad in ("123", "latest", "a b", "x/y", ""):
            with pytest.raises(InvalidArgumentError, match="not allowed"):
                points.tag(20, bad)
        with pytest.raises(SavePointNotFoundError):
            points.get("no-such-tag")
        assert points.get(20).tags == ("best-so-far",)


def test_untag_makes_a_save_point_deletable_again(run):
    with SavePoints(run, keep=Keep(last=1)) as points:
        points.tag(10, "keep")
        points.save(40)
        assert [p.step for p in points.list()] == [10, 40]
        points.untag("keep", "keep")
        assert [p.step for p in points.list()] == [40]
        with pytest.raises(InvalidArgumentError, match="has no tag"):
            points.untag(40, "keep")


def test_cli_tag_untag_and_rm(run):
    assert invoke("tag", run, 20, "v1")[0] == 0
    code, _, err = invoke("rm", run, "v1")
    assert code == 1 and "tagged; nothing was deleted" in err
    assert invoke("untag", run, "v1", "v1")[0] == 0
    code, out, _ = invoke("rm", run, 10, 20)
    assert code == 0 and "deleted step 10" in out and "deleted step 20" in out
    code, out, _ = invoke("list", run, "--json")
    assert [p["step"] for p in json.loads(out)] == [30]
    code, _, err = invoke("rm", run, 99)
    assert code == 2 and "has no save point 99" in err
    # a missing step among several deletes none of them
    code, _, _ = invoke("rm", run, 30, 99)
    assert code == 2 and [p.step for p in SavePoints(run, readonly=True).list()] == [30]


def test_diff_names_changed_tensors_layers_config_and_metrics(tmp_path, gpt2_cls):
    from transformers import GPT2ForSequenceClassification

    from conftest import tiny_gpt2_config

    with SavePoints(tmp_path / "run") as points:
        points.save(1, model=gpt2_cls, metrics={"eval_loss": 0.9, "acc": 0.5})
        with torch.no_grad():
            gpt2_cls.score.weight.mul_(2.0)  # only the head changes: relative L2 = 1.0
        gpt2_cls.config.summary_type = "mean"
        points.save(2, model=gpt2_cls, metrics={"eval_loss": 0.7, "acc": 0.5}, tags=["v2"])
        deeper = GPT2ForSequenceClassification(tiny_gpt2_config(n_layer=3))
        points.save(3, model=deeper)
    code, out, _ = invoke("diff", tmp_path / "run", 1, "v2", "--json")
    assert code == 0
    report = json.loads(out)
    assert [c["name"] for c in report["changed"]] == ["score.weight"]
    assert report["changed"][0]["relative_l2"] == pytest.approx(1.0)
    assert report["layers"]["score"] == pytest.approx(1.0)
    assert report["layers"]["transformer.h.0"] == 0.0
    assert report["unchanged"] == len(gpt2_cls.state_dict()) - 1
    assert report["metric_changes"] == {
        "eval_loss": {"a": 0.9, "b": 0.7, "delta": pytest.approx(-0.2)}
    }
    assert report["config_changes"]["summary_type"] == ["cls_index", "mean"]
    code, out, _ = invoke("diff", tmp_path / "run", 2, 3, "--json")
    report = json.loads(out)
    assert report["added"] and all(n.startswith("transformer.h.2.") for n in report["added"])
    assert report["config_changes"]["n_layer"] == [2, 3]
    code, out, _ = invoke("diff", tmp_path / "run", 1, 2)
    assert code == 0 and "score.weight" in out and "relative L2 change per layer" in out
    # a folder works as either side
    folder = SavePoints(tmp_path / "run", readonly=True).get(1).path
    assert invoke("diff", tmp_path / "run", str(folder), 2)[0] == 0
