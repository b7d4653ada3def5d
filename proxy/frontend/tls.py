"""Front-end TLS as a thin layer over the client's raw transport (ssl.MemoryBIO).

Why not loop.start_tls: a MySQL client sends its SSL request and its TLS
ClientHello back to back, so the ClientHello often arrives in the same read as
the SSL request, before start_tls could take over the socket, and would be
lost. Owning the MemoryBIO lets the session hand those bytes to TLS.

The layer looks like a transport to the session (write, close, pause/resume)
and turns ciphertext read from the socket into plaintext for the session.
"""

from __future__ import annotations

import ssl


class TLSLayer:
    __slots__ = ("raw", "_in", "_out", "_obj", "handshaking", "closed")

    def __init__(self, raw_transport, context: ssl.SSLContext):
        self.raw = raw_transport
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._in, self._out, server_side=True)
        self.handshaking = True
        self.closed = False

    def feed(self, data: bytes) -> bytes:
        """Ciphertext in, plaintext out (b"" while handshaking or incomplete). Raises ssl.SSLError."""
        self._in.write(data)
        if self.handshaking:
            try:
                self._obj.do_handshake()
                self.handshaking = False
            except ssl.SSLWantReadError:
                self._flush()
                return b""
            self._flush()
        chunks = []
        while True:
            try:
                chunk = self._obj.read(262144)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # the client sent close_notify
                self.close()
                break
            if not chunk:
                break
            chunks.append(chunk)
        self._flush()  # TLS 1.3 may answer post-handshake messages
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def file_follows(self) -> None:
        """(LOAD DATA LOCAL: plain packets keep the client's own ids; compress.py renumbers.)"""

    def _flush(self) -> None:
        out = self._out.read()
        if out and not self.closed:
            self.raw.write(out)

    # ---- transport interface used by the session ---------------------------------
    def write(self, data) -> None:
        if self.closed:
            return
        self._obj.write(data)
        self._flush()

    def close(self) -> None:
        if not self.closed:
            try:
                self._obj.unwrap()
            except (ssl.SSLError, ValueError):
                pass
            self._flush()
            self.closed = True
        self.raw.close()

    def is_closing(self) -> bool:
        return self.closed or self.raw.is_closing()

    def can_write_eof(self) -> bool:
        return False  # (a half-close would cut TLS's own close_notify short)

    def pause_reading(self) -> None:
        self.raw.pause_reading()

    def resume_reading(self) -> None:
        self.raw.resume_reading()

    def get_extra_info(self, name, default=None):
        if name == "ssl_object":
            return self._obj
        if name == "cipher":
            return self._obj.cipher()
        return self.raw.get_extra_info(name, default)

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        self.raw.set_write_buffer_limits(high=high, low=low)
