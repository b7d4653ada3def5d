"""Response-boundary scanner: finds where a backend response ends.

The proxy relays backend bytes to the client untouched; it only needs to know
where each response ends (to release the backend / read the next command) and
the final server status flags.  `Scanner` walks packet headers across
arbitrarily chunked input, keeping a few ints of state between chunks, and
copies only the few packets it must inspect (first packet of a result,
terminators, ERR) into a small buffer.

Two implementations with identical behaviour:

* ``CScanner`` from the ``_scan`` C extension (the hot path; 30-80x faster),
* ``PyScanner`` below, the reference and fallback when no compiler was around.

``Scanner`` is the C one when importable, unless ``RWPROXY_PURE_PYTHON=1``.

Protocol facts this relies on (checked against MariaDB 10.11 captures):

* a row never starts with 0xFF, and a text row starting with 0xFE holds a
  value >= 16 MiB, so its first physical packet is exactly 0xFFFFFF long;
  hence in the rows state "0xFE and physical length < limit" or "0xFF" is a
  terminator (limit 9 for EOF, 0xFFFFFF for the deprecate-EOF OK packet);
* with CLIENT_DEPRECATE_EOF MariaDB sends no EOF after column definitions
  (COM_QUERY, COM_STMT_EXECUTE, COM_STMT_PREPARE params and columns), ends
  rows, COM_FIELD_LIST and COM_SET_OPTION with an OK packet whose header is
  0xFE (>= 7 bytes), and a cursor-opening COM_STMT_EXECUTE ends with such an
  OK carrying SERVER_STATUS_CURSOR_EXISTS right after the column definitions;
* CURSOR_EXISTS also appears in the EOF packets of ordinary results while a
  stored program has a cursor open (FOR ... DO SELECT ...; END FOR, a CALL):
  only a result of kind CURSOR (an execute that asked for one) ends there.
  So with deprecate_eof every 0xFE packet of length >= 7 is parsed as an OK
  packet, otherwise as an EOF packet (warnings u16, status u16).

Not supported: optional result-set metadata (MariaDB's
MARIADB_CLIENT_CACHE_METADATA, MySQL's CLIENT_OPTIONAL_RESULTSET_METADATA);
the proxy must not negotiate them with backends.

After a LOCAL INFILE request (``local_infile``) the backend's reply to the
relayed file is an OK/ERR; ``start(RESULT)`` handles it like ``start(SIMPLE)``
and also follows SERVER_MORE_RESULTS_EXISTS when it was a multi-statement.
"""

from __future__ import annotations

import os

from proxy.protocol.packets import parse_eof, parse_ok

__all__ = [
    "RESULT", "PREPARE", "FIELD_LIST", "SIMPLE", "STATISTICS", "ROWS", "CURSOR",
    "SERVER_MORE_RESULTS_EXISTS", "SERVER_STATUS_CURSOR_EXISTS",
    "Scanner", "PyScanner", "CScanner",
]

# Response kinds (what the command being answered was).
# CURSOR: a COM_STMT_EXECUTE that asked for a cursor (its result ends after the column
# definitions when the server opened one); every other result, RESULT, goes on past an EOF
# carrying CURSOR_EXISTS, which a stored program's open cursor (FOR ... DO) sets too.
RESULT, PREPARE, FIELD_LIST, SIMPLE, STATISTICS, ROWS, CURSOR = range(7)

SERVER_MORE_RESULTS_EXISTS = 0x0008
SERVER_STATUS_CURSOR_EXISTS = 0x0040

_MAX = 0xFFFFFF

# Internal states: the meaning of the next logical packet.  Numbering is
# shared with _scan.c (keep in sync).
(_FIRST, _COLS, _COLS_EOF, _ROWS, _PREP_FIRST, _PREP_PARAMS, _PREP_PARAMS_EOF,
 _PREP_COLS, _PREP_COLS_EOF, _FIELDS, _SIMPLE, _STAT, _DONE) = range(13)

# Byte-walking modes inside the current physical packet.
_M_HDR, _M_FIRST, _M_SKIP, _M_COLLECT = range(4)

_START_STATE = {
    RESULT: _FIRST, PREPARE: _PREP_FIRST, FIELD_LIST: _FIELDS,
    SIMPLE: _SIMPLE, STATISTICS: _STAT, ROWS: _ROWS, CURSOR: _FIRST,
}


class PyScanner:
    """Pure-Python response scanner; the reference for the C version.

    After feed() returned >= 0: ``status`` and ``warnings`` (of the last
    OK/EOF of the response, kept on ERR), ``error``, ``final`` (payload of the last
    OK/EOF/ERR; the prepare OK with deprecate_eof; the string for
    STATISTICS), ``local_infile`` (and ``infile_seq``, the request's sequence id: the client's
    file packets are numbered on from it), ``packets`` (logical packets), ``rows`` (rows of the
    result sets: the digests' rows sent) and, for
    PREPARE, ``stmt_id``/``num_params``/``num_columns``.  feed() before the
    first start() or after completion consumes nothing and returns 0.
    """

    __slots__ = (
        "deprecate_eof", "status", "warnings", "error", "final", "local_infile", "infile_seq", "packets", "rows",
        "stmt_id", "num_params", "num_columns",
        "_kind", "_state", "_mode", "_hdr", "_seq", "_need", "_plen", "_full",
        "_collect", "_buf", "_count", "_rows_lim",
    )

    def __init__(self, deprecate_eof: bool):
        self.deprecate_eof = bool(deprecate_eof)
        # Without deprecate_eof a rows terminator is an EOF (< 9 bytes); with
        # it an OK packet that is not the head of a >= 16 MiB row.
        self._rows_lim = _MAX if self.deprecate_eof else 9
        self._buf = bytearray()
        self._reset(SIMPLE)
        self._state = _DONE  # feed() before start() consumes nothing

    def _reset(self, kind: int) -> None:
        self._kind = kind
        self._state = _START_STATE[kind]
        self._mode = _M_HDR
        self._hdr = b""
        self._seq = 0
        self._need = 0
        self._plen = 0
        self._full = False
        self._collect = False
        self._buf.clear()
        self._count = 0
        self.status = 0
        self.warnings = 0
        self.error = False
        self.final = b""
        self.local_infile = False
        self.infile_seq = 0
        self.packets = 0
        self.rows = 0
        self.stmt_id = 0
        self.num_params = 0
        self.num_columns = 0

    def start(self, kind: int) -> None:
        if kind not in _START_STATE:
            raise ValueError(f"unknown response kind {kind!r}")
        self._reset(kind)

    # -- packet classification ------------------------------------------------

    def _classify(self, first: int) -> None:
        """Decide whether the logical packet starting with `first` (-1: empty)
        must be buffered for inspection or can just be skipped."""
        st = self._state
        if st == _ROWS:
            collect = first == 0xFF or (first == 0xFE and self._plen < self._rows_lim)
        elif st == _FIELDS:
            collect = first == 0xFF or (first == 0xFE and self._plen < _MAX)
        else:
            collect = st != _COLS and st != _PREP_PARAMS and st != _PREP_COLS
        self._collect = collect
        if collect:
            self._buf.clear()
            self._mode = _M_COLLECT
        else:
            self._mode = _M_SKIP

    def _ok_status(self, p) -> int:
        ok = parse_ok(p)
        self.warnings = ok.warnings
        return ok.status

    def _fe_status(self, p) -> int:
        if self.deprecate_eof and len(p) >= 7:
            return self._ok_status(p)
        status, warnings = parse_eof(p)
        if len(p) >= 5:
            self.warnings = warnings
        return status

    def _end_logical(self) -> bool:
        """A logical packet is complete; advance the grammar.  True = done."""
        st = self._state
        dep = self.deprecate_eof
        if not self._collect:
            if st == _ROWS:
                self.rows += 1
                return False
            if st == _COLS or st == _PREP_PARAMS or st == _PREP_COLS:
                self._count -= 1
                if self._count > 0:
                    return False
                if st == _COLS:
                    self._state = _ROWS if dep else _COLS_EOF
                    return False
                if st == _PREP_PARAMS:
                    if dep:
                        return self._prep_columns()
                    self._state = _PREP_PARAMS_EOF
                    return False
                if dep:
                    return self._done()
                self._state = _PREP_COLS_EOF
            return False  # a row or field definition

        p = self._buf
        first = p[0] if p else -1
        if first == 0xFF and st != _STAT:
            self.error = True
            return self._done()
        if st == _ROWS or st == _FIELDS:
            status = self.status = self._fe_status(p)
            if (st == _ROWS and self._kind != ROWS
                    and status & SERVER_MORE_RESULTS_EXISTS):
                self._state = _FIRST
                return False
            return self._done()
        if st == _FIRST:
            if first == 0x00 or first == 0xFE:
                status = self.status = self._ok_status(p) if first == 0 else self._fe_status(p)
                if status & SERVER_MORE_RESULTS_EXISTS:
                    return False  # another result follows: stay in _FIRST
                return self._done()
            if first == 0xFB:
                self.local_infile = True
                self.infile_seq = self._seq
                return self._done()
            if first == -1:
                return self._done()
            if first == 0xFC:
                count = int.from_bytes(p[1:3], "little")
            elif first == 0xFD:
                count = int.from_bytes(p[1:4], "little")
            else:
                count = first
            if count:
                self._count = count
                self._state = _COLS
            else:
                self._state = _ROWS if dep else _COLS_EOF
            return False
        if st == _COLS_EOF:
            status = self.status = self._fe_status(p)
            if status & SERVER_STATUS_CURSOR_EXISTS and self._kind == CURSOR:
                return self._done()  # cursor opened: rows come via COM_STMT_FETCH
            self._state = _ROWS
            return False
        if st == _PREP_FIRST:
            if len(p) >= 9:
                self.stmt_id = int.from_bytes(p[1:5], "little")
                self.num_columns = p[5] | p[6] << 8
                self.num_params = p[7] | p[8] << 8
            if self.num_params:
                self._count = self.num_params
                self._state = _PREP_PARAMS
                return False
            return self._prep_columns()
        if st == _PREP_PARAMS_EOF:
            self.status = self._fe_status(p)
            return self._prep_columns()
        if st == _PREP_COLS_EOF:
            self.status = self._fe_status(p)
            return self._done()
        if st == _SIMPLE:
            if first == 0x00:
                self.status = self._ok_status(p)
            elif first == 0xFE:
                self.status = self._fe_status(p)
            return self._done()
        # _STAT: a plain string; 0xFF can only mean an ERR
        self.error = first == 0xFF
        return self._done()

    def _prep_columns(self) -> bool:
        if self.num_columns:
            self._count = self.num_columns
            self._state = _PREP_COLS
            return False
        return self._done()

    def _done(self) -> bool:
        # The buffer holds the last OK/EOF/ERR-class packet: only definitions
        # (never collected) can follow it, e.g. after a deprecate-EOF prepare OK.
        self.final = bytes(self._buf)
        self._state = _DONE
        return True

    # -- byte walking -----------------------------------------------------------

    def feed(self, data) -> int:
        """Consume a chunk.  -1: response incomplete; else the number of bytes
        of `data` that belonged to the response (the rest is not ours)."""
        state = self._state
        if state == _DONE:
            return 0
        n = len(data)
        pos = 0
        mode = self._mode
        while True:
            if mode == _M_HDR:
                if self._hdr:
                    h = self._hdr
                    take = 4 - len(h)
                    h += bytes(data[pos:pos + take])
                    if len(h) < 4:
                        self._hdr = h
                        return -1
                    pos += take
                    self._hdr = b""
                    plen = h[0] | h[1] << 8 | h[2] << 16
                    self._seq = h[3]
                else:
                    if not self._full:
                        if state == _ROWS:
                            # Hot loop: skip whole rows inside this chunk.
                            # Anything unusual (0xFE/0xFF head, empty or split
                            # packet, packet crossing the chunk end) falls
                            # through to the general path below.
                            packets = self.packets
                            while pos + 4 < n:
                                plen = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16
                                end = pos + 4 + plen
                                if end > n or plen == 0 or plen == 0xFFFFFF or data[pos + 4] >= 0xFE:
                                    break
                                pos = end
                                packets += 1
                            self.rows += packets - self.packets
                            self.packets = packets
                        elif state == _COLS or state == _PREP_PARAMS or state == _PREP_COLS:
                            # Definitions: skip all but the last one (whose
                            # end changes state) without bookkeeping.
                            count = self._count
                            skipped = count
                            while count > 1 and pos + 4 <= n:
                                plen = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16
                                end = pos + 4 + plen
                                if end > n or plen == 0xFFFFFF:
                                    break
                                pos = end
                                count -= 1
                            self.packets += skipped - count
                            self._count = count
                    if n - pos < 4:
                        if pos < n:
                            self._hdr = bytes(data[pos:n])
                        return -1
                    plen = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16
                    self._seq = data[pos + 3]
                    pos += 4
                cont = self._full
                self._full = plen == _MAX
                self._need = plen
                if cont:
                    mode = _M_COLLECT if self._collect else _M_SKIP
                else:
                    self.packets += 1
                    self._plen = plen
                    if not plen:
                        self._classify(-1)
                    elif pos < n:
                        self._classify(data[pos])
                    else:
                        self._mode = _M_FIRST
                        return -1
                    mode = self._mode
            elif mode == _M_FIRST:
                if pos >= n:
                    return -1
                self._classify(data[pos])
                mode = self._mode
            need = self._need
            avail = n - pos
            if avail < need:
                if mode == _M_COLLECT:
                    self._buf += data[pos:n]
                self._need = need - avail
                self._mode = mode
                return -1
            if mode == _M_COLLECT:
                self._buf += data[pos:pos + need]
            pos += need
            self._need = 0
            mode = self._mode = _M_HDR
            if not self._full:
                if self._end_logical():
                    return pos
                state = self._state


try:
    from proxy.protocol._scan import Scanner as CScanner
except ImportError:  # not built (no compiler at install time)
    CScanner = None

# CScanner stays importable under RWPROXY_PURE_PYTHON=1 so tests can still
# compare both; only the default choice changes.
if CScanner is not None and os.environ.get("RWPROXY_PURE_PYTHON") != "1":
    Scanner = CScanner
else:
    Scanner = PyScanner
