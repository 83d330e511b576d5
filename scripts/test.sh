#!/usr/bin/env bash
# What `make test` runs, on a developer's machine and in CI alike:
#   1. Python tools (scripts/setup-tools.sh: no-op when up to date)
#   2. moto_server on a free loopback port, stopped on exit, failure or ctrl-c
#   3. cargo test (unit + integration tests against moto, which must not skip here)
#   4. tests of scripts/ (redrive against moto, negative cases of the template checker)
#   5. make validate: sam validate --lint, scripts/check_template.py, checkov
#   6. make build ARCH=x86_64 (sam build, release)
#   7. make invoke-check: each function under cargo lambda watch, invoked with events/ samples
#   8. make demo (20 s, checked), its dashboard in headless Chromium, chaos on the real
#      functions, and the other local-runner targets on small inputs
#   9. make lint: cargo fmt --check, clippy -D warnings
# Every step runs even when an earlier one failed (one run shows every problem); the exit
# status is non-zero when any failed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

scripts/setup-tools.sh

# The venv's bin first: sam, cfn-lint, cargo-lambda, and a python3 that has ziglang, which is
# how cargo-lambda finds its zig linker (python3 -m ziglang).
export PATH="$ROOT/.venv/bin:$PATH"
export SAM_CLI_TELEMETRY=0
# No __pycache__ next to scripts/ in the work tree.
export PYTHONDONTWRITEBYTECODE=1
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
if [[ ${CI:-} == true ]]; then
  # A fresh clone builds everything once: incremental state would only cost time and disk.
  export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
  export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
fi

MOTO_PID=
cleanup() {
  if [[ -n $MOTO_PID ]]; then
    scripts/moto.sh stop "$MOTO_PID" || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Assigned first: a failed start must stop this script (eval "$(…)" would swallow the failure).
moto_env=$(scripts/moto.sh start)
eval "$moto_env"
# moto.sh exported SHARDWISE_MOTO_ENDPOINT, AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID,
# AWS_SECRET_ACCESS_KEY and AWS_EC2_METADATA_DISABLED; integration tests fail rather than skip.
export SHARDWISE_REQUIRE_MOTO=1

passed=()
failed=()
step() {
  local name=$1 started=$SECONDS status=0
  shift
  printf '\n==> %s\n' "$name"
  "$@" || status=$?
  if ((status == 0)); then
    passed+=("$name")
    printf '==> %s: ok (%d s)\n' "$name" $((SECONDS - started))
  else
    failed+=("$name")
    printf '==> %s: FAILED with status %d (%d s)\n' "$name" "$status" $((SECONDS - started))
  fi
}

step "cargo test" cargo test --workspace --all-targets
# --all-targets leaves out doctests; examples in the docs are tests too.
step "cargo doctests" cargo test --workspace --doc
step "script tests (redrive, template checker negative cases)" \
  python -m pytest -q -p no:cacheprovider scripts/tests
# The Makefile targets themselves, so they cannot rot: validate = sam validate --lint +
# scripts/check_template.py (transform, cfn-lint, assertions) + checkov. Skipped checkov checks
# are listed, each with its reason, in template.yaml (Metadata.checkov).
step "make validate" make --no-print-directory validate
# deploy, logs, delete and redrive need AWS, and the long proof runs (proptest-long, chaos-long, fuzz,
# fuzz-check) need 10–30 minutes and an instrumented build: here they are only expanded (make -n)
# to catch typos. Their code runs in `cargo test` (the property suites at CI's case count, the
# fuzz harness's properties through prop_decoders).
step "make -n of the AWS-only and long-running targets" \
  make --no-print-directory -n deploy ENV=prod logs FN=FraudFunction delete redrive QUEUE_URL=x \
  proptest-long chaos-long fuzz fuzz-check bench fraud-eval watch

# x86_64: CI has only the host's Rust target; arm64 would need a target download.
step "make build ARCH=x86_64" make --no-print-directory build ARCH=x86_64
# Each function under `cargo lambda watch` (the real Runtime API loop), invoked with events/ samples;
# responses and side effects (alerts, acks, aggregates) checked on moto.
step "make invoke-check" make --no-print-directory invoke-check
# The README's first command, shortened; CHECK=1 fails unless every record was acknowledged,
# poison was dead-lettered, alerts were raised and windows written.
step "make demo (20 s)" make --no-print-directory demo DURATION=20s PLAIN=10s CHECK=1
# The demo's dashboard in a real browser (Debian's chromium, which .ci/run installs): live
# numbers, the summary's counts, a dead letter with its payload, a screenshot that is not blank.
step "dashboard in headless Chromium" make --no-print-directory dashboard-test
# The real fraud and aggregation binaries under random kills (crates/shardwise-local/tests/chaos.rs):
# here rather than in `cargo test`, which builds the functions without their local backends; the
# demo step above built them with.
step "chaos on the real functions" env SHARDWISE_FUNCTIONS_BIN_DIR="$CARGO_TARGET_DIR/debug" \
  SHARDWISE_REQUIRE_FUNCTIONS=1 cargo test -p shardwise-local --test chaos the_real_functions \
  -- --nocapture
# The other local-runner targets, on small inputs, so none of them can rot.
step "local runner targets" sh -c 'make --no-print-directory loadgen RATE=200 DURATION=3s &&
  make --no-print-directory run ARGS="--until-idle 2s --tumbling-window 3s --duration 60s --plain 10s" &&
  make --no-print-directory plan &&
  make --no-print-directory bench-local BENCH_RATE=1000 BENCH_DURATION=3s'
step "make lint" make --no-print-directory lint

printf '\n'
if ((${#failed[@]})); then
  printf 'make test: passed step: %s\n' "${passed[@]}"
  printf 'make test: FAILED step: %s\n' "${failed[@]}"
  printf 'steps: %d passed, %d failed\n' "${#passed[@]}" "${#failed[@]}"
  exit 1
fi
printf 'make test: all %d steps passed\n' "${#passed[@]}"
printf 'steps: %d passed, 0 failed\n' "${#passed[@]}"
