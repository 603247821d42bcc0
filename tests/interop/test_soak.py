"""The soak (scripts/soak.py) in its short form: FERRY_SOAK_SECONDS (default 60) of mixed
HTTP/3, HTTP/2 and HTTP/1.1 tunnels opening and closing; Ferry must stay up, count no panic,
and return to its baseline of open file descriptors and RSS (tolerances in soak.py). The
10-minute run is ``.venv/bin/python scripts/soak.py --duration 600``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import FERRY_BIN, REPO_ROOT, skip_if_missing

SECONDS = float(os.environ.get("FERRY_SOAK_SECONDS", "60"))


def test_soak_short(tmp_path):
    skip_if_missing("ferry")
    env = dict(os.environ, FERRY_BIN=str(FERRY_BIN))
    r = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "soak.py"), "--duration", str(SECONDS),
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=SECONDS + 180, env=env, cwd=REPO_ROOT)
    lines = r.stdout.strip().splitlines()
    assert lines, f"soak printed nothing (rc {r.returncode}):\n{r.stderr[-3000:]}"
    summary = json.loads(lines[-1])
    print(json.dumps(summary, indent=1))
    assert r.returncode == 0 and summary["ok"], f"{summary['failures']}\n{r.stderr[-3000:]}"
    assert summary["tunnels_total"]["ingress_http"] > 0 and summary["tunnels_total"]["ingress_tcp"] > 0
