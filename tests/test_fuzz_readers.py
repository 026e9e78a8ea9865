"""Fuzzing the format readers behind restore(): safetensors files, JSON state, .zbg files.

Each example writes attacker-chosen bytes into a real save point, re-signs it (so that
verification passes and the reader itself is what is tested) and restores it. The only
acceptable outcomes: the restore works, or it raises a savepoints error (a clear message
naming the save point). Any other exception, a crash or a hang is a bug.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from savepoints import SavePoints, SavePointsError
from savepoints.integrity import hash_file
from savepoints.layout import MANIFEST_NAME
from savepoints.manifest import encode_manifest_json

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "__sp__",
                    "key",
                    "name",
                    "state",
                    "param_groups",
                    "params",
                    "lr",
                    "0",
                    "tensor",
                    "dtype",
                ]
            ),
            children,
            max_size=4,
        )
    ),
    max_leaves=20,
)


def build(base: Path) -> Path:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    opt = torch.optim.AdamW(net.parameters())
    net(torch.randn(2, 8)).sum().backward()
    opt.step()
    with SavePoints(base / "run") as points:
        return points.save(1, model=net, optimizer=opt, state={"step": 1}).path


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("fuzz"))


def restore_with(pristine: Path, work: Path, rel: str, content: bytes) -> None:
    """Copy the save point, put ``content`` at ``rel``, re-sign, restore: only a
    savepoints error may come out."""
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(pristine, work)
    (work / rel).chmod(0o644)
    (work / rel).write_bytes(content)
    data = json.loads((work / MANIFEST_NAME).read_text())
    size, digest = hash_file(work / rel)
    data["files"][rel] = {"size": size, "hash": digest}
    (work / MANIFEST_NAME).write_bytes(encode_manifest_json(data))
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    opt = torch.optim.AdamW(net.parameters())
    with contextlib.suppress(SavePointsError):
        SavePoints(work.parent, readonly=True).restore(work, model=net, optimizer=opt)


def header_file(header: bytes, declared: int | None = None, tail: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header) if declared is None else declared) + header + tail


@FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6)
)
def test_mutated_weights_files_never_escape_as_other_errors(pristine, tmp_path, edits):
    raw = bytearray((pristine / "model.safetensors").read_bytes())
    for pos, value in edits:
        raw[pos % len(raw)] = value
    restore_with(pristine, tmp_path / "w", "model.safetensors", bytes(raw))


@FUZZ
@given(
    header=json_values.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=200),
    declared=st.none() | st.integers(0, 2**64 - 1),
    tail=st.binary(max_size=300),
)
def test_arbitrary_safetensors_headers_are_refused_cleanly(
    pristine, tmp_path, header, declared, tail
):
    restore_with(pristine, tmp_path / "h", "model.safetensors", header_file(header, declared, tail))


@FUZZ
@given(state=json_values)
def test_arbitrary_optimizer_json_is_refused_cleanly(pristine, tmp_path, state):
    content = json.dumps(state).encode()
    restore_with(pristine, tmp_path / "o", "training_state/optimizer.json", content)


@FUZZ
@given(blob=st.binary(max_size=400), keep=st.integers(0, 400))
def test_arbitrary_compacted_files_are_refused_cleanly(pristine, tmp_path, blob, keep):
    pytest.importorskip("zstandard")
    base = tmp_path / "c"
    if not (base / "run").exists():
        shutil.copytree(pristine.parent, base / "run")
        with SavePoints(base / "run") as points:
            points.compact(1)
    folder = base / "run" / pristine.name
    zbg = next(rel for rel in json.loads((folder / MANIFEST_NAME).read_text())["files"]
               if rel.endswith(".zbg"))  # fmt: skip
    original = (folder / zbg).read_bytes()
    restore_with(folder, tmp_path / "cw", zbg, original[:keep] + blob)
