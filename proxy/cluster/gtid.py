"""MariaDB GTID positions ('0-1-57,1-2-9': per replication domain, the server id and sequence
number of the newest transaction): the one parser and the comparisons built on it.

Sequence numbers order transactions within a domain (gtid_strict_mode keeps them contiguous);
the server id does not order anything. Routing (read-your-writes), the monitor's lag timeline,
failover's "who holds what" and the sandbox all compare positions with these functions.
"""

from __future__ import annotations


def parse(pos: str | None) -> dict[int, tuple[int, int]]:
    """'0-1-57,1-2-9' -> {0: (1, 57), 1: (2, 9)}: per domain the (server_id, seq_no) of the newest.
    Parts that are not three integers are skipped (a position is server output, never trusted
    to be tidy: MariaDB wraps long lists with newlines)."""
    out: dict[int, tuple[int, int]] = {}
    for part in (pos or "").replace("\n", "").split(","):
        try:
            domain, server, seq = (int(x) for x in part.strip().split("-"))
        except ValueError:
            continue
        if domain not in out or seq > out[domain][1]:
            out[domain] = (server, seq)
    return out


def seqs(pos: str | None) -> dict[int, int]:
    """'0-1-57,1-2-9' -> {0: 57, 1: 9} (domain -> newest sequence number)."""
    return {d: n for d, (_s, n) in parse(pos).items()}


def text(pos: dict[int, tuple[int, int]]) -> str:
    return ",".join(f"{d}-{s}-{n}" for d, (s, n) in sorted(pos.items()))


def merge(*positions: str | None) -> str:
    """The newest GTID of each domain across several positions (e.g. gtid_binlog_pos and gtid_current_pos)."""
    out: dict[int, tuple[int, int]] = {}
    for pos in positions:
        for d, (s, n) in parse(pos).items():
            if d not in out or n > out[d][1]:
                out[d] = (s, n)
    return text(out)


def contains(have: dict[int, int], want: dict[int, int]) -> bool:
    """Parsed form of reached(): `have` holds every transaction of `want` (both from seqs())."""
    return all(have.get(d, -1) >= n for d, n in want.items())


def reached(have: str | None, want: str | None) -> bool:
    """A server at position `have` has every transaction of position `want` (an empty `want`
    is always reached)."""
    return contains(seqs(have), seqs(want))


def ahead(have: str | None, base: str | None) -> dict[int, int]:
    """Per domain, how many transactions `have` holds beyond `base` (only domains where it is ahead).

    The difference counts transactions the other side never saw as long as `base` is a prefix
    of the same history: the position a new primary had when it took over from the server
    being compared.
    """
    b = seqs(base)
    return {d: n - b.get(d, 0) for d, n in sorted(seqs(have).items()) if n > b.get(d, 0)}


def describe_ahead(extra: dict[int, int]) -> str:
    parts = [f"{n} transaction{'s' if n != 1 else ''} in domain {d}" for d, n in extra.items()]
    return " and ".join(parts)
