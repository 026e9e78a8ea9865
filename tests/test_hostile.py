"""Hostile save points: crafted by someone who can write the run folder.

Each variant below is a real save point changed by an attacker who also re-signs it
(recomputes the file hashes and the manifest's own hash), so that only our checks stand
between it and the reader. For each one, opening, listing, verifying, restoring (with
and without verification), `show`, `verify`, `list` and `export` must: run no code (a
pickle payload would create a marker file), read nothing outside the run and write
nothing outside the run or the export target (watched by the kernel, with inotify, so
reads by safetensors' Rust code count too), and fail, if they fail, with a savepoints
error (a one-line message and exit code in the CLI, never a traceback).
"""

from __future__ import annotations

import ctypes
import json
import os
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from conftest import tiny_gpt2_config
from savepoints import SavePoint, SavePoints, SavePointsError, verify
from savepoints.cli import cli
from savepoints.integrity import hash_file
from savepoints.layout import MANIFEST_NAME
from savepoints.manifest import encode_manifest_json

# -------------------------------------------------------------------- kernel watch

IN_ALL_EVENTS = 0xFFF
IN_ISDIR = 0x40000000


class Watch:
    """inotify on a few folders: every open, read, write, create... of their entries."""

    def __init__(self, *folders: Path) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK)
        if self.fd < 0:
            pytest.skip("inotify is not available here")
        self.folders: dict[int, Path] = {}
        for folder in folders:
            wd = self.libc.inotify_add_watch(self.fd, str(folder).encode(), IN_ALL_EVENTS)
            assert wd >= 0, f"cannot watch {folder}"
            self.folders[wd] = folder

    def events(self) -> list[tuple[Path, str, int]]:
        out = []
        while True:
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return out
            pos = 0
            while pos < len(buf):
                wd, mask, _cookie, size = struct.unpack_from("iIII", buf, pos)
                name = buf[pos + 16 : pos + 16 + size].rstrip(b"\0").decode()
                out.append((self.folders.get(wd, Path("?")), name, mask))
                pos += 16 + size

    def close(self) -> None:
        os.close(self.fd)


# -------------------------------------------------------------------- the variants


class Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def resign(folder: Path, edit: Callable[[dict], None] | None = None, rehash: bool = True) -> None:
    """What an attacker with write access does after changing files: recompute every
    listed file's size and hash (where it is a regular file inside), then the manifest's
    own hash."""
    data = json.loads((folder / MANIFEST_NAME).read_text())
    if edit is not None:
        edit(data)
    if rehash:
        for rel in list(data["files"]):
            path = folder / rel
            if (path.is_file() or path.is_symlink()) and not rel.startswith(("/", "..")):
                try:
                    size, digest = hash_file(path)
                except OSError:
                    continue
                data["files"][rel] = {"size": size, "hash": digest}
    (folder / MANIFEST_NAME).write_bytes(encode_manifest_json(data))


def add_file(folder: Path, rel: str, content: bytes, contents_key: str | None = None):
    (folder / rel).parent.mkdir(parents=True, exist_ok=True)
    (folder / rel).write_bytes(content)

    def edit(data: dict) -> None:
        data["files"][rel] = {"size": 0, "hash": ""}
        if contents_key is not None:
            data["contents"][contents_key]["files"] = [rel]

    resign(folder, edit)


def _model_read_from(rel: str, bait: Path) -> Callable[[dict], None]:
    """A manifest edit: list ``rel`` (outside the folder) with the bait's true hash and
    make the model be read from it."""

    def edit(data: dict) -> None:
        size, digest = hash_file(bait / "secret.safetensors")
        data["files"][rel] = {"size": size, "hash": digest}
        data["contents"]["model"]["files"] = [rel]

    return edit


def v_traversal(sp: Path, bait: Path, marker: Path) -> None:
    resign(sp, _model_read_from("../../bait/secret.safetensors", bait))


def v_absolute(sp: Path, bait: Path, marker: Path) -> None:
    resign(sp, _model_read_from(str(bait / "secret.safetensors"), bait))


def v_contents_unlisted(sp: Path, bait: Path, marker: Path) -> None:
    def edit(data: dict) -> None:
        data["contents"]["optimizer"]["files"] = [
            "../../bait/state/optimizer.json", "../../bait/state/optimizer.safetensors"
        ]  # fmt: skip

    resign(sp, edit)


def v_symlink_file(sp: Path, bait: Path, marker: Path) -> None:
    (sp / "model.safetensors").unlink()
    (sp / "model.safetensors").symlink_to(bait / "secret.safetensors")
    resign(sp)


def v_symlink_dir(sp: Path, bait: Path, marker: Path) -> None:
    shutil.rmtree(sp / "training_state")
    (sp / "training_state").symlink_to(bait / "state", target_is_directory=True)
    resign(sp)


def v_huge_header(sp: Path, bait: Path, marker: Path) -> None:
    (sp / "model.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}" * 16)
    resign(sp)


def v_malformed_header(sp: Path, bait: Path, marker: Path) -> None:
    header = b'{"transformer.wte.weight": {"dtype": "F32", "shape": [1000000, 1000], '
    header += b'"data_offsets": [0, 4000000000]}}'
    (sp / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    resign(sp)


def v_garbage_weights(sp: Path, bait: Path, marker: Path) -> None:
    (sp / "model.safetensors").write_bytes(os.urandom(4096))
    resign(sp)


def v_deep_state_json(sp: Path, bait: Path, marker: Path) -> None:
    (sp / "training_state" / "optimizer.json").write_text("[" * 200_000 + "]" * 200_000)
    resign(sp)


def v_deep_manifest(sp: Path, bait: Path, marker: Path) -> None:
    raw = (sp / MANIFEST_NAME).read_bytes()
    deep = b'"state": {"x": ' + b"[" * 200_000 + b"]" * 200_000 + b","
    (sp / MANIFEST_NAME).write_bytes(raw.replace(b'"state": {', deep, 1))


def v_enormous_manifest(sp: Path, bait: Path, marker: Path) -> None:
    with open(sp / MANIFEST_NAME, "r+b") as f:
        f.truncate(80 * 1024 * 1024)  # sparse: costs no disk, refused unread


def v_dtype_attribute(sp: Path, bait: Path, marker: Path) -> None:
    path = sp / "training_state" / "optimizer.json"
    data = json.loads(path.read_text())
    data["param_groups"][0]["lr"] = {"__sp__": "dtype", "name": "load"}
    path.write_text(json.dumps(data))
    resign(sp)


def v_pickles(sp: Path, bait: Path, marker: Path) -> None:
    blob = pickle.dumps(Payload(marker))
    add_file(sp, "pytorch_model.bin", blob)
    add_file(sp, "training_state/optimizer.pt", blob, contents_key="optimizer")


def v_pickle_as_weights(sp: Path, bait: Path, marker: Path) -> None:
    add_file(sp, "pytorch_model.bin", pickle.dumps(Payload(marker)), contents_key="model")


def v_compacted_escape(sp: Path, bait: Path, marker: Path) -> None:
    def edit(data: dict) -> None:
        data["contents"]["compacted"] = {
            "model.safetensors": {"of": "../../bait/overwritten", "size": 1, "hash": "0" * 64}
        }

    resign(sp, edit)


VARIANTS = {f.__name__[2:]: f for f in (
    v_traversal, v_absolute, v_contents_unlisted, v_symlink_file, v_symlink_dir,
    v_huge_header, v_malformed_header, v_garbage_weights, v_deep_state_json, v_deep_manifest,
    v_enormous_manifest, v_dtype_attribute, v_pickles, v_pickle_as_weights, v_compacted_escape,
)}  # fmt: skip


FAILS_VERIFY = {
    "traversal", "absolute", "contents_unlisted", "symlink_file", "symlink_dir",
    "deep_manifest", "enormous_manifest", "compacted_escape",
}  # fmt: skip

# An hf bundle ships no training state: these export fine, and rightly so.
TRAINING_STATE_ONLY = {"deep_state_json", "dtype_attribute"}

# -------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tokenizer_dir) -> Path:
    from transformers import AutoTokenizer, GPT2ForSequenceClassification

    base = tmp_path_factory.mktemp("pristine")
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(tiny_gpt2_config(num_labels=3))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([1])).loss.backward()
    opt.step()
    with SavePoints(base / "run") as points:
        sp = points.save(5, model=model, optimizer=opt,
                         tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir))  # fmt: skip
    return sp.path


def make_model():
    from transformers import GPT2ForSequenceClassification

    model = GPT2ForSequenceClassification(tiny_gpt2_config(num_labels=3))
    return model, torch.optim.AdamW(model.parameters())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hostile_save_point_runs_no_code_and_touches_nothing_outside(tmp_path, pristine, variant):
    root = tmp_path / "root"
    run, bait, marker, out = root / "run", tmp_path / "bait", tmp_path / "PWNED", root / "out"
    (bait / "state").mkdir(parents=True)
    sd = {k: v.clone() for k, v in make_model()[0].state_dict().items()}
    save_file({k: torch.ones_like(v) for k, v in sd.items() if "wte" in k or "score" in k},
              str(bait / "secret.safetensors"))  # fmt: skip
    shutil.copy(pristine / "training_state" / "optimizer.json", bait / "state" / "optimizer.json")
    shutil.copy(pristine / "training_state" / "optimizer.safetensors",
                bait / "state" / "optimizer.safetensors")  # fmt: skip
    shutil.copytree(pristine.parent, run, symlinks=True)
    sp = run / pristine.name
    VARIANTS[variant](sp, bait, marker)

    watch = Watch(tmp_path, bait, bait / "state", root)
    outcomes: dict[str, str] = {}

    def attempt(name: str, fn: Callable[[], object]) -> None:
        try:
            fn()
            outcomes[name] = "ok"
        except SavePointsError as e:
            outcomes[name] = f"refused: {type(e).__name__}"
        except Exception as e:  # anything else is a finding
            outcomes[name] = f"CRASH {type(e).__name__}: {e}"

    model, opt = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attempt("open", lambda: SavePoint.open(sp))
    attempt("verify", lambda: verify(sp).raise_if_failed())
    attempt("list", lambda: SavePoints(run, readonly=True).list())
    attempt("restore", lambda: SavePoints(run, readonly=True).restore(sp, model=model,
                                                                       optimizer=opt))  # fmt: skip
    unverified = make_model()[0]
    attempt("restore-unverified", lambda: SavePoints(run, readonly=True).restore(
        sp, model=unverified, optimizer=torch.optim.AdamW(unverified.parameters()),
        verify=False))  # fmt: skip
    runner = CliRunner()
    for name, args in (("cli show", ["show", str(sp)]), ("cli verify", ["verify", str(sp)]),
                       ("cli list", ["list", str(run)]),
                       ("cli export", ["export", str(sp), str(out)])):  # fmt: skip
        result = runner.invoke(cli, args)
        text = result.output + (result.stderr if result.stderr_bytes else "")
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            outcomes[name] = f"CRASH {type(result.exception).__name__}: {result.exception}"
        else:
            outcomes[name] = "ok" if result.exit_code == 0 else f"exit {result.exit_code}"
            assert "Traceback" not in text, text
    events = watch.events()
    watch.close()

    assert not marker.exists(), "a pickle payload ran"
    assert not [o for o in outcomes.values() if o.startswith("CRASH")], outcomes
    allowed_in_root = ("", "run", "out")  # "": listing root itself, where out is made
    outside = [
        (str(f), n, hex(m))
        for f, n, m in events
        if f in (bait, bait / "state")
        or (f == tmp_path and n != "root")
        or (f == root and n not in allowed_in_root and not n.startswith(".out."))
    ]
    assert outside == [], outside
    # Re-signed files of a bad format pass the integrity check (their hashes are right);
    # everything that reaches outside the folder, or breaks the manifest, fails it.
    if variant in FAILS_VERIFY:
        assert outcomes["verify"] != "ok" and outcomes["cli verify"] == "exit 3", outcomes
    # Loading and exporting refuse every one of them.
    assert outcomes["restore"] != "ok" and outcomes["restore-unverified"] != "ok", outcomes
    assert outcomes["cli export"] != "ok" or variant in TRAINING_STATE_ONLY, outcomes
    if outcomes["restore"] != "ok":
        # refused before a single weight changed
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    secret = {k for k in sd if "wte" in k or "score" in k}
    for m in (model, unverified):  # never the bait's weights
        assert not any(torch.equal(m.state_dict()[k], torch.ones_like(sd[k])) for k in secret)
