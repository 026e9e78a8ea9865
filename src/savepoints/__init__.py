"""savepoints: atomic, verified, pickle-free save points for PyTorch and Transformers.

from savepoints import SavePoints, Keep
with SavePoints("runs/my-run", keep=Keep(last=3, best=1, metric="eval_loss")) as points:
    points.save(step, model=model, optimizer=optimizer, metrics={"eval_loss": 0.4})
    state = points.restore(model=model, optimizer=optimizer)
"""

from __future__ import annotations

from savepoints.errors import (
    CorruptSavePointError,
    DataFileError,
    DestinationMovedError,
    DirtyWorkingTreeError,
    DiskFullError,
    HubError,
    IncompatibleTransformersError,
    InvalidArgumentError,
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
    SnapshotChangedError,
    StateMismatchError,
    TagInUseError,
    ToolNotFoundError,
    UnserializableStateError,
    UnsupportedFormatError,
)
from savepoints.integrity import Problem, VerifyReport, verify
from savepoints.keep import Keep
from savepoints.manager import SavePoints
from savepoints.preemption import EXIT_DEADLINE, EXIT_PREEMPTED, Preemption
from savepoints.savepoint import SavePoint
from savepoints.version import __version__

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
    "SnapshotChangedError",
    "StateMismatchError",
    "TagInUseError",
    "ToolNotFoundError",
    "UnserializableStateError",
    "UnsupportedFormatError",
    "VerifyReport",
    "__version__",
    "verify",
]
