"""Lineage in the manifest: code commit, data fingerprint, command, host, the chain of
save points across resumes; printed by `show`, the model card and the ONNX card."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import blake3
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import savepoints
from savepoints import InvalidArgumentError, ManifestError, SavePoint, SavePoints
from savepoints.cli import cli
from savepoints.export import export, model_card
from savepoints.lineage import (
    MAX_CHAIN_STEPS,
    Ancestry,
    _without_credentials,
    card_command,
    describe_chain,
    lineage_rows,
    probe_code,
)
from savepoints.manifest import encode_manifest_json, parse_manifest

GIT = shutil.which("git")
needs_git = pytest.mark.skipif(GIT is None, reason="needs git")
DEMO = Path(__file__).resolve().parents[1] / "src" / "savepoints" / "data" / "demo_tweets.csv"


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip


def make_repo(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True)
    git(folder, "init", "-q", "-b", "main")
    for name, text in files.items():
        (folder / name).write_text(text)
    git(folder, "add", ".")
    git(folder, "commit", "-q", "-m", "first")
    return folder


def lineage_json(run: Path, step: int) -> dict:
    return json.loads((run / f"step-{step:08d}" / "savepoint.json").read_text())["lineage"]


def invoke(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout


def save_steps(run: Path, steps: list[int], **options) -> None:
    net = torch.nn.Linear(2, 2)
    with SavePoints(run, **options) as points:
        if points.latest() is not None:
            points.restore(model=net)
        for step in steps:
            points.save(step, model=net)


SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from savepoints import SavePoints

    net = torch.nn.Linear(2, 2)
    with SavePoints(sys.argv[1], data_files=[sys.argv[2]]) as points:
        if points.latest() is not None:
            points.restore(model=net)
        for step in map(int, sys.argv[3:]):
            points.save(step, model=net)
""")


@needs_git
def test_a_script_in_a_repository_records_its_commit_dirty_flag_and_resumes_in_show(tmp_path):
    repo = make_repo(tmp_path / "repo", {"train.py": SCRIPT, "data.txt": "one\ntwo\n"})
    run, data = tmp_path / "run", repo / "data.txt"
    elsewhere = tmp_path / "elsewhere"  # the working directory: not the repository
    elsewhere.mkdir()

    def train(*steps: int) -> None:
        done = subprocess.run(
            [sys.executable, str(repo / "train.py"), str(run), str(data), *map(str, steps)],
            cwd=elsewhere, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]

    train(10, 20)
    head = git(repo, "rev-parse", "HEAD")
    first = lineage_json(run, 20)
    assert first["code"] == {
        "commit": head, "dirty": False, "branch": "main", "root": str(repo.resolve()),
    }  # fmt: skip
    assert first["command"] == ["train.py", str(run), str(data), "10", "20"]
    digest = blake3.blake3(data.read_bytes()).hexdigest()
    assert first["data"]["files"] == [{"path": str(data), "size": 8, "blake3": digest}]
    assert first["chain"] == [{"session": first["session"], "steps": [20, 10], "from": None}]

    with open(repo / "train.py", "a") as f:  # a tracked file changes: the code is dirty
        f.write("# tuned\n")
    train(30, 40)
    second = lineage_json(run, 40)
    assert second["code"]["commit"] == head and second["code"]["dirty"] is True
    assert second["data"] == first["data"]
    assert second["session"] != first["session"]
    assert second["chain"] == [
        {"session": second["session"], "steps": [40, 30], "from": {"step": 20}},
        {"session": first["session"], "steps": [20, 10], "from": None},
    ]
    # The sessions are the journal's: each manifest points at its process's lines.
    from savepoints.journal import read_journal

    opened = [e for e in read_journal(run) if e["event"] == "open"]
    assert [e["session"] for e in opened] == [first["session"], second["session"]]

    code, out = invoke("show", run, "40")
    assert code == 0
    text = " ".join(out.split())
    assert f"git {head} (main, uncommitted changes)" in text
    assert "step 40 ← 30 (session" in text and "↑ resumed from step 20" in text
    assert "step 20 ← 10" in text and "started afresh" in text
    assert f"fingerprint {second['data']['fingerprint']}" in text and "data.txt" in text
    code, out = invoke("show", run, "40", "--json")
    assert code == 0 and json.loads(out)["lineage"] == second


@needs_git
def test_git_state_is_read_from_the_repository_with_credentials_left_out(tmp_path, monkeypatch):
    repo = make_repo(tmp_path / "repo", {"a.py": "x = 1\n"})
    git(repo, "remote", "add", "origin", "https://alice:ghp_secret@example.org/alice/repo.git")
    (repo / "untracked.txt").write_text("not part of the code\n")
    found = probe_code(repo / ".")
    assert found == {
        "commit": git(repo, "rev-parse", "HEAD"), "dirty": False, "branch": "main",
        "root": str(repo.resolve()), "remote": "https://example.org/alice/repo.git",
    }  # fmt: skip
    (repo / "a.py").write_text("x = 2\n")
    assert probe_code(repo)["dirty"] is True
    git(repo, "checkout", "-q", "--detach")
    assert "branch" not in probe_code(repo)
    assert _without_credentials("git@github.com:alice/repo.git") == "git@github.com:alice/repo.git"
    # Outside a repository, in one without a commit, and without git: no code entry.
    (tmp_path / "plain").mkdir()
    assert probe_code(tmp_path / "plain") is None
    git(tmp_path, "init", "-q", "empty")
    assert probe_code(tmp_path / "empty") is None
    monkeypatch.setenv("PATH", str(tmp_path / "plain"))
    assert probe_code(repo) is None


def test_outside_any_repository_a_save_has_no_code_entry_and_show_says_so(tmp_path, monkeypatch):
    # pytest is an installed program: the working directory is where git would look.
    monkeypatch.chdir(tmp_path)
    save_steps(tmp_path / "run", [1])
    lineage = SavePoints(tmp_path / "run", readonly=True).get(1).manifest.lineage
    assert lineage is not None and lineage.code is None and lineage.host
    code, out = invoke("show", tmp_path / "run", "1")
    assert code == 0 and "no git commit recorded" in out


@needs_git
def test_a_failing_git_costs_a_warning_once_never_a_save(tmp_path, monkeypatch, caplog):
    repo = make_repo(tmp_path / "repo", {"a.py": "x = 1\n"})
    (repo / ".git" / "index").write_bytes(b"not an index")  # `git status` fails on it
    monkeypatch.chdir(repo)
    with caplog.at_level(logging.WARNING, logger="savepoints"):
        save_steps(tmp_path / "run", [1])
        save_steps(tmp_path / "run2", [1])
    for run in ("run", "run2"):
        lineage = SavePoint.open(tmp_path / run / "step-00000001").manifest.lineage
        assert lineage is not None and lineage.code is None and lineage.chain
    said = [r.message for r in caplog.records if "git commit" in r.message]
    assert len(said) == 1 and "it is left out" in said[0]


def test_data_fingerprint_follows_the_bytes_not_where_they_lie(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("text,label\nhi,1\n")
    b.write_text("text,label\nho,0\n")
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "0.arrow").write_bytes(b"\x00" * 10)
    (folder / "1.arrow").write_bytes(b"\x01" * 5)

    def fingerprint(name: str, files: list[Path]) -> dict:
        save_steps(tmp_path / name, [1], data_files=files)
        return lineage_json(tmp_path / name, 1)["data"]

    first = fingerprint("r1", [a, b, folder])
    assert [Path(f["path"]).name for f in first["files"]] == ["a.csv", "b.csv", "shards"]
    assert first["files"][2]["size"] == 15 and first["files"][2]["files"] == 2
    assert fingerprint("r2", [a, b, folder]) == first
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copytree(folder, moved / "shards")
    again = fingerprint("r3", [shutil.copy(a, moved), shutil.copy(b, moved), moved / "shards"])
    assert again["fingerprint"] == first["fingerprint"] and again != first
    b.write_text("text,label\nho,1\n")  # one changed byte
    assert fingerprint("r4", [a, b, folder])["fingerprint"] != first["fingerprint"]
    (folder / "1.arrow").write_bytes(b"\x02" * 5)
    assert fingerprint("r5", [a, b, folder])["files"][2]["blake3"] != first["files"][2]["blake3"]
    assert fingerprint("r6", [b, a, folder])["fingerprint"] != first["fingerprint"]  # order


def test_data_files_that_are_not_there_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(InvalidArgumentError, match="data_files names .*missing.csv"):
        SavePoints(tmp_path / "run", data_files=["missing.csv"])
    with pytest.raises(InvalidArgumentError, match="not a path"):
        SavePoints(tmp_path / "run", data_files=[3])  # type: ignore[list-item]
    assert not (tmp_path / "run").exists()


def test_a_warm_start_from_another_runs_save_point_records_that_run(tmp_path):
    save_steps(tmp_path / "base", [5])
    net = torch.nn.Linear(2, 2)
    source = tmp_path / "base" / "step-00000005"
    with SavePoints(tmp_path / "tuned") as points:
        points.restore(source, model=net)
        points.save(6, model=net)
        points.save(7, model=net)
    base, tuned = lineage_json(tmp_path / "base", 5), lineage_json(tmp_path / "tuned", 7)
    assert tuned["chain"] == [
        {"session": tuned["session"], "steps": [7, 6],
         "from": {"step": 5, "path": str(source.resolve())}},
        *base["chain"],
    ]  # fmt: skip
    point = SavePoints(tmp_path / "tuned", readonly=True).get(7)
    assert point.parent == 6
    shown = describe_chain(point.manifest.lineage.chain, names_only=True)
    assert "↑ continued from step 5 of another run (base/step-00000005)" in shown


def test_a_manifest_without_lineage_still_loads_shows_and_resumes(tmp_path):
    run = tmp_path / "run"
    save_steps(run, [1])
    path = run / "step-00000001" / "savepoint.json"
    data = json.loads(path.read_bytes())
    del data["lineage"]  # as written before lineage existed
    path.write_bytes(encode_manifest_json(data))
    old = SavePoint.open(run / "step-00000001")
    assert old.manifest.lineage is None and old.verify().ok
    code, out = invoke("show", run, "1")
    assert code == 0 and "not recorded" in out
    assert "lineage" not in json.loads(invoke("show", run, "1", "--json")[1])
    save_steps(run, [2])  # resumes from the old one
    new = lineage_json(run, 2)
    assert new["chain"] == [{"session": new["session"], "steps": [2], "from": {"step": 1}}]
    code, out = invoke("show", run, "2")
    assert code == 0 and "(nothing recorded before it)" in out


def test_chain_grows_per_session_is_capped_and_survives_a_restore_within_a_session():
    ancestry = Ancestry()
    for step in range(1, 201):
        ancestry, chain = ancestry.then(step, "a")
    assert len(chain) == 1 and chain[0]["steps"][:2] == [200, 199]
    assert len(chain[0]["steps"]) == MAX_CHAIN_STEPS
    assert chain[0]["more"] == 200 - MAX_CHAIN_STEPS and chain[0]["from"] is None
    # A restore within the session continues the same link (no process boundary).
    from savepoints.manifest import Lineage, Manifest

    def manifest(step: int, chain) -> Manifest:
        return Manifest(step=step, created=None, files={}, lineage=Lineage(chain=chain))

    _, short = Ancestry().then(10, "a")
    _, again = Ancestry.restored(manifest(10, short)).then(30, "a")
    assert again == ({"session": "a", "steps": [30, 10], "from": None},)
    # Many resumes: the oldest links go, the newest always says where it came from.
    ancestry = Ancestry()
    for step in range(1, 100):  # every save by a new session: a resume after each
        ancestry, chain = ancestry.then(step, f"s{step}")
    assert len(chain) <= 32 and chain[0] == {"session": "s99", "steps": [99], "from": {"step": 98}}
    assert chain[-1]["from"] is not None  # older history was left out, and says so
    assert "(nothing recorded before it)" in describe_chain(chain)[-1]


@pytest.mark.parametrize(
    ("lineage", "fragment"),
    [
        ([], "'lineage' is not an object"),
        ({"code": {"dirty": "yes"}}, "'lineage.code.dirty'"),
        ({"code": {"commit": 1}}, "'lineage.code.commit'"),
        ({"command": "python train.py"}, "'lineage.command'"),
        ({"data": {"files": [{"path": "a", "size": -1, "blake3": "x"}]}}, "data.files[0]"),
        ({"chain": [{"steps": [1, True]}]}, "'lineage.chain[0]'.steps"),
        ({"chain": [{"steps": [1], "from": {"path": "/x"}}]}, "'lineage.chain[0]'.from"),
        ({"host": None}, "'lineage.host'"),
    ],
)
def test_lineage_of_the_wrong_shape_is_named_and_the_save_point_stays(
    good, tmp_path, lineage, fragment, caplog
):
    # Lineage is a record, never needed to load: a save point whose lineage another
    # writer shaped otherwise stays listed and restorable; the lineage is kept, unread.
    with caplog.at_level("WARNING", logger="savepoints"):
        manifest = parse_manifest({**good, "lineage": lineage}, tmp_path / "savepoint.json")
    assert manifest.lineage is None and manifest.to_json()["lineage"] == lineage
    assert fragment in caplog.text and "savepoint.json" in caplog.text


def test_unknown_lineage_keys_from_a_newer_writer_are_kept(good):
    lineage = {**good["lineage"], "container": "sha256:abc"}
    lineage["code"] = {**lineage.get("code", {}), "describe": "v1.2-3-gabc"}
    manifest = parse_manifest({**good, "lineage": lineage}, "x")
    assert manifest.to_json()["lineage"] == lineage


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict:
    """The JSON of a real manifest with every lineage field but code (which depends on
    where the tests run)."""
    run = tmp_path_factory.mktemp("good") / "run"
    save_steps(run, [3], data_files=[DEMO])
    return SavePoint.open(run / "step-00000003").manifest.to_json()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=3),
    max_leaves=8,
)  # fmt: skip
lineage_keys = st.sampled_from(["session", "code", "data", "command", "host", "chain", "x"])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzzed_lineage_parses_and_prints_or_is_a_manifest_error(good, data):
    lineage = dict(good["lineage"])
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(lineage_keys)
        if key in ("code", "data", "chain") and data.draw(st.booleans()):
            inner = data.draw(st.sampled_from(["commit", "dirty", "files", "steps", "from"]))
            lineage[key] = [{inner: data.draw(json_values)}] if key == "chain" else {
                inner: data.draw(json_values)}  # fmt: skip
        else:
            lineage[key] = data.draw(json_values)
    try:
        manifest = parse_manifest({**good, "lineage": lineage}, "fuzz")
    except ManifestError:
        return
    lineage_rows(manifest.lineage)
    SavePoint(Path("fuzz"), manifest)  # readers take it as it is
    from savepoints.export import card_lineage

    card_lineage(manifest.lineage)


def test_card_command_keeps_relative_paths_and_cuts_absolute_ones():
    assert card_command(["train.py", "/home/alice/data/train.csv", "--run=/srv/runs/x",
                         "--eval", "dev.csv", "~/secret/y.csv"]) == [
        "train.py", "train.csv", "--run=x", "--eval", "dev.csv", "y.csv"]  # fmt: skip


def _tiny_data(folder: Path) -> tuple[Path, Path]:
    lines = DEMO.read_text(encoding="utf-8").splitlines()
    train, valid = folder / "train.csv", folder / "valid.csv"
    # Every label in both: the sample is written label by label.
    train.write_text("\n".join([lines[0], *lines[1::6]]) + "\n", encoding="utf-8")
    valid.write_text("\n".join([lines[0], *lines[4::12]]) + "\n", encoding="utf-8")
    return train, valid


def test_savepoints_train_records_its_data_and_command_and_the_cards_print_them(tmp_path):
    pytest.importorskip("transformers")
    data = tmp_path / "data"
    data.mkdir()
    train, valid = _tiny_data(data)
    run = tmp_path / "run"
    args = ["train", str(train), "--eval", str(valid), "--run", str(run), "--epochs", "1",
            "--max-length", "16", "--save-every", "2"]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "savepoints", *args], capture_output=True, text=True,
        timeout=600, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    point = SavePoints(run, readonly=True).latest()
    lineage = point.manifest.lineage
    assert lineage is not None and lineage.command == ("python", "-m", "savepoints", *args)
    assert lineage.data is not None
    assert [(f["path"], f["size"], f["blake3"]) for f in lineage.data["files"]] == [
        (str(p), p.stat().st_size, blake3.blake3(p.read_bytes()).hexdigest())
        for p in (train, valid)
    ]
    # `python -m savepoints` of an installed savepoints asks git in the working directory
    # (in no repository here); of an editable checkout, in the checkout.
    checkout = Path(savepoints.__file__).resolve().parents[2]
    assert lineage.code is None or lineage.code["root"] == str(checkout)
    assert all(len(link.get("steps", [])) for link in lineage.chain)

    out = export(point, tmp_path / "bundle")
    card = (out / "README.md").read_text()
    lineage_part = card.split("## Lineage", 1)[1].split("## Use", 1)[0]
    assert f"- training data fingerprint (blake3): `{lineage.data['fingerprint']}`" in card
    assert f"  - `train.csv`: {train.stat().st_size} bytes, blake3 `" in lineage_part
    assert "- command: `python -m savepoints train train.csv --eval valid.csv --run run" in card
    assert "- history (newest first):" in lineage_part and "started afresh" in lineage_part
    for line in lineage_part.splitlines():
        if line.startswith(("- command", "  - `")):
            assert str(tmp_path) not in line  # the card names files; no folders of the host
    assert "host" not in lineage_part

    from savepoints.interop.onnx import Parity, onnx_card

    parity = Parity(texts=16, max_abs_diff=1e-6, agreement=1.0, quantize=None, tolerance=1e-4,
                    min_agreement=None)  # fmt: skip
    onnx = onnx_card(point, parity, None)
    assert "## Lineage" in onnx and lineage.data["fingerprint"] in onnx and "## ONNX" in onnx
    assert model_card(point, None).count("## Lineage") == 1


def test_python_m_savepoints_looks_for_the_code_where_it_is_run(tmp_path, monkeypatch):
    """`python -m savepoints train` runs savepoints' own __main__.py: the training code is
    the project it is run from, never savepoints' checkout."""
    import savepoints
    from savepoints.lineage import code_folder

    monkeypatch.chdir(tmp_path)
    entry = Path(savepoints.__file__).parent / "__main__.py"
    monkeypatch.setattr(sys, "argv", [str(entry), "train"])
    assert code_folder() == Path.cwd()
    script = tmp_path / "proj" / "train.py"
    script.parent.mkdir()
    script.write_text("")
    monkeypatch.setattr(sys, "argv", [str(script)])
    assert code_folder() == script.parent.resolve()


def test_secrets_on_the_command_line_are_masked_in_journal_and_manifests(tmp_path, monkeypatch):
    from savepoints.journal import redact_argv

    argv = ["train.py", "--hub_token", "hf_SECRET", "--hub-token=hf_X", "--password", "pw",
            "--api-key", "k", "--remote", "az://c/p?sig=SAS", "https://u:tok@host/x",
            "--lr", "1e-4", "--key", "private.pem"]  # fmt: skip
    assert redact_argv(argv) == [
        "train.py", "--hub_token", "***", "--hub-token=***", "--password", "***",
        "--api-key", "***", "--remote", "az://c/p?***", "https://host/x",
        "--lr", "1e-4", "--key", "private.pem",
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with SavePoints(tmp_path / "run", async_save=False) as points:
        point = points.save(1, model=torch.nn.Linear(2, 2))
    manifest = (point.path / "savepoint.json").read_text()
    journal = (tmp_path / "run" / ".savepoints" / "journal.jsonl").read_text()
    for secret in ("hf_SECRET", "hf_X", "SAS", "tok@", '"pw"'):
        assert secret not in manifest and secret not in journal


def test_only_the_first_save_point_waits_for_git_and_the_data(tmp_path, monkeypatch):
    import threading

    from savepoints import lineage as lineage_mod

    release = threading.Event()
    monkeypatch.setattr(lineage_mod, "data_state", lambda files: release.wait(30) and None)
    source = lineage_mod.LineageSource("s", (tmp_path,))
    thread = source._thread
    waits: list[float | None] = []

    class Watched:
        def join(self, timeout=None):
            waits.append(timeout)
            thread.join(0.01)  # still gathering: as if the wait ran out

        def is_alive(self):
            return thread.is_alive()

    source._thread = Watched()
    for _ in range(3):
        source.lineage(())
    release.set()
    assert waits == [lineage_mod.GATHER_WAIT]  # the first save point waited; no other did
