#!/usr/bin/env bash
# Installs the Python tools Shardwise needs (moto, SAM CLI, aws-sam-translator, cfn-lint,
# cargo-lambda with zig, pytest, boto3; checkov apart) into venvs inside the repo, from the pins
# under tools/. Idempotent: a venv whose stamp matches its pin files is left alone, so a warm run
# costs well under a second. A venv whose pins changed is rebuilt from scratch rather than
# upgraded in place, so what is installed is exactly what the pins say.
#
#   scripts/setup-tools.sh            create or refresh .venv and .venv-checkov
#   scripts/setup-tools.sh --relock   re-resolve tools/requirements*.txt into tools/constraints*.txt
#
# Also: Debian's chromium for the dashboard's browser test (scripts/browser), installed with apt
# when it is missing and this runs as root; otherwise a note says how.
#
# Environment: SHARDWISE_PYTHON (default python3) picks the interpreter the venvs are made from.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${SHARDWISE_PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

# venv name, top-level pins, full lock
VENVS=(
  ".venv tools/requirements.txt tools/constraints.txt"
  ".venv-checkov tools/requirements-checkov.txt tools/constraints-checkov.txt"
)

log() { printf 'setup-tools: %s\n' "$*" >&2; }

# What a venv was built from: the pin files and the interpreter's version.
fingerprint() {
  local req=$1 lock=$2
  {
    "$PYTHON" -c 'import sys; print(sys.version)'
    cat "$ROOT/$req" "$ROOT/$lock"
  } | sha256sum | cut -d' ' -f1
}

ensure_venv() {
  local name=$1 req=$2 lock=$3
  local venv=$ROOT/$name stamp=$ROOT/$name/.shardwise-tools-stamp want
  want=$(fingerprint "$req" "$lock")
  if [[ -f $stamp && $(<"$stamp") == "$want" ]] && "$venv/bin/python" -c '' 2>/dev/null; then
    return 0
  fi
  log "building $name from $req (locked by $lock)"
  local started=$SECONDS
  # Rebuilt in place (a venv cannot be moved: its scripts name their interpreter by absolute
  # path). The stamp is written last, so an interrupted install is redone on the next run.
  rm -rf "$venv"
  "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet -r "$ROOT/$req" -c "$ROOT/$lock"
  "$venv/bin/python" -m pip check >/dev/null
  printf '%s\n' "$want" >"$venv/.shardwise-tools-stamp"
  log "$name ready in $((SECONDS - started)) s"
}

relock() {
  local name=$1 req=$2 lock=$3 tmp
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  log "resolving $req"
  "$PYTHON" -m venv "$tmp/venv"
  "$tmp/venv/bin/python" -m pip install --quiet -r "$ROOT/$req"
  "$tmp/venv/bin/python" -m pip check
  {
    echo "# Full transitive lock for $name (generated from $req by scripts/setup-tools.sh --relock)."
    echo "# Do not edit by hand."
    "$tmp/venv/bin/python" -m pip freeze --exclude-editable | sort -f
  } >"$ROOT/$lock"
  log "wrote $lock"
}

if ! "$PYTHON" -m venv --help >/dev/null 2>&1; then
  log "$PYTHON has no venv module (on Debian: apt-get install python3-venv)"
  exit 1
fi

# Two runs at once (make test in two terminals) must not build the same venv together.
exec 9>"${TMPDIR:-/tmp}/shardwise-setup-tools-$(printf '%s' "$ROOT" | sha256sum | cut -c1-16).lock"
flock 9

ensure_browser() {
  if command -v chromium >/dev/null || command -v chromium-headless-shell >/dev/null; then
    return 0
  fi
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    log "installing Debian's chromium (the dashboard's browser test)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium </dev/null >&2 ||
      { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium </dev/null >&2; }
  else
    log "no chromium: the dashboard's browser test needs it (sudo apt-get install chromium)"
  fi
}

mode=${1:-install}
for spec in "${VENVS[@]}"; do
  # shellcheck disable=SC2086
  set -- $spec
  case $mode in
    install) ensure_venv "$@" ;;
    --relock) relock "$@" ;;
    *) log "unknown argument: $mode (expected nothing or --relock)"; exit 2 ;;
  esac
done
if [[ $mode == install ]]; then
  ensure_browser
fi
