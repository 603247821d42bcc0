#!/usr/bin/env bash
# The whole test suite, from a clean clone: installs what it needs, starts what it needs.
# Usage: scripts/test.sh            (everything)
#        FERRY_SKIP_LINT=1 scripts/test.sh   (skip fmt and clippy)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
log() { printf '\n=== %s\n' "$*"; }

log "Python venv (pinned: tests/interop/requirements.txt)"
bash scripts/setup-venv.sh

if [ -z "${FERRY_SKIP_LINT:-}" ]; then
  log "cargo fmt --check"
  cargo fmt --all -- --check
  log "cargo clippy -D warnings"
  cargo clippy --workspace --all-targets --release -- -D warnings
fi

log "cargo build --release"
cargo build --release --workspace

log "cargo test (unit, property, end-to-end)"
cargo test --release --workspace 2>&1 | tee "$root/target/cargo-test.log"
rust_passed=$(grep -Eo 'test result: ok\. [0-9]+ passed' target/cargo-test.log | awk '{s+=$4} END {print s+0}')
rust_failed=$(grep -Eo '[0-9]+ failed' target/cargo-test.log | awk '{s+=$1} END {print s+0}')

log "interop and differential tests (aioquic, real Envoy 1.40)"
set +e
FERRY_BIN="$root/target/release/ferry" .venv/bin/python -m pytest tests/interop -q -rs 2>&1 | tee target/pytest.log
py_rc=${PIPESTATUS[0]}
set -e
py_passed=$(grep -Eo '[0-9]+ passed' target/pytest.log | tail -1 | awk '{print $1+0}')
py_failed=$(grep -Eo '[0-9]+ failed' target/pytest.log | tail -1 | awk '{print $1+0}')
py_skipped=$(grep -Eo '[0-9]+ skipped' target/pytest.log | tail -1 | awk '{print $1+0}')

passed=$((rust_passed + ${py_passed:-0}))
failed=$((rust_failed + ${py_failed:-0}))
echo
echo "summary: ${passed} passed, ${failed} failed, ${py_skipped:-0} skipped"
if [ "$py_rc" -ne 0 ] || [ "$failed" -ne 0 ]; then
  exit 1
fi
