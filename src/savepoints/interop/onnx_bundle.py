"""Run an ONNX bundle written by ``savepoints export --format onnx``: ONNX Runtime and the
tokenizer's own library (``tokenizers``), nothing else.

This module must not import torch or transformers, directly or through ``savepoints``:
a deployment that has ONNX Runtime only is the reason the bundle exists, and a test runs
``savepoints predict`` on a bundle with torch made unimportable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from savepoints.errors import (
    CorruptSavePointError,
    InvalidArgumentError,
    MissingDependencyError,
    SavePointsError,
    UnsupportedFormatError,
)
from savepoints.integrity import Problem, hash_file

BUNDLE_INFO = "savepoints-onnx.json"
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
FORMAT = "savepoints-onnx"
#: Bundle versions this savepoints reads.
VERSION = 1
#: Files of a bundle that are not hashed into its info: the model card is meant to be
#: edited before publishing, and a signature is added after the export.
UNHASHED = frozenset({BUNDLE_INFO, "README.md", "model.sig"})


class CorruptBundleError(CorruptSavePointError):
    """An ONNX bundle's files are not what the export wrote, or its info is unreadable."""

    def __init__(self, path: Path, problems: list[str], why: str = "fails verification") -> None:
        self.path = path
        self.problems = problems
        SavePointsError.__init__(
            self,
            f"The ONNX bundle {path} {why}: {', '.join(problems[:8])}.",
            "Export it again from its save point (`savepoints export RUN OUT --format onnx`); "
            "predict --no-verify uses it anyway, at your own risk.",
        )


def is_bundle(path: Path) -> bool:
    """Whether ``path`` is a folder holding an ONNX bundle."""
    return (path / BUNDLE_INFO).is_file()


def file_hashes(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and BLAKE3 of every file under ``folder`` but :data:`UNHASHED`, by relative path."""
    out: dict[str, dict[str, Any]] = {}
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            if rel not in UNHASHED:
                size, digest = hash_file(path)
                out[rel] = {"size": size, "blake3": digest}
    return out


@dataclass(frozen=True)
class Prediction:
    text: str
    label: str
    probability: float

    def as_dict(self) -> dict[str, Any]:
        return {"text": self.text, "label": self.label, "probability": self.probability}


class OnnxBundle:
    """An exported bundle: its info (labels, padding, where it came from) and, once
    :meth:`classify` is first called, an ONNX Runtime session and the tokenizer."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        info_path = self.path / BUNDLE_INFO
        try:
            info = json.loads(info_path.read_bytes())
        except FileNotFoundError:
            raise InvalidArgumentError(
                f"{self.path} is not an ONNX bundle: it has no {BUNDLE_INFO}.",
                "Write one with `savepoints export RUN OUT --format onnx`.",
            ) from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptBundleError(self.path, [f"{BUNDLE_INFO} is not JSON ({e})"],
                                     "cannot be read") from None  # fmt: skip
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise CorruptBundleError(self.path, [f"{BUNDLE_INFO} has no format {FORMAT!r}"],
                                     "cannot be read")  # fmt: skip
        if not isinstance(info.get("version"), int) or info["version"] > VERSION:
            found = info.get("version")
            writer = str(info.get("savepoints", "another"))
            found = found if isinstance(found, int) else -1
            raise UnsupportedFormatError(info_path, found, VERSION, writer)
        self.info: dict[str, Any] = info
        try:
            self.labels = {int(k): str(v) for k, v in dict(info.get("id2label") or {}).items()}
        except (TypeError, ValueError):
            raise CorruptBundleError(self.path, [f"{BUNDLE_INFO} has malformed 'id2label'"],
                                     "cannot be read") from None  # fmt: skip
        self._session: Any = None
        self._tokenizer: Any = None

    @property
    def source(self) -> dict[str, Any]:
        """The save point it was exported from: path, step, metrics."""
        src = self.info.get("source")
        return src if isinstance(src, dict) else {}

    @property
    def quantize(self) -> str | None:
        q = self.info.get("quantize")
        return q if isinstance(q, str) else None

    def verify(self) -> list[Problem]:
        """Every file the export hashed, re-hashed: missing or altered ones. A bundle that
        lists no hashes, or not those of its model and tokenizer, cannot be verified."""
        files = self.info.get("files")
        if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
            return [Problem("manifest", BUNDLE_INFO, "it records no file hashes to check")]
        problems: list[Problem] = [
            Problem("manifest", rel, "the bundle's file list leaves it out")
            for rel in (str(self.info.get("model", MODEL_FILE)), TOKENIZER_FILE)
            if rel not in files
        ]
        for rel, entry in files.items():
            path = self.path / rel
            if not path.is_file():
                problems.append(Problem("missing", rel, "listed in the bundle, not on disk"))
                continue
            size, digest = hash_file(path)
            if size != entry.get("size") or digest != entry.get("blake3"):
                problems.append(Problem("altered", rel, "its content differs from the export"))
        return problems

    def raise_if_altered(self) -> None:
        problems = self.verify()
        if problems:
            raise CorruptBundleError(self.path, [
                f"{p.path} ({p.detail if p.kind == 'manifest' else p.kind})" for p in problems
            ])  # fmt: skip

    def _load(self) -> None:
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError as e:
            package = "tokenizers" if "tokenizers" in str(e) else "onnxruntime"
            raise MissingDependencyError("running an ONNX bundle", package, "onnx") from None
        tok_path = self.path / TOKENIZER_FILE
        if not tok_path.is_file():
            raise InvalidArgumentError(
                f"The ONNX bundle {self.path} has no {TOKENIZER_FILE} (a fast tokenizer).",
                "Export it again with a current savepoints, which writes one.",
            )
        try:
            tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as e:  # tokenizers raises its own Exception subclass
            raise CorruptBundleError(self.path, [f"{TOKENIZER_FILE} ({e})"],
                                     "cannot be read") from None  # fmt: skip
        if self.info.get("truncation_side") in ("left", "right"):
            truncation_direction = str(self.info["truncation_side"])
        else:
            truncation_direction = "right"
        pad_id = self.info.get("pad_token_id")
        if isinstance(pad_id, int):
            tokenizer.enable_padding(
                pad_id=pad_id,
                pad_token=tokenizer.id_to_token(pad_id) or "[PAD]",
                direction=self.info.get("padding_side", "right"),
            )
        max_length = self.info.get("max_length")
        if isinstance(max_length, int):
            tokenizer.enable_truncation(max_length=max_length, direction=truncation_direction)
        model = self.path / str(self.info.get("model", MODEL_FILE))
        try:
            self._session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own errors (a damaged or missing graph)
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CorruptBundleError(self.path, [f"{model.name} ({why})"],
                                     "cannot be loaded by ONNX Runtime") from None  # fmt: skip
        self._tokenizer = tokenizer

    def logits(self, texts: Sequence[str]) -> Any:
        """The model's logits for ``texts``, one batch (a numpy array)."""
        import numpy as np

        if self._session is None:
            self._load()
        encs = self._tokenizer.encode_batch(list(texts))
        feed = {
            "input_ids": np.array([e.ids for e in encs], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encs], dtype=np.int64),
        }
        (out,) = self._session.run(["logits"], feed)
        return out

    def classify(self, texts: Sequence[str], batch_size: int = 32) -> list[Prediction]:
        """The label and its probability for each text."""
        import numpy as np

        results: list[Prediction] = []
        for start in range(0, len(texts), batch_size):
            batch = list(texts[start : start + batch_size])
            logits = self.logits(batch).astype(np.float64)
            logits -= logits.max(axis=-1, keepdims=True)
            probs = np.exp(logits)
            probs /= probs.sum(axis=-1, keepdims=True)
            for text, p in zip(batch, probs):
                i = int(p.argmax())
                label = self.labels.get(i, f"LABEL_{i}")
                results.append(Prediction(text, label, round(float(p[i]), 4)))
        return results
