"""Packet framing and the few packets the proxy builds or reads itself.

Result sets are never decoded here: the proxy forwards them as bytes. These
helpers serve the handshake, the proxy's own OK/ERR replies and the small
packets whose fields routing needs (OK status flags, session-state info).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from proxy.protocol.constants import (
    CLIENT_PROTOCOL_41,
    COM_STMT_CLOSE,
    CLIENT_SESSION_TRACK,
    ER_MAX_PREPARED_STMT_COUNT_REACHED,
    MAX_PACKET,
    SERVER_SESSION_STATE_CHANGED,
)

_u16 = struct.Struct("<H")


class ProtocolError(Exception):
    """A peer sent bytes that do not follow the protocol."""


def header(length: int, seq: int) -> bytes:
    return struct.pack("<I", length | ((seq & 0xFF) << 24))


def packet_length(buf, pos: int = 0) -> int:
    """The payload length in the 4-byte header at buf[pos] (the one place headers are decoded)."""
    return buf[pos] | (buf[pos + 1] << 8) | (buf[pos + 2] << 16)


def logical_packet(buf, pos: int = 0) -> tuple[int, int]:
    """(end, size) of the logical packet starting at buf[pos]: `end` is the offset just past it,
    -1 while it is incomplete; `size` is its payload length as far as the headers seen declare
    it (a packet of 16 MiB or more is split into physical packets of 0xFFFFFF bytes, the last
    one shorter)."""
    size, blen = 0, len(buf)
    while pos + 4 <= blen:
        n = buf[pos] | (buf[pos + 1] << 8) | (buf[pos + 2] << 16)
        size += n
        pos += 4 + n
        if n < MAX_PACKET:
            return (pos if pos <= blen else -1), size
    return -1, size


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


def command(cmd: int, body: bytes = b"") -> bytes:
    """A framed command packet (sequence 0) for the proxy's own commands to a server."""
    return frame(bytes((cmd,)) + body, 0)


def stmt_close(stmt_id: int) -> bytes:
    """COM_STMT_CLOSE for a backend statement id (the server sends no response)."""
    return command(COM_STMT_CLOSE, stmt_id.to_bytes(4, "little"))


def logical_payload(pkt: bytes) -> bytes:
    """Payload of a (possibly split) logical packet given with its headers."""
    n = packet_length(pkt)
    if n < MAX_PACKET:
        return pkt[4 : 4 + n]
    parts, pos = [], 0
    while True:
        m = packet_length(pkt, pos)
        parts.append(pkt[pos + 4 : pos + 4 + m])
        pos += 4 + m
        if m < MAX_PACKET:
            return b"".join(parts)


def execute_types_offset(nparams: int) -> int:
    """Where COM_STMT_EXECUTE's new-params-bound flag sits in a framed packet for a statement of
    `nparams` parameters: after the header, command, statement id, flags, iteration count and
    NULL bitmap (-1: no parameters, no flag). The flag is there only if the packet is that long
    and not split (16 MiB or more)."""
    return 4 + 10 + (nparams + 7) // 8 if nparams else -1


_INT_SIZES = {1: 1, 2: 2, 13: 2, 3: 4, 9: 4, 8: 8}  # TINY, SHORT, YEAR, LONG, INT24, LONGLONG
_LEADING_INT = re.compile(rb"\s*([-+]?\d+)")


def execute_int_param(pkt, types_at: int, types: bytes | None) -> tuple[int, bytes | None]:
    """The value of the only parameter of a COM_STMT_EXECUTE as an integer, as the server
    converts it where it needs one (NULL and non-numeric text 0, a float rounded, text by its
    leading digits), and the parameter's type block (sent now, else the remembered `types`).
    For the few statements rwproxy answers itself (a prepared KILL ?): ProtocolError if short."""
    if types_at < 0 or types_at >= len(pkt):
        raise ProtocolError("COM_STMT_EXECUTE without its parameter")
    pos = types_at + 1
    if pkt[types_at] == 1:
        types, pos = bytes(pkt[pos : pos + 2]), pos + 2
    if types is None or len(types) < 2:
        raise ProtocolError("COM_STMT_EXECUTE without its parameter's type")
    if pkt[types_at - 1] & 1:  # the NULL bitmap
        return 0, types
    t, unsigned = types[0], types[1] & 0x80
    if t in _INT_SIZES:
        n = _INT_SIZES[t]
        if pos + n > len(pkt):
            raise ProtocolError("COM_STMT_EXECUTE parameter cut short")
        return int.from_bytes(pkt[pos : pos + n], "little", signed=not unsigned), types
    if t in (4, 5):  # FLOAT, DOUBLE: rounded half away from zero
        fmt, n = ("<f", 4) if t == 4 else ("<d", 8)
        if pos + n > len(pkt):
            raise ProtocolError("COM_STMT_EXECUTE parameter cut short")
        v = struct.unpack_from(fmt, pkt, pos)[0]
        return (int(abs(v) + 0.5) * (1 if v >= 0 else -1)) if v == v and abs(v) < 2 ** 63 else 0, types
    if pos >= len(pkt):
        raise ProtocolError("COM_STMT_EXECUTE parameter cut short")
    n, pos = read_lenenc_int(pkt, pos)
    m = _LEADING_INT.match(bytes(pkt[pos : pos + min(n or 0, 64)]))
    return (int(m.group(1)) if m else 0), types


def rewrite_execute(pkt, stmt_id: int, types: bytes | None = None, types_at: int = -1) -> bytes:
    """COM_STMT_EXECUTE `pkt` made to name backend statement `stmt_id` and, when `types` is given,
    to carry those parameter types (the new-params-bound flag at `types_at` set to 1). A client
    sends the types only with the first execute after binding; a connection that missed it
    needs them put back. The one execute-packet rewriter: every path that sends an execute
    to a server (own or shared connection) goes through it."""
    sid = stmt_id.to_bytes(4, "little")
    if types is not None:
        body = pkt[4:5] + sid + pkt[9:types_at] + b"\x01" + types + pkt[types_at + 1 :]
        return len(body).to_bytes(3, "little") + pkt[3:4] + body
    if pkt[5:9] == sid:
        return pkt  # a fresh connection often numbers statements as the client does: no copy
    return pkt[:5] + sid + pkt[9:]


def payloads(data: bytes) -> list[bytes]:
    """The payloads of the whole physical packets in `data` (a collected response)."""
    out, pos = [], 0
    while pos + 4 <= len(data):
        n = packet_length(data, pos)
        out.append(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out


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


def login_ok_packet(seq: int, status: int, db: str | None, tracking: bool) -> bytes:
    """The OK that ends a login or COM_CHANGE_USER. With a database and a client that negotiated
    CLIENT_SESSION_TRACK, the server's carries the schema as changed session state (type 1,
    SESSION_TRACK_SCHEMA), which a connector may take the current database from."""
    if not (db and tracking):
        return ok_packet(seq, status)
    entry = lenenc_str(lenenc_str(db.encode()))
    state = lenenc_str(b"\x01" + entry)
    return frame(ok_payload(status=status | SERVER_SESSION_STATE_CHANGED, info=b"\x00" + state), seq)


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


@dataclass(slots=True)
class OK:
    affected_rows: int
    last_insert_id: int
    status: int
    warnings: int
    info: bytes
    session_state: bytes  # raw session-state-change block (may be empty)


def parse_ok(payload: bytes, capabilities: int = 0) -> OK:
    """Decode an OK packet payload (0x00 header, or 0xFE ending a result with CLIENT_DEPRECATE_EOF).

    Fields a cut-short packet lacks read as 0 (an old server's OK has no warnings, as the
    response scanners assume too)."""
    n = len(payload)
    affected, pos = _lenenc_or_zero(payload, 1)
    insert_id, pos = _lenenc_or_zero(payload, pos)
    status = payload[pos] | (payload[pos + 1] << 8) if pos + 2 <= n else 0
    warnings = payload[pos + 2] | (payload[pos + 3] << 8) if pos + 4 <= n else 0
    pos += 4
    info = state = b""
    if pos < n:
        if capabilities & CLIENT_SESSION_TRACK:
            info, pos = read_lenenc_str(payload, pos)
            if status & SERVER_SESSION_STATE_CHANGED and pos < n:
                state, pos = read_lenenc_str(payload, pos)
        else:
            info = bytes(payload[pos:])
    return OK(affected, insert_id, status, warnings, info, state)


def _lenenc_or_zero(buf, pos: int) -> tuple[int, int]:
    """A length-encoded integer where one is due; past the end, NULL or 0xFF (never valid
    there) read as a one-byte 0, as the C scanner reads them."""
    if pos >= len(buf) or buf[pos] in (0xFB, 0xFF):
        return 0, pos + 1
    value, end = read_lenenc_int(buf, pos)
    return value, end


def parse_eof(payload: bytes) -> tuple[int, int]:
    """(status flags, warnings) of an EOF packet payload (0xFE, warnings u16, status u16)."""
    if len(payload) < 5:
        return 0, 0
    return payload[3] | (payload[4] << 8), payload[1] | (payload[2] << 8)


def parse_err(payload: bytes) -> tuple[int, str, str]:
    """Return (code, sqlstate, message) of an ERR packet payload."""
    code = _u16.unpack_from(payload, 1)[0]
    if len(payload) > 3 and payload[3:4] == b"#":
        return code, payload[4:9].decode("ascii", "replace"), payload[9:].decode("utf-8", "replace")
    return code, "HY000", payload[3:].decode("utf-8", "replace")


def text_rows(resp: bytes) -> list[list[bytes | None]] | None:
    """The rows of a whole text result set (the proxy's own small queries); None for an OK or ERR.
    Read without knowing CLIENT_DEPRECATE_EOF: an EOF is a 0xFE packet shorter than 9 bytes, and a
    text row never starts with 0xFE unless it is 16 MiB long."""
    packets = payloads(resp)
    if not packets or packets[0][:1] in (b"\x00", b"\xff"):
        return None
    ncols, _ = read_lenenc_int(packets[0], 0)
    i = 1 + (ncols or 0)  # the column count, then its definitions
    if i < len(packets) and packets[i][:1] == b"\xfe" and len(packets[i]) < 9:
        i += 1  # the EOF after the definitions (no CLIENT_DEPRECATE_EOF)
    rows = []
    for p in packets[i:]:
        if p[:1] in (b"\xfe", b"\xff") and len(p) < 0xFFFFFF:
            break  # the terminator (or an error)
        row, pos = [], 0
        for _ in range(ncols or 0):
            if p[pos] == 0xFB:
                row.append(None)
                pos += 1
            else:
                value, pos = read_lenenc_str(p, pos)
                row.append(value)
        rows.append(row)
    return rows


def first_value(resp: bytes) -> bytes | None:
    """The first column of the first row of a text result set (the proxy's own queries)."""
    rows = text_rows(resp)
    return rows[0][0] if rows else None


def at_statement_limit(framed: bytes) -> bool:
    """A framed response that is ERROR 1461: the server is at its max_prepared_stmt_count."""
    return framed[4:5] == b"\xff" and int.from_bytes(framed[5:7], "little") == ER_MAX_PREPARED_STMT_COUNT_REACHED
