"""Proxy chains: CONNECT-UDP forwarded over HTTP/3 to a next-hop proxy, Envoy 1.40 and Ferry
in each position, driven by an independent aioquic client at the edge.

    client --h3--> first hop (route without connect_config) --h3--> next hop (terminates)
                                                                       --udp--> target

Chains (first -> next): ferry -> envoy and envoy -> ferry with the bootstraps of
``bootstraps/`` (``forward-h3.yaml.in`` is the shared reference with ``sni: localhost``);
ferry -> ferry with the shipped ``examples/two-hop/*.yaml`` adapted to port 0; and
envoy -> envoy as the baseline of what Envoy does on its own.

Also: the next hop down (Ferry answers 5xx with ``proxy-status: ferry; error=connection_*``),
and Ferry's pass-through route (``ferry.connect_udp.pass_through: true``), which forwards a
request whose path follows another URI template unchanged, where Envoy (and Ferry without
the flag) refuse it with 404 themselves.

Every process gets its own log in the test's tmp dir; set INTEROP_LOG_LEVEL=debug to make
them verbose. Failure messages include the tail of every log.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO_ROOT, ProxyProcess, UdpTarget, async_wait_until, free_udp_port, plus_0x10, run_async, wait_until
from masque_client import MasqueClient, Tunnel

A = bytes.fromhex("a1a2a3a4a5a6a7")
B = bytes.fromhex("b1b2b3b4b5b6b7")
WAIT = 3.0  # bound for one expected event
SETUP_WAIT = 8.0  # the first request through a chain also opens the hop-to-hop QUIC connection
EXAMPLES = REPO_ROOT / "examples" / "two-hop"

# Ferry's CONNECT-UDP counters (Envoy has none) and the cluster counter both export.
REJECTED_404 = "http.ingress_http.connect_udp.tunnels_rejected_404"
TUNNELS_TOTAL = "http.ingress_http.connect_udp.tunnels_total"
NEXT_HOP_RQ = "cluster.next_hop.upstream_rq_total"


def connect(proxy: ProxyProcess, **kwargs):
    return MasqueClient.connect("127.0.0.1", proxy.listener_port, **kwargs)


# --------------------------------------------------------------------------- chains


@dataclass
class Chain:
    first: ProxyProcess
    next_hop: ProxyProcess

    @property
    def procs(self) -> list[ProxyProcess]:
        return [self.first, self.next_hop]

    def describe(self, tunnel: Tunnel | None = None) -> str:
        """Context for a failure message: the tunnel's state and every process's log tail."""
        parts = []
        if tunnel is not None:
            parts.append(f"tunnel: status={tunnel.status} headers={tunnel.headers} "
                         f"ended={tunnel.ended} ({tunnel.describe_end() if tunnel.ended else 'open'}) "
                         f"capsules={tunnel.capsules} datagrams={tunnel.http_datagrams}")
        for p in self.procs:
            parts.append(f"--- {p.name} ({p.exit_description()}), log tail:\n{p.log_tail(40)}")
        return "\n".join(parts)


def adapt_example(name: str, dest: Path, replacements: list[tuple[str, str]]) -> Path:
    """examples/two-hop/<name> with exact one-off replacements (each must match once, so a
    changed example fails here rather than silently testing something else)."""
    text = (EXAMPLES / name).read_text()
    for old, new in replacements:
        count = text.count(old)
        assert count == 1, f"examples/two-hop/{name}: expected one {old!r}, found {count}"
        text = text.replace(old, new)
    dest.write_text(text)
    return dest


def start_chain(spawn_proxy, workdir: Path, udp_target: UdpTarget, first_impl: str, next_impl: str,
                source: str, forward_template: str = "forward-h3.yaml.in") -> Chain:
    """Start the next hop (terminating to udp_target), then the first hop pointing at it."""
    if source == "examples":
        term = adapt_example("terminate.yaml", workdir / "two-hop-terminate.yaml", [
            ("port_value: 9902 }", "port_value: 0 }"),  # admin
            ("port_value: 4434 }", "port_value: 0 }"),  # listener
            ("address: localhost, port_value: 9000 }", f"address: localhost, port_value: {udp_target.port} }}"),
        ])
        next_hop = spawn_proxy(next_impl, f"{next_impl}-next", config=term)
        fwd = adapt_example("forward.yaml", workdir / "two-hop-forward.yaml", [
            ("port_value: 9901 }", "port_value: 0 }"),  # admin
            ("port_value: 4433 }", "port_value: 0 }"),  # listener
            ("port_value: 4434 }", f"port_value: {next_hop.listener_port} }}"),  # next hop
        ])
        first = spawn_proxy(first_impl, f"{first_impl}-first", config=fwd)
    else:
        next_hop = spawn_proxy(next_impl, f"{next_impl}-next", template="terminate-h3.yaml.in",
                               ECHO_PORT=udp_target.port)
        first = spawn_proxy(first_impl, f"{first_impl}-first", template=forward_template,
                            NEXT_HOP_PORT=next_hop.listener_port)
    return Chain(first, next_hop)


CHAINS = [
    pytest.param("ferry", "envoy", "templates", id="ferry-to-envoy"),
    pytest.param("envoy", "ferry", "templates", id="envoy-to-ferry"),
    pytest.param("ferry", "ferry", "examples", id="ferry-to-ferry-examples"),
    pytest.param("envoy", "envoy", "templates", id="envoy-to-envoy"),
]


# --------------------------------------------------------------------------- datagram mode


@pytest.mark.parametrize("first_impl,next_impl,source", CHAINS)
def test_chain_datagram_mode(spawn_proxy, workdir, udp_target, first_impl, next_impl, source):
    """a1..a7 as an HTTP/3 datagram at the edge reaches the target through both hops; the
    target's b1..b7 comes back as an HTTP/3 datagram. Then four tunnels on the same client
    connection, two rounds each: every tunnel gets only its own replies, and the terminating
    hop uses one UDP socket per tunnel. Expected for every chain."""
    chain = start_chain(spawn_proxy, workdir, udp_target, first_impl, next_impl, source)
    udp_target.reply = plus_0x10

    async def body():
        async with connect(chain.first, h3_datagram=True) as client:
            settings = await client.wait_peer_settings()
            assert settings.get(0x33) == 1, "first hop did not advertise SETTINGS_H3_DATAGRAM"
            first = await client.tunnel("foo.lyft.com", 80, timeout=SETUP_WAIT)
            assert first.status == 200, chain.describe(first)
            assert first.header("capsule-protocol") == "?1", chain.describe(first)
            first.send(A)
            assert await async_wait_until(lambda: udp_target.saw(A), WAIT), (
                f"target never saw a1..a7: {udp_target.payloads()}\n{chain.describe(first)}")
            reply = await first.recv_or_none(WAIT)
            assert reply == B, f"reply {reply!r}\n{chain.describe(first)}"
            assert first.http_datagrams == [b"\x00" + B], (
                f"reply should travel as an HTTP/3 datagram\n{chain.describe(first)}")

            tunnels = [first] + [client.open_tunnel("foo.lyft.com", 80) for _ in range(3)]
            for t in tunnels[1:]:
                assert await t.wait_status(WAIT) == 200, chain.describe(t)
            for round_ in range(2):
                for i, t in enumerate(tunnels):
                    t.send(A + bytes([i, round_]))
                for i, t in enumerate(tunnels):
                    got = await t.recv_or_none(WAIT)
                    assert got == plus_0x10(A + bytes([i, round_])), (
                        f"tunnel {i} round {round_}: got {got!r}\n{chain.describe(t)}")
            peers = {peer for _, peer in udp_target.received}
            assert len(peers) == len(tunnels), f"upstream sockets {peers}"
            assert not any(t.ended for t in tunnels)

    run_async(body())
    for p in chain.procs:
        assert p.alive(), chain.describe()


# --------------------------------------------------------------------------- capsule-only client


@pytest.mark.parametrize("first_impl,next_impl,source", CHAINS)
def test_chain_capsule_only_client(spawn_proxy, workdir, udp_target, first_impl, next_impl, source):
    """A client without SETTINGS_H3_DATAGRAM (DATAGRAM capsules on the stream) at the edge.

    ferry first: relays both ways. The next hop (Envoy included) sends its replies as HTTP/3
        datagrams on the hop-to-hop connection, and Ferry turns them into DATAGRAM capsules
        (`00 08 00 b1..b7`) for the client.
    envoy first (observed with Envoy 1.40.0, whatever the next hop): 200, a1..a7 reaches the
        target, but the reply arrives at Envoy as an HTTP/3 datagram it cannot send to this
        client: it logs `SendHttpH3Datagram failed: DATAGRAM_STATUS_UNSUPPORTED`, resets the
        client's stream with H3_GENERAL_PROTOCOL_ERROR (0x101) and returns nothing. Unlike
        the terminating case it does not crash, not even once the client has closed.
    """
    chain = start_chain(spawn_proxy, workdir, udp_target, first_impl, next_impl, source)
    udp_target.reply = plus_0x10

    async def body():
        async with connect(chain.first, h3_datagram=False) as client:
            tunnel = await client.tunnel("foo.lyft.com", 80, timeout=SETUP_WAIT)
            assert tunnel.status == 200, chain.describe(tunnel)
            tunnel.send(A)  # a DATAGRAM capsule on the stream
            assert await async_wait_until(lambda: udp_target.saw(A), WAIT), (
                f"target never saw a1..a7: {udp_target.payloads()}\n{chain.describe(tunnel)}")
            reply = await tunnel.recv_or_none(WAIT)
            if first_impl == "ferry":
                assert reply == B, f"ferry: no capsule reply {reply!r}\n{chain.describe(tunnel)}"
                assert bytes.fromhex("000800") + B in tunnel.body, chain.describe(tunnel)
                assert tunnel.http_datagrams == []
                tunnel.send(b"second")
                assert await tunnel.recv_or_none(WAIT) == plus_0x10(b"second"), chain.describe(tunnel)
                assert not tunnel.ended, chain.describe(tunnel)
            else:
                assert reply is None and tunnel.reset_code == 0x101, (
                    "Envoy 1.40 used to reset a capsule-only client's stream (0x101) when the "
                    f"reply came back; now reply={reply!r} - re-check\n{chain.describe(tunnel)}")
                assert tunnel.capsules == [] and tunnel.http_datagrams == []
        # The client has closed its connection (that is when a terminating Envoy crashes).
        if first_impl == "envoy":
            assert not await chain.first.wait_dead(WAIT), (
                f"the forwarding Envoy died after a capsule-only client\n{chain.describe()}")

    run_async(body())
    for p in chain.procs:
        assert p.alive(), chain.describe()


# --------------------------------------------------------------------------- next hop down


@pytest.mark.parametrize("impl", ["ferry", "envoy"])
def test_next_hop_down(spawn_proxy, impl):
    """The next hop's UDP port is closed; the cluster's connect_timeout is 1s.

    ferry: a 5xx within about connect_timeout, `proxy-status: ferry; error=connection_timeout`
        (or connection_refused if the ICMP port-unreachable is noticed); the client's
        connection stays usable and a second request gets the same answer.
    envoy (observed): 503 at once, no proxy-status: its QUIC client gets ECONNREFUSED from
        the ICMP port-unreachable (debug log: `upstream_reset_before_response_started{
        local_connection_failure|QUIC_PACKET_WRITE_ERROR ... Connection refused}`).
        The 503 says `content-length: 97`, but the body is not asserted: in our runs
        neither it nor a FIN reached the client within 3 s (Envoy resets the stream
        locally right after encoding it).
    """
    port = free_udp_port()
    fwd = spawn_proxy(impl, f"{impl}-forward", template="forward-h3-down.yaml.in", NEXT_HOP_PORT=port)

    async def body():
        async with connect(fwd) as client:
            for attempt in range(2):
                started = time.monotonic()
                tunnel = await client.tunnel("foo.lyft.com", 80, timeout=SETUP_WAIT)
                elapsed = time.monotonic() - started
                assert tunnel.status is not None and 500 <= tunnel.status <= 599, (
                    f"attempt {attempt}: {tunnel.status} {tunnel.headers}\n{fwd.log_tail()}")
                assert elapsed < 1.0 + WAIT, f"answered after {elapsed:.2f}s (connect_timeout 1s)"
                ps = tunnel.header("proxy-status")
                if impl == "ferry":
                    assert ps is not None and ps.lower().startswith("ferry"), tunnel.headers
                    assert re.search(r"error=(connection_timeout|connection_refused)\b", ps), ps
                else:
                    assert tunnel.status == 503 and ps is None, tunnel.headers
        assert fwd.alive()

    run_async(body())


# --------------------------------------------------------------------------- pass-through


def test_pass_through_default_template(spawn_proxy, udp_target):
    """Ferry (pass_through: true) -> Ferry (terminate): a default-template request is
    forwarded unchanged and works both ways."""
    next_hop = spawn_proxy("ferry", "ferry-next", template="terminate-h3.yaml.in", ECHO_PORT=udp_target.port)
    first = spawn_proxy("ferry", "ferry-first", template="forward-h3-pass-through.yaml.in",
                        NEXT_HOP_PORT=next_hop.listener_port)
    chain = Chain(first, next_hop)
    udp_target.reply = plus_0x10

    async def body():
        async with connect(first) as client:
            tunnel = await client.tunnel("foo.lyft.com", 80, timeout=SETUP_WAIT)
            assert tunnel.status == 200, chain.describe(tunnel)
            tunnel.send(A)
            assert await tunnel.recv_or_none(WAIT) == B, chain.describe(tunnel)
            assert udp_target.payloads() == [A]
        assert next_hop.counter(TUNNELS_TOTAL) == 1
        assert first.counter(NEXT_HOP_RQ) == 1

    run_async(body())


CUSTOM_PATH = "/masque?h=foo&p=80"


@pytest.mark.parametrize("first_impl,template", [
    pytest.param("ferry", "forward-h3-pass-through.yaml.in", id="ferry-pass-through"),
    pytest.param("envoy", "forward-h3-pass-through.yaml.in", id="envoy-same-bootstrap"),
    pytest.param("ferry", "forward-h3.yaml.in", id="ferry-without-pass-through"),
])
def test_custom_template_path(spawn_proxy, udp_target, first_impl, template):
    """A request whose path follows another URI template (`/masque?h=foo&p=80`) through a
    forwarder to a Ferry next hop that only knows the default template.

    ferry with pass_through: true: forwarded unchanged; the NEXT hop refuses it (404, its
        `tunnels_rejected_404` goes to 1) and the first hop relays that 404 to the client.
    envoy (the same bootstrap; it ignores Ferry's metadata) and ferry without the flag: the
        first hop's own path check refuses it with 404; nothing reaches the next hop.
    """
    next_hop = spawn_proxy("ferry", "ferry-next", template="terminate-h3.yaml.in", ECHO_PORT=udp_target.port)
    first = spawn_proxy(first_impl, f"{first_impl}-first", template=template,
                        NEXT_HOP_PORT=next_hop.listener_port)
    chain = Chain(first, next_hop)
    assert next_hop.counter(REJECTED_404) == 0

    async def body():
        async with connect(first) as client:
            tunnel = await client.tunnel(path=CUSTOM_PATH, timeout=SETUP_WAIT)
            assert tunnel.status == 404, chain.describe(tunnel)
            ps = tunnel.header("proxy-status")
            if first_impl == "ferry":
                assert ps is not None and ps.lower().startswith("ferry"), chain.describe(tunnel)
            else:
                assert ps is None, chain.describe(tunnel)
        if template == "forward-h3-pass-through.yaml.in" and first_impl == "ferry":
            wait_until(lambda: next_hop.counter(REJECTED_404) == 1, WAIT, "next hop's 404 counter")
            assert first.counter(NEXT_HOP_RQ) == 1, "the first hop should have forwarded the request"
        else:
            assert first.counter(NEXT_HOP_RQ) == 0, "the first hop forwarded a request it must refuse"
            assert next_hop.counter(REJECTED_404) == 0
            assert next_hop.counter(TUNNELS_TOTAL) == 0
        assert udp_target.payloads() == []

    run_async(body())
    for p in chain.procs:
        assert p.alive(), chain.describe()
