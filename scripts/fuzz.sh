#!/usr/bin/env bash
# Run every fuzz target for SECONDS each (default 20) on a copy of its seed corpus, with
# cargo-fuzz on stable (no sanitizer: `-s none` catches panics, exit 77 on a crash).
# Usage: scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-20}
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --quiet
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd fuzz
targets=$(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^ferry-proto-fuzz$')
cargo fuzz build -s none
for t in $targets; do
  mkdir -p "$work/$t"
  cp -r corpus/"$t"/. "$work/$t/"
  echo "fuzz: $t for ${seconds}s"
  set +e
  cargo fuzz run -s none "$t" "$work/$t" -- -max_total_time="$seconds" > "$work/$t.log" 2>&1
  rc=$?
  set -e
  grep -E "^Done" "$work/$t.log" || true
  if [ "$rc" -ne 0 ]; then
    tail -40 "$work/$t.log"
    echo "fuzz: $t FAILED (exit $rc); the input is under fuzz/artifacts/$t/"
    exit 1
  fi
done
echo "fuzz: every target ran ${seconds}s without a crash"
