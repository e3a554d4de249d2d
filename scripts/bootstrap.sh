#!/usr/bin/env bash
# Set up everything the demo and the tests need, idempotently:
# a virtualenv in .venv with clustorage installed (editable) and, where missing, tmux
# (and PostgreSQL, for the high-availability tests).
# Usage: scripts/bootstrap.sh [EXTRAS]   (EXTRAS defaults to "test")
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-test}"
py="${PYTHON:-python3}"

if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "clustorage needs Python 3.11 or newer; '$py' is $("$py" --version 2>&1)." >&2
    echo "Set PYTHON=/path/to/python3.11 and run again." >&2
    exit 2
fi

# Debian packages the tests, the demo or the benchmarks use, where missing: tmux; PostgreSQL for
# the high-availability tests (Debian's initdb and postgres); Redis for the benchmarks' peer;
# Chromium for the JupyterLab check in a real browser. They install while pip does.
missing=()
command -v tmux >/dev/null 2>&1 || missing+=(tmux)
if [ "$extras" != bench ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
    && ! command -v initdb >/dev/null 2>&1; then
    missing+=(postgresql)
fi
[ "$extras" = bench ] && ! command -v redis-server >/dev/null 2>&1 && missing+=(redis-server)
[ "$extras" = browser ] && [ ! -x /usr/bin/chromium ] && missing+=(chromium)
# As root, apt-get installs them all; otherwise sudo installs only tmux, which the demo needs.
if [ "$(id -u)" != 0 ]; then
    [ "${#missing[@]}" -gt 0 ] && echo "not installed: ${missing[*]}; the tests that need them skip." >&2
    command -v sudo >/dev/null 2>&1 && [[ " ${missing[*]} " == *" tmux "* ]] && missing=(tmux) || missing=()
fi
apt_pid=""
if [ "${#missing[@]}" -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${missing[*]} (apt-get)" >&2
    as_root=()
    [ "$(id -u)" = 0 ] || as_root=(sudo)
    (
        "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
        "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    ) &
    apt_pid=$!
elif [ "${#missing[@]}" -gt 0 ]; then
    echo "install ${missing[*]} with your package manager (brew/apt/dnf)." >&2
fi

venv="$here/.venv"
stamp="$venv/.clustorage-$extras"
if [ ! -x "$venv/bin/python" ]; then
    "$py" -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$here/pyproject.toml" -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install -q --upgrade pip >&2
    "$venv/bin/python" -m pip install -q -e "$here[$extras]" >&2
    touch "$stamp"
fi

# Bytecode for the package, as pip writes it for an installed one: an editable install
# compiles its modules at every start where writing bytecode is turned off
# (PYTHONDONTWRITEBYTECODE), about 50 ms of each process's start. A module that does not
# compile is reported here and again, with its traceback, by whatever imports it.
"$venv/bin/python" -m compileall -q "$here/clustorage" >&2 || true

if [ -n "$apt_pid" ] && ! wait "$apt_pid"; then
    echo "apt-get could not install ${missing[*]}; the tests that need them will skip." >&2
fi
