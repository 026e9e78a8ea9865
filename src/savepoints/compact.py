"""Lossless compression of save points that are kept but rarely read.

``compact`` rewrites a save point's safetensors files (weights, optimizer and other
training state) as ``<name>.zbg`` files: the safetensors header zstd-compressed, then each
tensor's bytes split into byte planes (all first bytes, all second bytes...; "byte
grouping", as in ZipNN) and each plane zstd-compressed. Float exponents vary little in
trained weights, so their plane compresses well while mantissas stay near-random:
MiniLM compresses to 1/1.19 in fp32 and 1/1.41 in bf16 (``bench/compression_ratio.py``).

Decompression rebuilds the original file byte for byte; the manifest keeps each original's
size and hash, so what comes out is verified. ``restore()`` reads compacted save points
transparently; ``from_pretrained`` needs them expanded first (``expand``), which is why
the latest save point is usually left as it is.

zstandard is an optional dependency: ``pip install 'savepoints[compact]'``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from savepoints.errors import (
    CorruptSavePointError,
    InvalidArgumentError,
    MissingDependencyError,
)
from savepoints.integrity import hash_file
from savepoints.manifest import CompactedInfo, Contents, FileEntry, Manifest
from savepoints.serialize import component_path, dtype_width

SUFFIX = ".zbg"
MAGIC = b"SPZBG1\n\0"
LEVEL = 3


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError:
        raise MissingDependencyError("Compacting save points", "zstandard", "compact") from None
    return zstandard


def compress_file(source: Path, target: Path) -> None:
    """Write ``source`` (a safetensors file) to ``target`` in the byte-grouped format."""
    zstd = _zstd()
    cctx = zstd.ZstdCompressor(level=LEVEL)
    raw = memoryview(source.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(bytes(raw[8 : 8 + header_len]))
    data_start = 8 + header_len
    pieces: list[bytes] = [cctx.compress(raw[:data_start])]
    layout: list[list[int]] = [[len(pieces[0])]]
    spans = sorted(
        (v["data_offsets"][0], v["data_offsets"][1], dtype_width(v["dtype"]))
        for k, v in header.items() if k != "__metadata__"
    )  # fmt: skip
    for begin, end, width in spans:
        chunk = np.frombuffer(raw[data_start + begin : data_start + end], dtype=np.uint8)
        if width > 1 and len(chunk) % width == 0 and len(chunk):
            planes = chunk.reshape(-1, width).T
            parts = [cctx.compress(np.ascontiguousarray(p).tobytes()) for p in planes]
        else:
            parts = [cctx.compress(chunk.tobytes())]
        pieces.extend(parts)
        layout.append([len(p) for p in parts])
    index = json.dumps({"size": len(raw), "layout": layout, "spans": spans}).encode()
    with open(target, "xb") as f:
        f.write(MAGIC + struct.pack("<Q", len(index)) + index)
        for piece in pieces:
            f.write(piece)
        f.flush()
        os.fsync(f.fileno())


def decompress_file(source: Path, target: Path) -> None:
    """Rebuild the original safetensors file from a ``.zbg`` file, byte for byte."""
    zstd = _zstd()
    dctx = zstd.ZstdDecompressor()
    raw = memoryview(source.read_bytes())

    def corrupt(why: str) -> CorruptSavePointError:
        return CorruptSavePointError(source.parent, [f"{source.name}: {why}"],
                                     failed="cannot be read")  # fmt: skip

    if bytes(raw[: len(MAGIC)]) != MAGIC:
        raise corrupt("not a compacted savepoints file")
    (index_len,) = struct.unpack("<Q", raw[len(MAGIC) : len(MAGIC) + 8])
    pos = len(MAGIC) + 8
    if index_len > len(raw) - pos:
        raise corrupt("its index is longer than the file")
    index = json.loads(bytes(raw[pos : pos + index_len]))
    pos += index_len
    total = index["size"]
    out = bytearray()
    produced = 0
    for i, sizes in enumerate(index["layout"]):
        parts: list[bytes] = []
        for size in sizes:
            frame = raw[pos : pos + size]
            # A frame says how large it decompresses; never believe more than the file
            # as a whole may hold (a decompression bomb would otherwise allocate it).
            expect = zstd.frame_content_size(frame)
            produced += expect
            if expect < 0 or produced > total:
                raise corrupt("a compressed frame is larger than the file it rebuilds")
            parts.append(dctx.decompress(frame))
            pos += size
        if i == 0 or len(parts) == 1:
            out += parts[0]
        else:
            planes = np.stack([np.frombuffer(p, dtype=np.uint8) for p in parts])
            out += np.ascontiguousarray(planes.T).tobytes()
    if len(out) != total:
        raise corrupt("it decompressed to the wrong size")
    with open(target, "xb") as f:
        f.write(out)


def require_plain(folder: Path, manifest: Manifest, action: str) -> None:
    """Refuse, clearly, to hand a compacted save point to code that reads files directly."""
    if compacted(manifest):
        raise InvalidArgumentError(
            f"Save point {folder} is compacted (compressed), so it cannot be used to {action} "
            "as it is.",
            f"Expand it first: savepoints expand {folder.parent} {manifest.step} "
            "(restore() reads compacted save points directly).",
        )


def compacted(manifest: Manifest) -> dict[str, CompactedInfo]:
    """``{compressed file: {"of": original, "size": ..., "hash": ...}}``."""
    return dict(manifest.contents.get("compacted", {}))


@contextlib.contextmanager
def expanded_view(folder: Path, manifest: Manifest) -> Iterator[Path]:
    """A folder in which a compacted save point reads like the original: hard links (or
    copies) of its plain files and decompressed, verified originals of the rest. A plain
    save point is its own view (nothing is written)."""
    packed = compacted(manifest)
    if not packed:
        yield folder
        return
    view = Path(tempfile.mkdtemp(prefix="savepoints-expand-"))
    try:
        for rel in manifest.files:
            if rel in packed:
                continue
            (view / rel).parent.mkdir(parents=True, exist_ok=True)
            source = component_path(folder, rel)
            try:
                os.link(source, view / rel, follow_symlinks=False)
            except OSError:
                shutil.copyfile(source, view / rel)
        for rel, info in packed.items():
            target = view / info["of"]
            target.parent.mkdir(parents=True, exist_ok=True)
            decompress_file(component_path(folder, rel), target)
            _check(target, info)
        yield view
    finally:
        shutil.rmtree(view, ignore_errors=True)


def _check(path: Path, info: CompactedInfo) -> None:
    size, digest = hash_file(path)
    if size != info["size"] or digest != info["hash"]:
        raise CorruptSavePointError(path, [f"{info['of']}: decompressed bytes differ"])


def rewrite(folder: Path, manifest: Manifest, staging: Path, compress: bool) -> Manifest:
    """Build the compacted (or expanded) version of ``folder`` in ``staging``; returns its
    manifest, which the commit writes last. Unchanged files are hard-linked, not copied."""
    packed = compacted(manifest)
    files: dict[str, FileEntry] = {}
    new_packed: dict[str, CompactedInfo] = {}
    if compress:
        todo = {rel for rel in manifest.files if rel.endswith(".safetensors")}
    else:
        todo = set(packed)
    if not todo:
        raise InvalidArgumentError(
            f"Save point {folder} is already {'compacted' if compress else 'expanded'}.",
            "Nothing to do.",
        )
    for rel, entry in manifest.files.items():
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel not in todo:
            try:
                os.link(folder / rel, target)
            except OSError:
                shutil.copyfile(folder / rel, target)
            files[rel] = entry
            if rel in packed:
                new_packed[rel] = packed[rel]
            continue
        if compress:
            out = staging / (rel + SUFFIX)
            compress_file(folder / rel, out)
            files[rel + SUFFIX] = FileEntry(*hash_file(out))
            new_packed[rel + SUFFIX] = {"of": rel, "size": entry.size, "hash": entry.hash}
        else:
            original = packed[rel]["of"]
            decompress_file(folder / rel, staging / original)
            _check(staging / original, packed[rel])
            with open(staging / original, "rb") as f:
                os.fsync(f.fileno())
            files[original] = FileEntry(packed[rel]["size"], packed[rel]["hash"])
    contents: Contents = {**manifest.contents}
    if new_packed:
        contents["compacted"] = new_packed
    else:
        contents.pop("compacted", None)
    return replace(manifest, files=files, contents=contents)
