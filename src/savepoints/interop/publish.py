"""Publish save points as versions of a model: to a git repository (weights as Git LFS
objects) or to the Hugging Face Hub.

Each published save point is **one commit and one tag** (``step-N``, plus the save
point's own tags): ``git checkout step-200`` (or ``revision="step-200"`` on the Hub)
gives a plain Transformers model folder that ``from_pretrained`` loads, with a README
model card (metrics, tags, lineage). By default a commit holds what
``export(fmt="hf")`` ships (weights, config, tokenizer, files saved beside them); with
``with_state=True``, the whole save point (training state and manifest too).

Versions cost what changed: an unchanged shard is the same LFS object (named by the
SHA-256 of its bytes) in every commit. Those objects are hashed once (the SHA-256 of
each BLAKE3 content is remembered in the run's private folder) and placed into the
repository's LFS store by hard link (:mod:`savepoints.interop.lfs`).

Re-publishing a save point whose tag already names the same content does nothing; a tag
that names other content is a :class:`~savepoints.errors.PublishedTagConflictError`,
and a destination that another publisher changed meanwhile a
:class:`~savepoints.errors.DestinationMovedError` (nothing of ours is kept there).

    from savepoints import SavePoints
    from savepoints.interop.publish import publish_git, publish_hub

    points = SavePoints("runs/sentiment", readonly=True)
    publish_git(points.list(), "file:///srv/models/sentiment.git")
    publish_hub(points.best(), "alice/tweet-sentiment", private=True)
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from savepoints.interop import git, hub
from savepoints.interop.plan import Events, Progress, Published, Version, chosen, oid_cache, plan
from savepoints.interop.plan import private_dir as run_private_dir
from savepoints.savepoint import SavePoint

__all__ = ["Published", "publish_git", "publish_hub"]


def publish_git(
    points: SavePoint | Iterable[SavePoint],
    dest: str | os.PathLike[str],
    *,
    with_state: bool = False,
    own_tags: bool = True,
    branch: str | None = None,
    verify: bool = True,
    on_event: Events | None = None,
    progress: Progress | None = None,
) -> list[Published]:
    """Publish save points to the git repository ``dest``: one commit and one annotated
    tag (``step-N``, and the save point's own tags unless ``own_tags=False``) per save
    point, in step order, ``*.safetensors`` as Git LFS objects. Returns one
    :class:`Published` per save point.

    ``dest``: a folder (a working repository, created when absent or empty: its
    checked-out branch advances and its working tree shows the last version, so it must
    be clean), the path of a bare repository, or a URL (``file:///srv/m.git``,
    ``https://...``, ``git@host:m.git``) that commits, tags and LFS objects are pushed
    to. ``branch``: default, the one checked out (a folder) or the remote's default.
    ``verify``: check every byte read against the manifest (bytes published before are
    not read again). ``on_event`` gets a line before each slow step, ``progress`` the
    bytes of weights handled.
    """
    many = chosen(points)
    git.require_git()
    private = run_private_dir(many)
    versions = _plans(many, private, with_state, own_tags, verify, "PATH/TO/THIS/FOLDER",
                      progress)  # fmt: skip
    return git.publish(versions, os.fspath(dest), private, branch, on_event or _quiet)


def publish_hub(
    points: SavePoint | Iterable[SavePoint],
    repo_id: str,
    *,
    with_state: bool = False,
    own_tags: bool = True,
    private: bool = False,
    token: str | None = None,
    branch: str = "main",
    verify: bool = True,
    api: Any = None,
    on_event: Events | None = None,
    progress: Progress | None = None,
) -> list[Published]:
    """Publish save points to the Hugging Face Hub model repository ``repo_id`` (created
    if needed; ``private`` when asked): one commit and one tag per save point, as
    :func:`publish_git` does. Each commit uploads only the files whose content differs
    from the repository's head, deletes those the version lacks, and names that head as
    its parent, so a concurrent publisher makes it fail instead of being overwritten.

    ``token``: default, the usual one (``HF_TOKEN``, or ``hf auth login``). ``api``: an
    object with ``HfApi``'s methods to use instead of ``HfApi(token=token)``.
    """
    many = chosen(points)
    hub.require_hub()
    versions = _plans(many, run_private_dir(many), with_state, own_tags, verify, repo_id,
                      progress)  # fmt: skip
    return hub.publish(versions, repo_id, private=private, token=token, branch=branch,
                       api=api, say=on_event or _quiet)  # fmt: skip


def _plans(
    points: list[SavePoint], private: Any, with_state: bool, own_tags: bool, verify: bool,
    location: str, progress: Progress | None,
) -> list[Version]:  # fmt: skip
    cache = oid_cache(private)
    try:
        return [
            plan(p, cache, with_state=with_state, own_tags=own_tags, verify=verify,
                 location=location, progress=progress)
            for p in points
        ]  # fmt: skip
    finally:
        cache.save()  # the hashes are right even when a later save point failed


def _quiet(_message: str) -> None:
    pass
