#!/usr/bin/env python3
"""Capture one TLS ClientHello exactly as a client sends it.

Usage: capture.py PORTFILE OUT
Listens on 127.0.0.1 (a free port, written to PORTFILE), accepts one
connection, reads whole TLS records until the handshake message they carry
(the ClientHello) is complete, writes those record bytes to OUT, and closes.
"""
import socket
import sys


def read_exact(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError("client closed before its ClientHello was complete")
        data += chunk
    return data


def main():
    portfile, out = sys.argv[1], sys.argv[2]
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    with open(portfile, "w") as f:
        f.write(str(server.getsockname()[1]))
    conn, _ = server.accept()
    conn.settimeout(30)
    records, handshake = b"", b""
    while len(handshake) < 4 or len(handshake) < 4 + int.from_bytes(handshake[1:4], "big"):
        header = read_exact(conn, 5)
        if header[0] != 22:
            raise ValueError(f"not a handshake record: {header!r}")
        body = read_exact(conn, int.from_bytes(header[3:5], "big"))
        records += header + body
        handshake += body
    with open(out, "wb") as f:
        f.write(records)
    conn.close()


if __name__ == "__main__":
    main()
