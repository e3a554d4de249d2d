#!/usr/bin/env bash
# The test command: set up, then lint (ruff), type-check (mypy --strict) and run the whole suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k handshake
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The test extras, and JupyterLab, Playwright and Chromium for the browser check.
"$here/scripts/bootstrap.sh" browser
cd "$here"
bin="$here/.venv/bin"
"$bin/ruff" format --check clustorage tests bench demo
"$bin/ruff" check clustorage tests bench demo
"$bin/mypy" clustorage
# Two workers, each running a test file at a time (a file's tests share fixtures, in order):
# the tests mostly wait on the processes they start. '-n 0' runs them in this process.
exec "$bin/python" -m pytest -n 2 --dist loadfile "$@"
