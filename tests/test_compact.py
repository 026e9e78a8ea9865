"""Lossless compaction of save points."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from savepoints import CorruptSavePointError, SavePoints
from savepoints.cli import cli

pytest.importorskip("zstandard")


def trained(gpt2_cls):
    opt = torch.optim.AdamW(gpt2_cls.parameters())
    from conftest import train_steps

    train_steps(gpt2_cls, opt, steps=2)
    return gpt2_cls, opt


def test_compact_then_restore_and_expand_are_exact(tmp_path, gpt2_cls, tokenizer):
    from transformers import AutoModelForSequenceClassification, GPT2ForSequenceClassification

    from conftest import tiny_gpt2_config

    model, opt = trained(gpt2_cls)
    with SavePoints(tmp_path / "run") as points:
        original = points.save(1, model=model, tokenizer=tokenizer, optimizer=opt)
        before = dict(original.manifest.files)
        small = points.compact(1)
        assert all(not rel.endswith(".safetensors") for rel in small.manifest.files)
        assert "model.safetensors.zbg" in small.manifest.files
        assert small.size < original.size  # byte grouping + zstd saves bytes
        assert small.verify()
        fresh = GPT2ForSequenceClassification(tiny_gpt2_config())
        fresh_opt = torch.optim.AdamW(fresh.parameters())
        points.restore(1, model=fresh, optimizer=fresh_opt)  # transparent
        assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                      model.state_dict().values()))  # fmt: skip
        assert fresh_opt.state_dict()["state"][0]["exp_avg"].equal(
            opt.state_dict()["state"][0]["exp_avg"]
        )
        plain = points.compact(1, expand=True)
        assert dict(plain.manifest.files) == before  # byte-identical originals
        assert plain.verify()
        assert "compacted" not in plain.contents
        loaded = AutoModelForSequenceClassification.from_pretrained(plain.path)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                      model.state_dict().values()))  # fmt: skip


def test_a_corrupted_compacted_file_is_caught(tmp_path, gpt2_cls):
    model, _ = trained(gpt2_cls)
    with SavePoints(tmp_path / "run") as points:
        points.save(1, model=model)
        sp = points.compact(1)
        target = sp.path / "model.safetensors.zbg"
        target.chmod(0o644)
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
        assert not sp.verify()
        with pytest.raises(CorruptSavePointError):
            points.restore(1, model=model)


def test_compact_and_expand_commands_free_space(tmp_path, gpt2_cls):
    model, opt = trained(gpt2_cls)
    with SavePoints(tmp_path / "run") as points:
        points.save(1, model=model, optimizer=opt)
        before = points.usage().physical
    r = CliRunner().invoke(cli, ["compact", str(tmp_path / "run"), "1"])
    assert r.exit_code == 0 and "compacted step 1" in r.stdout
    with SavePoints(tmp_path / "run", readonly=True) as points:
        assert points.usage().physical < before  # old blobs were collected
    r = CliRunner().invoke(cli, ["compact", str(tmp_path / "run"), "1"])
    assert r.exit_code == 1 and "already compacted" in r.stderr
    r = CliRunner().invoke(cli, ["expand", str(tmp_path / "run"), "1"])
    assert r.exit_code == 0 and "expanded step 1" in r.stdout


def test_commands_that_read_files_directly_ask_for_expand(tmp_path, gpt2_cls, tokenizer):
    with SavePoints(tmp_path / "run") as points:
        points.save(1, model=gpt2_cls, tokenizer=tokenizer)
        points.compact(1)
    for args in (["predict", str(tmp_path / "run"), "hello"],
                 ["export", str(tmp_path / "run"), str(tmp_path / "out")]):  # fmt: skip
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 1 and "is compacted" in r.stderr and "savepoints expand" in r.stderr
