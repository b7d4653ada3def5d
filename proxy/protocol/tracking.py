"""Session tracking (CLIENT_SESSION_TRACK): the GTID of a write from its own OK packet.

Why: read-your-writes in `gtid` mode needs the GTID each write produced. Asking the primary
`SELECT @@last_gtid` after every write costs a round trip per write; MariaDB can instead put
`last_gtid` into the OK packet itself when it is a tracked system variable
(`session_track_system_variables`), which is how MaxScale's causal reads learn it too.

Two cases, decided per session and writer connection (frontend/idle.py restore_writer):

- the client negotiated session tracking: its connection to the writer does too (it is a
  session-shaping capability); `last_gtid` is added to the variables it already tracks, and the
  client sees one more tracked variable, which the protocol allows;
- it did not: the writer connection negotiates tracking anyway and tracks `last_gtid` alone
  (schema, state-change and transaction tracking off), so only OK packets of statements that
  produced a GTID carry session state, and `strip_state` takes that block out of the final OK
  packet before the client sees it (BackendConnection holds back the response's last bytes).
"""

from __future__ import annotations

from proxy.protocol.constants import SERVER_SESSION_STATE_CHANGED
from proxy.protocol.packets import lenenc_str, read_lenenc_int, read_lenenc_str

SESSION_TRACK_SYSTEM_VARIABLES = 0x00
HOLD = 1024  # bytes of a response held back so that its final OK packet can be rewritten

# Statements sent to a writer connection before the session's history is replayed.
TRACK_ALSO = (b"SET SESSION session_track_system_variables = "
              b"CONCAT_WS(',', NULLIF(@@session_track_system_variables, ''), 'last_gtid')")
TRACK_ONLY = (b"SET SESSION session_track_system_variables = 'last_gtid', session_track_schema = OFF, "
              b"session_track_state_change = OFF, session_track_transaction_info = OFF")


def _ok_fields(payload: bytes):
    """(offset of the status flags, status) of an OK payload (0x00, or 0xFE with deprecate_eof)."""
    _, pos = read_lenenc_int(payload, 1)
    _, pos = read_lenenc_int(payload, pos)
    return pos, payload[pos] | payload[pos + 1] << 8


def last_gtid(final: bytes) -> str:
    """The `last_gtid` an OK payload's session state reports ("" when it has none)."""
    if not final or final[0] not in (0x00, 0xFE) or len(final) < 7:
        return ""
    try:
        pos, status = _ok_fields(final)
        if not status & SERVER_SESSION_STATE_CHANGED:
            return ""
        pos += 4
        _info, pos = read_lenenc_str(final, pos)
        state, _ = read_lenenc_str(final, pos)
        i, found = 0, ""
        while i < len(state):
            kind = state[i]
            data, i = read_lenenc_str(state, i + 1)
            if kind == SESSION_TRACK_SYSTEM_VARIABLES:
                name, p = read_lenenc_str(data, 0)
                if bytes(name).lower() == b"last_gtid":
                    value, _ = read_lenenc_str(data, p)
                    found = bytes(value).decode("ascii", "replace")
        return found
    except (IndexError, ValueError, TypeError):
        return ""


def strip_state(payload: bytes) -> bytes:
    """The OK payload a client without session tracking expects: the status flag cleared, the
    info kept (length-encoded, as servers send it, when not empty), the session state gone."""
    pos, status = _ok_fields(payload)
    if not status & SERVER_SESSION_STATE_CHANGED:
        return payload
    status &= ~SERVER_SESSION_STATE_CHANGED
    head = bytes(payload[:pos]) + bytes((status & 0xFF, status >> 8)) + bytes(payload[pos + 2:pos + 4])
    info, _ = read_lenenc_str(payload, pos + 4)
    return head + lenenc_str(bytes(info)) if info else head


def rewrite_tail(out: bytes, final: bytes) -> bytes:
    """`out` ends with the response's final packet, whose payload is `final`: strip its session
    state if it is an OK that carries one (other packets are untouched)."""
    n = len(final)
    if (n < 7 or final[0] not in (0x00, 0xFE) or len(out) < n + 4 or n >= 0xFFFFFF
            or out[-n - 4:-n - 1] != n.to_bytes(3, "little") or out[-n:] != final):
        return out
    pos, status = _ok_fields(final)
    if not status & SERVER_SESSION_STATE_CHANGED:
        return out
    new = strip_state(final)
    return out[:-n - 4] + len(new).to_bytes(3, "little") + out[-n - 1:-n] + new
