"""Fault injection: impaired paths, a next hop killed and restarted, a client that vanishes.

Every test runs the Ferry binary (FERRY_BIN) as a child process on loopback and drives it
with the independent aioquic client (masque_client.py).

- Impaired paths (loss, duplication, reordering, delay) between client and proxy and between
  proxy and target, with the userspace impairer of ``impair.py`` (runs on any machine), and
  again with ``tc netem`` in a network namespace where the kernel has ``sch_netem`` (else
  that test is SKIPPED with the reason, never passed), and with kernel loss and duplication
  (iptables ``statistic`` DROP and TEE) in two namespaces joined by veth.
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
    free_udp_port, run_async, skip_if_missing, wait_until,
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


def _new_netns(tag: str) -> str:
    """A fresh network namespace with lo up (unique name); SKIPPED (with the reason) where
    namespaces cannot be made here. The caller deletes it."""
    ip = shutil.which("ip") or "/usr/sbin/ip"
    if not os.path.exists(ip):
        pytest.skip("iproute2 `ip` not installed")
    name = f"ferry-{tag}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    r = _run([ip, "netns", "add", name], check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {r.stderr.strip()}")
    _run([ip, "netns", "exec", name, ip, "link", "set", "lo", "up"])
    return name


@pytest.fixture
def netns():
    """A fresh network namespace with lo up, deleted at teardown."""
    name = _new_netns("n")
    try:
        yield name
    finally:
        _run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def veth_namespaces():
    """Two namespaces, a client's and a proxy's, joined by a veth pair: the client is
    VETH_CLIENT, the proxy VETH_PROXY. Yields (client_ns, proxy_ns); deleted at teardown."""
    client = _new_netns("c")
    try:
        proxy = _new_netns("p")
    except BaseException:
        _run(["ip", "netns", "del", client], check=False)
        raise
    try:
        tag = uuid.uuid4().hex[:6]
        vc, vp = f"fvc{tag}", f"fvp{tag}"
        r = _run(["ip", "link", "add", vc, "type", "veth", "peer", "name", vp], check=False)
        if r.returncode != 0:
            pytest.skip(f"cannot create a veth pair: {r.stderr.strip()}")
        for dev, ns, addr in ((vc, client, VETH_CLIENT), (vp, proxy, VETH_PROXY)):
            _run(["ip", "link", "set", dev, "netns", ns])
            _run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev])
            _run(["ip", "-n", ns, "link", "set", dev, "up"])
        yield client, proxy
    finally:
        _run(["ip", "netns", "del", client], check=False)
        _run(["ip", "netns", "del", proxy], check=False)


class NsProxy:
    """Ferry and the UDP echo target running inside a network namespace."""

    def __init__(self, ns: str, workdir: Path, listen: str):
        self.ns = ns
        self.workdir = workdir
        cfg = render_bootstrap("terminate-h3.yaml.in", workdir / f"netns-terminate-{ns}.yaml",
                               PROXY_PORT=NS_PROXY_PORT, ECHO_PORT=NS_ECHO_PORT)
        cfg.write_text(cfg.read_text().replace(
            f"address: 127.0.0.1, port_value: {NS_PROXY_PORT}", f"address: {listen}, port_value: {NS_PROXY_PORT}"))
        self.log_path = workdir / f"ferry-{ns}.log"
        self.procs: list[subprocess.Popen] = []
        try:
            echo = subprocess.Popen([*self.exec_in(ns), sys.executable, str(REPO_ROOT / "scripts" / "udp-echo.py"),
                                     str(NS_ECHO_PORT)], stdout=subprocess.PIPE, text=True)
            self.procs.append(echo)
            assert echo.stdout is not None and "listening" in echo.stdout.readline()
            log = open(self.log_path, "wb")
            self.ferry = subprocess.Popen([*self.exec_in(ns), str(FERRY_BIN), "-c", str(cfg), "--concurrency", "1",
                                           "-l", "error"], stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
            self.procs.append(self.ferry)
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def exec_in(ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def probe(self, count: int, pace: float, client_ns: str | None = None, host: str = "127.0.0.1") -> dict:
        """fault_probe.py run in client_ns (default: the proxy's namespace): its JSON result."""
        r = _run([*self.exec_in(client_ns or self.ns), sys.executable, str(HERE / "fault_probe.py"),
                  "--host", host, "--port", str(NS_PROXY_PORT), "--count", str(count), "--pace", str(pace)],
                 check=False, timeout=60)
        assert r.returncode == 0, f"probe failed: {r.stdout}\n{r.stderr}"
        return json.loads(r.stdout.strip().splitlines()[-1])

    def assert_alive(self) -> None:
        assert self.ferry.poll() is None, self.log_path.read_text()

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)


def assert_impaired_then_clean(proxy: NsProxy, clear, client_ns: str | None = None,
                               host: str = "127.0.0.1") -> tuple[dict, dict]:
    """At least half of ECHOES echoes come back through the impaired paths, none foreign;
    after clear() removes the impairment, all 20 of a second round do."""
    impaired = proxy.probe(ECHOES, 0.005, client_ns, host)
    proxy.assert_alive()
    assert impaired["status"] == 200, impaired
    assert impaired["foreign"] == 0, impaired
    assert impaired["received"] >= MIN_DELIVERED * ECHOES, impaired
    clear()
    clean = proxy.probe(20, 0.05, client_ns, host)
    assert clean["status"] == 200 and clean["received"] == 20, clean
    proxy.assert_alive()
    return impaired, clean


def test_netem_in_namespace_keeps_tunnels_working_and_recovers(netns, workdir):
    """The same impairment with the kernel's netem, on the loopback of a private network
    namespace that holds Ferry, the UDP echo target and the client (so both the client-proxy
    and the proxy-target paths are impaired): at least half of 200 echoes come back; after
    ``tc qdisc del`` all 20 of a second round do. SKIPPED where the kernel has no netem."""
    skip_if_missing("ferry")
    tc = shutil.which("tc") or "/usr/sbin/tc"
    ns = NsProxy.exec_in(netns)
    add = _run([*ns, tc, "qdisc", "add", "dev", "lo", "root", *NETEM.split()], check=False)
    if add.returncode != 0:
        pytest.skip(f"`tc qdisc add ... {NETEM}` failed (kernel without sch_netem?): {add.stderr.strip()}")
    proxy = NsProxy(netns, workdir, "127.0.0.1")
    try:
        impaired, clean = assert_impaired_then_clean(
            proxy, lambda: _run([*ns, tc, "qdisc", "del", "dev", "lo", "root"]))
        print(f"netem ({NETEM}): {impaired['received']}/{ECHOES}; clean: {clean['received']}/20")
    finally:
        proxy.stop()


# Kernel impairment without netem: netfilter's `statistic` match drops (loss) and its TEE
# target clones (duplication) a random share of the UDP packets entering each namespace.
VETH_CLIENT = "10.231.0.1"
VETH_PROXY = "10.231.0.2"
KERNEL_LOSS = 0.05
KERNEL_DUPLICATE = 0.05


def test_kernel_loss_and_duplication_across_namespaces(veth_namespaces, workdir):
    """Client and proxy in two network namespaces joined by veth, the target on the proxy
    namespace's loopback. The kernel (iptables in each namespace) drops 5% and duplicates 5%
    of the UDP packets entering either namespace, so the client-proxy path is impaired both
    ways and the proxy-target path too (its loopback). At least half of 200 echoes come back,
    none foreign; after the rules are flushed all 20 of a second round do. SKIPPED where
    iptables is missing (scripts/test.sh installs it)."""
    skip_if_missing("ferry")
    iptables = shutil.which("iptables") or "/usr/sbin/iptables"
    if not os.path.exists(iptables):
        pytest.skip("iptables not installed")
    client_ns, proxy_ns = veth_namespaces
    for ns, own in ((client_ns, VETH_CLIENT), (proxy_ns, VETH_PROXY)):
        ex = NsProxy.exec_in(ns)
        _run([*ex, iptables, "-A", "INPUT", "-p", "udp", "-m", "statistic", "--mode", "random",
              "--probability", str(KERNEL_LOSS), "-j", "DROP"])
        _run([*ex, iptables, "-t", "mangle", "-A", "PREROUTING", "-p", "udp", "-m", "statistic",
              "--mode", "random", "--probability", str(KERNEL_DUPLICATE), "-j", "TEE", "--gateway", own])

    hits: dict[str, int] = {"DROP": 0, "TEE": 0}

    def flush() -> None:
        # Count what the kernel really dropped and cloned before the rules go: the impaired
        # round must have been impaired.
        for ns in (client_ns, proxy_ns):
            ex = NsProxy.exec_in(ns)
            for table in ("filter", "mangle"):
                listing = _run([*ex, iptables, "-t", table, "-L", "-v", "-x", "-n"]).stdout
                for line in listing.splitlines():
                    cols = line.split()
                    if len(cols) > 2 and cols[2] in hits:
                        hits[cols[2]] += int(cols[0])
                _run([*ex, iptables, "-t", table, "-F"])

    proxy = NsProxy(proxy_ns, workdir, "0.0.0.0")
    try:
        impaired, clean = assert_impaired_then_clean(proxy, flush, client_ns, VETH_PROXY)
        assert hits["DROP"] > 0 and hits["TEE"] > 0, hits
        print(f"kernel loss {KERNEL_LOSS:.0%} + duplication {KERNEL_DUPLICATE:.0%} per namespace: "
              f"{impaired['received']}/{ECHOES} echoed, packets dropped {hits['DROP']}, cloned "
              f"{hits['TEE']}; clean: {clean['received']}/20")
    finally:
        proxy.stop()
