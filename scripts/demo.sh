#!/usr/bin/env bash
# The demo: set up (first run only), then train, kill, resume, predict and verify.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/savepoints demo "$@"
