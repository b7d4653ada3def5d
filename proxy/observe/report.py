"""What one worker reports when the control plane asks (runtime/workerctl.py): built from the
public state of the worker, its sessions, pools and recorder, only when asked."""

from __future__ import annotations

import time

from proxy.frontend.reader import COMMAND

SUMMARY, SESSIONS, DIGESTS, POOLS = "summary", "sessions", "digests", "pools"


def summary(w) -> dict:
    """Counters and gauges for /metrics and `rwproxy status` (small whatever the load)."""
    pinned: dict[str, int] = {}
    logged_in = 0
    for c in w.clients:
        st = c.state
        if st is None or c.closed:
            continue
        logged_in += 1
        for why in st.ties():
            why = "read-only transaction" if why.startswith("read-only transaction") else why
            pinned[why] = pinned.get(why, 0) + 1
    sh = w.shared
    out = {
        "worker": w.index, "pid": _pid(), "clients": len(w.clients), "sessions": logged_in, "pinned": pinned,
        "open": dict(w.pools.open_count), "shared_open": sh.open_per_server() if sh is not None else {},
        "statements": sum(w.router.balancer.routed.values()), "routed": dict(w.router.balancer.routed),
        "shared_statements": sh.statements if sh is not None else 0,
        "cache": {"hits": w.classifier.hits, "misses": w.classifier.misses},
        "rule_hits": list(w.router.rule_hits), "refused": dict(w.refused), "draining": w.draining,
        "config_version": w.config_version,
        # connections sessions gave back (idle_release), checkouts that waited at / timed out at
        # max_server_connections, GTIDs of writes read from their OK packet / asked for afterwards
        "idle_released": w.pools.given_back, "queue_waits": sum(q[0] for q in w.pools.queued.values()),
        "queue_timeouts": sum(q[1] for q in w.pools.queued.values()),
        "gtid_from_ok": w.gtid_learned[0], "gtid_fetched": w.gtid_learned[1],
    }
    if w.recorder is not None:
        out.update(w.recorder.summary())
    return out


def sessions(w) -> list[dict]:
    """One row per client session of this worker."""
    now = time.monotonic()
    rows = []
    for c in list(w.clients):
        st = c.state
        if c.closed:
            continue
        cmd = c.inflight
        if c.phase != COMMAND or st is None:
            state, since = "login", c.started
        elif c.busy:
            state = "in statement (shared)" if c.shared_on is not None else "in statement"
            since = c.sent_at if cmd is not None else now
        elif st.in_trx:
            state, since = "in transaction", st.trx_since or c.done_at
        else:
            state, since = "idle", c.done_at or c.started
        servers = sorted({name for name, be in c.backends.items() if not be.closed}
                         | ({c.shared_on.server.name} if c.shared_on is not None else set()))
        rows.append({
            "id": c.conn_id, "user": c.user.name if c.user is not None else "", "host": c.host,
            "db": c.db or "", "state": state, "seconds": round(max(0.0, now - since), 3) if since else 0.0,
            "pinned": (st.pin() if st is not None else "") or "", "ties": ", ".join(st.ties()) if st is not None else "",
            "servers": ",".join(servers), "digest": cmd.cls.digest[:1024] if cmd is not None and c.busy else "",
            "tls": c.tls, "worker": w.index,
        })
    return rows


def pools(w) -> list[dict]:
    """One row per (server, user) this worker has used."""
    in_use: dict[tuple, int] = {}
    for c in w.clients:
        if c.user is None:
            continue
        for name, be in c.backends.items():
            if not be.closed:
                k = (name, c.user.name)
                in_use[k] = in_use.get(k, 0) + 1
    idle = w.pools.idle_per_key()
    shared = w.shared.open_per_key() if w.shared is not None else {}
    stats = w.recorder.pool_rows() if w.recorder is not None else {}
    keys = set(in_use) | set(idle) | set(shared) | set(w.pools.connects) | set(stats)
    rows = []
    for k in sorted(keys):
        r = stats.get(k)
        conn = w.pools.connects.get(k, (0, 0))
        rows.append({
            "server": k[0], "user": k[1], "in_use": in_use.get(k, 0), "idle": idle.get(k, 0),
            "shared": shared.get(k, 0), "connects_ok": conn[0], "connects_failed": conn[1],
            "queries": sum(r[0:12]) if r else 0, "errors": sum(r[4:8]) if r else 0, "lost": sum(r[8:12]) if r else 0,
            "bytes_in": r[12] if r else 0, "bytes_out": r[13] if r else 0, "latency": r[14] if r else 0.0,
        })
    return rows


def digests(w) -> list[tuple]:
    return w.recorder.digest_rows() if w.recorder is not None else []


def _pid() -> int:
    import os

    return os.getpid()
