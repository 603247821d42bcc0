"""Differential tests: CONNECT-UDP termination over HTTP/3, Envoy 1.40 vs Ferry.

Ported from Envoy's ConnectUdpTerminationIntegrationTest (HTTP/3 downstream), plus the
hostile cases Ferry must survive. Every test runs once per implementation (``impl``).
Where the two differ on purpose, each side's expectation is written out explicitly:

* capsule-only clients (no SETTINGS_H3_DATAGRAM): Ferry relays with DATAGRAM capsules on
  the stream; Envoy 1.40 resets the stream and segfaults when the target replies.
* header-only requests: Ferry answers 400 and keeps running; Envoy 1.40 dies.
* ports 0, 70000, "http": Envoy accepts them (200); Ferry rejects them (400/404 with
  Proxy-Status).
"""

from __future__ import annotations

import asyncio

import pytest

from conftest import ProxyProcess, UdpTarget, async_wait_until, plus_0x10, run_async
from masque_client import (
    CAPSULE_GREASE,
    VARINT_MAX,
    MasqueClient,
    Tunnel,
    TunnelClosed,
    datagram_capsule,
    encode_capsule,
    varint,
)

A = bytes.fromhex("a1a2a3a4a5a6a7")
B = bytes.fromhex("b1b2b3b4b5b6b7")
WAIT = 3.0  # bound for one expected event (a reply, a status, a datagram at the target)


def connect(proxy: ProxyProcess, **kwargs):
    return MasqueClient.connect("127.0.0.1", proxy.listener_port, **kwargs)


def assert_error(impl: str, tunnel: Tunnel, *allowed: int) -> None:
    """The response is one of the allowed error statuses; Ferry's carry Proxy-Status."""
    assert tunnel.status in allowed, (
        f"{impl}: expected status in {allowed}, got {tunnel.status} {tunnel.headers}")
    if impl == "ferry":
        ps = tunnel.header("proxy-status")
        assert ps is not None, f"ferry error response without proxy-status: {tunnel.headers}"
        assert ps.lower().startswith("ferry"), f"proxy-status should name ferry first: {ps!r}"


async def roundtrip(tunnel: Tunnel, target: UdpTarget, payload: bytes = A) -> bytes:
    """Send payload; check the target saw it; return what came back (Envoy's a->b rule)."""
    target.reply = plus_0x10
    tunnel.send(payload)
    assert await async_wait_until(lambda: target.saw(payload), WAIT), (
        f"target never saw {payload.hex()}; it saw {[p.hex() for p in target.payloads()]}")
    return await tunnel.recv(WAIT)


# --------------------------------------------------------------------------- exchanges


def test_exchange_datagram_mode(impl, proxy, udp_target):
    """a1..a7 as an HTTP/3 datagram -> target gets a1..a7; b1..b7 comes back as a datagram."""

    async def body():
        async with connect(proxy, h3_datagram=True) as client:
            settings = await client.wait_peer_settings()
            assert settings.get(0x33) == 1, f"{impl} did not advertise SETTINGS_H3_DATAGRAM"
            assert settings.get(0x8) == 1, f"{impl} did not advertise ENABLE_CONNECT_PROTOCOL"
            tunnel = await client.tunnel("foo.lyft.com", 80)
            assert tunnel.status == 200, tunnel.headers
            assert tunnel.header("capsule-protocol") == "?1"
            assert await roundtrip(tunnel, udp_target) == B
            assert tunnel.http_datagrams == [b"\x00" + B], "reply should travel as an HTTP/3 datagram"
            assert udp_target.payloads() == [A]

    run_async(body())


def test_exchange_capsules_on_stream_in_datagram_mode(impl, proxy, udp_target):
    """Envoy's own test: `00 08 00 a1..a7` as DATA on the stream of a datagram-mode client."""

    async def body():
        async with connect(proxy, h3_datagram=True) as client:
            tunnel = await client.tunnel("foo.lyft.com", 80)
            assert tunnel.status == 200
            udp_target.reply = plus_0x10
            tunnel.send_raw(bytes.fromhex("000800") + A)
            assert await async_wait_until(lambda: udp_target.saw(A), WAIT)
            assert await tunnel.recv(WAIT) == B
            assert udp_target.payloads() == [A]

    run_async(body())


def test_exchange_capsule_only_client(impl, proxy, udp_target):
    """A client without SETTINGS_H3_DATAGRAM: DATAGRAM capsules on the stream, both ways.

    ferry: relays both ways; the reply is the capsule `00 08 00 b1..b7` on the stream.
    envoy: forwards a1..a7 to the target, then fails to send the reply as an HTTP/3
           datagram, resets the stream and dies with SIGSEGV (known Envoy 1.40 defect).
    """

    async def body():
        async with connect(proxy, h3_datagram=False) as client:
            tunnel = await client.tunnel("foo.lyft.com", 80)
            assert tunnel.status == 200, tunnel.headers
            udp_target.reply = plus_0x10
            tunnel.send(A)  # capsule mode -> DATAGRAM capsule on the stream
            assert await async_wait_until(lambda: udp_target.saw(A), WAIT), "target never saw a1..a7"
            reply = await tunnel.recv_or_none(WAIT)
            if impl == "ferry":
                assert reply == B, f"ferry: no capsule reply ({tunnel.describe_end()})"
                assert bytes.fromhex("000800") + B in tunnel.body
                assert tunnel.http_datagrams == []
                assert proxy.alive()
            else:
                proxy.allow_death = True
                envoy_died = await proxy.wait_dead(WAIT)
                assert reply is None and (envoy_died or tunnel.reset_code is not None), (
                    "Envoy 1.40 used to reset the stream and crash here; it now answered "
                    f"{reply!r} (died={envoy_died}) - re-check the documented defect")

    run_async(body())


def test_exchange_without_capsule_protocol_header(impl, proxy, udp_target):
    async def body():
        async with connect(proxy, h3_datagram=True) as client:
            tunnel = await client.tunnel("foo.lyft.com", 80, capsule_protocol=False)
            assert tunnel.status == 200, tunnel.headers
            assert await roundtrip(tunnel, udp_target) == B

    run_async(body())


def test_several_tunnels_on_one_connection(impl, proxy, udp_target):
    """Each tunnel gets its own echoes (guards against quarter-stream-id mix-ups)."""

    async def body():
        async with connect(proxy, h3_datagram=True) as client:
            tunnels = [client.open_tunnel("foo.lyft.com", 80) for _ in range(4)]
            for t in tunnels:
                assert await t.wait_status(WAIT) == 200
            for round_ in range(3):
                for i, t in enumerate(tunnels):
                    t.send(f"tunnel {i} round {round_}".encode())
                for i, t in enumerate(tunnels):
                    got = await t.recv(WAIT)
                    assert got == f"tunnel {i} round {round_}".encode(), (
                        f"tunnel {i} (stream {t.stream_id}) got {got!r}")
            # Distinct upstream sockets: one per tunnel.
            peers = {peer for _, peer in udp_target.received}
            assert len(peers) == len(tunnels), peers

    run_async(body())


@pytest.mark.parametrize("size", [1, 500, 1100])
def test_payload_sizes(impl, proxy, udp_target, size):
    async def body():
        async with connect(proxy, h3_datagram=True) as client:
            tunnel = await client.tunnel("foo.lyft.com", 80)
            payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
            tunnel.send(payload)
            assert await tunnel.recv(WAIT) == payload

    run_async(body())


# --------------------------------------------------------------------------- host matching


def test_vhost_domain_match(impl, start_proxy, udp_target):
    proxy = start_proxy("vhosts-h3.yaml.in")

    async def body():
        async with connect(proxy) as client:
            tunnel = await client.tunnel("foo.lyft.com", 80)
            assert tunnel.status == 200, tunnel.headers
            assert await roundtrip(tunnel, udp_target) == B

    run_async(body())


@pytest.mark.parametrize("host,port,expected", [
    ("bar.lyft.com", 80, 404),  # wrong host
    ("foo.lyft.com", 8080, 404),  # wrong port
    ("179.0.112.43", 80, 200),  # IPv4 literal
    ("2001:0db8:85a3::8a2e:0370:7334", 80, 200),  # IPv6 literal -> [..]:80
    ("noroute.example", 443, 404),  # vhost matches, its only route (prefix) does not
    ("noupgrade.example", 443, 403),  # route matches, CONNECT-UDP not enabled on it
], ids=["wrong-host", "wrong-port", "ipv4", "ipv6", "no-route", "upgrade-not-enabled"])
def test_vhost_routing(impl, start_proxy, udp_target, host, port, expected):
    proxy = start_proxy("vhosts-h3.yaml.in")

    async def body():
        async with connect(proxy) as client:
            tunnel = await client.tunnel(host, port)
            if expected == 200:
                assert tunnel.status == 200, tunnel.headers
                assert await roundtrip(tunnel, udp_target) == B
            else:
                assert_error(impl, tunnel, expected)
                assert udp_target.payloads() == []

    run_async(body())


def test_ipv6_zone_id_rejected(impl, start_proxy, udp_target):
    """`fe80::a%25ee1` -> 404 even though a vhost `[fe80::a%ee1]:80` exists."""
    proxy = start_proxy("vhosts-h3.yaml.in")

    async def body():
        async with connect(proxy) as client:
            tunnel = await client.tunnel(path="/.well-known/masque/udp/fe80::a%25ee1/80/")
            assert_error(impl, tunnel, 404)

    run_async(body())


# --------------------------------------------------------------------------- path checks


@pytest.mark.parametrize("path", [
    "/masque/udp/foo.lyft.com/80/",
    "/.well-known/masque/udp//80/",
    "/.well-known/masque/udp/foo.lyft.com//",
    "/.well-known/masque/udp/foo.lyft.com/80",
    "/.well-known/masque/udp/foo.lyft.com/80/extra/",
], ids=["not-well-known", "empty-host", "empty-port", "no-trailing-slash", "extra-segment"])
def test_bad_path_404(impl, proxy, udp_target, path):
    async def body():
        async with connect(proxy) as client:
            tunnel = await client.tunnel(path=path)
            assert_error(impl, tunnel, 404)

    run_async(body())


@pytest.mark.parametrize("port", ["70000", "0", "http"])
def test_bad_port(impl, proxy, udp_target, port):
    """Documented difference: Envoy 1.40 accepts these ports (200) and relays to the
    cluster host anyway; Ferry rejects them (400 or 404, with Proxy-Status)."""

    async def body():
        async with connect(proxy) as client:
            tunnel = await client.tunnel("foo.lyft.com", port)
            if impl == "envoy":
                assert tunnel.status == 200, (
                    f"Envoy 1.40 accepted port {port!r}; now {tunnel.status} - update the docs")
            else:
                assert_error(impl, tunnel, 400, 404)
                assert udp_target.payloads() == []

    run_async(body())


# --------------------------------------------------------------------------- dropped input


def test_unknown_capsules_and_context_ids_are_dropped(impl, proxy, udp_target):
    """Unknown capsule types and non-zero context ids never reach the target, and the
    tunnel keeps working (RFC 9297 s. 3.2: unknown capsules are skipped; RFC 9298 s. 4:
    unknown context ids are dropped)."""

    async def body():
        async with connect(proxy, h3_datagram=True) as client:
            tunnel = await client.tunnel("foo.lyft.com", 80)
            assert tunnel.status == 200
            # On the stream (ordered): a greased (reserved) capsule type, a DATAGRAM
            # capsule with context id 1, then a context-0 marker.
            tunnel.send_capsule(CAPSULE_GREASE, b"\x00grease")
            tunnel.send_capsule_datagram(b"ctx1-capsule", context_id=1)
            tunnel.send_capsule_datagram(b"marker-stream")
            # As HTTP/3 datagrams: context id 1, then a context-0 marker.
            tunnel.send_http_datagram(b"ctx1-datagram", context_id=1)
            tunnel.send_http_datagram(b"marker-datagram")
            assert await async_wait_until(
                lambda: udp_target.saw(b"marker-stream") and udp_target.saw(b"marker-datagram"), WAIT), (
                f"markers missing; target saw {udp_target.payloads()}; {tunnel.describe_end()}")
            # One more round trip so late stragglers would have arrived.
            tunnel.send(b"last")
            assert await async_wait_until(lambda: udp_target.saw(b"last"), WAIT)
            assert sorted(udp_target.payloads()) == sorted([b"marker-stream", b"marker-datagram", b"last"])
            assert not tunnel.ended

    run_async(body())


def test_capsule_type_0x01(impl, proxy, udp_target):
    """Envoy's DropUnknownCapsules fragment `01 08 00 a1..a7` on the stream.

    0x01 is ADDRESS_ASSIGN in CONNECT-IP (RFC 9484) but means nothing for CONNECT-UDP.
    ferry: drops it silently (unknown capsule type), the tunnel keeps working.
    envoy: its shared capsule parser reads it as a malformed ADDRESS_ASSIGN and resets
           the stream with H3_GENERAL_PROTOCOL_ERROR (0x101); nothing reaches the target.
    """

    async def body():
        async with connect(proxy, h3_datagram=True) as client:
            tunnel = await client.tunnel("foo.lyft.com", 80)
            assert tunnel.status == 200
            tunnel.send_raw(bytes.fromhex("010800") + A)
            tunnel.send_capsule_datagram(b"marker")
            if impl == "ferry":
                assert await async_wait_until(lambda: udp_target.saw(b"marker"), WAIT), tunnel.describe_end()
                assert udp_target.payloads() == [b"marker"]
                assert not tunnel.ended
            else:
                assert await tunnel.wait_closed(WAIT), "Envoy 1.40 used to reset this stream"
                assert tunnel.reset_code == 0x101, tunnel.describe_end()
                assert udp_target.payloads() == []
            assert proxy.alive()

    run_async(body())


# --------------------------------------------------------------------------- hostile input


def test_header_only_request(impl, proxy, udp_target):
    """END_STREAM on the HEADERS frame (RFC 9298 needs the stream for the tunnel).

    ferry: 400 with Proxy-Status, and keeps running after the connection closes.
    envoy: 400, then the process dies (SIGSEGV) once the client closes the connection
           (known Envoy 1.40 defect; asserted so we notice if Envoy changes).
    """

    async def body():
        async with connect(proxy) as client:
            tunnel = client.open_tunnel("foo.lyft.com", 80, end_stream=True)
            await tunnel.wait_status(WAIT)
            assert_error(impl, tunnel, 400)
        # The client has closed the connection here.
        if impl == "ferry":
            assert proxy.alive()
            async with connect(proxy) as client:
                tunnel = await client.tunnel("foo.lyft.com", 80)
                assert await roundtrip(tunnel, udp_target) == B
        else:
            proxy.allow_death = True
            assert await proxy.wait_dead(WAIT), "Envoy 1.40 used to crash after a header-only request"

    run_async(body())


def test_truncated_capsule_then_fin(impl, proxy, udp_target):
    """A capsule cut short by FIN is a malformed message (RFC 9297 s. 3.3): the stream is
    reset, nothing reaches the target, the proxy survives and the connection still works.
    (Envoy resets with H3_GENERAL_PROTOCOL_ERROR 0x101; RFC 9114 s. 4.1.2 suggests
    H3_MESSAGE_ERROR 0x10e; the code is not asserted.)"""

    async def body():
        async with connect(proxy, h3_datagram=True) as client:
            tunnel = await client.tunnel("foo.lyft.com", 80)
            assert tunnel.status == 200
            tunnel.send_raw(bytes.fromhex("000800a1a2"), end_stream=True)
            assert await tunnel.wait_closed(WAIT), f"{impl}: stream still open after truncated capsule + FIN"
            assert tunnel.reset_code is not None, f"{impl}: expected a reset, got {tunnel.describe_end()}"
            assert udp_target.payloads() == []
            second = await client.tunnel("foo.lyft.com", 80)
            assert second.status == 200
            assert await roundtrip(second, udp_target) == B
            assert proxy.alive()

    run_async(body())


def test_huge_declared_capsule_length(impl, proxy, udp_target):
    """A DATAGRAM capsule declaring 2^62-1 bytes: nothing reaches the target, the proxy
    survives and another tunnel on the same connection still works."""

    async def body():
        async with connect(proxy, h3_datagram=True) as client:
            tunnel = await client.tunnel("foo.lyft.com", 80)
            assert tunnel.status == 200
            tunnel.send_raw(varint(0) + varint(VARINT_MAX) + b"\x00" + b"x" * 1000)
            second = await client.tunnel("foo.lyft.com", 80)
            assert second.status == 200
            assert await roundtrip(second, udp_target) == B
            assert udp_target.payloads() == [A]
            assert proxy.alive()

    run_async(body())


def test_survives_all_hostile_cases(impl, proxy, udp_target):
    """Run every hostile case against one process, then check it still serves.

    ferry: alive at the end, and a fresh datagram-mode tunnel round-trips.
    envoy: dies on the first crash case (capsule-only client); recorded, not a failure.
    """

    async def hostile(step: str) -> None:
        if step == "capsule-only":
            async with connect(proxy, h3_datagram=False) as c:
                t = await c.tunnel("foo.lyft.com", 80)
                udp_target.reply = plus_0x10
                t.send(A)
                await t.recv_or_none(1.0)
        elif step == "header-only":
            async with connect(proxy) as c:
                t = c.open_tunnel("foo.lyft.com", 80, end_stream=True)
                await t.wait_closed(1.0)
        elif step == "truncated+fin":
            async with connect(proxy) as c:
                t = await c.tunnel("foo.lyft.com", 80)
                t.send_raw(bytes.fromhex("000800a1"), end_stream=True)
                await t.wait_closed(1.0)
        elif step == "huge-length":
            async with connect(proxy) as c:
                t = await c.tunnel("foo.lyft.com", 80)
                t.send_raw(varint(0) + varint(VARINT_MAX) + b"y" * 100)
                await t.wait_closed(0.2)
        elif step == "bad-context-varint":
            async with connect(proxy) as c:
                t = await c.tunnel("foo.lyft.com", 80)
                t.send_raw(encode_capsule(0, b"\xc0"))  # 8-byte varint cut to 1 byte
                t.send_http_datagram(b"", context_id=0)
                c.h3.send_datagram(t.stream_id, b"\xc0")  # malformed context id
                c.transmit()
                await t.wait_closed(0.2)
        elif step == "bad-ports":
            async with connect(proxy) as c:
                for port in ("70000", "0", "http", "-1", "99999999999999999999"):
                    t = c.open_tunnel("foo.lyft.com", port)
                    await t.wait_status(1.0)
                    if impl == "ferry":
                        assert_error(impl, t, 400, 404)
        elif step == "bad-paths":
            async with connect(proxy) as c:
                for path in ("/", "/.well-known/masque/udp/", "/.well-known/masque/udp/%zz/80/",
                             "/.well-known/masque/udp/fe80::a%25ee1/80/", "*",
                             "/.well-known/masque/udp/foo.lyft.com/80/?x=1"):
                    t = c.open_tunnel(path=path)
                    await t.wait_status(1.0)
                    if impl == "ferry":
                        assert_error(impl, t, 400, 404)
        elif step == "unknown-capsules":
            async with connect(proxy) as c:
                t = await c.tunnel("foo.lyft.com", 80)
                t.send_capsule(CAPSULE_GREASE, b"g" * 100)
                t.send_capsule_datagram(b"x", context_id=7)
                await t.recv_or_none(0.2)
        elif step == "abandon-connection":
            async with connect(proxy) as c:
                for _ in range(5):
                    c.open_tunnel("foo.lyft.com", 80)
        else:
            raise AssertionError(step)

    steps = ["capsule-only", "header-only", "truncated+fin", "huge-length", "bad-context-varint",
             "bad-ports", "bad-paths", "unknown-capsules", "abandon-connection"]

    async def body():
        died_at = None
        for step in steps:
            try:
                await hostile(step)
            except (asyncio.TimeoutError, TunnelClosed):
                pass
            if not proxy.alive() or (impl == "envoy" and await proxy.wait_dead(1.0)):
                died_at = step
                break
        if impl == "ferry":
            assert died_at is None, f"ferry died at {died_at}: {proxy.exit_description()}\n{proxy.log_tail()}"
            async with connect(proxy) as c:
                t = await c.tunnel("foo.lyft.com", 80)
                assert t.status == 200
                udp_target.reply = lambda d: d
                t.send(b"still here")
                assert await t.recv(WAIT) == b"still here"
            assert proxy.alive()
        else:
            proxy.allow_death = True
            assert died_at == "capsule-only", (
                f"Envoy 1.40 used to die on the capsule-only client; died_at={died_at}")

    run_async(body(), timeout=60)
