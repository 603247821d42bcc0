"""A small CONNECT-UDP (RFC 9298) client over HTTP/3, built on aioquic.

It is an independent peer for interop tests of Ferry and Envoy: it speaks only what the
RFCs say (plus deliberate misbehaviour on request), and it never waits without a timeout.

Two modes, chosen per connection:

* datagram mode (``h3_datagram=True``): the client advertises SETTINGS_H3_DATAGRAM = 1
  (RFC 9297 section 2.1.1) and the QUIC max_datagram_frame_size transport parameter, and
  sends UDP payloads as HTTP/3 datagrams (quarter stream id + context id 0 + payload).
* capsule-only mode (``h3_datagram=False``): no H3_DATAGRAM setting and no QUIC datagram
  support; UDP payloads travel as DATAGRAM capsules (type 0x00) in DATA frames on the
  request stream (RFC 9297 section 3.5), which is what an HTTP/3 peer must fall back to.

Received UDP payloads (context id 0) land in ``Tunnel.payloads`` whichever way they
arrived; every received capsule (any type) is also kept in ``Tunnel.capsules``.

Usage::

    async with MasqueClient.connect("127.0.0.1", port, h3_datagram=True) as client:
        tunnel = client.open_tunnel("foo.lyft.com", 80)
        status = await tunnel.wait_status()
        tunnel.send(b"hello")
        reply = await tunnel.recv()
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass, field
from typing import AsyncIterator, cast
from urllib.parse import quote

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.buffer import Buffer, BufferReadError, encode_uint_var
from aioquic.h3.connection import H3Connection
from aioquic.h3.events import DataReceived, DatagramReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, QuicEvent, StreamReset

# RFC 9297 section 5: SETTINGS_H3_DATAGRAM.
SETTING_H3_DATAGRAM = 0x33
# RFC 9297 section 5.4: the DATAGRAM capsule type.
CAPSULE_DATAGRAM = 0x00
# A reserved ("greased") capsule type, 0x29 * N + 0x17 with N = 1 (RFC 9297 section 5.4):
# never defined, so every receiver must treat it as unknown.
CAPSULE_GREASE = 0x40
# The largest value a QUIC varint can hold (RFC 9000 section 16).
VARINT_MAX = (1 << 62) - 1

DEFAULT_TIMEOUT = 5.0

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CAFILE = os.path.join(REPO_ROOT, "examples", "certs", "cert.pem")


class TunnelClosed(Exception):
    """The request stream was reset or the connection went away."""


# --------------------------------------------------------------------------- wire helpers


def varint(value: int) -> bytes:
    return encode_uint_var(value)


def encode_capsule(capsule_type: int, value: bytes) -> bytes:
    """Capsule { Type (i), Length (i), Value (..) } (RFC 9297 section 3.2)."""
    return varint(capsule_type) + varint(len(value)) + value


def datagram_capsule(payload: bytes, context_id: int = 0) -> bytes:
    """A DATAGRAM capsule carrying a UDP Proxying Payload (RFC 9298 section 5)."""
    return encode_capsule(CAPSULE_DATAGRAM, varint(context_id) + payload)


def decode_capsules(buf: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """Split ``buf`` into complete capsules; return them and the unconsumed rest."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(buf):
        b = Buffer(data=buf[pos:])
        try:
            ctype = b.pull_uint_var()
            length = b.pull_uint_var()
        except BufferReadError:
            break
        start = pos + b.tell()
        if start + length > len(buf):
            break
        out.append((ctype, buf[start : start + length]))
        pos = start + length
    return out, buf[pos:]


def split_context_id(value: bytes) -> tuple[int, bytes] | None:
    b = Buffer(data=value)
    try:
        ctx = b.pull_uint_var()
    except BufferReadError:
        return None
    return ctx, value[b.tell() :]


def masque_path(host: str, port: int | str) -> str:
    """The default URI template's path, with host and port percent-encoded (RFC 9298 s. 2)."""
    return f"/.well-known/masque/udp/{quote(str(host), safe='')}/{quote(str(port), safe='')}/"


# --------------------------------------------------------------------------- HTTP/3 glue


class MasqueH3Connection(H3Connection):
    """H3Connection that advertises SETTINGS_H3_DATAGRAM only when asked to."""

    def __init__(self, quic, advertise_h3_datagram: bool) -> None:
        # _get_local_settings runs inside H3Connection.__init__, so set this first.
        self._advertise_h3_datagram = advertise_h3_datagram
        super().__init__(quic, enable_webtransport=False)

    def _get_local_settings(self) -> dict[int, int]:
        settings = super()._get_local_settings()
        if self._advertise_h3_datagram:
            settings[SETTING_H3_DATAGRAM] = 1
        return settings


@dataclass
class Tunnel:
    """One CONNECT-UDP request stream."""

    client: "MasqueClient"
    stream_id: int
    status: int | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    payloads: asyncio.Queue = field(default_factory=asyncio.Queue)
    capsules: list[tuple[int, bytes]] = field(default_factory=list)
    http_datagrams: list[bytes] = field(default_factory=list)
    body: bytes = b""  # all response DATA, raw
    reset_code: int | None = None
    ended: bool = False  # FIN or reset seen on the response side
    _pending: bytes = b""
    _headers_event: asyncio.Event = field(default_factory=asyncio.Event)
    _closed_event: asyncio.Event = field(default_factory=asyncio.Event)

    # --- response side

    def header(self, name: str) -> str | None:
        key = name.lower().encode()
        for k, v in self.headers:
            if k == key:
                return v.decode(errors="replace")
        return None

    async def wait_status(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Wait for the response headers and return the status code.

        Raises TunnelClosed if the stream is reset or the connection ends first,
        asyncio.TimeoutError if nothing comes back in time.
        """
        if self.status is None:
            waiter = asyncio.ensure_future(self._headers_event.wait())
            closer = asyncio.ensure_future(self._closed_event.wait())
            try:
                await asyncio.wait({waiter, closer}, timeout=timeout,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                closer.cancel()
        if self.status is not None:
            return self.status
        if self._closed_event.is_set():
            raise TunnelClosed(self.describe_end())
        raise asyncio.TimeoutError(f"no response headers on stream {self.stream_id} within {timeout}s")

    async def recv(self, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        """Next UDP payload from the target (context id 0), however it travelled."""
        if not self.payloads.empty():
            return self.payloads.get_nowait()
        getter = asyncio.ensure_future(self.payloads.get())
        closer = asyncio.ensure_future(self._closed_event.wait())
        try:
            done, _ = await asyncio.wait({getter, closer}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            closer.cancel()
        if getter in done:
            return getter.result()
        getter.cancel()
        if self._closed_event.is_set():
            raise TunnelClosed(self.describe_end())
        raise asyncio.TimeoutError(f"no payload on stream {self.stream_id} within {timeout}s")

    async def recv_or_none(self, timeout: float = DEFAULT_TIMEOUT) -> bytes | None:
        try:
            return await self.recv(timeout)
        except (asyncio.TimeoutError, TunnelClosed):
            return None

    async def wait_closed(self, timeout: float = DEFAULT_TIMEOUT) -> bool:
        """True if the stream ends (FIN or reset) or the connection dies within timeout."""
        try:
            await asyncio.wait_for(self._closed_event.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def describe_end(self) -> str:
        if self.reset_code is not None:
            return f"stream {self.stream_id} reset with code {self.reset_code:#x}"
        if self.client.terminated is not None:
            return f"connection terminated: {self.client.terminated}"
        return f"stream {self.stream_id} ended"

    # --- request side

    def send(self, payload: bytes, context_id: int = 0) -> None:
        """Send one UDP payload the way this connection's mode says."""
        if self.client.h3_datagram:
            self.send_http_datagram(payload, context_id)
        else:
            self.send_capsule_datagram(payload, context_id)

    def send_http_datagram(self, payload: bytes, context_id: int = 0) -> None:
        self.client.h3.send_datagram(self.stream_id, varint(context_id) + payload)
        self.client.transmit()

    def send_capsule_datagram(self, payload: bytes, context_id: int = 0) -> None:
        self.send_raw(datagram_capsule(payload, context_id))

    def send_capsule(self, capsule_type: int, value: bytes) -> None:
        self.send_raw(encode_capsule(capsule_type, value))

    def send_raw(self, data: bytes, end_stream: bool = False) -> None:
        """Raw bytes as one DATA frame on the request stream (capsule stream bytes)."""
        self.client.h3.send_data(self.stream_id, data, end_stream)
        self.client.transmit()

    def finish(self) -> None:
        """FIN the request stream (empty DATA frame with end_stream)."""
        self.send_raw(b"", end_stream=True)

    # --- event plumbing (called by MasqueClient)

    def _on_headers(self, event: HeadersReceived) -> None:
        if self.status is None:
            hdrs = list(event.headers)
            status = dict(hdrs).get(b":status")
            if status is not None and status.startswith(b"1"):
                return  # interim response
            self.headers = hdrs
            self.status = int(status) if status is not None else -1
            self._headers_event.set()
        if event.stream_ended:
            self._end()

    def _on_data(self, event: DataReceived) -> None:
        self.body += event.data
        self._pending += event.data
        capsules, self._pending = decode_capsules(self._pending)
        for ctype, value in capsules:
            self.capsules.append((ctype, value))
            if ctype == CAPSULE_DATAGRAM:
                parsed = split_context_id(value)
                if parsed is not None and parsed[0] == 0:
                    self.payloads.put_nowait(parsed[1])
        if event.stream_ended:
            self._end()

    def _on_datagram(self, data: bytes) -> None:
        self.http_datagrams.append(data)
        parsed = split_context_id(data)
        if parsed is not None and parsed[0] == 0:
            self.payloads.put_nowait(parsed[1])

    def _on_reset(self, code: int) -> None:
        self.reset_code = code
        self._end()

    def _end(self) -> None:
        self.ended = True
        self._closed_event.set()


class MasqueProtocol(QuicConnectionProtocol):
    def __init__(self, *args, h3_datagram: bool, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.masque: MasqueClient | None = None
        self._h3_datagram = h3_datagram
        self.h3 = MasqueH3Connection(self._quic, advertise_h3_datagram=h3_datagram)

    def quic_event_received(self, event: QuicEvent) -> None:
        client = self.masque
        if isinstance(event, ConnectionTerminated):
            if client is not None:
                client._on_terminated(event)
            return
        if isinstance(event, StreamReset) and client is not None:
            tunnel = client.tunnels.get(event.stream_id)
            if tunnel is not None:
                tunnel._on_reset(event.error_code)
        for h3_event in self.h3.handle_event(event):
            if client is None:
                continue
            if isinstance(h3_event, DatagramReceived):
                tunnel = client.tunnels.get(h3_event.stream_id)
                if tunnel is not None:
                    tunnel._on_datagram(h3_event.data)
                else:
                    client.stray_datagrams.append((h3_event.stream_id, h3_event.data))
                continue
            tunnel = client.tunnels.get(getattr(h3_event, "stream_id", -1))
            if tunnel is None:
                continue
            if isinstance(h3_event, HeadersReceived):
                tunnel._on_headers(h3_event)
            elif isinstance(h3_event, DataReceived):
                tunnel._on_data(h3_event)


class MasqueClient:
    """One HTTP/3 connection to a CONNECT-UDP proxy."""

    def __init__(self, protocol: MasqueProtocol, host: str, port: int, h3_datagram: bool,
                 authority: str) -> None:
        self.protocol = protocol
        self.host = host
        self.port = port
        self.h3_datagram = h3_datagram
        self.authority = authority
        self.tunnels: dict[int, Tunnel] = {}
        self.stray_datagrams: list[tuple[int, bytes]] = []
        self.terminated: str | None = None
        protocol.masque = self

    @property
    def h3(self) -> MasqueH3Connection:
        return self.protocol.h3

    def transmit(self) -> None:
        self.protocol.transmit()

    @property
    def peer_settings(self) -> dict[int, int] | None:
        return self.h3.received_settings

    async def wait_peer_settings(self, timeout: float = DEFAULT_TIMEOUT) -> dict[int, int]:
        deadline = asyncio.get_running_loop().time() + timeout
        while self.h3.received_settings is None:
            if self.terminated is not None:
                raise TunnelClosed(f"connection terminated: {self.terminated}")
            if asyncio.get_running_loop().time() > deadline:
                raise asyncio.TimeoutError("no SETTINGS from the peer")
            await asyncio.sleep(0.01)
        return self.h3.received_settings

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        h3_datagram: bool = True,
        quic_datagrams: bool | None = None,
        cafile: str | None = DEFAULT_CAFILE,
        server_name: str = "localhost",
        authority: str | None = None,
        max_datagram_size: int = 1350,
        idle_timeout: float = 10.0,
        timeout: float = DEFAULT_TIMEOUT,
        client_cert: tuple[str, str] | None = None,
    ) -> AsyncIterator["MasqueClient"]:
        """Open an HTTP/3 connection (ALPN h3). ``cafile=None`` disables verification.

        ``quic_datagrams`` (default: same as ``h3_datagram``) sets the QUIC
        max_datagram_frame_size transport parameter.
        """
        if quic_datagrams is None:
            quic_datagrams = h3_datagram
        config = QuicConfiguration(
            is_client=True,
            alpn_protocols=["h3"],
            max_datagram_size=max_datagram_size,
            idle_timeout=idle_timeout,
            server_name=server_name,
        )
        if quic_datagrams:
            config.max_datagram_frame_size = 65536
        if cafile is None:
            config.verify_mode = ssl.CERT_NONE
        else:
            config.load_verify_locations(cafile)
        if client_cert is not None:  # (certfile, keyfile): mutual TLS
            config.load_cert_chain(*client_cert)

        # Like aioquic.asyncio.connect, but the client socket is bound to the loopback
        # address of the proxy's family (aioquic's own connect binds the "::" wildcard).
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        local = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        if host != "localhost" and not ipaddress.ip_address(host).is_loopback:  # a veth address
            local = "::" if family == socket.AF_INET6 else "0.0.0.0"
        quic = QuicConnection(configuration=config)
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: MasqueProtocol(quic, h3_datagram=h3_datagram),
            local_addr=(local, 0), family=family)
        protocol = cast(MasqueProtocol, protocol)
        client = None
        try:
            protocol.connect((host, port))
            await asyncio.wait_for(protocol.wait_connected(), timeout)
            client = cls(protocol, host, port, h3_datagram, authority or f"{server_name}:{port}")
            yield client
        finally:
            # Close politely, but never wait long for a peer that may be gone.
            protocol.close()
            try:
                await asyncio.wait_for(protocol.wait_closed(), 2.0)
            except asyncio.TimeoutError:
                pass
            transport.close()

    def _on_terminated(self, event: ConnectionTerminated) -> None:
        self.terminated = f"error {event.error_code:#x} {event.reason_phrase!r}"
        for tunnel in self.tunnels.values():
            tunnel._end()

    # --- requests

    def open_tunnel(
        self,
        target_host: str = "foo.lyft.com",
        target_port: int | str = 80,
        *,
        path: str | None = None,
        capsule_protocol: bool = True,
        end_stream: bool = False,
        extra_headers: list[tuple[str, str]] | None = None,
        method: str = "CONNECT",
        protocol: str | None = "connect-udp",
    ) -> Tunnel:
        """Send an extended CONNECT request (RFC 9298 section 3.4); don't wait for the reply.

        ``path`` overrides the default template path built from target_host/target_port.
        ``end_stream=True`` sends a header-only request (END_STREAM on HEADERS).
        """
        stream_id = self.protocol._quic.get_next_available_stream_id()
        headers: list[tuple[bytes, bytes]] = [(b":method", method.encode())]
        if protocol is not None:
            headers.append((b":protocol", protocol.encode()))
        headers += [
            (b":scheme", b"https"),
            (b":authority", self.authority.encode()),
            (b":path", (path if path is not None else masque_path(target_host, target_port)).encode()),
        ]
        if capsule_protocol:
            headers.append((b"capsule-protocol", b"?1"))
        for k, v in extra_headers or []:
            headers.append((k.lower().encode(), v.encode()))
        tunnel = Tunnel(client=self, stream_id=stream_id)
        self.tunnels[stream_id] = tunnel
        self.h3.send_headers(stream_id, headers, end_stream=end_stream)
        self.transmit()
        return tunnel

    async def tunnel(self, target_host: str = "foo.lyft.com", target_port: int | str = 80,
                     timeout: float = DEFAULT_TIMEOUT, **kwargs) -> Tunnel:
        """open_tunnel + wait for the response headers."""
        t = self.open_tunnel(target_host, target_port, **kwargs)
        await t.wait_status(timeout)
        return t


async def _main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        description="Open one CONNECT-UDP tunnel over HTTP/3, send datagrams, print the replies.")
    ap.add_argument("--proxy", default="127.0.0.1:4433", help="proxy HOST:PORT (UDP)")
    ap.add_argument("--ca", default=DEFAULT_CAFILE, help="CA file to trust (default: examples/certs/cert.pem)")
    ap.add_argument("--insecure", action="store_true", help="do not verify the proxy's certificate")
    ap.add_argument("--target", default="localhost:9000", help="target_host:target_port for the path")
    ap.add_argument("--capsules", action="store_true", help="capsule-only client (no SETTINGS_H3_DATAGRAM)")
    ap.add_argument("--count", type=int, default=3)
    ap.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                    help="an extra request header (repeatable), e.g. credentials")
    ap.add_argument("message", nargs="?", default="hello through ferry")
    args = ap.parse_args(argv)
    host, _, port = args.proxy.rpartition(":")
    thost, _, tport = args.target.rpartition(":")
    async with MasqueClient.connect(host, int(port), h3_datagram=not args.capsules,
                                    cafile=None if args.insecure else args.ca) as client:
        extra = [tuple(part.strip() for part in h.split(":", 1)) for h in args.header]
        tunnel = await client.tunnel(thost, tport, extra_headers=extra)
        print(f"status {tunnel.status} proxy-status={tunnel.header('proxy-status')!r}")
        if tunnel.status != 200:
            return 1
        for i in range(args.count):
            tunnel.send(f"{args.message} #{i}".encode())
            print("reply:", (await tunnel.recv()).decode(errors="replace"))
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(_main()))
