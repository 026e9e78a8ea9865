"""The README's examples run as they are written.

The Python blocks of the Quickstart are executed unchanged, with only the names they
leave to the reader (``model``, ``args``, ``train``...) defined first; the API listing is
checked name by name against the real classes. A refactor that renames or drops a
public name, or changes what an example does, fails here.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import pytest
import torch

import savepoints
from conftest import same_weights, tiny_gpt2_config
from savepoints import SavePoint, SavePoints

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> dict[str, str]:
    """``{heading: code}`` for every ```python block, under its nearest heading."""
    blocks: dict[str, str] = {}
    heading = ""
    lines = README.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.strip() == "```python":
            j = lines.index("```", i + 1)
            blocks[heading] = "\n".join(lines[i + 1 : j])
            i = j
        i += 1
    return blocks


def test_the_readme_has_the_examples_this_file_runs():
    assert {"In an existing Trainer script", "In any PyTorch loop", "The API"} <= set(
        python_blocks()
    )


def _classifier():
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(0)
    return GPT2ForSequenceClassification(tiny_gpt2_config())


def test_the_trainer_example_trains_saves_and_resumes(tmp_path, monkeypatch, tokenizer):
    from transformers import Trainer, TrainingArguments

    monkeypatch.chdir(tmp_path)
    rows = [
        {"input_ids": [(i * 7 + k) % 300 + 1 for k in range(8)], "labels": i % 3} for i in range(16)
    ]
    code = python_blocks()["In an existing Trainer script"]
    for max_steps in (4, 6):  # the second run resumes from the first one's save point
        args = TrainingArguments(
            output_dir=str(tmp_path / "out"), max_steps=max_steps, save_steps=2,
            per_device_train_batch_size=4, report_to=[], use_cpu=True, logging_steps=1,
        )  # fmt: skip
        names = {"Trainer": Trainer, "model": _classifier(), "args": args, "train": rows,
                 "dev": None, "tokenizer": tokenizer}  # fmt: skip
        exec(compile(code, "README.md", "exec"), names)
        names["points"].close()
    with SavePoints("runs/tweets", readonly=True) as points:
        assert [p.step for p in points.list()] == [2, 4, 6]
        assert points.get(6).state["global_step"] == 6 and points.get(6).parent == 4
        assert all(p.verify() for p in points.list())
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("checkpoint-*"))


def test_the_plain_loop_example_saves_picks_the_best_and_loads_it(tmp_path, monkeypatch, tokenizer):
    from transformers import AutoModelForSequenceClassification

    monkeypatch.chdir(tmp_path)
    model = _classifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    names = {
        "model": model, "optimizer": optimizer, "scheduler": scheduler, "tokenizer": tokenizer,
        "total_steps": 1500, "eval_loss": 0.5, "loss": 0.7, "epoch": 0, "batch": 0,
        "AutoModelForSequenceClassification": AutoModelForSequenceClassification,
    }  # fmt: skip
    exec(compile(python_blocks()["In any PyTorch loop"], "README.md", "exec"), names)
    with SavePoints("runs/my-run", readonly=True) as points:
        assert [p.step for p in points.list()] == [500, 1000, 1500]
        assert points.best().step == 500  # eval_loss tied: the first of the best is kept
    # `model` is now the best save point loaded with plain from_pretrained.
    assert names["model"] is not model and same_weights(names["model"], model)
    # Run it again: it resumes from step 1500 and saves nothing new.
    names.update(model=_classifier(), eval_loss=0.4)
    names["optimizer"] = torch.optim.AdamW(names["model"].parameters(), lr=1e-3)
    names["scheduler"] = torch.optim.lr_scheduler.LambdaLR(names["optimizer"], lambda s: 1.0)
    exec(compile(python_blocks()["In any PyTorch loop"], "README.md", "exec"), names)
    assert names["start"] == 1500


def test_every_name_in_the_api_listing_exists():
    code = python_blocks()["The API"]
    imported = re.search(r"from savepoints import (.+)", code)
    assert imported is not None
    for name in (n.strip() for n in imported.group(1).split(",")):
        assert hasattr(savepoints, name), name
    points_calls = set(re.findall(r"points\.(\w+)", code))
    assert {"save", "restore", "list", "latest", "best", "get", "delete", "tag", "untag",
            "verify", "usage", "gc", "wait", "close"} <= points_calls  # fmt: skip
    for name in points_calls:
        assert hasattr(SavePoints, name), f"SavePoints.{name}"
    attributes = set(inspect.signature(SavePoint.__init__).parameters)  # set in __init__
    for name in set(re.findall(r"\bsp\.(\w+)", code)):
        assert hasattr(SavePoint, name) or name in attributes, f"SavePoint.{name}"
    # Every keyword the listing shows for the constructor, save() and restore() exists.
    for call, func in (("SavePoints(path", SavePoints.__init__), ("points.save(", SavePoints.save),
                       ("points.restore(", SavePoints.restore)):  # fmt: skip
        shown = set(re.findall(r"(\w+)=", _statement(code, call)))
        assert shown and shown <= set(inspect.signature(func).parameters), (call, shown)


def _statement(code: str, start: str) -> str:
    """The lines of the statement that contains ``start`` (continuation lines indented)."""
    lines = code[code.index(start) :].splitlines()
    out = [lines[0]]
    for line in lines[1:]:
        if not line.startswith(" "):
            break
        out.append(line.split("#")[0])
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
