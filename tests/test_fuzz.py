"""Malformed input from clients, seeded and bounded: every command- and handshake-phase packet
gets a proper answer (an error packet, a result, or a closed connection), never a hang, an
internal error or a traceback, and the proxy keeps serving everyone else.
RWPROXY_FUZZ_SEED=N tries other cases."""

from __future__ import annotations

import os
import random
import socket
import struct

from proxy.protocol import auth
from proxy.protocol.constants import PROXY_CAPABILITIES
from proxy.protocol.handshake import build_response, parse_greeting
from proxy.protocol.packets import frame
from proxy.testing.rawclient import RawClient

from helpers import start_proxy

NO_REPLY = {0x01, 0x18, 0x19}  # COM_QUIT, COM_STMT_SEND_LONG_DATA, COM_STMT_CLOSE
STATEMENTS = ["SELECT ? + 1", "SELECT a, b FROM fz WHERE a = ? AND b = ?", "INSERT INTO fz VALUES (?, ?)"]
QUERIES = [b"SELECT 1", b"SELECT \xff\xfe", b"", b"\x00", b"SELECT * FROM fz; SELECT", b"KILL 0", b"KILL 4294967296",
           b"KILL QUERY -1", b"SET NAMES \xff", b"/*", b"SELECT 1 -- \x00", b"USE `", b"PREPARE s FROM 'SELECT 1'",
           b"EXECUTE s", b"DEALLOCATE PREPARE s", b"BEGIN; COMMIT", b"LOAD DATA LOCAL INFILE 'x' INTO TABLE fz"]


def _reply(sock: socket.socket, timeout: float) -> bytes | None:
    """The first bytes of the answer, b"" if the proxy closed the connection, None if none came."""
    sock.settimeout(timeout)
    try:
        return sock.recv(65536)
    except socket.timeout:
        return None
    except OSError:
        return b""


def _command(rng: random.Random) -> bytes:
    k = rng.random()
    if k < 0.35:
        cmd = rng.choice([0x02, 0x03, 0x04, 0x0a, 0x0c, 0x0d, 0x12, 0x16, 0x1a, 0x1c, 0x1e, 0x1f])
        return bytes([cmd]) + rng.choice([rng.randbytes(rng.randint(0, 30)), *QUERIES])
    if k < 0.6:  # COM_STMT_EXECUTE, often cut short or with nonsense types
        p = bytearray(b"\x17" + struct.pack("<IBI", rng.choice([1, 1, 0, 999, 0xFFFFFFFF]), 0, 1))
        n = rng.choice([1, 2])
        p += bytes((n + 7) // 8) + b"\x01" + bytes([rng.choice([3, 8, 253, 254, 15, 0xF5, 7, 12, 99])]) * 2 * n
        p += rng.randbytes(rng.randint(0, 20))
        return bytes(p[: rng.choice([len(p), rng.randint(1, len(p))])])
    if k < 0.7:  # COM_STMT_FETCH
        return b"\x1c" + struct.pack("<II", rng.choice([1, 5]), rng.choice([0, 1, 100, 0xFFFFFFFF]))[: rng.randint(0, 8)]
    if k < 0.8:  # COM_STMT_SEND_LONG_DATA
        return b"\x18" + struct.pack("<IH", rng.choice([1, 7]), rng.choice([0, 1, 5, 65535]))[: rng.randint(0, 6)] + b"xyz"
    if k < 0.9:  # COM_CHANGE_USER
        return b"\x11" + rng.choice([rng.randbytes(rng.randint(0, 40)), b"app", b"app\x00", b"app\x00\x14abc"])
    if k < 0.95:  # COM_SET_OPTION
        return b"\x1b" + rng.randbytes(rng.randint(0, 4))
    return bytes([rng.randrange(0x20, 0x100)]) + rng.randbytes(rng.randint(0, 9))  # no such command


def _handshake(rng: random.Random, salt: bytes) -> tuple[bytes, int]:
    caps = PROXY_CAPABILITIES & ~(1 << 11)  # no TLS request
    resp = bytearray(build_response(caps, 45, rng.choice(["app", "nobody", "a" * 300]),
                                    auth.native_token("app", salt), "app", auth.NATIVE))
    struct.pack_into("<I", resp, 0, rng.choice([caps, rng.getrandbits(32), caps & ~(1 << 9)]))
    if rng.random() < 0.5:
        resp = resp[: rng.randint(0, len(resp))]
    else:
        for _ in range(rng.randint(1, 4)):
            resp[rng.randrange(len(resp))] = rng.randrange(256)
    return bytes(resp), rng.choice([1, 1, 0, 5])


def test_malformed_packets_get_answers_and_proxy_keeps_serving(cluster, tmp_path):
    with cluster.primary.connect() as c, c.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS app.fz (a INT, b VARCHAR(10))")
    p = start_proxy(cluster, tmp_path / "fz")
    rng = random.Random(int(os.environ.get("RWPROXY_FUZZ_SEED", "2026")))
    problems: list[str] = []
    try:  # a fixed number of cases (bounded in count; pytest-timeout bounds the time)
        for i in range(60):  # handshake phase
            with socket.create_connection((p.host, p.port), timeout=5) as s:
                greeting = s.recv(4096)
                resp, seq = _handshake(rng, parse_greeting(greeting[4:]).salt)
                s.sendall(frame(resp, seq))
                if _reply(s, 5.0) is None:
                    problems.append(f"handshake {resp.hex()}: no answer")
        for i in range(400):  # command phase, on an authenticated session
            c = RawClient(p.host, p.port)
            try:
                if rng.random() < 0.7:
                    c.prepare(rng.choice(STATEMENTS))  # statement 1 exists
                pl = _command(rng)
                c.sock.sendall(frame(pl, 0))
                if pl[0] in NO_REPLY:
                    c.sock.sendall(frame(b"\x0e", 0))  # these have no answer of their own: ping after
                r = _reply(c.sock, 5.0)
                if r is None:
                    problems.append(f"command {pl.hex()}: no answer")
                elif r and b"internal error" in r:
                    problems.append(f"command {pl.hex()}: {r[7:120]!r}")
                elif r and len(r) > 4 and r[4] == 0xFB:  # LOCAL INFILE request: send an empty file
                    c.sock.sendall(frame(b"", r[3] + 1))
                    if _reply(c.sock, 5.0) is None:
                        problems.append(f"command {pl.hex()}: no answer after the infile")
            finally:
                c.sock.close()
            probe = RawClient(p.host, p.port)  # everyone else is still served
            assert probe.command(b"\x0e")[0] == 0, f"after {pl.hex()}"
            probe.close()
    finally:
        p.process.stop()
    log = open(p.process.log_path, encoding="utf-8", errors="replace").read()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]
    assert not problems, problems
