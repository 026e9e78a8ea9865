"""Content hashes and verification.

The hash is BLAKE3: cryptographic (so it can later name blobs in a content-addressed
store and resist deliberate collisions), and multi-threaded over large buffers, so it
runs near memory speed and does not dominate a save. The manifest names the algorithm,
so another one can be added without breaking old save points.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import blake3

from savepoints.errors import CorruptSavePointError, NotARunError, RunNotFoundError, SavePointsError
from savepoints.layout import MANIFEST_NAME, RunLayout, parse_step
from savepoints.manifest import HASH_ALGORITHM, manifest_hash_problem, read_manifest_bytes

__all__ = ["HASH_ALGORITHM", "Problem", "StreamHasher", "VerifyReport", "hash_file", "verify"]
_READ_CHUNK = 16 * 1024 * 1024
#: A save point's signature (OpenSSF Model Signing; savepoints.interop.signing), written
#: after the commit. The hash check tolerates it beside the listed files and never reads
#: it: only a check with a public key may trust it.
SIGNATURE_NAME = "model.sig"


class StreamHasher:
    """Incremental hash of bytes as they are written."""

    def __init__(self, threads: int | None = None) -> None:
        """``threads``: how many threads may hash (None: as many as help)."""
        self._h = blake3.blake3(max_threads=threads or blake3.blake3.AUTO)
        self.size = 0

    def update(self, data: memoryview | bytes) -> None:
        self._h.update(data)
        self.size += len(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def hash_file(path: Path) -> tuple[int, str]:
    """Size and hex digest of a file, read in large chunks."""
    h = StreamHasher()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_READ_CHUNK)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.size, h.hexdigest()


ProblemKind = Literal["missing", "extra", "truncated", "grown", "altered", "unsafe", "manifest"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a save point."""

    kind: ProblemKind
    path: str
    detail: str

    def __str__(self) -> str:
        return f"{self.path}: {self.kind} ({self.detail})"


@dataclass
class VerifyReport:
    """What :func:`savepoints.verify` found. Truthy when everything verified."""

    #: The save point folder or run checked (a URL string for a remote one).
    path: Path | str
    problems: list[Problem] = field(default_factory=list)
    files_checked: int = 0
    bytes_checked: int = 0
    #: For a run folder: one report per save point folder, in step order.
    children: list[VerifyReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.ok for c in self.children)

    def __bool__(self) -> bool:
        return self.ok

    def all_problems(self) -> list[Problem]:
        out = list(self.problems)
        for child in self.children:
            out.extend(
                Problem(p.kind, f"{str(child.path).rsplit('/', 1)[-1]}/{p.path}", p.detail)
                for p in child.all_problems()
            )
        return out

    def raise_if_failed(self) -> None:
        """Raise :class:`CorruptSavePointError` naming every problem, if any."""
        if not self.ok:
            raise CorruptSavePointError(self.path, [str(p) for p in self.all_problems()])


def verify_files(
    folder: Path,
    expected: dict[str, tuple[int, str]],
    ignore: set[str],
    *,
    look_for_extra: bool = True,
) -> VerifyReport:
    """Compare ``folder`` against ``{relative path: (size, hash)}``.

    Names every missing, extra, truncated, grown or altered file. Paths that are
    symbolic links, or that would resolve outside ``folder``, are reported as unsafe and
    never opened.
    """
    report = VerifyReport(path=folder)
    root = folder.resolve()
    for rel, (size, digest) in sorted(expected.items()):
        target = folder / rel
        if not _is_inside(root, target):
            report.problems.append(Problem("unsafe", rel, "path leaves the save point folder"))
            continue
        if target.is_symlink():
            report.problems.append(Problem("unsafe", rel, "is a symbolic link"))
            continue
        try:
            if not target.is_file():
                raise FileNotFoundError(target)
            actual_size = target.stat().st_size
            if actual_size < size:
                report.problems.append(Problem("truncated", rel, f"{actual_size} of {size} bytes"))
                continue
            if actual_size > size:
                report.problems.append(
                    Problem("grown", rel, f"{actual_size} bytes, expected {size}")
                )
                continue
            _, actual = hash_file(target)
        except FileNotFoundError:  # also when it vanishes while we look (a pruned point)
            report.problems.append(Problem("missing", rel, f"expected {size} bytes"))
            continue
        report.files_checked += 1
        report.bytes_checked += size
        if actual != digest:
            report.problems.append(Problem("altered", rel, "content hash differs"))
    for dirpath, dirnames, filenames in os.walk(folder) if look_for_extra else ():
        dirnames.sort()
        for name in sorted(filenames):
            rel = (Path(dirpath) / name).relative_to(folder).as_posix()
            if rel not in expected and rel not in ignore:
                report.problems.append(Problem("extra", rel, "not listed in the manifest"))
    return report


def _is_inside(root: Path, target: Path) -> bool:
    try:
        target.resolve().relative_to(root)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------ save points and runs


def verify_point(folder: Path, share: tuple[int, int] | None = None) -> VerifyReport:
    """Re-hash every file a save point's manifest lists, and the manifest's own hash.

    ``share=(i, n)``: only the i-th of n shares of the files (ranks verifying one save
    point together); share 0 also checks the manifest's hash and looks for extra files.
    """
    try:
        manifest, raw = read_manifest_bytes(folder / MANIFEST_NAME)
    except SavePointsError as e:
        report = VerifyReport(path=folder)
        report.problems.append(Problem("manifest", MANIFEST_NAME, str(e)))
        return report
    listed = {rel: (e.size, e.hash) for rel, e in manifest.files.items()}
    index, count = share or (0, 1)
    expected = {rel: listed[rel] for rel in sorted(listed)[index::count]}
    ignore = {MANIFEST_NAME, SIGNATURE_NAME, *listed}
    report = verify_files(folder, expected, ignore=ignore, look_for_extra=index == 0)
    if index != 0:
        return report
    why = manifest_hash_problem(raw, manifest)
    if why is not None:
        report.problems.insert(0, Problem("manifest", MANIFEST_NAME, why))
    return report


def verify_run(root: Path) -> VerifyReport:
    """Verify every folder of a run named like a save point (committed or not)."""
    report = VerifyReport(path=root)
    for _step, folder in RunLayout(root).candidate_dirs():
        child = verify_point(folder)
        report.children.append(child)
        report.files_checked += child.files_checked
        report.bytes_checked += child.bytes_checked
    return report


def verify(path: str | os.PathLike[str]) -> VerifyReport:
    """Verify a save point folder, or every save point folder of a run folder.

    The report is truthy when everything verified; ``report.all_problems()`` names each
    missing, extra, truncated or altered file.
    """
    folder = Path(path)
    if not folder.exists():
        raise RunNotFoundError(folder)
    if not folder.is_dir():
        raise NotARunError(folder, "it is a file, not a folder")
    if (folder / MANIFEST_NAME).exists():
        return verify_point(folder)
    if parse_step(folder.name) is not None:
        # Named like a save point but without a manifest: uncommitted or damaged.
        report = VerifyReport(path=folder)
        report.problems.append(
            Problem("manifest", MANIFEST_NAME, "missing: this folder was never committed")
        )
        return report
    return verify_run(folder)
