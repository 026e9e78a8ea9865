"""Publishing to the Hugging Face Hub through ``huggingface_hub`` (imported lazily:
``pip install 'savepoints[hub]'``).

One commit per save point (``create_commit`` with the head we read as
``parent_commit``, so a concurrent publisher makes it fail rather than be
overwritten), uploading only the files whose content differs from that head (LFS files
are compared by SHA-256, plain ones by git blob id) and deleting those the version
lacks; then one tag per name (``create_tag``).
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from savepoints.errors import (
    DestinationMovedError,
    HubError,
    InvalidArgumentError,
    MissingDependencyError,
    PublishedTagConflictError,
    SavePointsError,
)
from savepoints.interop.plan import (
    GENERATED,
    GITATTRIBUTES,
    Events,
    File,
    Published,
    Version,
    check_unread,
)


def require_hub() -> Any:
    """The ``huggingface_hub`` module, or a clear error naming the extra to install."""
    try:
        import huggingface_hub
    except ImportError:
        raise MissingDependencyError(
            "Publishing to the Hugging Face Hub", "huggingface_hub", "hub"
        ) from None
    return huggingface_hub


@dataclass(frozen=True)
class _HubEntry:
    """A file on the Hub as far as comparing contents goes."""

    size: int
    sha256: str | None = None
    blob_id: str | None = None


def _hub_tree(api: Any, repo_id: str, revision: str) -> dict[str, _HubEntry]:
    out = {}
    for item in api.list_repo_tree(repo_id, revision=revision, recursive=True):
        blob_id = getattr(item, "blob_id", None)
        if blob_id is None:  # a folder
            continue
        lfs = getattr(item, "lfs", None)
        out[item.path] = _HubEntry(item.size, getattr(lfs, "sha256", None), blob_id)
    return out


def _git_blob_id(f: File) -> str:
    """The id git gives a file's content (plain files on the Hub are compared by it)."""
    data = f.read()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _same_on_hub(entry: _HubEntry | None, f: File) -> bool:
    if entry is None or entry.size != f.size:
        return False
    if entry.sha256 is not None:
        return entry.sha256 == f.sha256()
    if entry.blob_id is not None:  # a plain git file there
        return entry.blob_id == _git_blob_id(f)
    return False


def _hub_differing(version: Version, tree: dict[str, _HubEntry]) -> list[str]:
    paths = (set(version.files) | set(tree)) - GENERATED
    return sorted(
        p
        for p in paths
        if p not in version.files or not _same_on_hub(tree.get(p), version.files[p])
    )


def _transport_errors() -> tuple[type[BaseException], ...]:
    """What the Hub client raises when a request fails: HfHubHTTPError and offline mode
    are OSErrors; connection errors are its HTTP library's own (httpx, or requests in
    older huggingface_hub), looked up among the modules it already imported."""
    kinds: list[type[BaseException]] = [OSError]
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"),
                         ("requests", "RequestException")):  # fmt: skip
        kind = getattr(sys.modules.get(module), name, None)
        if isinstance(kind, type) and issubclass(kind, BaseException):
            kinds.append(kind)
    return tuple(kinds)


@contextlib.contextmanager
def _hub_errors(repo_id: str) -> Iterator[None]:
    """The Hub's refusals and unreachability as our typed errors (ours pass through)."""
    try:
        yield
    except SavePointsError:
        raise
    except ValueError as e:  # a malformed repository id (HFValidationError)
        raise InvalidArgumentError(
            f"{repo_id!r} is not a Hugging Face repository id: {e}.",
            "Pass USER/NAME or ORG/NAME, e.g. --hub alice/tweet-sentiment.",
        ) from e
    except Exception as e:
        if not isinstance(e, _transport_errors()):
            raise
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (409, 412):  # a stale parent_commit, a tag created meanwhile
            raise DestinationMovedError(repo_id, "its branch or a tag moved") from e
        said = str(e).strip().splitlines()
        why = said[0].rstrip(".") if said else type(e).__name__
        raise HubError(repo_id, why + (f" (HTTP {status})" if status else "")) from e


def publish(
    versions: list[Version],
    repo_id: str,
    *,
    private: bool,
    token: str | None,
    branch: str,
    api: Any,
    say: Events,
) -> list[Published]:
    """Publish ``versions`` (in step order) to ``repo_id``; see
    :func:`~savepoints.interop.publish.publish_hub`."""
    hub = require_hub()
    if api is None:
        api = hub.HfApi(token=token)
    results = []
    with _hub_errors(repo_id):
        api.create_repo(repo_id, private=True if private else None, exist_ok=True,
                        repo_type="model")  # fmt: skip
        refs = api.list_repo_refs(repo_id)
        head = next((b.target_commit for b in refs.branches if b.name == branch), None)
        tags: dict[str, str] = {t.name: t.target_commit for t in refs.tags}
        head_tree = _hub_tree(api, repo_id, head) if head else {}
        for version in versions:
            trees = {c: head_tree if c == head else _hub_tree(api, repo_id, c)
                     for t, c in tags.items() if t in version.tags}  # fmt: skip
            for tag in version.tags:  # every conflict before anything is written
                differ = _hub_differing(version, trees[tags[tag]]) if tag in tags else []
                if differ:
                    raise PublishedTagConflictError(repo_id, tag, version.point.step, differ)
            already = version.tags[0] in tags
            changed: list[str] = []
            if already:
                commit = tags[version.tags[0]]
            else:
                changed = [r for r, f in version.files.items()
                           if not _same_on_hub(head_tree.get(r), f)]  # fmt: skip
                gone = [p for p in head_tree if p not in version.files and p != GITATTRIBUTES]
                check_unread(version, changed)
                if changed or gone or head is None:
                    say(f"committing step {version.point.step} to {repo_id}: "
                        f"{len(changed)} file(s) to upload, {len(gone)} to delete")  # fmt: skip
                    operations = [
                        *(hub.CommitOperationAdd(path_in_repo=r,
                                                 path_or_fileobj=version.files[r].payload())
                          for r in changed),
                        *(hub.CommitOperationDelete(path_in_repo=p) for p in gone),
                    ]  # fmt: skip
                    info = api.create_commit(
                        repo_id, operations=operations, commit_message=version.title,
                        commit_description=version.body, revision=branch, parent_commit=head,
                    )  # fmt: skip
                    commit = info.oid
                else:
                    commit = head  # the head holds this content already (tags were lost)
                head = commit
                head_tree = {
                    **{p: e for p, e in head_tree.items() if p == GITATTRIBUTES},
                    **{r: _HubEntry(f.size, f.sha256()) for r, f in version.files.items()},
                }
            shipped = [r for r in changed if r not in GENERATED]  # as publish_git counts
            for tag in version.tags:
                if tag not in tags:
                    api.create_tag(repo_id, tag=tag, tag_message=version.title, revision=commit)
                    tags[tag] = commit
            results.append(Published(
                step=version.point.step, tags=version.tags, commit=commit, already=already,
                files=len(version.files), changed_files=len(shipped),
                changed_bytes=sum(version.files[r].size for r in shipped),
            ))  # fmt: skip
    return results
