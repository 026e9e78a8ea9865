"""Git LFS objects made from save point files without copying or re-hashing them.

Git LFS names an object by the SHA-256 of its bytes and keeps it in
``<git dir>/lfs/objects/<2 hex>/<2 hex>/<sha256>``; the repository holds a three-line
pointer instead of the file. Save points name files by BLAKE3, so the SHA-256 of each
content is computed once, while the file is read (and checked against the manifest's
BLAKE3 on the way), and remembered per BLAKE3 in the run's private folder
(``.savepoints/publish/lfs-oids.json``): publishing the same shard again, in another
version or to another destination, reads none of its bytes.

Objects are placed by hard link to the save point's file (which is itself a link to the
run's blob), falling back to a copy across file systems, so a published version costs
only the bytes of what changed, and often not even those.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

import blake3

from savepoints.errors import CorruptSavePointError

#: ``.gitattributes`` line that ``git lfs track "*.safetensors"`` writes.
LFS_ATTRIBUTES = "*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
LFS_SUFFIXES = (".safetensors",)
_CACHE_FORMAT = "savepoints.lfs-oids"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_READ_CHUNK = 16 * 1024 * 1024
# Errors that mean "no hard link here": copy instead.
_NO_LINKS = {errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK,
             errno.ENOSYS, errno.EACCES}  # fmt: skip


def is_lfs(rel: str) -> bool:
    """Whether a file is published as an LFS object (what :data:`LFS_ATTRIBUTES` says)."""
    return rel.endswith(LFS_SUFFIXES)


def pointer(oid: str, size: int) -> bytes:
    """The LFS pointer file of an object (https://github.com/git-lfs/git-lfs/blob/main/docs/spec.md)."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


def read_hashes(path: Path, progress: Callable[[int], None] | None = None) -> tuple[str, str]:
    """BLAKE3 and SHA-256 of a file, in one read."""
    b3 = blake3.blake3(max_threads=blake3.blake3.AUTO)
    sha = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_READ_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            b3.update(view[:n])
            sha.update(view[:n])
            if progress is not None:
                progress(n)
    return b3.hexdigest(), sha.hexdigest()


class OidCache:
    """SHA-256 of contents already hashed, by BLAKE3: a JSON map in the run's private
    folder (in memory only when ``path`` is None). A cache: a missing or unreadable file
    is an empty one, and entries are checked to be hashes, never trusted to be code."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._oids: dict[str, str] = {}
        self._dirty = False
        if path is not None:
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(path.read_text())
                if isinstance(data, dict) and data.get("format") == _CACHE_FORMAT:
                    self._oids = {
                        k: v for k, v in dict(data.get("sha256", {})).items()
                        if isinstance(k, str) and isinstance(v, str) and _HEX64.fullmatch(v)
                    }  # fmt: skip

    def get(self, b3: str) -> str | None:
        return self._oids.get(b3)

    def put(self, b3: str, sha256: str) -> None:
        if self._oids.get(b3) != sha256:
            self._oids[b3] = sha256
            self._dirty = True

    def save(self) -> None:
        """Write the map (readers see the old one or the new one, never a mix)."""
        if self.path is None or not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{secrets.token_hex(4)}")
        data = {"format": _CACHE_FORMAT, "version": 1, "sha256": self._oids}
        try:
            tmp.write_text(json.dumps(data, sort_keys=True))
            os.replace(tmp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._dirty = False


def object_path(media: Path, oid: str) -> Path:
    return media / oid[:2] / oid[2:4] / oid


def place_object(media: Path, oid: str, size: int, source: Path) -> bool:
    """Put ``source`` into the LFS store ``media`` as object ``oid``: a hard link when the
    file system allows it, else a copy. Returns False when it was there already."""
    target = object_path(media, oid)
    with contextlib.suppress(FileNotFoundError):
        if target.stat().st_size == size:
            return False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{oid}.{secrets.token_hex(4)}.tmp")
    try:
        try:
            os.link(source, tmp)
        except OSError as e:
            if e.errno not in _NO_LINKS:
                raise
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return True


def checked_oid(
    path: Path,
    expected_b3: str,
    cache: OidCache,
    *,
    verify: bool,
    folder: Path,
    rel: str,
    progress: Callable[[int], None] | None = None,
) -> tuple[str, bool]:
    """The SHA-256 of a save point file whose manifest hash is ``expected_b3``, and
    whether its bytes were read: from the cache when known (no byte read), else hashed,
    checked against the manifest (with ``verify``) and remembered."""
    known = cache.get(expected_b3)
    if known is not None:
        return known, False
    b3, sha = read_hashes(path, progress)
    if verify and b3 != expected_b3:
        raise CorruptSavePointError(folder, [f"{rel}: altered (content hash differs)"])
    if b3 == expected_b3:  # never remember the hash of bytes that are not the listed ones
        cache.put(b3, sha)
    return sha, True
