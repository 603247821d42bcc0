#!/usr/bin/env bash
# Create (if missing) the repo-root .venv and install tests/interop/requirements.txt into it.
# Idempotent: when the requirements have not changed since the last successful install, it
# does nothing. Quiet on success; pip's output is shown only when something fails.
#
# Usage: scripts/setup-venv.sh            (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo_root/.venv"
req="$repo_root/tests/interop/requirements.txt"
stamp="$venv/.requirements.sha256"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi

want="$(sha256sum "$req" | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if ! "$venv/bin/python" -m pip install --disable-pip-version-check -q -r "$req" >"$log" 2>&1; then
  cat "$log" >&2
  echo "setup-venv: pip install failed" >&2
  exit 1
fi
echo "$want" > "$stamp"
echo "setup-venv: $venv ready ($(grep -c "==" "$req") pinned packages)"
