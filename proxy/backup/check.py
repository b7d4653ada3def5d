"""`rwproxy backup check`: is the archive continuous from the oldest backup to the primary's now?

The answer is a value (a dict with `ok` and the lines an operator reads) so the daemon, the
metrics and the tests use the same one. A gap names the missing GTID range and which backups can
therefore not be recovered to points after it.
"""

from __future__ import annotations

import time

from proxy.backup.archive import load_archive, walk
from proxy.backup.binlog import covers, format_position, parse_position
from proxy.backup.manifest import iso, load_all
from proxy.backup.servers import BackupError, primary, survey


STALE_AFTER = 60.0  # s without an upload while the primary is ahead: the archiver is not running


def check(config, repo, *, now=time.time) -> dict:
    manifests = load_all(repo)
    archive = load_archive(repo)
    lines: list[str] = []
    out = {"ok": True, "stale": False, "backups": len(manifests), "archived_files": len(archive), "gaps": [], "lines": lines,
           "archive_end": "", "archive_lag_s": None, "primary": None, "unrecoverable_after_gap": []}
    with_gtid = [m for m in manifests if m.gtid]
    if not with_gtid:
        lines.append("no backup with a GTID position yet: nothing to check the archive against")
        start = {}
    else:
        start = parse_position(with_gtid[0].gtid)
        lines.append(f"oldest backup {with_gtid[0].id} at GTID {with_gtid[0].gtid} ({iso(with_gtid[0].consistent_at)})")
    w = walk(archive, start)
    out["archive_end"] = format_position(w.end)
    lines.append(f"{len(archive)} archived binlog file(s); the history from there runs through {len(w.files)} of "
                 f"them to GTID {format_position(w.end) or '(nothing)'}"
                 + (f", last transaction at {iso(w.end_ts)}" if w.end_ts else ""))
    for gap in w.gaps:
        out["ok"] = False
        out["gaps"].append({"after": gap.after, "before": gap.before, "resumes_at": gap.resumes_at})
        lines.append(f"GAP: {gap.describe()}")
        hit = [m.id for m in with_gtid if not covers(parse_position(m.gtid), parse_position(gap.before))]
        out["unrecoverable_after_gap"] += hit
        if hit:
            lines.append(f"  backups that cannot be recovered to points after it: {', '.join(hit)}")
    try:
        p = primary(config, survey(config))
    except BackupError as e:
        lines.append(f"primary: {e}; cannot say how far behind the archive is")
        lines.append("OK: no gap in what is archived" if out["ok"] else "NOT OK: the archive has gaps")
        return out
    pos = parse_position(p.gtid_binlog)
    out["primary"] = {"name": p.name, "gtid": p.gtid_binlog}
    if covers(w.end, pos):
        out["archive_lag_s"] = 0.0
        lines.append(f"the archive is current with the primary {p.name} (GTID {p.gtid_binlog})")
    else:
        newest = max((a.archived_at for a in archive), default=0.0)
        out["archive_lag_s"] = round(now() - newest, 1) if newest else None
        behind = {d: n - w.end.get(d, (0, 0))[1] for d, (_, n) in pos.items() if n > w.end.get(d, (0, 0))[1]}
        lines.append(f"the archive is behind the primary {p.name} (GTID {p.gtid_binlog}) by "
                     + ", ".join(f"{n} transaction(s) in domain {d}" for d, n in behind.items())
                     + (f"; last stored {out['archive_lag_s']:.0f} s ago" if newest else "; nothing stored yet")
                     + " (is `rwproxy backup archive` or archive_binlogs running?)")
        # A stopped archiver is a failing check (as pgBackRest's check fails when WAL does not
        # arrive): a point in time after the archive's end cannot be recovered.
        # With backups but nothing archived at all, the same holds from the newest backup on: no
        # point after a backup can be recovered (an archiver never started is no better).
        limit = max(STALE_AFTER, 6 * config.backup.archive_interval)
        since = newest or max((m.consistent_at for m in with_gtid), default=0.0)
        if since and now() - since > limit:
            out["ok"] = False
            out["stale"] = True
            lines.append(f"NOT OK: nothing archived for more than {limit:.0f} s while the primary wrote: "
                         f"points in time after {iso(w.end_ts) if w.end_ts else 'the archive end'} cannot be recovered"
                         if archive else f"NOT OK: nothing archived, and the primary wrote since the backups: no point "
                         f"in time after {with_gtid[-1].id} can be recovered (start `rwproxy backup archive` or "
                         f"set [backup] archive_binlogs)")
            return out
    lines.append("OK: no gap" if out["ok"] else "NOT OK: the archive has gaps")
    return out
