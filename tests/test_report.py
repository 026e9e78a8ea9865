"""The run journal, `savepoints log`, and the HTML report (checked in headless Chromium)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tests.browser import browser, console_errors, ink  # noqa: F401  (a fixture)

from savepoints import InvalidArgumentError, Keep, SavePoints
from savepoints.cli import cli
from savepoints.journal import read_journal
from savepoints.layout import RunLayout
from savepoints.preemption import Preemption
from savepoints.report import LiveReport, gather, write_comparison, write_report

ROOT = Path(__file__).resolve().parents[1]


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train(points: SavePoints, model: torch.nn.Module, opt: torch.optim.Optimizer,
           steps: range, save_every: int) -> None:  # fmt: skip
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    for step in steps:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        points.log(step, loss=loss.item(), learning_rate=1e-2)
        if step % save_every == 0:
            # An eval loss that falls, then rises: the best is in the middle.
            points.save(step, model=model, optimizer=opt,
                        metrics={"eval_loss": abs(step - 16) / 10 + 0.5})  # fmt: skip


KILLED_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    sys.path[:0] = [{root!r}, {src!r}]
    from savepoints import Keep, SavePoints
    from tests.test_report import _model, _train
    points = SavePoints({run!r}, keep=Keep(last=2, metric="eval_loss"))
    model, opt = _model()
    _train(points, model, opt, range(1, 15), 4)   # saves 4, 8, 12; logs up to 14
    points.wait()
    os.kill(os.getpid(), signal.SIGKILL)          # no close: a killed process
    """
)


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run that has lived: killed after step 14 (saved at 12), resumed, tagged,
    preempted at 24, resumed again and finished at 28; retention deleted the old ones."""
    run = tmp_path_factory.mktemp("history") / "run"
    child = KILLED_CHILD.format(root=str(ROOT), src=str(ROOT / "src"), run=str(run))
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr
    keep = Keep(last=2, metric="eval_loss")
    model, opt = _model()
    with SavePoints(run, keep=keep) as points:
        points.restore(model=model, optimizer=opt)
        _train(points, model, opt, range(13, 24), 4)  # saves 16 and 20
        points.tag(16, "release")
        with Preemption() as preemption:
            os.kill(os.getpid(), signal.SIGUSR1)
            assert preemption.should_stop(points)  # marks the emergency save point
            _train(points, model, opt, range(24, 25), 4)  # the emergency save point
            with pytest.raises(SystemExit) as stopped:
                preemption.exit(points)
        assert stopped.value.code == 75
    model, opt = _model()
    with SavePoints(run, keep=keep) as points:
        points.restore(model=model, optimizer=opt)
        _train(points, model, opt, range(25, 29), 4)  # saves 28
    return run


# ---------------------------------------------------------------------------- journal


def test_journal_records_saves_retention_tags_restores_preemptions_and_logs(history: Path):
    events = read_journal(history).events
    kinds = [e["event"] for e in events]
    assert kinds.count("open") == 3 and kinds.count("close") == 2  # the killed one never closed
    saves = [e for e in events if e["event"] == "save"]
    assert [e["step"] for e in saves] == [4, 8, 12, 16, 20, 24, 28]
    first = saves[0]
    assert first["size"] > 0 and first["new_bytes"] > 0 and first["files"] >= 3
    assert first["stall_s"] >= 0 and first["background_s"] >= 0 and first["mode"] == "async"
    assert saves[-2]["preempted"] == "SIGUSR1"
    deleted = {e["step"]: e["rule"] for e in events if e["event"] == "retention"}
    assert set(deleted) == {4, 8, 12, 20}
    assert "not among the last 2" in deleted[4] and "eval_loss" in deleted[4]
    assert [e["step"] for e in events if e["event"] == "restore"] == [12, 24]
    assert [(e["step"], e["tag"]) for e in events if e["event"] == "tag"] == [(16, "release")]
    assert [e["step"] for e in events if e["event"] == "preempted"] == [24]
    logged = [e["step"] for e in events if e["event"] == "log"]
    assert logged == [*range(1, 15), *range(13, 29)]
    storage = [e for e in events if e["event"] == "storage"]
    assert len(storage) == 7 and all(e["physical"] <= e["logical"] for e in storage)


def test_a_torn_last_line_is_skipped_and_the_next_writer_starts_a_fresh_line(tmp_path: Path):
    model, _ = _model()
    with SavePoints(tmp_path / "run") as points:
        points.save(1, model=model)
    journal = RunLayout(tmp_path / "run").journal
    with open(journal, "ab") as f:
        f.write(b'{"time": 1, "event": "sa')  # a crash in the middle of a write
    torn = read_journal(tmp_path / "run")
    assert torn.skipped == 1 and [e["event"] for e in torn] == ["open", "save", "storage", "close"]
    with SavePoints(tmp_path / "run") as points:
        points.save(2, model=model)
    after = read_journal(tmp_path / "run")
    assert after.skipped == 1  # the torn line stays alone; nothing after it is lost
    assert [e["step"] for e in after if e["event"] == "save"] == [1, 2]


def test_readers_see_whole_lines_while_a_writer_appends(tmp_path: Path):
    points = SavePoints(tmp_path / "run")
    stop = threading.Event()

    def write() -> None:
        step = 0
        while not stop.is_set():
            step += 1
            points.log(step, loss=1.0 / step, note_with_a_long_name_to_make_lines_longer=step)

    writer = threading.Thread(target=write)
    writer.start()
    seen = []
    try:
        for _ in range(200):
            journal = read_journal(tmp_path / "run")
            assert journal.skipped <= 1  # at most the line being written
            steps = [e["step"] for e in journal if e["event"] == "log"]
            assert steps == list(range(1, len(steps) + 1))
            seen.append(len(steps))
    finally:
        stop.set()
        writer.join()
        points.close()
    assert seen == sorted(seen) and seen[-1] > 0


def test_a_journal_that_cannot_be_written_never_fails_a_save(tmp_path: Path, caplog):
    RunLayout(tmp_path / "run").journal.mkdir(parents=True)  # in the way: a folder
    model, _ = _model()
    with SavePoints(tmp_path / "run") as points:
        points.save(1, model=model)
        assert points.latest().step == 1
    assert "could not write the run journal" in caplog.text


def test_log_takes_numbers_only_and_is_a_no_op_on_a_read_only_run(tmp_path: Path):
    with SavePoints(tmp_path / "run") as points:
        with pytest.raises(InvalidArgumentError, match="loss"):
            points.log(1, loss="low")
        points.log(1, loss=float("nan"), grad_norm=torch.tensor(2.0))  # a diverged loss: kept
    (logged,) = [e for e in read_journal(tmp_path / "run") if e["event"] == "log"]
    assert logged["values"] == {"loss": None, "grad_norm": 2.0}
    with SavePoints(tmp_path / "run", readonly=True) as reader:
        reader.log(2, loss=0.5)
        assert reader.journal is None
    assert len([e for e in read_journal(tmp_path / "run") if e["event"] == "log"]) == 1


def test_savepoints_log_prints_the_journal_and_its_json(history: Path):
    runner = CliRunner()
    shown = runner.invoke(cli, ["log", str(history), "--no-metrics"])
    assert shown.exit_code == 0, shown.output
    assert "retention" in shown.output and "not among the last 2" in shown.output
    assert "SIGUSR1" in shown.output and "release" in shown.output
    as_json = runner.invoke(cli, ["log", str(history), "--json", "--event", "save"])
    rows = [json.loads(line) for line in as_json.output.splitlines()]
    assert [r["step"] for r in rows] == [4, 8, 12, 16, 20, 24, 28]
    missing = runner.invoke(cli, ["log", str(history / "nope")])
    assert missing.exit_code == 2 and "nope" in missing.output


# ---------------------------------------------------------------------------- report data


def test_the_report_knows_every_save_point_resume_kill_and_redone_step(history: Path):
    data = gather(history)
    rows = {r.step: r for r in data.points}
    assert sorted(rows) == [4, 8, 12, 16, 20, 24, 28]
    assert [s for s, r in rows.items() if r.kept] == [16, 24, 28]
    assert rows[16].best and rows[16].tags == ["release"]  # eval_loss is lowest at 16
    assert rows[24].preempted == "SIGUSR1" and rows[28].latest
    assert rows[4].deleted.startswith("retention: not among the last 2")
    assert all(r.verified for r in data.kept)
    assert [s.ended for s in data.sessions] == ["killed", "preempted (SIGUSR1) at step 24",
                                                "closed"]  # fmt: skip
    assert data.resumes == [(12, "resumed from 12"), (24, "resumed from 24")]
    loss = data.curves["loss"]
    redone = [points for _, points, superseded in loss.segments if superseded]
    assert redone == [
        [(13.0, pytest.approx(redone[0][0][1])), (14.0, pytest.approx(redone[0][1][1]))]
    ]  # fmt: skip  (steps 13 and 14 of the killed process, run again)
    assert data.curves["eval_loss"].value_at(16) == pytest.approx(0.5)
    assert data.heatmap is not None and data.heatmap.columns == ["16→24", "24→28"]
    assert data.storage[-1][2] <= data.storage[-1][1]


def test_a_report_is_one_self_contained_file_with_every_save_point(history: Path, tmp_path):
    out = write_report(history, tmp_path / "r.html")
    page = out.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing to download
    assert "<link" not in page and "@import" not in page
    for step in (4, 8, 12, 16, 20, 24, 28):
        assert f'data-step="{step}"' in page
    assert "../history0/run/step-00000016/" in page or "step-00000016/" in page
    assert out.stat().st_size < 200_000


def test_ten_thousand_logged_steps_make_a_light_report(tmp_path: Path):
    run = tmp_path / "run"
    model, _ = _model()
    with SavePoints(run, keep=Keep(last=3)) as points:
        for step in range(1, 10_001):
            points.log(step, loss=1 / step**0.5 + (0.3 if step == 7_777 else 0.0))
            if step % 2_500 == 0:
                points.save(step, model=model)
    out = write_report(run, verify=False)
    page = out.read_text()
    paths = re.findall(r'<path class="series"[^>]* d="([^"]+)"', page)
    assert paths and all(len(re.findall(r"[ML]", d)) <= 1_300 for d in paths)
    data = re.search(r'<script type="application/json" class="chart-data">(.*?)</script>', page)
    values = [v for _, v in json.loads(data.group(1))["series"][0]["points"]]
    assert max(values) > 0.3  # the spike at 7,777 survives the downsampling
    assert out.stat().st_size < 250_000


def test_a_run_from_before_the_journal_gets_its_curves_from_the_save_points(tmp_path: Path):
    run = tmp_path / "run"
    model, opt = _model()
    with SavePoints(run) as points:
        _train(points, model, opt, range(1, 9), 4)
    RunLayout(run).journal.unlink()
    data = gather(run, verify=False)
    assert [p for p, _ in data.curves["eval_loss"].segments[0][1]] == [4.0, 8.0]
    assert not data.sessions and "loss" not in data.curves
    with SavePoints(run) as points:  # the run goes on with a journal
        _train(points, model, opt, range(9, 13), 4)
    upgraded = gather(run, verify=False)
    steps = [p for _, points, _ in upgraded.curves["eval_loss"].segments for p, _ in points]
    assert steps == [4.0, 8.0, 12.0]


def test_the_report_command_writes_the_page_and_says_its_size(history: Path, tmp_path: Path):
    runner = CliRunner()
    out = tmp_path / "page.html"
    done = runner.invoke(cli, ["report", str(history), "-o", str(out), "--no-layers"])
    assert done.exit_code == 0, done.output
    assert out.is_file() and "KB" in done.output and str(out) in done.output
    compared = runner.invoke(cli, ["report", str(history), "--compare", str(history),
                                   "-o", str(tmp_path / "cmp.html")])  # fmt: skip
    assert compared.exit_code == 0, compared.output
    point = runner.invoke(cli, ["report", str(history / "step-00000016")])
    assert point.exit_code == 1 and "save point folder, not a run" in point.output


def test_a_live_report_is_rewritten_after_each_commit_and_reloads_itself(tmp_path: Path):
    run = tmp_path / "run"
    model, opt = _model()
    with SavePoints(run) as points:
        live = LiveReport(run, every=5)
        points.on_commit(live)
        _train(points, model, opt, range(1, 9), 4)
        points.wait()
    live.close()
    assert live.written >= 1
    page = (run / "report.html").read_text()
    assert 'data-refresh="5"' in page and "reloads every 5 s" in page


# ---------------------------------------------------------------------------- the browser


def _open(driver, path: Path) -> None:
    driver.get(path.resolve().as_uri())
    driver.execute_script("return document.readyState")


def test_the_report_renders_in_chromium_with_every_save_point_and_no_errors(
    history: Path,
    tmp_path: Path,
    browser,  # noqa: F811
):
    out = write_report(history, tmp_path / "report.html")
    console_errors(browser)  # drop anything from before
    _open(browser, out)
    assert console_errors(browser) == []
    curves = browser.execute_script(
        "return Array.from(document.querySelectorAll('path.series'))"
        ".map(p => [p.getAttribute('d').length, p.getBBox().width])"
    )
    assert len(curves) >= 3 and all(n > 10 and width > 0 for n, width in curves)
    rows = browser.execute_script(
        "return Array.from(document.querySelectorAll('table.points tr[data-step]'))"
        ".map(r => +r.dataset.step)"
    )
    assert rows == [4, 8, 12, 16, 20, 24, 28]
    marked = browser.execute_script(
        "return Array.from(new Set(Array.from(document.querySelectorAll('.marker[data-step]'))"
        ".map(m => +m.dataset.step))).sort((a, b) => a - b)"
    )
    assert marked == [4, 8, 12, 16, 20, 24, 28]
    kinds = browser.execute_script(
        "return Array.from(document.querySelectorAll('.marker')).map(m => m.getAttribute('class'))"
    )
    for kind in ("best", "deleted", "preempted", "latest"):
        assert any(f"marker-{kind}" in k for k in kinds), kind
    assert browser.execute_script("return document.querySelectorAll('.break').length") >= 2
    assert browser.execute_script("return document.querySelectorAll('rect.cell').length") > 0
    share, colours = ink(browser.get_screenshot_as_png())
    assert share > 0.03 and colours > 20, (share, colours)
    # Hovering a marker shows its details; sorting the table by step reverses it.
    from selenium.webdriver.common.action_chains import ActionChains

    marker = browser.find_element("css selector", ".marker-best")
    ActionChains(browser).move_to_element(marker).perform()
    tip = browser.execute_script("return document.querySelector('.tip').textContent")
    assert "step 16" in tip
    browser.find_element("css selector", "table.points th").click()
    browser.find_element("css selector", "table.points th").click()
    first = browser.execute_script(
        "return document.querySelector('table.points tbody tr').dataset.step"
    )
    assert first == "28"
    assert console_errors(browser) == []


def test_the_comparison_and_the_live_page_render_in_chromium_without_errors(
    history: Path,
    tmp_path: Path,
    browser,  # noqa: F811
):
    run = tmp_path / "other"
    model, opt = _model()
    with SavePoints(run) as points:
        _train(points, model, opt, range(1, 13), 6)
    compared = write_comparison(history, run, tmp_path / "compare.html")
    console_errors(browser)
    _open(browser, compared)
    assert console_errors(browser) == []
    dashed = browser.execute_script(
        "return document.querySelectorAll('path.series[stroke-dasharray]').length"
    )
    assert dashed >= 1  # the second run
    live = write_report(run, tmp_path / "live.html", refresh=1, verify=False)
    _open(browser, live)
    browser.execute_script("window.__before = true")
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the page reloads itself: the marker is gone
        if not browser.execute_script("return window.__before === true"):
            break
        time.sleep(0.2)
    assert not browser.execute_script("return window.__before === true")
    assert console_errors(browser) == []


def test_a_save_point_between_two_logged_steps_sits_on_the_line_between_them():
    from savepoints.report.data import Curve

    curve = Curve("loss", [("a", [(10.0, 1.0), (20.0, 3.0)], False), ("a", [(25.0, 9.0)], True)])
    assert curve.value_at(15) is None and curve.value_at(20) == 3.0
    assert curve.value_at(15, between=True) == pytest.approx(2.0)
    assert curve.value_at(25) is None  # only redone after a resume: not where the run went


# ---------------------------------------------------------------------------- review fixes


def test_a_line_that_cannot_be_encoded_or_a_closed_journal_never_fails_a_save(tmp_path: Path):
    model, _ = _model()
    with SavePoints(tmp_path / "run") as points:
        # A surrogate (a bytes path decoded by Python) and a tensor of several values.
        points.save(1, model=model, metrics={"l\udce9": 1.0})
        points.wait()
        points.journal.record("note", what=torch.ones(3), name="caf\udce9")
        assert [p.step for p in points.list()] == [1]
        journal = points.journal
    journal.record("late")  # after close(): dropped, never reopened
    events = read_journal(tmp_path / "run").events
    assert [e["event"] for e in events] == ["open", "save", "storage", "note", "close"]
    assert events[1]["metrics"] == {"l\udce9": 1.0} and journal._fd is None


def test_the_storage_lines_follow_the_disk_commit_by_commit(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(SavePoints, "USAGE_RESYNC", 1_000)  # incremental all the way
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(128, 128))
    model[1].requires_grad_(False)  # frozen: stored once
    with SavePoints(tmp_path / "run", keep=Keep(last=3)) as points:
        for step in range(1, 13):
            with torch.no_grad():
                model[0].weight.add_(0.01)
            points.save(step, model=model)
        points.wait()
        used = points.usage()
        points.delete(12 - 1)
        after = points.usage()
    lines = [e for e in read_journal(tmp_path / "run") if e["event"] == "storage"]
    assert (lines[-1]["logical"], lines[-1]["physical"]) == (used.logical, used.physical)
    assert lines[-1]["physical"] < lines[-1]["logical"] and lines[-1]["points"] == 3
    assert after.physical < used.physical


def test_a_save_point_of_another_run_restored_is_no_resume(tmp_path: Path):
    model, opt = _model()
    with SavePoints(tmp_path / "base") as base:
        base.save(50, model=model)
    with SavePoints(tmp_path / "run") as points:
        points.restore(tmp_path / "base" / "step-00000050", model=model)  # a warm start
        _train(points, model, opt, range(1, 9), 4)
    data = gather(tmp_path / "run", verify=False)
    assert data.resumes == [] and not any(r for _, _, r in data.curves["loss"].segments)


def test_links_to_save_points_are_quoted_and_relative_to_the_page(tmp_path: Path):
    run = tmp_path / "my run #1%"
    model, _ = _model()
    with SavePoints(run) as points:
        points.save(1, model=model)
    page = write_report(run, tmp_path / "pages" / "r.html", verify=False).read_text()
    assert 'href="../my%20run%20%231%25/step-00000001/"' in page


def test_the_report_and_log_commands_refuse_what_is_not_a_run(tmp_path: Path):
    runner = CliRunner()
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "runs" / "a" / ".savepoints").mkdir(parents=True)
    for target, said in ((tmp_path / "file.txt", "is a file, not a run folder"),
                         (tmp_path / "runs", "Pass one of the runs in it: a.")):  # fmt: skip
        for command in ("report", "log"):
            done = runner.invoke(cli, [command, str(target)])
            assert done.exit_code == 1 and said in " ".join(done.output.split()), done.output
    assert not (tmp_path / "runs" / "report.html").exists()


def test_a_run_of_hundreds_of_save_points_folds_the_deleted_ones_away(tmp_path: Path):
    from savepoints.journal import Journal

    run = tmp_path / "run"
    model, _ = _model()
    with SavePoints(run) as points:
        points.save(1000, model=model, metrics={"eval_loss": 0.5})
    journal = Journal(run)  # what a long run with Keep(last=1) would have journaled
    for step in range(1, 1000):
        journal.record("log", step=step, values={"loss": 1 / step})
        journal.record("save", step=step, metrics={"eval_loss": 1.0}, size=10, new_bytes=10)
        journal.record("retention", step=step, rule="not among the last 1")
    journal.close()
    page = write_report(run, verify=False).read_text()
    assert page.count("<details>") == 1 and "999 save points deleted since" in page
    assert page.count('class="marker') < 20  # only what is kept is marked on the charts
    assert 'class="guide"' in page  # one save point marked: its guide line is drawn
