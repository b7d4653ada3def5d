"""A client's byte stream: logical packets (split ones joined), the max_allowed_packet bound with
backpressure for pipelined commands, the lingering close after a refused packet, and the LOCAL
INFILE stream passed through to a backend.

Owned by one ClientConnection (`session`); it reads the session's transport, phase and busy
flag, and answers a refused packet through the session's public write and transport.
"""

from __future__ import annotations

import asyncio
import logging

from proxy.protocol.constants import ER_NET_PACKET_TOO_LARGE, ER_NET_PACKETS_OUT_OF_ORDER, MAX_PACKET
from proxy.protocol.packets import err_packet, logical_packet, logical_payload, packet_length
from proxy.protocol.scan import RESULT

log = logging.getLogger("rwproxy.client")

HANDSHAKE, COMMAND, CLOSING = 0, 1, 2  # ClientConnection.phase
PRE_AUTH_LIMIT = 1 << 20  # before login nobody needs more (a handshake response is < 64 KiB)
LINGER = 2.0  # seconds a refused client may go on sending before the close


class PacketReader:
    """The bytes a client sent that no command has taken yet, and the rules for taking them."""

    __slots__ = ("session", "buf", "limit", "paused", "waiter", "infile", "_if_hdr", "_if_skip", "_if_prev",
                 "_if_seq")

    def __init__(self, session):
        self.session = session  # the ClientConnection whose stream this is
        self.buf = b""  # received, not yet taken (bytes, or a bytearray while it grows)
        self.limit = PRE_AUTH_LIMIT  # largest packet accepted: max_allowed_packet once logged in
        self.paused = False  # reading from the socket is paused: a whole packet waits behind a busy command
        self.waiter: asyncio.Future | None = None  # a slow path awaiting the next packet (read_packet)
        self.infile = None  # the backend a LOAD DATA LOCAL INFILE stream is passed to, while it lasts
        self._if_hdr = b""  # LOCAL INFILE: a packet header cut by a chunk boundary
        self._if_skip = 0  # LOCAL INFILE: payload bytes of the current packet still to pass
        self._if_prev = 0  # LOCAL INFILE: length of the previous packet (0xFFFFFF: it continues)
        self._if_seq = -1  # LOCAL INFILE: the sequence id the next file packet must carry (-1: not checked)

    # ---- bytes in -----------------------------------------------------------------
    def feed(self, data) -> bool:
        """Add received bytes; False when they were refused (over the limit: the session closes)."""
        buf = self.buf
        if buf:
            if type(buf) is bytes:
                buf = self.buf = bytearray(buf)
            buf += data
        else:
            buf = self.buf = data
        if len(buf) > self.limit:
            return not self.over_limit()
        return True

    def take(self):
        """Pop one logical packet (raw, headers included), or None if none is complete."""
        buf = self.buf
        blen = len(buf)
        if blen < 4:
            return None
        n = packet_length(buf)
        end = 4 + n
        if n == MAX_PACKET:
            end = logical_packet(buf)[0]
            if end < 0:
                return None
        if blen < end:
            return None
        if end == blen:
            self.buf = b""
            return buf if type(buf) is bytes else bytes(buf)
        pkt = bytes(buf[:end])
        self.buf = buf[end:]
        return pkt

    def put_back(self, pkt: bytes) -> None:
        """A command (raw, headers included) to take next, before what the client sent after it
        (a multi-statement rwproxy rewrote: frontend/kill.py)."""
        self.buf = pkt + self.buf

    def commands_taken(self) -> None:
        """The session stopped taking commands (busy, closed or out of packets): resume reading if
        what is buffered fits the limit again, or refuse the oversized packet now at its head."""
        if self.paused and not self.session.closed:
            if len(self.buf) <= self.limit:
                self.paused = False
                self.session.transport.resume_reading()
            elif not self.session.busy:
                self.over_limit()

    def over_limit(self) -> bool:
        """More buffered than one packet may hold. A packet over the limit is refused as the
        server refuses it (1153, connection closed); pipelined commands waiting behind a busy
        one stop the reading until they are worked off, so memory stays bounded either way."""
        s = self.session
        if s.closed:  # lingering after a refused packet: drop what the client still sends
            self.buf = b""
            return True
        end, size = logical_packet(self.buf)
        if size > self.limit and not s.busy:  # (if busy, refused once the response is out)
            log.info("client %s: packet of %d bytes or more is over max_allowed_packet (%d); closing",
                     s.host, size, self.limit)
            seq = self.buf[3] + 1 if s.phase == COMMAND else 2
            s.write(err_packet(seq, ER_NET_PACKET_TOO_LARGE, "Got a packet bigger than 'max_allowed_packet' bytes"))
            self.buf = b""
            self.limit = -1  # every later chunk comes here, and is dropped
            self.linger_close()
            return True
        if (end >= 0 or size > self.limit) and not self.paused:  # (one still arriving must be let in)
            self.paused = True
            s.transport.pause_reading()
        return False

    def linger_close(self) -> None:
        """Close while the client is still sending: closing at once would answer its data with a
        reset that can destroy the error packet before the client reads it. So: send the error
        and a FIN, read and drop what still comes for a moment, then close."""
        s = self.session
        s.closed = True
        s.phase = CLOSING
        if self.paused:
            self.paused = False
            s.transport.resume_reading()
        if s.transport.can_write_eof():  # (not under TLS: a FIN would cut its close_notify)
            s.transport.write_eof()
        s.worker.loop.call_later(LINGER, s.transport.close)

    # ---- slow paths ------------------------------------------------------------------
    def deliver(self) -> None:
        """Hand the next complete packet to the slow path awaiting it."""
        pkt = self.take()
        if pkt is not None:
            w, self.waiter = self.waiter, None
            if not w.done():
                w.set_result(pkt)

    async def read_packet(self, timeout: float = 30.0) -> tuple[int, bytes]:
        """(seq, payload) of the next client packet (handshake, auth switch, COM_CHANGE_USER)."""
        pkt = self.take()
        if pkt is None:
            if self.session.closed:
                raise ConnectionError("client closed the connection")
            self.waiter = asyncio.get_running_loop().create_future()
            pkt = await asyncio.wait_for(self.waiter, timeout)
        return pkt[3], logical_payload(pkt)

    def client_gone(self) -> None:
        """The client's connection closed: a slow path awaiting a packet fails, and a LOCAL INFILE
        file cut short ends its statement (its connection, mid-statement on the server, is dropped)."""
        w = self.waiter
        if w is not None and not w.done():
            w.set_exception(ConnectionError("client closed the connection"))
        if self.infile is not None:
            self.session.command_lost(self.infile, 1)

    # ---- LOAD DATA LOCAL INFILE ---------------------------------------------------------
    def start_infile(self, backend, seq: int) -> None:
        """The server asked for the client's file in a packet numbered `seq`: pass what the
        client sends to `backend` until the empty packet that ends the file."""
        self.infile = backend
        self._if_hdr, self._if_skip, self._if_prev = b"", 0, 0
        layer = self.session.layer
        if layer is not None:
            layer.file_follows()  # (compression numbers the file's packets)
            self._if_seq = -1  # (the compressed frames carry the numbering the server checks)
        else:
            self._if_seq = (seq + 1) & 0xFF

    def infile_feed(self, data) -> None:
        """Forward the client's file packets until the empty packet that ends them.

        A packet numbered out of turn ends the session with the server's ERROR 1156, numbered
        as the server numbers it, and the statement's connection is dropped: passed on, the
        server answers it so (and hangs up), or, for the empty packet that ends the file, waits
        for another and leaves client and proxy waiting for each other."""
        be = self.infile
        if be.closed:  # the server went away (or out of step) during the file: the client, in the
            self.infile = None  # middle of sending it, cannot be read as sending commands
            return self.session.close()
        i, n, hdr, want = self._if_skip, len(data), self._if_hdr, self._if_seq
        while i < n:
            need = 4 - len(hdr)
            hdr += data[i : i + need]
            i += need
            if len(hdr) < 4:
                break
            if want >= 0:
                if hdr[3] != want:
                    return self._out_of_order(be, want)
                want = (want + 1) & 0xFF
            ln = packet_length(hdr)
            hdr = b""
            if ln == 0 and self._if_prev != MAX_PACKET:
                be.transport.write(data)
                self.infile = None
                be.expect(RESULT, self.session)
                return
            self._if_prev = ln
            i += ln
        be.transport.write(data)
        self._if_skip = i - n if i > n else 0
        self._if_hdr = hdr
        self._if_seq = want

    def _out_of_order(self, be, seq: int) -> None:
        self.refuse_out_of_order(seq)
        self.session.command_lost(be, 1)  # (closed now: the statement's bookkeeping, and its connection dropped)

    def refuse_out_of_order(self, seq: int) -> None:
        """A packet numbered out of turn: the server's ERROR 1156 (numbered `seq`), then the close
        the server makes (lingering: the client may still be sending)."""
        self.session.send_error(*ER_NET_PACKETS_OUT_OF_ORDER, "Got packets out of order", seq)
        self.buf = b""
        self.linger_close()
