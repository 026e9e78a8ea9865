"""Runs with a remote tier, against a real S3 endpoint (moto's server on 127.0.0.1,
started here) and a file:// remote: pushes, resume on a new machine, retention, gc,
conflicts, failures, SIGKILLed pushes, and the CLI."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("obstore")
moto_server = pytest.importorskip("moto.server")

import obstore as obs  # noqa: E402
from tests.conftest import same_weights, tiny_gpt2_config, train_steps  # noqa: E402

from savepoints import Keep, SavePoints  # noqa: E402
from savepoints.cli import cli  # noqa: E402
from savepoints.errors import (  # noqa: E402
    RemoteAccessError,
    RemoteConflictError,
    RemoteError,
    RemotePushError,
)
from savepoints.storage.remote import RemoteRun, blob_key, manifest_key  # noqa: E402

_S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ALLOW_HTTP", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
           "AWS_REGION")  # fmt: skip


def _start(port: int = 0):
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


@pytest.fixture(scope="module")
def s3_endpoint():
    server = _start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def _bucket(endpoint: str) -> str:
    name = f"b-{uuid.uuid4().hex[:12]}"
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{name}", method="PUT")).read()
    return name


def _s3_env(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    # Configured the way users are: the standard AWS_* variables.
    for key, value in zip(_S3_ENV, (endpoint, "true", "testing", "testing", "us-east-1")):
        monkeypatch.setenv(key, value)


@pytest.fixture
def s3_url(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    _s3_env(monkeypatch, s3_endpoint)
    return f"s3://{_bucket(s3_endpoint)}/runs/tweets"


def _model(seed: int = 0):
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(seed)
    return GPT2ForSequenceClassification(tiny_gpt2_config())


def _train_and_save(points: SavePoints, steps: list[int], model=None, **save):
    model = model or _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in steps:
        train_steps(model, opt)
        points.save(step, model=model, optimizer=opt, metrics={"eval_loss": 1.0 / step}, **save)
    return model, opt


def test_each_commit_is_pushed_and_close_returns_once_the_remote_holds_it(
    tmp_path: Path, s3_url: str
) -> None:
    with SavePoints(tmp_path / "run", remote=s3_url) as points:
        _train_and_save(points, [1, 2])
    remote = RemoteRun.open(s3_url)
    assert remote.steps() == [1, 2]
    for step in (1, 2):
        local = (tmp_path / "run" / f"step-{step:08d}" / "savepoint.json").read_bytes()
        # The same manifest, byte for byte: the same hashes everywhere.
        assert bytes(obs.get(remote.store, manifest_key(step)).bytes()) == local
        assert remote.verify(step).ok
    blobs = remote.blobs()
    for manifest in remote.points().values():
        assert all(e.hash in blobs for e in manifest.files.values())


def test_a_new_machine_with_an_empty_folder_resumes_from_the_remote_exactly(
    tmp_path: Path, s3_url: str
) -> None:
    with SavePoints(tmp_path / "a", remote=s3_url) as points:
        model, opt = _train_and_save(points, [10, 20])
        torch.manual_seed(123)
        points.save(30, model=model, optimizer=opt)
        expected = torch.rand(3)
    # Another machine: nothing local.
    with SavePoints(tmp_path / "b", remote=s3_url) as points:
        listed = points.list()
        assert [p.step for p in listed] == [10, 20, 30]
        assert all(p.remote == s3_url for p in listed)
        assert not (tmp_path / "b" / "step-00000030").exists()
        fresh = _model(seed=9)
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
        points.restore(listed[0], model=fresh)  # a remote-only SavePoint: fetched
        assert (tmp_path / "b" / "step-00000010").is_dir()
        points.restore(model=fresh, optimizer=fresh_opt)
        assert torch.equal(torch.rand(3), expected)  # the RNG came back too
        assert same_weights(fresh, model)
        assert fresh_opt.state_dict()["state"][0]["exp_avg"].equal(
            opt.state_dict()["state"][0]["exp_avg"]
        )
        # The fetched save point is a plain, verified local folder now.
        here = points.latest()
        assert here is not None and here.remote is None and here.verify().ok
        assert [p.step for p in points.list() if p.remote is None] == [10, 30]
        # Training goes on from there and pushes to the same remote.
        points.save(40, model=fresh, optimizer=fresh_opt)
    assert RemoteRun.open(s3_url).steps() == [10, 20, 30, 40]
    from transformers import AutoModelForSequenceClassification

    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "b" / "step-00000030")
    assert same_weights(loaded, model)


def test_unchanged_files_are_sent_once_so_a_head_only_save_sends_only_the_head(
    tmp_path: Path, s3_url: str
) -> None:
    model = _model()
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("score")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    # One weights shard per layer, so a frozen layer's file is the same in both.
    with SavePoints(tmp_path / "run", remote=s3_url, layer_shards_above=1) as points:
        for step in (1, 2):
            train_steps(model, opt)
            points.save(step, model=model)
        points.wait()
        first, second = points._tier.reports  # type: ignore[union-attr]
    assert first.uploaded_bytes > 0 and first.skipped_bytes == 0
    total = second.uploaded_bytes + second.skipped_bytes
    head = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if n.startswith("score"))  # fmt: skip
    # The frozen layers' shards were there already; the head's shard (and the small
    # JSON files that name the step) are all that is sent.
    assert second.uploaded_bytes < 0.2 * total
    assert second.uploaded_bytes >= head


def test_a_push_that_has_not_written_its_manifest_is_invisible_and_the_next_completes(
    tmp_path: Path, s3_url: str
) -> None:
    with SavePoints(tmp_path / "run") as points:
        _train_and_save(points, [5])
        point = points.latest()
    assert point is not None
    remote = RemoteRun.open(s3_url, writable=True)
    from savepoints.storage.remote import PushReport

    remote._upload_missing(point.path, point.manifest, PushReport(5), None)  # a killed push
    assert remote.blobs() and remote.steps() == []
    with SavePoints(tmp_path / "elsewhere", remote=s3_url, readonly=True) as reader:
        assert reader.list() == []
    report = remote.push(point.path, point.manifest)
    assert report.uploaded_bytes == 0 and remote.steps() == [5]  # the blobs were there
    assert remote.push(point.path, point.manifest).already  # a second push is a no-op


def test_a_different_save_point_for_a_step_the_remote_holds_is_a_conflict(
    tmp_path: Path, s3_url: str
) -> None:
    with SavePoints(tmp_path / "a", remote=s3_url) as points:
        _train_and_save(points, [1])
    with SavePoints(tmp_path / "b") as other:
        _train_and_save(other, [1], model=_model(seed=5))
        theirs = other.get(1)
    with pytest.raises(RemoteConflictError, match="different save point for step 1"):
        RemoteRun.open(s3_url).push(theirs.path, theirs.manifest)
    points = SavePoints(tmp_path / "b", remote=s3_url)
    # Opening pushes what is newer than the remote's newest: nothing here. A new save
    # of step 1 (overwrite) cannot replace the remote's: close() says so.
    points.save(1, model=_model(seed=6), overwrite=True)
    points.save(2, model=_model(seed=6))  # a refused step does not hold up newer ones
    with pytest.raises(RemotePushError, match=r"Step\(s\) 1 are") as caught:
        points.close()
    assert "different save point" in str(caught.value)
    assert f"savepoints push {tmp_path / 'b'} {s3_url}" in caught.value.hint
    assert (tmp_path / "b" / "step-00000001").is_dir()  # nothing local was lost
    assert RemoteRun.open(s3_url).verify(1).ok
    assert RemoteRun.open(s3_url).steps() == [1, 2]


def test_a_corrupt_newest_remote_save_point_falls_back_to_the_newest_that_verifies(
    tmp_path: Path, s3_url: str
) -> None:
    with SavePoints(tmp_path / "a", remote=s3_url) as points:
        model, _ = _train_and_save(points, [1])
        _train_and_save(points, [2], model=_model(seed=3))
    remote = RemoteRun.open(s3_url)
    first, second = remote.manifest(1), remote.manifest(2)
    only_second = {e.hash for e in second.files.values()} - {e.hash for e in first.files.values()}
    damaged = sorted(only_second)[0]
    data = bytearray(bytes(obs.get(remote.store, blob_key(damaged)).bytes()))
    data[len(data) // 2] ^= 0xFF
    obs.put(remote.store, blob_key(damaged), bytes(data))
    assert not remote.verify(2).ok
    with SavePoints(tmp_path / "b", remote=s3_url) as points:
        fresh = _model(seed=7)
        with pytest.warns(UserWarning, match="step 2 failed verification on download"):
            points.restore(model=fresh)
        assert same_weights(fresh, model)
        # The damaged one never became a local save point.
        assert not (tmp_path / "b" / "step-00000002").exists()
        assert [p.step for p in points.list() if p.remote is None] == [1]


def test_keep_applies_to_the_remote_tags_protect_and_gc_frees_only_unreferenced_blobs(
    tmp_path: Path, s3_url: str
) -> None:
    keep = Keep(last=2)
    with SavePoints(tmp_path / "run", remote=s3_url, keep=keep) as points:
        model, _ = _train_and_save(points, [1], tags=["release-1"])
        _train_and_save(points, [2, 3, 4], model=model)
    remote = RemoteRun.open(s3_url, writable=True)
    assert remote.steps() == [1, 3, 4]
    assert remote.tags() == {"release-1": 1}
    assert [p.step for p in SavePoints(tmp_path / "run", readonly=True).list()] == [1, 3, 4]
    # Step 2's files are garbage now, but young: a push in flight could own them.
    assert remote.usage().garbage > 0
    assert remote.collect(timedelta(hours=1)) == (0, 0)
    removed, freed = remote.collect(timedelta(0))
    assert removed > 0 and freed > 0 and remote.usage().garbage == 0
    for step in remote.steps():
        assert remote.verify(step).ok  # nothing a manifest lists was collected


def test_tags_are_changed_on_the_remote_by_compare_and_swap(tmp_path: Path, s3_url: str) -> None:
    with SavePoints(tmp_path / "run", remote=s3_url) as points:
        _train_and_save(points, [1, 2])
        points.wait()
        points.tag(1, "best-so-far")
        points.tag(2, "release")
        points.untag(1, "best-so-far")
        points.tag(1, "release-candidate")
    assert RemoteRun.open(s3_url).tags() == {"release": 2, "release-candidate": 1}
    with SavePoints(tmp_path / "new", remote=s3_url) as points:
        assert points.get("release").step == 2  # fetched by its tag
        assert points.get("release").tags == ("release",)


def test_a_failed_remote_retention_is_raised_by_close_not_only_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: RemoteRun, step: int) -> None:
        raise RemoteAccessError(self.url, "deleting was refused (AccessDenied)")

    monkeypatch.setattr(RemoteRun, "delete", refuse)
    points = SavePoints(tmp_path / "run", remote=(tmp_path / "r").as_uri(), keep=Keep(last=1))
    _train_and_save(points, [1, 2])
    with pytest.raises(RemoteError, match="retention or garbage collection failed"):
        points.close()
    assert RemoteRun.open((tmp_path / "r").as_uri()).steps() == [1, 2]


def test_a_file_remote_works_like_s3(tmp_path: Path) -> None:
    url = (tmp_path / "remote").as_uri()
    with SavePoints(tmp_path / "run", remote=url, keep=Keep(last=1)) as points:
        model, _ = _train_and_save(points, [1, 2], tags=[])
        points.tag(2, "final")
    remote = RemoteRun.open(url)
    assert remote.steps() == [2] and remote.tags() == {"final": 2}
    with SavePoints(tmp_path / "b", remote=str(tmp_path / "remote")) as points:
        fresh = _model(seed=4)
        points.restore("final", model=fresh)
        assert same_weights(fresh, model)


def test_bad_remotes_fail_when_the_run_opens_not_after_the_first_epoch(
    tmp_path: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _s3_env(monkeypatch, s3_endpoint)
    with pytest.raises(RemoteAccessError, match="bucket does not exist"):
        SavePoints(tmp_path / "run", remote="s3://no-such-bucket/x")
    # The local run was not left locked.
    SavePoints(tmp_path / "run").close()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens
    with pytest.raises(RemoteError, match="listing"):
        SavePoints(tmp_path / "run", remote="s3://bucket/x",
                   storage_options={"max_retries": 0, "retry_timeout": 1})  # fmt: skip


def test_wrong_credentials_are_refused_when_the_run_opens_with_the_stores_words(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # moto checks credentials only when told to: its own process, authentication on.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), 0.1).close()
                break
            except OSError:
                time.sleep(0.1)
        _s3_env(monkeypatch, f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONG")
        with pytest.raises(RemoteAccessError, match="InvalidAccessKeyId") as caught:
            SavePoints(tmp_path / "run", remote="s3://bucket/run")
        assert "AWS_ACCESS_KEY_ID" in caught.value.hint
        assert not (tmp_path / "run" / "step-00000001").exists()
        SavePoints(tmp_path / "run").close()  # the local run was not left locked
    finally:
        server.terminate()
        server.wait()


def test_a_push_that_fails_never_stops_training_and_is_retried_after_the_next_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    server = _start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    _s3_env(monkeypatch, endpoint)
    url = f"s3://{_bucket(endpoint)}/run"
    options = {"max_retries": 1, "retry_timeout": 2, "connect_timeout": 1}
    points = SavePoints(tmp_path / "run", remote=url, storage_options=options, keep=Keep(last=1))
    model, _ = _train_and_save(points, [1])
    points.wait()
    server.stop()  # the network goes away
    try:
        _train_and_save(points, [2], model=model)  # training goes on
        assert points.wait_pushed(timeout=60) == [2]
        assert "could not push step 2" in caplog.text
        with pytest.raises(RemotePushError, match="Step\\(s\\) 2 are committed locally"):
            points.wait()
        # Local retention keeps what is only local: step 2 is not on the remote yet.
        assert [p.step for p in points.list() if p.remote is None] == [2]
        assert (tmp_path / "run" / "step-00000002").is_dir()
    finally:
        server = _start(port)  # it comes back (moto keeps its buckets in the process)
    _train_and_save(points, [3], model=model)
    points.close()  # pushes 2 and 3
    remote = RemoteRun.open(url)
    assert remote.steps() == [3]  # Keep(last=1) on the remote too
    server.stop()


def test_an_emergency_save_point_that_cannot_be_pushed_in_time_is_said_and_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    from savepoints.preemption import Preemption

    server = _start()
    host, port = server.get_host_and_port()
    _s3_env(monkeypatch, f"http://{host}:{port}")
    url = f"s3://{_bucket(f'http://{host}:{port}')}/run"
    options = {"max_retries": 0, "retry_timeout": 1, "connect_timeout": 1}
    with pytest.raises(SystemExit) as leaving:
        with SavePoints(tmp_path / "run", remote=url, storage_options=options) as points:
            model, _ = _train_and_save(points, [1])
            points.wait()
            server.stop()
            _train_and_save(points, [2], model=model)  # the emergency save point
            Preemption(deadline=30).exit(points, step=2)
    # 75 leaves the block (a scheduler requeues on it), not the push's error.
    assert leaving.value.code == 75
    said = capfd.readouterr().err
    assert "step(s) 2 committed in" in said and "not pushed to " + url in said
    assert f"savepoints push {tmp_path / 'run'} {url}" in said
    assert (tmp_path / "run" / "step-00000002").is_dir()  # committed locally first


_NO_CLOSE = """
import sys
import torch
from savepoints import SavePoints
from tests.conftest import tiny_gpt2_config
from transformers import GPT2ForSequenceClassification

model = GPT2ForSequenceClassification(tiny_gpt2_config())
points = SavePoints(sys.argv[1], remote=sys.argv[2], async_save=sys.argv[3] == "async")
for step in (1, 2, 3):
    with torch.no_grad():
        model.score.weight.add_(1.0)
    points.save(step, model=model)
"""


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_script_that_ends_without_close_still_pushes_every_save_point(
    tmp_path: Path, mode: str
) -> None:
    url = (tmp_path / "remote").as_uri()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", _NO_CLOSE, str(tmp_path / "run"), url, mode],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    remote = RemoteRun.open(url)
    assert remote.steps() == [1, 2, 3] and remote.verify(3).ok


_KILLED_PUSH = """
import sys
from pathlib import Path
from savepoints.storage.tier import push_run
print("ready", flush=True)
sys.stdin.readline()  # go
push_run(Path(sys.argv[1]), sys.argv[2])
print("pushed", flush=True)
"""


def test_a_push_sigkilled_at_random_moments_never_leaves_a_visible_partial_save_point(
    tmp_path: Path, s3_url: str
) -> None:
    # A save point of several files, big enough that a kill lands inside the push.
    run = tmp_path / "run"
    with SavePoints(run, max_shard_size=2 * 1024 * 1024) as points:
        model = _model()
        big = torch.nn.Linear(1024, 2048)  # 8 MB more of weights, in several shards
        model.add_module("extra", big)
        points.save(7, model=model)
    remote = RemoteRun.open(s3_url, writable=True)
    started = time.perf_counter()
    remote.push(run / "step-00000007", points.get(7).manifest)
    push_seconds = time.perf_counter() - started
    rng = random.Random(0)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    outcomes = {"killed before the manifest": 0, "killed after the manifest": 0}

    def pusher() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", _KILLED_PUSH, str(run), s3_url],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)  # fmt: skip

    upcoming = pusher()  # each child starts (imports) while the trial before runs
    for trial in range(20):
        remote.delete(7)
        remote.collect(timedelta(0))
        assert remote.blobs() == {}
        child, upcoming = upcoming, (pusher() if trial < 19 else None)
        assert child.stdout is not None and child.stdout.readline().strip() == b"ready"
        assert child.stdin is not None
        child.stdin.write(b"go\n")
        child.stdin.flush()
        time.sleep(rng.uniform(0, push_seconds * 1.2))
        child.send_signal(signal.SIGKILL)
        child.wait()
        # Either nothing is visible, or the whole save point is, and it verifies.
        if remote.steps():
            outcomes["killed after the manifest"] += 1
            assert remote.steps() == [7] and remote.verify(7).ok
        else:
            outcomes["killed before the manifest"] += 1
            with SavePoints(tmp_path / "reader", remote=s3_url, readonly=True) as reader:
                assert reader.list() == []
        # The next push completes it.
        remote.push(run / "step-00000007", points.get(7).manifest)
        assert remote.steps() == [7] and remote.verify(7).ok
    assert outcomes["killed before the manifest"] > 0, outcomes


def _cli(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_cli_push_pull_and_remote_list_show_verify_du_rm_gc(tmp_path: Path, s3_url: str) -> None:
    with SavePoints(tmp_path / "run") as points:
        _train_and_save(points, [1, 2], tags=[])
        points.tag(2, "final")
    result = _cli("push", str(tmp_path / "run"), s3_url)
    assert result.exit_code == 0, result.output
    assert "2 save point(s) on " + s3_url in result.output
    again = _cli("push", str(tmp_path / "run"), s3_url, "--json")
    assert [r["already"] for r in json.loads(again.output)] == [True, True]

    listed = _cli("list", s3_url, "--json")
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.output)
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["tags"] == ["final"]
    assert rows[1]["path"] == f"{s3_url}/points/step-00000002"
    shown = _cli("show", s3_url, "final")
    assert shown.exit_code == 0 and "step 2" in shown.output and s3_url in shown.output
    assert _cli("verify", s3_url).exit_code == 0
    du = json.loads(_cli("du", s3_url, "--json").output)
    assert du["physical"] < du["logical"]

    pulled = _cli("pull", s3_url, str(tmp_path / "copy"), "final")
    assert pulled.exit_code == 0, pulled.output
    assert [p.step for p in SavePoints(tmp_path / "copy", readonly=True).list()] == [2]
    assert _cli("pull", s3_url, str(tmp_path / "copy")).exit_code == 0
    assert [p.step for p in SavePoints(tmp_path / "copy", readonly=True).list()] == [1, 2]

    refused = _cli("rm", s3_url, "final")
    assert refused.exit_code == 1 and "tagged" in refused.output
    assert _cli("rm", s3_url, "1").exit_code == 0
    assert RemoteRun.open(s3_url).steps() == [2]
    gc = _cli("gc", s3_url, "--grace", "0")
    assert gc.exit_code == 0 and "freed" in gc.output
    assert _cli("verify", s3_url).exit_code == 0

    # A damaged remote file: verify says which, exit 3.
    remote = RemoteRun.open(s3_url)
    digest = remote.manifest(2).files["config.json"].hash
    obs.put(remote.store, blob_key(digest), b"{}")
    bad = _cli("verify", s3_url)
    assert bad.exit_code == 3 and "config.json" in bad.output


def test_cli_names_a_missing_bucket_with_how_to_fix_it(
    tmp_path: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _s3_env(monkeypatch, s3_endpoint)
    result = CliRunner().invoke(cli, ["list", "s3://missing-bucket/run"])
    assert result.exit_code == 6
    assert "bucket does not exist" in result.output and "AWS_ENDPOINT_URL" in result.output


def test_a_remote_needs_obstore_and_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins

    real_import = builtins.__import__

    def no_obstore(name, *args, **kwargs):
        if name.startswith("obstore"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_obstore)
    with warnings.catch_warnings(), pytest.raises(ImportError, match=r"savepoints\[remote\]"):
        SavePoints(tmp_path / "run", remote="s3://bucket/x")


def test_the_readme_remote_example_trains_pushes_and_resumes_on_an_empty_folder(
    tmp_path: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_readme import python_blocks

    _s3_env(monkeypatch, s3_endpoint)
    urllib.request.urlopen(urllib.request.Request(f"{s3_endpoint}/my-bucket", method="PUT"))
    code = python_blocks()["Remote runs"]

    def train_one_step(model, optimizer) -> None:
        train_steps(model, optimizer, steps=1)

    trained = _model()
    (tmp_path / "first-machine").mkdir()
    monkeypatch.chdir(tmp_path / "first-machine")
    names = {"model": trained, "optimizer": torch.optim.AdamW(trained.parameters()),
             "train_one_step": train_one_step}  # fmt: skip
    exec(compile(code, "README.md", "exec"), names)
    remote = RemoteRun.open("s3://my-bucket/runs/tweets")
    assert remote.steps() == [60, 80, 100]  # Keep(last=3), on the remote too
    # Another machine: an empty folder resumes from step 100 and has nothing left to do.
    (tmp_path / "second-machine").mkdir()
    monkeypatch.chdir(tmp_path / "second-machine")
    fresh = _model(seed=1)
    names = {"model": fresh, "optimizer": torch.optim.AdamW(fresh.parameters()),
             "train_one_step": train_one_step}  # fmt: skip
    exec(compile(code, "README.md", "exec"), names)
    assert names["state"] == {"step": 100}
    assert same_weights(fresh, trained)
