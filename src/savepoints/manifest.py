"""``savepoint.json``: the manifest that makes a folder a committed save point.

It is written last, after every other file is on disk and fsynced, so its presence
(and validity) is the commit record. It lists every file with its size and content hash,
so verification needs nothing but the folder.

Format versions: a reader accepts any version up to :data:`FORMAT_VERSION` and refuses
newer ones with :class:`UnsupportedFormatError`, rather than misreading them. Fields a
reader does not know are kept and ignored (forward-compatible additions do not bump
the version; changes that old readers would misread do).

Designed to grow: ``files`` maps relative paths, so a sharded multi-rank save adds one
entry per rank's shard files and a content-addressed store keeps the same entries while
the bytes live in shared blobs; ``contents`` says which logical component lives in which
files, so new components (grad scaler, data loader state) add keys, not versions.

``lineage`` (optional; absent in manifests written before it, and never required) says
where a save point came from: the code's git commit, the training data's fingerprint, the
command, host and session that wrote it, and the chain of save points it descends from.
Gathered by lineage.py; its shape is checked here like every other field.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TypedDict, cast

import blake3

from savepoints.errors import ManifestError, UnsupportedFormatError

log = logging.getLogger("savepoints")

#: The content hash every file entry uses (see integrity.py).
HASH_ALGORITHM = "blake3"

FORMAT_NAME = "savepoints.savepoint"
FORMAT_VERSION = 1
#: A manifest larger than this is refused unread (a hostile or broken file).
MAX_MANIFEST_BYTES = 64 * 1024 * 1024


# --------------------------------------------------------------------------------------
# ``contents``: which component of the training state lives in which files. Described
# once here; checked when a manifest is parsed, so readers can trust the shapes below.

ModelKind = Literal["transformers", "peft", "torch"]
MODEL_KINDS: tuple[ModelKind, ...] = ("transformers", "peft", "torch")

#: A component restored through ``load_state_dict`` (optimizer, scheduler, an extra),
#: or the tokenizer: the files it is read from and the class it was saved from.
#: ``keys``: "names" for an optimizer state keyed by parameter name (written by several
#: ranks, through ``torch.distributed.checkpoint.state_dict``); absent: by position.
ComponentInfo = TypedDict(
    "ComponentInfo", {"files": list[str], "class": str, "keys": Literal["names"]}, total=False
)

#: The model: its weight files (safetensors, or shards plus the standard index), how it
#: was saved (a Transformers model, a PEFT adapter, a plain torch module), the tensor
#: count and bytes, and the names of tied weights stored once (dropped -> kept).
ModelInfo = TypedDict(
    "ModelInfo",
    {
        "files": list[str],
        "class": str,
        "kind": ModelKind,
        "tensors": int,
        "bytes": int,
        "tied": dict[str, str],
    },
    total=False,
)


class RngInfo(TypedDict, total=False):
    """The random number generators: their state files and which generators they hold."""

    files: list[str]
    generators: list[str]


class RankFiles(TypedDict):
    files: list[str]


class RanksInfo(TypedDict, total=False):
    """A save point written by several ranks of a ``torch.distributed`` job: how many,
    which files each wrote, and the per-rank state (index = rank). Weights and
    optimizer state are stored as whole tensors, whatever the sharding, so any number
    of ranks (or a plain process) can read them."""

    world_size: int
    written: list[RankFiles]
    rng: list[RngInfo]
    extra: list[dict[str, ComponentInfo]]


class CompactedInfo(TypedDict):
    """A compacted file: the original it rebuilds, with that original's size and hash."""

    of: str
    size: int
    hash: str


class Contents(TypedDict, total=False):
    """The manifest's ``contents``. Every key is optional: a save point holds what was
    given to ``save()``. Unknown keys (from a newer writer) are kept and ignored."""

    model: ModelInfo
    tokenizer: ComponentInfo
    optimizer: ComponentInfo
    scheduler: ComponentInfo
    rng: RngInfo
    #: ``save(extra={name: obj})``: one entry per name.
    extra: dict[str, ComponentInfo]
    #: ``save(files={...})``: the names of the files placed as they were given.
    files: list[str]
    #: Files compressed by ``compact``: ``{compressed file: what it rebuilds}``.
    compacted: dict[str, CompactedInfo]
    #: Written by several ranks (absent: by one process).
    ranks: RanksInfo


#: Keys of ``contents`` whose value is one component entry.
COMPONENTS = ("model", "tokenizer", "optimizer", "scheduler", "rng")


# --------------------------------------------------------------------------------------
# ``lineage``: where a save point came from (gathered by lineage.py). Every key is
# optional, and unknown keys (from a newer writer) are kept, at every level.


class CodeInfo(TypedDict, total=False):
    """The git repository of the training code, as it was when the run was opened."""

    #: ``HEAD``'s commit (hex).
    commit: str
    #: Tracked files differed from the commit (untracked files do not count).
    dirty: bool
    #: The checked-out branch (absent when ``HEAD`` is detached).
    branch: str
    #: The repository's top folder.
    root: str
    #: ``remote.origin.url``, without any user name or password it held.
    remote: str


class DataFile(TypedDict, total=False):
    """One file (or folder) the training declared it read."""

    path: str
    size: int
    #: BLAKE3 of the bytes; of a folder, of the sorted list of its files' names, sizes
    #: and hashes.
    blake3: str
    #: A folder: how many files it held.
    files: int


class DataInfo(TypedDict, total=False):
    """The training data: each declared file, and one fingerprint over them all (their
    sizes and hashes in the declared order: the same bytes wherever they lie)."""

    fingerprint: str
    files: list[DataFile]


class ChainFrom(TypedDict, total=False):
    """The save point a session continued from: its step, and its folder when it is
    not one of this run's (a warm start from another run)."""

    step: int
    path: str


#: One session's stretch of the chain: the steps it saved that this save point descends
#: from (newest first; ``more``: how many older ones of it are left out), and the save
#: point it continued from (``from``: null when it started afresh). A new link is a
#: process boundary: a resume.
ChainLink = TypedDict(
    "ChainLink",
    {"session": str, "steps": list[int], "more": int, "from": ChainFrom | None},
    total=False,
)


@dataclass(frozen=True)
class Lineage:
    """A manifest's ``lineage``. Library versions are the manifest's ``versions``."""

    #: The writing session (one ``SavePoints`` opening): the run journal's session id.
    session: str | None = None
    code: CodeInfo | None = None
    data: DataInfo | None = None
    #: The command line (the program without its folder, then the arguments).
    command: tuple[str, ...] | None = None
    host: str | None = None
    #: This save point's ancestry, newest first; the first link's first step is its own.
    chain: tuple[ChainLink, ...] = ()
    #: Keys a newer writer added; kept.
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        known: dict[str, Any] = {
            "session": self.session, "code": self.code, "data": self.data,
            "command": None if self.command is None else list(self.command),
            "host": self.host, "chain": list(self.chain) or None,
        }  # fmt: skip
        return {**self.extra, **{k: v for k, v in known.items() if v is not None}}


_LINEAGE_KEYS = {"session", "code", "data", "command", "host", "chain"}


@dataclass(frozen=True)
class FileEntry:
    size: int
    hash: str


@dataclass(frozen=True)
class Manifest:
    step: int
    created: datetime
    files: dict[str, FileEntry]
    metrics: dict[str, float] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    state: dict[str, Any] = field(default_factory=dict)
    parent: int | None = None
    contents: Contents = field(default_factory=lambda: Contents())
    versions: dict[str, str] = field(default_factory=dict)
    #: The retention policy in force when this was saved (lets readers find "best").
    keep: dict[str, Any] | None = None
    #: An emergency save point taken on a preemption request: the signal that asked.
    preempted: str | None = None
    #: Where it came from (code, data, command, chain); None in older manifests.
    lineage: Lineage | None = None
    hash_algorithm: str = HASH_ALGORITHM
    format_version: int = FORMAT_VERSION
    #: Fields written by a newer minor revision that this reader does not know; kept.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_size(self) -> int:
        return sum(e.size for e in self.files.values())

    def to_json(self) -> dict[str, Any]:
        marks: dict[str, Any] = {} if self.preempted is None else {"preempted": self.preempted}
        if self.lineage is not None:
            marks["lineage"] = self.lineage.to_json()
        return {
            **self.extra,
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "step": self.step,
            "created": self.created.astimezone(timezone.utc).isoformat(timespec="microseconds"),
            "metrics": self.metrics,
            "tags": list(self.tags),
            "state": self.state,
            "parent": None if self.parent is None else {"step": self.parent},
            "contents": self.contents,
            "versions": self.versions,
            "keep": self.keep,
            **marks,
            "hash_algorithm": self.hash_algorithm,
            "files": {k: {"size": e.size, "hash": e.hash} for k, e in sorted(self.files.items())},
        }

    def with_tags(self, tags: tuple[str, ...]) -> Manifest:
        return replace(self, tags=tags)


_KNOWN = {
    "format", "format_version", "step", "created", "metrics", "tags", "state", "parent",
    "contents", "versions", "keep", "hash_algorithm", "files", "manifest_hash", "preempted",
    "lineage",
}  # fmt: skip

#: The manifest's own hash: BLAKE3 of its bytes with this field's value written as 64
#: zeros. The field is always last, so a changed byte anywhere in the file (a metric, a
#: listed hash, the field itself) is caught, not only in the files it lists.
MANIFEST_HASH_FIELD = "manifest_hash"
_HASH_PLACEHOLDER = "0" * 64
_HASH_KEY = f'"{MANIFEST_HASH_FIELD}": "'.encode()


def encode_manifest(manifest: Manifest) -> bytes:
    """The bytes of ``manifest``'s ``savepoint.json``."""
    return encode_manifest_json(manifest.to_json())


def encode_manifest_json(data: dict[str, Any]) -> bytes:
    """The bytes of a manifest: ``data`` as JSON with its own hash as the last field."""
    data = {k: v for k, v in data.items() if k != MANIFEST_HASH_FIELD}
    data[MANIFEST_HASH_FIELD] = _HASH_PLACEHOLDER  # last key
    raw = json.dumps(data, indent=1, allow_nan=False).encode()
    at = raw.rindex(_HASH_KEY) + len(_HASH_KEY)
    digest = blake3.blake3(raw).hexdigest().encode()
    return raw[:at] + digest + raw[at + 64 :]


#: Versions of savepoints that wrote manifests without their own hash.
_UNHASHED_VERSIONS = ("0.1.0",)


def manifest_hash_problem(raw: bytes, manifest: Manifest) -> str | None:
    """Why the manifest bytes ``raw`` fail their own hash, or None when they pass."""
    at = raw.rfind(_HASH_KEY)
    if at < 0:
        if manifest.versions.get("savepoints") in _UNHASHED_VERSIONS:
            return None  # written before manifests carried a hash
        return f"its {MANIFEST_HASH_FIELD!r} is missing: the manifest was changed"
    at += len(_HASH_KEY)
    stored = raw[at : at + 64]
    zeroed = raw[:at] + _HASH_PLACEHOLDER.encode() + raw[at + 64 :]
    if blake3.blake3(zeroed).hexdigest().encode() != stored:
        return "its own hash differs: the manifest was changed after it was written"
    return None


def write_manifest(folder: Path, manifest: Manifest, name: str) -> None:
    """Write the manifest into ``folder`` and fsync it (the caller fsyncs the folder)."""
    data = encode_manifest(manifest)
    path = folder / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_manifest(path: Path) -> Manifest:
    """Read and validate a manifest; raise :class:`ManifestError` on anything off."""
    return read_manifest_bytes(path)[0]


def read_manifest_bytes(path: Path) -> tuple[Manifest, bytes]:
    """:func:`read_manifest`, also returning the bytes it parsed (for the self-hash)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ManifestError(path, "the file does not exist") from None
    except OSError as e:
        raise ManifestError(path, f"cannot read it ({e.strerror})") from None
    if size > MAX_MANIFEST_BYTES:
        raise ManifestError(path, f"it is {size} bytes, over the {MAX_MANIFEST_BYTES} byte limit")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ManifestError(path, f"cannot read it ({e.strerror})") from None
    return decode_manifest(raw, path), raw


def decode_manifest(raw: bytes, where: Path | str) -> Manifest:
    """Parse and validate manifest bytes (read from a file, or fetched from a remote
    ``where``); raise :class:`ManifestError` on anything off."""
    if len(raw) > MAX_MANIFEST_BYTES:
        why = f"it is {len(raw)} bytes, over the {MAX_MANIFEST_BYTES} byte limit"
        raise ManifestError(where, why)
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ManifestError(where, f"it is not valid JSON ({type(e).__name__})") from None
    return parse_manifest(data, where)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def parse_manifest(data: Any, path: Path | str) -> Manifest:
    def bad(why: str) -> ManifestError:
        return ManifestError(path, why)

    if not isinstance(data, dict):
        raise bad("the top level is not an object")
    if data.get("format") != FORMAT_NAME:
        raise bad(f"'format' is {data.get('format')!r}, expected {FORMAT_NAME!r}")
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise bad("'format_version' is not a positive integer")
    if version > FORMAT_VERSION:
        writer = (
            data.get("versions", {}).get("savepoints", "?")
            if isinstance(data.get("versions"), dict)
            else "?"
        )
        raise UnsupportedFormatError(path, version, FORMAT_VERSION, str(writer))
    step = data.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise bad("'step' is not a non-negative integer")
    try:
        created = datetime.fromisoformat(str(data.get("created")))
    except ValueError:
        raise bad("'created' is not an ISO 8601 time") from None
    if created.tzinfo is None:
        created = created.replace(tzinfo=timezone.utc)
    metrics = data.get("metrics", {})
    if not isinstance(metrics, dict) or not all(
        isinstance(k, str) and _is_number(v) for k, v in metrics.items()
    ):
        raise bad("'metrics' is not an object of names to numbers")
    tags = data.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise bad("'tags' is not a list of strings")
    state = data.get("state", {})
    if not isinstance(state, dict):
        raise bad("'state' is not an object")
    parent = data.get("parent")
    if parent is not None:
        if not isinstance(parent, dict) or not isinstance(parent.get("step"), int):
            raise bad("'parent' is neither null nor an object with a 'step'")
        parent = parent["step"]
    contents = data.get("contents", {})
    versions = data.get("versions", {})
    if not isinstance(contents, dict) or not isinstance(versions, dict):
        raise bad("'contents' or 'versions' is not an object")
    keep = data.get("keep")
    if keep is not None and not isinstance(keep, dict):
        raise bad("'keep' is neither null nor an object")
    preempted = data.get("preempted")
    if preempted is not None and not isinstance(preempted, str):
        raise bad("'preempted' is neither null nor a string")
    lineage = data.get("lineage")
    odd_lineage: dict[str, Any] = {}
    if lineage is not None:
        why = _lineage_problem(lineage)
        if why is None:
            lineage = _lineage(lineage)
        else:
            # Lineage is a record of origin, never needed to load or resume: a save point
            # whose lineage a newer (or another) writer shaped otherwise stays usable.
            # Its value is kept as written (the self-hash still covers it) but not read.
            log.warning("savepoints: the lineage in %s is not read: %s", path, why)
            odd_lineage, lineage = {"lineage": lineage}, None
    algorithm = data.get("hash_algorithm")
    if algorithm != HASH_ALGORITHM:
        raise bad(f"'hash_algorithm' is {algorithm!r}; this savepoints checks {HASH_ALGORITHM!r}")
    files_raw = data.get("files")
    if not isinstance(files_raw, dict):
        raise bad("'files' is not an object")
    files: dict[str, FileEntry] = {}
    for rel, entry in files_raw.items():
        if not is_safe_relpath(rel):
            raise bad(f"file name {rel!r} is absolute or leaves the folder")
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("size"), int)
            or entry["size"] < 0
            or not isinstance(entry.get("hash"), str)
        ):
            raise bad(f"entry for {rel!r} lacks an integer 'size' or a string 'hash'")
        files[rel] = FileEntry(entry["size"], entry["hash"])
    why = _contents_problem(contents, files)
    if why is not None:
        raise bad(why)
    return Manifest(
        step=step,
        created=created,
        files=files,
        metrics=dict(metrics),
        tags=tuple(tags),
        state=state,
        parent=parent,
        contents=cast(Contents, contents),
        versions={str(k): str(v) for k, v in versions.items()},
        keep=keep,
        preempted=preempted,
        lineage=lineage,
        hash_algorithm=algorithm,
        format_version=version,
        extra={**{k: v for k, v in data.items() if k not in _KNOWN}, **odd_lineage},
    )


def _entry_problem(where: str, info: Any) -> str | None:
    """Why one component entry does not have the shape of :data:`ComponentInfo` (and,
    for the model, :data:`ModelInfo`), or None."""
    if not isinstance(info, dict):
        return f"'{where}' is not an object"
    names = info.get("files", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return f"'{where}.files' is not a list of file names"
    if "class" in info and not isinstance(info["class"], str):
        return f"'{where}.class' is not a string"
    if "keys" in info and info["keys"] != "names":
        return f"'{where}.keys' is {info['keys']!r}, not 'names'"
    if where == "contents.model":
        if "kind" in info and info["kind"] not in MODEL_KINDS:
            return f"'{where}.kind' is {info['kind']!r}, not one of {', '.join(MODEL_KINDS)}"
        tied = info.get("tied", {})
        if not isinstance(tied, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in tied.items()
        ):
            return f"'{where}.tied' is not an object of names to names"
    if where == "contents.rng":
        generators = info.get("generators", [])
        if not isinstance(generators, list) or not all(isinstance(g, str) for g in generators):
            return f"'{where}.generators' is not a list of names"
    return None


def _contents_problem(contents: dict[str, Any], files: dict[str, FileEntry]) -> str | None:
    """Check ``contents`` against :class:`Contents`, and that every file a component is
    read from is one the manifest lists (and so verifies), or the original of a
    compacted one: a hostile manifest cannot point a reader at a file outside its own,
    checked list."""
    for key in COMPONENTS:
        if key in contents:
            why = _entry_problem(f"contents.{key}", contents[key])
            if why is not None:
                return why
    extra = contents.get("extra", {})
    if not isinstance(extra, dict):
        return "'contents.extra' is not an object"
    for name, info in extra.items():
        why = _entry_problem(f"contents.extra.{name}", info)
        if why is not None:
            return why
    why = _ranks_problem(contents.get("ranks", {}))
    if why is not None:
        return why
    placed = contents.get("files", [])
    if not isinstance(placed, list) or not all(isinstance(n, str) for n in placed):
        return "'contents.files' is not a list of file names"
    packed = contents.get("compacted", {})
    if not isinstance(packed, dict):
        return "'contents.compacted' is not an object"
    originals = set()
    for rel, info in packed.items():
        of = info.get("of") if isinstance(info, dict) else None
        if rel not in files:
            return f"compacted file {rel!r} is not among its files"
        if not isinstance(of, str) or not is_safe_relpath(of) or of in files:
            return f"compacted file {rel!r} names no safe original"
        if not isinstance(info.get("size"), int) or not isinstance(info.get("hash"), str):
            return f"compacted file {rel!r} lacks an integer 'size' or a string 'hash'"
        originals.add(of)
    stack: list[Any] = [contents]
    while stack:  # iterative: a deeply nested hostile manifest cannot overflow the stack
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "files" and isinstance(value, list):
                    for ref in value:
                        if not isinstance(ref, str) or (ref not in files and ref not in originals):
                            return f"'contents' reads {ref!r}, which is not among its files"
                else:
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)
    return None


def _ranks_problem(ranks: Any) -> str | None:
    if not isinstance(ranks, dict):
        return "'contents.ranks' is not an object"
    if not ranks:
        return None
    world = ranks.get("world_size")
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        return "'contents.ranks.world_size' is not a positive integer"
    for key in ("written", "rng", "extra"):
        value = ranks.get(key, [])
        if not isinstance(value, list) or len(value) not in (0, world):
            return f"'contents.ranks.{key}' is not a list of one entry per rank"
        for r, entry in enumerate(value):
            entries = (
                entry.items() if key == "extra" and isinstance(entry, dict) else [(key, entry)]
            )
            if key == "extra" and not isinstance(entry, dict):
                return f"'contents.ranks.extra[{r}]' is not an object"
            for name, info in entries:
                why = _entry_problem(f"contents.ranks.{key}[{r}].{name}", info)
                if why is not None:
                    return why
    return None


def _lineage_problem(lineage: Any) -> str | None:
    """Why ``lineage`` does not have the shape of :class:`Lineage`, or None."""
    if not isinstance(lineage, dict):
        return "'lineage' is not an object"
    for key in ("session", "host"):
        if key in lineage and not isinstance(lineage[key], str):
            return f"'lineage.{key}' is not a string"
    command = lineage.get("command", [])
    if not isinstance(command, list) or not all(isinstance(a, str) for a in command):
        return "'lineage.command' is not a list of strings"
    code = lineage.get("code", {})
    if not isinstance(code, dict):
        return "'lineage.code' is not an object"
    for key in ("commit", "branch", "root", "remote"):
        if key in code and not isinstance(code[key], str):
            return f"'lineage.code.{key}' is not a string"
    if "dirty" in code and not isinstance(code["dirty"], bool):
        return "'lineage.code.dirty' is not true or false"
    data = lineage.get("data", {})
    if not isinstance(data, dict):
        return "'lineage.data' is not an object"
    if "fingerprint" in data and not isinstance(data["fingerprint"], str):
        return "'lineage.data.fingerprint' is not a string"
    files = data.get("files", [])
    if not isinstance(files, list):
        return "'lineage.data.files' is not a list"
    for i, entry in enumerate(files):
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("path"), str)
            or not _is_count(entry.get("size"))
            or not isinstance(entry.get("blake3"), str)
            or ("files" in entry and not _is_count(entry["files"]))
        ):
            return f"'lineage.data.files[{i}]' lacks a string 'path', a size or a 'blake3'"
    chain = lineage.get("chain", [])
    if not isinstance(chain, list):
        return "'lineage.chain' is not a list"
    for i, link in enumerate(chain):
        where = f"'lineage.chain[{i}]'"
        if not isinstance(link, dict):
            return f"{where} is not an object"
        if "session" in link and not isinstance(link["session"], str):
            return f"{where}.session is not a string"
        steps = link.get("steps", [])
        if not isinstance(steps, list) or not all(_is_count(s) for s in steps):
            return f"{where}.steps is not a list of steps"
        if "more" in link and not _is_count(link["more"]):
            return f"{where}.more is not a count"
        came = link.get("from")
        if came is not None and (
            not isinstance(came, dict)
            or not _is_count(came.get("step"))
            or ("path" in came and not isinstance(came["path"], str))
        ):
            return f"{where}.from is neither null nor an object with a 'step'"
    return None


def _lineage(data: dict[str, Any]) -> Lineage:
    """A :class:`Lineage` of a checked ``lineage`` object."""
    command = data.get("command")
    return Lineage(
        session=data.get("session"),
        code=cast(CodeInfo, data["code"]) if "code" in data else None,
        data=cast(DataInfo, data["data"]) if "data" in data else None,
        command=None if command is None else tuple(command),
        host=data.get("host"),
        chain=tuple(cast(list[ChainLink], data.get("chain", []))),
        extra={k: v for k, v in data.items() if k not in _LINEAGE_KEYS},
    )


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_safe_relpath(rel: str) -> bool:
    if not rel or "\\" in rel or "\x00" in rel or rel.startswith("/"):
        return False
    parts = rel.split("/")
    return all(p not in ("", ".", "..") for p in parts)
