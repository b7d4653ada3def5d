"""The control plane's sums: each worker's report merged into one picture of the proxy."""

from __future__ import annotations

from proxy.observe.recorder import NB, percentile

ROUTE_NAMES = ("read", "write", "session")


def digests(per_worker: list) -> list[dict]:
    """Digest rows of all workers, one per (digest, user, db), with averages and percentiles."""
    merged: dict[tuple, list] = {}
    for rows in per_worker:
        for (did, text, user, db, route, count, total, mn, mx, errors, nrows, first, last, buckets) in rows or ():
            key = (text, user, db)
            m = merged.get(key)
            if m is None:
                merged[key] = [did, route, count, total, mn, mx, errors, nrows, first, last, list(buckets)]
                continue
            m[2] += count
            m[3] += total
            m[4] = min(m[4], mn)
            m[5] = max(m[5], mx)
            m[6] += errors
            m[7] += nrows
            m[8] = min(m[8], first)
            m[9] = max(m[9], last)
            b = m[10]
            for i in range(NB):
                b[i] += buckets[i]
    out = []
    for (text, user, db), (did, route, count, total, mn, mx, errors, nrows, first, last, buckets) in merged.items():
        out.append({
            "digest": did, "digest_text": text or "(protocol command)", "user": user, "db": db, "route": route,
            "count": count, "total_ms": total * 1000, "avg_ms": total * 1000 / count if count else 0.0,
            "min_ms": mn * 1000, "max_ms": mx * 1000, "p50_ms": percentile(buckets, count, 0.50, mx) * 1000,
            "p99_ms": percentile(buckets, count, 0.99, mx) * 1000, "errors": errors, "rows_sent": nrows,
            "first_seen": first, "last_seen": last,
        })
    return out


# Plain counters every worker reports and the control plane adds up (report.summary).
COUNTERS = ("idle_released", "queue_waits", "queue_timeouts", "gtid_from_ok", "gtid_fetched")


def summaries(per_worker: list) -> dict:
    """The workers' summaries added up (None entries: a worker that did not answer)."""
    total = {"workers_answering": 0, "clients": 0, "sessions": 0, "pinned": {}, "open": {}, "shared_open": {},
             "statements": 0, "shared_statements": 0, "routed": {}, "refused": {}, "cache": {"hits": 0, "misses": 0},
             "rule_hits": [], "servers": {}, "hist": {}, "digests": 0, "evicted": 0, "draining": False,
             "config_versions": [], "pids": [], **dict.fromkeys(COUNTERS, 0)}
    for s in per_worker:
        if not s:
            continue
        total["workers_answering"] += 1
        for k in ("clients", "sessions", "statements", "shared_statements", "digests", "evicted", *COUNTERS):
            total[k] += s.get(k, 0)
        for k in ("pinned", "open", "shared_open", "routed", "refused"):
            _add(total[k], s.get(k) or {})
        _add(total["cache"], s.get("cache") or {})
        hits = s.get("rule_hits") or []
        total["rule_hits"] = [a + b for a, b in zip(_pad(total["rule_hits"], len(hits)), _pad(hits, len(total["rule_hits"])))]
        total["draining"] = total["draining"] or s.get("draining", False)
        total["config_versions"].append(s.get("config_version", 0))
        total["pids"].append((s.get("worker"), s.get("pid")))
        for name, row in (s.get("servers") or {}).items():
            t = total["servers"].setdefault(name, {"ok": [0, 0, 0, 0], "err": [0, 0, 0, 0], "lost": [0, 0, 0, 0],
                                                   "bytes_in": 0, "bytes_out": 0, "latency": 0.0})
            for i in range(4):
                t["ok"][i] += row["ok"][i]
                t["err"][i] += row["err"][i]
                t["lost"][i] += row["lost"][i]
            for k in ("bytes_in", "bytes_out", "latency"):
                t[k] += row[k]
        for route, (buckets, hsum) in (s.get("hist") or {}).items():
            h = total["hist"].setdefault(route, ([0] * NB, [0.0]))
            for i in range(NB):
                h[0][i] += buckets[i]
            h[1][0] += hsum
    total["hist"] = {r: (b, s[0]) for r, (b, s) in total["hist"].items()}
    return total


def pools(per_worker: list) -> list[dict]:
    merged: dict[tuple, dict] = {}
    for rows in per_worker:
        for r in rows or ():
            k = (r["server"], r["user"])
            m = merged.get(k)
            if m is None:
                merged[k] = dict(r)
            else:
                for f, v in r.items():
                    if f not in ("server", "user"):
                        m[f] += v
    out = []
    for r in merged.values():
        r["avg_latency_ms"] = round(r.pop("latency") * 1000 / r["queries"], 3) if r["queries"] else 0.0
        out.append(r)
    return sorted(out, key=lambda r: (r["server"], r["user"]))


def _add(into: dict, more: dict) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0) + v


def _pad(xs: list, n: int) -> list:
    return list(xs) + [0] * (n - len(xs))
