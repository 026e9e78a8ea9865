"""Pickle-free state: the safetensors writer and the JSON tree codec."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

from savepoints import UnserializableStateError
from savepoints.integrity import StreamHasher, hash_file
from savepoints.serialize import check_json, decode_tree, encode_tree, write_safetensors

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]


def test_written_file_is_standard_safetensors_and_hash_matches_the_bytes(tmp_path: Path):
    tensors = {f"t.{str(d).split('.')[1]}": (torch.randn(3, 5) * 10).to(d) for d in DTYPES}
    tensors["scalar"] = torch.tensor(3.5)
    tensors["empty"] = torch.zeros(0, 4)
    tensors["strided"] = torch.arange(20.0).reshape(4, 5).t()  # non-contiguous view
    h = StreamHasher()
    size = write_safetensors(tmp_path / "x.safetensors", tensors, {"format": "pt"}, hasher=h)
    assert size == (tmp_path / "x.safetensors").stat().st_size
    assert (size, h.hexdigest()) == hash_file(tmp_path / "x.safetensors")
    loaded = load_file(tmp_path / "x.safetensors")
    assert loaded.keys() == tensors.keys()
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype and torch.equal(loaded[k], t.contiguous()), k
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    header_len = struct.unpack("<Q", (tmp_path / "x.safetensors").read_bytes()[:8])[0]
    assert header_len % 8 == 0


def test_large_tensors_hash_the_same_in_the_pipeline(tmp_path: Path):
    big = {"w": torch.randn(3_000_000), "b": torch.randn(7), "v": torch.randn(20_000_000)}
    h = StreamHasher()
    write_safetensors(tmp_path / "x", big, None, hasher=h)
    assert hash_file(tmp_path / "x") == (h.size, h.hexdigest())


def test_same_state_gives_same_bytes(tmp_path: Path):
    a = {"b": torch.ones(4), "a": torch.zeros(2)}
    b = {"a": torch.zeros(2), "b": torch.ones(4)}
    write_safetensors(tmp_path / "1", a, None, hasher=StreamHasher())
    write_safetensors(tmp_path / "2", b, None, hasher=StreamHasher())
    assert (tmp_path / "1").read_bytes() == (tmp_path / "2").read_bytes()


@pytest.mark.parametrize("numel", [1000, 4_000_000], ids=["hashed-inline", "hashed-in-thread"])
def test_failed_write_leaves_no_file(tmp_path: Path, numel: int):
    class Boom(StreamHasher):
        def update(self, data):
            if len(data) > 100:
                raise OSError(28, "No space left on device")
            super().update(data)

    with pytest.raises(OSError):
        write_safetensors(tmp_path / "x", {"a": torch.ones(numel)}, None, hasher=Boom())
    assert not (tmp_path / "x").exists()


def test_tree_codec_keeps_tuples_int_keys_and_nonfinite_floats():
    tree = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 2)}, 1: {}},
        "param_groups": [
            {
                "lr": 1e-3,
                "betas": (0.9, 0.999),
                "params": [0, 1],
                "fused": None,
                "best": float("inf"),
                "worst": float("-inf"),
                "nan": float("nan"),
            }
        ],
        "rng": ("MT19937", np.arange(5, dtype=np.uint32), 3, 0, 0.0),
        "dtype": torch.bfloat16,
        "np_scalar": np.float32(1.5),
    }
    skeleton, tensors = encode_tree(tree, "test")
    json.dumps(skeleton, allow_nan=False)  # strict JSON
    back = decode_tree(json.loads(json.dumps(skeleton)), tensors)
    assert set(back["state"]) == {0, 1}
    assert torch.equal(back["state"][0]["exp_avg"], tree["state"][0]["exp_avg"])
    g = back["param_groups"][0]
    assert g["betas"] == (0.9, 0.999) and isinstance(g["betas"], tuple)
    assert g["best"] == math.inf and g["worst"] == -math.inf and math.isnan(g["nan"])
    assert back["rng"][0] == "MT19937" and back["rng"][1].dtype == np.uint32
    assert np.array_equal(back["rng"][1], tree["rng"][1])
    assert back["dtype"] is torch.bfloat16 and back["np_scalar"] == 1.5


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ({"ok": 1, "fn": lambda: 0}, "fn"),
        ({"outer": {"inner": [1, object()]}}, "outer.inner.1"),
        ({"s": {1, 2}}, "s"),
    ],
)
def test_unpicklable_free_value_is_refused_with_its_key(value, key):
    with pytest.raises(UnserializableStateError) as err:
        encode_tree(value, "optimizer state")
    assert err.value.key == key
    assert key in str(err.value) and "pickle" in str(err.value)
    assert isinstance(err.value, TypeError)


def test_check_json_converts_tuples_and_names_bad_keys():
    assert check_json({"a": (1, 2), "b": np.int64(3)}, "state") == {"a": [1, 2], "b": 3}
    with pytest.raises(UnserializableStateError, match=r"'loader\.sampler'"):
        check_json({"loader": {"sampler": object()}}, "state")
    with pytest.raises(UnserializableStateError, match="finite"):
        check_json({"x": float("nan")}, "state")
    with pytest.raises(UnserializableStateError, match="keys must be strings"):
        check_json({1: "a"}, "state")


json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**62), max_value=2**62),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
trees = st.recursive(
    json_leaf,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.tuples(children, children),
        st.dictionaries(st.text(max_size=5), children, max_size=4),
        st.dictionaries(st.integers(-5, 5), children, max_size=3),
    ),
    max_leaves=20,
)


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@settings(max_examples=200, deadline=None)
@given(trees)
def test_any_tree_of_json_values_round_trips_exactly(tree):
    skeleton, tensors = encode_tree(tree, "fuzz")
    text = json.dumps(skeleton, allow_nan=False)
    assert _same(decode_tree(json.loads(text), tensors), tree)
