#!/usr/bin/env bash
# The test suite: set up (first run only), then lint, check formatting, type-check and run
# pytest; then the Trainer integration's tests again against the oldest versions
# savepoints promises (scripts/min-versions.txt, in .venv-min). Run with test paths (a
# subset), it runs only those, in .venv. SAVEPOINTS_MIN_VERSIONS=0 skips the
# oldest-versions run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check src tests examples bench
.venv/bin/ruff format --check src tests examples bench
.venv/bin/mypy
.venv/bin/python -m pytest "$@"

for arg in "$@"; do
    if [[ "$arg" != -* && -e "${arg%%::*}" ]]; then
        exit 0  # a chosen subset of the tests: not the oldest-versions run
    fi
done
if [ "${SAVEPOINTS_MIN_VERSIONS:-1}" = "0" ]; then
    exit 0
fi
# The Trainer integration replaces private Trainer methods: check it against the oldest
# transformers (and torch, tokenizers, accelerate...) that pyproject.toml allows.
VENV=.venv-min EXTRAS=transformers CONSTRAINTS=scripts/min-versions.txt TORCH_SPEC=torch \
    scripts/setup.sh
echo "==> the Trainer tests on the oldest supported versions (.venv-min):" "$(.venv-min/bin/python -c '
from importlib.metadata import version
print(", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "tokenizers", "accelerate")))')"
# Only what goes through the Trainer (about 4 minutes on 2 cores): the async variants
# call the Trainer exactly as the sync ones do, and one `savepoints train` resume covers
# the CLI (it caught 4.50's eager-attention reloads).
status=0
.venv-min/bin/python -m pytest "$@" tests/test_versions_trainer.py tests/test_transformers.py \
    tests/test_train_cli.py::test_train_killed_with_sigkill_resumes_and_ends_bit_exact \
    --deselect "tests/test_transformers.py::test_interrupted_trainer_resumes_bit_exactly[mid-epoch-async-saves]" \
    --deselect "tests/test_transformers.py::test_preempted_trainer_saves_at_the_step_boundary_exits_75_and_resumes_exactly[SIGUSR1-async]" \
    || status=$?
# 5: no test selected (a -k that matches only tests outside the Trainer's).
[ "$status" -eq 5 ] && status=0
exit "$status"
