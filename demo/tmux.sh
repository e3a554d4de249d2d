#!/usr/bin/env bash
# The Clustorage demo: three nodes, each a clustorage-shell in a window of tmux session
# "clustor": app1 (the loader), app2 and app3 (members). Sets itself up on a fresh machine
# (scripts/bootstrap.sh: a .venv with clustorage, and tmux if missing).
#
#   demo/tmux.sh                   start the demo, or restart the windows that closed, and attach
#   demo/tmux.sh --tls             the same over TLS, with certificates made by 'clustorage tls
#                                  init' in the demo's state folder (needs clustorage[tls])
#   demo/tmux.sh --reset           end it and delete its state (cookie, data, certificates)
#   tmux kill-session -t clustor   end it, keeping its state
#
# Environment (all optional):
#   CLUSTORAGE_DEMO_PORT    the loader's port on 127.0.0.1 (default 43700)
#   CLUSTORAGE_DEMO_DIR     the demo's state: cookie and data (default ~/.clustorage/demo)
#   CLUSTORAGE_DEMO_TMUX    a tmux socket name (tmux -L) to run the demo on its own server
#   CLUSTORAGE_DEMO_DETACH  set to 1 to leave the session detached even in a terminal
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
self="$here/demo/tmux.sh"
session=clustor

# One window's program: called by tmux as `demo/tmux.sh --window NAME PORT DIR [tls]`.
if [ "${1:-}" = "--window" ]; then
    name="$2"
    export CLUSTORAGE_DEMO_PORT="$3" CLUSTORAGE_DEMO_DIR="$4"
    unset CLUSTORAGE_NAME CLUSTORAGE_LOADER CLUSTORAGE_COOKIE CLUSTORAGE_LISTEN CLUSTORAGE_DATA
    unset CLUSTORAGE_TLS_CERT CLUSTORAGE_TLS_KEY CLUSTORAGE_TLS_CA
    if [ "${5:-}" = tls ]; then
        export CLUSTORAGE_TLS_CERT="$4/tls/$name.pem" CLUSTORAGE_TLS_KEY="$4/tls/$name-key.pem"
        export CLUSTORAGE_TLS_CA="$4/tls/ca.pem"
    fi
    set -a
    # shellcheck source=/dev/null
    . "$here/demo/env/$name"
    set +a
    cd "$here"
    status=0
    "$here/.venv/bin/clustorage-shell" --cookie-file "$CLUSTORAGE_DEMO_DIR/cookie" || status=$?
    if [ "$status" -ne 0 ]; then
        echo "clustorage-shell $name exited with status $status; press Enter to close." >&2
        read -r _ || true
    fi
    exit "$status"
fi

tls=""
if [ "${1:-}" = "--tls" ]; then
    tls=tls
    shift
fi
port="${CLUSTORAGE_DEMO_PORT:-43700}"
state="${CLUSTORAGE_DEMO_DIR:-$HOME/.clustorage/demo}"
tmux_cmd=(tmux)
if [ -n "${CLUSTORAGE_DEMO_TMUX:-}" ]; then
    tmux_cmd=(tmux -L "$CLUSTORAGE_DEMO_TMUX")
fi
attach_hint="${tmux_cmd[*]} attach -t $session"

if [ "${1:-}" = "--reset" ]; then
    if "${tmux_cmd[@]}" has-session -t "=$session" 2>/dev/null; then
        "${tmux_cmd[@]}" kill-session -t "=$session"
        echo "Ended tmux session '$session'."
    fi
    rm -f "$state/cookie"
    rm -rf "$state/data" "$state/tls"
    rmdir "$state" 2>/dev/null || true
    echo "Deleted the demo's cookie and data in $state; demo/tmux.sh starts afresh."
    exit 0
fi

"$here/scripts/bootstrap.sh"
command -v tmux >/dev/null 2>&1 || { echo "the demo needs tmux; install it and run again." >&2; exit 2; }

# The windows of the session that are still open (none when there is no session).
open_windows() {
    "${tmux_cmd[@]}" list-windows -t "=$session" -F '#{window_name}' 2>/dev/null || true
}

# Open window $1 (a new session for the first one) running its node.
open_window() {
    if "${tmux_cmd[@]}" has-session -t "=$session" 2>/dev/null; then
        "${tmux_cmd[@]}" new-window -d -t "=$session:" -n "$1" \
            "$self" --window "$1" "$port" "$state" $tls
    else
        "${tmux_cmd[@]}" new-session -d -s "$session" -n "$1" -x 160 -y 45 \
            "$self" --window "$1" "$port" "$state" $tls
    fi
}

# Wait until the loader's prompt is up (it listens by then), or fail showing its window.
wait_for_loader() {
    local screen=""
    for _ in $(seq 1 300); do
        screen="$("${tmux_cmd[@]}" capture-pane -p -J -t "=$session:app1" 2>/dev/null || true)"
        case "$screen" in
            *"app1> "*) return 0 ;;
            *"exited with status"*) break ;;
        esac
        sleep 0.1
    done
    echo "app1 did not start; its window says:" >&2
    echo "$screen" >&2
    echo "(see it with: $attach_hint)" >&2
    exit 1
}

# The cluster's secret: generated once, private to this user, never in the repository.
# Every folder it makes is private (0700), whatever the umask.
(umask 077 && mkdir -p "$state")
chmod 700 "$state"
if [ ! -s "$state/cookie" ]; then
    (umask 077 && "$here/.venv/bin/python" -c 'import secrets; print(secrets.token_urlsafe(32))' >"$state/cookie")
fi
chmod 600 "$state/cookie"
# Over TLS: a private CA and a certificate per node, made once (keys 0600).
if [ -n "$tls" ] && [ ! -s "$state/tls/ca.pem" ]; then
    "$here/.venv/bin/clustorage" tls init "$state/tls" --node app1 --node app2 --node app3 >/dev/null
fi

running="$(open_windows)"
started=()
for name in app1 app2 app3; do
    if ! grep -qx "$name" <<<"$running"; then
        open_window "$name"
        started+=("$name")
        # Members join once the loader listens.
        if [ "$name" = app1 ]; then wait_for_loader; fi
    fi
done
if [ -z "$running" ]; then
    echo "Started the demo in tmux session '$session': windows app1 (loader), app2, app3."
elif [ "${#started[@]}" -eq 0 ]; then
    echo "The demo already runs in tmux session '$session': windows app1 (loader), app2, app3."
else
    echo "The demo runs in tmux session '$session'; restarted window(s): ${started[*]}."
fi

if [ -t 0 ] && [ -t 1 ] && [ "${CLUSTORAGE_DEMO_DETACH:-0}" != 1 ]; then
    if [ -n "${TMUX:-}" ] && [ -z "${CLUSTORAGE_DEMO_TMUX:-}" ]; then
        exec tmux switch-client -t "=$session"
    fi
    exec "${tmux_cmd[@]}" attach -t "=$session"
fi
echo "Attach:  $attach_hint"
echo "End it:  ${tmux_cmd[*]} kill-session -t $session   (demo/tmux.sh --reset also deletes its state)"
