"""Several ranks, one run: real ``torch.distributed`` processes (gloo on 127.0.0.1),
started here as torchrun would start them (tests/ranks_worker.py is one rank)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from savepoints import SavePoints, verify
from savepoints.journal import read_journal
from savepoints.layout import RunLayout

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch built without distributed"
)

WORKER = Path(__file__).with_name("ranks_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(
    scenario: str, run: Path, world: int = 2, timeout: float = 180, **env: str
) -> list[dict[str, Any]]:
    """Run ``scenario`` on ``world`` ranks; each rank's result, in rank order."""
    return finish(*start(scenario, run, world, **env), timeout=timeout)


def start(
    scenario: str, run: Path, world: int = 2, **env: str
) -> tuple[list[subprocess.Popen[str]], Path]:
    """Start ``scenario`` on ``world`` ranks, as torchrun would (env:// rendezvous)."""
    out = run.parent / f"{run.name}-{scenario}-{time.monotonic_ns()}"
    port = str(free_port())
    procs = []
    for rank in range(world):
        penv = {
            **os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank),
            "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "GLOO_SOCKET_IFNAME": "lo",
            "OMP_NUM_THREADS": "1", **env,
        }  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), scenario, str(run), str(out)],
                env=penv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs, out


def finish(
    procs: list[subprocess.Popen[str]], out: Path, timeout: float = 180
) -> list[dict[str, Any]]:
    """Wait for every rank; each rank's result (what it wrote, exit code, output)."""
    results = []
    for rank, proc in enumerate(procs):
        try:
            text, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        path = Path(f"{out}.rank-{rank}.json")
        result = json.loads(path.read_text()) if path.exists() else {}
        result["rc"], result["output"] = proc.returncode, text
        results.append(result)
    return results


def ok(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for r in results:
        assert r["rc"] == 0 and "error" not in r, r.get("output", "")[-3000:]
    return results


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """A run that 2 FSDP2 ranks trained for 5 steps, with a save point at step 3."""
    run = tmp_path_factory.mktemp("ranks") / "run"
    return run, ok(launch("train_and_save", run))


def test_fsdp2_save_point_is_one_committed_folder(saved: Any) -> None:
    run, _ = saved
    points = SavePoints(run, readonly=True)
    (point,) = points.list()
    ranks = point.manifest.contents["ranks"]
    assert ranks["world_size"] == 2
    assert len(ranks["rng"]) == 2 and ranks["rng"][0] != ranks["rng"][1]
    # Both ranks wrote files, each file by one rank; the manifest lists them all.
    written = [set(r["files"]) for r in ranks["written"]]
    assert written[0] and written[1] and not written[0] & written[1]
    assert written[0] | written[1] == set(point.manifest.files)
    assert any("optimizer-" in f for f in written[1])
    assert verify(point.path).ok
    # No DCP metadata, no pickle anywhere.
    names = list(point.manifest.files)
    assert not any(n.endswith((".metadata", ".pt", ".pth", ".bin", ".distcp")) for n in names)
    assert point.manifest.contents["optimizer"]["keys"] == "names"
    assert not list(RunLayout(run).staging.glob("*")) if RunLayout(run).staging.exists() else True
    # Rank 0 alone keeps the journal: one process opened the run, one save point was saved.
    journal = read_journal(run).events
    assert [e["event"] for e in journal].count("open") == 1
    (save,) = [e for e in journal if e["event"] == "save"]
    assert save["step"] == 3 and save["mode"] == "2 ranks" and save["size"] == point.size


def test_fsdp2_resume_at_two_ranks_is_bit_exact_with_per_rank_rng(saved: Any) -> None:
    run, before = saved
    after = ok(launch("resume", run, FORBID_PICKLE="1"))
    for b, a in zip(before, after):
        assert a["restored"] == b["at_save"]  # model, optimizer, param groups: bit-exact
        assert a["scheduler"]["last_epoch"] == 3
        assert a["losses"] == b["losses"]  # the next steps equal the uninterrupted run's
        assert a["final"] == b["final"]


def test_fsdp2_restores_at_one_rank(saved: Any) -> None:
    run, before = saved
    (one,) = ok(launch("resume", run, world=1, FORBID_PICKLE="1"))
    assert one["restored"] == before[0]["at_save"]
    assert one["scheduler"]["last_epoch"] == 3


def test_a_read_only_restore_on_one_rank_involves_no_other(saved: Any) -> None:
    run, before = saved
    r0, _ = ok(launch("rank0_reads", run))
    same = [k for k in r0["model"] if k in before[0]["at_save"]]
    assert same and all(r0["model"][k] == before[0]["at_save"][k] for k in same)


def test_restores_in_a_plain_process_and_loads_with_from_pretrained(saved: Any) -> None:
    from transformers import GPT2LMHeadModel

    sys.path.insert(0, str(WORKER.parent))
    from ranks_worker import build, full_state

    run, before = saved
    model, optimizer, scheduler = build("plain")
    points = SavePoints(run, readonly=True)
    state = points.restore(model=model, optimizer=optimizer, scheduler=scheduler, rng=False)
    assert state == {"step": 3}
    assert full_state(model, optimizer) == before[0]["at_save"]
    point = points.latest()
    assert point is not None
    loaded = GPT2LMHeadModel.from_pretrained(point.path)
    assert loaded.config.architectures == ["GPT2LMHeadModel"]
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    # Tied weights are stored once, under the name Transformers keeps.
    assert point.manifest.contents["model"]["tied"] == {"lm_head.weight": "transformer.wte.weight"}


def test_ddp_resume_from_the_remote_on_an_empty_folder_is_bit_exact(tmp_path: Path) -> None:
    run, remote = tmp_path / "run", (tmp_path / "remote").as_uri()
    before = ok(launch("train_and_save", run, MODEL_KIND="ddp", REMOTE=remote))
    (point,) = SavePoints(run, readonly=True).list()
    files = point.manifest.contents["ranks"]["written"]
    weights = [f for r in files for f in r["files"] if f.startswith("model")]
    assert weights == ["model.safetensors"]  # DDP's replicated weights: written once
    # Rank 0 pushed it; another machine's ranks resume from the remote, exactly.
    elsewhere = tmp_path / "elsewhere"
    after = ok(launch("resume", elsewhere, MODEL_KIND="ddp", FORBID_PICKLE="1", REMOTE=remote))
    assert [p.step for p in SavePoints(elsewhere, readonly=True).list()] == [point.step]
    for b, a in zip(before, after):
        assert a["restored"] == b["at_save"]
        assert a["losses"] == b["losses"]
        assert a["final"] == b["final"]


@pytest.mark.parametrize("how", ["enospc", "kill"])
def test_a_rank_failing_mid_write_leaves_nothing_visible(tmp_path: Path, how: str) -> None:
    run = tmp_path / "run"
    results = launch("fail_mid_write", run, HOW=how)
    if how == "enospc":
        r0, r1 = ok(results)
        assert r1["save_error"] == "DiskFullError"
        assert r0["save_error"] == "RankFailedError" and "rank 1" in r0["save_message"]
        assert r0["listed"] == r1["listed"] == []
        assert r0["after"] == r1["after"] == [2]  # training went on and saved again
    else:
        r0, r1 = results
        assert r1["rc"] == -9
        assert r0["save_error"] in ("RanksError", "RanksTimeoutError"), r0["output"][-2000:]
        assert r0["listed"] == []
    points = SavePoints(run)  # a writer's open cleans what the failed save left
    assert [p.step for p in points.list()] == ([2] if how == "enospc" else [])
    assert not any(RunLayout(run).staging.iterdir())
    assert verify(run).ok


def test_a_save_called_on_one_rank_only_fails_within_the_timeout(tmp_path: Path) -> None:
    r0, _ = launch("one_rank_saves", tmp_path / "run", RANKS_TEST_TIMEOUT="4")
    assert r0["save_error"] == "RanksTimeoutError", r0["output"][-2000:]
    assert "every rank must call save()" in r0["save_message"].lower()
    assert "waited 4 s" in r0["save_message"]  # the configured timeout, not a hang
    assert r0["listed"] == []


def test_ranks_disagreeing_on_the_step_get_a_clear_error(tmp_path: Path) -> None:
    for r in ok(launch("disagree", tmp_path / "run")):
        assert r["save_error"] == "RanksDisagreeError"
        assert "rank 0: 10, rank 1: 11" in r["save_message"]
        assert r["listed"] == []


def test_verify_catches_a_flipped_bit_in_rank_1s_files(saved: Any, tmp_path: Path) -> None:
    import shutil

    source, _ = saved
    run = tmp_path / "run"
    shutil.copytree(source, run, copy_function=shutil.copy2)
    (point,) = SavePoints(run, readonly=True).list()
    rel = sorted(point.manifest.contents["ranks"]["written"][1]["files"])[0]
    target = point.path / rel
    raw = bytearray(target.read_bytes())
    raw[-1] ^= 0x01
    target.write_bytes(bytes(raw))
    report = verify(run)
    assert not report.ok
    assert [p.kind for p in report.all_problems()] == ["altered"]
    assert rel in str(report.all_problems()[0])
    for r in ok(launch("restore_flipped", run)):
        assert r["restore_error"] == "CorruptSavePointError"
        assert rel in r["restore_message"]


def launcher(
    kind: str, scenario: str, run: Path, timeout: float = 300, **extra: str
) -> list[dict[str, Any]]:
    """Run ``scenario`` on 2 ranks through a real launcher: ``torchrun`` or
    ``accelerate launch`` (DDP with gloo on a machine without GPUs)."""
    out = run.parent / f"{run.name}-{kind}-{time.monotonic_ns()}"
    port = str(free_port())
    if kind == "torchrun":
        head = ["-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", port]  # fmt: skip
    else:
        head = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--main_process_ip", "127.0.0.1",
                "--main_process_port", port, "--mixed_precision", "no",
                "--dynamo_backend", "no"]  # fmt: skip
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", **extra}
    done = subprocess.run(
        [sys.executable, *head, str(WORKER), scenario, str(run), str(out)],
        env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return [json.loads(Path(f"{out}.rank-{r}.json").read_text()) for r in range(2)]


def test_trainer_ddp_resume_is_bit_exact_with_per_rank_seeds(tmp_path: Path) -> None:
    whole = ok(launch("trainer", tmp_path / "whole"))
    assert whole[0]["steps"] == whole[1]["steps"] == [2, 4, 6]
    run = tmp_path / "run"
    # Stopped under `accelerate launch`, resumed under `torchrun`: the same save points.
    stopped = launcher("accelerate", "trainer", run, STOP_AT="3")
    assert stopped[0]["steps"] == [2, 3]
    (point,) = [p for p in SavePoints(run, readonly=True).list() if p.step == 3]
    assert len(point.manifest.contents["ranks"]["rng"]) == 2
    resumed = launcher("torchrun", "trainer", run, RESUME="1", FORBID_PICKLE="1")
    for w, r in zip(whole, resumed):
        assert r["steps"] == [2, 3, 4, 6]
        assert r["final"] == w["final"]  # every weight bit-identical on every rank
        assert r["losses"] == w["losses"]  # the history up to step 3 comes from the save point
        assert r["rng"] == w["rng"]  # and each rank's generators where they would be
    assert whole[0]["rng"] != whole[1]["rng"]


def wait_for(paths: list[Path], procs: list[Any], limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, "the ranks did not start training"
        assert all(p.poll() is None for p in procs), [p.communicate()[0][-3000:] for p in procs]
        time.sleep(0.2)


def check_preempted(run: Path, results: list[dict[str, Any]], signal_name: str) -> int:
    stops = {r["stopped_at"] for r in results}
    assert len(stops) == 1, results  # one emergency save point, the same step on all ranks
    (step,) = stops
    points = SavePoints(run, readonly=True)
    (point,) = points.list()
    assert point.step == step and point.preempted == signal_name
    mark = json.loads(RunLayout(run).preempted.read_text())
    assert mark["step"] == step and mark["exit_code"] == 75 and mark["signal"] == signal_name
    from click.testing import CliRunner

    from savepoints.cli.main import cli

    shown = CliRunner().invoke(cli, ["list", str(run)], terminal_width=200)
    assert f"preempted ({signal_name})" in shown.output, shown.output
    return int(step)


def test_sigterm_to_one_rank_gives_one_emergency_save_point_on_all_ranks(tmp_path: Path) -> None:
    import signal

    run = tmp_path / "run"
    procs, out = start("preempt", run)
    wait_for([Path(f"{out}.started-{r}") for r in range(2)], procs)
    procs[1].send_signal(signal.SIGTERM)  # one rank only: the ranks agree at the next step
    results = finish(procs, out)
    for r in results:
        assert r["rc"] == 75 and r["exit"] == 75, r["output"][-3000:]
        assert "finished" not in r
    assert [r["signal"] for r in results] == [None, "SIGTERM"]
    step = check_preempted(run, results, "SIGTERM")
    # Opening the run to resume consumes the mark.
    with SavePoints(run) as points:
        assert points.latest().step == step  # type: ignore[union-attr]
    assert not RunLayout(run).preempted.exists()


def test_sigterm_to_torchrun_saves_on_every_rank_within_the_grace(tmp_path: Path) -> None:
    import signal

    run = tmp_path / "run"
    out = tmp_path / "torchrun-out"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "RANKS_OUT": ""}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
         str(WORKER), "preempt", str(run), str(out)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    wait_for([Path(f"{out}.started-{r}") for r in range(2)], [launcher])
    # torchrun forwards it to every worker, and SIGKILLs them 30 s later: a save that
    # missed that grace would leave exit codes other than 75 below.
    launcher.send_signal(signal.SIGTERM)
    text, _ = launcher.communicate(timeout=120)
    assert launcher.returncode != 0, text[-3000:]  # torchrun does not pass 75 on
    results = [json.loads(Path(f"{out}.rank-{r}.json").read_text()) for r in range(2)]
    assert [r.get("exit") for r in results] == [75, 75], text[-3000:]
    check_preempted(run, results, "SIGTERM")


def test_savepoints_train_runs_under_torchrun_and_resumes(tmp_path: Path) -> None:
    from conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip("needs ../shared tweet data")
    from test_train_cli import sample

    train, valid = sample(tmp_path, 96, 32)
    run = tmp_path / "run"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}

    def torchrun() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
             "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
             # "--": torchrun would take --run for its own --run-path
             "-m", "savepoints", "--", "train", str(train), "--eval", str(valid), "--run", str(run),
             "--epochs", "1", "--max-length", "32", "--batch-size", "8", "--save-every", "3"],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip

    first = torchrun()
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert first.stdout.count("save point committed at step 3") == 1  # rank 0 talks
    points = SavePoints(run, readonly=True).list()
    assert [p.step for p in points] == [3, 6]
    assert all(p.manifest.contents["ranks"]["world_size"] == 2 for p in points)
    assert all(len(p.manifest.contents["ranks"]["rng"]) == 2 for p in points)
    assert verify(run).ok
    again = torchrun()
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Resuming from the save point at step 6" in again.stdout
    # Rank 0 wrote the report, from a journal only it kept.
    page = (run / "report.html").read_text()
    assert 'data-step="3"' in page and 'data-step="6"' in page
    assert [e["event"] for e in read_journal(run)].count("open") == 2


def test_show_and_export_of_a_save_point_written_by_two_ranks(saved: Any, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from savepoints.cli.main import cli

    run, _ = saved
    shown = CliRunner().invoke(cli, ["show", str(run)], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert "written by 2 ranks" in shown.output
    out = tmp_path / "hf"
    done = CliRunner().invoke(cli, ["export", str(run), str(out), "--format", "hf-trainer"])
    assert done.exit_code == 0, done.output
    assert (out / "rng_state_0.pth").is_file() and (out / "rng_state_1.pth").is_file()
    state = torch.load(out / "optimizer.pt", weights_only=True)
    assert sorted(state["state"]) == list(range(len(state["state"])))
    sys.path.insert(0, str(WORKER.parent))
    from ranks_worker import build

    _, optimizer, _ = build("plain")
    optimizer.load_state_dict(state)  # Trainer's own optimizer.pt: loads by position


def test_the_readme_torchrun_example_trains_and_resumes(tmp_path: Path) -> None:
    from test_readme import python_blocks

    code = python_blocks()["Multi-process training"]
    assert "STEPS, SAVE_EVERY = 200, 50" in code
    run = tmp_path / "run"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}

    def torchrun(steps: int) -> None:
        script = tmp_path / f"train_fsdp_{steps}.py"
        script.write_text(
            code.replace("STEPS, SAVE_EVERY = 200, 50", f"STEPS, SAVE_EVERY = {steps}, 2")
        )
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
             "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
             str(script), str(run)],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    torchrun(4)
    assert [p.step for p in SavePoints(run, readonly=True).list()] == [2, 4]
    torchrun(8)  # resumes at step 4 and goes on; Keep(last=3)
    points = SavePoints(run, readonly=True).list()
    assert [p.step for p in points] == [4, 6, 8]
    assert points[1].parent == 4  # the second run continued from the first's last save point
    assert all(p.manifest.contents["ranks"]["world_size"] == 2 for p in points)
