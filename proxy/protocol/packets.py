"""Packet framing and the few packets the proxy builds or reads itself.

Result sets are never decoded here: the proxy forwards them as bytes. These
helpers serve the handshake, the proxy's own OK/ERR replies and the small
packets whose fields routing needs (OK status flags, session-state info).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from proxy.protocol.constants import (
    CLIENT_PROTOCOL_41,
    CLIENT_SESSION_TRACK,
    MAX_PACKET,
    SERVER_SESSION_STATE_CHANGED,
)

_u16 = struct.Struct("<H")


class ProtocolError(Exception):
    """A peer sent bytes that do not follow the protocol."""


def header(length: int, seq: int) -> bytes:
    return struct.pack("<I", length | ((seq & 0xFF) << 24))


def frame(payload: bytes, seq: int) -> bytes:
    """Frame one logical packet, splitting it at 16 MiB - 1 as the protocol requires."""
    n = len(payload)
    if n < MAX_PACKET:
        return header(n, seq) + payload
    parts = []
    pos = 0
    while True:
        chunk = payload[pos : pos + MAX_PACKET]
        parts.append(header(len(chunk), seq))
        parts.append(chunk)
        seq += 1
        pos += MAX_PACKET
        if len(chunk) < MAX_PACKET:
            break
    return b"".join(parts)


def logical_payload(pkt: bytes) -> bytes:
    """Payload of a (possibly split) logical packet given with its headers."""
    n = pkt[0] | (pkt[1] << 8) | (pkt[2] << 16)
    if n < MAX_PACKET:
        return pkt[4 : 4 + n]
    parts, pos = [], 0
    while True:
        m = pkt[pos] | (pkt[pos + 1] << 8) | (pkt[pos + 2] << 16)
        parts.append(pkt[pos + 4 : pos + 4 + m])
        pos += 4 + m
        if m < MAX_PACKET:
            return b"".join(parts)


def lenenc_int(n: int) -> bytes:
    if n < 251:
        return bytes((n,))
    if n < 1 << 16:
        return b"\xfc" + n.to_bytes(2, "little")
    if n < 1 << 24:
        return b"\xfd" + n.to_bytes(3, "little")
    return b"\xfe" + n.to_bytes(8, "little")


def lenenc_str(s: bytes) -> bytes:
    return lenenc_int(len(s)) + s


def read_lenenc_int(buf: bytes, pos: int) -> tuple[int | None, int]:
    """Return (value, new position); value None for the NULL marker 0xFB."""
    first = buf[pos]
    if first < 251:
        return first, pos + 1
    if first == 0xFB:
        return None, pos + 1
    if first == 0xFC:
        return int.from_bytes(buf[pos + 1 : pos + 3], "little"), pos + 3
    if first == 0xFD:
        return int.from_bytes(buf[pos + 1 : pos + 4], "little"), pos + 4
    if first == 0xFE:
        return int.from_bytes(buf[pos + 1 : pos + 9], "little"), pos + 9
    raise ProtocolError(f"bad length-encoded integer prefix 0x{first:02x}")


def read_lenenc_str(buf: bytes, pos: int) -> tuple[bytes, int]:
    n, pos = read_lenenc_int(buf, pos)
    if n is None:
        return b"", pos
    end = pos + n
    if end > len(buf):
        raise ProtocolError("length-encoded string runs past the packet")
    return bytes(buf[pos:end]), end


def read_nul_str(buf: bytes, pos: int) -> tuple[bytes, int]:
    end = buf.find(b"\x00", pos)
    if end < 0:
        raise ProtocolError("missing NUL terminator")
    return bytes(buf[pos:end]), end + 1


def ok_payload(
    affected_rows: int = 0,
    last_insert_id: int = 0,
    status: int = 0,
    warnings: int = 0,
    info: bytes = b"",
    header_byte: int = 0x00,
) -> bytes:
    return (
        bytes((header_byte,))
        + lenenc_int(affected_rows)
        + lenenc_int(last_insert_id)
        + _u16.pack(status)
        + _u16.pack(warnings)
        + info
    )


def ok_packet(seq: int, status: int, **kw) -> bytes:
    return frame(ok_payload(status=status, **kw), seq)


# Codes 2000-2999 belong to client libraries (CR_*): libmariadb (the mariadb CLI, mysqlclient,
# sysbench) turns an ERR packet carrying one into "2027 Received malformed packet" and drops the
# message. So the proxy's own backend-trouble errors go out with server codes: a lost backend
# connection as 1927 "connection was killed" (SQLAlchemy and others treat it as a disconnect),
# anything else (backend unreachable, TLS to it failed) as 9001, ProxySQL's code for that.
_LOST = frozenset((2006, 2013, 2055))
WIRE_LOST = (1927, b"70100")
WIRE_UNREACHABLE = (9001, b"HY000")


def wire_code(code: int, sqlstate: bytes) -> tuple[int, bytes]:
    """The (code, SQLSTATE) a client is sent for an error the proxy raised (see above)."""
    if 2000 <= code < 3000:
        return WIRE_LOST if code in _LOST else WIRE_UNREACHABLE
    return code, sqlstate


def err_payload(code: int, sqlstate: bytes, message: str, capabilities: int = CLIENT_PROTOCOL_41) -> bytes:
    code, sqlstate = wire_code(code, sqlstate)
    msg = message.encode("utf-8", "replace")
    if capabilities & CLIENT_PROTOCOL_41:
        return b"\xff" + _u16.pack(code) + b"#" + sqlstate + msg
    return b"\xff" + _u16.pack(code) + msg


def err_packet(seq: int, error: tuple[int, bytes], message: str, capabilities: int = CLIENT_PROTOCOL_41) -> bytes:
    """An ERR packet for one of the (code, SQLSTATE) pairs in constants."""
    code, state = error
    return frame(err_payload(code, state, message, capabilities), seq)


def eof_payload(status: int, warnings: int = 0) -> bytes:
    return b"\xfe" + _u16.pack(warnings) + _u16.pack(status)


@dataclass(slots=True)
class OK:
    affected_rows: int
    last_insert_id: int
    status: int
    warnings: int
    info: bytes
    session_state: bytes  # raw session-state-change block (may be empty)


def parse_ok(payload: bytes, capabilities: int) -> OK:
    """Decode an OK (0x00 or 0xFE header) packet payload."""
    affected, pos = read_lenenc_int(payload, 1)
    insert_id, pos = read_lenenc_int(payload, pos)
    status, warnings = struct.unpack_from("<HH", payload, pos)
    pos += 4
    info = b""
    state = b""
    if pos < len(payload):
        if capabilities & CLIENT_SESSION_TRACK:
            info, pos = read_lenenc_str(payload, pos)
            if status & SERVER_SESSION_STATE_CHANGED and pos < len(payload):
                state, pos = read_lenenc_str(payload, pos)
        else:
            info = bytes(payload[pos:])
    return OK(affected or 0, insert_id or 0, status, warnings, info, state)


def parse_err(payload: bytes) -> tuple[int, str, str]:
    """Return (code, sqlstate, message) of an ERR packet payload."""
    code = _u16.unpack_from(payload, 1)[0]
    if len(payload) > 3 and payload[3:4] == b"#":
        return code, payload[4:9].decode("ascii", "replace"), payload[9:].decode("utf-8", "replace")
    return code, "HY000", payload[3:].decode("utf-8", "replace")


def session_track_entries(block: bytes) -> list[tuple[int, bytes]]:
    """Split a session-state-change block into (type, data) entries."""
    out = []
    pos = 0
    while pos < len(block):
        kind = block[pos]
        data, pos = read_lenenc_str(block, pos + 1)
        out.append((kind, data))
    return out
