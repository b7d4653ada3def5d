"""What an archived binary log covers, read from the file itself: its GTID range and time range.

A MariaDB binlog starts with a Gtid_list event: the last GTID of every domain before the file.
With that start state and the GTIDs inside, each archived file says exactly which transactions it
holds, whichever server wrote it; continuity across failovers is then arithmetic on GTIDs rather
than trust in file names (WAL-G's MariaDB archive broke at switchovers on file names). Only
event headers and the few events that carry positions are decoded; row data is never touched.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

MAGIC = b"\xfebin"
HEADER = 19
FORMAT_DESCRIPTION, ROTATE, STOP, GTID, GTID_LIST = 15, 4, 3, 162, 163

# domain -> (server_id, seq_no): a GTID position, one GTID per domain
Position = dict[int, tuple[int, int]]


def parse_position(text: str) -> Position:
    """"0-1-100,1-2-7" -> {0: (1, 100), 1: (2, 7)}; ValueError on anything else."""
    out: Position = {}
    for part in (text or "").replace(" ", "").split(","):
        if not part:
            continue
        d, s, n = part.split("-")
        out[int(d)] = (int(s), int(n))
    return out


def format_position(pos: Position) -> str:
    return ",".join(f"{d}-{s}-{n}" for d, (s, n) in sorted(pos.items()))


def covers(have: Position, want: Position) -> bool:
    """Every domain of `want` is at or before `have` (by sequence number)."""
    return all(d in have and have[d][1] >= n for d, (_, n) in want.items())


def merge(a: Position, b: Position) -> Position:
    out = dict(a)
    for d, (s, n) in b.items():
        if d not in out or out[d][1] < n:
            out[d] = (s, n)
    return out


@dataclass
class BinlogInfo:
    start: Position = field(default_factory=dict)   # the Gtid_list: state before the file
    end: Position = field(default_factory=dict)     # state after its last complete transaction
    first_gtid: Position = field(default_factory=dict)
    first_ts: int | None = None     # timestamp of the first transaction
    last_ts: int | None = None
    transactions: int = 0
    complete: bool = False          # ends with a rotate or stop event: the server closed it
    valid_bytes: int = 0            # up to the end of the last whole event
    server_id: int = 0              # the server whose format description event opens the file


def scan(data: bytes) -> BinlogInfo:
    """Read a binlog file's (or a growing file's prefix) GTID coverage. ValueError if it is not one."""
    if not data.startswith(MAGIC):
        raise ValueError("not a binary log (bad magic)")
    info = BinlogInfo()
    pos, n = 4, len(data)
    checksum = 0
    last_gtid: tuple[int, int, int, int] | None = None  # domain, server, seq, ts of the open transaction
    while pos + HEADER <= n:
        ts, etype, server_id, size = struct.unpack_from("<IBII", data, pos)
        if size < HEADER or pos + size > n:
            break  # the growing tail: an event still being written
        body = data[pos + HEADER: pos + size - checksum]
        if etype == FORMAT_DESCRIPTION:
            info.server_id = server_id
            # MariaDB >= 5.3 ends the event with the checksum algorithm (1 byte) and its CRC32
            checksum = 4 if len(body) >= 5 and body[-5] == 1 else 0
        elif etype == GTID_LIST:
            count = struct.unpack_from("<I", body, 0)[0] & 0x0FFFFFFF
            for i in range(count):
                d, s, q = struct.unpack_from("<IIQ", body, 4 + 16 * i)
                info.start[d] = (s, q)
            info.end = dict(info.start)
        elif etype == GTID:
            if last_gtid is not None:
                _close(info, last_gtid)
            seq, domain = struct.unpack_from("<QI", body, 0)
            last_gtid = (domain, server_id, seq, ts)
        elif etype in (ROTATE, STOP):
            info.complete = True
        pos += size
        if last_gtid is not None and etype in (16, 2) and _ends_transaction(etype, body):
            _close(info, last_gtid)
            last_gtid = None
        info.valid_bytes = pos
    return info


def _ends_transaction(etype: int, body: bytes) -> bool:
    if etype == 16:  # XID
        return True
    # a Query event ending the group: COMMIT (non-transactional engines) or a DDL; DDL groups have the
    # standalone flag in their GTID event, so any query after a GTID that is not BEGIN ends it
    try:
        db_len = body[8]
        status_len = struct.unpack_from("<H", body, 11)[0]
        q = body[13 + status_len + db_len + 1:]
    except (IndexError, struct.error):
        return False
    return not q.upper().startswith(b"BEGIN")


def _close(info: BinlogInfo, g: tuple[int, int, int, int]) -> None:
    domain, server, seq, ts = g
    info.end[domain] = (server, seq)
    info.first_gtid.setdefault(domain, (server, seq))
    info.transactions += 1
    info.first_ts = ts if info.first_ts is None else info.first_ts
    info.last_ts = ts
