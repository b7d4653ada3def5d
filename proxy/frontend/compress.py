"""The compressed client protocol (CLIENT_COMPRESS) as a thin layer over the client's transport.

A client that asks for compression (`mariadb --compress`, mysqlclient `compress=1`,
Connector/Python `compress=True`) frames everything after the login's OK in compressed packets:
a 7-byte header (compressed length, compressed sequence id, uncompressed length, 0 meaning the
payload is stored as is) around a zlib stream of ordinary MySQL packets. The server side is
served only here: the session reads and writes plain packets, the backends never compress, and
a session without compression never touches this module.

Sequence ids: a compressed packet from the server carries the next id after the last one the
client sent (the client starts each command at 0), counting up per packet, as MariaDB's
net_serv does. Inside compressed packets a server does not check the plain packets' own ids,
and clients rely on it (Connector/J numbers a command's packet 1 when it goes uncompressed
and the file of LOAD DATA LOCAL from 0), but rwproxy's server connections are plain: the ids
are set here to what a plain client sends (0 for a command, one more for the packets that
continue it, and the file's packets after the server's request). Framing: a packet the session writes is never cut except where it is longer
than one compressed packet can hold, because Connector/Python reassembles a packet from at
most two compressed ones (as the server writes them); a partial packet waits for its rest.
"""

from __future__ import annotations

import zlib

from proxy.protocol.constants import ER_NET_UNCOMPRESS_ERROR
from proxy.protocol.packets import err_packet

MIN_COMPRESS = 50  # shorter payloads go uncompressed (as MySQL and its clients do)
# zlib level. On a 62 KB, 1,000-row result: level 1 took 410 µs and gave 10,295 bytes, 3 (ProxySQL's
# default) 577 µs and 10,226, 6 (the server's) 1,492 µs and 10,147. Level 1 costs least for the same.
LEVEL = 1
MAX_FRAME = 0xFFFFFF  # the largest uncompressed length a 3-byte header can state


class CompressionError(ValueError):
    """A compressed packet that cannot be read: the client is answered and closed."""


class CompressionLayer:
    """Looks like a transport to the session (write, close, pause/resume) and turns the
    client's compressed packets into plain bytes for it (feed)."""

    __slots__ = ("inner", "tls", "seq", "_in", "_out", "closed", "_hdr", "_left", "_next", "_file", "_cont",
                 "_last_out")

    def __init__(self, inner, tls=None):
        self.inner = inner  # what compressed packets are written to: the raw transport or the TLSLayer
        self.tls = tls  # the TLSLayer that turns socket bytes into the compressed stream, if any
        self.seq = 0  # compressed sequence id of the next packet written
        self._in = bytearray()  # received bytes not yet a whole compressed packet
        self._out = bytearray()  # written bytes after the last whole MySQL packet
        self.closed = False
        # plain packets coming out of feed(), to number them: the header bytes seen of the next one,
        # payload bytes left of the current one, the id the next one gets unless it starts a
        # command (-1: it does), and whether the packets are a LOAD DATA LOCAL file
        self._hdr = b""
        self._left = 0
        self._next = -1
        self._file = False
        self._cont = False  # the last packet was a 16 MiB one: the next continues it
        self._last_out = 0  # id of the last whole plain packet written to the client

    def file_follows(self) -> None:
        """The packet just written asked for a LOAD DATA LOCAL file: the client's file packets
        are numbered on from it until the empty one that ends the file."""
        self._next, self._file = (self._last_out + 1) & 0xFF, True

    # ---- bytes in --------------------------------------------------------------------
    def feed(self, data) -> bytes:
        """Socket bytes in, plain packet bytes out (b"" while a compressed packet is incomplete)."""
        if self.tls is not None:
            data = self.tls.feed(data)
        buf = self._in
        buf += data
        out = []
        pos, n = 0, len(buf)
        while n - pos >= 7:
            clen = buf[pos] | buf[pos + 1] << 8 | buf[pos + 2] << 16
            end = pos + 7 + clen
            if end > n:
                break
            ulen = buf[pos + 4] | buf[pos + 5] << 8 | buf[pos + 6] << 16
            body = bytes(buf[pos + 7 : end])
            if ulen:
                body = self._inflate(body, ulen)
            out.append(body)
            self.seq = (buf[pos + 3] + 1) & 0xFF
            pos = end
        if pos:
            del buf[:pos]
        return self._number(out[0] if len(out) == 1 else b"".join(out))

    def _number(self, plain: bytes) -> bytes:
        """Give the plain packets in `plain` (a stream: packets may span calls) the ids a plain
        client would: 0 for a command's first, one more for each that continues it (after a
        16 MiB packet) or belongs to the file of LOAD DATA LOCAL."""
        i, n = self._left, len(plain)
        if i >= n:
            self._left = i - n
            return plain
        out = bytearray(plain)
        hdr = self._hdr
        while i < n:
            take = min(4 - len(hdr), n - i)
            hdr += plain[i : i + take]
            i += take
            if len(hdr) < 4:
                break
            length = hdr[0] | hdr[1] << 8 | hdr[2] << 16
            seq = 0 if self._next < 0 else self._next
            out[i - 1] = seq  # (the header's last byte is in this call's bytes: it was just read)
            continued, self._cont = self._cont, length == 0xFFFFFF
            if self._file and length == 0 and not continued:  # the empty packet: the file is over
                self._next, self._file = -1, False
            elif self._file or self._cont:  # a file packet, or a 16 MiB one that goes on in the next
                self._next = (seq + 1) & 0xFF
            else:
                self._next = -1
            hdr = b""
            i += length
        self._left = i - n if i > n else 0
        self._hdr = hdr
        return bytes(out)

    def _inflate(self, body: bytes, ulen: int) -> bytes:
        d = zlib.decompressobj()
        try:
            plain = d.decompress(body, ulen)  # (bounded: a header cannot state more than 16 MiB)
        except zlib.error as e:
            plain, why = b"", f"bad zlib data ({e})"
        else:
            why = "" if d.eof and len(plain) == ulen and not d.unconsumed_tail else "wrong uncompressed length"
        if why:
            self.write(err_packet(1, ER_NET_UNCOMPRESS_ERROR, "Couldn't uncompress communication packet"))
            raise CompressionError(f"compressed packet refused: {why}")
        return plain

    # ---- bytes out ---------------------------------------------------------------------
    def write(self, data) -> None:
        if self.closed:
            return
        buf = self._out
        buf += data
        pos, n = 0, len(buf)
        while n - pos >= 4:  # up to the end of the last whole packet
            end = pos + 4 + (buf[pos] | buf[pos + 1] << 8 | buf[pos + 2] << 16)
            if end > n:
                break
            self._last_out = buf[pos + 3]
            pos = end
        if pos == 0 and n > MAX_FRAME:
            pos = MAX_FRAME  # a packet longer than one compressed packet: its first part goes now
        if pos:
            self._send(buf, pos)
            del buf[:pos]

    def _send(self, buf, length: int) -> None:
        frames = []
        for start in range(0, length, MAX_FRAME):
            chunk = bytes(buf[start : min(start + MAX_FRAME, length)])
            ulen = len(chunk)
            if ulen >= MIN_COMPRESS:
                packed = zlib.compress(chunk, LEVEL)
                if len(packed) < ulen:
                    chunk = packed
                else:
                    ulen = 0  # incompressible: stored
            else:
                ulen = 0
            clen = len(chunk)
            frames.append(bytes((clen & 0xFF, clen >> 8 & 0xFF, clen >> 16, self.seq,
                                 ulen & 0xFF, ulen >> 8 & 0xFF, ulen >> 16)))
            frames.append(chunk)
            self.seq = (self.seq + 1) & 0xFF
        self.inner.write(b"".join(frames))

    # ---- the rest of the transport interface the session uses once logged in ---------------
    def close(self) -> None:
        self.closed = True
        self.inner.close()

    def can_write_eof(self) -> bool:
        return self.inner.can_write_eof()

    def write_eof(self) -> None:
        self.inner.write_eof()

    def pause_reading(self) -> None:
        self.inner.pause_reading()

    def resume_reading(self) -> None:
        self.inner.resume_reading()
