"""SavePoints on real folders, with tiny real models."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

import savepoints
from conftest import same_weights, tiny_gpt2_config, train_steps
from savepoints import (
    InvalidArgumentError,
    Keep,
    MetricNotFoundError,
    NotARunError,
    ReadOnlyRunError,
    RunLockedError,
    RunNotFoundError,
    SavePointExistsError,
    SavePointNotFoundError,
    SavePoints,
    StateMismatchError,
    UnserializableStateError,
    UnsupportedFormatError,
)


def test_save_point_folder_loads_with_plain_from_pretrained(tmp_path, gpt2_cls, tokenizer):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    with SavePoints(tmp_path / "run") as points:
        sp = points.save(10, model=gpt2_cls, tokenizer=tokenizer)
    names = {p.name for p in sp.path.iterdir()}
    assert {"config.json", "model.safetensors", "savepoint.json", "tokenizer.json"} <= names
    loaded = AutoModelForSequenceClassification.from_pretrained(sp.path)
    assert type(loaded) is type(gpt2_cls) and same_weights(loaded, gpt2_cls)
    tok = AutoTokenizer.from_pretrained(sp.path)
    assert tok("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]
    config = json.loads((sp.path / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"]


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path, gpt2_lm):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    with SavePoints(tmp_path / "run") as points:
        sp = points.save(1, model=gpt2_lm)
        with safe_open(sp.path / "model.safetensors", "pt") as f:
            keys = set(f.keys())
        assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys
        assert (sp.path / "generation_config.json").is_file()
        hf = AutoModelForCausalLM.from_pretrained(sp.path)
        assert same_weights(hf, gpt2_lm)
        assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
        fresh = GPT2LMHeadModel(tiny_gpt2_config())
        points.restore(sp, model=fresh)
    assert same_weights(fresh, gpt2_lm)
    assert fresh.lm_head.weight.data_ptr() == fresh.transformer.wte.weight.data_ptr()


def test_plain_module_is_saved_as_safetensors_and_restored(tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    net(torch.randn(5, 4))  # moves BatchNorm running stats (buffers)
    with SavePoints(tmp_path / "run") as points:
        sp = points.save(3, model=net)
        assert set(load_file(sp.path / "model.safetensors")) == set(net.state_dict())
        assert not (sp.path / "config.json").exists()
        other = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2)
        )
        points.restore(model=other)
    assert same_weights(net, other)


def test_large_models_are_sharded_with_a_standard_index(tmp_path, gpt2_cls):
    from transformers import AutoModelForSequenceClassification

    with SavePoints(tmp_path / "run", max_shard_size=20_000) as points:
        sp = points.save(1, model=gpt2_cls)
    index = json.loads((sp.path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((sp.path / s).is_file() for s in shards)
    assert same_weights(AutoModelForSequenceClassification.from_pretrained(sp.path), gpt2_cls)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1),
        lambda p: torch.optim.Adam(p, lr=1e-3, amsgrad=True),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
        lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5),
        lambda p: torch.optim.Adagrad(p, lr=1e-2),
    ],
    ids=["AdamW", "Adam-amsgrad", "SGD-nesterov", "RMSprop", "Adagrad"],
)
def test_optimizer_state_round_trips_and_training_continues_identically(tmp_path, make_opt):
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(0)
    a = GPT2ForSequenceClassification(tiny_gpt2_config())
    opt_a = make_opt(a.parameters())
    train_steps(a, opt_a, steps=2)
    with SavePoints(tmp_path / "run") as points:
        points.save(2, model=a, optimizer=opt_a)
        b = GPT2ForSequenceClassification(
            tiny_gpt2_config(),
        )
        opt_b = make_opt(b.parameters())
        points.restore(model=b, optimizer=opt_b)
    torch.manual_seed(7)
    train_steps(a, opt_a, steps=2)
    torch.manual_seed(7)
    train_steps(b, opt_b, steps=2)
    assert same_weights(a, b)


def test_transformers_warmup_schedulers_round_trip(tmp_path, gpt2_cls):
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    for i, factory in enumerate((get_linear_schedule_with_warmup, get_cosine_schedule_with_warmup)):
        opt = torch.optim.AdamW(gpt2_cls.parameters(), lr=1e-3)
        sched = factory(opt, num_warmup_steps=3, num_training_steps=20)
        for _ in range(5):
            opt.step()
            sched.step()
        with SavePoints(tmp_path / f"run{i}") as points:
            points.save(5, optimizer=opt, scheduler=sched)
            opt2 = torch.optim.AdamW(gpt2_cls.parameters(), lr=1e-3)
            sched2 = factory(opt2, num_warmup_steps=3, num_training_steps=20)
            points.restore(optimizer=opt2, scheduler=sched2)
        assert sched2.get_last_lr() == sched.get_last_lr()
        assert sched2.state_dict() == sched.state_dict()
        sched.step()
        sched2.step()
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_rng_states_are_restored(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    with SavePoints(tmp_path / "run") as points:
        points.save(1)
        expected = (random.random(), np.random.rand(), torch.rand(3))
        random.seed(99)
        np.random.seed(99)
        torch.manual_seed(99)
        points.restore()
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_no_file_of_a_save_point_is_a_pickle(tmp_path, gpt2_cls, tokenizer):
    opt = torch.optim.AdamW(gpt2_cls.parameters())
    train_steps(gpt2_cls, opt, steps=1)
    with SavePoints(tmp_path / "run") as points:
        sp = points.save(
            1,
            model=gpt2_cls,
            tokenizer=tokenizer,
            optimizer=opt,
            scheduler=torch.optim.lr_scheduler.StepLR(opt, 3),
        )
    for f in sp.path.rglob("*"):
        if f.is_file():
            head = f.read_bytes()[:2]
            assert head not in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK"), f
            assert f.suffix in (".json", ".safetensors", ".txt", ".model", ""), f


def test_list_latest_best_get_and_metadata(tmp_path, gpt2_cls):
    keep = Keep(metric="eval_loss", mode="min")
    with SavePoints(tmp_path / "run", keep=keep) as points:
        assert points.list() == [] and points.latest() is None and points.best() is None
        for step, loss in ((30, 0.5), (10, 0.9), (20, 0.2)):
            points.save(
                step,
                model=gpt2_cls,
                metrics={"eval_loss": loss, "acc": 1 - loss},
                state={"epoch": step // 10, "nested": {"a": [1, 2]}},
                tags=["t"] if step == 10 else [],
            )
        assert [p.step for p in points.list()] == [10, 20, 30]
        assert points.latest().step == 30
        assert points.best().step == 20
        assert points.best(metric="acc", mode="max").step == 20
        assert points.best(metric="eval_loss", mode="max").step == 10
        sp = points.get(10)
        assert sp.tags == ("t",) and sp.state == {"epoch": 1, "nested": {"a": [1, 2]}}
        assert sp.metrics == {"eval_loss": 0.9, "acc": pytest.approx(0.1)}
        assert sp.created.tzinfo is not None and sp.size > 0
        assert points.get(20).parent == 10 and points.get(10).parent == 30
    # a reader that does not repeat the Keep still finds the best
    assert SavePoints(tmp_path / "run", readonly=True).best().step == 20


def test_restore_returns_user_state_and_defaults_to_latest(tmp_path, gpt2_cls):
    with SavePoints(tmp_path / "run") as points:
        points.save(1, model=gpt2_cls, state={"epoch": 0, "batch": 5})
        points.save(2, model=gpt2_cls, state={"epoch": 1, "batch": 0})
        assert points.restore(model=gpt2_cls) == {"epoch": 1, "batch": 0}
        assert points.restore(1, model=gpt2_cls) == {"epoch": 0, "batch": 5}
        assert points.restore(points.get(1).path) == {"epoch": 0, "batch": 5}


def test_retention_deletes_only_what_keep_allows(tmp_path, gpt2_cls):
    keep = Keep(last=2, best=1, metric="eval_loss", mode="min", every=40)
    losses = {10: 0.5, 20: 0.1, 30: 0.6, 40: 0.7, 50: 0.8, 60: 0.9, 70: 0.95}
    with SavePoints(tmp_path / "run", keep=keep) as points:
        for step, loss in losses.items():
            points.save(
                step,
                model=gpt2_cls,
                metrics={"eval_loss": loss},
                tags=["keep-me"] if step == 30 else [],
            )
        assert [p.step for p in points.list()] == [20, 30, 40, 60, 70]
    on_disk = sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("step-"))
    assert on_disk == [f"step-{s:08d}" for s in (20, 30, 40, 60, 70)]
    assert not any((tmp_path / "run" / ".savepoints" / "trash").iterdir())


def test_saving_an_existing_step_is_an_error_unless_overwrite(tmp_path, gpt2_cls):
    with SavePoints(tmp_path / "run") as points:
        first = points.save(5, model=gpt2_cls, metrics={"m": 1.0})
        with pytest.raises(SavePointExistsError, match="overwrite=True") as err:
            points.save(5, model=gpt2_cls, metrics={"m": 2.0})
        assert isinstance(err.value, FileExistsError)
        assert points.get(5).metrics == {"m": 1.0} and first.verify()
        points.save(5, model=gpt2_cls, metrics={"m": 2.0}, overwrite=True)
        assert points.get(5).metrics == {"m": 2.0} and points.get(5).verify()
        assert len(points.list()) == 1


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True, None])
def test_bad_step_is_refused_before_anything_is_written(tmp_path, bad):
    with SavePoints(tmp_path / "run") as points:
        with pytest.raises(InvalidArgumentError, match="step"):
            points.save(bad)
        assert points.list() == []
        assert not any((tmp_path / "run" / ".savepoints" / "staging").glob("*"))


def test_bad_metrics_tags_and_state_are_refused_naming_the_key(tmp_path):
    with SavePoints(tmp_path / "run") as points:
        with pytest.raises(InvalidArgumentError, match="'acc'"):
            points.save(1, metrics={"acc": "high"})
        with pytest.raises(InvalidArgumentError, match="finite"):
            points.save(1, metrics={"loss": float("nan")})
        with pytest.raises(InvalidArgumentError, match="tag"):
            points.save(1, tags=["a/b"])
        with pytest.raises(UnserializableStateError, match="'loader.sampler'"):
            points.save(1, state={"loader": {"sampler": object()}})
        assert points.list() == []


def test_best_with_a_metric_never_recorded_is_a_clear_error(tmp_path):
    with SavePoints(tmp_path / "run") as points:
        points.save(1, metrics={"eval_loss": 1.0})
        with pytest.raises(MetricNotFoundError, match="'accuracy'.*eval_loss"):
            points.best(metric="accuracy")
        with pytest.raises(InvalidArgumentError, match="needs a metric"):
            points.best()


def test_get_of_a_missing_step_names_the_steps_there_are(tmp_path):
    with SavePoints(tmp_path / "run") as points:
        points.save(1)
        points.save(2)
        with pytest.raises(SavePointNotFoundError, match="steps 1, 2") as err:
            points.get(3)
        assert isinstance(err.value, LookupError)
        with SavePoints(tmp_path / "empty") as empty, pytest.raises(SavePointNotFoundError):
            empty.restore()


def test_restore_into_a_different_model_names_missing_and_unexpected_keys(tmp_path, gpt2_cls):
    from transformers import GPT2ForSequenceClassification

    with SavePoints(tmp_path / "run") as points:
        points.save(1, model=gpt2_cls)
        bigger = GPT2ForSequenceClassification(tiny_gpt2_config(n_layer=3))
        before = {k: v.clone() for k, v in bigger.state_dict().items()}
        with pytest.raises(StateMismatchError) as err:
            points.restore(model=bigger)
        assert any(k.startswith("transformer.h.2.") for k in err.value.missing)
        assert "transformer.h.2" in str(err.value)
        assert all(torch.equal(before[k], v) for k, v in bigger.state_dict().items())  # untouched
        wider = GPT2ForSequenceClassification(tiny_gpt2_config(num_labels=5))
        with pytest.raises(StateMismatchError, match="score.weight") as err:
            points.restore(model=wider)
        assert err.value.mismatched
        net = torch.nn.Linear(3, 3)
        with pytest.raises(StateMismatchError) as err:
            points.restore(model=net)
        assert set(err.value.missing) == {"weight", "bias"} and err.value.unexpected


def test_restore_into_a_different_optimizer_is_refused(tmp_path, gpt2_cls):
    opt = torch.optim.AdamW(gpt2_cls.parameters())
    train_steps(gpt2_cls, opt, steps=1)
    with SavePoints(tmp_path / "run") as points:
        points.save(1, model=gpt2_cls, optimizer=opt)
        with pytest.raises(StateMismatchError, match="AdamW"):
            points.restore(optimizer=torch.optim.SGD(gpt2_cls.parameters(), lr=0.1))
        fewer = torch.optim.AdamW(list(gpt2_cls.parameters())[:3])
        with pytest.raises(StateMismatchError, match="parameters"):
            points.restore(optimizer=fewer)
        with pytest.raises(InvalidArgumentError, match="no scheduler"):
            points.restore(scheduler=torch.optim.lr_scheduler.StepLR(opt, 2))


def test_run_path_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "not-a-run"
    f.write_text("precious")
    with pytest.raises(NotARunError) as err:
        SavePoints(f)
    assert isinstance(err.value, NotADirectoryError)
    with pytest.raises(NotARunError):
        SavePoints(f / "sub")
    assert f.read_text() == "precious"


def test_readonly_run_must_exist_and_refuses_writes(tmp_path):
    with pytest.raises(RunNotFoundError):
        SavePoints(tmp_path / "nope", readonly=True)
    assert not (tmp_path / "nope").exists()
    with SavePoints(tmp_path / "run") as points:
        points.save(1)
    ro = SavePoints(tmp_path / "run", readonly=True)
    with pytest.raises(ReadOnlyRunError):
        ro.save(2)
    assert [p.step for p in ro.list()] == [1]


def test_second_writer_gets_a_lock_error_but_readers_work(tmp_path):
    with SavePoints(tmp_path / "run") as points:
        points.save(1)
        points.wait()  # committed, for the reader in another SavePoints
        with pytest.raises(RunLockedError, match=r"pid \d+") as err:
            SavePoints(tmp_path / "run")
        assert "readonly=True" in str(err.value)
        assert SavePoints(tmp_path / "run", readonly=True).latest().step == 1
    SavePoints(tmp_path / "run").close()  # released on close


def test_newer_format_version_is_refused_with_an_upgrade_hint(tmp_path):
    with SavePoints(tmp_path / "run") as points:
        sp = points.save(1)
    manifest = json.loads((sp.path / "savepoint.json").read_text())
    manifest["format_version"] = 99
    (sp.path / "savepoint.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsupportedFormatError, match="pip install -U savepoints"):
        savepoints.SavePoint.open(sp.path)
    # invisible to listing rather than misread
    assert SavePoints(tmp_path / "run", readonly=True).list() == []


def test_unknown_manifest_fields_are_kept(tmp_path):
    with SavePoints(tmp_path / "run") as points:
        sp = points.save(1)
    manifest = json.loads((sp.path / "savepoint.json").read_text())
    manifest["future_field"] = {"x": 1}
    (sp.path / "savepoint.json").write_text(json.dumps(manifest))
    assert savepoints.SavePoint.open(sp.path).manifest.to_json()["future_field"] == {"x": 1}


def test_delete_removes_one_save_point_atomically(tmp_path):
    with SavePoints(tmp_path / "run") as points:
        for step in (1, 2, 3):
            points.save(step)
        points.delete(2)
        assert [p.step for p in points.list()] == [1, 3]
        assert not (tmp_path / "run" / "step-00000002").exists()
        with pytest.raises(SavePointNotFoundError):
            points.delete(2)
    with pytest.raises(ReadOnlyRunError):
        SavePoints(tmp_path / "run", readonly=True).delete(1)


def test_a_stray_folder_at_the_step_name_is_not_overwritten_silently(tmp_path):
    stray = tmp_path / "run" / "step-00000004"
    stray.mkdir(parents=True)
    (stray / "mine.txt").write_text("keep")
    with SavePoints(tmp_path / "run") as points:
        with pytest.raises(SavePointExistsError, match="not a committed save point"):
            points.save(4)
        assert (stray / "mine.txt").read_text() == "keep"
        points.save(4, overwrite=True)
        assert points.get(4).verify()


def test_opening_a_folder_that_is_not_a_save_point_is_a_manifest_error(tmp_path):
    with pytest.raises(savepoints.ManifestError, match="does not exist"):
        savepoints.SavePoint.open(tmp_path)


def test_closed_run_refuses_to_save(tmp_path):
    points = SavePoints(tmp_path / "run")
    points.close()
    with pytest.raises(InvalidArgumentError, match="closed"):
        points.save(1)


class Counter:
    """A user object with state_dict/load_state_dict (like a grad scaler or an EMA)."""

    def __init__(self) -> None:
        self.n, self.history, self.buffer = 0, (1, 2), torch.zeros(3)

    def state_dict(self) -> dict:
        return {"n": self.n, "history": self.history, "buffer": self.buffer}

    def load_state_dict(self, sd: dict) -> None:
        self.n, self.history, self.buffer = sd["n"], sd["history"], sd["buffer"].clone()


def test_extra_stateful_objects_and_files_round_trip(tmp_path):
    c = Counter()
    c.n, c.buffer = 7, torch.arange(3.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with SavePoints(tmp_path / "run") as points:
        sp = points.save(
            1,
            extra={"counter": c, "scaler": scaler},
            files={"trainer_state.json": '{"global_step": 1}', "notes/a.txt": b"x"},
        )
        assert json.loads((sp.path / "trainer_state.json").read_text()) == {"global_step": 1}
        assert (sp.path / "notes" / "a.txt").read_bytes() == b"x" and sp.verify()
        fresh, fresh_scaler = Counter(), torch.amp.GradScaler("cpu", init_scale=2.0)
        points.restore(extra={"counter": fresh, "scaler": fresh_scaler})
        assert fresh.n == 7 and fresh.history == (1, 2) and torch.equal(fresh.buffer, c.buffer)
        assert fresh_scaler.state_dict() == scaler.state_dict()
        with pytest.raises(InvalidArgumentError, match="holds no extra\\['ema'\\]"):
            points.restore(extra={"ema": Counter()})
        for bad in ({"optimizer": c}, {"a b": c}, {"x": object()}):
            with pytest.raises(InvalidArgumentError):
                points.save(2, extra=bad)
        for bad_files in (
            {"../x": b""},
            {"/abs": b""},
            {"savepoint.json": b"{}"},
            {"model.safetensors": b""},
        ):
            with pytest.raises(InvalidArgumentError):
                points.save(2, model=torch.nn.Linear(1, 1), files=bad_files)
        assert [p.step for p in points.list()] == [1]
