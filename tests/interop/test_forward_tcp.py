"""Bridging over TCP: CONNECT-UDP forwarded from HTTP/2 and HTTP/1.1 clients to a next-hop
proxy over HTTP/2 or HTTP/1.1 (TLS), with real Envoy 1.40 and Ferry in each position:

    client --h2|h1--> first hop (route without connect_config) --h2|h1--> next hop
                                                                   (terminates) --udp--> target

Bootstraps: ``forward-tcp.yaml.in`` for the first hop (its cluster's ``explicit_http_config``
is ``http2_protocol_options`` or ``http_protocol_options``; TLS with ``sni: localhost``) and
``terminate-tcp-h2-h1.yaml.in`` for the next hop. The client is the ``h2`` package
(HTTP/2 extended CONNECT) or a raw HTTP/1.1 Upgrade (``tcp_client``).

Where Envoy differs, the test writes out what it does:

* Envoy as an HTTP/1.1 **next hop** answers ``200`` (not ``101``) and streams a chunked body:
  Ferry as the first hop refuses that as no tunnel (``502``, ``proxy-status:
  ferry; error=http_protocol_error``) instead of passing a broken tunnel on.
* Envoy as the **first hop** with an HTTP/1.1 client answers ``200`` with a chunked body
  (see test_terminate_tcp.py); the capsules still travel, inside chunks.
"""

from __future__ import annotations

import pytest

from conftest import ProxyProcess, UdpTarget, plus_0x10
from test_terminate_tcp import WAIT, assert_tunnel_works, tunnel

UPSTREAMS = {
    "h2": ("http2_protocol_options: {}", '"h2"'),
    "h1": ("http_protocol_options: {}", '"http/1.1"'),
}

CHAINS = [
    pytest.param("ferry", "envoy", id="ferry-to-envoy"),
    pytest.param("envoy", "ferry", id="envoy-to-ferry"),
    pytest.param("ferry", "ferry", id="ferry-to-ferry"),
]


def start_chain(spawn_proxy, target: UdpTarget, first: str, next_: str, upstream: str
                ) -> tuple[ProxyProcess, ProxyProcess]:
    next_hop = spawn_proxy(next_, f"{next_}-next", template="terminate-tcp-h2-h1.yaml.in",
                           ECHO_PORT=target.port)
    options, alpn = UPSTREAMS[upstream]
    first_hop = spawn_proxy(first, f"{first}-first", template="forward-tcp.yaml.in",
                            NEXT_HOP_PORT=next_hop.listener_port, UPSTREAM_OPTIONS=options,
                            UPSTREAM_ALPN=alpn)
    return first_hop, next_hop


def stat(proxy: ProxyProcess, name: str) -> int:
    return int(proxy.stats().get(name, "0"))


@pytest.mark.parametrize("version", ["h2", "h1"])
@pytest.mark.parametrize("upstream", ["h2", "h1"])
@pytest.mark.parametrize("first,next_", CHAINS)
def test_chain(spawn_proxy, udp_target, first, next_, upstream, version):
    udp_target.reply = plus_0x10
    first_hop, next_hop = start_chain(spawn_proxy, udp_target, first, next_, upstream)
    with tunnel(first_hop, version) as t:
        if first == "ferry" and next_ == "envoy" and upstream == "h1":
            # Envoy's HTTP/1.1 termination answers 200: no tunnel, so Ferry says 502.
            assert t.status == 502, t.describe()
            ps = t.header("proxy-status") or ""
            assert "error=http_protocol_error" in ps, ps
            assert udp_target.payloads() == []
            return
        assert_tunnel_works("ferry", version, t, udp_target)
    if first == "ferry":
        assert stat(first_hop, "cluster.next_hop.upstream_rq_total") == 1
        assert stat(first_hop, "http.ingress_tcp.connect_udp.tunnels_total") == 1
    if next_ == "ferry":
        assert stat(next_hop, "http.ingress_tcp.connect_udp.tunnels_total") == 1


@pytest.mark.parametrize("version", ["h2", "h1"])
def test_ferry_h2_upstream_many_datagrams_in_order(spawn_proxy, udp_target, version):
    """Through Ferry -> Envoy (HTTP/2 hop): 200 datagrams of growing size, each echoed, in
    order (capsules on a stream are reliable and ordered on both hops)."""
    first_hop, _ = start_chain(spawn_proxy, udp_target, "ferry", "envoy", "h2")
    with tunnel(first_hop, version) as t:
        assert t.status == (101 if version == "h1" else 200), t.describe()
        for i in range(200):
            payload = bytes([i % 256]) * (1 + i * 5)
            t.send(payload)
            got = t.recv(WAIT)
            assert got == payload, f"#{i}: {t.describe()}"
