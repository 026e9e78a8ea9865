"""What publishing one save point writes: its files (LFS ones with their object ids),
the model card, its tags and the commit message. Shared by the git and Hub paths."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import blake3

from savepoints.errors import CorruptSavePointError, InvalidArgumentError, NothingToPublishError
from savepoints.export import check_shippable, deployable_files, model_card
from savepoints.interop.lfs import OidCache, checked_oid, is_lfs, read_hashes
from savepoints.layout import MANIFEST_NAME, PRIVATE_DIR
from savepoints.manifest import manifest_hash_problem
from savepoints.savepoint import SavePoint
from savepoints.serialize import component_path
from savepoints.version import __version__

README = "README.md"
GITATTRIBUTES = ".gitattributes"
#: Files a publication writes itself: left out when two versions' contents are compared
#: (the card names the savepoints version that wrote it).
GENERATED = frozenset({README, GITATTRIBUTES})

Progress = Callable[[int], None]
Events = Callable[[str], None]


@dataclass(frozen=True)
class Published:
    """One save point at a destination."""

    step: int
    #: The tags that name it there (``step-N`` first).
    tags: tuple[str, ...]
    #: Its commit (a git commit id, on the Hub too).
    commit: str
    #: It was published before: nothing was written for it (missing tags aside).
    already: bool
    #: Files in the commit.
    files: int
    #: Files whose content differs from the version before it at the destination (the
    #: card and .gitattributes aside), and their bytes: what this version costs there.
    changed_files: int
    changed_bytes: int


@dataclass(frozen=True)
class File:
    """One file of a published version."""

    rel: str
    size: int
    #: A file of the save point, or bytes that the publication writes (the card).
    source: Path | None = None
    data: bytes | None = None
    #: SHA-256 of an LFS file's content (its LFS object id); None for plain files.
    oid: str | None = None
    #: Its bytes were read and checked against the manifest while planning (False for LFS
    #: files whose id was cached: :func:`check_unread` checks those that are sent).
    checked: bool = True

    def payload(self) -> Path | bytes:
        """What the file holds: the save point's file, or the publication's bytes."""
        if self.data is not None:
            return self.data
        if self.source is None:
            raise ValueError(f"{self.rel}: a File needs data or a source")
        return self.source

    def read(self) -> bytes:
        payload = self.payload()
        return payload if isinstance(payload, bytes) else payload.read_bytes()

    def sha256(self) -> str:
        return self.oid if self.oid is not None else hashlib.sha256(self.read()).hexdigest()


@dataclass(frozen=True)
class Version:
    """What one save point publishes."""

    point: SavePoint
    files: dict[str, File]
    #: ``step-N`` first, then the save point's own tags (unless left out).
    tags: tuple[str, ...]
    title: str
    body: str
    verify: bool = True


def check_unread(version: Version, rels: Iterable[str]) -> None:
    """Check against the manifest the files of ``rels`` whose bytes planning did not
    read (LFS object ids from the cache), before they are sent somewhere new: what
    reaches a destination is verified, and what is there already is not read again."""
    if not version.verify:
        return
    point = version.point
    for rel in rels:
        f = version.files[rel]
        if f.checked or f.source is None:
            continue
        b3, _ = read_hashes(f.source)
        if b3 != point.manifest.files[rel].hash:
            raise CorruptSavePointError(point.path, [f"{rel}: altered (content hash differs)"])


def chosen(points: SavePoint | Iterable[SavePoint]) -> list[SavePoint]:
    """The save points to publish, one per step, in step order."""
    many = [points] if isinstance(points, SavePoint) else list(points)
    if not many:
        raise NothingToPublishError("no save point was given")
    by_step: dict[int, SavePoint] = {}
    for point in many:
        if not isinstance(point, SavePoint):
            raise InvalidArgumentError(
                f"Cannot publish a {type(point).__name__}: publish takes SavePoint objects.",
                "Pass points.get(step), points.latest(), or a list of them.",
            )
        by_step[point.step] = point
    return [by_step[s] for s in sorted(by_step)]


def private_dir(points: list[SavePoint]) -> Path | None:
    """The run's private folder (where hashes and clones are kept), or None for save
    point folders that are not in a run."""
    private = points[0].path.parent / PRIVATE_DIR
    return private if private.is_dir() else None


def oid_cache(private: Path | None) -> OidCache:
    return OidCache(private / "publish" / "lfs-oids.json" if private is not None else None)


def plan(
    point: SavePoint,
    cache: OidCache,
    *,
    with_state: bool,
    own_tags: bool,
    verify: bool,
    location: str,
    progress: Progress | None,
) -> Version:
    """The version that publishing ``point`` makes. With ``verify``, every byte read is
    checked against the manifest (and the manifest against its own hash); LFS files
    whose object id is cached are not read at all."""
    if point.remote is not None and not (point.path / MANIFEST_NAME).is_file():
        raise InvalidArgumentError(
            f"Step {point.step} is only on the remote {point.remote}, so it cannot be "
            "published from here.",
            f"Fetch it first: savepoints pull {point.remote} {point.path.parent} {point.step}.",
        )
    check_shippable(point, "publish")
    manifest = point.manifest
    raw_manifest = (point.path / MANIFEST_NAME).read_bytes()
    if verify:
        why = manifest_hash_problem(raw_manifest, manifest)
        if why is not None:
            raise CorruptSavePointError(point.path, [f"{MANIFEST_NAME}: {why}"])
    files: dict[str, File] = {}
    for rel in sorted(manifest.files) if with_state else deployable_files(point):
        entry = manifest.files[rel]
        path = component_path(point.path, rel)
        if is_lfs(rel):
            oid, read = checked_oid(
                path, entry.hash, cache, verify=verify, folder=point.path, rel=rel,
                progress=progress,
            )  # fmt: skip
            if not read and progress is not None:
                progress(entry.size)
            files[rel] = File(rel, entry.size, source=path, oid=oid, checked=read)
            continue
        if verify and blake3.blake3(path.read_bytes()).hexdigest() != entry.hash:
            raise CorruptSavePointError(point.path, [f"{rel}: altered (content hash differs)"])
        files[rel] = File(rel, entry.size, source=path)
    if with_state:  # the whole save point: its manifest too
        files[MANIFEST_NAME] = File(MANIFEST_NAME, len(raw_manifest), data=raw_manifest)
    if README not in files:
        card = model_card(point, None, location=location).encode()
        files[README] = File(README, len(card), data=card)
    tags = (f"step-{point.step}", *(t for t in point.tags if own_tags))
    title, body = _message(point, raw_manifest, with_state)
    return Version(point, files, tags, title, body, verify)


def _message(point: SavePoint, raw_manifest: bytes, with_state: bool) -> tuple[str, str]:
    """The commit's title (run, step, metrics) and body (lineage, with trailers)."""
    run = point.path.parent
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in point.metrics.items())
    title = f"{run.name}: step {point.step}" + (f" ({metrics})" if metrics else "")
    what = "the save point with its training state" if with_state else "the model"
    lines = [
        f"Step {point.step} of the run {run}, saved "
        f"{point.created.isoformat(timespec='seconds')}; {what}, published by savepoints "
        f"{__version__}.",
    ]
    if point.tags:
        lines.append(f"Tags: {', '.join(point.tags)}.")
    lines += ["", f"Savepoint-Run: {run}", f"Savepoint-Step: {point.step}",
              f"Savepoint-Manifest: blake3:{blake3.blake3(raw_manifest).hexdigest()}"]  # fmt: skip
    return title, "\n".join(lines)


def differing(ours: dict[str, str], theirs: dict[str, str]) -> list[str]:
    """Paths whose content differs between two versions (``{path: content id}``),
    leaving out the files a publication writes itself."""
    paths = (set(ours) | set(theirs)) - GENERATED
    return sorted(p for p in paths if ours.get(p) != theirs.get(p))
