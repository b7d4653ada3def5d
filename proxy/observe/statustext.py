"""`rwproxy status` as a person reads it: the servers' table and a few lines under it, built from
the control plane's status answer (a dict: the same one `--json` prints)."""

from __future__ import annotations

from proxy.cluster.topology import PRIMARY, REPLICA, UP


def format_status(st: dict) -> str:
    """The operator's table for `rwproxy status`."""
    head = ("SERVER", "ADDRESS", "ROLE", "STATE", "READS", "LAG_MS", "GTID", "CONNS", "SHARED", "ROUTED")
    rows = [head]
    for s in st["servers"]:
        lag = "-" if s["lag_ms"] is None else f"{s['lag_ms']:.0f}"
        role = s["role"] + (" (read-only)" if s["role"] == PRIMARY and s.get("read_only") else "")
        rows.append((s["name"], s["address"], role, s["state"], "yes" if s["readable"] and s["role"] == REPLICA else "-",
                     lag, s["gtid"] or "-", str(s["connections"]), str(s.get("shared_connections", 0)), str(s["routed"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(v.ljust(widths[i]) for i, v in enumerate(r)).rstrip() for r in rows]
    lines.append("")
    lines.append(f"rwproxy pid {st['pid']} on {st['listen']}" + (f" and {st['socket']}" if st.get("socket") else "")
                 + f", {st['workers']} worker(s), up {st['uptime_s']:.0f} s; "
                 f"{st['clients']} client(s), {st['statements']} statement(s) routed"
                 f" ({st.get('shared_statements', 0)} over shared connections)"
                 + ("; WRITES HELD" if st.get("writes_held") else ""))
    for s in st["servers"]:
        if s["last_error"] and s["state"] != UP:
            lines.append(f"{s['name']}: {s['last_error']}")
    co = st.get("coordination")
    if co:
        names = [i["name"] + (" (leader)" if i.get("leader") else "") for i in co.get("instances", [])]
        lines.append(f"cluster {co['cluster']!r}: this is {co['instance']}" + (", the leader" if co["leading"] else
                     f"; leader {co['leader'] or 'none'}") + f", epoch {co['epoch']}; instances: "
                     + (", ".join(names) or "-") + ("" if co["etcd_ok"] else f"; ETCD UNREACHABLE: {co['etcd_error']}"))
    fo = st.get("failover") or {}
    if fo:
        lines.append("failover: " + ", ".join(f"{k}={v}" for k, v in fo.items() if v not in (None, "", {}, [])))
    return "\n".join(lines)
