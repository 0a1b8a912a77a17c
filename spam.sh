#!/usr/bin/env bash
# Stress run in one command: many concurrent client processes against one
# server, then a check that the counter moved by exactly the sum of every
# acknowledged increment. Exit 0 only when every client succeeded and the
# sums match.
#
# Environment (all optional):
#   CLIENTS     client processes launched at once            (default 70)
#   DURATION    seconds each client sends for                (default 10)
#   MULTIPLIER  connections per client = NumCPU x MULTIPLIER (default 1)
#   PIPELINE    frames in flight per connection              (default 1)
#   TIMEOUT     seconds a client waits for a reply           (default 10)
#   SERVER      HOST:PORT of a running server; when unset, spam.sh starts
#               our server on a free loopback port and stops it at the end
#   METRICS     that server's /metrics URL, to warn when its pool is smaller
#               than the connections the run opens
#   PYTHON      interpreter (default: the repo's .venv/bin/python, else python3)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CLIENTS="${CLIENTS:-70}"
DURATION="${DURATION:-10}"
MULTIPLIER="${MULTIPLIER:-1}"
PIPELINE="${PIPELINE:-1}"
TIMEOUT="${TIMEOUT:-10}"
SERVER="${SERVER:-}"
METRICS="${METRICS:-}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

usage() {
    cat <<'USAGE'
Usage: ./spam.sh [-h | --help]

Stress run: CLIENTS client processes against one server (started here on a
free loopback port unless SERVER is set), then a check that the counter moved
by exactly the acknowledged increments. Exit 0 only when everything matched.

Settings come from the environment:
  CLIENTS     client processes launched at once            (default 70)
  DURATION    seconds each client sends for                (default 10)
  MULTIPLIER  connections per client = NumCPU x MULTIPLIER (default 1)
  PIPELINE    frames in flight per connection              (default 1)
  TIMEOUT     seconds a client waits for a reply           (default 10)
  SERVER      HOST:PORT of a running server (default: start one)
  METRICS     its /metrics URL: warns when its pool is smaller than the run
  PYTHON      interpreter (default: the repo's .venv/bin/python, else python3)

Example: CLIENTS=10 DURATION=5 ./spam.sh
USAGE
}
case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    "") ;;
    *) echo "spam.sh: unknown argument '$1' (settings come from the environment)" >&2; usage >&2; exit 2 ;;
esac

die() { echo "spam.sh: $*" >&2; exit 2; }
for name in CLIENTS DURATION MULTIPLIER PIPELINE TIMEOUT; do
    [[ "${!name}" =~ ^[1-9][0-9]*$ ]] || die "$name must be a positive integer, got '${!name}'"
done

(cd "$ROOT" && "$PYTHON" -m counter_server.common.bootstrap spam.sh) || exit 1

WORKDIR="$(mktemp -d "${TMPDIR:-/tmp}/spam.XXXXXX")"
SERVER_PID=""
CLIENT_PIDS=()

stop_server() {
    [[ -n "$SERVER_PID" ]] || return 0
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null
        for _ in $(seq 1 150); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$SERVER_PID" 2>/dev/null
    fi
    wait "$SERVER_PID" 2>/dev/null
    SERVER_PID=""
}

cleanup() {
    local pid
    for pid in "${CLIENT_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for pid in "${CLIENT_PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    CLIENT_PIDS=()
    stop_server
    rm -rf "$WORKDIR"
}
trap cleanup EXIT
trap 'echo "spam.sh: interrupted; stopping the clients and server it started" >&2; exit 130' INT TERM

client() { "$PYTHON" "$ROOT/client/client.py" --serverAddress "$SERVER" "$@"; }

if [[ -z "$SERVER" ]]; then
    # Pool large enough for every connection: each client opens NumCPU x MULTIPLIER
    # and the server's pool is NumCPU x its multiplier (plus one for --get).
    # setsid: a Ctrl-C on the terminal reaches spam.sh, which stops the server once.
    setsid "$PYTHON" "$ROOT/server/server.py" --host 127.0.0.1 --port 0 \
        --multiplier $((CLIENTS * MULTIPLIER + 1)) --log-level warning \
        --ready-file "$WORKDIR/ready.json" \
        >"$WORKDIR/server.out" 2>"$WORKDIR/server.err" </dev/null &
    SERVER_PID=$!
    for _ in $(seq 1 200); do
        if [[ -s "$WORKDIR/ready.json" ]]; then
            read -r PORT POOL < <(cd "$ROOT" && "$PYTHON" -c 'import sys
from testing.launcher import read_ready_file
ready = read_ready_file(sys.argv[1]); print(ready.port, ready.pool)' "$WORKDIR/ready.json")
            break
        fi
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    if [[ -z "${PORT:-}" ]]; then
        echo "spam.sh: the server did not start:" >&2
        cat "$WORKDIR/server.err" >&2
        exit 1
    fi
    SERVER="127.0.0.1:$PORT"
    WHERE="started by spam.sh, pid $SERVER_PID"
else
    WHERE="given by SERVER"
    POOL=""
    if [[ -n "$METRICS" ]]; then
        POOL="$(cd "$ROOT" && "$PYTHON" -m testing.spam_report --pool-from "$METRICS")"
    fi
fi
NCPU="$(cd "$ROOT" && "$PYTHON" -c 'from counter_server.common.cli import cpu_count; print(cpu_count())')"
CONNECTIONS=$((CLIENTS * NCPU * MULTIPLIER))
if [[ -n "${POOL:-}" && "$POOL" -lt "$CONNECTIONS" ]]; then
    echo "spam.sh: note: the server serves $POOL connections at once and this run opens" \
         "$CONNECTIONS: the rest wait, and frames that time out on a client may still be applied"
fi

BEFORE="$(client --get)" || { echo "spam.sh: cannot read the counter at $SERVER" >&2; exit 1; }
plural() { if [[ "$1" == 1 ]]; then echo "$1 $2"; else echo "$1 ${2}s"; fi; }
echo "spam.sh: $(plural "$CLIENTS" client) x NumCPU*$MULTIPLIER connections, $PIPELINE in flight each," \
     "${DURATION}s, against $SERVER ($WHERE)"

# Each client runs for DURATION plus time to connect and collect owed replies;
# timeout(1) bounds a client that hangs anyway.
for i in $(seq 1 "$CLIENTS"); do
    timeout --signal=TERM $((DURATION + 60)) \
        "$PYTHON" "$ROOT/client/client.py" --serverAddress "$SERVER" --json \
        --multiplier "$MULTIPLIER" --pipeline "$PIPELINE" --duration "$DURATION" \
        --timeout "$TIMEOUT" \
        >"$WORKDIR/client-$i.json" 2>"$WORKDIR/client-$i.err" </dev/null &
    CLIENT_PIDS+=($!)
done
# Progress every 5 s: the run takes longer than DURATION, since each client
# sends for DURATION from its own start, and starting many Python processes
# on few CPUs takes a while (70 on 2 CPUs: about 10 s).
echo "spam.sh: started $(plural "$CLIENTS" client); each sends for ${DURATION}s once" \
     "it is up (starting many takes a while on $NCPU CPUs)"
STARTED_AT=$SECONDS
SAID_AT=$SECONDS
while :; do
    running=0
    for pid in "${CLIENT_PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && running=$((running + 1)); done
    ((running == 0)) && break
    if ((SECONDS - SAID_AT >= 5)); then
        echo "spam.sh: $((SECONDS - STARTED_AT))s: $running of $CLIENTS clients still running"
        SAID_AT=$SECONDS
    fi
    sleep 0.2
done
for pid in "${CLIENT_PIDS[@]}"; do wait "$pid"; done
CLIENT_PIDS=()
echo "spam.sh: all clients done after $((SECONDS - STARTED_AT))s; checking the counter"

AFTER="$(client --get)" || { echo "spam.sh: cannot read the counter at $SERVER after the run" >&2; exit 1; }
(cd "$ROOT" && "$PYTHON" -m testing.spam_report --before "$BEFORE" --after "$AFTER" \
    --clients "$CLIENTS" "$WORKDIR"/client-*.json)
STATUS=$?
if [[ $STATUS -ne 0 ]]; then
    for f in "$WORKDIR"/client-*.err; do
        if [[ -s "$f" ]]; then echo "first client error output ($(basename "$f")):" >&2; head -5 "$f" >&2; break; fi
    done
fi
if [[ -n "$SERVER_PID" ]]; then
    stop_server
    grep -E "^(Server stopped|Final counter)" "$WORKDIR/server.out" | sed 's/^/server: /'
fi
if [[ -s "$WORKDIR/server.err" ]] && grep -q Traceback "$WORKDIR/server.err"; then
    echo "spam.sh: the server logged a traceback:" >&2; cat "$WORKDIR/server.err" >&2; STATUS=1
fi
exit $STATUS
