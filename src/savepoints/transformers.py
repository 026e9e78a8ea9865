"""``from savepoints.transformers import SavePointsCallback, resume_path``.

Imports transformers; the rest of savepoints does not.
"""

from savepoints.integrations.transformers import (
    SavePointsCallback,
    is_savepoint,
    keep_from_args,
    resume_path,
)

__all__ = ["SavePointsCallback", "is_savepoint", "keep_from_args", "resume_path"]
