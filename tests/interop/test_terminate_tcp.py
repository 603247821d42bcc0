"""Differential tests: CONNECT-UDP termination over TCP (TLS, ALPN h2 + http/1.1),
Envoy 1.40 vs Ferry.

Envoy's ConnectUdpTerminationIntegrationTest scenarios ported to the two TCP versions:

* HTTP/2 extended CONNECT (RFC 8441; ``:method CONNECT``, ``:protocol connect-udp``), client
  from the ``h2`` package (``tcp_client.H2Client``);
* HTTP/1.1 Upgrade (``GET`` + ``Connection: Upgrade`` + ``Upgrade: connect-udp``, RFC 9298
  section 3.2), raw TLS socket (``tcp_client.H1Tunnel``).

Datagrams travel as DATAGRAM capsules on the stream in both directions. Bootstraps:
``terminate-tcp-h2-h1.yaml.in`` (the shared reference, domains ``*``) and
``vhosts-tcp-h2-h1.yaml.in`` (specific virtual hosts).

Where the two differ, each side's expectation is written out:

* HTTP/1.1: Ferry answers ``101`` with ``Upgrade: connect-udp`` and relays capsules on the
  upgraded connection. Envoy 1.40 answers ``200`` (no ``Upgrade``, ``Transfer-Encoding:
  chunked``, ``Connection: close``); what the client sends after the head still reaches the
  target, and the reply comes back as a chunk of the 200's body - not a usable tunnel.
* Ports 0, 70000, ``http``: Envoy answers 200 and relays to the cluster host anyway; Ferry 404.
* HTTP/1.1 with two Host headers: Envoy 200; Ferry 400 (RFC 9298 s. 3.2: a single Host).
* HTTP/2 header-only request (END_STREAM on HEADERS): Envoy 400 (and keeps running, unlike
  over HTTP/3); Ferry cannot see the END_STREAM (hyper hides it) and answers 200 with a
  tunnel that ends at once (a documented limitation; 400 would be accepted too).
* Capsule type 0x01 (Envoy's DropUnknownCapsules fragment): Envoy resets the HTTP/2 stream
  (INTERNAL_ERROR) or closes the HTTP/1.1 connection; Ferry drops the capsule.

To keep the file fast, each implementation's two proxies are started once per module and
shared by its tests (none of these cases crashes Envoy); every test checks at the end that
the processes are still alive. The slow-reader tests (Ferry only) start their own process.
"""

from __future__ import annotations

import re
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import (
    DEATHS,
    IMPLEMENTATIONS,
    ProxyProcess,
    UdpTarget,
    plus_0x10,
    render_bootstrap,
    skip_if_missing,
    wait_until,
)
from masque_client import CAPSULE_GREASE, encode_capsule
from tcp_client import H1Tunnel, H2Client

A = bytes.fromhex("a1a2a3a4a5a6a7")
B = bytes.fromhex("b1b2b3b4b5b6b7")
CAPSULE_A = bytes.fromhex("000800") + A  # Envoy's test vector: DATAGRAM, length 8, context 0
CAPSULE_B = bytes.fromhex("000800") + B
WAIT = 3.0  # bound for one expected event
VERSIONS = ["h2", "h1"]
TERMINATE = "terminate-tcp-h2-h1.yaml.in"
VHOSTS = "vhosts-tcp-h2-h1.yaml.in"
SETTINGS_ENABLE_CONNECT_PROTOCOL = 0x8
H2_INTERNAL_ERROR = 0x2


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", params=IMPLEMENTATIONS)
def impl(request) -> str:
    """Module-scoped here, so that each implementation's proxies start once per module."""
    skip_if_missing(request.param)
    return request.param


@pytest.fixture(scope="module")
def shared_target():
    target = UdpTarget()
    yield target
    target.close()


@pytest.fixture(scope="module")
def module_proxies(impl, shared_target, tmp_path_factory):
    """Factory: the (lazily started, then shared) proxy of ``impl`` for a bootstrap."""
    workdir = tmp_path_factory.mktemp(f"tcp-{impl}")
    started: dict[str, ProxyProcess] = {}

    def get(template: str) -> ProxyProcess:
        if template not in started:
            cfg = render_bootstrap(template, workdir / template.removesuffix(".in"),
                                   ECHO_PORT=shared_target.port)
            proxy = ProxyProcess(impl, cfg, workdir, f"{impl} {template}",
                                 name=f"{impl}-{template.removesuffix('.yaml.in')}")
            started[template] = proxy
            try:
                proxy.wait_ready()
            except Exception:
                proxy.startup_failed = True
                raise
        return started[template]

    get.started = started
    yield get
    for template, proxy in started.items():
        died = proxy.stop()
        if died is not None:
            DEATHS.append(f"{__name__} ({template}): {proxy.name} {died}")


@pytest.fixture(autouse=True)
def _fresh_target_and_alive_check(request, shared_target):
    """Before each test: empty target, Envoy's a->b reply rule. After: every shared proxy
    of the module is still alive (none of these cases is a known crash)."""
    shared_target.clear()
    shared_target.reply = plus_0x10
    yield
    if "module_proxies" in request.fixturenames:
        get = request.getfixturevalue("module_proxies")
        for proxy in get.started.values():
            if not proxy.startup_failed and not proxy.alive():
                pytest.fail(f"{proxy.name} died ({proxy.exit_description()}); log tail:\n"
                            f"{proxy.log_tail()}")


@pytest.fixture
def proxy(module_proxies) -> ProxyProcess:
    """The reference bootstrap (domains ``*``)."""
    return module_proxies(TERMINATE)


@pytest.fixture
def vhosts_proxy(module_proxies) -> ProxyProcess:
    return module_proxies(VHOSTS)


# --------------------------------------------------------------------------- helpers


@contextmanager
def tunnel(proxy: ProxyProcess, version: str, **kwargs):
    """A CONNECT-UDP request on a fresh connection; yields once the response head is in
    (or WAIT has passed). HTTP/2: an ``H2Stream``; HTTP/1.1: an ``H1Tunnel``."""
    if version == "h2":
        with H2Client(proxy.listener_port) as client:
            yield client.tunnel(timeout=WAIT, **kwargs)
    else:
        with H1Tunnel(proxy.listener_port) as t:
            t.request(timeout=WAIT, **kwargs)
            yield t


def dechunk(data: bytes) -> bytes:
    """The data of the complete chunks at the start of a chunked HTTP/1.1 body."""
    out, pos = b"", 0
    while True:
        nl = data.find(b"\r\n", pos)
        if nl < 0:
            return out
        size = int(data[pos:nl].split(b";")[0] or b"0", 16)
        start = nl + 2
        if size == 0 or start + size + 2 > len(data):
            return out
        out += data[start:start + size]
        pos = start + size + 2


def assert_error(impl: str, t, *allowed: int) -> None:
    """The response is one of the allowed error statuses; Ferry's carry Proxy-Status."""
    assert t.status in allowed, f"{impl}: expected status in {allowed}, got {t.describe()}"
    if impl == "ferry":
        ps = t.header("proxy-status")
        assert ps is not None, f"ferry error response without proxy-status: {t.headers}"
        assert ps.lower().startswith("ferry"), f"proxy-status should name ferry first: {ps!r}"


def assert_tunnel_works(impl: str, version: str, t, target: UdpTarget) -> None:
    """Envoy's capsule exchange: `00 08 00 a1..a7` in, a1..a7 at the target, b1..b7 out of
    the target, `00 08 00 b1..b7` back to the client.

    envoy over HTTP/1.1: 200 instead of 101; a1..a7 still reaches the target and the reply
    capsule comes back chunk-encoded in the 200's body (asserted, so that a change shows).
    """
    target.reply = plus_0x10
    if version == "h1" and impl == "envoy":
        assert t.status == 200, f"Envoy 1.40 answered an HTTP/1.1 upgrade with 200; now {t.describe()}"
        assert t.header("upgrade") is None
        assert t.header("transfer-encoding") == "chunked", t.describe()
        t.send_raw(CAPSULE_A)
        wait_until(lambda: target.saw(A), WAIT, "a1..a7 at the target")
        assert t.wait(lambda: CAPSULE_B in dechunk(t.response_body), WAIT), (
            f"envoy: reply not in the chunked body: {t.describe()}")
        assert dechunk(t.response_body) == CAPSULE_B
        assert target.payloads() == [A]
        return
    expected = 101 if version == "h1" else 200
    assert t.status == expected, f"{impl}: expected {expected}, got {t.describe()}"
    assert t.header("capsule-protocol") == "?1", t.describe()
    if version == "h1":
        assert (t.header("upgrade") or "").lower() == "connect-udp", t.describe()
        assert "upgrade" in (t.header("connection") or "").lower(), t.describe()
    t.send_raw(CAPSULE_A)
    wait_until(lambda: target.saw(A), WAIT, f"a1..a7 at the target ({t.describe()})")
    assert t.recv(WAIT) == B, f"{impl}: no reply capsule: {t.describe()}"
    assert bytes(t.body) == CAPSULE_B
    assert target.payloads() == [A]


def tunnel_opened(impl: str, version: str, t) -> None:
    """The status of an accepted request (Envoy's HTTP/1.1: 200 instead of 101)."""
    expected = 101 if (version == "h1" and impl == "ferry") else 200
    assert t.status == expected, f"{impl}: expected {expected}, got {t.describe()}"


# --------------------------------------------------------------------------- exchanges


def test_h2_settings_enable_connect_protocol(impl, proxy):
    """`http2_protocol_options.allow_connect: true` -> SETTINGS_ENABLE_CONNECT_PROTOCOL=1."""
    with H2Client(proxy.listener_port) as client:
        assert client.peer_settings.get(SETTINGS_ENABLE_CONNECT_PROTOCOL) == 1, client.peer_settings


@pytest.mark.parametrize("version", VERSIONS)
def test_exchange_capsules(impl, proxy, shared_target, version):
    with tunnel(proxy, version) as t:
        assert_tunnel_works(impl, version, t, shared_target)


@pytest.mark.parametrize("version", VERSIONS)
def test_exchange_without_capsule_protocol_header(impl, proxy, shared_target, version):
    with tunnel(proxy, version, capsule_protocol=False) as t:
        assert_tunnel_works(impl, version, t, shared_target)


def test_several_tunnels_on_one_h2_connection(impl, proxy, shared_target):
    """4 tunnels x 3 rounds on one HTTP/2 connection: each gets only its own echoes, and
    each has its own upstream socket."""
    shared_target.reply = lambda d: d
    with H2Client(proxy.listener_port) as client:
        tunnels = [client.open_tunnel() for _ in range(4)]
        for t in tunnels:
            assert t.wait_status(WAIT) == 200, t.describe()
        for round_ in range(3):
            for i, t in enumerate(tunnels):
                t.send(f"tunnel {i} round {round_}".encode())
            for i, t in enumerate(tunnels):
                got = t.recv(WAIT)
                assert got == f"tunnel {i} round {round_}".encode(), f"{t.describe()} got {got!r}"
        peers = {peer for _, peer in shared_target.received}
        assert len(peers) == len(tunnels), peers


# --------------------------------------------------------------------------- host matching


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("host,port,expected", [
    ("foo.lyft.com", 80, 200),  # the vhost domain foo.lyft.com:80
    ("bar.lyft.com", 80, 404),  # wrong host
    ("foo.lyft.com", 8080, 404),  # wrong port
    ("179.0.112.43", 80, 200),  # IPv4 literal
    ("2001:0db8:85a3::8a2e:0370:7334", 80, 200),  # IPv6 literal -> [..]:80
], ids=["domain-match", "wrong-host", "wrong-port", "ipv4", "ipv6"])
def test_vhost_routing(impl, vhosts_proxy, shared_target, version, host, port, expected):
    with tunnel(vhosts_proxy, version, host=host, port=port) as t:
        if expected == 200:
            assert_tunnel_works(impl, version, t, shared_target)
        else:
            assert_error(impl, t, expected)
            assert shared_target.payloads() == []


@pytest.mark.parametrize("version", VERSIONS)
def test_ipv6_zone_id_rejected(impl, vhosts_proxy, version):
    """`fe80::a%25ee1` -> 404 even though a vhost `[fe80::a%ee1]:80` exists."""
    with tunnel(vhosts_proxy, version, path="/.well-known/masque/udp/fe80::a%25ee1/80/") as t:
        assert_error(impl, t, 404)


# --------------------------------------------------------------------------- path checks


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", [
    "/masque/udp/foo.lyft.com/80/",
    "/.well-known/masque/udp//80/",
    "/.well-known/masque/udp/foo.lyft.com//",
    "/.well-known/masque/udp/foo.lyft.com/80",
    "/.well-known/masque/udp/foo.lyft.com/80/extra/",
], ids=["not-well-known", "empty-host", "empty-port", "no-trailing-slash", "extra-segment"])
def test_bad_path_404(impl, proxy, shared_target, version, path):
    with tunnel(proxy, version, path=path) as t:
        assert_error(impl, t, 404)
    assert shared_target.payloads() == []


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("port", ["70000", "0", "http"])
def test_bad_port(impl, proxy, shared_target, version, port):
    """Documented difference: Envoy 1.40 accepts these ports (200) and relays to the cluster
    host anyway (over HTTP/1.1 as over HTTP/2); Ferry rejects them with 404."""
    with tunnel(proxy, version, port=port) as t:
        if impl == "envoy":
            assert t.status == 200, f"Envoy 1.40 accepted port {port!r}; now {t.describe()}"
            assert_tunnel_works(impl, version, t, shared_target)
        else:
            assert_error(impl, t, 404)
            assert shared_target.payloads() == []


# --------------------------------------------------------------------------- dropped input


@pytest.mark.parametrize("version", VERSIONS)
def test_unknown_capsules_and_context_ids_are_dropped(impl, proxy, shared_target, version):
    """A greased capsule type and a DATAGRAM capsule with context id 1 produce no UDP
    packet; the context-0 marker after them does, and the tunnel stays open."""
    shared_target.reply = lambda d: None
    with tunnel(proxy, version) as t:
        tunnel_opened(impl, version, t)
        t.send_raw(encode_capsule(CAPSULE_GREASE, b"\x00grease"))
        t.send(b"ctx1-capsule", context_id=1)
        t.send(b"marker")
        wait_until(lambda: shared_target.saw(b"marker"), WAIT, f"the marker at the target ({t.describe()})")
        t.send(b"last")  # one more, so that late stragglers would have arrived
        wait_until(lambda: shared_target.saw(b"last"), WAIT, "the last marker at the target")
        assert shared_target.payloads() == [b"marker", b"last"]
        assert not t.closed, t.describe()


@pytest.mark.parametrize("version", VERSIONS)
def test_capsule_type_0x01(impl, proxy, shared_target, version):
    """Envoy's DropUnknownCapsules fragment `01 08 00 a1..a7`, then a context-0 marker.

    ferry: 0x01 means nothing for CONNECT-UDP; dropped, the marker arrives, tunnel open.
    envoy: its capsule parser reads 0x01 as CONNECT-IP ADDRESS_ASSIGN and fails
           ("Capsule ingestion error"): HTTP/2 RST_STREAM INTERNAL_ERROR, HTTP/1.1
           connection closed; nothing reaches the target.
    """
    with tunnel(proxy, version) as t:
        tunnel_opened(impl, version, t)
        t.send_raw(bytes.fromhex("010800") + A)
        t.send(b"marker")
        if impl == "ferry":
            wait_until(lambda: shared_target.saw(b"marker"), WAIT, f"the marker ({t.describe()})")
            assert shared_target.payloads() == [b"marker"]
            assert not t.closed, t.describe()
        else:
            assert t.wait_closed(WAIT), f"Envoy 1.40 used to end this tunnel: {t.describe()}"
            if version == "h2":
                assert t.reset_code == H2_INTERNAL_ERROR, t.describe()
            assert shared_target.payloads() == []


# --------------------------------------------------------------------------- hostile input


@pytest.mark.parametrize("hosts,envoy_status", [
    (("proxy.test", "proxy.test"), 200),
    (("proxy.test", "other.test"), 200),
    ((), 400),
], ids=["two-same", "two-different", "none"])
def test_h1_host_header_count(impl, proxy, shared_target, hosts, envoy_status):
    """RFC 9298 s. 3.2: a single Host header. Ferry: 400 with Proxy-Status otherwise.
    Envoy 1.40: accepts two Host headers (200), rejects none (400)."""
    with tunnel(proxy, "h1", host_headers=hosts) as t:
        if impl == "ferry":
            assert_error(impl, t, 400)
            assert shared_target.payloads() == []
        else:
            assert t.status == envoy_status, f"Envoy 1.40 answered {envoy_status}; now {t.describe()}"


def test_h2_header_only_request(impl, proxy, shared_target):
    """END_STREAM on the HEADERS of an extended CONNECT (RFC 9298 needs the stream).

    envoy: 400 with END_STREAM; keeps running (over HTTP/3 it segfaults); the connection
           still carries a new tunnel.
    ferry: hyper hides END_STREAM on a CONNECT, so Ferry answers 200 and the tunnel ends at
           once (documented limitation; a 400 with Proxy-Status would be accepted too);
           nothing reaches the target; the connection still carries a new tunnel.
    """
    with H2Client(proxy.listener_port) as client:
        t = client.open_tunnel(end_stream=True)
        t.wait_status(WAIT)
        if impl == "envoy":
            assert t.status == 400, t.describe()
            assert t.wait_closed(WAIT) and t.ended, t.describe()
        elif t.status == 400:
            assert_error(impl, t, 400)
        else:
            assert t.status == 200, t.describe()
            assert t.wait_closed(WAIT), f"ferry: header-only tunnel still open: {t.describe()}"
        assert shared_target.payloads() == []
        assert not client.terminated, "the connection should survive"
        second = client.tunnel(timeout=WAIT)
        assert_tunnel_works(impl, "h2", second, shared_target)
    assert proxy.alive()


# --------------------------------------------------------------------------- slow reader (Ferry)


def proc_status(pid: int, key: str) -> int:
    """A ``kB`` line of /proc/PID/status, in bytes."""
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    assert m, f"no {key} in /proc/{pid}/status"
    return int(m.group(1)) * 1024


def udp_rx_queue(local_port: int) -> int | None:
    """rx_queue of the UDP socket bound to local_port (from /proc/net/udp{,6})."""
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == local_port:
                return int(fields[4].split(":")[1], 16)
    return None


# 80 MB of datagrams against a 64 MiB limit: a proxy that kept everything the target sent
# for the stalled client fails (Envoy 1.40, not asserted here, reads the whole flood and
# grows by ~145 MiB over HTTP/2). Sending takes about a second on loopback.
FLOOD_COUNT = 80_000
FLOOD_SIZE = 1_000
RSS_GROWTH_LIMIT = 64 << 20


@pytest.mark.parametrize("version", VERSIONS, ids=["ferry-h2", "ferry-h1"])
def test_slow_reader_bounded_memory(spawn_proxy, udp_target, version):
    """Ferry only. The client opens a tunnel, sends one datagram, then stops reading (no
    WINDOW_UPDATE over HTTP/2, no reads at all) while the target floods the tunnel's
    upstream socket with 80,000 datagrams of 1,000 bytes as fast as it can. Ferry's peak RSS
    (VmHWM) must stay less than 64 MiB above its RSS before the flood, and Ferry must still
    serve a new tunnel (on a new connection) while the stalled one is open."""
    ferry = spawn_proxy("ferry", "ferry", template=TERMINATE, ECHO_PORT=udp_target.port)
    pid = ferry.proc.pid
    udp_target.reply = lambda d: None
    stalled = H2Client(ferry.listener_port) if version == "h2" else H1Tunnel(ferry.listener_port)
    try:
        if version == "h2":
            t = stalled.tunnel(timeout=WAIT)
            assert t.status == 200, t.describe()
        else:
            t = stalled
            assert t.request(timeout=WAIT) == 101, t.describe()
        t.send(b"go")  # from here on the client reads nothing
        wait_until(lambda: udp_target.saw(b"go"), WAIT, "the first datagram at the target")
        ferry_port = udp_target.received[0][1]
        before = proc_status(pid, "VmRSS")

        payload = b"x" * FLOOD_SIZE
        sent = 0
        for _ in range(FLOOD_COUNT):
            try:
                udp_target.sock.sendto(payload, ferry_port)
                sent += 1
            except (socket.timeout, BlockingIOError):
                pass
        # Let Ferry finish with what it will take from its socket: poll until the socket's
        # receive queue stops changing (drained, or no longer read), bounded.
        deadline = time.monotonic() + 10
        last, steady = None, 0
        while steady < 5 and time.monotonic() < deadline:
            q = udp_rx_queue(ferry_port[1])
            steady = steady + 1 if q == last else 0
            last = q
            time.sleep(0.02)
        peak = proc_status(pid, "VmHWM")
        growth = peak - before
        assert ferry.alive(), f"ferry died: {ferry.exit_description()}\n{ferry.log_tail()}"
        assert growth < RSS_GROWTH_LIMIT, (
            f"ferry RSS grew by {growth >> 20} MiB (VmRSS before {before >> 20} MiB, VmHWM after "
            f"{peak >> 20} MiB) with a stalled {version} reader; {sent} datagrams sent, "
            f"socket rx_queue {last}")

        # A new tunnel still works while the stalled one is open.
        udp_target.reply = lambda d: d
        with tunnel(ferry, version) as fresh:
            tunnel_opened("ferry", version, fresh)
            fresh.send(b"still here")
            assert fresh.recv(WAIT) == b"still here", fresh.describe()
        assert ferry.alive()
    finally:
        stalled.close()
