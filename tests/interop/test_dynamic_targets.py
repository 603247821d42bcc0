"""Differential tests: dynamic targets (dynamic forward proxy filter + cluster), Envoy 1.40
vs Ferry, on the same bootstrap.

Both resolve the target named in the path and relay to it, and both answer 503 to a name
that does not resolve (Ferry adds `proxy-status: ...; error=dns_error`). Where they differ
on purpose (RFC 9298 section 7): Envoy relays to loopback addresses and to the proxy's own
listener; Ferry refuses them with 403 `destination_ip_prohibited` unless its destination
policy filter (which Envoy skips) allows them.
"""

from __future__ import annotations

import pytest

from conftest import ProxyProcess, run_async
from masque_client import MasqueClient

WAIT = 3.0


@pytest.fixture
def dfp_proxy(start_proxy) -> ProxyProcess:
    return start_proxy("dynamic-targets-h3.yaml.in")


def connect(proxy: ProxyProcess):
    return MasqueClient.connect("127.0.0.1", proxy.listener_port, h3_datagram=True)


def test_target_by_hosts_file_name_is_relayed(impl, dfp_proxy, udp_target):
    """localhost (from /etc/hosts) -> 127.0.0.1:ECHO_PORT: both relay."""

    async def body():
        async with connect(dfp_proxy) as client:
            tunnel = await client.tunnel("localhost", udp_target.port)
            assert tunnel.status == 200, tunnel.headers
            tunnel.send(b"hello")
            assert await tunnel.recv(WAIT) == b"hello"
            assert udp_target.payloads() == [b"hello"]

    run_async(body())


def test_dns_failure_is_503(impl, dfp_proxy):
    async def body():
        async with connect(dfp_proxy) as client:
            tunnel = await client.tunnel("no-such-host.invalid", 9000)
            assert tunnel.status == 503, tunnel.headers
            ps = tunnel.header("proxy-status")
            if impl == "ferry":
                assert ps is not None and ps.startswith("ferry; error=dns_error"), ps
            else:
                assert ps is None

    run_async(body())


@pytest.mark.parametrize("where", ["loopback_other_port", "own_listener"])
def test_refused_destinations(impl, dfp_proxy, udp_target, where):
    """Envoy relays to any address; Ferry refuses what its policy does not allow."""
    port = udp_target.port + 1 if where == "loopback_other_port" else dfp_proxy.listener_port

    async def body():
        async with connect(dfp_proxy) as client:
            tunnel = await client.tunnel("127.0.0.1", port)
            if impl == "ferry":
                assert tunnel.status == 403, tunnel.headers
                ps = tunnel.header("proxy-status") or ""
                assert "error=destination_ip_prohibited" in ps, ps
            else:
                assert tunnel.status == 200, tunnel.headers

    run_async(body())
    if impl == "ferry":
        assert dfp_proxy.counter("http.ingress_http.connect_udp.tunnels_rejected_destination_ip_prohibited") == 1
