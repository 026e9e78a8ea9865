"""Publishing to git: commits built with git's plumbing, weights as Git LFS objects.

No ``git add``: blobs (pointers, small files, the card) are written with
``hash-object``, trees through a private index, commits with ``commit-tree`` and tags
with ``mktag``, so no filter re-reads a shard. Refs move only at the end: the branch by
compare-and-swap against the head we read, tags only if absent; a remote gets the LFS
objects first, then the branch and tags in one atomic push. A concurrent publisher
therefore makes the loser fail (:class:`~savepoints.errors.DestinationMovedError`),
never lose the other's work.

The destination is a local working repository (its checked-out branch advances, and
its working tree shows the last version), or a remote one (a URL, or the path of a bare
repository), worked on through a bare clone kept in ``RUN/.savepoints/publish/git/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from savepoints.atomic import remove_tree
from savepoints.errors import (
    DestinationMovedError,
    DirtyWorkingTreeError,
    InvalidArgumentError,
    NotAGitRepositoryError,
    PublishedTagConflictError,
    PublishError,
    ToolNotFoundError,
)
from savepoints.interop.lfs import LFS_ATTRIBUTES, place_object, pointer
from savepoints.interop.plan import (
    GITATTRIBUTES,
    Events,
    Published,
    Version,
    check_unread,
    differing,
)

_GIT_INSTALL = (
    "Install git: apt-get install git (Debian, Ubuntu), brew install git (macOS), or "
    "https://git-scm.com/downloads."
)
_LFS_INSTALL = (
    "Install Git LFS: apt-get install git-lfs (Debian, Ubuntu), brew install git-lfs "
    "(macOS), or https://git-lfs.com. Nothing else is needed: savepoints configures the "
    "repositories it publishes to."
)
#: The LFS filters for commands that check files out, whether or not ``git lfs install``
#: ever ran on this machine.
_LFS_FILTERS = ("-c", "filter.lfs.process=git-lfs filter-process",
                "-c", "filter.lfs.smudge=git-lfs smudge -- %f",
                "-c", "filter.lfs.clean=git-lfs clean -- %f",
                "-c", "filter.lfs.required=true")  # fmt: skip
# Variables that would point our commands at another repository than the one we name.
_GIT_LOCATION_VARS = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY",
                      "GIT_COMMON_DIR", "GIT_NAMESPACE")  # fmt: skip
_SCP_LIKE = re.compile(r"^[\w.+-]+@[\w.-]+:")


def is_git_url(dest: str) -> bool:
    """A repository URL (``file://``, ``https://``, ``ssh://``, ``git@host:path``), as
    opposed to a local path."""
    return "://" in dest or bool(_SCP_LIKE.match(dest))


class _Git:
    """git commands on one repository (``-C folder`` or ``--git-dir``), with errors that
    name the destination."""

    def __init__(self, location: list[str], dest: str) -> None:
        self.location = location
        self.dest = dest
        self.env = {k: v for k, v in os.environ.items() if k not in _GIT_LOCATION_VARS}
        self.env.update(GIT_TERMINAL_PROMPT="0", LC_ALL="C")

    def run(
        self,
        *args: str,
        input: bytes | None = None,
        env: dict[str, str] | None = None,
        check: bool = True,
        pre: tuple[str, ...] = (),
    ) -> subprocess.CompletedProcess[bytes]:
        cmd = ["git", *pre, *self.location, *args]
        proc = subprocess.run(
            cmd, input=input, capture_output=True, env={**self.env, **(env or {})}, check=False
        )
        if check and proc.returncode != 0:
            raise self.failed(args, proc)
        return proc

    def out(self, *args: str, **kw: Any) -> str:
        return self.run(*args, **kw).stdout.decode().strip()

    def failed(
        self, args: tuple[str, ...], proc: subprocess.CompletedProcess[bytes]
    ) -> PublishError:
        return PublishError(self.dest, f"git {args[0]} failed for {self.dest}: {_why(proc)}.")

    def commit_of(self, ref: str) -> str | None:
        proc = self.run("rev-parse", "-q", "--verify", f"{ref}^{{commit}}", check=False)
        return proc.stdout.decode().strip() if proc.returncode == 0 else None

    def tree(self, commit: str) -> dict[str, str]:
        """``{path: blob id}`` of every file in a commit."""
        raw = self.run("ls-tree", "-r", "-z", "--full-tree", commit).stdout.decode()
        out = {}
        for item in raw.split("\0"):
            if item:
                meta, path = item.split("\t", 1)
                out[path] = meta.split()[2]
        return out

    def write_blobs(self, contents: list[Path | bytes]) -> list[str]:
        """Store files and byte strings as blobs, as they are (no filter runs)."""
        with tempfile.TemporaryDirectory(prefix="savepoints-publish-") as tmp:
            paths = []
            for i, item in enumerate(contents):
                if isinstance(item, bytes):
                    path = Path(tmp) / str(i)
                    path.write_bytes(item)
                    item = path
                paths.append(os.path.abspath(item))  # git runs elsewhere (-C)
            out = self.out("hash-object", "-w", "--no-filters", "--stdin-paths",
                           input="".join(f"{p}\n" for p in paths).encode())  # fmt: skip
        ids = out.split()
        if len(ids) != len(paths):
            raise PublishError(
                self.dest, f"git hash-object stored {len(ids)} of {len(paths)} files."
            )
        return ids

    def write_tree(self, entries: dict[str, str]) -> str:
        with tempfile.TemporaryDirectory(prefix="savepoints-publish-") as tmp:
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            listing = "".join(f"100644 {sha}\t{path}\0" for path, sha in sorted(entries.items()))
            self.run("update-index", "-z", "--add", "--index-info", input=listing.encode(), env=env)
            return self.out("write-tree", env=env)

    def ident(self) -> str:
        return self.out("var", "GIT_COMMITTER_IDENT")

    def use_fallback_identity(self) -> None:
        """Commits need a name and an email: the user's git identity when there is one,
        else savepoints' own."""
        for who in ("AUTHOR", "COMMITTER"):
            if self.run("var", f"GIT_{who}_IDENT", check=False).returncode != 0:
                self.env.setdefault(f"GIT_{who}_NAME", "savepoints")
                self.env.setdefault(f"GIT_{who}_EMAIL", "savepoints@localhost")

    def blob(self, sha: str) -> bytes:
        return self.run("cat-file", "blob", sha).stdout

    def media_dir(self) -> Path:
        """Where this repository keeps LFS objects (``lfs.storage`` respected)."""
        for line in self.out("lfs", "env").splitlines():
            if line.startswith("LocalMediaDir="):
                return Path(line.split("=", 1)[1])
        raise PublishError(self.dest, f"git lfs env names no object folder for {self.dest}.")


def _why(proc: subprocess.CompletedProcess[bytes]) -> str:
    """The line of git's complaint that says what is wrong (its "fatal:" or "error:")."""
    said = [line.strip() for line in proc.stderr.decode(errors="replace").splitlines()]
    said = [line for line in said if line]
    for line in said:
        for mark in ("fatal: ", "error: "):
            if line.startswith(mark):
                return line.removeprefix(mark).rstrip(".")
    return said[-1].rstrip(".") if said else f"exit status {proc.returncode}"


def require_git() -> None:
    if shutil.which("git") is None:
        raise ToolNotFoundError("git", "Publishing to git", _GIT_INSTALL)
    proc = subprocess.run(["git", "lfs", "version"], capture_output=True, check=False)
    if proc.returncode != 0:
        raise ToolNotFoundError("git-lfs", "Publishing to git", _LFS_INSTALL)


@dataclass
class _Target:
    """The repository that commits are made in, and how they reach the destination."""

    git: _Git
    branch: str
    #: The branch's commit when we read it (None: the branch does not exist yet).
    head: str | None
    media: Path
    #: A remote: commits are pushed to it from this (bare) clone.
    push: bool = False
    #: A local working repository whose working tree follows the branch.
    work_tree: Path | None = None
    #: Events to report (hooks that could not be installed...).
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _open_target(dest: str, private: Path | None, branch: str | None) -> Iterator[_Target]:
    if is_git_url(dest):
        with _remote_target(dest, dest, private, branch) as target:
            yield target
        return
    path = Path(dest).expanduser()
    if path.exists() and not path.is_dir():
        raise NotAGitRepositoryError(dest, "it is a file")
    if path.is_dir() and any(path.iterdir()):
        probe = _Git(["-C", str(path)], dest)
        bare = probe.run("rev-parse", "--is-bare-repository", check=False)
        if bare.returncode != 0:
            raise NotAGitRepositoryError(
                dest, "it is a folder that is neither empty nor a git repository"
            )
        if bare.stdout.decode().strip() == "true":  # a bare repository is pushed to
            with _remote_target(str(path.resolve()), dest, private, branch) as target:
                yield target
            return
        top = Path(probe.out("rev-parse", "--show-toplevel"))
        if top.resolve() != path.resolve():
            raise NotAGitRepositoryError(
                dest, f"it is a folder inside the git repository {top}, not the top of one"
            )
    else:
        path.mkdir(parents=True, exist_ok=True)
        _Git(["-C", str(path)], dest).run("init", "-q", "-b", branch or "main")
    yield _local_target(path, dest, branch)


def _local_target(path: Path, dest: str, branch: str | None) -> _Target:
    git = _Git(["-C", str(path)], dest)
    current = git.run("symbolic-ref", "-q", "HEAD", check=False).stdout.decode().strip()
    if branch is None:
        if not current.startswith("refs/heads/"):
            raise PublishError(
                dest,
                f"The git repository {dest} has no branch checked out (a detached HEAD), so "
                "there is no branch to publish onto.",
                f"Check one out (git -C {dest} switch main), or pass --branch NAME.",
            )
        branch = current.removeprefix("refs/heads/")
    checked_out = current == f"refs/heads/{branch}"
    if checked_out:
        status = git.run("status", "--porcelain=v1", "-z", "--untracked-files=all")
        changes = [item[3:] for item in status.stdout.decode().split("\0") if len(item) > 3]
        if changes:
            raise DirtyWorkingTreeError(dest, changes)
    target = _Target(git, branch, git.commit_of(f"refs/heads/{branch}"), git.media_dir(),
                     work_tree=path if checked_out else None)  # fmt: skip
    _install_lfs_hooks(git, path, target)
    return target


def _install_lfs_hooks(git: _Git, path: Path, target: _Target) -> None:
    """A working repository that the user pushes later needs Git LFS's hooks (they send
    the objects); install them unless they are there, and say so when that fails."""
    hooks = path / git.out("rev-parse", "--git-path", "hooks")  # relative to ``path``
    if (hooks / "pre-push").is_file() and git.run(
        "config", "--get", "filter.lfs.process", check=False
    ).stdout.strip():
        return
    proc = git.run("lfs", "install", "--local", check=False)
    if proc.returncode != 0:
        target.notes.append(
            f"could not install Git LFS's hooks in {git.dest} ({_why(proc)}):"
            f" run `git -C {git.dest} lfs install --local` before pushing it elsewhere"
        )


@contextlib.contextmanager
def _remote_target(
    url: str, dest: str, private: Path | None, branch: str | None
) -> Iterator[_Target]:
    """A bare clone of ``url`` under the run's private folder (a temporary one for save
    points outside a run), refreshed to mirror the remote, locked while we use it."""
    import fcntl

    with contextlib.ExitStack() as stack:
        if private is not None:
            root = private / "publish" / "git"
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="savepoints-")))
        root.mkdir(parents=True, exist_ok=True)
        tail = re.sub(r"[^\w.-]+", "-", url.rstrip("/").rsplit("/", 1)[-1])[-40:] or "repo"
        name = f"{tail}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"
        lock = stack.enter_context(open(root / f"{name}.lock", "a+b"))
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # one publisher per clone at a time
        cache = root / name
        for stale in root.glob(f"{name}.tmp-*"):  # a clone an earlier run did not finish
            remove_tree(stale)
        if not (cache / "HEAD").is_file():
            tmp = root / f"{name}.tmp-{secrets.token_hex(4)}"
            proc = _Git([], dest).run("clone", "--bare", "-q", url, str(tmp), check=False)
            if proc.returncode != 0:
                with contextlib.suppress(FileNotFoundError):
                    remove_tree(tmp)
                raise NotAGitRepositoryError(dest, f"git cannot read it ({_why(proc)})")
            os.replace(tmp, cache)
        git = _Git(["--git-dir", str(cache)], dest)
        git.run("config", "remote.origin.url", url)
        git.run("fetch", "-q", "--prune", "--no-tags", "origin",
                "+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*")  # fmt: skip
        if branch is None:
            remote_head = git.out("ls-remote", "--symref", "origin", "HEAD")
            found = re.match(r"ref: refs/heads/(\S+)\tHEAD", remote_head)
            branch = (
                found.group(1)
                if found
                else git.out("symbolic-ref", "HEAD").removeprefix("refs/heads/")
            )
        media = git.media_dir()
        yield _Target(git, branch, git.commit_of(f"refs/heads/{branch}"), media, push=True)


def publish(
    versions: list[Version], dest: str, private: Path | None, branch: str | None, say: Events
) -> list[Published]:
    """Publish ``versions`` (in step order) to ``dest``: see
    :func:`~savepoints.interop.publish.publish_git`."""
    _check_tag_names([t for v in versions for t in v.tags])
    with _open_target(dest, private, branch) as target:
        for note in target.notes:
            say(note)
        return _publish_versions(target, versions, say)


def _check_tag_names(tags: list[str]) -> None:
    for tag in tags:
        proc = subprocess.run(["git", "check-ref-format", f"refs/tags/{tag}"], check=False,
                              capture_output=True)  # fmt: skip
        if proc.returncode != 0:
            raise InvalidArgumentError(
                f"Tag {tag!r} of a save point is not a valid git tag name.",
                "Publish with --no-own-tags (own_tags=False), or rename the tag in the run "
                "(savepoints untag / tag).",
            )


def _publish_versions(target: _Target, versions: list[Version], say: Events) -> list[Published]:
    git = target.git
    git.use_fallback_identity()
    start = target.head
    head = start
    head_tree = git.tree(head) if head else {}
    known_blobs = set(head_tree.values())
    results: list[Published] = []
    new_tags: list[tuple[str, str, str]] = []
    new_objects: set[str] = set()
    for version in versions:
        entries = _entries(git, version, head_tree)
        step_tag, *_ = version.tags
        existing = {t: c for t in version.tags if (c := git.commit_of(f"refs/tags/{t}"))}
        for tag, commit in existing.items():
            differ = differing(entries, git.tree(commit))
            if differ:
                raise PublishedTagConflictError(git.dest, tag, version.point.step, differ)
        already = step_tag in existing
        changed: list[str] = []
        if already:
            commit = existing[step_tag]
        else:
            new = [r for r, f in version.files.items()
                   if f.oid is not None and entries[r] not in known_blobs]  # fmt: skip
            check_unread(version, new)
            for f in version.files.values():
                if f.oid is not None and f.source is not None:
                    place_object(target.media, f.oid, f.size, f.source)
            new_objects.update(oid for r in new if (oid := version.files[r].oid))
            tree = git.write_tree(entries)
            if head is not None and tree == git.out("rev-parse", f"{head}^{{tree}}"):
                commit = head  # this content is the head already (a run that lost its tags)
            else:
                commit = git.out(
                    "commit-tree", tree, *(("-p", head) if head else ()),
                    input=f"{version.title}\n\n{version.body}\n".encode(),
                    env={"GIT_AUTHOR_DATE": f"@{int(version.point.created.timestamp())} +0000"},
                )  # fmt: skip
            changed = [r for r in differing(entries, head_tree) if r in entries]
            head, head_tree = commit, entries
            known_blobs |= set(entries.values())
        new_tags += [(t, commit, version.title) for t in version.tags if t not in existing]
        results.append(Published(
            step=version.point.step, tags=version.tags, commit=commit, already=already,
            files=len(entries), changed_files=len(changed),
            changed_bytes=sum(version.files[r].size for r in changed if r in version.files),
        ))  # fmt: skip
    _move_refs(target, start, head, new_tags)
    if target.push and (head != start or new_tags):
        _push(target, head != start, new_tags, new_objects, say)
    elif target.work_tree is not None and head != start and head is not None:
        _check_out(target, start, head)
    return results


def _entries(git: _Git, version: Version, parent_tree: dict[str, str]) -> dict[str, str]:
    """``{path: blob id}`` of a version's commit, storing the blobs: pointers for LFS
    files, the files themselves otherwise, and ``.gitattributes``."""
    files = sorted(version.files.values(), key=lambda f: f.rel)
    contents = [pointer(f.oid, f.size) if f.oid is not None else f.payload() for f in files]
    contents.append(_attributes(git, parent_tree.get(GITATTRIBUTES)))
    ids = git.write_blobs(contents)
    return {**{f.rel: sha for f, sha in zip(files, ids)}, GITATTRIBUTES: ids[-1]}


def _attributes(git: _Git, previous: str | None) -> bytes:
    """``.gitattributes``: the branch's own lines, with the LFS rule added if missing."""
    text = git.blob(previous).decode(errors="replace") if previous else ""
    if LFS_ATTRIBUTES.strip() in text.splitlines():
        return text.encode()
    return (text + ("\n" if text and not text.endswith("\n") else "") + LFS_ATTRIBUTES).encode()


def _move_refs(
    target: _Target, start: str | None, head: str | None, tags: list[tuple[str, str, str]]
) -> None:
    """Branch first (compare-and-swap against what we read), then the tags (created only
    if absent): a concurrent publisher makes this fail, never lose its work."""
    git = target.git
    if head is not None and head != start:
        zero = "0" * len(head)
        proc = git.run("update-ref", "-m", "savepoints publish", f"refs/heads/{target.branch}",
                       head, start or zero, check=False)  # fmt: skip
        if proc.returncode != 0:
            raise DestinationMovedError(git.dest, f"its branch {target.branch!r} moved")
    ident = git.ident()
    for name, commit, title in tags:
        raw = f"object {commit}\ntype commit\ntag {name}\ntagger {ident}\n\n{title}\n"
        obj = git.out("mktag", input=raw.encode())
        proc = git.run("update-ref", f"refs/tags/{name}", obj, "0" * len(obj), check=False)
        if proc.returncode != 0:
            raise DestinationMovedError(git.dest, f"the tag {name!r} appeared")


def _push(
    target: _Target, branch_moved: bool, tags: list[tuple[str, str, str]], objects: set[str],
    say: Events,
) -> None:  # fmt: skip
    git = target.git
    if objects:
        say(f"sending {len(objects)} LFS object(s) to {git.dest}")
        ordered = sorted(objects)
        for i in range(0, len(ordered), 200):
            git.run("lfs", "push", "--object-id", "origin", *ordered[i : i + 200])
    refs = [f"refs/heads/{target.branch}"] if branch_moved else []
    refs += [f"refs/tags/{name}" for name, _, _ in tags]
    say(f"pushing {len(refs)} ref(s) to {git.dest}")
    proc = git.run("push", "--atomic", "--no-verify", "--porcelain", "origin",
                   *(f"{r}:{r}" for r in refs), check=False)  # fmt: skip
    if proc.returncode != 0:
        report = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
        if "[rejected]" in report or "(fetch first)" in report or "already exists" in report:
            raise DestinationMovedError(git.dest, "a ref we push changed there")
        raise git.failed(("push",), proc)
    # The remote has the objects now: drop the clone's links to them, so that deleting a
    # save point frees its blobs (a run's gc frees blobs no other file links to).
    if target.media.is_dir():
        remove_tree(target.media)


def _check_out(target: _Target, start: str | None, head: str) -> None:
    git = target.git
    args = ("read-tree", "-m", "-u", *((start,) if start else ()), head)
    proc = git.run(*args, pre=_LFS_FILTERS, check=False)
    if proc.returncode != 0:
        raise PublishError(
            git.dest,
            f"Published to {git.dest} (branch {target.branch!r} and its tags), but its working "
            f"tree could not be updated: {_why(proc)}.",
            f"Update it yourself: git -C {git.dest} reset --hard (nothing of yours was there: "
            "it was clean).",
        )
