"""The content-addressed store: unchanged bytes stored once, safe deletes, gc, du."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from savepoints import SavePoints


def two_layer_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 256),
        torch.nn.Linear(256, 4),
    )


def save_head_only_run(path, n=5, **options) -> SavePoints:
    """n save points in which only the last layer (and the optimizer) change."""
    net = two_layer_net()
    opt = torch.optim.AdamW(net[3].parameters())
    points = SavePoints(path, layer_shards_above=0, **options)
    for step in range(1, n + 1):
        net(torch.randn(4, 256)).sum().backward()
        opt.step()
        opt.zero_grad()
        points.save(step, model=net, optimizer=opt)
    return points


def test_unchanged_layers_are_stored_once(tmp_path):
    points = save_head_only_run(tmp_path / "run")
    u = points.usage()
    one = points.latest().size
    frozen = sum(p.numel() * 4 for p in two_layer_net()[:3].parameters())
    assert u.logical == sum(p.size for p in points.list())
    # everything but the head and the optimizer state is stored once
    assert u.physical < one + 4 * (one - frozen) + 10_000
    assert u.ratio > 3.0
    latest = points.latest().path
    index = (latest / "model.safetensors.index.json").read_text()
    assert "model-00001-of-00003.safetensors" in index  # one shard per layer
    first = points.get(1).path
    assert os.stat(first / "model-00001-of-00003.safetensors").st_ino == os.stat(
        latest / "model-00001-of-00003.safetensors").st_ino  # fmt: skip
    assert all(p.verify() for p in points.list())
    points.close()


def test_deleting_a_save_point_never_breaks_one_that_shares_its_blobs(tmp_path):
    from transformers import (
        AutoModelForSequenceClassification,
        GPT2Config,
        GPT2ForSequenceClassification,
    )

    model = GPT2ForSequenceClassification(
        GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, num_labels=2, pad_token_id=0)
    )
    with SavePoints(tmp_path / "run", layer_shards_above=0) as points:
        points.save(1, model=model)
        with torch.no_grad():
            model.score.weight.add_(1.0)
        points.save(2, model=model)
        shared = points.get(2).path / "config.json"
        assert os.stat(shared).st_nlink == 3  # blob + two save points
        points.delete(1)
        assert os.stat(shared).st_nlink == 2
        assert points.get(2).verify()
        loaded = AutoModelForSequenceClassification.from_pretrained(points.get(2).path)
        assert torch.equal(loaded.score.weight, model.score.weight)
        blobs = list((tmp_path / "run" / ".savepoints" / "blobs").rglob("*"))
        assert all(b.stat().st_nlink == 2 for b in blobs if b.is_file())  # gc ran


def test_gc_frees_only_unreferenced_blobs(tmp_path):
    import shutil

    points = save_head_only_run(tmp_path / "run", n=3)
    assert points.usage().garbage == 0
    for folder in [points.get(1).path, points.get(2).path]:
        os.rename(folder, tmp_path / folder.name)  # taken out of the run by hand
    assert points.usage().garbage == 0  # the moved folders still link the blobs
    for folder in (tmp_path / "step-00000001", tmp_path / "step-00000002"):
        shutil.rmtree(folder)
    garbage = points.usage().garbage
    assert garbage > 0
    removed, freed = points.gc()
    assert removed > 0 and freed == garbage
    assert points.usage().garbage == 0
    assert points.latest().verify()
    points.close()


_GC_CHILD = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from savepoints.storage.blobs import BlobStore
    store = BlobStore(Path(sys.argv[1]))
    real_unlink = Path.unlink
    def slow_unlink(self, *a, **k):
        real_unlink(self, *a, **k)
        print("unlinked", flush=True)
        time.sleep(0.2)
    Path.unlink = slow_unlink
    store.collect()
    """
)


def test_gc_killed_midway_loses_nothing_still_referenced(tmp_path):
    points = save_head_only_run(tmp_path / "run", n=4)
    points.close()
    # make garbage: a whole save point removed behind the store's back
    import shutil

    shutil.rmtree(tmp_path / "run" / "step-00000001")
    shutil.rmtree(tmp_path / "run" / "step-00000002")
    script = tmp_path / "gc_child.py"
    script.write_text(_GC_CHILD)
    blobs = tmp_path / "run" / ".savepoints" / "blobs"
    proc = subprocess.Popen([sys.executable, str(script), str(blobs)], stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "unlinked"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with SavePoints(tmp_path / "run") as again:
        assert [p.step for p in again.list()] == [3, 4]
        assert all(p.verify() for p in again.list())
        assert again.usage().garbage > 0  # the kill left some garbage ...
        again.gc()
        assert again.usage().garbage == 0  # ... which the next gc frees
        assert all(p.verify() for p in again.list())


def test_without_hard_links_files_are_plain_copies(tmp_path, monkeypatch):
    def no_links(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    points = save_head_only_run(tmp_path / "run", n=2)
    assert points.dedup is False
    assert all(p.verify() for p in points.list())
    u = points.usage()
    assert u.physical == u.logical and u.ratio == 1.0
    points.close()


def test_in_place_corruption_of_a_shared_file_shows_in_every_save_point_sharing_it(tmp_path):
    points = save_head_only_run(tmp_path / "run", n=2)
    shared = points.get(1).path / "model-00001-of-00003.safetensors"
    assert not os.access(shared, os.W_OK) or os.geteuid() == 0  # blobs are read-only
    os.chmod(shared, 0o644)
    data = bytearray(shared.read_bytes())
    data[-1] ^= 1
    shared.write_bytes(bytes(data))  # in place: the one stored copy changes
    reports = [p.verify() for p in points.list()]
    assert [r.ok for r in reports] == [False, False]
    assert all(any(x.path == shared.name for x in r.problems) for r in reports)
    points.close()


def test_du_and_gc_commands(tmp_path):
    from click.testing import CliRunner

    from savepoints.cli import cli

    save_head_only_run(tmp_path / "run", n=3).close()
    r = CliRunner().invoke(cli, ["du", str(tmp_path / "run")])
    assert r.exit_code == 0 and "dedup ratio" in r.stdout and "unique" in r.stdout
    r = CliRunner().invoke(cli, ["du", str(tmp_path / "run"), "--json"])
    import json

    data = json.loads(r.stdout)
    assert data["physical"] < data["logical"] and set(data["unique"]) == {"1", "2", "3"}
    r = CliRunner().invoke(cli, ["gc", str(tmp_path / "run")])
    assert r.exit_code == 0 and "freed 0 B in 0 unreferenced blob(s)" in r.stdout


def test_lora_adapter_run_stores_the_base_once_in_peft_layout(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=500, bos_token_id=0, eos_token_id=0)
    ).save_pretrained(tmp_path / "base")

    def lora_model():
        torch.manual_seed(1)
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        config = peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True)
        return peft.get_peft_model(base, config)

    model = lora_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 500, (2, 16))
    with SavePoints(tmp_path / "run", layer_shards_above=0) as points:
        for step in (1, 2, 3):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            points.save(step, model=model, optimizer=opt)
        sp = points.latest()
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {
            p.name for p in sp.path.iterdir()
        }
        u = points.usage()
        base_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if not p.requires_grad)
        adapter = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
        # the frozen base once, then adapter-sized save points (adapter, moments, small files)
        assert u.physical < base_bytes + 3 * 8 * adapter + 200_000, (
            u.physical,
            base_bytes,
            adapter,
        )
        assert u.logical > 2.5 * base_bytes
        # PEFT's own loader works on the save point folder
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        loaded = peft.PeftModel.from_pretrained(base, str(sp.path)).eval()
        model.eval()
        with torch.no_grad():
            assert torch.allclose(
                loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6
            )
        # and an exact restore into a fresh LoRA model
        fresh = lora_model()
        points.restore(model=fresh)
        assert all(
            torch.equal(a, b)
            for a, b in zip(fresh.state_dict().values(), model.state_dict().values())
        )


def test_interning_a_file_that_already_is_the_blob_leaves_nothing_behind(tmp_path):
    points = save_head_only_run(tmp_path / "run", n=1)
    sp = points.latest()
    from savepoints.storage.blobs import BlobStore

    store = BlobStore(tmp_path / "run" / ".savepoints" / "blobs")
    assert store.intern_all(sp.path, sp.manifest.files) == len(sp.manifest.files)
    assert sp.verify()  # no stray temporary links
    points.close()
