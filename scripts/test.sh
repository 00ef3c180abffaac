#!/usr/bin/env bash
# The test suite: set up if needed, then run every test (slow ones included; -m "not slow"
# for the fast subset). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${FEDTUNE_VENV:-.venv}"
exec "$VENV/bin/python" -m pytest -q "$@"
