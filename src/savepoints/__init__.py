"""savepoints: atomic, verified, pickle-free save points for PyTorch and Transformers.

from savepoints import SavePoints, Keep
with SavePoints("runs/my-run", keep=Keep(last=3, best=1, metric="eval_loss")) as points:
    points.save(step, model=model, optimizer=optimizer, metrics={"eval_loss": 0.4})
    state = points.restore(model=model, optimizer=optimizer)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from savepoints.errors import (
    CorruptSavePointError,
    DataFileError,
    DestinationMovedError,
    DirtyWorkingTreeError,
    DiskFullError,
    HubError,
    IncompatibleTransformersError,
    InvalidArgumentError,
    KeyFileError,
    ManifestError,
    MetricNotFoundError,
    MissingDependencyError,
    NotAGitRepositoryError,
    NotARunError,
    NothingToPublishError,
    NothingToRestoreError,
    PublishedTagConflictError,
    PublishError,
    RankFailedError,
    RanksDisagreeError,
    RanksError,
    RanksTimeoutError,
    ReadOnlyRunError,
    RunClosedError,
    RunLockedError,
    RunNotFoundError,
    RunNotWritableError,
    SavePointExistsError,
    SavePointGoneError,
    SavePointNotFoundError,
    SavePointsError,
    SignatureInvalidError,
    SignatureMismatchError,
    SigningError,
    SignRefusedError,
    SnapshotChangedError,
    StateMismatchError,
    TagInUseError,
    ToolNotFoundError,
    UnserializableStateError,
    UnsignedError,
    UnsupportedFormatError,
    UntrustedSignatureError,
)
from savepoints.version import __version__

if TYPE_CHECKING:
    from savepoints.integrity import Problem, VerifyReport, verify
    from savepoints.keep import Keep
    from savepoints.manager import SavePoints
    from savepoints.preemption import EXIT_DEADLINE, EXIT_PREEMPTED, Preemption
    from savepoints.savepoint import SavePoint

# Imported on first use (PEP 562): ``import savepoints`` and the errors cost no torch
# import, so a command that needs none (``predict`` on an ONNX bundle) runs without it.
_LAZY = {
    "Problem": "savepoints.integrity",
    "VerifyReport": "savepoints.integrity",
    "verify": "savepoints.integrity",
    "Keep": "savepoints.keep",
    "SavePoints": "savepoints.manager",
    "EXIT_DEADLINE": "savepoints.preemption",
    "EXIT_PREEMPTED": "savepoints.preemption",
    "Preemption": "savepoints.preemption",
    "SavePoint": "savepoints.savepoint",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'savepoints' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "EXIT_DEADLINE",
    "EXIT_PREEMPTED",
    "CorruptSavePointError",
    "DataFileError",
    "DestinationMovedError",
    "DirtyWorkingTreeError",
    "DiskFullError",
    "HubError",
    "IncompatibleTransformersError",
    "InvalidArgumentError",
    "Keep",
    "KeyFileError",
    "ManifestError",
    "MetricNotFoundError",
    "MissingDependencyError",
    "NotAGitRepositoryError",
    "NotARunError",
    "NothingToPublishError",
    "NothingToRestoreError",
    "Preemption",
    "Problem",
    "PublishError",
    "PublishedTagConflictError",
    "RankFailedError",
    "RanksDisagreeError",
    "RanksError",
    "RanksTimeoutError",
    "ReadOnlyRunError",
    "RunClosedError",
    "RunLockedError",
    "RunNotFoundError",
    "RunNotWritableError",
    "SavePoint",
    "SavePointExistsError",
    "SavePointGoneError",
    "SavePointNotFoundError",
    "SavePoints",
    "SavePointsError",
    "SignRefusedError",
    "SignatureInvalidError",
    "SignatureMismatchError",
    "SigningError",
    "SnapshotChangedError",
    "StateMismatchError",
    "TagInUseError",
    "ToolNotFoundError",
    "UnserializableStateError",
    "UnsignedError",
    "UnsupportedFormatError",
    "UntrustedSignatureError",
    "VerifyReport",
    "__version__",
    "verify",
]
