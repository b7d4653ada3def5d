"""Client load for tests and benchmarks: N threads running a statement in a loop through a
MySQL endpoint, recording what succeeded (with timestamps) and what failed. Bounded in time."""

from __future__ import annotations

import threading
import time
from typing import Callable

import pymysql


class Load:
    """`step(cursor, client_index, n)` runs one statement and returns what to record (or raises)."""

    def __init__(self, connect: Callable[[], pymysql.Connection], step, clients: int = 8,
                 pause: float = 0.002, max_seconds: float = 120.0):
        self.connect = connect
        self.step = step
        self.pause = pause
        self.max_seconds = max_seconds
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ok: list[tuple[float, object]] = []  # (time.monotonic(), what step returned)
        self.errors: list[tuple[float, str]] = []
        self.max_latency = 0.0
        self.done = [0] * clients  # statements each client completed (ok or error)
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i: int) -> None:
        try:
            conn = self.connect()
        except pymysql.err.MySQLError as e:
            with self.lock:
                self.errors.append((time.monotonic(), f"connect: {e}"))
            return
        n, deadline = 0, time.monotonic() + self.max_seconds
        with conn, conn.cursor() as cur:
            while not self.stop.is_set() and time.monotonic() < deadline:
                n += 1
                t0 = time.monotonic()
                try:
                    value = self.step(cur, i, n)
                except pymysql.err.MySQLError as e:
                    with self.lock:
                        self.errors.append((time.monotonic(), f"{i}/{n}: {e}"))
                        self.done[i] += 1
                    time.sleep(0.02)
                    continue
                now = time.monotonic()
                with self.lock:
                    self.ok.append((now, value))
                    self.max_latency = max(self.max_latency, now - t0)
                    self.done[i] += 1
                time.sleep(self.pause)

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(40)

    def completed(self) -> list[int]:
        with self.lock:
            return list(self.done)

    def count_since(self, t0: float) -> int:
        with self.lock:
            return sum(1 for t, _ in self.ok if t >= t0)

    def values_between(self, t0: float, t1: float) -> set:
        with self.lock:
            return {v for t, v in self.ok if t0 <= t < t1}

    def first_ok_after(self, t0: float) -> float | None:
        with self.lock:
            times = [t for t, _ in self.ok if t > t0]
        return min(times) if times else None


def select_port(cur, i, n):
    """Readers: which server answered."""
    cur.execute("SELECT @@port")
    return cur.fetchone()[0]


def insert_numbered(cur, i, n):
    """Writers: a uniquely numbered row in table `acked (w, seq)`."""
    cur.execute("INSERT INTO acked (w, seq) VALUES (%s, %s)", (i, n))
    return (i, n)
