"""Reading a client's byte stream (mixed into ClientConnection): logical packets (split ones
joined), the max_allowed_packet bound with backpressure for pipelined commands, the lingering
close after a refused packet, and the LOCAL INFILE stream passed to its backend."""

from __future__ import annotations

import asyncio
import logging

from proxy.protocol.constants import ER_NET_PACKET_TOO_LARGE, MAX_PACKET
from proxy.protocol.packets import err_packet, logical_payload as _payload
from proxy.protocol.scan import RESULT

log = logging.getLogger("rwproxy.client")

_HANDSHAKE, _COMMAND, _CLOSING = 0, 1, 2  # ClientConnection.phase
PRE_AUTH_LIMIT = 1 << 20  # before login nobody needs more (a handshake response is < 64 KiB)
_LINGER = 2.0  # seconds a refused client may go on sending before the connection is closed


class ClientPackets:
    def _over_limit(self) -> bool:
        """More buffered than one packet may hold. A packet over the limit is refused as the
        server refuses it (1153, connection closed); pipelined commands waiting behind a busy
        one stop the reading until they are worked off, so memory stays bounded either way."""
        buf = self.buf
        if self.closed:  # lingering after a refused packet: drop what the client still sends
            self.buf = b""
            return True
        size, pos, complete = 0, 0, False
        while len(buf) >= pos + 4:  # the first logical packet's declared size, split parts added up
            n = buf[pos] | (buf[pos + 1] << 8) | (buf[pos + 2] << 16)
            size += n
            pos += 4 + n
            if n < MAX_PACKET:
                complete = pos <= len(buf)
                break
        if size > self.packet_limit and not self.busy:  # (if busy, refused once the response is out)
            log.info("client %s: packet of %d bytes or more is over max_allowed_packet (%d); closing",
                     self.host, size, self.packet_limit)
            self.write(err_packet(buf[3] + 1 if self.phase == _COMMAND else 2, ER_NET_PACKET_TOO_LARGE,
                                  "Got a packet bigger than 'max_allowed_packet' bytes"))
            self.buf = b""
            self._linger_close()
            return True
        if (complete or size > self.packet_limit) and not self._read_paused:  # (one still arriving must be let in)
            self._read_paused = True
            self.transport.pause_reading()
        return False

    def _linger_close(self):
        """Close while the client is still sending: closing at once would answer its data with a
        reset that can destroy the error packet before the client reads it. So: send the error
        and a FIN, read and drop what still comes for a moment, then close."""
        self.closed = True
        self.phase = _CLOSING
        self.packet_limit = -1  # every later chunk goes to _over_limit, which drops it
        if self._read_paused:
            self._read_paused = False
            self.transport.resume_reading()
        if self.tls_layer is None and self.transport.can_write_eof():
            self.transport.write_eof()
        self.worker.loop.call_later(_LINGER, self.transport.close)

    # ---- packets ------------------------------------------------------------------
    def _take_packet(self):
        """Pop one logical packet (raw, headers included) from the buffer, or None."""
        buf = self.buf
        blen = len(buf)
        if blen < 4:
            return None
        n = buf[0] | (buf[1] << 8) | (buf[2] << 16)
        end = 4 + n
        if n == MAX_PACKET:
            end = 0
            while True:  # split packet: up to the physical packet shorter than 16 MiB - 1
                if blen < end + 4:
                    return None
                m = buf[end] | (buf[end + 1] << 8) | (buf[end + 2] << 16)
                end += 4 + m
                if m < MAX_PACKET:
                    break
        if blen < end:
            return None
        if end == blen:
            self.buf = b""
            return buf if type(buf) is bytes else bytes(buf)
        pkt = bytes(buf[:end])
        self.buf = buf[end:]
        return pkt

    def _deliver_packet(self):
        pkt = self._take_packet()
        if pkt is not None:
            w, self._pkt_waiter = self._pkt_waiter, None
            if not w.done():
                w.set_result(pkt)

    async def read_packet(self, timeout: float = 30.0) -> tuple[int, bytes]:
        """(seq, payload) of the next client packet (slow paths only)."""
        pkt = self._take_packet()
        if pkt is None:
            if self.closed:
                raise ConnectionError("client closed the connection")
            self._pkt_waiter = self.worker.loop.create_future()
            pkt = await asyncio.wait_for(self._pkt_waiter, timeout)
        return pkt[3], _payload(pkt)

    # ---- LOAD DATA LOCAL INFILE ---------------------------------------------------------
    def _infile_feed(self, data):
        """Forward the client's file packets until the empty packet that ends them."""
        be = self.infile_backend
        be.transport.write(data)
        i, n, hdr = self._if_skip, len(data), self._if_hdr
        while i < n:
            need = 4 - len(hdr)
            hdr += data[i : i + need]
            i += need
            if len(hdr) < 4:
                break
            ln = hdr[0] | (hdr[1] << 8) | (hdr[2] << 16)
            hdr = b""
            if ln == 0 and self._if_prev != MAX_PACKET:
                self.infile_backend = None
                be.expect(RESULT, self)
                return
            self._if_prev = ln
            i += ln
        self._if_skip = i - n if i > n else 0
        self._if_hdr = hdr
