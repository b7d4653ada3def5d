"""Which backups and archived binlogs a grandfather-father-son policy keeps (a value, unit-tested).

As restic and Borg count it: `keep_daily = 7` keeps the newest backup of each of the 7 most recent
days that have one; weekly (ISO weeks) and monthly likewise; `keep_min_full` newest full backups
are kept whatever the calendar says, and so is the newest backup. An incremental kept keeps its
whole chain, so expiring never breaks one. The binlog archive keeps every file that holds a
transaction after the oldest kept backup's GTID position, and drops the files that hold nothing
newer: exactly what point-in-time recovery from the oldest kept backup needs (pgBackRest's
archive expiry, whose users report WAL that never goes, is the cautionary tale).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from proxy.backup.archive import ArchivedFile, load_archive
from proxy.backup.binlog import covers, parse_position
from proxy.backup.manifest import FULL, Manifest, load_all


@dataclass
class Decision:
    keep: list[str] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    why: dict[str, str] = field(default_factory=dict)      # kept id -> first reason
    delete_binlogs: list[ArchivedFile] = field(default_factory=list)


def _buckets(manifests: list[Manifest], count: int, bucket) -> list[Manifest]:
    """The newest backup of each of the `count` most recent buckets that have one."""
    kept, seen = [], set()
    for m in sorted(manifests, key=lambda m: m.start, reverse=True):
        b = bucket(m.start)
        if b in seen:
            continue
        if len(seen) >= count:
            break
        seen.add(b)
        kept.append(m)
    return kept


def decide(manifests: list[Manifest], archive: list[ArchivedFile], *, keep_daily: int, keep_weekly: int,
           keep_monthly: int, keep_min_full: int) -> Decision:
    d = Decision()
    if not manifests:
        return d
    why: dict[str, str] = {}

    def mark(ms, reason):
        for m in ms:
            why.setdefault(m.id, reason)

    ordered = sorted(manifests, key=lambda m: m.start)
    mark([ordered[-1]], "newest")
    mark([m for m in ordered if m.kind == FULL][-keep_min_full:] if keep_min_full else [], "keep_min_full")
    mark(_buckets(ordered, keep_daily, lambda t: time.strftime("%Y-%m-%d", time.gmtime(t))), "daily")
    mark(_buckets(ordered, keep_weekly, lambda t: time.strftime("%G-W%V", time.gmtime(t))), "weekly")
    mark(_buckets(ordered, keep_monthly, lambda t: time.strftime("%Y-%m", time.gmtime(t))), "monthly")
    by_id = {m.id: m for m in manifests}
    for bid in list(why):  # an incremental's chain stays with it
        parent = by_id[bid].parent
        while parent and parent in by_id:
            why.setdefault(parent, f"chain of {bid}")
            parent = by_id[parent].parent
    d.why = why
    d.keep = [m.id for m in ordered if m.id in why]
    d.delete = [m.id for m in ordered if m.id not in why]
    oldest = next((m for m in ordered if m.id in why), None)
    if oldest is not None and oldest.gtid:
        start = parse_position(oldest.gtid)
        d.delete_binlogs = [a for a in archive if a.complete and covers(start, parse_position(a.end))]
    return d


def plan_expiry(repo, backup_config) -> Decision:
    """The policy of `[backup]` applied to what `repo` holds (nothing deleted yet)."""
    b = backup_config
    return decide(load_all(repo), load_archive(repo), keep_daily=b.keep_daily, keep_weekly=b.keep_weekly,
                  keep_monthly=b.keep_monthly, keep_min_full=b.keep_min_full)


def expire(repo, d: Decision, stale: list[str] = ()) -> None:
    """Delete what `d` gives up (and `stale` objects of backups that never finished): each backup's
    manifest last, so one half-deleted is "unfinished" (the next expire finishes it), never broken."""
    for bid in d.delete:
        for key in repo.keys(f"backups/{bid}/"):
            if not key.endswith("manifest.json"):
                repo.delete(key)
        repo.delete(f"backups/{bid}/manifest.json")
    for a in d.delete_binlogs:
        repo.delete(a.info_key)
        repo.delete(a.data_key)
    for k in stale:
        repo.delete(k)
