"""A minimal blocking MySQL protocol client, for tests and benchmarks of commands no library
(cursor fetches, COM_FIELD_LIST, unknown commands, malformed packets)."""

from __future__ import annotations

import socket
import struct
import zlib

from proxy.protocol import auth
from proxy.protocol.constants import (
    CLIENT_COMPRESS, CLIENT_DEPRECATE_EOF, CLIENT_MULTI_RESULTS, CLIENT_MYSQL, CLIENT_NO_SCHEMA, CLIENT_ODBC,
    CLIENT_PS_MULTI_RESULTS, CLIENT_SSL, LOGIN_ONLY_CAPABILITIES, MARIADB_CLIENT_STMT_BULK_OPERATIONS,
    PROXY_CAPABILITIES,
)
from proxy.protocol.handshake import build_response, parse_greeting
from proxy.protocol.packets import frame, parse_err


# What an application's client library asks for: everything the proxy offers but TLS, CLIENT_SSL's
# neighbour bit 20 and the options no driver sets by default (IGNORE_SPACE, INTERACTIVE, NO_SCHEMA,
# ODBC), which change the session (tests ask for them with extra_caps).
APP_CLIENT_CAPABILITIES = (PROXY_CAPABILITIES & ~(1 << 20) & ~CLIENT_SSL
                           & ~(LOGIN_ONLY_CAPABILITIES | CLIENT_NO_SCHEMA | CLIENT_ODBC))


class RawClient:
    def __init__(self, host: str, port: int, user="app", password="app", db="app", deprecate_eof=True, timeout=10.0,
                 drop_caps: int = 0, compress: bool = False, bulk: bool = False, extra_caps: int = 0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        self.compressed = False  # after the login, when compress=True: compressed packets both ways
        self.zbuf = b""  # received bytes of compressed packets not yet unpacked
        self.frames: list[tuple[int, int, int, bytes]] = []  # compressed packets read: (seq, clen, ulen, plain)
        self.cseq = 0  # compressed sequence id of the next compressed packet sent
        seq, payload = self.read()
        self.greeting = parse_greeting(payload)
        caps = APP_CLIENT_CAPABILITIES | CLIENT_MULTI_RESULTS | CLIENT_PS_MULTI_RESULTS | extra_caps
        if not deprecate_eof:
            caps &= ~CLIENT_DEPRECATE_EOF
        caps &= ~drop_caps
        if compress:
            caps |= CLIENT_COMPRESS
        if bulk:  # a MariaDB client: not CLIENT_MYSQL, and array binding if the server offers it
            caps = caps & ~CLIENT_MYSQL | self.greeting.capabilities & MARIADB_CLIENT_STMT_BULK_OPERATIONS
        self.caps = caps
        token = auth.native_token(password, self.greeting.salt)
        self.send(build_response(caps, 45, user, token, db, auth.NATIVE), seq + 1)
        seq, payload = self.read()
        if payload[0] != 0:
            raise RuntimeError(f"login failed: {parse_err(payload)}")
        self.compressed = compress

    def read(self) -> tuple[int, bytes]:
        while True:
            if len(self.buf) >= 4:
                n = int.from_bytes(self.buf[:3], "little")
                if len(self.buf) >= 4 + n:
                    seq, payload = self.buf[3], self.buf[4 : 4 + n]
                    self.buf = self.buf[4 + n :]
                    return seq, payload
            if self.compressed:
                self.buf += self.read_frame()[3]
                continue
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            self.buf += chunk

    def read_frame(self) -> tuple[int, int, int, bytes]:
        """The next compressed packet: (seq, compressed length, uncompressed length, plain bytes)."""
        while len(self.zbuf) < 7 or len(self.zbuf) < 7 + int.from_bytes(self.zbuf[:3], "little"):
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            self.zbuf += chunk
        clen, seq, ulen = int.from_bytes(self.zbuf[:3], "little"), self.zbuf[3], int.from_bytes(self.zbuf[4:7], "little")
        body, self.zbuf = self.zbuf[7 : 7 + clen], self.zbuf[7 + clen :]
        plain = zlib.decompress(body) if ulen else body
        self.frames.append((seq, clen, ulen, plain))
        self.cseq = (seq + 1) & 0xFF
        return seq, clen, ulen, plain

    def send(self, payload: bytes, seq: int = 0) -> None:
        if self.compressed:
            return self.send_compressed(frame(payload, seq), 0 if seq == 0 else self.cseq)
        self.sock.sendall(frame(payload, seq))

    def send_compressed(self, plain: bytes, cseq: int) -> None:
        """`plain` (whole packets, or any bytes) as one compressed packet."""
        body, ulen = (zlib.compress(plain), len(plain)) if len(plain) >= 50 else (plain, 0)
        self.sock.sendall(len(body).to_bytes(3, "little") + bytes((cseq,)) + ulen.to_bytes(3, "little") + body)
        self.cseq = (cseq + 1) & 0xFF

    def command(self, payload: bytes) -> bytes:
        """Send a command, return the first response packet's payload."""
        self.send(payload, 0)
        return self.read()[1]

    def response(self, kind: int) -> list[bytes]:
        """The payloads of one whole response of the given scan kind, its end found by the
        proxy's own scanner."""
        from proxy.protocol.scan import Scanner

        sc, out = Scanner(bool(self.caps & CLIENT_DEPRECATE_EOF)), []
        sc.start(kind)
        while True:
            seq, p = self.read()
            out.append(p)
            if sc.feed(frame(p, seq)) >= 0:
                return out

    def read_until_eof(self) -> list[bytes]:
        """Read packets until an EOF/OK-0xFE terminator or ERR (inclusive)."""
        out = []
        while True:
            _, p = self.read()
            out.append(p)
            if p[:1] == b"\xff" or (p[:1] == b"\xfe" and len(p) < 0xFFFFFF):
                return out

    def prepare(self, sql: str) -> tuple[int, int, int]:
        p = self.command(b"\x16" + sql.encode())
        if p[0] == 0xFF:
            raise RuntimeError(parse_err(p))
        stmt_id, ncols, nparams = struct.unpack_from("<IHH", p, 1)
        for _ in range(nparams):
            self.read()
        if nparams and not self.caps & CLIENT_DEPRECATE_EOF:
            self.read()
        for _ in range(ncols):
            self.read()
        if ncols and not self.caps & CLIENT_DEPRECATE_EOF:
            self.read()
        return stmt_id, ncols, nparams

    def query_raw(self, sql: bytes, scanner, out: bytearray | None = None) -> int:
        """Run a COM_QUERY and read the whole response as bytes (no decoding); returns its size.
        `out`, when given, receives the response's bytes."""
        from proxy.protocol.scan import RESULT

        self.send(b"\x03" + sql, 0)
        scanner.start(RESULT)
        data, self.buf, size = self.buf, b"", 0
        while True:
            if data:
                size += len(data)
                if out is not None:
                    out += data
                if scanner.feed(data) >= 0:
                    return size
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("connection closed")

    def close(self) -> None:
        try:
            self.send(b"\x01", 0)
        except OSError:
            pass
        self.sock.close()
