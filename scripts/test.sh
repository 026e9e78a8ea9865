#!/usr/bin/env bash
# The test suite: set up (first run only), then lint, type-check and run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check src tests examples bench
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
