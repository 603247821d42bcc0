"""Hostile clients: oversized headers, floods of tunnel requests, stream-limit violations.

Each gets a bounded refusal (counted where Ferry sees it) and harms only its own stream or
connection: a bystander client on the same proxy keeps its service throughout.

Covered elsewhere (not repeated here): datagrams for streams that do not exist
(crates/ferry/tests/admin_stats.rs, ``datagrams_dropped_no_such_stream``), capsules that
never end or declare more than 65,535 bytes (crates/ferry/tests/terminate_h3.rs,
``oversized_capsule_is_refused_without_buffering``, ``truncated_capsule_resets_only_its_stream``),
slow readers on TCP (test_terminate_tcp.py). The configured limits (issue #5:
``max_concurrent_streams``, the overload manager's global connection limit,
``max_stream_duration``) are flooded past in the ``limits`` section, with Ferry's RSS
measured before and after; each is also reached in crates/ferry/tests/limits.rs.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from conftest import ProxyProcess, async_wait_until, run_async, skip_if_missing, wait_until
from masque_client import MasqueClient, Tunnel, masque_path
from tcp_client import H2Client, H2Stream

P = "http.ingress_http."
TUNNELS_ACTIVE = P + "connect_udp.tunnels_active"
HEADERS_TOO_LARGE = P + "downstream_rq_headers_too_large"
H3_LIMIT = 60 * 1024  # h3server::MAX_REQUEST_HEADERS_BYTES
QUIC_MAX_STREAMS = 100  # quic::transport_config max_concurrent_bidi_streams


@pytest.fixture
def ferry(start_proxy, request) -> ProxyProcess:
    skip_if_missing("ferry")
    return start_proxy()


# Ferry only: these tests exercise Ferry's limits (conftest's ``impl`` fixture is
# parametrized over envoy and ferry; pin it).
pytestmark = pytest.mark.parametrize("impl", ["ferry"], indirect=True)


def rss(proxy: ProxyProcess) -> int:
    """The proxy's resident set size in bytes (VmRSS)."""
    with open(f"/proc/{proxy.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def fd_count(proxy: ProxyProcess) -> int:
    return len(os.listdir(f"/proc/{proxy.proc.pid}/fd"))


async def echo(t: Tunnel, payload: bytes, timeout: float = 3.0) -> bool:
    t.send(payload)
    return await t.recv_or_none(timeout) == payload


# --------------------------------------------------------------------------- headers


def test_h3_headers_at_and_over_the_limit(ferry, udp_target):
    """A request whose header section is just under 60 KiB opens a tunnel; one over it gets
    431 (from h3, before Ferry sees the request) and is counted in
    downstream_rq_headers_too_large and downstream_rq_4xx; the same connection then opens a
    tunnel that echoes."""

    async def body():
        async with MasqueClient.connect("127.0.0.1", ferry.listener_port) as client:
            at = await client.tunnel("foo.lyft.com", 80, extra_headers=[("x-pad", "a" * (H3_LIMIT - 1024))])
            assert at.status == 200, at.describe_end()
            assert await echo(at, b"at the limit")
            over = await client.tunnel("foo.lyft.com", 80, extra_headers=[("x-pad", "a" * (H3_LIMIT + 1024))])
            assert over.status == 431, (over.status, over.describe_end())
            assert await async_wait_until(lambda: ferry.counter(HEADERS_TOO_LARGE) == 1, 3.0)
            after = await client.tunnel("foo.lyft.com", 80)
            assert after.status == 200 and await echo(after, b"after")
            assert client.terminated is None

    run_async(body())
    assert ferry.counter(P + "downstream_rq_4xx") >= 1
    assert ferry.alive()


HEADER_STREAMS = 8
HEADER_FRAME = 8 << 20  # each stream announces (and offers) an 8 MiB HEADERS frame
HEADER_RSS_LIMIT = 16 << 20  # all 8 buffered would be 64 MiB; the bound leaves a few MiB


def test_h3_oversized_header_frames_are_refused_before_buffering(ferry, udp_target):
    """Issue #9: HEADERS frames announcing 8 MiB on 8 request streams of one connection,
    the bytes offered as fast as QUIC flow control lets them through. Ferry refuses each
    as soon as the frame's length is read (431, STOP_SENDING), so it never buffers them:
    its peak RSS grows by less than 16 MiB, where buffering the 64 MiB offered (as h3
    alone did: 8 MiB header sections took RSS from 10 to 41 MiB) would not. Each refusal
    is counted; the connection then opens a tunnel that echoes."""

    async def body():
        async with MasqueClient.connect("127.0.0.1", ferry.listener_port) as client:
            await client.wait_peer_settings()
            quic = client.protocol._quic
            before = rss(ferry)
            peak = before
            done = False

            async def sample():
                nonlocal peak
                while not done:
                    peak = max(peak, rss(ferry))
                    await asyncio.sleep(0.005)

            sampler = asyncio.ensure_future(sample())
            streams = []
            for _ in range(HEADER_STREAMS):
                sid = quic.get_next_available_stream_id()
                t = Tunnel(client=client, stream_id=sid)
                client.tunnels[sid] = t
                # Frame type 0x01 (HEADERS), length 8 MiB as a 4-byte varint, payload.
                quic.send_stream_data(sid, b"\x01\x80\x80\x00\x00" + bytes(HEADER_FRAME))
                streams.append(t)
            client.transmit()
            answered = await async_wait_until(
                lambda: all(t.status is not None or t.ended for t in streams), 30.0)
            done = True
            await sampler
            print(f"oversized HEADERS: RSS {before >> 20} MiB -> peak {peak >> 20} MiB "
                  f"({(peak - before) / (1 << 20):+.1f} MiB) for {HEADER_STREAMS} x 8 MiB offered")
            assert peak - before < HEADER_RSS_LIMIT, (before, peak)
            assert answered, [t.describe_end() for t in streams]
            assert [t.status for t in streams] == [431] * HEADER_STREAMS
            assert await async_wait_until(
                lambda: ferry.counter(HEADERS_TOO_LARGE) == HEADER_STREAMS, 5.0), \
                ferry.counter(HEADERS_TOO_LARGE)
            after = await client.tunnel("foo.lyft.com", 80)
            assert after.status == 200 and await echo(after, b"after")
            assert client.terminated is None

    run_async(body(), timeout=120)
    assert ferry.alive()


def test_h2_headers_over_the_limit_refuse_only_that_stream(start_proxy, udp_target):
    """HTTP/2 (hyper, SETTINGS_MAX_HEADER_LIST_SIZE 16 KiB): a request over the limit gets 431
    or a stream reset (REFUSED_STREAM) from the HTTP/2 library, bounded by the limit; the
    connection goes on and opens a tunnel that echoes. (Not counted by Ferry: the library
    refuses it before Ferry sees a request.)"""
    proxy = start_proxy("terminate-tcp-h2-h1.yaml.in")
    with H2Client(proxy.listener_port) as client:
        sid = client.conn.get_next_available_stream_id()
        st = H2Stream(client, sid)
        client.streams[sid] = st
        client.conn.send_headers(sid, [
            (":method", "CONNECT"), (":protocol", "connect-udp"), (":scheme", "https"),
            (":authority", "proxy.test"), (":path", masque_path("foo.lyft.com", 80)),
            ("capsule-protocol", "?1"), ("x-pad", "a" * (32 * 1024)),
        ])
        client.flush()
        assert client.wait(lambda: st.status is not None or st.closed, 5.0), st.describe()
        assert st.status in (None, 431), st.describe()
        ok = client.tunnel(timeout=5.0)
        assert ok.status == 200, ok.describe()
        ok.send(b"still fine")
        assert ok.recv(3.0) == b"still fine"
        assert not client.terminated
    assert proxy.alive()


# --------------------------------------------------------------------------- floods


def test_flood_of_tunnel_requests_is_bounded_per_connection(ferry, udp_target):
    """Three connections each ask for 150 tunnels at once while a bystander echoes. QUIC
    bounds each connection at 100 concurrent request streams: Ferry holds exactly 300
    tunnels, the other 150 requests wait in the clients (blocked by MAX_STREAMS), and the
    bystander's echoes all come back. Ending 20 tunnels on a connection lets up to 20
    waiting requests through. When the flooders leave, tunnels and sockets are reclaimed."""
    baseline_fds = fd_count(ferry)

    async def body():
        async with MasqueClient.connect("127.0.0.1", ferry.listener_port) as bystander:
            b = await bystander.tunnel("foo.lyft.com", 80)
            assert b.status == 200
            flooders = []
            for _ in range(3):
                cm = MasqueClient.connect("127.0.0.1", ferry.listener_port, idle_timeout=30.0)
                flooders.append((cm, await cm.__aenter__()))
            try:
                floods = [[c.open_tunnel("foo.lyft.com", 80) for _ in range(150)] for _, c in flooders]
                n = 0
                for i, tunnels in enumerate(floods):
                    for t in tunnels[:QUIC_MAX_STREAMS]:
                        assert await t.wait_status(10.0) == 200
                    n += 1
                    assert await echo(b, b"bystander-%d" % i), "the bystander lost its service"
                assert await async_wait_until(lambda: ferry.counter(TUNNELS_ACTIVE) == 1 + 300, 5.0), \
                    ferry.counter(TUNNELS_ACTIVE)
                for (_, c), tunnels in zip(flooders, floods):
                    assert all(t.status is None for t in tunnels[QUIC_MAX_STREAMS:])
                    assert len(c.protocol._quic._streams_blocked_bidi) == 50
                # 20 tunnels end on the first connection: waiting requests get through, at
                # least 13 (quinn announces new stream credit once 1/8 of it is free), never
                # more than 20.
                first = floods[0]
                for t in first[:20]:
                    t.finish()
                waiting = first[QUIC_MAX_STREAMS:]
                assert await async_wait_until(lambda: sum(t.status == 200 for t in waiting) >= 13, 10.0), \
                    [t.status for t in waiting]
                assert all(t.status in (None, 200) for t in waiting)
                assert sum(t.status == 200 for t in waiting) <= 20
                assert ferry.counter(TUNNELS_ACTIVE) <= 1 + 300
                assert await echo(b, b"bystander-after")
            finally:
                for cm, _ in flooders:
                    await cm.__aexit__(None, None, None)
            assert await async_wait_until(lambda: ferry.counter(TUNNELS_ACTIVE) == 1, 10.0), \
                ferry.counter(TUNNELS_ACTIVE)
            assert await echo(b, b"bystander-end")

    run_async(body(), timeout=90)
    wait_until(lambda: ferry.counter(TUNNELS_ACTIVE) == 0, 10.0, "tunnels_active == 0")
    wait_until(lambda: fd_count(ferry) <= baseline_fds, 10.0, f"open fds back to {baseline_fds}")
    assert ferry.alive()


def test_stream_limit_violation_closes_only_that_connection(ferry, udp_target):
    """A client that ignores MAX_STREAMS and opens 150 request streams at once: QUIC closes
    that connection (STREAM_LIMIT_ERROR); its tunnels are reclaimed and the connection is
    counted as destroyed; a bystander's tunnel echoes before and after."""

    async def body():
        async with MasqueClient.connect("127.0.0.1", ferry.listener_port) as bystander:
            b = await bystander.tunnel("foo.lyft.com", 80)
            assert b.status == 200 and await echo(b, b"before")
            destroyed = ferry.counter(P + "downstream_cx_destroy")
            async with MasqueClient.connect("127.0.0.1", ferry.listener_port) as rogue:
                await rogue.wait_peer_settings()
                rogue.protocol._quic._remote_max_streams_bidi = 10_000  # ignore the peer's limit
                tunnels = [rogue.open_tunnel("foo.lyft.com", 80) for _ in range(150)]
                assert await async_wait_until(lambda: rogue.terminated is not None, 10.0), \
                    "the proxy did not close a connection that broke its stream limit"
                assert "0x4" in rogue.terminated, rogue.terminated  # STREAM_LIMIT_ERROR
                assert all(t.ended for t in tunnels)
            assert await async_wait_until(lambda: ferry.counter(TUNNELS_ACTIVE) == 1, 10.0), \
                ferry.counter(TUNNELS_ACTIVE)
            assert ferry.counter(P + "downstream_cx_destroy") >= destroyed + 1
            assert await echo(b, b"after")

    run_async(body(), timeout=60)
    assert ferry.alive()


# --------------------------------------------------------------------------- limits

OVERFLOW = "listener.127.0.0.1_0.downstream_global_cx_overflow"
RSS_GROWTH_LIMIT = 30 << 20  # generous: the point is "flat", not a figure


async def connection_refused(port: int) -> bool:
    """Try one HTTP/3 connection; True when the proxy refused it (never admitted)."""
    try:
        async with MasqueClient.connect("127.0.0.1", port, timeout=5.0) as c:
            return False if c.terminated is None else True
    except (ConnectionError, OSError):
        return True


def test_connection_flood_past_the_global_limit(start_proxy, udp_target):
    """max_active_downstream_connections: 10. Ten clients hold a tunnel each; 200 more
    connection attempts (20 at a time) are each refused at once and counted in
    downstream_global_cx_overflow; RSS stays flat; the holders keep their service; once
    they leave, a new client is admitted."""
    ferry = start_proxy("limits-h3.yaml.in", MAX_CONNECTIONS=10, MAX_STREAMS=100, MAX_DURATION="0s")
    port = ferry.listener_port

    async def body():
        holders = []
        try:
            for _ in range(10):
                cm = MasqueClient.connect("127.0.0.1", port, idle_timeout=30.0)
                c = await cm.__aenter__()
                t = await c.tunnel("foo.lyft.com", 80)
                assert t.status == 200 and await echo(t, b"holder")
                holders.append((cm, c, t))
            assert ferry.counter(OVERFLOW) == 0
            before = rss(ferry)
            refused = 0
            for _ in range(10):
                results = await asyncio.gather(*(connection_refused(port) for _ in range(20)))
                refused += sum(results)
            assert refused == 200, f"{200 - refused} connections admitted past the limit"
            assert await async_wait_until(lambda: ferry.counter(OVERFLOW) == 200, 5.0), ferry.counter(OVERFLOW)
            after = rss(ferry)
            print(f"connection flood: RSS {before >> 20} MiB -> {after >> 20} MiB "
                  f"({(after - before) / (1 << 20):+.1f} MiB) for 200 refused connections")
            assert after - before < RSS_GROWTH_LIMIT, (before, after)
            for i, (_, c, t) in enumerate(holders):
                assert c.terminated is None and await echo(t, b"still-%d" % i)
        finally:
            for cm, _, _ in holders:
                await cm.__aexit__(None, None, None)
        # The holders are gone: connections are admitted again (once Ferry has seen them close).
        async def admitted() -> bool:
            try:
                async with MasqueClient.connect("127.0.0.1", port, timeout=2.0) as c:
                    t = await c.tunnel("foo.lyft.com", 80)
                    return t.status == 200 and await echo(t, b"admitted")
            except (ConnectionError, OSError):
                return False
        deadline = asyncio.get_running_loop().time() + 15.0
        while not await admitted():
            assert asyncio.get_running_loop().time() < deadline, "no connection admitted after the holders left"
            await asyncio.sleep(0.1)

    run_async(body(), timeout=120)
    assert ferry.alive()


def test_stream_flood_past_max_concurrent_streams(start_proxy, udp_target):
    """quic_protocol_options.max_concurrent_streams: 5. Each of 4 clients asks for 200
    tunnels at once: exactly 5 per connection open (the rest wait in the clients, blocked
    by MAX_STREAMS), Ferry holds 20 tunnels, RSS stays flat, and every open tunnel echoes."""
    ferry = start_proxy("limits-h3.yaml.in", MAX_CONNECTIONS=100, MAX_STREAMS=5, MAX_DURATION="0s")
    port = ferry.listener_port

    async def body():
        clients = []
        try:
            for _ in range(4):
                cm = MasqueClient.connect("127.0.0.1", port, idle_timeout=30.0)
                clients.append((cm, await cm.__aenter__()))
            before = rss(ferry)
            floods = [[c.open_tunnel("foo.lyft.com", 80) for _ in range(200)] for _, c in clients]
            for tunnels in floods:
                for t in tunnels[:5]:
                    assert await t.wait_status(10.0) == 200
            assert await async_wait_until(lambda: ferry.counter(TUNNELS_ACTIVE) == 20, 5.0), \
                ferry.counter(TUNNELS_ACTIVE)
            for (_, c), tunnels in zip(clients, floods):
                assert all(t.status is None for t in tunnels[5:])
                assert len(c.protocol._quic._streams_blocked_bidi) == 195
                for t in tunnels[:5]:
                    assert await echo(t, b"open")
            assert ferry.counter(P + "downstream_rq_total") == 20
            after = rss(ferry)
            print(f"stream flood: RSS {before >> 20} MiB -> {after >> 20} MiB "
                  f"({(after - before) / (1 << 20):+.1f} MiB) for 800 requests, 20 admitted")
            assert after - before < RSS_GROWTH_LIMIT, (before, after)
        finally:
            for cm, _ in clients:
                await cm.__aexit__(None, None, None)
        assert await async_wait_until(lambda: ferry.counter(TUNNELS_ACTIVE) == 0, 10.0), \
            ferry.counter(TUNNELS_ACTIVE)

    run_async(body(), timeout=90)
    assert ferry.alive()


def test_max_stream_duration_ends_a_flood_of_busy_tunnels(start_proxy, udp_target):
    """max_stream_duration: 1s. 50 tunnels kept busy (so no idle timeout) are all ended by
    the duration limit and counted (downstream_rq_max_duration_reached); RSS stays flat."""
    ferry = start_proxy("limits-h3.yaml.in", MAX_CONNECTIONS=100, MAX_STREAMS=100, MAX_DURATION="1s")
    port = ferry.listener_port

    async def body():
        async with MasqueClient.connect("127.0.0.1", port, idle_timeout=30.0) as c:
            before = rss(ferry)
            tunnels = [c.open_tunnel("foo.lyft.com", 80) for _ in range(50)]
            for t in tunnels:
                assert await t.wait_status(10.0) == 200

            async def all_ended() -> bool:
                for t in tunnels:
                    if not t.ended:
                        t.send(b"busy")
                await asyncio.sleep(0.05)
                return all(t.ended for t in tunnels)

            deadline = asyncio.get_running_loop().time() + 15.0
            while not await all_ended():
                assert asyncio.get_running_loop().time() < deadline, \
                    sum(t.ended for t in tunnels)
            assert await async_wait_until(
                lambda: ferry.counter(P + "downstream_rq_max_duration_reached") == 50, 5.0), \
                ferry.counter(P + "downstream_rq_max_duration_reached")
            assert ferry.counter(P + "connect_udp.streams_reset_idle_timeout") == 0
            assert await async_wait_until(lambda: ferry.counter(TUNNELS_ACTIVE) == 0, 5.0)
            after = rss(ferry)
            print(f"max_stream_duration: RSS {before >> 20} MiB -> {after >> 20} MiB "
                  f"({(after - before) / (1 << 20):+.1f} MiB) for 50 tunnels ended")
            assert after - before < RSS_GROWTH_LIMIT, (before, after)
            assert c.terminated is None

    run_async(body(), timeout=60)
    assert ferry.alive()
