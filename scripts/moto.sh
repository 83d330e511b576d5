#!/usr/bin/env bash
# Runs moto_server (Kinesis, DynamoDB, SQS on the real wire protocols) on a free loopback port.
#
#   env=$(scripts/moto.sh start) && eval "$env"
#                                      start; prints `export` lines for MOTO_PID, MOTO_LOG,
#                                      SHARDWISE_MOTO_ENDPOINT and the AWS_* variables the SDKs need
#   scripts/moto.sh stop [PID]         stop the server (PID defaults to $MOTO_PID)
#   scripts/moto.sh run CMD [ARGS...]  start, run CMD with those variables set, always stop;
#                                      exits with CMD's status
#
# The server binds 127.0.0.1 only. The port is chosen by the kernel (bind to port 0), so parallel
# runs never collide; if another process grabs it before moto binds, the start is retried.
# Expects the venv from scripts/setup-tools.sh (override with MOTO_SERVER=/path/to/moto_server).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MOTO_SERVER=${MOTO_SERVER:-$ROOT/.venv/bin/moto_server}
PYTHON=${MOTO_PYTHON:-$ROOT/.venv/bin/python}
READY_TIMEOUT_S=${MOTO_READY_TIMEOUT_S:-30}

log() { printf 'moto: %s\n' "$*" >&2; }

free_port() {
  "$PYTHON" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

# Polls GET /moto-api/ until it answers 200, the process dies, or the timeout passes.
wait_ready() {
  local pid=$1 port=$2
  "$PYTHON" - "$pid" "$port" "$READY_TIMEOUT_S" <<'PY'
import os, sys, time, urllib.request
pid, port, timeout = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(2)  # died: most likely the port was taken
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.1)
sys.exit(1)
PY
}

stop() {
  local pid=${1:-${MOTO_PID:-}}
  if [[ -z $pid ]]; then
    log "stop: no PID given and MOTO_PID is unset"
    return 1
  fi
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  log "moto_server $pid ignored SIGTERM for 5 s; killing it"
  kill -KILL "$pid" 2>/dev/null || true
}

# Starts the server; sets MOTO_PID, MOTO_PORT and MOTO_LOG in this shell.
start_server() {
  if [[ ! -x $MOTO_SERVER ]]; then
    log "$MOTO_SERVER not found: run scripts/setup-tools.sh first"
    return 1
  fi
  MOTO_LOG=$(mktemp "${TMPDIR:-/tmp}/shardwise-moto.XXXXXX")
  local attempt status
  for attempt in 1 2 3; do
    MOTO_PORT=$(free_port)
    # All three streams redirected: the server must not hold the caller's pipes open (the
    # caller may be reading our stdout through $(...)).
    "$MOTO_SERVER" -H 127.0.0.1 -p "$MOTO_PORT" </dev/null >"$MOTO_LOG" 2>&1 &
    MOTO_PID=$!
    status=0
    wait_ready "$MOTO_PID" "$MOTO_PORT" || status=$?
    if ((status == 0)); then
      log "ready on http://127.0.0.1:$MOTO_PORT (pid $MOTO_PID, log $MOTO_LOG)"
      return 0
    fi
    stop "$MOTO_PID" || true
    log "start attempt $attempt on port $MOTO_PORT failed (status $status); last log lines:"
    tail -n 5 "$MOTO_LOG" >&2 || true
  done
  return 1
}

print_exports() {
  local endpoint="http://127.0.0.1:$MOTO_PORT"
  cat <<EOF
export MOTO_PID=$MOTO_PID
export MOTO_LOG=$MOTO_LOG
export SHARDWISE_MOTO_ENDPOINT=$endpoint
export AWS_ENDPOINT_URL=$endpoint
export AWS_REGION=us-east-1
export AWS_DEFAULT_REGION=us-east-1
export AWS_ACCESS_KEY_ID=test
export AWS_SECRET_ACCESS_KEY=test
export AWS_EC2_METADATA_DISABLED=true
EOF
}

cmd=${1:-}
case $cmd in
  start)
    start_server
    print_exports
    ;;
  stop)
    shift
    stop "$@"
    ;;
  run)
    shift
    if (($# == 0)); then
      log "run: give a command"
      exit 2
    fi
    start_server
    trap 'stop "$MOTO_PID"' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    eval "$(print_exports)"
    status=0
    "$@" || status=$?
    exit "$status"
    ;;
  *)
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
    exit 2
    ;;
esac
