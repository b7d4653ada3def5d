"""Protocol-10 handshake: the greeting and the client's handshake response, both directions.

The proxy plays server to clients (build_greeting / parse_response) and client
to backends (parse_greeting / build_response).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from proxy.protocol.constants import (
    CLIENT_CONNECT_ATTRS,
    CLIENT_CONNECT_WITH_DB,
    CLIENT_MYSQL,
    CLIENT_PLUGIN_AUTH,
    CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA,
    CLIENT_PROTOCOL_41,
    CLIENT_SECURE_CONNECTION,
    CLIENT_SSL,
)
from proxy.protocol.packets import ProtocolError, lenenc_int, lenenc_str, read_lenenc_int, read_lenenc_str, read_nul_str


class OldClient(ProtocolError):
    """A handshake response without CLIENT_PROTOCOL_41 (a pre-4.1 client). MariaDB 10.11 reads its
    4.0 layout (2 bytes of flags, 3 of packet size, the user ending in NUL, then the 8-byte
    scramble) and answers, without a SQLSTATE (4.0 errors have none): 1043 Bad handshake when it
    claims CLIENT_SECURE_CONNECTION, 1045 Access denied (using password: NO) without a scramble,
    else 1251 "consider upgrading" (old_password scrambles are not supported)."""

    def __init__(self, secure: bool, user: str, password: bool):
        super().__init__("client does not speak protocol 4.1")
        self.secure, self.user, self.password = secure, user, password


class ServerRefused(ProtocolError):
    """An error in place of the greeting: the server will not take a connection (1040 Too many
    connections when full, 1129 when the host is blocked). Sent before it knows the client's
    flags, it carries no SQLSTATE; 1040's is 08004."""

    def __init__(self, code: int, state: str, message: str):
        super().__init__(f"server refused the connection: ({code}) {message}")
        self.code, self.state, self.message = code, state, message


@dataclass(slots=True)
class Greeting:
    server_version: bytes
    connection_id: int
    salt: bytes
    capabilities: int
    charset: int
    status: int
    plugin: str


@dataclass(slots=True)
class HandshakeResponse:
    capabilities: int
    max_packet: int
    charset: int
    user: str = ""
    auth_response: bytes = b""
    database: str | None = None
    plugin: str = ""
    attrs: dict[str, str] = field(default_factory=dict)
    ssl_request: bool = False  # only the 32-byte SSL request prefix was sent


def _extended(capabilities: int) -> bytes:
    """MariaDB's extended capabilities (bits 32-63), sent only by a peer that is not CLIENT_MYSQL."""
    return struct.pack("<I", 0 if capabilities & CLIENT_MYSQL else capabilities >> 32 & 0xFFFFFFFF)


def build_greeting(
    server_version: bytes, connection_id: int, salt: bytes, capabilities: int, charset: int, status: int, plugin: str
) -> bytes:
    return b"".join(
        (
            b"\x0a",
            server_version,
            b"\x00",
            struct.pack("<I", connection_id & 0xFFFFFFFF),
            salt[:8],
            b"\x00",
            struct.pack("<H", capabilities & 0xFFFF),
            bytes((charset,)),
            struct.pack("<H", status),
            struct.pack("<H", (capabilities >> 16) & 0xFFFF),
            bytes((len(salt) + 1,)),
            b"\x00" * 6,
            _extended(capabilities),
            salt[8:],
            b"\x00",
            plugin.encode(),
            b"\x00",
        )
    )


def parse_greeting(payload: bytes) -> Greeting:
    if not payload:
        raise ProtocolError("empty greeting")
    if payload[0] == 0xFF:
        from proxy.protocol.packets import parse_err

        code, state, msg = parse_err(payload)
        raise ServerRefused(code, "08004" if code == 1040 and state == "HY000" else state, msg)
    if payload[0] != 10:
        raise ProtocolError(f"unsupported protocol version {payload[0]}")
    version, pos = read_nul_str(payload, 1)
    conn_id = struct.unpack_from("<I", payload, pos)[0]
    salt1 = payload[pos + 4 : pos + 12]
    pos += 13
    caps = struct.unpack_from("<H", payload, pos)[0]
    charset = payload[pos + 2]
    status = struct.unpack_from("<H", payload, pos + 3)[0]
    caps |= struct.unpack_from("<H", payload, pos + 5)[0] << 16
    salt_len = payload[pos + 7]
    if not caps & CLIENT_MYSQL and len(payload) >= pos + 18:
        caps |= struct.unpack_from("<I", payload, pos + 14)[0] << 32
    pos += 18
    salt2 = b""
    if caps & CLIENT_SECURE_CONNECTION:
        n = max(13, salt_len - 8)
        salt2 = payload[pos : pos + n].rstrip(b"\x00")
        pos += n
    plugin = ""
    if caps & CLIENT_PLUGIN_AUTH and pos < len(payload):
        name, _ = read_nul_str(payload + b"\x00", pos)
        plugin = name.decode()
    return Greeting(bytes(version), conn_id, bytes(salt1 + salt2), caps, charset, status, plugin)


def parse_response(payload: bytes) -> HandshakeResponse:
    """Decode a HandshakeResponse41 (or the 32-byte SSL request)."""
    if len(payload) >= 2 and not payload[1] & (CLIENT_PROTOCOL_41 >> 8):  # (a 4.0 header is 5 bytes)
        if len(payload) <= 5:
            raise ProtocolError("too short")
        end = payload.find(b"\0", 5)
        user = payload[5:] if end < 0 else payload[5:end]
        scramble = b"" if end < 0 else payload[end + 1:].split(b"\0", 1)[0]
        raise OldClient(bool(payload[1] & (CLIENT_SECURE_CONNECTION >> 8)), user.decode("utf-8", "replace"),
                        bool(scramble))
    if len(payload) < 32:
        raise ProtocolError("handshake response too short")
    caps, max_packet, charset = struct.unpack_from("<IIB", payload, 0)
    if not caps & CLIENT_MYSQL:
        caps |= struct.unpack_from("<I", payload, 28)[0] << 32
    resp = HandshakeResponse(caps, max_packet, charset)
    if len(payload) == 32:
        if not caps & CLIENT_SSL:
            raise ProtocolError("handshake response too short")
        resp.ssl_request = True
        return resp
    user, pos = read_nul_str(payload, 32)
    resp.user = user.decode("utf-8", "replace")
    if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
        resp.auth_response, pos = read_lenenc_str(payload, pos)
    elif caps & CLIENT_SECURE_CONNECTION:
        n = payload[pos]
        resp.auth_response = bytes(payload[pos + 1 : pos + 1 + n])
        pos += 1 + n
    else:
        resp.auth_response, pos = read_nul_str(payload, pos)
    if caps & CLIENT_CONNECT_WITH_DB and pos < len(payload):
        db, pos = read_nul_str(payload + b"\x00", pos)
        resp.database = db.decode("utf-8", "replace") or None
    if caps & CLIENT_PLUGIN_AUTH and pos < len(payload):
        name, pos = read_nul_str(payload + b"\x00", pos)
        resp.plugin = name.decode("ascii", "replace")
    if caps & CLIENT_CONNECT_ATTRS and pos < len(payload):
        total, pos = read_lenenc_int(payload, pos)
        end = pos + (total or 0)
        while pos < end:
            k, pos = read_lenenc_str(payload, pos)
            v, pos = read_lenenc_str(payload, pos)
            resp.attrs[k.decode("utf-8", "replace")] = v.decode("utf-8", "replace")
    return resp


def response_caps(capabilities: int, database: str | None, attrs) -> int:
    """The flags a handshake response carries (the SSL request before it must carry the same:
    MariaDB answers "Bad handshake" when they differ)."""
    caps = capabilities | CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION | CLIENT_PLUGIN_AUTH
    caps |= CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
    if database:
        caps |= CLIENT_CONNECT_WITH_DB
    else:
        caps &= ~CLIENT_CONNECT_WITH_DB
    if attrs:
        caps |= CLIENT_CONNECT_ATTRS
    else:
        caps &= ~CLIENT_CONNECT_ATTRS
    return caps


def build_ssl_request(capabilities: int, charset: int, max_packet: int = 1 << 30) -> bytes:
    """SSLRequest: the first 32 bytes of a handshake response (pass response_caps(...) | CLIENT_SSL)."""
    return (struct.pack("<IIB", (capabilities | CLIENT_SSL) & 0xFFFFFFFF, max_packet, charset) + b"\x00" * 19
            + _extended(capabilities))


def build_response(
    capabilities: int,
    charset: int,
    user: str,
    auth_response: bytes,
    database: str | None,
    plugin: str,
    attrs: dict[str, str] | None = None,
    max_packet: int = 1 << 30,
) -> bytes:
    caps = response_caps(capabilities, database, attrs)
    parts = [
        struct.pack("<IIB", caps & 0xFFFFFFFF, max_packet, charset),
        b"\x00" * 19,
        _extended(caps),
        user.encode(),
        b"\x00",
        lenenc_str(auth_response),
    ]
    if database:
        parts += [database.encode(), b"\x00"]
    parts += [plugin.encode(), b"\x00"]
    if attrs:
        blob = b"".join(lenenc_str(k.encode()) + lenenc_str(v.encode()) for k, v in attrs.items())
        parts.append(lenenc_int(len(blob)) + blob)
    return b"".join(parts)
