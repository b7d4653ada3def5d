"""Logging: the format every process uses, and what keeps client-supplied text harmless in it.

A client chooses its user name, database name and statement text. Written raw, a user name
with a newline forges a whole log line (a fake failover message), and a 1 MB name writes 1 MB
per failed login. So every client-supplied string goes through clean() (control characters
escaped, length capped), and repeated failed-login lines go through a Throttle (a few per
second, then one line counting those left out).
"""

from __future__ import annotations

import logging
import sys
import time

MAX_SHOWN = 128  # characters of a client-supplied string shown in a log line

_ESCAPES = {i: f"\\x{i:02x}" for i in range(0x20)} | {0x7F: "\\x7f", ord("\\"): "\\\\"}
_ESCAPES.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})


def clean(text, limit: int = MAX_SHOWN) -> str:
    """`text` (str or bytes) safe for one log line: control characters escaped, at most `limit`
    characters, and how many were left out."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text[: limit * 4]).decode("utf-8", "replace")
    else:
        text = str(text)
    extra = len(text) - limit
    shown = text[:limit].translate(_ESCAPES)
    # other non-printable characters (U+2028 line separator and friends) as escapes too
    shown = "".join(ch if ch.isprintable() or ch == " " else ascii(ch)[1:-1] for ch in shown)
    return shown + (f"...({extra} more characters)" if extra > 0 else "")


class Throttle:
    """At most `per_second` lines of one kind per second; then one line saying how many were left out."""

    def __init__(self, logger: logging.Logger, per_second: int = 5):
        self.log = logger
        self.per_second = per_second
        self.window = 0.0
        self.count = 0
        self.suppressed = 0

    def info(self, msg: str, *args) -> None:
        now = time.monotonic()
        if now - self.window >= 1.0:
            self.flush()
            self.window, self.count = now, 0
        if self.count < self.per_second:
            self.count += 1
            self.log.info(msg, *args)
        else:
            self.suppressed += 1

    def flush(self) -> None:
        """Say how many lines were left out (called as a new second starts, and by a timer)."""
        if self.suppressed:
            self.log.info("... %d more lines like the one before were left out", self.suppressed)
            self.suppressed = 0


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s rwproxy[%(process)d] %(name)s: %(message)s",
        stream=sys.stderr,
    )
