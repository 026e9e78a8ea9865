"""Publishing save points as model versions: git with real Git LFS (a bare repository
over file://, fresh clones loaded with from_pretrained) and the Hub (a recording fake
of HfApi: no Hub server exists here)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from savepoints import Keep, MissingDependencyError, SavePoint, SavePoints
from savepoints.cli import cli
from savepoints.errors import (
    CorruptSavePointError,
    DestinationMovedError,
    DirtyWorkingTreeError,
    NotAGitRepositoryError,
    NothingToPublishError,
    PublishedTagConflictError,
    ToolNotFoundError,
)
from savepoints.interop import git as git_publish
from savepoints.interop.publish import publish_git, publish_hub
from test_cli import invoke

HEAD_SHARD = "model-00006-of-00006.safetensors"  # the classification head: all that trains


def _has_git_lfs() -> bool:
    if shutil.which("git") is None:
        return False
    return subprocess.run(["git", "lfs", "version"], capture_output=True).returncode == 0


needs_lfs = pytest.mark.skipif(
    not _has_git_lfs(), reason="git-lfs is not installed (CI installs it: apt-get install git-lfs)"
)


@pytest.fixture(autouse=True)
def _hermetic_git(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """No user or system git configuration: no identity (savepoints supplies one), no
    global Git LFS filters (a clone holds pointers until `git lfs pull`)."""
    config = tmp_path_factory.getbasetemp() / "gitconfig"
    config.touch()
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(config))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """Steps 10, 20 (tagged "milestone", the best by eval_loss) and 30 of a tiny GPT-2
    classifier, one weights shard per layer; only the head changes from one to the next."""
    from transformers import AutoTokenizer, GPT2ForSequenceClassification

    from conftest import tiny_gpt2_config

    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(tiny_gpt2_config())
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    opt = torch.optim.AdamW(model.score.parameters(), lr=0.1)
    folder = tmp_path_factory.mktemp("publish") / "run"
    with SavePoints(
        folder, layer_shards_above=0, keep=Keep(metric="eval_loss", mode="min")
    ) as points:
        for step, loss in ((10, 0.9), (20, 0.5), (30, 0.7)):
            with torch.no_grad():
                model.score.weight.add_(0.25)
            tags = ["milestone"] if step == 20 else []
            points.save(step, model=model, tokenizer=tokenizer, optimizer=opt,
                        metrics={"eval_loss": loss}, tags=tags)  # fmt: skip
    return folder


def point(run: Path, step: int) -> SavePoint:
    return SavePoints(run, readonly=True).get(step)


def git(*args: str | Path, cwd: Path | None = None) -> str:
    proc = subprocess.run(["git", *map(str, args)], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def bare(tmp_path: Path, name: str = "models.git") -> tuple[Path, str]:
    path = tmp_path / name
    git("init", "-q", "--bare", "-b", "main", path)
    return path, path.as_uri()


def lfs_store(repo: Path) -> dict[str, int]:
    """The LFS objects a bare repository stores: {object id: bytes}."""
    return {p.name: p.stat().st_size for p in (repo / "lfs" / "objects").rglob("*") if p.is_file()}


def refs(repo: Path) -> str:
    return git("--git-dir", repo, "for-each-ref", "--format=%(refname) %(objectname)")


def clone_at(url: str, tag: str, where: Path) -> Path:
    """What a user does: clone, check out a version, fetch its LFS objects (with Git LFS
    set up, as `git lfs install` does once per machine: here for this clone only)."""
    git("clone", "-q", url, where)
    git("lfs", "install", "--local", cwd=where)
    git("checkout", "-q", tag, cwd=where)
    git("lfs", "pull", cwd=where)
    return where


def same_model_as(folder: Path, source: Path) -> bool:
    from transformers import AutoModelForSequenceClassification

    a = AutoModelForSequenceClassification.from_pretrained(folder).state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(source).state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------
# git


@needs_lfs
def test_a_second_version_adds_only_the_shard_that_changed_to_the_lfs_store(run, tmp_path):
    repo, url = bare(tmp_path)
    (first,) = publish_git(point(run, 10), url)
    after_one = lfs_store(repo)
    (second,) = publish_git(point(run, 20), url)
    after_two = lfs_store(repo)
    head = point(run, 20).manifest.files[HEAD_SHARD]
    assert len(after_one) == 6 and set(after_one) <= set(after_two)
    assert len(after_two) == len(after_one) + 1
    assert sum(after_two.values()) - sum(after_one.values()) == head.size
    assert (second.changed_files, second.changed_bytes) == (1, head.size)
    assert first.changed_files > second.changed_files
    # one commit and one annotated tag per version; the message names run, step, metrics
    log = git("--git-dir", repo, "log", "--format=%s", "main").splitlines()
    assert log == ["run: step 20 (eval_loss 0.5)", "run: step 10 (eval_loss 0.9)"]
    assert git("--git-dir", repo, "cat-file", "-t", "step-20") == "tag"
    assert second.tags == ("step-20", "milestone")
    assert git("--git-dir", repo, "rev-parse", "milestone^{commit}") == second.commit


@needs_lfs
def test_a_fresh_clone_of_a_tag_loads_with_from_pretrained_and_passes_lfs_fsck(run, tmp_path):
    from transformers import AutoTokenizer

    _, url = bare(tmp_path)
    publish_git([point(run, 10), point(run, 30)], url)
    clone = clone_at(url, "step-10", tmp_path / "clone")
    assert git("lfs", "fsck", cwd=clone).endswith("Git LFS fsck OK")
    assert same_model_as(clone, point(run, 10).path)
    assert not same_model_as(clone, point(run, 30).path)
    assert AutoTokenizer.from_pretrained(clone)("hello")["input_ids"]
    card = (clone / "README.md").read_text()
    assert "step 10" in card and "eval_loss" in card and "## Lineage" in card
    assert (clone / ".gitattributes").read_text() == (
        "*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    )


@needs_lfs
def test_by_default_the_training_state_stays_home_and_with_state_publishes_it(run, tmp_path):
    repo, url = bare(tmp_path, "model.git")
    publish_git(point(run, 20), url)
    files = git("--git-dir", repo, "ls-tree", "-r", "--name-only", "step-20").splitlines()
    assert HEAD_SHARD in files and "tokenizer.json" in files and "README.md" in files
    assert not [f for f in files if f.startswith("training_state/") or f == "savepoint.json"]

    _, full = bare(tmp_path, "full.git")
    publish_git(point(run, 20), full, with_state=True)
    clone = clone_at(full, "step-20", tmp_path / "clone")
    held = {p.relative_to(clone).as_posix() for p in clone.rglob("*") if ".git" not in p.parts}
    assert set(point(run, 20).manifest.files) <= held and "savepoint.json" in held
    assert SavePoint.open(clone).step == 20  # the manifest came along, so it is a save point
    optimizer = next(f for f in held if f.startswith("training_state/optimizer"))
    assert (clone / optimizer).read_bytes() == (point(run, 20).path / optimizer).read_bytes()


@needs_lfs
def test_lfs_objects_are_hard_links_to_the_save_point_and_never_hashed_twice(
    run, tmp_path, monkeypatch
):
    publish_git(point(run, 20), tmp_path / "first")
    assert (run / ".savepoints" / "publish" / "lfs-oids.json").is_file()

    def no_reading(*args: Any, **kw: Any) -> Any:
        raise AssertionError("a shard was hashed again")

    monkeypatch.setattr("savepoints.interop.lfs.read_hashes", no_reading)
    publish_git(point(run, 20), tmp_path / "second")  # another destination: same hashes
    source = point(run, 20).path / HEAD_SHARD
    oid = next(line.split(":")[1] for line in git("show", f"step-20:{HEAD_SHARD}",
               cwd=tmp_path / "second").splitlines() if line.startswith("oid"))  # fmt: skip
    stored = tmp_path / "second" / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
    assert os.path.samefile(stored, source)


@needs_lfs
def test_an_altered_shard_is_refused_even_when_its_hash_is_remembered(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    publish_git(point(copy, 30), bare(tmp_path, "a.git")[1])  # remembers its hashes
    shard = point(copy, 30).path / HEAD_SHARD
    shard.chmod(0o644)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    repo, url = bare(tmp_path, "b.git")
    with pytest.raises(CorruptSavePointError, match=f"{HEAD_SHARD}: altered"):
        publish_git(point(copy, 30), url)
    (copy / ".savepoints" / "publish" / "lfs-oids.json").unlink()
    with pytest.raises(CorruptSavePointError, match=f"{HEAD_SHARD}: altered"):
        publish_git(point(copy, 30), url)
    assert refs(repo) == "" and lfs_store(repo) == {}


@needs_lfs
def test_publishing_the_same_save_points_again_changes_nothing(run, tmp_path):
    repo, url = bare(tmp_path)
    publish_git([point(run, 10), point(run, 20)], url)
    before, store = refs(repo), lfs_store(repo)
    again = publish_git([point(run, 10), point(run, 20)], url)
    assert [r.already for r in again] == [True, True]
    assert refs(repo) == before and lfs_store(repo) == store


@needs_lfs
def test_a_tag_that_names_other_content_is_a_conflict_and_nothing_moves(run, tmp_path):
    repo, url = bare(tmp_path)
    (ten,) = publish_git(point(run, 10), url)
    git("--git-dir", repo, "tag", "step-30", ten.commit)  # someone tagged by hand
    before = refs(repo)
    with pytest.raises(PublishedTagConflictError, match="'step-30'.*model-00006") as caught:
        publish_git([point(run, 20), point(run, 30)], url)
    assert "--no-own-tags" in caught.value.hint
    assert refs(repo) == before


@needs_lfs
def test_a_publisher_that_lost_a_race_fails_and_keeps_nothing_then_a_rerun_succeeds(
    run, tmp_path, monkeypatch
):
    repo, url = bare(tmp_path)
    publish_git(point(run, 10), url)
    other = tmp_path / "other"
    git("clone", "-q", url, other)
    git("-c", "user.name=o", "-c", "user.email=o@x", "commit", "-q", "--allow-empty",
        "-m", "someone else", cwd=other)  # fmt: skip
    real_push = git_publish._push

    def push_after_the_other(*args: Any, **kw: Any) -> None:
        git("push", "-q", "--no-verify", "origin", "HEAD:main", cwd=other)  # lands first
        real_push(*args, **kw)

    monkeypatch.setattr(git_publish, "_push", push_after_the_other)
    with pytest.raises(DestinationMovedError, match="run the same command again|Run the same"):
        publish_git(point(run, 20), url)
    assert git("--git-dir", repo, "log", "-1", "--format=%s", "main") == "someone else"
    assert "step-20" not in refs(repo)
    monkeypatch.setattr(git_publish, "_push", real_push)
    (twenty,) = publish_git(point(run, 20), url)
    log = git("--git-dir", repo, "log", "--format=%s", "main").splitlines()
    assert log[:2] == ["run: step 20 (eval_loss 0.5)", "someone else"]
    assert git("--git-dir", repo, "rev-parse", "step-20^{commit}") == twenty.commit


@needs_lfs
def test_a_folder_becomes_a_working_repository_showing_the_last_version(run, tmp_path):
    local = tmp_path / "published"
    publish_git([point(run, 10), point(run, 20)], local)
    assert git("status", "--porcelain", cwd=local) == ""
    assert same_model_as(local, point(run, 20).path)
    assert git("lfs", "fsck", cwd=local).endswith("Git LFS fsck OK")
    (local / "notes.txt").write_text("mine")
    with pytest.raises(DirtyWorkingTreeError, match="notes.txt"):
        publish_git(point(run, 30), local)
    (local / "notes.txt").unlink()
    (thirty,) = publish_git(point(run, 30), local)
    assert git("rev-parse", "HEAD", cwd=local) == thirty.commit
    assert same_model_as(local, point(run, 30).path)


@needs_lfs
def test_what_is_not_a_repository_or_a_save_point_is_refused_clearly(run, tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "a.txt").write_text("a")
    with pytest.raises(NotAGitRepositoryError, match="neither empty nor a git repository"):
        publish_git(point(run, 10), tmp_path / "stuff")
    with pytest.raises(NotAGitRepositoryError, match="git cannot read it") as caught:
        publish_git(point(run, 10), (tmp_path / "absent.git").as_uri())
    assert "git init --bare" in caught.value.hint
    with pytest.raises(NothingToPublishError):
        publish_git([], tmp_path / "out")


def test_missing_git_lfs_is_a_typed_error_that_says_how_to_install_it(run, tmp_path, monkeypatch):
    real = shutil.which("git")
    if real is None:
        pytest.skip("git is not installed")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "git").write_text(
        f'#!/bin/sh\nif [ "$1" = lfs ]; then echo "git: \'lfs\' is not a git command" >&2; '
        f'exit 1; fi\nexec {real} "$@"\n'
    )
    (fake / "git").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(ToolNotFoundError, match="'git-lfs'") as caught:
        publish_git(point(run, 10), tmp_path / "out")
    assert "apt-get install git-lfs" in caught.value.hint
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ToolNotFoundError, match="'git'"):
        publish_git(point(run, 10), tmp_path / "out")


@needs_lfs
def test_the_cli_publishes_reports_and_maps_errors_to_exit_codes(run, tmp_path):
    repo, url = bare(tmp_path)
    code, out, err = invoke("publish", run, "10", "milestone", "--git", url, "--json")
    assert code == 0, err
    published = json.loads(out)
    assert [(p["step"], p["tags"], p["already"]) for p in published] == [
        (10, ["step-10"], False), (20, ["step-20", "milestone"], False),
    ]  # fmt: skip
    code, out, _ = invoke("publish", run, "--all", "--git", url)
    assert code == 0 and "already published" in out and "step-30" in out
    code, out, _ = invoke("publish", run, "30", "--git", repo)  # a bare repository's path
    assert code == 0 and "already published" in out
    assert "git checkout step-30 && git lfs pull" in out
    for args, status, said in (
        (["publish", run, "10"], 1, "--git DEST or --hub REPO_ID"),
        (["publish", run, "10", "--git", url, "--hub", "a/b"], 1, "one at a time"),
        (["publish", run, "99", "--git", url], 2, "has no save point 99"),
        (["publish", run, "--all", "10", "--git", url], 1, "exclude each other"),
        (["publish", run, "10", "--git", tmp_path / "absent.git"], 0, ""),  # a new folder
    ):
        code, out, err = invoke(*args)
        assert code == status and said in err and "Traceback" not in out + err, (args, err)
    git("--git-dir", repo, "tag", "-f", "step-30", "step-10")
    code, _, err = invoke("publish", run, "30", "--git", url)
    assert code == 1 and "error: Tag 'step-30'" in err and "hint:" in err


# --------------------------------------------------------------------------------------
# The Hub, through a fake HfApi that records every call


class FakeHTTPError(OSError):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.response = SimpleNamespace(status_code=status)


class FakeHub:
    """An in-memory Hub repository: commits as {path: bytes}, refs, and the calls made."""

    def __init__(self) -> None:
        self.created: list[tuple[str, Any]] = []
        self.commits: dict[str, dict[str, bytes]] = {}
        self.branches: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.calls: list[dict[str, Any]] = []
        self.before_commit: Any = None

    def create_repo(self, repo_id: str, *, private: Any = None, exist_ok: bool = False,
                    repo_type: str | None = None) -> None:  # fmt: skip
        self.created.append((repo_id, private))
        if "main" not in self.branches:  # the Hub's first commit: .gitattributes
            self._store({".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})

    def _store(self, files: dict[str, bytes], parent: str | None = None) -> str:
        oid = hashlib.sha1(repr((parent, sorted(files.items()))).encode()).hexdigest()
        self.commits[oid] = files
        self.branches["main"] = oid
        return oid

    def list_repo_refs(self, repo_id: str) -> Any:
        ref = lambda name, c: SimpleNamespace(name=name, target_commit=c)  # noqa: E731
        return SimpleNamespace(branches=[ref(n, c) for n, c in self.branches.items()],
                               tags=[ref(n, c) for n, c in self.tags.items()])  # fmt: skip

    def list_repo_tree(self, repo_id: str, *, revision: str, recursive: bool = False) -> Any:
        for path, data in self.commits[revision].items():
            lfs = path.endswith(".safetensors")
            yield SimpleNamespace(
                path=path, size=len(data),
                blob_id=hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
                lfs=SimpleNamespace(sha256=hashlib.sha256(data).hexdigest()) if lfs else None,
            )  # fmt: skip

    def create_commit(self, repo_id: str, *, operations: list[Any], commit_message: str,
                      commit_description: str, revision: str,
                      parent_commit: str | None) -> Any:  # fmt: skip
        self.calls.append({"ops": operations, "parent": parent_commit, "title": commit_message,
                           "body": commit_description})  # fmt: skip
        if self.before_commit is not None:
            self.before_commit()
        if parent_commit != self.branches.get(revision):
            raise FakeHTTPError(412)  # the Hub's answer to a stale parent_commit
        files = dict(self.commits[parent_commit]) if parent_commit else {}
        for op in operations:
            if hasattr(op, "path_or_fileobj"):
                with op.as_file() as f:
                    files[op.path_in_repo] = f.read()
            else:
                files.pop(op.path_in_repo)
        return SimpleNamespace(oid=self._store(files, parent_commit))

    def create_tag(self, repo_id: str, *, tag: str, tag_message: str, revision: str) -> None:
        assert tag not in self.tags
        self.tags[tag] = revision


def test_hub_versions_upload_only_what_changed_on_top_of_the_head_they_read(run):
    pytest.importorskip("huggingface_hub")
    fake = FakeHub()
    first = publish_hub(point(run, 10), "alice/sentiment", api=fake, private=True)
    start = fake.calls[0]
    assert fake.created == [("alice/sentiment", True)]
    uploaded = {op.path_in_repo for op in start["ops"]}
    assert HEAD_SHARD in uploaded and "README.md" in uploaded and "config.json" in uploaded
    assert not [p for p in uploaded if p.startswith("training_state/")]
    assert (
        start["title"] == "run: step 10 (eval_loss 0.9)" and "Savepoint-Step: 10" in start["body"]
    )
    head = fake.branches["main"]
    (second,) = publish_hub(point(run, 20), "alice/sentiment", api=fake)
    assert fake.calls[1]["parent"] == head  # concurrent publishers cannot overwrite
    assert {op.path_in_repo for op in fake.calls[1]["ops"]} == {HEAD_SHARD, "README.md"}
    assert fake.tags == {"step-10": first[0].commit, "step-20": second.commit,
                         "milestone": second.commit}  # fmt: skip
    files = fake.commits[second.commit]
    assert files[HEAD_SHARD] == (point(run, 20).path / HEAD_SHARD).read_bytes()
    assert ".gitattributes" in files  # the Hub's own is left as it is


def test_hub_republishing_writes_nothing_and_a_moved_head_is_a_clear_error(run):
    pytest.importorskip("huggingface_hub")
    fake = FakeHub()
    publish_hub([point(run, 10), point(run, 20)], "alice/sentiment", api=fake)
    calls, tags = len(fake.calls), dict(fake.tags)
    again = publish_hub([point(run, 10), point(run, 20)], "alice/sentiment", api=fake)
    assert [r.already for r in again] == [True, True]
    assert len(fake.calls) == calls and fake.tags == tags
    fake.before_commit = lambda: fake._store({"other.txt": b"x"}, fake.branches["main"])
    with pytest.raises(DestinationMovedError, match="alice/sentiment changed while publishing"):
        publish_hub(point(run, 30), "alice/sentiment", api=fake)
    assert "step-30" not in fake.tags
    fake.tags["step-30"] = fake.tags["step-10"]
    with pytest.raises(PublishedTagConflictError, match="'step-30'"):
        publish_hub(point(run, 30), "alice/sentiment", api=fake)


def test_hub_cli_private_uses_the_usual_token_and_without_the_package_names_the_extra(
    run, monkeypatch
):
    hf = pytest.importorskip("huggingface_hub")
    real = hf.HfApi
    fake = FakeHub()
    tokens: list[Any] = []
    monkeypatch.setattr(hf, "HfApi", lambda token=None: tokens.append(token) or fake)
    result = CliRunner().invoke(cli, ["publish", str(run), "best", "--hub", "alice/m", "--private"])
    assert result.exit_code == 0, result.stderr
    assert tokens == [None] and fake.created == [("alice/m", True)]  # HF_TOKEN / login
    assert set(fake.tags) == {"step-20", "milestone"} and "huggingface.co/alice/m" in result.stdout
    # The real client, with nothing listening: a clear error, not a traceback.
    unreachable = "http://127.0.0.1:9"  # the discard port: refused at once
    monkeypatch.setattr(hf, "HfApi", lambda token=None: real(endpoint=unreachable, token=token))
    result = CliRunner().invoke(cli, ["publish", str(run), "--hub", "alice/m"])
    assert result.exit_code == 1 and "Publishing to alice/m on the Hugging Face Hub failed" in (
        result.stderr
    )
    assert "hint: Log in with a token" in result.stderr and "Traceback" not in result.output
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(MissingDependencyError, match="huggingface_hub") as caught:
        publish_hub(point(run, 10), "alice/m")
    assert "pip install 'savepoints[hub]'" in caught.value.hint


@needs_lfs
def test_the_readme_publishing_example_publishes_every_save_point(
    run, tmp_path, monkeypatch, capsys
):
    from test_readme import python_blocks

    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tweets").symlink_to(run)
    monkeypatch.chdir(tmp_path)
    exec(compile(python_blocks()["Publishing"], "README.md", "exec"), {})
    steps = [p.step for p in SavePoints(run, readonly=True).list()]
    printed = capsys.readouterr().out.splitlines()
    assert [int(line.split()[0]) for line in printed] == steps
    tags = git("tag", "--list", cwd=tmp_path / "tweets-model").split()
    assert {f"step-{s}" for s in steps} <= set(tags)
