#!/usr/bin/env bash
# The test suite: set up if needed, then run every test (slow ones included; -m "not slow"
# for the fast subset). Extra arguments go to pytest (one pytest process).
#
# With no arguments (CI, the README), the tests that mostly wait on Flower's own timers (a
# killed SuperNode is dropped after its 30 s heartbeats; hung clients hit the round timeout)
# run in a second pytest process beside the rest, so their idle minutes overlap real work;
# their output follows the main run's, and the exit status fails if either fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${FEDTUNE_VENV:-.venv}"
if [ "$#" -gt 0 ]; then
  exec "$VENV/bin/python" -m pytest -q "$@"
fi
WAITING=(tests/test_deploy.py tests/test_faults.py)
log="$(mktemp)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "${WAITING[@]}" >"$log" 2>&1 &
side=$!
main=0
"$VENV/bin/python" -m pytest -q "${WAITING[@]/#/--ignore=}" || main=$?
wait "$side" && side_rc=0 || side_rc=$?
echo "== ${WAITING[*]} (run beside the rest):"
cat "$log"
rm -f "$log"
[ "$main" -eq 0 ] && [ "$side_rc" -eq 0 ]
