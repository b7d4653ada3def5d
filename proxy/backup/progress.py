"""Progress for long steps: a bar (bytes, rate, time left) on a terminal, log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("rwproxy.backup")


class Progress:
    """Call with each chunk's byte count; `close()` logs the step's size and rate."""

    def __init__(self, what: str, total: int | None = None, *, tty: bool | None = None):
        self.what, self.total, self.n, self.t0 = what, total or None, 0, time.monotonic()
        self.bar = None
        if tty if tty is not None else sys.stderr.isatty():
            from tqdm import tqdm  # a terminal only: bytes, MiB/s and time left, redrawn in place

            self.bar = tqdm(total=self.total, desc=what, unit="B", unit_scale=True, unit_divisor=1024,
                            file=sys.stderr, leave=True, dynamic_ncols=True)
        self.next_log = self.t0 + 30

    def __call__(self, n: int) -> None:
        self.n += n
        if self.bar is not None:
            if self.total and self.n > self.total:  # an estimate (table sizes) can be short: grow it
                self.bar.total = self.n
            self.bar.update(n)
        elif time.monotonic() > self.next_log:
            self.next_log = time.monotonic() + 30
            log.info("%s: %s so far (%s)", self.what, mib(self.n), rate(self.n, time.monotonic() - self.t0))

    def close(self) -> float:
        took = time.monotonic() - self.t0
        if self.bar is not None:
            self.bar.close()
        return took


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def rate(n: int, seconds: float) -> str:
    return f"{n / (1 << 20) / max(seconds, 1e-6):.1f} MiB/s"
