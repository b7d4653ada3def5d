"""The monitor's own MySQL client: one blocking socket, the text protocol, nothing else.

Why: the monitor runs ~40 queries a second at the default intervals (a check every 100 ms on
each of three servers, a heartbeat write every 250 ms). Through PyMySQL a query cost 84-100 µs
of CPU (its result object, field descriptors and type converters), a raw socket round trip
16 µs; PyMySQL was most of the control plane's 18-20 ms of CPU per idle second
(docs/performance.md). This client sends COM_QUERY and reads the rows as strings (None for
NULL): the monitor converts the few values it uses itself.

It speaks what the monitor needs: the protocol-10 handshake with the auth plugins rwproxy's
backend connections speak (proxy.protocol.auth), TLS under the backend's policy
(backend/tls.py), TCP or a Unix socket, timeouts. Failover, switchover and the sandbox keep
PyMySQL (rare, and they need its conveniences). Server errors are raised as
pymysql.err.OperationalError(code, message), so the monitor's error handling
(sqlerrors.describe/error_code) reads them like PyMySQL's.
"""

from __future__ import annotations

import socket
import struct

import pymysql

from proxy.backend.tls import DISABLED, CR_SSL_CONNECTION_ERROR, policies_for
from proxy.protocol import auth
from proxy.protocol.constants import (
    CLIENT_LONG_FLAG, CLIENT_LONG_PASSWORD, CLIENT_MULTI_RESULTS, CLIENT_MULTI_STATEMENTS, CLIENT_SSL,
    CLIENT_TRANSACTIONS, COM_QUERY, COM_QUIT, SERVER_MORE_RESULTS_EXISTS, SERVER_STATUS_AUTOCOMMIT,
)
from proxy.protocol.handshake import build_response, build_ssl_request, parse_greeting, response_caps
from proxy.protocol.packets import parse_err, read_lenenc_int, read_lenenc_str

UTF8MB4 = 45  # utf8mb4_general_ci
# Multi-statements: the heartbeat's write and the reading after it go in one round trip.
_CAPS = CLIENT_LONG_PASSWORD | CLIENT_LONG_FLAG | CLIENT_TRANSACTIONS | CLIENT_MULTI_STATEMENTS | CLIENT_MULTI_RESULTS
CR_SERVER_LOST = 2013
CR_CONN_HOST_ERROR = 2003


class WireError(pymysql.err.OperationalError):
    """An error from the server (its code and message) or from the connection (2003, 2013)."""


def _lost(what: str) -> WireError:
    return WireError(CR_SERVER_LOST, f"Lost connection to server: {what}")


class WireConnection:
    """One monitor connection (not thread-safe: each monitor thread has its own)."""

    def __init__(self, sock: socket.socket, server_version: str):
        self.sock = sock
        self.server_version = server_version
        self.buf = bytearray()
        self.seq = 0

    # ---- what the monitor calls ------------------------------------------------------------
    def get_server_info(self) -> str:
        return self.server_version

    def query(self, sql: str) -> list[tuple]:
        """Run `sql`; the rows of its (last) result, values as str, NULL as None; [] for none."""
        return self._query(sql)[1]

    def query_dicts(self, sql: str) -> list[dict]:
        names, rows = self._query(sql, True)
        return [dict(zip(names, r)) for r in rows]

    def close(self) -> None:
        try:
            self.sock.sendall(struct.pack("<I", 1) + bytes([COM_QUIT]))
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass

    # ---- the protocol ---------------------------------------------------------------------
    def _query(self, sql: str, names: bool = False) -> tuple[list[str], list[tuple]]:
        """Send `sql` (one statement, or several separated by ';'); the last result's column names
        (when asked for) and rows."""
        body = bytes([COM_QUERY]) + sql.encode()
        try:
            self.sock.sendall(struct.pack("<I", len(body))[:3] + b"\x00" + body)
            while True:
                cols, rows, status = self._result(names)
                if not status & SERVER_MORE_RESULTS_EXISTS:
                    return cols, rows
        except socket.timeout:
            raise _lost("timed out waiting for the server's answer") from None
        except OSError as e:
            raise _lost(str(e)) from None
        except (IndexError, ValueError, TypeError):
            raise _lost("malformed answer") from None

    def _result(self, names: bool) -> tuple[list[str], list[tuple], int]:
        first = self.packet()
        head = first[0]
        if head == 0xFF:
            code, _state, msg = parse_err(first)
            raise WireError(code, msg)
        if head == 0x00:
            _, pos = read_lenenc_int(first, 1)
            _, pos = read_lenenc_int(first, pos)
            return [], [], first[pos] | first[pos + 1] << 8
        ncols, _ = read_lenenc_int(first, 0)
        cols = []
        for _ in range(ncols or 0):
            col = self.packet()
            if names:  # (the checks read values by position: only SHOW ALL SLAVES STATUS wants names)
                pos = 0
                for _skip in range(4):  # catalog, schema, table, org_table
                    _, pos = read_lenenc_str(col, pos)
                name, _ = read_lenenc_str(col, pos)
                cols.append(name.decode("utf-8", "replace"))
        self.packet()  # EOF after the column definitions (CLIENT_DEPRECATE_EOF is not asked for)
        rows = []
        while True:
            p = self.packet()
            if p[0] == 0xFE and len(p) < 9:
                return cols, rows, p[3] | p[4] << 8
            if p[0] == 0xFF:
                code, _state, msg = parse_err(p)
                raise WireError(code, msg)
            row = []
            pos = 0
            for _ in range(ncols):
                if p[pos] == 0xFB:
                    row.append(None)
                    pos += 1
                else:
                    v, pos = read_lenenc_str(p, pos)
                    row.append(v.decode("utf-8", "replace"))
            rows.append(tuple(row))

    def packet(self) -> bytes:
        """One logical packet's payload (large packets are not expected by the monitor)."""
        hdr = self._read(4)
        n = hdr[0] | hdr[1] << 8 | hdr[2] << 16
        self.seq = hdr[3]
        return self._read(n)

    def _read(self, n: int) -> bytes:
        buf = self.buf
        while len(buf) < n:
            chunk = self.sock.recv(max(65536, n - len(buf)))
            if not chunk:
                raise ConnectionResetError("the server closed the connection")
            buf += chunk
        out = bytes(buf[:n])
        del buf[:n]
        return out

    def send_packet(self, payload: bytes, seq: int) -> None:
        self.sock.sendall(struct.pack("<I", len(payload))[:3] + bytes([seq & 0xFF]) + payload)


def connect(config, backend, user: str, password: str, connect_timeout: float, read_timeout: float) -> WireConnection:
    """A monitor connection to `backend` (a BackendConfig) under its TLS policy."""
    tls = policies_for(config).get(backend.name)
    try:
        if backend.socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(connect_timeout)
            sock.connect(backend.socket)
        else:
            sock = socket.create_connection((backend.host, backend.port), timeout=connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as e:
        raise WireError(CR_CONN_HOST_ERROR, f"Can't connect to server on {backend.where} ({e})") from None
    conn = WireConnection(sock, "")
    try:
        _handshake(conn, backend, tls, user, password)
        conn.sock.settimeout(read_timeout)
        return conn
    except socket.timeout:
        conn.close()
        raise _lost("timed out during the handshake") from None
    except (OSError, IndexError, ValueError) as e:
        conn.close()
        if isinstance(e, WireError):
            raise
        raise _lost(f"during the handshake: {e}") from None


def _handshake(conn: WireConnection, backend, tls, user: str, password: str) -> None:
    g = parse_greeting(conn.packet())
    conn.server_version = g.server_version.decode("utf-8", "replace")
    caps = _CAPS & g.capabilities
    seq = conn.seq
    if tls is not None and tls.mode != DISABLED:
        if g.capabilities & CLIENT_SSL:
            caps |= CLIENT_SSL
            seq += 1
            conn.send_packet(build_ssl_request(response_caps(caps, None, None), UTF8MB4), seq)
            conn.sock = tls.context.wrap_socket(conn.sock, server_hostname=tls.hostname)
        elif tls.required:
            raise WireError(CR_SSL_CONNECTION_ERROR, f"TLS to backend {backend.name} is required (backend_tls mode "
                            f"{tls.mode}) but the server does not offer it")
    plugin = g.plugin if g.plugin in auth.BACKEND else auth.NATIVE
    conn.send_packet(build_response(caps, UTF8MB4, user, auth.token_for(plugin, password, g.salt), None, plugin), seq + 1)
    while True:
        p = conn.packet()
        if p[0] == 0x00:
            break
        if p[0] == 0xFF:
            code, _state, msg = parse_err(p)
            raise WireError(code, msg)
        if p[0] == 0xFE:  # auth switch
            end = p.index(b"\x00", 1)
            plugin = p[1:end].decode()
            if plugin not in auth.BACKEND:
                raise WireError(1251, f"the server asks for the unsupported auth plugin {plugin}")
            conn.send_packet(auth.token_for(plugin, password, p[end + 1:]), conn.seq + 1)
        else:
            raise WireError(1251, f"unexpected packet 0x{p[0]:02x} during authentication")
    if not g.status & SERVER_STATUS_AUTOCOMMIT:
        conn.query("SET autocommit=1")


def quote(value: str) -> str:
    """A string literal for SQL the monitor builds itself (backend names)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''").replace("\x00", "\\0") + "'"
