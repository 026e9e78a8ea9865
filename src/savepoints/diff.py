"""What changed between two save points (or model folders): config, tensors, metrics.

Tensors are read one at a time through safetensors' memory-mapped reader, so comparing
two large models needs memory for one pair of tensors, not two models.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from savepoints.errors import InvalidArgumentError
from savepoints.layout import MANIFEST_NAME
from savepoints.savepoint import SavePoint
from savepoints.serialize import read_json_object
from savepoints.weights import layer_of


@dataclass
class ModelView:
    """A folder's config, metrics and tensor locations, without loading tensors."""

    label: str
    path: Path
    config: dict[str, Any]
    metrics: dict[str, float]
    tensors: dict[str, Path]  # name -> safetensors file holding it

    @classmethod
    def open(cls, path: Path, label: str) -> ModelView:
        from safetensors import safe_open

        metrics: dict[str, float] = {}
        files: list[str] = []
        if (path / MANIFEST_NAME).is_file():
            point = SavePoint.open(path)
            metrics = point.metrics
            files = [f for f in point.contents.get("model", {}).get("files", [])
                     if f.endswith(".safetensors")]  # fmt: skip
        index = read_json_object(path / "model.safetensors.index.json")
        if files:
            tensors = {}
            for rel in files:
                with safe_open(str(path / rel), "pt") as reader:
                    tensors.update({k: path / rel for k in reader.keys()})  # noqa: SIM118
        elif index and isinstance(index.get("weight_map"), dict):
            tensors = {k: path / v for k, v in index["weight_map"].items()}
        elif (path / "model.safetensors").is_file():
            with safe_open(str(path / "model.safetensors"), "pt") as reader:
                tensors = {k: path / "model.safetensors" for k in reader.keys()}  # noqa: SIM118
        else:
            raise InvalidArgumentError(
                f"{path} holds no model weights (model.safetensors or its index).",
                "Compare save points saved with model=..., or model folders.",
            )
        return cls(label, path, read_json_object(path / "config.json") or {}, metrics, tensors)


@dataclass
class TensorChange:
    name: str
    layer: str
    relative_l2: float
    numel: int


@dataclass
class DiffReport:
    a: str
    b: str
    config_changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    metric_changes: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    reshaped: dict[str, tuple[str, str]] = field(default_factory=dict)
    changed: list[TensorChange] = field(default_factory=list)  # sorted, largest first
    unchanged: int = 0
    unchanged_bytes: int = 0
    layers: dict[str, float] = field(default_factory=dict)  # layer -> relative L2 change

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["config_changes"] = {k: list(v) for k, v in self.config_changes.items()}
        out["metric_changes"] = {
            k: {"a": a, "b": b, "delta": None if a is None or b is None else b - a}
            for k, (a, b) in self.metric_changes.items()
        }
        out["reshaped"] = {k: {"a": a, "b": b} for k, (a, b) in self.reshaped.items()}
        return out


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def diff_models(a: ModelView, b: ModelView) -> DiffReport:
    from safetensors import safe_open

    report = DiffReport(a.label, b.label)
    ca, cb = _flatten(a.config), _flatten(b.config)
    for key in sorted(set(ca) | set(cb)):
        if ca.get(key) != cb.get(key):
            report.config_changes[key] = (ca.get(key), cb.get(key))
    for key in sorted(set(a.metrics) | set(b.metrics)):
        va, vb = a.metrics.get(key), b.metrics.get(key)
        if va != vb:
            report.metric_changes[key] = (va, vb)
    report.added = sorted(set(b.tensors) - set(a.tensors))
    report.removed = sorted(set(a.tensors) - set(b.tensors))
    layer_sq: dict[str, list[float]] = {}
    readers: dict[Path, Any] = {}

    def get(path: Path, name: str) -> torch.Tensor:
        if path not in readers:
            readers[path] = safe_open(str(path), "pt")
        return readers[path].get_tensor(name)

    for name in sorted(set(a.tensors) & set(b.tensors)):
        ta, tb = get(a.tensors[name], name), get(b.tensors[name], name)
        if ta.shape != tb.shape or ta.dtype != tb.dtype:
            report.reshaped[name] = (
                f"{tuple(ta.shape)} {str(ta.dtype).removeprefix('torch.')}",
                f"{tuple(tb.shape)} {str(tb.dtype).removeprefix('torch.')}",
            )
            continue
        layer = layer_of(name)
        sums = layer_sq.setdefault(layer, [0.0, 0.0])
        fa = ta.float()
        base = float(torch.linalg.vector_norm(fa))
        sums[1] += base**2
        if torch.equal(ta, tb):
            report.unchanged += 1
            report.unchanged_bytes += ta.numel() * ta.element_size()
            continue
        delta = float(torch.linalg.vector_norm(tb.float() - fa))
        sums[0] += delta**2
        rel = delta / base if base > 0 else math.inf
        report.changed.append(TensorChange(name, layer, rel, ta.numel()))
    report.changed.sort(key=lambda c: c.relative_l2, reverse=True)
    report.layers = {
        layer: (math.sqrt(d) / math.sqrt(n) if n > 0 else (math.inf if d > 0 else 0.0))
        for layer, (d, n) in layer_sq.items()
    }
    return report


def resolve(run: Path, ref: str) -> ModelView:
    """A step or a tag of ``run``, or a folder path."""
    from savepoints.manager import SavePoints

    folder = Path(ref)
    if not ref.isdigit() and folder.is_dir():
        return ModelView.open(folder, ref)
    point = SavePoints(run, readonly=True).get(int(ref) if ref.isdigit() else ref)
    label = f"step {point.step}" + (f" ({', '.join(point.tags)})" if point.tags else "")
    return ModelView.open(point.path, label)


def to_json_text(report: DiffReport) -> str:
    return json.dumps(report.to_json(), indent=2, default=str)
