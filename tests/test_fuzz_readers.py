"""Fuzzing the format readers behind restore(): safetensors files, JSON state, .zbg files.

Each example writes attacker-chosen bytes into a real save point, re-signs it (so that
verification passes and the reader itself is what is tested) and restores it. The only
acceptable outcomes: the restore works, or it raises a savepoints error (a clear message
naming the save point). Any other exception, a crash or a hang is a bug.

The re-signing is this file's own, written from the manifest's documented format (each
file's size and BLAKE3 hash; the manifest's own hash, last, over its bytes with that
field's value as 64 zeros), not borrowed from the package's internals. Two guards keep it
honest: every example checks that the re-signed save point verifies, so it reaches the
reader instead of being refused at verification (a broken re-sign would otherwise turn
every example into the "expected" error and the fuzzing would pass without fuzzing
anything); and a control per target re-signs an unchanged file, or a different but
equivalent one, and must restore exactly what was saved.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from savepoints import SavePoint, SavePoints, SavePointsError, verify

MANIFEST = "savepoint.json"
WEIGHTS = "model.safetensors"
OPTIMIZER = "training_state/optimizer.json"
HASH_FIELD = "manifest_hash"

FUZZ = settings(max_examples=150, deadline=None)
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


def objects(seed: int, trained: bool = True) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    opt = torch.optim.AdamW(net.parameters())
    if trained:
        net(torch.randn(2, 8)).sum().backward()
        opt.step()
    return net, opt


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, torch.nn.Module, torch.optim.Optimizer]:
    """A save point, with the model and optimizer it holds."""
    net, opt = objects(0)
    with SavePoints(tmp_path_factory.mktemp("fuzz") / "run") as points:
        return points.save(1, model=net, optimizer=opt, state={"step": 1}).path, net, opt


@pytest.fixture(scope="module")
def pristine(saved) -> Path:
    return saved[0]


@pytest.fixture(scope="module")
def compacted(pristine, tmp_path_factory) -> Path:
    """The same save point, compacted (its tensor files are .zbg files)."""
    pytest.importorskip("zstandard")
    run = tmp_path_factory.mktemp("fuzz-compacted") / "run"
    shutil.copytree(pristine.parent, run)
    with SavePoints(run) as points:
        return points.compact(1).path


def zbg_of(folder: Path, original: str) -> str:
    packed = SavePoint.open(folder).contents["compacted"]
    return next(rel for rel, info in packed.items() if info["of"] == original)


def resign(folder: Path, rel: str) -> None:
    """Make the manifest of ``folder`` vouch for the current bytes of ``rel``."""
    manifest = folder / MANIFEST
    data = json.loads(manifest.read_text())
    content = (folder / rel).read_bytes()
    data["files"][rel] = {"size": len(content), "hash": blake3.blake3(content).hexdigest()}
    data.pop(HASH_FIELD, None)
    data[HASH_FIELD] = "0" * 64  # last
    raw = json.dumps(data, indent=1).encode()
    at = raw.rindex(f'"{HASH_FIELD}": "'.encode()) + len(HASH_FIELD) + 5
    manifest.write_bytes(raw[:at] + blake3.blake3(raw).hexdigest().encode() + raw[at + 64 :])


Outcome = tuple[str, torch.nn.Module, torch.optim.Optimizer]


def restore_with(pristine: Path, work: Path, rel: str, content: bytes) -> Outcome:
    """Copy the save point, put ``content`` at ``rel``, re-sign, restore: only a
    savepoints error may come out. Returns "restored" or "refused", and the objects."""
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(pristine, work)
    (work / rel).chmod(0o644)
    (work / rel).write_bytes(content)
    resign(work, rel)
    report = verify(work)
    # Refused here, the example would never reach the reader it is meant to test.
    assert report.ok, f"the re-signed save point does not verify: {report.all_problems()}"
    # Other weights and no optimizer state: a restore must replace all of them.
    net, opt = objects(1, trained=False)
    try:
        SavePoints(work.parent, readonly=True).restore(work, model=net, optimizer=opt)
    except SavePointsError:
        return "refused", net, opt
    return "restored", net, opt


def fuzz(example: Callable[..., str], **strategies: Any) -> Counter[str]:
    """Run ``example`` over the strategies; count and check its outcomes."""
    outcomes: Counter[str] = Counter()

    @FUZZ
    @given(**strategies)
    def run(**kw: Any) -> None:
        outcomes[example(**kw)] += 1

    run()
    print(dict(outcomes))  # with -s or -rA
    # Every one of them verified (see restore_with), so each reached the reader.
    assert sum(outcomes.values()) >= FUZZ.max_examples // 3, outcomes
    # Some inputs were broken enough for the reader to refuse: it was exercised.
    assert outcomes["refused"] > 0, outcomes
    return outcomes


def header_file(header: bytes, declared: int | None = None, tail: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header) if declared is None else declared) + header + tail


def split_safetensors(raw: bytes) -> tuple[bytes, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8 : 8 + n], raw[8 + n :]


def test_mutated_weights_files_never_escape_as_other_errors(pristine, tmp_path):
    original = (pristine / WEIGHTS).read_bytes()

    def example(edits: list[tuple[int, int]]) -> str:
        raw = bytearray(original)
        for pos, value in edits:
            raw[pos % len(raw)] = value
        return restore_with(pristine, tmp_path / "w", WEIGHTS, bytes(raw))[0]

    fuzz(
        example,
        edits=st.lists(
            st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6
        ),
    )


def test_arbitrary_safetensors_headers_are_refused_cleanly(pristine, tmp_path):
    def example(header: bytes, declared: int | None, tail: bytes) -> str:
        content = header_file(header, declared, tail)
        return restore_with(pristine, tmp_path / "h", WEIGHTS, content)[0]

    fuzz(
        example,
        header=json_values.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=200),
        declared=st.none() | st.integers(0, 2**64 - 1),
        tail=st.binary(max_size=300),
    )


def test_arbitrary_optimizer_json_is_refused_cleanly(pristine, tmp_path):
    def example(state: Any) -> str:
        content = json.dumps(state).encode()
        return restore_with(pristine, tmp_path / "o", OPTIMIZER, content)[0]

    fuzz(example, state=json_values)


def test_arbitrary_compacted_files_are_refused_cleanly(compacted, tmp_path):
    zbg = zbg_of(compacted, WEIGHTS)
    original = (compacted / zbg).read_bytes()

    def example(blob: bytes, keep: int) -> str:
        return restore_with(compacted, tmp_path / "cw", zbg, original[:keep] + blob)[0]

    fuzz(example, blob=st.binary(max_size=400), keep=st.integers(0, 400))


# ------------------------------------------------------------------ the controls


def unchanged(folder: Path, rel: str) -> bytes:
    return (folder / rel).read_bytes()


def padded_header(folder: Path, rel: str) -> bytes:
    """The same tensors, the header padded with spaces (as the safetensors format allows),
    built by the same helper the header fuzzing uses."""
    header, data = split_safetensors((folder / rel).read_bytes())
    return header_file(header + b" " * 8, None, data)


def reformatted_json(folder: Path, rel: str) -> bytes:
    """The same JSON value in other bytes (no indentation, keys in another order)."""
    return json.dumps(json.loads((folder / rel).read_text()), sort_keys=True).encode()


CONTROLS = {
    "weights unchanged": ("pristine", WEIGHTS, unchanged),
    "weights header padded": ("pristine", WEIGHTS, padded_header),
    "optimizer json unchanged": ("pristine", OPTIMIZER, unchanged),
    "optimizer json reformatted": ("pristine", OPTIMIZER, reformatted_json),
    "compacted weights unchanged": ("compacted", WEIGHTS, unchanged),
}


def same_state(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
        )
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same_state, a, b))
    return bool(a == b)


def control(folder: Path, work: Path, rel: str, make: Callable[[Path, str], bytes],
            net: torch.nn.Module, opt: torch.optim.Optimizer) -> None:  # fmt: skip
    content = make(folder, rel)
    outcome, got_net, got_opt = restore_with(folder, work, rel, content)
    assert outcome == "restored"
    assert same_state(got_net.state_dict(), net.state_dict())
    assert same_state(got_opt.state_dict(), opt.state_dict())


@pytest.mark.parametrize("name", CONTROLS)
def test_resigning_an_equivalent_file_restores_exactly_what_was_saved(
    request, saved, tmp_path, name
):
    """The control of each fuzz target: the same re-sign path, with content that is the
    saved file or an equivalent of it, must verify and restore the saved objects."""
    which, rel, make = CONTROLS[name]
    folder: Path = request.getfixturevalue(which)
    if which == "compacted":
        rel = zbg_of(folder, rel)
    else:
        assert make is unchanged or make(folder, rel) != unchanged(folder, rel)
    _, net, opt = saved
    control(folder, tmp_path / "ctl", rel, make, net, opt)


def test_a_broken_resign_fails_the_control(saved, tmp_path, monkeypatch):
    """The control is not vacuous: re-signs that do nothing, or forget the manifest's own
    hash, make it fail."""
    folder, net, opt = saved
    this = sys.modules[__name__]

    def nothing(folder: Path, rel: str) -> None:
        pass

    def files_only(folder: Path, rel: str) -> None:
        data = json.loads((folder / MANIFEST).read_text())
        content = (folder / rel).read_bytes()
        data["files"][rel] = {"size": len(content), "hash": blake3.blake3(content).hexdigest()}
        (folder / MANIFEST).write_text(json.dumps(data, indent=1))

    for broken in (nothing, files_only):
        monkeypatch.setattr(this, "resign", broken)
        with pytest.raises(AssertionError, match="does not verify"):
            control(folder, tmp_path / "ctl", OPTIMIZER, reformatted_json, net, opt)
