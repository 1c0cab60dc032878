#!/usr/bin/env python3
"""Checks that a CQL server answers queries, using only the standard library.

Speaks native protocol v4: STARTUP, then `SELECT release_version FROM system.local`, and
prints the release version. Exits 1 with the reason on stderr when the server does not
answer correctly. Usage: cql_ping.py [host] [port]
"""

import socket
import struct
import sys

PROTOCOL_VERSION = 4
OP_ERROR = 0x00
OP_STARTUP = 0x01
OP_READY = 0x02
OP_QUERY = 0x07
OP_RESULT = 0x08
RESULT_ROWS = 0x0002
CONSISTENCY_ONE = 0x0001
FLAG_GLOBAL_TABLES_SPEC = 0x0001
FLAG_HAS_MORE_PAGES = 0x0002
FLAG_NO_METADATA = 0x0004


class Reader:
    def __init__(self, data):
        self.data = data
        self.pos = 0

    def take(self, n):
        if self.pos + n > len(self.data):
            raise ValueError("truncated response")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def short(self):
        return struct.unpack(">H", self.take(2))[0]

    def int(self):
        return struct.unpack(">i", self.take(4))[0]

    def string(self):
        return self.take(self.short()).decode()

    def bytes(self):
        n = self.int()
        return None if n < 0 else self.take(n)

    def type_option(self):
        # Only the simple types system.local's release_version can have are expected here.
        type_id = self.short()
        if type_id == 0x0000:
            self.string()
        elif type_id >= 0x0020:
            raise ValueError(f"unexpected column type {type_id:#x}")


def encode_string(value):
    raw = value.encode()
    return struct.pack(">H", len(raw)) + raw


def encode_long_string(value):
    raw = value.encode()
    return struct.pack(">i", len(raw)) + raw


def read_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by server")
        buf += chunk
    return buf


def request(sock, stream, opcode, body):
    header = struct.pack(">BBhBi", PROTOCOL_VERSION, 0, stream, opcode, len(body))
    sock.sendall(header + body)
    _version, _flags, _stream, res_opcode, length = struct.unpack(
        ">BBhBi", read_exact(sock, 9)
    )
    res_body = read_exact(sock, length)
    if res_opcode == OP_ERROR:
        reader = Reader(res_body)
        code = reader.int()
        raise RuntimeError(f"server error {code:#x}: {reader.string()}")
    return res_opcode, res_body


def release_version(host, port, timeout):
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        startup = struct.pack(">H", 1) + encode_string("CQL_VERSION") + encode_string("3.0.0")
        opcode, _ = request(sock, 1, OP_STARTUP, startup)
        if opcode != OP_READY:
            raise RuntimeError(f"expected READY, got opcode {opcode:#x}")
        query = (
            encode_long_string("SELECT release_version FROM system.local")
            + struct.pack(">HB", CONSISTENCY_ONE, 0)
        )
        opcode, body = request(sock, 2, OP_QUERY, query)
        if opcode != OP_RESULT:
            raise RuntimeError(f"expected RESULT, got opcode {opcode:#x}")
        reader = Reader(body)
        if reader.int() != RESULT_ROWS:
            raise RuntimeError("expected a rows result")
        flags = reader.int()
        columns = reader.int()
        if flags & FLAG_HAS_MORE_PAGES:
            reader.bytes()
        if not flags & FLAG_NO_METADATA:
            if flags & FLAG_GLOBAL_TABLES_SPEC:
                reader.string()
                reader.string()
            for _ in range(columns):
                if not flags & FLAG_GLOBAL_TABLES_SPEC:
                    reader.string()
                    reader.string()
                reader.string()
                reader.type_option()
        if reader.int() < 1 or columns != 1:
            raise RuntimeError("system.local returned no row")
        value = reader.bytes()
        if value is None:
            raise RuntimeError("release_version is null")
        return value.decode()


def main():
    host = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 9042
    try:
        print(release_version(host, port, timeout=5.0))
    except (OSError, ValueError, RuntimeError) as err:
        print(f"cql check failed: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
