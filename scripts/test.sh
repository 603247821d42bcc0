#!/usr/bin/env bash
# The whole test suite, from a clean clone: installs what it needs, starts what it needs.
# Usage: scripts/test.sh            (everything)
#        FERRY_SKIP_LINT=1 scripts/test.sh   (skip fmt and clippy)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
log() { printf '\n=== %s\n' "$*"; }

log "System packages the interop tests run (dnsmasq: a real DNS server behind a tunnel)"
if ! command -v dnsmasq >/dev/null 2>&1 && [ ! -x /usr/sbin/dnsmasq ]; then
  if command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq >/dev/null && apt-get install -y -qq dnsmasq-base >/dev/null
  else
    echo "dnsmasq is required (tests/interop/test_udp_proxy.py); install dnsmasq-base" >&2
    exit 1
  fi
fi

log "Python venv (pinned: tests/interop/requirements.txt)"
bash scripts/setup-venv.sh

# tests/interop/test_faults.py impairs paths in the kernel, inside network namespaces it
# makes: `tc netem` on a namespace's loopback (needs a kernel with sch_netem), and iptables'
# `statistic` drops and TEE clones across a veth pair. They need `ip` and `tc` (Debian's
# iproute2), `iptables` and root. Where any is missing that test is reported SKIPPED with the
# reason (the userspace-impairer fault tests still run).
log "iproute2 (ip, tc) and iptables for the network-namespace fault tests"
PATH="$PATH:/usr/sbin:/sbin"
if command -v ip >/dev/null && command -v tc >/dev/null && command -v iptables >/dev/null; then
  echo "ip, tc and iptables present"
else
  SUDO=""
  [ "$(id -u)" = 0 ] || { command -v sudo >/dev/null && sudo -n true 2>/dev/null && SUDO="sudo -n"; }
  if command -v apt-get >/dev/null && { [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; }; then
    { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 iptables; } ||
      echo "could not install iproute2/iptables: the netns fault tests will be SKIPPED"
  else
    echo "no ip/tc/iptables and no way to install them: the netns fault tests will be SKIPPED"
  fi
fi

if [ -z "${FERRY_SKIP_LINT:-}" ]; then
  log "cargo fmt --check"
  cargo fmt --all -- --check
  log "cargo clippy -D warnings"
  cargo clippy --workspace --all-targets --release -- -D warnings
fi

log "cargo build --release"
cargo build --release --workspace

log "cargo test (unit, property, end-to-end)"
set +e
cargo test --release --workspace --no-fail-fast 2>&1 | tee "$root/target/cargo-test.log"
cargo_rc=${PIPESTATUS[0]}
set -e
# Counting never fails the script: a missing count is zero.
count() { { grep -Eo "$1" "$2" || true; } | awk -v f="$3" '{s+=$f} END {print s+0}'; }
rust_passed=$(count 'test result: (ok|FAILED)\. [0-9]+ passed' target/cargo-test.log 4)
rust_failed=$(count '[0-9]+ failed;' target/cargo-test.log 1)

log "fuzzing every decoder for a bounded time (scripts/fuzz.sh; FERRY_FUZZ_SECONDS, default 20)"
if [ "${FERRY_FUZZ_SECONDS:-20}" != 0 ]; then
  bash scripts/fuzz.sh "${FERRY_FUZZ_SECONDS:-20}"
fi

log "interop and differential tests (aioquic, real Envoy 1.40)"
set +e
FERRY_BIN="$root/target/release/ferry" .venv/bin/python -m pytest tests/interop -q -rs 2>&1 | tee target/pytest.log
py_rc=${PIPESTATUS[0]}
set -e
last=$(tail -1 target/pytest.log)
py_passed=$(printf '%s\n' "$last" | { grep -Eo '[0-9]+ passed' || true; } | awk '{s+=$1} END {print s+0}')
py_failed=$(printf '%s\n' "$last" | { grep -Eo '[0-9]+ (failed|error|errors)' || true; } | awk '{s+=$1} END {print s+0}')
py_skipped=$(printf '%s\n' "$last" | { grep -Eo '[0-9]+ skipped' || true; } | awk '{s+=$1} END {print s+0}')

passed=$((rust_passed + py_passed))
failed=$((rust_failed + py_failed))
echo
echo "summary: ${passed} passed, ${failed} failed, ${py_skipped} skipped"
if [ "$cargo_rc" -ne 0 ] || [ "$py_rc" -ne 0 ] || [ "$failed" -ne 0 ]; then
  exit 1
fi
