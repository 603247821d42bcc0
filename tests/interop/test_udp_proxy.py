"""Raw UDP in, CONNECT-UDP out: the udp_proxy listener (``tunneling_config``).

    UDP app --udp--> udp_proxy (Ferry: HTTP/3 upstream; Envoy: HTTP/2 upstream)
            --CONNECT-UDP--> terminator (Ferry or Envoy) --udp--> target

- Ferry's udp_proxy over HTTP/3 to an Envoy 1.40 terminator and to a Ferry terminator.
- Envoy's udp_proxy bootstrap over HTTP/2 (TLS) run by Envoy 1.40 and by Ferry, to Ferry
  and Envoy terminators on TCP listeners.
- Real protocols through the tunnel: DNS (dnspython's client, dnsmasq's server) and QUIC
  inside QUIC (an aioquic HTTP/3 client and server; the inner packets are 1,200 bytes).
- Differential: the session access log (Envoy's UDP operators) and plain UDP proxying (no
  tunneling_config), one bootstrap under Envoy 1.40 and under Ferry, fields compared.
- Differential: POST tunnels (`use_post`, `post_path`, `propagate_response_trailers`) under
  Envoy 1.40 and Ferry against one Python `h2` POST server: the request it saw and the
  session log's response headers and trailers compared.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from pathlib import Path

import dns.message
import dns.query
import dns.rdatatype
import pytest
from aioquic.asyncio import connect, serve
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent

from conftest import CERT, KEY, REPO_ROOT, FERRY_BIN, ProxyProcess, free_udp_port, free_udp_tcp_port, UdpTarget, render_bootstrap, run_async

WAIT = 10.0  # bound for one exchange through a tunnel (includes opening it)


def exchange(proxy: ProxyProcess, payload: bytes, timeout: float = WAIT) -> bytes:
    """Send payload to the udp_proxy listener from a fresh local socket; return the reply."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(payload, ("127.0.0.1", proxy.listener_port))
        data, _ = s.recvfrom(65535)
        return data


def udp_proxy_to(spawn_proxy, impl: str, terminator: ProxyProcess, target_port: int,
                 template: str = "udp-proxy-h3.yaml.in") -> ProxyProcess:
    return spawn_proxy(impl, f"{impl}-udp-proxy", template, NEXT_HOP_PORT=terminator.listener_port,
                       TARGET_HOST="localhost", TARGET_PORT=target_port)


# --------------------------------------------------------------------------- interop


@pytest.mark.parametrize("terminator_impl", ["envoy", "ferry"])
def test_ferry_udp_proxy_h3_to_terminator(spawn_proxy, terminator_impl):
    """Ferry's udp_proxy tunnels over HTTP/3 to an Envoy (or Ferry) terminator; two local
    peers get a session each, on one upstream connection."""
    target = UdpTarget()
    try:
        term = spawn_proxy(terminator_impl, f"{terminator_impl}-terminator", "terminate-h3.yaml.in",
                           ECHO_PORT=target.port)
        udp = udp_proxy_to(spawn_proxy, "ferry", term, target.port)
        for i in range(3):
            payload = bytes([0xa1, i]) * 4
            assert exchange(udp, payload) == payload, f"{udp.log_tail()}\n{term.log_tail()}"
        assert len(target.payloads()) == 3
        stats = udp.stats()
        assert stats["udp.udp_tunnel.downstream_sess_total"] == "3"
        assert stats["cluster.masque_proxy.udp.sess_tunnel_success"] == "3"
        assert stats["cluster.masque_proxy.upstream_cx_total"] == "1"
    finally:
        target.close()


@pytest.mark.parametrize("udp_impl,term_impl", [
    pytest.param("envoy", "ferry", id="envoy-udp-proxy-to-ferry"),
    pytest.param("ferry", "ferry", id="ferry-udp-proxy-to-ferry"),
    pytest.param("ferry", "envoy", id="ferry-udp-proxy-to-envoy"),
])
def test_udp_proxy_h2_to_terminator(spawn_proxy, udp_impl, term_impl):
    """Envoy's own udp_proxy tunneling bootstrap (HTTP/2 with TLS, capsules), run by Envoy
    1.40 or by Ferry, to a terminator (Ferry or Envoy) on a TCP listener. Three local peers
    get a session each, multiplexed on one HTTP/2 connection."""
    target = UdpTarget()
    try:
        term = spawn_proxy(term_impl, f"{term_impl}-terminator", "terminate-tcp-h2-h1.yaml.in",
                           ECHO_PORT=target.port)
        udp = udp_proxy_to(spawn_proxy, udp_impl, term, target.port, "udp-proxy-h2.yaml.in")
        for i in range(3):
            payload = bytes([0xb1, i]) * 5
            assert exchange(udp, payload) == payload, f"{udp.log_tail()}\n{term.log_tail()}"
        assert len(target.payloads()) == 3
        if term_impl == "ferry":
            assert term.counter("http.ingress_tcp.connect_udp.tunnels_total") == 3
            assert term.counter("http.ingress_tcp.downstream_cx_http2_total") == 1
        assert udp.counter("cluster.masque_proxy.udp.sess_tunnel_success") == 3
        assert udp.counter("cluster.masque_proxy.upstream_cx_total") == 1
    finally:
        target.close()


# --------------------------------------------------------------------------- real protocols


class Dnsmasq:
    """dnsmasq answering `tunnel.test` with 10.1.2.3 on a loopback port, nothing else."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
        assert Path(binary).exists(), "dnsmasq is required (scripts/test.sh installs dnsmasq-base)"
        self.log_path = workdir / "dnsmasq.log"
        # dnsmasq binds UDP and TCP on its port; a port found free can be taken by another
        # process before dnsmasq binds it, so a start that fails on that is retried.
        for attempt in range(5):
            self.port = free_udp_tcp_port()
            self.log = open(self.log_path, "wb")
            self.proc = subprocess.Popen(
                [binary, "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                 "--listen-address=127.0.0.1", "--bind-interfaces", f"--port={self.port}",
                 "--pid-file=", "--user=root", "--address=/tunnel.test/10.1.2.3", "--log-queries",
                 "--log-facility=-"],
                stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            if self._wait_ready():
                return
            self.log.close()
            assert "Address already in use" in self.log_path.read_text() and attempt < 4, \
                f"dnsmasq exited: {self.log_path.read_text()}"

    def _wait_ready(self) -> bool:
        """True once dnsmasq answers a query directly; False if it exited first."""
        deadline = time.monotonic() + WAIT
        while True:
            if self.proc.poll() is not None:
                return False
            try:
                dns.query.udp(dns.message.make_query("tunnel.test", "A"), "127.0.0.1", port=self.port,
                              timeout=0.2)
                return True
            except dns.exception.Timeout:
                assert time.monotonic() < deadline, "dnsmasq never answered"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=5)
        self.log.close()


def test_dns_through_the_tunnel(spawn_proxy, tmp_path):
    """A real DNS client (dnspython) asks a real DNS server (dnsmasq) through the tunnel."""
    server = Dnsmasq(tmp_path)
    try:
        term = spawn_proxy("ferry", "ferry-terminator", "terminate-h3.yaml.in", ECHO_PORT=server.port)
        udp = udp_proxy_to(spawn_proxy, "ferry", term, server.port)
        for name in ["tunnel.test", "www.tunnel.test"]:
            q = dns.message.make_query(name, "A")
            r = dns.query.udp(q, "127.0.0.1", port=udp.listener_port, timeout=WAIT)
            assert r.id == q.id
            answers = [rr.to_text() for rrset in r.answer for rr in rrset
                       if rrset.rdtype == dns.rdatatype.A]
            assert answers == ["10.1.2.3"], r.to_text()
        assert term.counter("http.ingress_http.connect_udp.tunnels_total") == 2
    finally:
        server.close()


class H3Server(QuicConnectionProtocol):
    """A minimal HTTP/3 server: answers every request with 200 and a fixed body."""

    BODY = b"hello from inside the tunnel"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)

    def quic_event_received(self, event: QuicEvent) -> None:
        for ev in self.h3.handle_event(event):
            if isinstance(ev, HeadersReceived) and ev.stream_ended:
                self.h3.send_headers(ev.stream_id, [(b":status", b"200"),
                                                    (b"content-length", str(len(self.BODY)).encode())])
                self.h3.send_data(ev.stream_id, self.BODY, end_stream=True)
        self.transmit()


class H3Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.responses: dict[int, asyncio.Future] = {}
        self.bodies: dict[int, bytes] = {}
        self.statuses: dict[int, bytes] = {}

    async def get(self, authority: str, path: str) -> tuple[bytes, bytes]:
        sid = self._quic.get_next_available_stream_id()
        self.responses[sid] = asyncio.get_running_loop().create_future()
        self.h3.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"https"),
                                   (b":authority", authority.encode()), (b":path", path.encode())],
                             end_stream=True)
        self.transmit()
        await asyncio.wait_for(self.responses[sid], WAIT * 2)
        return self.statuses[sid], self.bodies[sid]

    def quic_event_received(self, event: QuicEvent) -> None:
        for ev in self.h3.handle_event(event):
            if isinstance(ev, HeadersReceived):
                self.statuses[ev.stream_id] = dict(ev.headers).get(b":status", b"")
            elif isinstance(ev, DataReceived):
                self.bodies[ev.stream_id] = self.bodies.get(ev.stream_id, b"") + ev.data
            if getattr(ev, "stream_ended", False) and ev.stream_id in self.responses:
                fut = self.responses[ev.stream_id]
                if not fut.done():
                    fut.set_result(None)


def test_http3_inside_the_tunnel(spawn_proxy):
    """QUIC inside QUIC: an aioquic HTTP/3 client talks to an aioquic HTTP/3 server whose
    UDP goes through the udp_proxy and the CONNECT-UDP tunnel. aioquic's packets are 1,200
    bytes (its Initial packets are padded to that), so this also proves that a 1,200-byte
    inner QUIC packet crosses."""
    inner_port = free_udp_port()

    async def scenario() -> None:
        server_cfg = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
        server_cfg.load_cert_chain(CERT, KEY)
        server = await serve("127.0.0.1", inner_port, configuration=server_cfg,
                             create_protocol=H3Server)
        try:
            term = spawn_proxy("ferry", "ferry-terminator", "terminate-h3.yaml.in", ECHO_PORT=inner_port)
            udp = udp_proxy_to(spawn_proxy, "ferry", term, inner_port)
            client_cfg = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN,
                                           server_name="localhost")
            client_cfg.load_verify_locations(str(CERT))
            async with connect("127.0.0.1", udp.listener_port, configuration=client_cfg,
                               create_protocol=H3Client, wait_connected=True) as client:
                for path in ["/one", "/two"]:
                    status, body = await client.get("localhost", path)
                    assert (status, body) == (b"200", H3Server.BODY)
            stats = udp.stats()
            # The inner Initial packets (1,200 bytes) left as capsules or datagrams, none lost here.
            assert stats["cluster.masque_proxy.udp.sess_tx_errors"] == "0"
            assert int(stats["cluster.masque_proxy.udp.sess_tx_datagrams"]) >= 2
            assert stats["udp.udp_tunnel.downstream_sess_total"] == "1"
        finally:
            server.close()

    run_async(scenario(), timeout=60)


# --------------------------------------------------------------------------- session access log


SESSION_LOG_FIELDS = {
    "type": "%ACCESS_LOG_TYPE%",
    "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
    "flags": "%RESPONSE_FLAGS%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "cluster_name": "%DYNAMIC_METADATA(udp.proxy.session:cluster_name)%",
    "datagrams_received": "%DYNAMIC_METADATA(udp.proxy.session:datagrams_received)%",
    "datagrams_sent": "%DYNAMIC_METADATA(udp.proxy.session:datagrams_sent)%",
    "errors_sent": "%DYNAMIC_METADATA(udp.proxy.session:errors_sent)%",
    "downstream_remote": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "upstream_host": "%UPSTREAM_HOST%",
    "headers": "%FILTER_STATE(envoy.udp_proxy.propagate_response_headers:TYPED)%",
    "duration": "%DURATION%",
}


def with_session_log(config: Path, log: Path) -> Path:
    """Add a JSON session access log, access_log_options and propagate_response_headers to a
    rendered udp-proxy-h2 bootstrap; a 1 s idle_timeout ends the session."""
    import json
    fields = "\n".join(f"                {k}: {json.dumps(v)}" for k, v in SESSION_LOG_FIELDS.items())
    block = (
        "        idle_timeout: 1s\n"
        "        access_log:\n"
        "        - name: envoy.access_loggers.file\n"
        "          typed_config:\n"
        "            \"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog\n"
        f"            path: {log}\n"
        "            log_format:\n"
        "              json_format:\n"
        f"{fields}\n"
        "        access_log_options:\n"
        "          flush_access_log_on_tunnel_connected: true\n"
    )
    text = config.read_text()
    anchor = "        stat_prefix: udp_tunnel\n"
    assert anchor in text
    text = text.replace(anchor, anchor + block, 1)
    anchor = "          buffer_options: {}\n"
    assert anchor in text
    text = text.replace(anchor, anchor + "          propagate_response_headers: true\n", 1)
    out = config.with_name(config.stem + "-logged.yaml")
    out.write_text(text)
    return out


def session_log_lines(log: Path, count: int) -> list[dict]:
    import json
    deadline = time.monotonic() + WAIT
    while True:
        lines = log.read_text().splitlines() if log.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return [json.loads(line) for line in lines]
        time.sleep(0.05)


def test_session_access_log_matches_envoy(spawn_proxy, workdir):
    """Differential: the same udp_proxy bootstrap (HTTP/2 tunnels to a Ferry terminator,
    a JSON session access log with Envoy's UDP operators) under Envoy 1.40 and under Ferry;
    the deterministic fields of both lines (tunnel connected, session end) must agree."""
    target = UdpTarget()
    try:
        term = spawn_proxy("ferry", "ferry-terminator", "terminate-tcp-h2-h1.yaml.in",
                           ECHO_PORT=target.port)
        records = {}
        for impl in ["envoy", "ferry"]:
            rendered = render_bootstrap("udp-proxy-h2.yaml.in", workdir / f"{impl}-udp-log.yaml",
                                        NEXT_HOP_PORT=term.listener_port, TARGET_HOST="localhost",
                                        TARGET_PORT=target.port)
            log = workdir / f"{impl}-sessions.log"
            udp = spawn_proxy(impl, f"{impl}-udp-proxy", config=with_session_log(rendered, log))
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(WAIT)
                s.bind(("127.0.0.1", 0))
                for payload in [b"first!", b"second"]:
                    s.sendto(payload, ("127.0.0.1", udp.listener_port))
                    assert s.recvfrom(65535)[0] == payload, udp.log_tail()
                peer = "%s:%d" % s.getsockname()
            lines = session_log_lines(log, 2)
            assert [l["type"] for l in lines] == ["UdpTunnelUpstreamConnected", "UdpSessionEnd"], \
                f"{impl}: {lines}\n{udp.log_tail()}"
            records[impl] = lines
            end = lines[1]
            assert end["downstream_remote"] == peer
            assert end["upstream_host"] == f"127.0.0.1:{term.listener_port}", f"{impl}: {end}"
            # The proxy's response headers (propagate_response_headers): Envoy shows its
            # internal HTTP/1 form of the HTTP/2 200 (101, upgrade, connection), Ferry the
            # response as received.
            status = "101" if impl == "envoy" else "200"
            headers = end["headers"]["headers"]
            assert headers[0] == {"key": ":status", "value": status}, f"{impl}: {end}"
            assert {"key": "capsule-protocol", "value": "?1"} in headers, f"{impl}: {end}"
        print(records)
        for i in range(2):
            envoy, ferry = records["envoy"][i], records["ferry"][i]
            for key in ["type", "attempts", "flags", "bytes_received", "bytes_sent", "cluster_name",
                        "datagrams_received", "datagrams_sent", "errors_sent"]:
                assert envoy[key] == ferry[key], f"line {i} {key}: envoy {envoy} ferry {ferry}"
        # The HTTP/2 tunnel is up as soon as the next hop's SETTINGS allow extended
        # CONNECT, not when a timeout runs out: Ferry once waited the cluster's whole 2 s
        # connect_timeout here (hyper reads SETTINGS in its own task and wakes nobody).
        connected = records["ferry"][0]["duration"]
        assert connected < 1000, f"tunnel connected after {connected} ms (connect_timeout 2 s)"
        end = records["ferry"][1]
        assert (end["bytes_received"], end["bytes_sent"]) == (12, 12)
        assert (end["datagrams_received"], end["datagrams_sent"]) == (2, 2)
    finally:
        target.close()


PLAIN_UDP_PROXY = """\
admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: 0 }}
static_resources:
  listeners:
  - name: udp_in
    address:
      socket_address: {{ protocol: UDP, address: 127.0.0.1, port_value: 0 }}
    listener_filters:
    - name: envoy.filters.udp_listener.udp_proxy
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.UdpProxyConfig
        stat_prefix: plain
        idle_timeout: 1s
        matcher:
          on_no_match:
            action:
              name: route
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.Route
                cluster: service
        access_log:
        - name: envoy.access_loggers.file
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
            path: {log}
            log_format:
              json_format:
{fields}
  clusters:
  - name: service
    type: STATIC
    load_assignment:
      cluster_name: service
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {port} }}
"""


def test_plain_udp_proxy_matches_envoy(spawn_proxy, workdir):
    """Differential: a udp_proxy without tunneling_config (plain UDP to the cluster) under
    Envoy 1.40 and under Ferry: replies, stats and the session access log agree."""
    import json
    fields = "\n".join(f"                {k}: {json.dumps(v)}" for k, v in SESSION_LOG_FIELDS.items()
                       if k != "headers")
    target = UdpTarget()
    try:
        records = {}
        for impl in ["envoy", "ferry"]:
            log = workdir / f"{impl}-plain.log"
            config = workdir / f"{impl}-plain.yaml"
            config.write_text(PLAIN_UDP_PROXY.format(log=log, fields=fields, port=target.port))
            udp = spawn_proxy(impl, f"{impl}-plain", config=config)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(WAIT)
                s.bind(("127.0.0.1", 0))
                # Both at once: the first datagram opens the session, neither is lost.
                s.sendto(b"one", ("127.0.0.1", udp.listener_port))
                s.sendto(b"two!", ("127.0.0.1", udp.listener_port))
                got = sorted([s.recvfrom(65535)[0], s.recvfrom(65535)[0]])
                assert got == [b"one", b"two!"], udp.log_tail()
            lines = session_log_lines(log, 1)
            assert len(lines) == 1, f"{impl}: {lines}"
            records[impl] = lines[0]
            assert udp.counter("udp.plain.downstream_sess_total") == 1
            assert udp.counter("cluster.service.udp.sess_tx_datagrams") == 2
            assert udp.counter("cluster.service.udp.sess_rx_datagrams") == 2
        print(records)
        envoy, ferry = records["envoy"], records["ferry"]
        for key in ["type", "flags", "attempts", "bytes_received", "bytes_sent", "cluster_name",
                    "datagrams_received", "datagrams_sent", "errors_sent", "upstream_host"]:
            assert envoy[key] == ferry[key], f"{key}: envoy {envoy} ferry {ferry}"
        assert ferry["upstream_host"] == f"127.0.0.1:{target.port}"
    finally:
        target.close()


# --------------------------------------------------------------------------- POST tunnels


class H2PostTunnelServer:
    """A cleartext HTTP/2 server (Python `h2`) for `use_post` tunnels: records each request's
    headers (pseudo-headers included), answers 200, echoes every DATAGRAM capsule of the
    request body in the response body, and after echoing the UDP payload `end` ends the
    response with trailers (`x-tunnel-end: bye`)."""

    END = b"end"
    TRAILERS = [("x-tunnel-end", "bye"), ("x-tunnel-count", "2")]

    def __init__(self) -> None:
        import threading
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.requests: list[list[tuple[str, str]]] = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _varint(buf: bytes, i: int) -> tuple[int, int] | None:
        if i >= len(buf):
            return None
        n = 1 << (buf[i] >> 6)
        if i + n > len(buf):
            return None
        v = buf[i] & 0x3F
        for b in buf[i + 1:i + n]:
            v = (v << 8) | b
        return v, i + n

    def _serve(self, conn: socket.socket) -> None:
        import h2.config
        import h2.connection
        import h2.events
        import h2.settings
        h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False,
                                                                  header_encoding="utf-8"))
        # Extended CONNECT allowed too (RFC 8441): the same server takes CONNECT-UDP tunnels.
        h2c.local_settings = h2.settings.Settings(
            client=False, initial_values={h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 1})
        h2c.initiate_connection()
        conn.sendall(h2c.data_to_send())
        pending: dict[int, bytes] = {}
        ended: set[int] = set()
        try:
            while True:
                data = conn.recv(65535)
                if not data:
                    return
                for ev in h2c.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        with self.lock:
                            self.requests.append([(k, v) for k, v in ev.headers])
                        pending[ev.stream_id] = b""
                        h2c.send_headers(ev.stream_id, [(":status", "200"), ("x-post-server", "yes")])
                    elif isinstance(ev, h2.events.DataReceived):
                        h2c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                        if ev.stream_id in ended:
                            continue
                        buf = pending.get(ev.stream_id, b"") + ev.data
                        while True:  # one whole capsule at a time
                            t = self._varint(buf, 0)
                            ln = t and self._varint(buf, t[1])
                            if not ln or ln[1] + ln[0] > len(buf):
                                break
                            capsule, payload = buf[:ln[1] + ln[0]], buf[ln[1]:ln[1] + ln[0]]
                            buf = buf[len(capsule):]
                            h2c.send_data(ev.stream_id, capsule)
                            if t[0] == 0 and payload[1:] == self.END:
                                h2c.send_headers(ev.stream_id, self.TRAILERS, end_stream=True)
                                ended.add(ev.stream_id)
                                break
                        pending[ev.stream_id] = buf
                conn.sendall(h2c.data_to_send())
        except Exception:  # the peer reset or closed: this connection is done
            return
        finally:
            conn.close()

    def seen(self) -> list[dict[str, str]]:
        with self.lock:
            return [dict(r) for r in self.requests]

    def close(self) -> None:
        self.closed = True
        self.sock.close()


POST_UDP_PROXY = """\
admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: 0 }}
static_resources:
  listeners:
  - name: udp_in
    address:
      socket_address: {{ protocol: UDP, address: 127.0.0.1, port_value: 0 }}
    listener_filters:
    - name: envoy.filters.udp_listener.udp_proxy
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.UdpProxyConfig
        stat_prefix: post
        idle_timeout: 5s
        matcher:
          on_no_match:
            action:
              name: route
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.Route
                cluster: post_proxy
        session_filters:
        - name: envoy.filters.udp.session.http_capsule
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.session.http_capsule.v3.FilterConfig
        tunneling_config:
          proxy_host: tunnel.example
          proxy_port: 8443
          target_host: localhost
          default_target_port: 9000
          use_post: true
          post_path: /tunnel
          headers_to_add:
          - header: {{ key: x-tunnel-from, value: udp-proxy }}
          buffer_options: {{}}
          propagate_response_headers: true
          propagate_response_trailers: true
        access_log:
        - name: envoy.access_loggers.file
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
            path: {log}
            log_format:
              json_format:
{fields}
  clusters:
  - name: post_proxy
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: post_proxy
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {port} }}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
"""


@pytest.mark.parametrize("mode", ["post", "connect"])
def test_post_and_connect_tunnel_trailers_match_envoy(spawn_proxy, workdir, mode):
    """Differential: a udp_proxy with `propagate_response_trailers: true`, with `use_post:
    true` and `post_path: /tunnel` (post) or without (connect: an extended CONNECT-UDP), under
    Envoy 1.40 and under Ferry, against the same HTTP/2 server: the request it sees (method,
    path, authority, scheme, headers; for POST no `:protocol` and no `capsule-protocol`), the
    echo, and the response headers and trailers in the session access log's FILTER_STATE
    fields must agree."""
    import json
    log_fields = dict(SESSION_LOG_FIELDS)
    log_fields["trailers"] = "%FILTER_STATE(envoy.udp_proxy.propagate_response_trailers:TYPED)%"
    fields = "\n".join(f"                {k}: {json.dumps(v)}" for k, v in log_fields.items())
    records, requests = {}, {}
    for impl in ["envoy", "ferry"]:
        server = H2PostTunnelServer()
        try:
            log = workdir / f"{impl}-{mode}.log"
            config = workdir / f"{impl}-{mode}.yaml"
            text = POST_UDP_PROXY.format(log=log, fields=fields, port=server.port)
            if mode == "connect":
                text = text.replace("          use_post: true\n          post_path: /tunnel\n", "")
            config.write_text(text)
            udp = spawn_proxy(impl, f"{impl}-{mode}", config=config)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(WAIT)
                s.bind(("127.0.0.1", 0))
                for payload in [b"first!", H2PostTunnelServer.END]:
                    s.sendto(payload, ("127.0.0.1", udp.listener_port))
                    assert s.recvfrom(65535)[0] == payload, udp.log_tail()
            # The trailers end the tunnel, and with it the session.
            lines = session_log_lines(log, 1)
            assert len(lines) == 1, f"{impl}: {lines}\n{udp.log_tail()}"
            records[impl] = lines[0]
            requests[impl] = server.seen()
            assert len(requests[impl]) == 1, f"{impl}: {requests[impl]}"
        finally:
            server.close()
    print(json.dumps({"records": records, "requests": requests}, indent=1))
    for impl, seen in requests.items():
        req = seen[0]
        if mode == "post":
            assert req[":method"] == "POST", f"{impl}: {req}"
            assert req[":path"] == "/tunnel", f"{impl}: {req}"
            assert ":protocol" not in req, f"{impl}: {req}"
            assert "capsule-protocol" not in req, f"{impl}: {req}"
        else:
            assert req[":method"] == "CONNECT", f"{impl}: {req}"
            assert req[":protocol"] == "connect-udp", f"{impl}: {req}"
            assert req[":path"] == "/.well-known/masque/udp/localhost/9000/", f"{impl}: {req}"
        assert req[":authority"] == "tunnel.example:8443", f"{impl}: {req}"
        assert req[":scheme"] == "http", f"{impl}: {req}"
        assert req["x-tunnel-from"] == "udp-proxy", f"{impl}: {req}"
        end = records[impl]
        assert end["type"] == "UdpSessionEnd", f"{impl}: {end}"
        assert end["trailers"] == {"headers": [{"key": k, "value": v}
                                               for k, v in H2PostTunnelServer.TRAILERS]}, \
            f"{impl}: {end}"
        headers = end["headers"]["headers"]
        # Over CONNECT Envoy shows its internal HTTP/1 form of the HTTP/2 200 (101, upgrade,
        # connection), Ferry the status the next hop sent (a documented difference).
        status = "101" if impl == "envoy" and mode == "connect" else "200"
        assert headers[0] == {"key": ":status", "value": status}, f"{impl}: {end}"
        assert {"key": "x-post-server", "value": "yes"} in headers, f"{impl}: {end}"
    envoy, ferry = records["envoy"], records["ferry"]
    # The very same request (pseudo-headers and headers; the order aside).
    assert requests["envoy"] == requests["ferry"], requests
    for key in ["type", "attempts", "flags", "bytes_received", "bytes_sent", "cluster_name",
                "datagrams_received", "datagrams_sent", "errors_sent", "trailers"]:
        assert envoy[key] == ferry[key], f"{key}: envoy {envoy} ferry {ferry}"
    if mode == "post":
        assert envoy["headers"] == ferry["headers"], f"envoy {envoy} ferry {ferry}"
    assert (ferry["datagrams_received"], ferry["datagrams_sent"]) == (2, 2)
