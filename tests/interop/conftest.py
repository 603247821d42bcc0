"""Fixtures for the differential interop suite: real Envoy 1.40 vs Ferry.

Each proxy runs as a child process on port 0 (admin and listener), with a bootstrap rendered
from ``bootstraps/*.yaml.in``; the bound ports come from the admin endpoint. Every wait is
bounded; nothing sleeps for a fixed time except short polls of a condition.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import pytest

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
BOOTSTRAPS = HERE / "bootstraps"
CERT = REPO_ROOT / "examples" / "certs" / "cert.pem"
KEY = REPO_ROOT / "examples" / "certs" / "key.pem"

VENV_BIN = Path(os.environ.get("VENV_BIN", REPO_ROOT / ".venv" / "bin"))
ENVOY_BIN = Path(os.environ.get("ENVOY_BIN", VENV_BIN / "envoy"))
_ferry_env = os.environ.get("FERRY_BIN", "target/release/ferry")
FERRY_BIN = Path(_ferry_env) if os.path.isabs(_ferry_env) else REPO_ROOT / _ferry_env

IMPLEMENTATIONS = ["envoy", "ferry"]
READY_DEADLINE = 20.0
POLL = 0.02

# Deaths of proxy processes seen during the session, for the terminal summary.
DEATHS: list[str] = []


def binary_for(impl: str) -> Path:
    return {"envoy": ENVOY_BIN, "ferry": FERRY_BIN}[impl]


def skip_if_missing(impl: str) -> None:
    path = binary_for(impl)
    if not path.exists():
        if impl == "ferry":
            pytest.skip("FERRY_BIN not built")
        pytest.skip(f"{path} not found (run scripts/setup-venv.sh)")


def free_udp_port() -> int:
    """A loopback UDP port nobody listens on (bound, then released). Another process may take
    it before the caller binds it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_udp_tcp_port() -> int:
    """A loopback port free for both UDP and TCP at the moment of the call (dnsmasq binds both)."""
    for _ in range(50):
        port = free_udp_port()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no loopback port free for both UDP and TCP in 50 tries")


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll cond() every POLL seconds until it is true; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(POLL)


async def async_wait_until(cond: Callable[[], bool], timeout: float, what: str = "condition") -> bool:
    """Like wait_until, but yields to the event loop; returns False on timeout."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(POLL)
    return True


def run_async(coro, timeout: float = 30.0):
    """Run one test coroutine with an overall bound."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


# --------------------------------------------------------------------------- UDP target


class UdpTarget:
    """A UDP server on 127.0.0.1 (port 0) in a thread: records every datagram, replies.

    ``reply`` maps a received payload to the reply (None = no reply); the default echoes.
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.received: list[tuple[bytes, tuple[str, int]]] = []
        self.reply: Callable[[bytes], bytes | None] = lambda data: data
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"udp-target-{self.port}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                self.received.append((data, peer))
            out = self.reply(data)
            if out is not None:
                try:
                    self.sock.sendto(out, peer)
                except OSError:
                    pass

    def payloads(self) -> list[bytes]:
        with self._lock:
            return [d for d, _ in self.received]

    def saw(self, payload: bytes) -> bool:
        return payload in self.payloads()

    def clear(self) -> None:
        with self._lock:
            self.received.clear()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def plus_0x10(data: bytes) -> bytes:
    """The reply rule of Envoy's capsule test: a1..a7 -> b1..b7."""
    return bytes((b + 0x10) & 0xFF for b in data)


# --------------------------------------------------------------------------- bootstraps


def render_bootstrap(template: str, dest: Path, **values) -> Path:
    """Render bootstraps/<template> into dest, replacing @NAME@ placeholders.

    Defaults: PROXY_PORT=0, ADMIN_PORT=0, CERT/KEY = examples/certs (absolute paths).
    Any placeholder left unreplaced is an error.
    """
    subs = {"PROXY_PORT": 0, "ADMIN_PORT": 0, "CERT": CERT, "KEY": KEY}
    subs.update(values)
    text = (BOOTSTRAPS / template).read_text()
    for name, value in subs.items():
        text = text.replace(f"@{name}@", str(value))
    leftover = re.findall(r"@[A-Z_]+@", text)
    if leftover:
        raise ValueError(f"{template}: unreplaced placeholders {leftover}")
    dest.write_text(text)
    return dest


# --------------------------------------------------------------------------- proxy process


class ProxyProcess:
    """One running envoy/ferry with its admin endpoint."""

    def __init__(self, impl: str, config: Path, workdir: Path, label: str,
                 name: str | None = None, log_level: str = "error",
                 extra_args: tuple[str, ...] = ()) -> None:
        self.impl = impl
        self.config = config
        self.label = label
        # ``name`` keeps the files of several processes of one impl apart (proxy chains).
        self.name = name or impl
        self.admin_path = workdir / f"{self.name}-admin-address.txt"
        self.log_path = workdir / f"{self.name}.log"
        self.allow_death = False  # a test sets this when it provokes a known crash
        self.startup_failed = False
        self.admin: str | None = None
        self.listener_port: int | None = None
        self.exit_code: int | None = None
        if self.admin_path.exists():
            self.admin_path.unlink()
        cmd = [
            str(binary_for(impl)), "-c", str(config),
            "--concurrency", "1", "-l", log_level,
            "--disable-hot-restart",  # Envoy needs it for parallel instances; Ferry: no-op
            "--admin-address-path", str(self.admin_path),
            *extra_args,
        ]
        self.cmd = cmd
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)

    # -- state

    def alive(self) -> bool:
        return self.proc.poll() is None

    def exit_description(self) -> str:
        rc = self.proc.poll()
        if rc is None:
            return "running"
        if rc < 0:
            try:
                return f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                return f"killed by signal {-rc}"
        return f"exit code {rc}"

    def died_since_start(self) -> bool:
        return not self.alive()

    async def wait_dead(self, timeout: float) -> bool:
        """True if the process exits within timeout (polling, bounded)."""
        return await async_wait_until(lambda: not self.alive(), timeout, f"{self.impl} to exit")

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- admin

    def admin_get(self, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        assert self.admin, "admin address not known yet"
        try:
            with urllib.request.urlopen(f"http://{self.admin}{path}", timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def _admin_ok(self, path: str) -> bool:
        try:
            status, _ = self.admin_get(path, timeout=1.0)
            return status == 200
        except (OSError, urllib.error.URLError):
            return False

    def _clusters_resolved(self) -> bool:
        """Envoy: every cluster in /clusters?format=json has at least one host."""
        try:
            status, body = self.admin_get("/clusters?format=json", timeout=1.0)
        except (OSError, urllib.error.URLError):
            return False
        if status != 200:
            return False
        clusters = json.loads(body).get("cluster_statuses", [])
        # A dynamic forward proxy cluster has no hosts until a request names one; the
        # bootstraps here name such clusters `dynamic_forward_proxy*`.
        return bool(clusters) and all(
            c.get("host_statuses") or c.get("name", "").startswith("dynamic_forward_proxy")
            for c in clusters)

    def _check_alive(self) -> bool:
        if not self.alive():
            raise RuntimeError(f"{self.impl} exited during startup ({self.exit_description()}):\n"
                               f"{' '.join(self.cmd)}\n{self.log_tail()}")
        return True

    def wait_ready(self, deadline: float = READY_DEADLINE) -> None:
        start = time.monotonic()

        def remaining() -> float:
            return max(0.1, deadline - (time.monotonic() - start))

        def admin_written() -> bool:
            self._check_alive()
            return self.admin_path.exists() and self.admin_path.read_text().strip() != ""

        wait_until(admin_written, remaining(), f"{self.impl} to write {self.admin_path.name}")
        self.admin = self.admin_path.read_text().strip()
        wait_until(lambda: self._check_alive() and self._admin_ok("/ready"), remaining(),
                   f"{self.impl} GET /ready == 200")
        if self.impl == "envoy":
            # Envoy's /ready does not wait for DNS; a LOGICAL_DNS cluster resolves in the
            # background. Ferry's /ready is 200 only once its clusters are resolved.
            wait_until(lambda: self._check_alive() and self._clusters_resolved(), remaining(),
                       "envoy clusters to have hosts")
        self.listener_port = self.discover_listener_port()

    def listeners(self) -> list[dict]:
        status, body = self.admin_get("/listeners?format=json")
        assert status == 200, f"/listeners?format=json -> {status}"
        return json.loads(body)["listener_statuses"]

    def discover_listener_port(self, name: str | None = None) -> int:
        for entry in self.listeners():
            if name is None or entry["name"] == name:
                port = entry["local_address"]["socket_address"]["port_value"]
                assert port != 0, f"listener {entry['name']} reports port 0"
                return int(port)
        raise AssertionError(f"no listener {name!r} in /listeners")

    def stats(self) -> dict[str, str]:
        """GET /stats (text ``name: value`` lines, Envoy's format) as a dict."""
        status, body = self.admin_get("/stats")
        assert status == 200, f"{self.name} /stats -> {status}"
        out = {}
        for line in body.decode(errors="replace").splitlines():
            key, sep, value = line.partition(": ")
            if sep:
                out[key.strip()] = value.strip()
        return out

    def counter(self, stat: str) -> int | None:
        """One counter/gauge from /stats; None if the process does not export it."""
        value = self.stats().get(stat)
        return None if value is None else int(value)

    # -- teardown

    def stop(self) -> str | None:
        """Stop the process; return a description if it had died on its own."""
        died = None
        if not self.alive():
            died = self.exit_description()
        else:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()
        return died


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request) -> str:
    """The implementation under test; skips ferry only if its binary does not exist."""
    skip_if_missing(request.param)
    return request.param


@pytest.fixture
def workdir(tmp_path) -> Path:
    return tmp_path


@pytest.fixture
def udp_target():
    target = UdpTarget()
    yield target
    target.close()


@pytest.fixture
def start_proxy(impl, workdir, udp_target, request):
    """Factory: start_proxy(template="terminate-h3.yaml.in", **placeholders) -> ready ProxyProcess.

    ECHO_PORT defaults to the udp_target fixture's port. At teardown the process is stopped;
    if it had died on its own, that is recorded, and it is an error unless the test set
    ``proxy.allow_death`` (a known Envoy crash it provoked on purpose).
    """
    started: list[ProxyProcess] = []

    def start(template: str = "terminate-h3.yaml.in", **values) -> ProxyProcess:
        values.setdefault("ECHO_PORT", udp_target.port)
        cfg = render_bootstrap(template, workdir / f"{impl}-{len(started)}-{template.removesuffix('.in')}",
                               **values)
        proxy = ProxyProcess(impl, cfg, workdir, request.node.name)
        started.append(proxy)
        try:
            proxy.wait_ready()
        except Exception:
            proxy.startup_failed = True  # reported by this exception; not again at teardown
            raise
        return proxy

    yield start

    stop_all(started, request)


def stop_all(started: list[ProxyProcess], request) -> None:
    """Teardown: stop every process; an unexpected death (not allow_death) fails the test."""
    problems = []
    for proxy in started:
        died = proxy.stop()
        if died is not None:
            note = (" (expected by the test)" if proxy.allow_death
                    else " (during startup)" if proxy.startup_failed else "")
            DEATHS.append(f"{request.node.nodeid}: {proxy.name} {died}{note}")
            if not proxy.allow_death and not proxy.startup_failed:
                problems.append(f"{proxy.name} died unexpectedly ({died}); log tail:\n{proxy.log_tail()}")
    if problems:
        pytest.fail("\n".join(problems))


# Log level of the processes started by ``spawn_proxy`` (e.g. INTEROP_LOG_LEVEL=debug to
# see Ferry's view of a failing chain test in its log).
SPAWN_LOG_LEVEL = os.environ.get("INTEROP_LOG_LEVEL", "error")


@pytest.fixture
def spawn_proxy(workdir, request):
    """Factory for tests that run several proxies (chains), each of a chosen impl:

    spawn_proxy(impl, name, template="x.yaml.in", **placeholders) or
    spawn_proxy(impl, name, config=PATH) -> ready ProxyProcess.

    Skips the test if the impl's binary is missing. ``name`` must be unique within the
    test (it names the log and admin-address files). Teardown as in ``start_proxy``.
    """
    started: list[ProxyProcess] = []

    def spawn(impl: str, name: str, template: str | None = None, config: Path | None = None,
              **values) -> ProxyProcess:
        skip_if_missing(impl)
        assert (template is None) != (config is None), "give exactly one of template, config"
        assert all(p.name != name for p in started), f"duplicate proxy name {name}"
        if template is not None:
            config = render_bootstrap(template, workdir / f"{name}-{template.removesuffix('.in')}", **values)
        proxy = ProxyProcess(impl, config, workdir, request.node.name, name=name,
                             log_level=SPAWN_LOG_LEVEL)
        started.append(proxy)
        try:
            proxy.wait_ready()
        except Exception:
            proxy.startup_failed = True
            raise
        return proxy

    yield spawn

    stop_all(started, request)


@pytest.fixture
def proxy(start_proxy) -> ProxyProcess:
    """The default proxy: terminate-h3 bootstrap (domains "*"), UDP target = udp_target."""
    return start_proxy()


def pytest_terminal_summary(terminalreporter):
    if DEATHS:
        terminalreporter.section("proxy processes that died during tests")
        for line in DEATHS:
            terminalreporter.write_line(line)
