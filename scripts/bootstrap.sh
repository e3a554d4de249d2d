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

if ! command -v tmux >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing tmux (apt-get)" >&2
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tmux >/dev/null
    elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
        sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tmux >/dev/null
    else
        echo "tmux is not installed; install it with your package manager (brew/apt/dnf install tmux)." >&2
    fi
fi

# The high-availability tests start a private PostgreSQL server (Debian's initdb and postgres).
if [ "$extras" != bench ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
    && ! command -v initdb >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing postgresql (apt-get) for the high-availability tests" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null || true
fi

# The benchmarks compare against Redis when its server is installed.
if [ "$extras" = bench ] && ! command -v redis-server >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing redis-server (apt-get) for the benchmarks" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null || true
fi

# The JupyterLab check in a real browser drives Debian's Chromium.
if [ "$extras" = browser ] && [ ! -x /usr/bin/chromium ] \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium (apt-get) for the browser check" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || true
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
