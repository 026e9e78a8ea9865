"""Snapshots: deferred copies that the optimizer step waits for, changes that fail loudly,
and incremental saves that neither copy nor rewrite frozen weights."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from savepoints import SavePoints, SnapshotChangedError
from savepoints.snapshot import HostBuffers
from savepoints.staging import FileRecorder


def in_background() -> bool:
    """Whether this runs in one of savepoints' background threads (copy or write)."""
    return threading.current_thread().name.startswith("savepoints-")


def make_net(frozen: bool = False) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    if frozen:
        net[0].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=0.1)
    return net, opt


def train_step(net: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    net(torch.randn(8, 16)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


@pytest.fixture
def slow_background_copies(monkeypatch):
    """Copies made in the background take a while: what runs meanwhile in the training
    thread runs before them, for sure."""
    copy = HostBuffers.copy
    started = threading.Event()

    def slow(self, key, tensor):
        if in_background():
            started.set()
            time.sleep(0.05)
        return copy(self, key, tensor)

    monkeypatch.setattr(HostBuffers, "copy", slow)
    return started


def saved_model(point) -> dict[str, torch.Tensor]:
    return load_file(point.path / "model.safetensors")


def test_the_step_after_a_deferred_save_waits_for_its_copy_and_the_save_holds_the_old_values(
    tmp_path, slow_background_copies
):
    net, opt = make_net()
    train_step(net, opt)
    with SavePoints(tmp_path / "run", snapshot="deferred") as points:
        points.save(1, model=net, optimizer=opt)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        moments = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
        assert not slow_background_copies.is_set() or points.busy  # still copying
        train_step(net, opt)  # overwrites every parameter and the AdamW moments
        point = points.wait()
        assert point is not None and point.step == 1
    saved = saved_model(point)
    assert all(torch.equal(saved[k], before[k]) for k in before)
    assert not torch.equal(saved["0.weight"], net[0].weight)  # the step did change it
    optim = load_file(point.path / "training_state" / "optimizer.safetensors")
    exp_avg = next(v for k, v in optim.items() if k.endswith("exp_avg") and v.shape == (32, 16))
    assert torch.equal(exp_avg, moments["exp_avg"])


def test_an_in_place_edit_before_the_deferred_copy_fails_the_save_and_commits_nothing(
    tmp_path, slow_background_copies
):
    net, opt = make_net()
    train_step(net, opt)
    with SavePoints(tmp_path / "run", snapshot="deferred") as points:
        points.save(1, model=net, optimizer=opt)
        points.wait()
        points.save(2, model=net, optimizer=opt)
        with torch.no_grad():
            net[2].bias.add_(1.0)  # not through the optimizer: the contract is broken
        with pytest.raises(SnapshotChangedError, match=r"'2\.bias \(model\.safetensors\)'") as e:
            points.wait()
        assert "Nothing was committed" in str(e.value) and "snapshot='eager'" in str(e.value)
        assert [p.step for p in points.list()] == [1]
        assert not any((tmp_path / "run" / ".savepoints" / "staging").iterdir())
        points.save(3, model=net, optimizer=opt)  # the run goes on
    assert [p.step for p in SavePoints(tmp_path / "run", readonly=True).list()] == [1, 3]


def test_an_edit_between_save_and_the_optimizer_step_is_caught_at_the_step(tmp_path):
    net, opt = make_net()
    train_step(net, opt)
    release = threading.Event()
    copy = HostBuffers.copy

    def held(self, key, tensor):  # the background copy cannot start before the edit
        if in_background():
            release.wait(10)
        return copy(self, key, tensor)

    with SavePoints(tmp_path / "run", snapshot="deferred") as points:
        HostBuffers.copy = held  # type: ignore[method-assign]
        try:
            points.save(1, model=net, optimizer=opt)
            with torch.no_grad():
                net[0].weight.mul_(2.0)
            release.set()
            train_step(net, opt)  # the pre-hook waits, then sees the edit
        finally:
            HostBuffers.copy = copy  # type: ignore[method-assign]
        with pytest.raises(SnapshotChangedError, match=r"0\.weight"):
            points.wait()
        assert points.list() == []


def test_a_second_optimizer_changing_the_weights_fails_the_deferred_save(
    tmp_path, slow_background_copies
):
    net, opt = make_net()
    other = torch.optim.SGD(net[2].parameters(), lr=0.5)  # not given to save()
    train_step(net, opt)
    with SavePoints(tmp_path / "run", snapshot="deferred") as points:
        points.save(1, model=net, optimizer=opt)
        net(torch.randn(8, 16)).pow(2).mean().backward()
        other.step()
        with pytest.raises(SnapshotChangedError, match=r"2\.(weight|bias)"):
            points.wait()


def test_eager_snapshots_allow_any_edit_after_save_returns(tmp_path, slow_background_copies):
    net, opt = make_net()
    train_step(net, opt)
    with SavePoints(tmp_path / "run", snapshot="eager") as points:
        points.save(1, model=net, optimizer=opt)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        with torch.no_grad():
            net[0].weight.mul_(2.0)
        train_step(net, opt)
        point = points.wait()
    saved = saved_model(point)
    assert all(torch.equal(saved[k], before[k]) for k in before)


@pytest.fixture
def spy(monkeypatch):
    """Which tensors are copied into host buffers and which files are written."""
    seen: dict[str, list[str]] = {"copied": [], "written": []}
    copy, write = HostBuffers.copy, FileRecorder._write_tensor_file

    def spy_copy(self, key, tensor):
        seen["copied"].append(key.split("\0")[-1])
        return copy(self, key, tensor)

    def spy_write(self, rel, tensors, metadata):
        seen["written"].append(rel)
        return write(self, rel, tensors, metadata)

    monkeypatch.setattr(HostBuffers, "copy", spy_copy)
    monkeypatch.setattr(FileRecorder, "_write_tensor_file", spy_write)
    return seen


@pytest.mark.parametrize(
    ("async_save", "snapshot"), [(False, None), (True, "eager"), (True, "deferred")]
)
def test_frozen_unchanged_weights_are_neither_copied_nor_rewritten_after_the_first_save(
    tmp_path, spy, async_save, snapshot
):
    net, opt = make_net(frozen=True)
    run = tmp_path / "run"
    with SavePoints(run, async_save=async_save, snapshot=snapshot, layer_shards_above=1) as points:
        train_step(net, opt)
        first = points.save(1, model=net, optimizer=opt)
        points.wait()
        frozen_files = {
            rel for rel in spy["written"] if set(load_file(run / "step-00000001" / rel)) ==
            {"0.weight", "0.bias"}
        }  # fmt: skip
        assert len(frozen_files) == 1, spy["written"]
        spy["copied"].clear()
        spy["written"].clear()
        train_step(net, opt)
        points.save(2, model=net, optimizer=opt)
        points.wait()
        assert not {"0.weight", "0.bias"} & set(spy["copied"])  # not copied again
        assert frozen_files.isdisjoint(spy["written"])  # not written again
        assert "training_state/optimizer.safetensors" in spy["written"]
        (rel,) = frozen_files
        a, b = run / "step-00000001" / rel, run / "step-00000002" / rel
        assert os.path.samefile(a, b)  # the same stored blob
        second = points.get(2)
        assert second.verify().ok
        assert torch.equal(load_file(b)["0.weight"], net[0].weight)
        assert first.manifest.files[rel] == second.manifest.files[rel]


def test_a_frozen_weight_edited_behind_autograds_back_fails_the_save_then_is_copied_again(
    tmp_path,
):
    net, opt = make_net(frozen=True)
    with SavePoints(tmp_path / "run", layer_shards_above=1) as points:
        points.save(1, model=net, optimizer=opt)
        points.wait()
        net[0].weight.data.add_(1.0)  # .data: the version counter does not move
        points.save(2, model=net, optimizer=opt)
        with pytest.raises(SnapshotChangedError, match=r"0\.weight.*without autograd"):
            points.wait()
        points.save(3, model=net, optimizer=opt)
        point = points.wait()
    assert [p.step for p in SavePoints(tmp_path / "run", readonly=True).list()] == [1, 3]
    saved = {}
    for f in point.path.glob("model-*.safetensors"):
        saved.update(load_file(f))
    assert torch.equal(saved["0.weight"], net[0].weight)


def test_a_frozen_weight_changed_in_place_is_copied_again(tmp_path, spy):
    net, opt = make_net(frozen=True)
    with SavePoints(tmp_path / "run", layer_shards_above=1) as points:
        points.save(1, model=net, optimizer=opt)
        points.wait()
        with torch.no_grad():
            net[0].weight.add_(1.0)  # seen by the version counter
        spy["copied"].clear()
        points.save(2, model=net, optimizer=opt)
        point = points.wait()
    assert "0.weight" in spy["copied"] and "0.bias" not in spy["copied"]
    saved = {}
    for f in point.path.glob("model-*.safetensors"):
        saved.update(load_file(f))
    assert torch.equal(saved["0.weight"], net[0].weight)


def test_the_optimizer_hook_is_removed_on_close(tmp_path):
    net, opt = make_net()
    points = SavePoints(tmp_path / "run", snapshot="deferred")
    points.save(1, model=net, optimizer=opt)
    assert len(opt._optimizer_step_pre_hooks) == 1
    points.close()
    assert len(opt._optimizer_step_pre_hooks) == 0


def test_bad_snapshot_choices_are_refused_before_anything_is_written(tmp_path):
    from savepoints import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="snapshot='lazy' is not allowed"):
        SavePoints(tmp_path / "a", snapshot="lazy")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="needs async_save=True"):
        SavePoints(tmp_path / "b", snapshot="deferred", async_save=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_deferred_save_that_fails_at_once_leaves_no_optimizer_step_waiting(tmp_path):
    from savepoints import UnserializableStateError

    class Odd:
        def state_dict(self):
            return {"thing": object()}

    net, opt = make_net()
    train_step(net, opt)
    with SavePoints(tmp_path / "run", snapshot="deferred") as points:
        with pytest.raises(UnserializableStateError):
            points.save(1, model=net, optimizer=opt, extra={"odd": Odd()})
        done = threading.Event()
        worker = threading.Thread(target=lambda: (train_step(net, opt), done.set()))
        worker.start()
        worker.join(30)
        assert done.is_set()  # the step did not wait for a copy that will never come
        points.save(2, model=net, optimizer=opt)
    assert [p.step for p in SavePoints(tmp_path / "run", readonly=True).list()] == [2]


def test_reused_tensors_are_spot_checked_at_exact_positions_even_when_huge():
    from savepoints.snapshot import _same_sample

    big = torch.zeros(2**25 + 3, dtype=torch.uint8)  # float32 positions would round past it
    copy = big.clone()
    assert _same_sample(big, copy)
    copy[-1] = 1
    assert not _same_sample(big, copy)


def test_a_reader_thread_never_lets_the_next_save_overwrite_buffers_still_being_written(
    tmp_path, monkeypatch
):
    write = FileRecorder._write_tensor_file

    def slow_disk(self, rel, tensors, metadata):
        time.sleep(0.05)
        return write(self, rel, tensors, metadata)

    monkeypatch.setattr(FileRecorder, "_write_tensor_file", slow_disk)
    net = torch.nn.Linear(64, 64)
    stop = threading.Event()
    with SavePoints(tmp_path / "run") as points:

        def reader() -> None:  # a dashboard polling the run
            while not stop.is_set():
                points.latest()

        watcher = threading.Thread(target=reader)
        watcher.start()
        try:
            for step in range(1, 7):
                with torch.no_grad():
                    net.weight.fill_(step)
                points.save(step, model=net, rng=False)
        finally:
            stop.set()
            watcher.join()
    for point in SavePoints(tmp_path / "run", readonly=True).list():
        assert bool((saved_model(point)["weight"] == point.step).all()), point.step


def test_a_schedule_free_optimizer_is_copied_at_once_even_when_deferred(tmp_path):
    class ScheduleFreeLike(torch.optim.SGD):
        """Rewrites the weights in train()/eval() through .data, as schedule-free ones do."""

        def eval(self):
            for p in self.param_groups[0]["params"]:
                p.data.mul_(0.5)

        def train(self):
            for p in self.param_groups[0]["params"]:
                p.data.mul_(2.0)

    net, _ = make_net()
    opt = ScheduleFreeLike(net.parameters(), lr=0.1)
    train_step(net, opt)
    with SavePoints(tmp_path / "run", snapshot="deferred") as points:
        before = {k: v.clone() for k, v in net.state_dict().items()}
        points.save(1, model=net, optimizer=opt)
        opt.train()  # what the Trainer calls at the start of the next step
        train_step(net, opt)
        point = points.wait()
        assert len(opt._optimizer_step_pre_hooks) == 0  # not hooked: nothing deferred
    saved = saved_model(point)
    assert all(torch.equal(saved[k], before[k]) for k in before)


def test_a_synchronous_save_notices_a_frozen_weight_edited_through_data(tmp_path):
    net, opt = make_net(frozen=True)
    with SavePoints(tmp_path / "run", async_save=False, layer_shards_above=1) as points:
        points.save(1, model=net, optimizer=opt)
        net[0].weight.data.add_(1.0)  # unseen by the version counter
        point = points.save(2, model=net, optimizer=opt)
    saved = {}
    for f in point.path.glob("model-*.safetensors"):
        saved.update(load_file(f))
    assert torch.equal(saved["0.weight"], net[0].weight) and point.verify().ok


def test_unfreezing_a_reused_weight_right_after_an_eager_save_is_allowed(tmp_path):
    net, opt = make_net(frozen=True)
    with SavePoints(tmp_path / "run", snapshot="eager", layer_shards_above=1) as points:
        points.save(1, model=net, optimizer=opt)
        points.wait()
        before = net[0].weight.detach().clone()
        points.save(2, model=net, optimizer=opt)  # 0.* reused from step 1
        net[0].requires_grad_(True)
        with torch.no_grad():
            net[0].weight.add_(1.0)  # after save() returned: any change is fine in eager mode
        point = points.wait()
    saved = {}
    for f in point.path.glob("model-*.safetensors"):
        saved.update(load_file(f))
    assert torch.equal(saved["0.weight"], before)
