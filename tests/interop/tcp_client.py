"""CONNECT-UDP clients over TCP for the interop suite: HTTP/2 extended CONNECT (RFC 8441,
RFC 9298 section 3.4) with the ``h2`` package, and HTTP/1.1 Upgrade (RFC 9298 section 3.2)
on a raw socket. Both speak TLS (ALPN ``h2`` resp. ``http/1.1``), verifying the server
against ``examples/certs/cert.pem`` with server name ``localhost``.

Datagrams travel as DATAGRAM capsules on the stream (RFC 9297 section 3.5). Everything is
synchronous with bounded socket timeouts: every wait takes a deadline and returns False
(or raises) when it passes.
"""

from __future__ import annotations

import socket
import ssl
import time
from typing import Callable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from masque_client import (
    CAPSULE_DATAGRAM,
    DEFAULT_CAFILE,
    datagram_capsule,
    decode_capsules,
    masque_path,
    split_context_id,
)

CONNECT_TIMEOUT = 5.0


def tls_socket(port: int, alpn: str, host: str = "127.0.0.1", cafile: str = DEFAULT_CAFILE,
               timeout: float = CONNECT_TIMEOUT) -> ssl.SSLSocket:
    """A TLS connection to host:port offering only ``alpn``; fails if the server picks
    anything else."""
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.set_alpn_protocols([alpn])
    raw = socket.create_connection((host, port), timeout=timeout)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock = ctx.wrap_socket(raw, server_hostname="localhost")
    chosen = sock.selected_alpn_protocol()
    if chosen != alpn:
        sock.close()
        raise AssertionError(f"server selected ALPN {chosen!r}, wanted {alpn!r}")
    return sock


class CapsuleReader:
    """Incremental capsule parsing of a byte stream's received bytes."""

    def __init__(self) -> None:
        self.body = bytearray()  # every byte received on the stream
        self.capsules: list[tuple[int, bytes]] = []
        self._rest = b""

    def feed(self, data: bytes) -> None:
        self.body += data
        caps, self._rest = decode_capsules(self._rest + data)
        self.capsules.extend(caps)

    def datagrams(self) -> list[bytes]:
        """UDP payloads of the DATAGRAM capsules with context id 0, in order."""
        out = []
        for ctype, value in self.capsules:
            if ctype != CAPSULE_DATAGRAM:
                continue
            split = split_context_id(value)
            if split is not None and split[0] == 0:
                out.append(split[1])
        return out


# --------------------------------------------------------------------------- HTTP/2


class H2Stream(CapsuleReader):
    def __init__(self, client: "H2Client", stream_id: int) -> None:
        super().__init__()
        self.client = client
        self.stream_id = stream_id
        self.status: int | None = None
        self.headers: list[tuple[str, str]] = []
        self.ended = False  # END_STREAM from the server
        self.reset_code: int | None = None  # RST_STREAM from the server
        self._next = 0  # datagrams already returned by recv

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    @property
    def closed(self) -> bool:
        return self.ended or self.reset_code is not None or self.client.terminated

    def describe(self) -> str:
        return (f"stream {self.stream_id}: status={self.status} headers={self.headers} "
                f"ended={self.ended} reset={self.reset_code} conn_terminated={self.client.terminated} "
                f"body={bytes(self.body[:64]).hex()}")

    def send(self, payload: bytes, context_id: int = 0) -> None:
        """One UDP payload as a DATAGRAM capsule."""
        self.send_raw(datagram_capsule(payload, context_id))

    def send_raw(self, data: bytes, end_stream: bool = False) -> None:
        self.client.send_data(self.stream_id, data, end_stream)

    def wait_status(self, timeout: float) -> int | None:
        self.client.wait(lambda: self.status is not None or self.closed, timeout)
        return self.status

    def recv(self, timeout: float) -> bytes | None:
        """The next context-0 datagram not yet returned by recv (None on timeout/close)."""
        want = self._next
        self.client.wait(lambda: len(self.datagrams()) > want or self.closed, timeout)
        got = self.datagrams()
        if len(got) > want:
            self._next += 1
            return got[want]
        return None

    def wait_closed(self, timeout: float) -> bool:
        return self.client.wait(lambda: self.closed, timeout)


class H2Client:
    """An HTTP/2 client connection over TLS (ALPN h2), for extended CONNECT tunnels.

    ``auto_ack``: return flow-control credit (WINDOW_UPDATE) for every DATA frame read;
    the slow-reader test instead simply stops reading the socket.
    """

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = CONNECT_TIMEOUT) -> None:
        self.sock = tls_socket(port, "h2", host, timeout=timeout)
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        self.streams: dict[int, H2Stream] = {}
        self.peer_settings: dict[int, int] = {}
        self.settings_received = False
        self.terminated = False  # GOAWAY received or the connection closed
        self.goaway_error: int | None = None
        self.auto_ack = True
        self.flush()
        if not self.wait(lambda: self.settings_received, timeout):
            raise AssertionError("no SETTINGS from the server")

    # -- I/O

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.terminated:
            try:
                self.sock.sendall(data)
            except OSError:
                self.terminated = True

    def pump(self, timeout: float) -> None:
        """Read once (at most ``timeout`` seconds) and handle the events."""
        if self.terminated:
            time.sleep(min(timeout, 0.01))
            return
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except (socket.timeout, ssl.SSLWantReadError):
            return
        except OSError:
            self.terminated = True
            return
        if not data:
            self.terminated = True
            return
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.terminated = True
            return
        for ev in events:
            self._handle(ev)
        self.flush()

    def _handle(self, ev) -> None:
        if isinstance(ev, h2.events.RemoteSettingsChanged):
            self.settings_received = True
            for code, change in ev.changed_settings.items():
                self.peer_settings[int(code)] = change.new_value
            return
        if isinstance(ev, h2.events.ConnectionTerminated):
            self.terminated = True
            self.goaway_error = ev.error_code
            return
        sid = getattr(ev, "stream_id", None)
        st = self.streams.get(sid) if sid else None
        if st is None:
            return
        if isinstance(ev, h2.events.ResponseReceived):
            st.headers = [(k, v) for k, v in ev.headers]
            st.status = int(st.header(":status"))
        elif isinstance(ev, h2.events.InformationalResponseReceived):
            pass
        elif isinstance(ev, h2.events.DataReceived):
            st.feed(ev.data)
            if self.auto_ack and ev.flow_controlled_length:
                self.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
        elif isinstance(ev, h2.events.StreamEnded):
            st.ended = True
        elif isinstance(ev, h2.events.StreamReset):
            st.reset_code = int(ev.error_code)
        if getattr(ev, "stream_ended", None) is not None:
            st.ended = True
        if getattr(ev, "stream_reset", None) is not None:
            st.reset_code = int(ev.stream_reset.error_code)

    def wait(self, cond: Callable[[], bool], timeout: float) -> bool:
        """Pump until cond() holds (True) or timeout seconds pass (False)."""
        deadline = time.monotonic() + timeout
        while not cond():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.pump(min(left, 0.05))
        return True

    # -- requests

    def open_tunnel(self, host: str = "foo.lyft.com", port: int | str = 80, path: str | None = None,
                    capsule_protocol: bool = True, end_stream: bool = False,
                    authority: str = "proxy.test") -> H2Stream:
        """Send an extended CONNECT (``:protocol connect-udp``) request; do not wait."""
        sid = self.conn.get_next_available_stream_id()
        headers = [
            (":method", "CONNECT"),
            (":protocol", "connect-udp"),
            (":scheme", "https"),
            (":authority", authority),
            (":path", path if path is not None else masque_path(host, port)),
        ]
        if capsule_protocol:
            headers.append(("capsule-protocol", "?1"))
        st = H2Stream(self, sid)
        self.streams[sid] = st
        self.conn.send_headers(sid, headers, end_stream=end_stream)
        self.flush()
        return st

    def tunnel(self, *args, timeout: float = CONNECT_TIMEOUT, **kwargs) -> H2Stream:
        st = self.open_tunnel(*args, **kwargs)
        st.wait_status(timeout)
        return st

    def send_data(self, sid: int, data: bytes, end_stream: bool = False) -> None:
        self.conn.send_data(sid, data, end_stream=end_stream)
        self.flush()

    def close(self) -> None:
        try:
            if not self.terminated:
                self.conn.close_connection()
                self.flush()
        except Exception:
            pass
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "H2Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- HTTP/1.1


class H1Tunnel(CapsuleReader):
    """One HTTP/1.1 connection carrying one Upgrade: connect-udp request."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = CONNECT_TIMEOUT) -> None:
        super().__init__()
        self.sock = tls_socket(port, "http/1.1", host, timeout=timeout)
        self.status: int | None = None
        self.reason = ""
        self.headers: list[tuple[str, str]] = []
        self.response_body = b""  # bytes after the head of a non-101 response
        self.closed = False  # EOF or error from the server
        self._buf = b""
        self._next = 0

    # -- request

    @staticmethod
    def build_request(host: str = "foo.lyft.com", port: int | str = 80, path: str | None = None,
                      capsule_protocol: bool = True, host_headers: tuple[str, ...] = ("proxy.test",),
                      method: str = "GET") -> bytes:
        lines = [f"{method} {path if path is not None else masque_path(host, port)} HTTP/1.1"]
        lines += [f"Host: {h}" for h in host_headers]
        lines += ["Connection: Upgrade", "Upgrade: connect-udp"]
        if capsule_protocol:
            lines.append("Capsule-Protocol: ?1")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def request(self, timeout: float = CONNECT_TIMEOUT, **kwargs) -> int | None:
        """Send the request and read the response head; return the status (None if none)."""
        self.send_raw(self.build_request(**kwargs))
        return self.read_head(timeout)

    def read_head(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or self.closed:
                return None
            chunk = self._read(min(left, 0.05))
            if chunk:
                self._buf += chunk
        head, _, rest = self._buf.partition(b"\r\n\r\n")
        self._buf = b""
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        self.status = int(parts[1])
        self.reason = parts[2] if len(parts) > 2 else ""
        for line in lines[1:]:
            k, _, v = line.partition(":")
            self.headers.append((k.strip().lower(), v.strip()))
        if self.status == 101:
            self.feed(rest)
        else:
            self.response_body = rest
        return self.status

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    # -- tunnel

    def send(self, payload: bytes, context_id: int = 0) -> None:
        self.send_raw(datagram_capsule(payload, context_id))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read(self, timeout: float) -> bytes:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except (socket.timeout, ssl.SSLWantReadError):
            return b""
        except OSError:
            self.closed = True
            return b""
        if not data:
            self.closed = True
        return data

    def wait(self, cond: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not cond():
            left = deadline - time.monotonic()
            if left <= 0 or self.closed:
                return cond()
            data = self._read(min(left, 0.05))
            if data:
                if self.status == 101:
                    self.feed(data)
                else:
                    self.response_body += data
        return True

    def recv(self, timeout: float) -> bytes | None:
        """The next context-0 datagram (None on timeout or EOF)."""
        want = self._next
        self.wait(lambda: len(self.datagrams()) > want, timeout)
        got = self.datagrams()
        if len(got) > want:
            self._next += 1
            return got[want]
        return None

    def wait_closed(self, timeout: float) -> bool:
        return self.wait(lambda: self.closed, timeout)

    def describe(self) -> str:
        return (f"HTTP/1.1 {self.status} {self.reason} headers={self.headers} closed={self.closed} "
                f"body={bytes(self.body[:64]).hex()} response_body={self.response_body[:200]!r}")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "H1Tunnel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
