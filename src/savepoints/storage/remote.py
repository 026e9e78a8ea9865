"""A run's save points in object storage (S3, GCS, Azure, or a local folder as a URL).

Layout under the run's URL (content-addressed, like the local run)::

    blobs/<2 hex>/<blake3 hex>          every file of every save point, stored once
    points/step-N/savepoint.json        a save point's manifest: its commit record
    tags.json                           {"tags": {name: step}}, changed by compare-and-swap

A push uploads the blobs the remote lacks (one LIST says which it has), and only when
every upload has been acknowledged writes the manifest, with a create-only put
(``If-None-Match: *``): a manifest exists only if every blob it lists does, so a push
killed at any moment leaves nothing a reader would pick, and the next push completes it.
A second push of the same save point is a no-op; a different save point for a step the
remote already holds is a :class:`~savepoints.errors.RemoteConflictError`, never an
overwrite. The manifest is the local one, byte for byte, so the hashes are the same
everywhere and a fetched save point is verified as it is downloaded.

Deleting removes the manifest first (the save point is gone at once); its blobs become
garbage, and :meth:`RemoteRun.collect` removes unreferenced blobs only once they are older
than a grace period, so a push in flight (blobs uploaded, manifest not yet written) never
loses its blobs.

The client is obstore (Rust's ``object_store``): configured the way users already are
(``AWS_*`` environment variables, ``AWS_ENDPOINT_URL``, ``AWS_ALLOW_HTTP=true``...), with
its own retries with backoff for transient errors. URLs stay strings: ``pathlib`` would
turn ``s3://b/x`` into ``s3:/b/x``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from savepoints.errors import (
    CorruptSavePointError,
    ManifestError,
    MissingDependencyError,
    RemoteAccessError,
    RemoteConflictError,
    RemoteError,
    SavePointNotFoundError,
    SavePointsError,
)
from savepoints.integrity import Problem, StreamHasher, VerifyReport
from savepoints.layout import MANIFEST_NAME, folder_name, parse_step
from savepoints.manifest import Manifest, decode_manifest, manifest_hash_problem
from savepoints.storage.blobs import Usage

log = logging.getLogger("savepoints")

BLOBS = "blobs"
POINTS = "points"
TAGS = "tags.json"
#: Unreferenced blobs younger than this are kept by :meth:`RemoteRun.collect`: they may
#: belong to a push whose manifest is not written yet.
DEFAULT_GC_GRACE = timedelta(hours=1)
_TRANSFERS = 8  # files uploaded or downloaded at once
_CHUNK = 8 * 1024 * 1024
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_REFUSED = re.compile(r"status code: 403\b|InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied")
_XML_CODE = re.compile(r"<Code>([^<]*)</Code>\s*<Message>([^<]*)</Message>")

# storage_options keys that belong to obstore's HTTP client or its retry policy; every
# other key is the store's own configuration (S3: "endpoint", "region", ...).
_CLIENT_KEYS = {
    "allow_http", "allow_invalid_certificates", "connect_timeout", "default_content_type",
    "http1_only", "http2_only", "pool_idle_timeout", "pool_max_idle_per_host", "proxy_url",
    "read_timeout", "timeout", "user_agent",
}  # fmt: skip
_RETRY_KEYS = {"max_retries", "retry_timeout"}


def is_url(text: str | os.PathLike[str]) -> bool:
    """Whether ``text`` names a remote (``s3://``, ``gs://``, ``az://``, ``file://``...)."""
    return isinstance(text, str) and bool(_URL_RE.match(text))


def open_store(url: str, storage_options: Mapping[str, Any] | None = None) -> Any:
    """An obstore store for ``url``; credentials and endpoint come from the environment
    (``AWS_*``, ``GOOGLE_*``, ``AZURE_*``) unless ``storage_options`` gives them."""
    try:
        from obstore.store import LocalStore, MemoryStore, from_url
    except ImportError:
        raise MissingDependencyError("A remote run", "obstore", "remote") from None
    options = dict(storage_options or {})
    client = {k: options.pop(k) for k in list(options) if k in _CLIENT_KEYS}
    if client and "allow_http" not in client and os.environ.get("AWS_ALLOW_HTTP"):
        # Client options given here replace the environment's: keep its plain-http consent.
        client["allow_http"] = os.environ["AWS_ALLOW_HTTP"].lower() in ("1", "true", "yes")
    for key in ("connect_timeout", "pool_idle_timeout", "read_timeout", "timeout"):
        if isinstance(client.get(key), (int, float)):  # seconds, as everywhere else here
            client[key] = timedelta(seconds=client[key])
    retry: dict[str, Any] = {}
    if "max_retries" in options:
        retry["max_retries"] = int(options.pop("max_retries"))
    if "retry_timeout" in options:
        retry["retry_timeout"] = timedelta(seconds=float(options.pop("retry_timeout")))
    if url.startswith("memory://"):
        return MemoryStore()
    if url.startswith("file://"):
        root = url[len("file://") :]
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as e:
            raise RemoteAccessError(url, f"cannot create the folder ({e.strerror})") from None
        return LocalStore(root)
    try:
        kwargs: dict[str, Any] = {
            "config": options or None, "client_options": client or None,
            "retry_config": retry or None,
        }  # fmt: skip
        return from_url(url, **kwargs)
    except Exception as e:
        raise RemoteAccessError(url, f"the URL or its options are not usable ({e})") from None


def as_url(text: str | os.PathLike[str]) -> str:
    """A URL for a remote given as a URL or as a local folder path."""
    if is_url(text):
        return str(text).rstrip("/")
    return Path(text).absolute().as_uri()


def blob_key(digest: str) -> str:
    return f"{BLOBS}/{digest[:2]}/{digest}"


def manifest_key(step: int) -> str:
    return f"{POINTS}/{folder_name(step)}/{MANIFEST_NAME}"


@dataclass
class PushReport:
    """What one push did."""

    step: int
    uploaded_files: int = 0
    uploaded_bytes: int = 0
    skipped_bytes: int = 0
    """Bytes of files the remote already had (unchanged since an earlier push)."""
    already: bool = False
    """The remote held this save point already: nothing was sent."""
    seconds: float = 0.0


@dataclass
class RemoteRun:
    """The save points of one run at ``url``: push, fetch, list, tag, delete, collect."""

    url: str
    store: Any = field(repr=False)

    @classmethod
    def open(
        cls, url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None,
        *, writable: bool = False,
    ) -> RemoteRun:  # fmt: skip
        """Open the remote and check now that it can be read (and written), so that bad
        credentials fail when the run opens, not after the first epoch."""
        url = as_url(url)
        run = cls(url, open_store(url, storage_options))
        run.check_access(writable=writable)
        return run

    # ------------------------------------------------------------------ errors

    def _fail(self, e: BaseException, doing: str) -> SavePointsError:
        """Our error for an obstore failure while ``doing`` something."""
        import obstore.exceptions as ox

        text = str(e).split("\n", 1)[0]
        said = _XML_CODE.search(str(e))  # the store's own words: <Code> and <Message>
        if said is not None:
            text = f"{said.group(1)}: {said.group(2)}"
        if isinstance(e, (ox.UnauthenticatedError, ox.PermissionDeniedError)):
            return RemoteAccessError(self.url, f"{doing} was refused ({text})")
        if "NoSuchBucket" in str(e):
            return RemoteAccessError(self.url, "the bucket does not exist")
        # The status code, not a bare "403": blob names are hex and may hold one.
        if _REFUSED.search(str(e)):
            return RemoteAccessError(self.url, f"{doing} was refused ({text})")
        return RemoteError(self.url, f"Remote {self.url}: {doing} failed: {text}.")

    def check_access(self, *, writable: bool) -> None:
        import obstore as obs

        try:
            next(iter(obs.list(self.store, POINTS + "/", chunk_size=1)), None)
        except Exception as e:
            raise self._fail(e, "listing") from None
        if writable:
            probe = f"probes/{uuid.uuid4().hex}"
            try:
                obs.put(self.store, probe, b"savepoints write check", mode="create")
            except Exception as e:
                raise self._fail(e, "writing") from None
            self._delete(probe, "deleting")

    # ------------------------------------------------------------------ reading

    def _list(self, prefix: str) -> Iterator[dict[str, Any]]:
        import obstore as obs

        try:
            for batch in obs.list(self.store, prefix):
                yield from batch
        except Exception as e:
            raise self._fail(e, f"listing {prefix}") from None

    def _get(self, key: str) -> bytes:
        import obstore as obs

        try:
            return bytes(obs.get(self.store, key).bytes())
        except FileNotFoundError:
            raise
        except Exception as e:
            raise self._fail(e, f"reading {key}") from None

    def steps(self) -> list[int]:
        """Steps whose manifest is on the remote, ascending (not yet validated)."""
        found = set()
        for meta in self._list(POINTS + "/"):
            parts = meta["path"].split("/")
            if len(parts) == 3 and parts[2] == MANIFEST_NAME:
                step = parse_step(parts[1])
                if step is not None:
                    found.add(step)
        return sorted(found)

    def manifest(self, step: int) -> Manifest:
        """The manifest of ``step``, checked (its own hash, its step), with the remote's
        tags. Raises :class:`SavePointNotFoundError` or :class:`ManifestError`."""
        where = f"{self.url}/{manifest_key(step)}"
        try:
            raw = self._get(manifest_key(step))
        except FileNotFoundError:
            raise SavePointNotFoundError(self.url, step, self.steps()) from None
        manifest = decode_manifest(raw, where)
        problem = manifest_hash_problem(raw, manifest)
        if problem is not None:
            raise ManifestError(where, problem)
        if manifest.step != step:
            raise ManifestError(where, f"it says step {manifest.step}")
        return manifest

    def points(self) -> dict[int, Manifest]:
        """Every committed remote save point (a manifest that parses and checks), by step,
        carrying the remote's tags. Anything else does not exist for readers."""
        tags = self.tags()
        out: dict[int, Manifest] = {}
        for step in self.steps():
            try:
                manifest = self.manifest(step)
            except (ManifestError, SavePointNotFoundError) as e:
                log.warning("savepoints: skipping remote step %d: %s", step, e)
                continue
            out[step] = manifest.with_tags(tuple(sorted(t for t, s in tags.items() if s == step)))
        return out

    def tags(self) -> dict[str, int]:
        return self._read_tags()[0]

    def _read_tags(self) -> tuple[dict[str, int], dict[str, Any] | None]:
        """The tags and the version (e_tag) they were read at (None: no tags file)."""
        import obstore as obs

        try:
            result = obs.get(self.store, TAGS)
            raw = bytes(result.bytes())
            meta = result.meta
        except FileNotFoundError:
            return {}, None
        except Exception as e:
            raise self._fail(e, f"reading {TAGS}") from None
        try:
            data = json.loads(raw)
            tags = {str(k): int(v) for k, v in data["tags"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ManifestError(f"{self.url}/{TAGS}", "it is not a tags file") from None
        version = {k: meta[k] for k in ("e_tag", "version") if meta.get(k) is not None}
        return tags, version

    def set_tags(self, step: int, names: tuple[str, ...]) -> None:
        """Make ``names`` exactly the tags of ``step`` (a name moves from any other step),
        by compare-and-swap: a concurrent change is re-read and applied again."""
        import obstore as obs
        import obstore.exceptions as ox

        for _ in range(20):
            tags, version = self._read_tags()
            new = {t: s for t, s in tags.items() if s != step and t not in names}
            new.update(dict.fromkeys(names, step))
            if new == tags:
                return
            body = json.dumps({"tags": dict(sorted(new.items()))}, indent=1).encode()
            try:
                if version is None:
                    obs.put(self.store, TAGS, body, mode="create")
                elif self.url.startswith("file://"):
                    self._local_swap(tags, body)
                else:
                    obs.put(self.store, TAGS, body, mode=version)  # type: ignore[arg-type]
                return
            except (ox.AlreadyExistsError, ox.PreconditionError, _Changed):
                time.sleep(0.05)  # someone else changed the tags: read them again
            except Exception as e:
                raise self._fail(e, f"updating {TAGS}") from None
        raise RemoteError(self.url, f"Remote {self.url}: {TAGS} kept changing under us.")

    def _local_swap(self, expected: dict[str, int], body: bytes) -> None:
        """Compare-and-swap for a ``file://`` remote (its store cannot do conditional
        updates): under an exclusive lock, check the file is still what was read."""
        import fcntl

        root = Path(self.url[len("file://") :])
        with open(root / ".tags.lock", "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                now = json.loads((root / TAGS).read_bytes())["tags"]
            except (OSError, ValueError, KeyError):
                now = None
            if now != expected:
                raise _Changed
            tmp = root / f".{TAGS}.{uuid.uuid4().hex}"
            tmp.write_bytes(body)
            os.replace(tmp, root / TAGS)

    def blobs(self) -> dict[str, tuple[int, datetime]]:
        """Every blob on the remote: ``{hash: (size, last modified)}`` (one LIST)."""
        out = {}
        for meta in self._list(BLOBS + "/"):
            name = meta["path"].rsplit("/", 1)[-1]
            out[name] = (int(meta["size"]), meta["last_modified"])
        return out

    # ------------------------------------------------------------------ writing

    def push(
        self, folder: Path, manifest: Manifest, *,
        progress: Callable[[int], None] | None = None,
    ) -> PushReport:  # fmt: skip
        """Copy the committed save point ``folder`` to the remote: missing blobs first,
        the manifest last (create-only), then its tags. Idempotent."""
        import obstore as obs
        import obstore.exceptions as ox

        started = time.perf_counter()
        report = PushReport(manifest.step)
        try:
            remote = self.manifest(manifest.step)
        except SavePointNotFoundError:
            remote = None
        if remote is not None:
            if remote.files != manifest.files:
                raise RemoteConflictError(self.url, manifest.step)
            report.already = True
        else:
            raw = (folder / MANIFEST_NAME).read_bytes()
            self._upload_missing(folder, manifest, report, progress)
            try:
                obs.put(self.store, manifest_key(manifest.step), raw, mode="create")
            except ox.AlreadyExistsError:
                # Another push of this step won the race: fine if it is the same content.
                if self.manifest(manifest.step).files != manifest.files:
                    raise RemoteConflictError(self.url, manifest.step) from None
                report.already = True
            except Exception as e:
                raise self._fail(e, f"writing the manifest of step {manifest.step}") from None
            # A blob we skipped because it was there may have been collected since the
            # LIST (a gc on another machine): put back what the manifest now misses.
            self._upload_missing(folder, manifest, PushReport(manifest.step), None)
        tags = manifest.tags
        if report.already:  # tags given on the remote since are kept; ours are added
            tags += tuple(sorted(t for t, s in self.tags().items() if s == manifest.step))
        self.set_tags(manifest.step, tuple(dict.fromkeys(tags)))
        report.seconds = time.perf_counter() - started
        return report

    def _upload_missing(
        self, folder: Path, manifest: Manifest, report: PushReport,
        progress: Callable[[int], None] | None,
    ) -> None:  # fmt: skip
        import obstore as obs

        have = self.blobs()
        todo: dict[str, tuple[Path, int]] = {}
        for rel, entry in manifest.files.items():
            if have.get(entry.hash, (None,))[0] == entry.size:
                report.skipped_bytes += entry.size
            else:
                todo.setdefault(entry.hash, (folder / rel, entry.size))

        def upload(item: tuple[str, tuple[Path, int]]) -> int:
            digest, (path, size) = item
            try:
                # Content-addressed: an existing blob of this name holds the same bytes,
                # so an overwrite is harmless (and multipart uploads stay possible).
                obs.put(self.store, blob_key(digest), path)
            except FileNotFoundError:
                raise
            except Exception as e:
                raise self._fail(e, f"uploading {path.name}") from None
            if progress is not None:
                progress(size)
            return size

        with ThreadPoolExecutor(max_workers=min(_TRANSFERS, max(1, len(todo)))) as pool:
            for size in pool.map(upload, sorted(todo.items(), key=lambda kv: -kv[1][1])):
                report.uploaded_files += 1
                report.uploaded_bytes += size

    def fetch(
        self, manifest: Manifest, into: Path, *,
        local_blob: Callable[[str], Path | None] = lambda digest: None,
        progress: Callable[[int], None] | None = None,
    ) -> int:  # fmt: skip
        """Write the files of ``manifest`` into the empty folder ``into``, hashing each
        as it arrives; a file already in the local blob store (``local_blob``) is linked,
        not downloaded. Raises :class:`CorruptSavePointError` naming every file that is
        missing or differs. Returns the bytes downloaded."""
        problems: list[Problem] = []

        def get(item: tuple[str, Any]) -> int:
            rel, entry = item
            dst = into / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            have = local_blob(entry.hash)
            if have is not None and have.is_file() and have.stat().st_size == entry.size:
                try:
                    os.link(have, dst)
                except OSError:
                    shutil.copyfile(have, dst)
                return 0
            problem = self._download(blob_key(entry.hash), dst, entry.size, entry.hash, rel)
            if problem is not None:
                problems.append(problem)
                return 0
            if progress is not None:
                progress(entry.size)
            return entry.size

        with ThreadPoolExecutor(max_workers=_TRANSFERS) as pool:
            got = sum(pool.map(get, sorted(manifest.files.items())))
        if problems:
            raise CorruptSavePointError(
                f"{self.url}/{manifest_key(manifest.step)}", [str(p) for p in problems],
                failed="failed verification on download",
            )  # fmt: skip
        return got

    def _download(
        self, key: str, dst: Path | None, size: int, digest: str, rel: str
    ) -> Problem | None:
        """Stream one blob into ``dst`` (None: only hash it); what is wrong, if anything."""
        import obstore as obs

        hasher = StreamHasher()
        try:
            result = obs.get(self.store, key)
            with open(dst, "wb") if dst is not None else contextlib.nullcontext() as f:
                for chunk in result.stream(min_chunk_size=_CHUNK):
                    hasher.update(chunk)
                    if f is not None:
                        f.write(chunk)
                if f is not None:
                    f.flush()
                    os.fsync(f.fileno())
        except FileNotFoundError:
            return Problem("missing", rel, f"blob {digest[:12]}… is not on the remote")
        except Exception as e:
            raise self._fail(e, f"downloading {rel}") from None
        if hasher.size != size:
            said = f"{hasher.size} bytes, the manifest says {size}"
            return Problem("truncated" if hasher.size < size else "grown", rel, said)
        if hasher.hexdigest() != digest:
            return Problem("altered", rel, "its hash differs from the manifest's")
        return None

    def delete(self, step: int) -> None:
        """Remove a save point: its manifest goes, so it is gone at once; its blobs are
        freed by :meth:`collect` later."""
        tags = [t for t, s in self.tags().items() if s == step]
        self._delete(manifest_key(step), f"deleting step {step}")
        if tags:
            self.set_tags(step, ())

    def _delete(self, key: str, doing: str) -> bool:
        """Delete one object; False when it was not there."""
        import obstore as obs

        try:
            obs.delete(self.store, key)
        except FileNotFoundError:
            return False
        except Exception as e:
            raise self._fail(e, doing) from None
        return True

    def collect(self, grace: timedelta = DEFAULT_GC_GRACE) -> tuple[int, int]:
        """Delete blobs no manifest lists and older than ``grace``: (blobs, bytes)."""
        # Blobs first, then manifests: a blob uploaded after this LIST is not a candidate,
        # and a manifest written before the deletions is seen.
        blobs = self.blobs()
        used = {e.hash for m in self.points().values() for e in m.files.values()}
        cutoff = datetime.now(timezone.utc) - grace
        removed = freed = 0
        for digest, (size, modified) in blobs.items():
            if digest in used or modified > cutoff:
                continue
            if self._delete(blob_key(digest), f"deleting blob {digest[:12]}"):
                removed += 1
                freed += size
        return removed, freed

    # ------------------------------------------------------------------ reports

    def verify(self, step: int) -> VerifyReport:
        """Download and hash every file of ``step`` (nothing is written locally)."""
        report = VerifyReport(path=f"{self.url}/{POINTS}/{folder_name(step)}")
        try:
            manifest = self.manifest(step)
        except ManifestError as e:
            report.problems.append(Problem("manifest", MANIFEST_NAME, e.message))
            return report

        def check(item: tuple[str, Any]) -> Problem | None:
            rel, entry = item
            return self._download(blob_key(entry.hash), None, entry.size, entry.hash, rel)

        with ThreadPoolExecutor(max_workers=_TRANSFERS) as pool:
            found = list(pool.map(check, sorted(manifest.files.items())))
        report.problems += [p for p in found if p is not None]
        report.files_checked = len(manifest.files)
        report.bytes_checked = manifest.total_size
        return report

    def usage(self, points: Mapping[int, Manifest] | None = None) -> Usage:
        """Logical bytes (every save point a full copy) against the blobs stored."""
        points = self.points() if points is None else points
        blobs = self.blobs()
        out = Usage()
        owners: dict[str, set[int]] = {}
        for step, manifest in points.items():
            out.unique[step] = 0
            for entry in manifest.files.values():
                out.logical += entry.size
                owners.setdefault(entry.hash, set()).add(step)
        for digest, steps in owners.items():
            size = blobs.get(digest, (0,))[0]
            out.physical += size
            if len(steps) == 1:
                out.unique[next(iter(steps))] += size
        out.garbage = sum(size for d, (size, _) in blobs.items() if d not in owners)
        return out


class _Changed(Exception):
    """The tags file changed between our read and our write."""
