"""Fault injection: impaired paths, a next hop killed and restarted, a client that vanishes.

Every test runs the Ferry binary (FERRY_BIN) as a child process on loopback and drives it
with the independent aioquic client (masque_client.py).

- Impaired paths (loss, duplication, reordering, delay) between client and proxy and between
  proxy and target, with the userspace impairer of ``impair.py`` (runs on any machine), and
  again with ``tc netem`` in a network namespace where the kernel has ``sch_netem`` (else
  that test is SKIPPED with the reason, never passed).
- The next hop of a two-hop chain killed (SIGKILL: no CONNECTION_CLOSE) mid-traffic and
  restarted on the same port: the first hop's tunnels end (counted), new tunnels work.
- A client that vanishes without closing anything: the stream idle timeout reclaims every
  tunnel and its UDP socket; the open file descriptors return to their baseline.

(A target answering with ICMP port unreachable closing its tunnel is covered by
``crates/ferry/tests/terminate_h3.rs::icmp_unreachable_closes_tunnel``.)
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import (
    FERRY_BIN, HERE, REPO_ROOT, ProxyProcess, UdpTarget, async_wait_until, render_bootstrap,
    run_async, skip_if_missing, wait_until,
)
from impair import Impairment, UdpImpairer
from masque_client import MasqueClient, Tunnel

P = "http.ingress_http.connect_udp."
TUNNELS_ACTIVE = P + "tunnels_active"
# netem's example figures: 5% loss, 5% duplication, 5% reordering, 20 ms delay (+-5 ms).
IMPAIRED = Impairment(loss=0.05, duplicate=0.05, reorder=0.05, delay=0.020, jitter=0.005)
ECHOES = 200
# End to end, a datagram crosses four impaired hops (client->proxy->target->proxy->client);
# at 5% loss each about 81% come back. The bound leaves room for bad luck, not for a
# broken tunnel (which returns nothing).
MIN_DELIVERED = 0.5
SETUP_WAIT = 10.0


def fd_count(proxy: ProxyProcess) -> int:
    return len(os.listdir(f"/proc/{proxy.proc.pid}/fd"))


def with_stream_idle_timeout(src: Path, timeout: str) -> Path:
    """The bootstrap at src with HCM stream_idle_timeout set (after its stat_prefix)."""
    text = src.read_text()
    line = "          stat_prefix: ingress_http\n"
    assert text.count(line) == 1, f"{src}: expected one HCM stat_prefix line"
    src.write_text(text.replace(line, line + f"          stream_idle_timeout: {timeout}\n"))
    return src


@pytest.fixture
def impairers():
    """Factory: impairers(upstream_port) -> UdpImpairer on 127.0.0.1; all closed at teardown."""
    made: list[UdpImpairer] = []

    def make(port: int) -> UdpImpairer:
        imp = UdpImpairer(("127.0.0.1", port))
        made.append(imp)
        return imp

    yield make
    for imp in made:
        imp.close()


async def echo_round(tunnel: Tunnel, payloads: list[bytes], pace: float = 0.005,
                     quiet: float = 2.0) -> set[bytes]:
    """Send every payload (paced), then collect replies until all came back or none arrived
    for ``quiet`` seconds. Returns the distinct payloads that came back."""
    for p in payloads:
        tunnel.send(p)
        await asyncio.sleep(pace)
    got: set[bytes] = set()
    while len(got) < len(payloads):
        reply = await tunnel.recv_or_none(quiet)
        if reply is None:
            break
        got.add(reply)
    return got


async def recover(tunnel: Tunnel, stale: set[bytes], rounds: int = 20) -> None:
    """On a clean path, every echo comes back (late duplicates of older ones are skipped)."""
    for i in range(rounds):
        want = b"after-%03d" % i
        tunnel.send(want)
        while True:
            got = await tunnel.recv(3.0)
            if got == want:
                break
            assert got in stale, f"unexpected payload {got!r} while waiting for {want!r}"


# --------------------------------------------------------------------------- impaired paths


@pytest.mark.parametrize("h3_datagram", [True, False], ids=["quic-datagrams", "capsules"])
def test_impaired_paths_keep_tunnels_working_and_recover(spawn_proxy, impairers, udp_target,
                                                         h3_datagram):
    """5% loss + 5% duplication + 5% reordering + 20 ms delay on both the client-proxy and the
    proxy-target path: the tunnel opens, at least half of 200 echoes come back (about 81%
    expected with QUIC datagrams, more with capsules, which QUIC retransmits), nothing comes
    back that was not sent; once the impairment is removed, 20 echoes in a row come back on
    the same tunnel, and the proxy counted what it relayed."""
    to_target = impairers(udp_target.port)
    proxy = spawn_proxy("ferry", "ferry", template="terminate-h3.yaml.in", ECHO_PORT=to_target.port)
    to_proxy = impairers(proxy.listener_port)
    sent = [b"echo-%04d" % i for i in range(ECHOES)]

    async def body():
        to_proxy.set(IMPAIRED)
        to_target.set(IMPAIRED)
        async with MasqueClient.connect("127.0.0.1", to_proxy.port, h3_datagram=h3_datagram,
                                        idle_timeout=30.0, timeout=SETUP_WAIT) as client:
            tunnel = await client.tunnel("foo.lyft.com", 80, timeout=SETUP_WAIT)
            assert tunnel.status == 200, tunnel.describe_end()
            got = await echo_round(tunnel, sent)
            assert got <= set(sent), f"payloads never sent: {sorted(got - set(sent))[:5]}"
            assert len(got) >= MIN_DELIVERED * ECHOES, (
                f"{len(got)}/{ECHOES} echoes under {IMPAIRED.describe()}; "
                f"impairers: to proxy {to_proxy.counts}, to target {to_target.counts}")
            # The impairment really happened on both paths.
            for imp in (to_proxy, to_target):
                assert imp.counts.lost and imp.counts.duplicated and imp.counts.reordered, imp.counts
            to_proxy.clear()
            to_target.clear()
            await recover(tunnel, set(sent))
            assert not tunnel.ended, tunnel.describe_end()
            assert client.terminated is None
            return len(got)

    delivered = run_async(body(), timeout=90)
    print(f"impaired paths ({'datagrams' if h3_datagram else 'capsules'}): {delivered}/{ECHOES} echoes")
    rx = proxy.counter(P + ("downstream_rx_datagrams_quic" if h3_datagram else "downstream_rx_datagrams_capsule"))
    assert rx is not None and rx >= delivered, rx
    assert proxy.counter(P + "upstream_datagrams_tx") >= delivered
    assert proxy.alive()


# --------------------------------------------------------------------------- next hop killed


def free_udp_port() -> int:
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_next_hop_killed_mid_traffic_then_restarted(spawn_proxy, udp_target):
    """client -> Ferry (forwards) -> Ferry (terminates) -> echo. While datagrams flow, the next
    hop is SIGKILLed (it sends nothing: no CONNECTION_CLOSE, no reset). The first hop notices
    the silent connection (keep-alive, 10 s idle timeout), ends the tunnel on it (the client
    sees its stream end, its connection stays up) and counts the lost connection
    (cluster.next_hop.upstream_cx_destroy). The next hop is restarted on the same port: a new
    tunnel on the same client connection opens and echoes."""
    port = free_udp_port()
    nh1 = spawn_proxy("ferry", "next-1", template="terminate-h3.yaml.in", PROXY_PORT=port,
                      ECHO_PORT=udp_target.port)
    first = spawn_proxy("ferry", "first", template="forward-h3.yaml.in", NEXT_HOP_PORT=port)

    async def body():
        async with MasqueClient.connect("127.0.0.1", first.listener_port, idle_timeout=60.0) as client:
            t1 = await client.tunnel("foo.lyft.com", 80, timeout=SETUP_WAIT)
            assert t1.status == 200, t1.describe_end()
            t1.send(b"before")
            assert await t1.recv(3.0) == b"before"

            stop = asyncio.Event()

            async def traffic():
                i = 0
                while not stop.is_set() and not t1.ended:
                    t1.send(b"during-%d" % i)
                    i += 1
                    await asyncio.sleep(0.01)

            sender = asyncio.ensure_future(traffic())
            await async_wait_until(lambda: udp_target.saw(b"during-5"), 3.0)
            nh1.allow_death = True  # killed on purpose
            nh1.proc.kill()
            nh1.proc.wait(timeout=5)
            killed_at = time.monotonic()
            ended = await t1.wait_closed(25.0)
            stop.set()
            await sender
            assert ended, "the first hop never ended the tunnel through the dead next hop"
            print(f"tunnel ended {time.monotonic() - killed_at:.1f} s after the kill: {t1.describe_end()}")
            assert client.terminated is None, f"client connection died: {client.terminated}"
            assert first.alive()
            assert first.counter("cluster.next_hop.upstream_cx_destroy") >= 1
            assert first.counter("cluster.next_hop.upstream_cx_active") == 0
            assert first.counter(TUNNELS_ACTIVE) == 0

            nh2 = spawn_proxy("ferry", "next-2", template="terminate-h3.yaml.in", PROXY_PORT=port,
                              ECHO_PORT=udp_target.port)
            t2 = await client.tunnel("foo.lyft.com", 80, timeout=SETUP_WAIT)
            assert t2.status == 200, t2.describe_end()
            for i in range(5):
                t2.send(b"after-%d" % i)
                assert await t2.recv(3.0) == b"after-%d" % i
            assert nh2.counter(TUNNELS_ACTIVE) == 1
            assert first.counter("cluster.next_hop.upstream_cx_active") == 1

    run_async(body(), timeout=90)
    assert first.alive()


# --------------------------------------------------------------------------- vanished client


def test_vanished_client_is_reclaimed_by_idle_timeout(spawn_proxy, workdir, udp_target):
    """A client opens 5 tunnels, echoes once on each, then vanishes: its socket closes, no
    CONNECTION_CLOSE, no stream end. With stream_idle_timeout 1s, Ferry ends every tunnel
    (streams_reset_idle_timeout 5), closes each tunnel's UDP socket (open fds back to the
    baseline taken before the client came), and tunnels_active / upstream_cx_active return
    to 0. (The QUIC connection itself goes at the QUIC idle timeout, 300 s as in Envoy;
    it holds no file descriptor.)"""
    cfg = render_bootstrap("terminate-h3.yaml.in", workdir / "terminate-idle.yaml",
                           ECHO_PORT=udp_target.port)
    proxy = spawn_proxy("ferry", "ferry", config=with_stream_idle_timeout(cfg, "1s"))
    baseline = fd_count(proxy)

    async def body():
        async with MasqueClient.connect("127.0.0.1", proxy.listener_port, idle_timeout=60.0) as client:
            tunnels = [await client.tunnel("foo.lyft.com", 80) for _ in range(5)]
            for i, t in enumerate(tunnels):
                assert t.status == 200
                t.send(b"hi-%d" % i)
                assert await t.recv(3.0) == b"hi-%d" % i
            assert proxy.counter(TUNNELS_ACTIVE) == 5
            assert fd_count(proxy) >= baseline + 5, "one UDP socket per tunnel expected"
            # Vanish: nothing more leaves this client, not even CONNECTION_CLOSE.
            client.protocol.transmit = lambda: None
            client.protocol._transport.close()

    run_async(body(), timeout=30)
    wait_until(lambda: proxy.counter(TUNNELS_ACTIVE) == 0, 10.0, "tunnels_active == 0")
    wait_until(lambda: fd_count(proxy) <= baseline, 10.0, f"open fds back to {baseline}")
    assert proxy.counter(P + "streams_reset_idle_timeout") == 5
    assert proxy.counter("cluster.service_target.upstream_cx_active") == 0
    assert proxy.alive()


# --------------------------------------------------------------------------- netem


# The qdisc put on the namespace's loopback. FERRY_FAULT_QDISC overrides it (e.g. "pfifo"
# checks the namespace plumbing on a kernel without netem; that run impairs nothing).
NETEM = os.environ.get("FERRY_FAULT_QDISC", "netem loss 5% duplicate 5% reorder 25% delay 20ms 5ms")
NS_PROXY_PORT = 4433
NS_ECHO_PORT = 9000


def _run(cmd: list[str], check: bool = True, timeout: float = 10.0) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check)


@pytest.fixture
def netns():
    """A fresh network namespace with lo up (unique name), deleted at teardown; SKIPPED
    (with the reason) where namespaces cannot be made here."""
    ip = shutil.which("ip") or "/usr/sbin/ip"
    if not os.path.exists(ip):
        pytest.skip("iproute2 `ip` not installed")
    name = f"ferry-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    r = _run([ip, "netns", "add", name], check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {r.stderr.strip()}")
    try:
        _run([ip, "netns", "exec", name, ip, "link", "set", "lo", "up"])
        yield name
    finally:
        _run([ip, "netns", "del", name], check=False)


def test_netem_in_namespace_keeps_tunnels_working_and_recovers(netns, workdir):
    """The same impairment with the kernel's netem, on the loopback of a private network
    namespace that holds Ferry, the UDP echo target and the client (so both the client-proxy
    and the proxy-target paths are impaired): at least half of 200 echoes come back; after
    ``tc qdisc del`` all 20 of a second round do. SKIPPED where the kernel has no netem."""
    skip_if_missing("ferry")
    tc = shutil.which("tc") or "/usr/sbin/tc"
    add = _run(["ip", "netns", "exec", netns, tc, "qdisc", "add", "dev", "lo", "root", *NETEM.split()],
               check=False)
    if add.returncode != 0:
        pytest.skip(f"`tc qdisc add ... {NETEM}` failed (kernel without sch_netem?): {add.stderr.strip()}")
    cfg = render_bootstrap("terminate-h3.yaml.in", workdir / "netns-terminate.yaml",
                           PROXY_PORT=NS_PROXY_PORT, ECHO_PORT=NS_ECHO_PORT)
    ns = ["ip", "netns", "exec", netns]
    procs = []
    try:
        echo = subprocess.Popen([*ns, sys.executable, str(REPO_ROOT / "scripts" / "udp-echo.py"),
                                 str(NS_ECHO_PORT)], stdout=subprocess.PIPE, text=True)
        procs.append(echo)
        assert echo.stdout is not None and "listening" in echo.stdout.readline()
        log = open(workdir / "ferry-netns.log", "wb")
        ferry = subprocess.Popen([*ns, str(FERRY_BIN), "-c", str(cfg), "--concurrency", "1", "-l", "error"],
                                 stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        procs.append(ferry)

        def probe(count: int, pace: float) -> dict:
            r = _run([*ns, sys.executable, str(HERE / "fault_probe.py"), "--port", str(NS_PROXY_PORT),
                      "--count", str(count), "--pace", str(pace)], check=False, timeout=60)
            assert r.returncode == 0, f"probe failed: {r.stdout}\n{r.stderr}"
            return json.loads(r.stdout.strip().splitlines()[-1])

        impaired = probe(ECHOES, 0.005)
        assert ferry.poll() is None, (workdir / "ferry-netns.log").read_text()
        assert impaired["status"] == 200, impaired
        assert impaired["foreign"] == 0, impaired
        assert impaired["received"] >= MIN_DELIVERED * ECHOES, impaired
        _run([*ns, tc, "qdisc", "del", "dev", "lo", "root"])
        clean = probe(20, 0.05)
        assert clean["status"] == 200 and clean["received"] == 20, clean
        assert ferry.poll() is None
        print(f"netem ({NETEM}): {impaired['received']}/{ECHOES}; clean: {clean['received']}/20")
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
