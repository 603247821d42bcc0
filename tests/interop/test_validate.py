"""`--mode validate`: every example config is valid for Envoy and Ferry; every bad config
under tests/configs/ is rejected by Ferry with the offending field path.

Both binaries run from the repository root, because the examples use repo-relative paths
(certificates) exactly as the README tells people to run them.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from conftest import REPO_ROOT, binary_for, skip_if_missing

EXAMPLES = sorted(p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "examples").rglob("*.yaml"))
BAD_DIR = REPO_ROOT / "tests" / "configs"
BAD_CONFIGS = sorted(p.relative_to(REPO_ROOT).as_posix() for p in BAD_DIR.glob("bad-*.yaml"))


def validate(impl: str, config: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(binary_for(impl)), "--mode", "validate", "-c", config],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )


def expected_error_paths() -> dict[str, list[str]]:
    """Field paths named for each bad config in tests/configs/README.md.

    A README line that mentions `bad-NAME.yaml` contributes the first other backticked
    token on that line that looks like a field path (contains '.' or '[', no spaces, not a
    file name), e.g. `static_resources.listeners[0].name2`.
    """
    readme = BAD_DIR / "README.md"
    out: dict[str, list[str]] = {}
    if not readme.exists():
        return out
    for line in readme.read_text().splitlines():
        names = re.findall(r"bad-[A-Za-z0-9_.-]+?\.yaml", line)
        if not names:
            continue
        tokens = re.findall(r"`([^`]+)`", line)
        paths = [t for t in tokens
                 if ("." in t or "[" in t) and not t.endswith((".yaml", ".yml", ".md")) and " " not in t]
        for name in names:
            out.setdefault(name, []).extend(paths[:1])
    return out


@pytest.mark.parametrize("config", EXAMPLES or ["<no examples>"])
def test_example_validates(impl, config):
    if config == "<no examples>":
        pytest.fail("no examples/*.yaml found")
    result = validate(impl, config)
    assert result.returncode == 0, f"{impl} rejected {config}:\n{result.stdout}\n{result.stderr}"
    assert f"configuration '{config}' OK" in result.stdout, (
        f"{impl} did not print \"configuration '{config}' OK\" on stdout:\n{result.stdout}")


@pytest.mark.parametrize("config", BAD_CONFIGS or ["<none yet>"])
def test_bad_config_rejected_by_ferry(config):
    if config == "<none yet>":
        pytest.skip("no tests/configs/bad-*.yaml yet")
    skip_if_missing("ferry")
    result = validate("ferry", config)
    output = result.stdout + result.stderr
    assert result.returncode == 1, f"ferry exit code {result.returncode} for {config}:\n{output}"
    assert f"configuration '{config}' OK" not in output
    paths = expected_error_paths().get(Path(config).name, [])
    for path in paths:
        assert path in output, f"ferry's error for {config} does not name `{path}`:\n{output}"
    if not paths:
        assert output.strip(), f"ferry rejected {config} without saying why"
