"""Backup decisions as values: retention over a simulated 100 days, schedules, GTID continuity,
the codec's refusals, the repository's names. No server needed."""

from __future__ import annotations

import calendar
import io
import os
import time
from datetime import date, datetime, timedelta, timezone

import pytest

from proxy.backup import codec
from proxy.backup.archive import ArchivedFile, resume_file, walk
from proxy.backup.binlog import covers, parse_position
from proxy.backup.daemon import due, schedules
from proxy.backup.manifest import FULL, INCREMENTAL, PHYSICAL, Manifest, backup_id, chain
from proxy.backup.repo import FileRepository, RepoError, open_repository
from proxy.backup.retention import decide
from proxy.backup.schedule import Cron, CronError
from proxy.config.load import ConfigError, build_config

BASE = {"backends": [{"host": "127.0.0.1", "port": 3306}], "users": [{"name": "app", "password": "x"}]}


def _ts(d: date, hour: int = 1) -> float:
    return float(calendar.timegm((d.year, d.month, d.day, hour, 0, 0)))


def _archived(i: int, start: int, end: int, ts: int) -> ArchivedFile:
    return ArchivedFile(server_id=1, file=f"binlog.{i:06d}", data_key=f"k{i}", size=1, sha256="", raw_size=1,
                        complete=True, start=f"0-1-{start}" if start else "", end=f"0-1-{end}",
                        first_gtid=f"0-1-{start + 1}", first_ts=ts, last_ts=ts, transactions=end - start)


# ---- retention ------------------------------------------------------------------------------------

def test_retention_over_a_simulated_hundred_days_keeps_exactly_the_gfs_set():
    """Fulls on Sundays, an incremental every other day on the day before; expire after every backup
    (as the daemon does) with the values from a real [backup] section."""
    cfg = build_config({**BASE, "backup": {"repository": "/tmp/x", "keep_daily": 7, "keep_weekly": 4,
                                           "keep_monthly": 3, "keep_min_full": 2}}).backup
    day0 = date(2026, 1, 1)
    kept: dict[str, Manifest] = {}
    archive: list[ArchivedFile] = []
    prev = None
    for i in range(100):
        d = day0 + timedelta(days=i)
        kind = FULL if d.isoweekday() == 7 or prev is None else INCREMENTAL
        t = _ts(d)
        m = Manifest(id=backup_id(kind, t), kind=kind, method=PHYSICAL, parent=None if kind == FULL else prev.id,
                     start=t, end=t + 60, server="node2", address="", server_id=2, server_role="replica",
                     version="", gtid=f"0-1-{(i + 1) * 100}", consistent_at=t)
        kept[m.id] = m
        prev = m
        archive.append(_archived(i, i * 100, (i + 1) * 100, int(t)))
        d_ = decide(list(kept.values()), archive, keep_daily=cfg.keep_daily, keep_weekly=cfg.keep_weekly,
                    keep_monthly=cfg.keep_monthly, keep_min_full=cfg.keep_min_full)
        for bid in d_.delete:
            del kept[bid]
        archive = [a for a in archive if a not in d_.delete_binlogs]

    last = day0 + timedelta(days=99)  # 2026-04-10, a Friday
    by_day = {datetime.fromtimestamp(m.start, timezone.utc).date(): m for m in kept.values()}
    days = sorted(by_day)
    # expected, computed from the calendar rather than by the code under test:
    want_days = {last - timedelta(days=k) for k in range(7)}                          # daily: the last 7 days
    sundays = [last - timedelta(days=(last.isoweekday() % 7) + 7 * k) for k in range(4)]  # the newest of ISO weeks
    weekly = {last} | set(sundays[:3])                       # this week's newest is today; then 3 earlier Sundays
    monthly = {last, date(2026, 3, 31), date(2026, 2, 28)}   # the newest of each of the last 3 months
    min_full = set(sundays[:2])
    roots = want_days | weekly | monthly | min_full
    # an incremental keeps its chain: every day back to its Sunday full
    expected = set()
    for r in roots:
        d = r
        while True:
            expected.add(d)
            if d.isoweekday() == 7 or d == day0:
                break
            d -= timedelta(days=1)
    assert set(days) == expected, sorted(set(days) ^ expected)
    for m in kept.values():  # no broken chain
        assert m.parent is None or m.parent in kept
    oldest = min(kept.values(), key=lambda m: m.start)
    # binlogs: exactly the files holding transactions after the oldest kept backup
    assert archive and all(not covers(parse_position(oldest.gtid), parse_position(a.end)) for a in archive)
    assert [a.file for a in archive] == [f"binlog.{i:06d}" for i in range(100) if (i + 1) * 100 > int(oldest.gtid.split("-")[2])]


def test_retention_settings_change_the_decision():
    ms = []
    for i in range(10):
        t = _ts(date(2026, 1, 1) + timedelta(days=i))
        ms.append(Manifest(id=backup_id(FULL, t), kind=FULL, method=PHYSICAL, parent=None, start=t, end=t,
                           server="n", address="", server_id=1, server_role="replica", version="", gtid=""))
    few = decide(ms, [], keep_daily=2, keep_weekly=0, keep_monthly=0, keep_min_full=1)
    more = decide(ms, [], keep_daily=5, keep_weekly=0, keep_monthly=0, keep_min_full=1)
    assert len(few.keep) == 2 and len(more.keep) == 5
    floor = decide(ms, [], keep_daily=1, keep_weekly=0, keep_monthly=0, keep_min_full=4)
    assert len(floor.keep) == 4 and floor.why[floor.keep[0]] == "keep_min_full"


# ---- schedules ------------------------------------------------------------------------------------

def test_cron_fields_and_next_run():
    c = Cron("30 1 * * 0")  # Sundays 01:30 UTC
    t = calendar.timegm((2026, 12, 4, 12, 0, 0))  # a Friday
    assert time.gmtime(c.next_after(t))[:6] == (2026, 12, 6, 1, 30, 0)
    assert Cron("*/15 * * * *").next_after(calendar.timegm((2026, 1, 1, 0, 7, 0))) == calendar.timegm((2026, 1, 1, 0, 15, 0))
    assert Cron("0 0 1 * *").matches(calendar.timegm((2026, 3, 1, 0, 0, 0)))
    # both day fields restricted: either matches (crontab(5))
    either = Cron("0 0 13 * 5")
    assert either.matches(calendar.timegm((2026, 2, 13, 0, 0, 0))) and either.matches(calendar.timegm((2026, 2, 6, 0, 0, 0)))
    for bad in ("* * *", "61 * * * *", "a * * * *", "*/0 * * * *", "5-1 * * * *"):
        with pytest.raises(CronError):
            Cron(bad)


def test_schedule_keys_pick_the_jobs_and_a_bad_one_is_a_config_error():
    cfg = build_config({**BASE, "backup": {"repository": "/tmp/x", "schedule_full": "0 1 * * 0",
                                           "schedule_incremental": "0 1 * * *",
                                           "schedule_test_restore": "0 3 * * *"}}).backup
    plan = schedules(cfg)
    sunday = calendar.timegm((2026, 12, 6, 1, 0, 30))
    monday = calendar.timegm((2026, 12, 7, 1, 0, 30))
    assert due(plan, sunday - 60, sunday) == ["full"]  # the full wins over the incremental due with it
    assert due(plan, monday - 60, monday) == ["incremental"]
    assert due(plan, monday + 7000, monday + 7300) == ["test-restore"]
    assert due(plan, monday, monday + 30) == []
    with pytest.raises(ConfigError, match="schedule_full"):
        build_config({**BASE, "backup": {"repository": "/tmp/x", "schedule_full": "every sunday"}})
    with pytest.raises(ConfigError, match="repository"):
        build_config({**BASE, "backup": {"repository": "bucket/prefix"}})


# ---- GTID continuity ------------------------------------------------------------------------------

def test_walk_finds_gaps_and_uses_overlapping_files_once():
    a1 = _archived(1, 0, 10, 100)
    a2 = _archived(2, 10, 20, 200)
    # after a failover the new primary (server 2) has its own files, overlapping the old one's
    b1 = ArchivedFile(server_id=2, file="binlog.000001", data_key="b1", size=1, sha256="", raw_size=1, complete=True,
                      start="0-1-15", end="0-2-30", first_gtid="0-1-16", first_ts=250, last_ts=300, transactions=15)
    w = walk([a1, a2, b1], {})
    assert [f.data_key for f in w.files] == ["k1", "k2", "b1"] and not w.gaps
    assert w.end == {0: (2, 30)}
    # the file with 20..30 purged before it was archived: a gap, named
    c = _archived(4, 30, 40, 400)
    w = walk([a1, a2, c], parse_position("0-1-5"))
    assert len(w.gaps) == 1 and w.gaps[0].after == "0-1-20" and w.gaps[0].before == "0-1-30"
    assert w.end == {0: (1, 40)}
    assert walk([a1, a2, c], {}, stop_at_gap=True).end == {0: (1, 20)}


def test_a_restore_to_the_backups_own_gtid_replays_no_binlog(tmp_path, monkeypatch):
    """A replica's backup pauses at a GTID that can be exactly the one asked for (CI saw it): then
    no binlog is replayed, since mariadb-binlog fails with start = stop ("never reached")."""
    from proxy.backup.restore import plan

    m = Manifest(id=backup_id(FULL, 1_700_000_000.0), kind=FULL, method=PHYSICAL, parent=None, start=1.7e9,
                 end=1.7e9 + 5, server="node2", address="127.0.0.1:1", server_id=2, server_role="replica",
                 version="10.11", gtid="0-1-16664", consistent_at=1.7e9 + 4)
    repo = FileRepository(str(tmp_path / "repo"))
    archived = [_archived(2, 16600, 16700, 100)]  # the file that holds the backup's point, and more
    monkeypatch.setattr("proxy.backup.restore.load_archive", lambda _repo: archived)
    p = plan(repo, at_gtid="0-1-16664", manifests=[m])
    assert [b.id for b in p.backups] == [m.id] and p.binlogs == []
    p = plan(repo, at_gtid="0-1-16665", manifests=[m])  # one transaction further: that file
    assert p.binlogs == archived and p.stop_gtid == "0-1-16665"


def test_resume_file_picks_the_file_holding_the_next_transaction():
    files = [("binlog.000001", {}), ("binlog.000002", {0: (1, 10)}), ("binlog.000003", {0: (1, 20)})]
    assert resume_file(files, {0: (1, 15)}) == ("binlog.000002", True)
    assert resume_file(files, {0: (1, 20)}) == ("binlog.000003", True)
    assert resume_file(files[2:], {0: (1, 15)}) == ("binlog.000003", False)  # 16..20 purged: a gap
    assert resume_file(files[1:], {}) == ("binlog.000002", True)  # a new archive starts at the oldest


# ---- codec and repository -------------------------------------------------------------------------

def test_codec_round_trip_and_refusals(tmp_path):
    k1, k2 = str(tmp_path / "k1"), str(tmp_path / "k2")
    pub = codec.keygen(k1)
    codec.keygen(k2)
    with pytest.raises(FileExistsError):
        codec.keygen(k1)
    assert os.stat(k1).st_mode & 0o777 == 0o600
    keys = codec.load_keys((), k1)
    encrypt_only = codec.load_keys((pub,), "")
    assert encrypt_only.key_id == keys.key_id
    repo = FileRepository(str(tmp_path / "repo"))
    data = b"TOP-SECRET-ROW " * 50000 + os.urandom(1000)
    w = repo.open_write("a/obj")
    st = codec.encode(io.BytesIO(data), w, encrypt_only)
    w.close()
    assert b"TOP-SECRET" not in repo.get_bytes("a/obj") and st.raw_size == len(data)
    with pytest.raises(codec.CodecError, match="private key"):
        codec.decode(repo.open_read("a/obj"), None, encrypt_only)
    out = io.BytesIO()
    codec.decode(repo.open_read("a/obj"), out, keys, sha256=st.sha256)
    assert out.getvalue() == data
    with pytest.raises(codec.CodecError, match="encrypted to other recipients"):
        codec.decode(repo.open_read("a/obj"), None, codec.load_keys((), k2))
    raw = bytearray(repo.get_bytes("a/obj"))
    raw[len(raw) // 2] ^= 0x01
    repo.put_bytes("a/obj", bytes(raw))
    with pytest.raises(codec.CodecError, match="SHA-256"):
        codec.decode(repo.open_read("a/obj"), None, keys, sha256=st.sha256)
    with pytest.raises(codec.CodecError):
        codec.decode(repo.open_read("a/obj"), None, keys)
    (tmp_path / "bad").write_text("not a key\n")
    with pytest.raises(codec.CodecError, match="not an age identity"):
        codec.load_keys((), str(tmp_path / "bad"))
    with pytest.raises(codec.CodecError, match="not an age public key"):
        codec.load_keys(("age1nope",), "")


def test_repository_names_and_listing(tmp_path):
    repo = open_repository(f"file://{tmp_path}/r")
    for bad in ("", "/abs", "a/../b", "a//b"):
        with pytest.raises(RepoError):
            repo.open_write(bad)
    repo.put_bytes("backups/1/x", b"1")
    repo.put_bytes("backups/2/y", b"22")
    assert repo.sizes("backups/") == {"backups/1/x": 1, "backups/2/y": 2}
    repo.delete("backups/1/x")
    assert repo.keys("") == ["backups/2/y"] and not (tmp_path / "r" / "backups" / "1").exists()
    with pytest.raises(RepoError, match="missing"):
        repo.open_read("backups/1/x")
    with pytest.raises(RepoError):
        open_repository("relative/path")


def test_chain_order_and_missing_parent():
    def m(i, kind, parent):
        return Manifest(id=i, kind=kind, method=PHYSICAL, parent=parent, start=0, end=0, server="", address="",
                        server_id=1, server_role="replica", version="", gtid="")
    ms = [m("F", FULL, None), m("I1", INCREMENTAL, "F"), m("I2", INCREMENTAL, "I1")]
    assert [x.id for x in chain(ms, "I2")] == ["F", "I1", "I2"]
    with pytest.raises(KeyError):
        chain(ms[1:], "I2")


def test_option_files_left_by_killed_runs_are_removed_by_the_next_run(tmp_path, monkeypatch):
    """The option file with the password lives in a directory named with its run's pid; a run killed
    by SIGKILL cannot remove it, so each run removes those whose process is gone (and only those:
    a live run's, another name, a symlink stay)."""
    import subprocess
    import tempfile

    from proxy.backup.take import option_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = tmp_path / f"rwproxy-archive-{dead.pid}-k1ll3d"
    left.mkdir(mode=0o700)
    (left / "client.cnf").write_text("[client]\npassword=secret\n")
    live = tmp_path / f"rwproxy-backup-{os.getpid()}-running"
    live.mkdir()
    other = tmp_path / f"rwproxy-archive-{dead.pid}"  # (not a name option_dir makes)
    other.mkdir()
    link = tmp_path / f"rwproxy-backup-{dead.pid}-link"
    link.symlink_to(live)
    with option_dir("backup") as d:
        assert os.path.basename(d).startswith(f"rwproxy-backup-{os.getpid()}-") and os.stat(d).st_mode & 0o077 == 0
        assert not left.exists()
        assert live.exists() and other.exists() and link.is_symlink()
    assert not os.path.exists(d)
