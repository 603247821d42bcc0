#!/usr/bin/env python3
"""A tiny UDP echo server for trying out the examples.

Usage: scripts/udp-echo.py [PORT] [--host HOST]

PORT 0 (the default) picks a free port. Prints one line "listening on HOST:PORT"
(flushed) once the socket is bound, then echoes every datagram back to its sender
until interrupted.
"""
import argparse
import socket
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description="UDP echo server")
    ap.add_argument("port", nargs="?", type=int, default=0, help="UDP port (0 = any free port)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    args = ap.parse_args()

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    except OSError:
        pass
    sock.bind((args.host, args.port))
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"listening on {shown}:{port}", flush=True)
    try:
        while True:
            data, peer = sock.recvfrom(65535)
            sock.sendto(data, peer)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
