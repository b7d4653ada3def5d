"""Backups against real servers: mariadb-backup and mariadb-dump into a directory and into a real S3
API server (moto's, on loopback), restores checked table by table, the binlog archive across a
killed archiver, a failover and a purge, point-in-time restores to recorded checksums across a
switchover, and the replica a backup pauses leaving the proxy's read pool."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pymysql
import pytest

from helpers import failover_section, proxy_config_dict, start_proxy, wait_until
from proxy.backup.binlog import covers, parse_position
from proxy.config.load import build_config, load_config, write_config
from proxy.runtime.launcher import free_port
from proxy.testing.clusters import start_cluster, teardown_cluster

MARKER = "PLAINTEXT-MARKER-7f3a9c"


def rw(*args, timeout=300, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"rwproxy {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r


def write_cfg(cluster, path: Path, nodes=None, **backup) -> str:
    data = {"proxy": {"listen": f"127.0.0.1:{free_port()}", "workers": 1},
            "backends": [{"name": n.name, "host": "127.0.0.1", "port": n.port} for n in nodes or cluster.nodes],
            "users": [{"name": "app", "password": "app"}],
            "monitor": {"user": "rwproxy", "password": cluster.password("rwproxy")},
            "failover": {"replication_user": "repl", "replication_password": cluster.password("repl")}, "backup": backup}
    write_config(build_config(data, source=str(path)), str(path))
    return str(path)


def checksum(node, table="app.bk") -> int:
    with node.connect() as c, c.cursor() as cur:
        cur.execute(f"CHECKSUM TABLE {table}")
        return int(cur.fetchone()[1])


def current_primary(cluster):
    for n in cluster.nodes:
        if n.is_running() and not int(n.variable("read_only")):
            return n
    raise AssertionError("no primary")


def write_rows(cluster, n, note="x"):
    with current_primary(cluster).connect(database="app") as c, c.cursor() as cur:
        cur.executemany("INSERT INTO bk (note) VALUES (%s)", [(f"{note}-{i}",) for i in range(n)])


def start_restored(out: dict):
    return pymysql.connect(unix_socket=out["socket"], user="root", password="", autocommit=True)


def stop_pid(pid: int, timeout: float = 30) -> None:
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def bk(tmp_path_factory):
    """Primary + 2 semi-sync replicas with app.bk, just for the backup tests (they switch it over)."""
    c = start_cluster(tmp_path_factory.mktemp("bkcluster"), replicas=2, semi_sync=True)
    with c.primary.connect() as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE app.bk (id INT AUTO_INCREMENT PRIMARY KEY, note VARCHAR(100), v INT DEFAULT 0)")
        cur.execute("CREATE TABLE app.secret (s VARCHAR(100))")
        cur.execute("INSERT INTO app.secret VALUES (%s)", (MARKER,))
    write_rows(c, 200)
    c.wait_replicas_caught_up(30)
    try:
        yield c
    finally:
        teardown_cluster(c)


@pytest.fixture(scope="module")
def keyfile(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("keys") / "backup.key")
    rw("backup", "keygen", "--out", path)
    return path


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on a loopback port, stopped by pid; a bucket made for the tests."""
    import boto3

    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                          aws_secret_access_key="test")
    try:
        assert wait_until(lambda: client.list_buckets() is not None, 30), "moto server did not start"
        client.create_bucket(Bucket="rwproxy-backups")
        yield {"endpoint": endpoint, "client": client}
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


# ---- taking, verifying and restoring ------------------------------------------------------------

def test_s3_backups_hold_no_plaintext_and_test_restore_matches(bk, keyfile, s3, tmp_path):
    from proxy.backup.codec import load_keys

    pub = load_keys((), keyfile).recipients[0]
    # the machine taking backups holds only the recipient: it can back up, not read them back
    cfg = write_cfg(bk, tmp_path / "enc.toml", repository="s3://rwproxy-backups/c1", s3_endpoint=s3["endpoint"],
                    s3_region="us-east-1", s3_access_key="test", s3_secret_key="test", recipients=[pub])
    full = rw("backup", "run", "-c", cfg).stdout.strip().splitlines()[-1]
    rw("backup", "run", "-c", cfg, "--method", "logical")
    r = rw("backup", "restore", "-c", cfg, "--target-dir", str(tmp_path / "no"), check=False)
    assert r.returncode == 1 and "private key" in r.stderr and not (tmp_path / "no").exists()
    # nothing stored holds the row in clear
    objs = s3["client"].list_objects_v2(Bucket="rwproxy-backups", Prefix="c1/")["Contents"]
    assert len(objs) == 4  # two data objects and two manifests
    for o in objs:
        body = s3["client"].get_object(Bucket="rwproxy-backups", Key=o["Key"])["Body"].read()
        assert MARKER.encode() not in body, o["Key"]
    # where the key is, the same repository verifies and test-restores
    cfg2 = write_cfg(bk, tmp_path / "dec.toml", repository="s3://rwproxy-backups/c1", s3_endpoint=s3["endpoint"],
                     s3_region="us-east-1", s3_access_key="test", s3_secret_key="test", key_file=keyfile)
    assert "all good" in rw("backup", "verify", "-c", cfg2).stdout
    for cmd in ("verify", "info", "test-restore"):  # an id that names no backup: one line, no traceback
        bad = rw("backup", cmd, "-c", cfg2, "../nope", check=False)
        assert bad.returncode == 1 and "Traceback" not in bad.stderr, (cmd, bad.stderr)
        assert bad.stderr.strip().startswith("rwproxy backup: no backup ../nope in s3://"), (cmd, bad.stderr)
    out = rw("backup", "test-restore", "-c", cfg2, full).stdout
    assert "checksums match the backup" in out, out
    info = json.loads(rw("backup", "info", "-c", cfg2, full).stdout)
    assert info["test_restore"]["ok"] and info["tables"]["app.bk"]["rows"] == 200
    assert info["server_role"] == "replica" and info["gtid"]
    listing = rw("backup", "list", "-c", cfg2).stdout
    assert full in listing and "OK" in listing
    # a wrong S3 secret is one clear line, not a traceback
    bad = write_cfg(bk, tmp_path / "bad.toml", repository="s3://no-such-bucket/x", s3_endpoint=s3["endpoint"],
                    s3_region="us-east-1", s3_access_key="test", s3_secret_key="test", key_file=keyfile)
    r = rw("backup", "list", "-c", bad, check=False)
    assert r.returncode == 1 and "no-such-bucket" in r.stderr and "Traceback" not in r.stderr


def test_restore_fails_before_touching_the_target(bk, keyfile, tmp_path):
    repo = tmp_path / "repo"
    cfg = write_cfg(bk, tmp_path / "c.toml", repository=f"file://{repo}", key_file=keyfile)
    bid = rw("backup", "run", "-c", cfg).stdout.strip().splitlines()[-1]
    other = str(tmp_path / "other.key")
    rw("backup", "keygen", "--out", other)
    wrong = write_cfg(bk, tmp_path / "w.toml", repository=f"file://{repo}", key_file=other)
    target = tmp_path / "target"
    r = rw("backup", "restore", "-c", wrong, "--target-dir", str(target), check=False)
    assert r.returncode == 1 and "cannot decrypt" in r.stderr and not target.exists(), r.stderr
    data = next((repo / "backups" / bid).glob("data.*"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 3] ^= 0x20
    data.write_bytes(bytes(raw))
    for cmd in (["restore", "--target-dir", str(target)], ["verify", bid]):
        r = rw("backup", *cmd, "-c", cfg, check=False)
        assert r.returncode == 1 and "SHA-256" in (r.stdout + r.stderr), r.stdout + r.stderr
    assert not target.exists() and not list(tmp_path.glob(".target*"))
    data.unlink()
    r = rw("backup", "restore", "-c", cfg, "--target-dir", str(target), check=False)
    assert r.returncode == 1 and "missing" in r.stderr and not target.exists()
    for bad in ("garbage", "0-1-", "0-1-5,0-2-3", "99999999999999999999-1-1"):  # (a ValueError traceback before)
        r = rw("backup", "restore", "-c", cfg, "--target-dir", str(target), "--gtid", bad, check=False)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip() == f"rwproxy backup: --gtid {bad!r}: expected DOMAIN-SERVER_ID-SEQUENCE, one per " \
                                   "domain, e.g. 0-1-1234 or 0-1-1234,1-2-56", r.stderr
    # an existing non-empty target is refused, and left as it was
    target.mkdir()
    (target / "keep").write_text("mine")
    r = rw("backup", "restore", "-c", cfg, "--target-dir", str(target), check=False)
    assert r.returncode == 1 and "not empty" in r.stderr and (target / "keep").read_text() == "mine"


def test_a_full_disk_or_a_missing_bucket_is_one_line_and_leaves_nothing(bk, keyfile, s3, small_disk, tmp_path):
    replica = next(n for n in bk.nodes if n is not current_primary(bk))
    full = write_cfg(bk, tmp_path / "full.toml", nodes=[current_primary(bk), replica],
                     repository=f"file://{small_disk}/repo", key_file=keyfile)
    for method in ("physical", "logical"):
        r = rw("backup", "run", "-c", full, "--method", method, check=False)
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert last.startswith("rwproxy backup: cannot write file://") and "No space left on device" in last, last
        # nothing half-written stays (the data object, its temporary file, its directory), and the
        # replica the backup paused replicates again
        assert [p for p in (small_disk / "repo").rglob("*") if p.is_file()] == [], method
        assert not [p for p in small_disk.rglob("*") if p.name[:1].isdigit()], method  # (nor its directory)
        assert "backup(s)" in rw("backup", "list", "-c", full).stdout
    with replica.connect() as c, c.cursor(pymysql.cursors.DictCursor) as cur:
        cur.execute("SHOW SLAVE STATUS")
        st = cur.fetchone()
        assert st["Slave_SQL_Running"] == "Yes" and st["Slave_IO_Running"] == "Yes"
    # a restore onto a disk that fills up: mbstream's own reason, one line, no staging left behind
    cfg = write_cfg(bk, tmp_path / "ok.toml", repository=f"file://{tmp_path / 'repo'}", key_file=keyfile)
    for method in ("physical", "logical"):
        bid = rw("backup", "run", "-c", cfg, "--method", method).stdout.strip().splitlines()[-1]
        target = small_disk / f"restore-{method}"
        r = rw("backup", "restore", "-c", cfg, "--backup", bid, "--target-dir", str(target), check=False)
        assert r.returncode == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
        assert "No space left on device" in r.stderr.strip().splitlines()[-1], r.stderr
        assert not target.exists() and not list(small_disk.glob(".restore*")), list(small_disk.iterdir())
    # a bucket that does not exist, found when the first object is written
    gone = write_cfg(bk, tmp_path / "gone.toml", repository="s3://no-such-bucket/x", s3_endpoint=s3["endpoint"],
                     s3_region="us-east-1", s3_access_key="test", s3_secret_key="test", key_file=keyfile,
                     method="logical")
    r = rw("backup", "run", "-c", gone, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "bucket no-such-bucket does not exist" in r.stderr.strip().splitlines()[-1], r.stderr


def test_incremental_and_logical_restores_hold_their_points_data(bk, keyfile, tmp_path):
    cfg = write_cfg(bk, tmp_path / "c.toml", repository=f"file://{tmp_path / 'repo'}", key_file=keyfile,
                    compress_level=3, checksum_tables=False)
    full = rw("backup", "run", "-c", cfg, "--full", "--from", "node3").stdout.strip().splitlines()[-1]
    write_rows(bk, 50, "incr")
    bk.wait_replicas_caught_up(30)
    at_incr = checksum(bk.node("node3"))
    inc = rw("backup", "run", "-c", cfg, "--incremental", "--from", "node3").stdout.strip().splitlines()[-1]
    assert inc.endswith("I")
    write_rows(bk, 30, "later")
    bk.wait_replicas_caught_up(30)
    log_ = rw("backup", "run", "-c", cfg, "--method", "logical").stdout.strip().splitlines()
    logical, at_logical = log_[-1], checksum(bk.node("node2"))
    info = json.loads(rw("backup", "info", "-c", cfg, inc).stdout)
    assert info["chain"] == [full, inc] and info["parent"] == full and info["from_lsn"] > 0
    assert info["compression"] == "zstd-3" and info["tables"] == {}  # compress_level, checksum_tables
    for bid, want in ((inc, at_incr), (logical, at_logical)):
        out = _json_tail(rw("backup", "restore", "-c", cfg, "--backup", bid, "--target-dir", str(tmp_path / bid),
                            "--start", "--json").stdout)
        assert (tmp_path / bid).stat().st_mode & 0o077 == 0, oct((tmp_path / bid).stat().st_mode)  # (data in clear)
        try:
            with start_restored(out) as c, c.cursor() as cur:
                cur.execute("CHECKSUM TABLE app.bk")
                assert int(cur.fetchone()[1]) == want, bid
        finally:
            stop_pid(out["pid"])


def _json_tail(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("\n{") + 1:] if not stdout.startswith("{") else stdout)


# ---- the binlog archive --------------------------------------------------------------------------

class ArchiverProcess:
    """`rwproxy backup archive` as a child, stopped (or killed) by its pid."""

    def __init__(self, cfg: str, log: Path):
        self.log = open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "proxy", "backup", "archive", "-c", cfg],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)  # its own session: the mariadb-binlog child goes too
            self.proc.wait(30)
        self.log.close()


def check_report(cfg: str) -> dict:
    r = rw("backup", "check", "-c", cfg, "--json", check=False)
    rep = json.loads(r.stdout)
    assert r.returncode == (0 if rep["ok"] else 1)
    return rep


def archive_catches_up(cfg: str, timeout: float) -> bool:
    """The archive comes to hold everything the primary had written when this was called. Not
    "no lag at all": while rwproxy runs, its monitor's heartbeat writes four times a second and
    the archive uploads once per archive_interval, so an exact match is a race (it failed about
    one run in two)."""
    target = None

    def caught_up() -> bool:
        nonlocal target
        rep = check_report(cfg)
        if rep["archive_lag_s"] == 0.0:
            return True
        if target is None and rep["primary"]:
            target = parse_position(rep["primary"]["gtid"])
        return bool(target and rep["archive_end"] and covers(parse_position(rep["archive_end"]), target))
    return wait_until(caught_up, timeout)


def test_archive_survives_archiver_kill_and_failover_and_reports_a_purge(bk, keyfile, tmp_path):
    cfg = write_cfg(bk, tmp_path / "c.toml", repository=f"file://{tmp_path / 'repo'}", key_file=keyfile,
                    archive_interval=0.5, spool_dir=str(tmp_path / "spool"))
    rw("backup", "run", "-c", cfg)
    a = ArchiverProcess(cfg, tmp_path / "archiver.log")
    try:
        write_rows(bk, 20, "a1")
        assert archive_catches_up(cfg, 30), check_report(cfg)
        assert list((tmp_path / "spool").iterdir())  # spool_dir is where the reader writes
    finally:
        a.kill()
    write_rows(bk, 20, "while-dead")  # archived when it comes back: no gap
    a = ArchiverProcess(cfg, tmp_path / "archiver2.log")
    p = start_proxy(bk, tmp_path / "proxy", proxy={"workers": 1}, failover=failover_section(bk))
    try:
        assert archive_catches_up(cfg, 30), check_report(cfg)
        old = current_primary(bk)
        old.kill(signal.SIGKILL)
        assert wait_until(lambda: current_primary(bk) is not old, 30)
        write_rows(bk, 20, "after-failover")
        assert archive_catches_up(cfg, 30), check_report(cfg)
        rep = check_report(cfg)
        assert rep["ok"] and not rep["gaps"], rep["lines"]
        new = current_primary(bk)
        assert rep["primary"]["name"] == new.name
    finally:
        a.kill()
        p.process.stop()
        old.start()  # it comes back; the proxy is gone, so rejoin it by hand as the sandbox would
        with old.connect() as c, c.cursor() as cur:
            cur.execute("SET GLOBAL read_only = 1")
            cur.execute("STOP SLAVE")
            # from where its own history ends (its slave position is empty or ancient): otherwise it
            # asks the new primary for binlogs the purge below removes, and stays broken (1236)
            cur.execute("SET GLOBAL gtid_slave_pos = @@gtid_binlog_pos")
            cur.execute("CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT=%s, MASTER_USER='repl', "
                        "MASTER_PASSWORD=%s, MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1",
                        (new.port, bk.password("repl")))
            cur.execute("START SLAVE")
    assert "is no longer the primary" in (tmp_path / "archiver2.log").read_text() or \
        "ended" in (tmp_path / "archiver2.log").read_text()
    # the archiver stopped; the primary's binlogs are purged before it could read them: a gap, named
    new = current_primary(bk)
    with new.connect() as c, c.cursor() as cur:
        cur.execute("SELECT @@gtid_binlog_pos")
        pos = cur.fetchone()[0]
    with old.connect() as c, c.cursor() as cur:  # the rejoined old primary has everything before the purge
        cur.execute("SELECT MASTER_GTID_WAIT(%s, 30)", (pos,))
        assert cur.fetchone()[0] == 0
    write_rows(bk, 20, "purged")
    with new.connect() as c, c.cursor() as cur:
        cur.execute("FLUSH BINARY LOGS")
        cur.execute("SHOW BINARY LOGS")
        newest = cur.fetchall()[-1][0]

        def purged():  # a file a replica's dump thread still reads is kept: retry until it moved on
            cur.execute(f"PURGE BINARY LOGS TO '{newest}'")
            cur.execute("SHOW BINARY LOGS")
            return [r[0] for r in cur.fetchall()] == [newest]
        assert wait_until(purged, 30)
    write_rows(bk, 5, "after-purge")
    a = ArchiverProcess(cfg, tmp_path / "archiver3.log")
    try:
        assert wait_until(lambda: check_report(cfg)["archive_lag_s"] == 0.0, 30), check_report(cfg)
    finally:
        a.kill()
    rep = check_report(cfg)
    assert not rep["ok"] and len(rep["gaps"]) == 1, rep["lines"]
    assert rep["unrecoverable_after_gap"]  # the backup taken before it cannot be recovered past it
    assert any("GAP" in ln for ln in rep["lines"])
    assert "purged before they were archived" in (tmp_path / "archiver3.log").read_text()


def test_two_archivers_of_one_repository_take_turns_instead_of_fighting(bk, keyfile, tmp_path):
    """`serve` and `backup daemon`, or every instance of a coordinated cluster, given the same
    [backup]: one archives, the other stands by (they used to kick each other off the primary every
    second and re-read the binlogs from the start), and takes over when the first stops."""
    cfg = write_cfg(bk, tmp_path / "c.toml", repository=f"file://{tmp_path / 'repo'}", key_file=keyfile,
                    archive_interval=0.5)
    logs = [tmp_path / "a1.log", tmp_path / "a2.log"]
    first = ArchiverProcess(cfg, logs[0])
    second = None
    try:
        assert wait_until(lambda: "reading" in logs[0].read_text(), 30), logs[0].read_text()
        second = ArchiverProcess(cfg, logs[1])
        assert wait_until(lambda: "standing by" in logs[1].read_text(), 30), logs[1].read_text()
        write_rows(bk, 5, "two-archivers")
        assert archive_catches_up(cfg, 30), check_report(cfg)
        gaps = check_report(cfg)["gaps"]  # (before the archive's start, earlier tests purged binlogs)
        time.sleep(3)
        for log in logs:  # (no reader kicked the other off the primary)
            assert "same server_uuid/server_id" not in log.read_text(), log.read_text()
        first.kill(signal.SIGTERM)
        assert wait_until(lambda: "the other archiver stopped; archiving from here" in logs[1].read_text(), 30), \
            logs[1].read_text()
        write_rows(bk, 5, "taken-over")
        assert archive_catches_up(cfg, 30), check_report(cfg)
        assert check_report(cfg)["gaps"] == gaps  # the hand-over left no gap of its own
    finally:
        first.kill()
        if second is not None:
            second.kill()


def test_a_follower_instance_leaves_the_schedules_to_the_leader(bk, keyfile, tmp_path):
    from proxy.backup.codec import load_keys
    from proxy.backup.daemon import BackupDaemon
    from proxy.backup.repo import open_repository

    cfg = write_cfg(bk, tmp_path / "c.toml", repository=f"file://{tmp_path / 'repo'}", key_file=keyfile,
                    schedule_full="* * * * *")
    ticks = iter([0, 60])
    t0 = time.time()
    lines: list[str] = []
    d = BackupDaemon(load_config(cfg), open_repository(f"file://{tmp_path / 'repo'}"), load_keys((), keyfile),
                     str(tmp_path / "spool"), log_step=lines.append, clock=lambda: t0 + next(ticks, 60),
                     may_run=lambda: False)
    d.run()
    try:
        assert wait_until(lambda: "scheduled full: left to the leader instance" in lines, 10), lines
    finally:
        d.join(30)
    assert not any("scheduled full starting" in ln for ln in lines) and not (tmp_path / "repo" / "backups").exists()


def _cmdline(pid: str) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _status(cfg: str) -> dict:
    return json.loads(rw("status", "--json", "-c", cfg, timeout=30).stdout)


def test_backup_takes_the_replica_out_of_the_read_pool_and_back(bk, keyfile, tmp_path):
    p = start_proxy(bk, tmp_path / "proxy", proxy={"workers": 1}, failover=failover_section(bk),
                    backup={"repository": f"file://{tmp_path / 'repo'}", "key_file": keyfile})
    cfg = p.process.config_path
    try:
        assert wait_until(lambda: sum(s["readable"] and s["role"] == "replica" for s in _status(cfg)["servers"]) == 2, 20)
        source = next(s["name"] for s in _status(cfg)["servers"] if s["role"] == "replica")
        errors, answered, seen, done = [], [], set(), threading.Event()

        def read():
            while not done.is_set():
                try:
                    with p.connect(autocommit=True) as c, c.cursor() as cur:
                        for _ in range(20):
                            cur.execute("SELECT COUNT(*), @@port FROM bk")
                            answered.append(cur.fetchone()[1])
                except pymysql.MySQLError as e:
                    errors.append(e)

        def watch():
            while not done.is_set():
                for s in _status(cfg)["servers"]:
                    if s["name"] == source:
                        seen.add(s["admin_state"])
                time.sleep(0.05)

        threads = [threading.Thread(target=read), threading.Thread(target=watch)]
        for t in threads:
            t.start()
        try:
            out = rw("backup", "run", "-c", cfg, "--from", source).stdout
        finally:
            done.set()
            for t in threads:
                t.join(30)
        assert "taken out of the running proxy's read pool" in out and "back in the running proxy's read pool" in out
        assert "offline" in seen, seen
        assert {s["name"]: s["admin_state"] for s in _status(cfg)["servers"]}[source] == ""
        assert not errors and answered, errors[:3]
        log = open(p.process.log_path).read()
        assert f"server {source} set OFFLINE" in log and f"server {source} set ONLINE" in log
    finally:
        p.process.stop()


def test_backup_daemon_runs_until_stopped_and_refuses_an_empty_plan(bk, keyfile, tmp_path):
    """(`rwproxy backup daemon` returned at once, having started its threads and stopped them.)"""
    idle = write_cfg(bk, tmp_path / "idle.toml", repository=f"file://{tmp_path / 'idle'}", key_file=keyfile)
    r = rw("backup", "daemon", "-c", idle, check=False)
    assert r.returncode == 1 and r.stderr.strip().startswith("rwproxy backup: nothing to run"), r.stderr
    repo = tmp_path / "repo"
    cfg = write_cfg(bk, tmp_path / "d.toml", repository=f"file://{repo}", key_file=keyfile, archive_binlogs=True,
                    archive_interval=1.0, spool_dir=str(tmp_path / "spool"))
    log = open(tmp_path / "daemon.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "backup", "daemon", "-c", cfg], stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        write_rows(bk, 5, note="daemon")
        assert wait_until(lambda: list(repo.glob("archive/*/*.json")), 60), open(tmp_path / "daemon.log").read()
        spools = [d for d in (tmp_path / "spool").iterdir() if d.is_dir()]  # binlogs in clear: owner only
        assert spools and all(d.stat().st_mode & 0o077 == 0 for d in spools), [oct(d.stat().st_mode) for d in spools]
        assert proc.poll() is None  # still running: it archives until told to stop
        # SIGHUP reloads (it used to end the daemon on the spot); a file that does not load changes nothing
        write_cfg(bk, Path(cfg), repository=f"file://{repo}", key_file=keyfile, archive_binlogs=True,
                  archive_interval=1.0, spool_dir=str(tmp_path / "spool"), schedule_full="0 3 * * *")
        proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "reloaded (SIGHUP)" in open(tmp_path / "daemon.log").read(), 20)
        assert 'backup schedules: full "0 3 * * *"' in open(tmp_path / "daemon.log").read()
        good = Path(cfg).read_text()
        Path(cfg).write_text(good + "\n[backup.nonsense]\n")
        proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "reload (SIGHUP) refused, the daemon keeps its settings: " in
                          open(tmp_path / "daemon.log").read(), 20), open(tmp_path / "daemon.log").read()
        Path(cfg).write_text(good)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert "backup daemon stopping" in open(tmp_path / "daemon.log").read()
    # the archiver stopped and the primary goes on writing: `check` fails once nothing arrived for
    # a minute (seen an hour later here), not while an upload is merely due
    from proxy.backup.check import check
    from proxy.backup.repo import open_repository

    write_rows(bk, 5, note="after-daemon")
    fresh = check(load_config(cfg), open_repository(f"file://{repo}"))
    assert not fresh["stale"], fresh["lines"]  # (ok or not by its gaps: earlier tests purged binlogs)
    late = check(load_config(cfg), open_repository(f"file://{repo}"), now=lambda: time.time() + 3600)
    assert not late["ok"] and late["stale"] and late["lines"][-1].startswith("NOT OK: nothing archived for"), late


def test_check_fails_when_backups_exist_but_nothing_was_ever_archived(bk, keyfile, tmp_path):
    """`backup check` with backups and an empty archive said "OK: no gap" (nothing stored, so
    nothing stale), while no point after the backups could be recovered. Now it fails once the
    primary has written and nothing arrived for a minute since the newest backup; with neither
    backups nor archive there is nothing to check, and that stays OK."""
    from proxy.backup.check import check
    from proxy.backup.manifest import Manifest
    from proxy.backup.repo import open_repository

    cfg = load_config(write_cfg(bk, tmp_path / "c.toml", repository=f"file://{tmp_path / 'r'}", key_file=keyfile))
    repo = open_repository(f"file://{tmp_path / 'r'}")
    assert check(cfg, repo)["ok"]
    p = current_primary(bk)
    now = time.time()
    m = Manifest(id="20261207-000000F", kind="full", method="logical", parent=None, start=now - 5, end=now,
                 server=p.name, address=f"127.0.0.1:{p.port}", server_id=1, server_role="primary", version="10.11",
                 gtid=p.variable("gtid_binlog_pos"), consistent_at=now)
    repo.put_bytes(m.key, m.to_json())
    write_rows(bk, 2, note="after-backup")
    assert not check(cfg, repo)["stale"]  # (an archiver gets a minute to upload)
    late = check(cfg, repo, now=lambda: time.time() + 3600)
    assert not late["ok"] and late["stale"], late["lines"]
    assert late["lines"][-1].startswith("NOT OK: nothing archived, and the primary wrote since the backups: no "
                                        "point in time after 20261207-000000F can be recovered"), late["lines"]


def test_expire_and_the_scheduler_keep_what_the_policy_says_with_real_backups(bk, keyfile, tmp_path):
    """`backup expire` (shown, then --yes) and the daemon's scheduled full, test restore and expiry,
    driven by a clock that moves a minute per tick (the cron's resolution), on real backups."""
    from proxy.backup.codec import load_keys
    from proxy.backup.daemon import BackupDaemon
    from proxy.backup.manifest import load_all
    from proxy.backup.repo import open_repository

    repo_dir = tmp_path / "repo"
    policy = dict(keep_daily=1, keep_weekly=0, keep_monthly=0, keep_min_full=1)
    cfg = write_cfg(bk, tmp_path / "c.toml", repository=f"file://{repo_dir}", key_file=keyfile, method="logical",
                    schedule_full="* * * * *", schedule_test_restore="* * * * *", **policy)
    a = rw("backup", "run", "-c", cfg).stdout.strip().splitlines()[-1]
    b = rw("backup", "run", "-c", cfg).stdout.strip().splitlines()[-1]
    stale = repo_dir / "backups" / "20200101-000000F" / "dump.sql.zst.age"  # a backup that never finished
    stale.parent.mkdir()
    stale.write_bytes(b"partial")
    shown = rw("backup", "expire", "-c", cfg).stdout
    assert f"delete  {a}\n" in shown and f"keep    {b}  (newest)" in shown, shown
    assert "delete  backups/20200101-000000F/dump.sql.zst.age (left by a backup that did not finish)" in shown
    assert "nothing deleted" in shown and stale.exists() and (repo_dir / "backups" / a / "manifest.json").exists()
    done = rw("backup", "expire", "-c", cfg, "--yes").stdout
    assert "deleted 1 backup(s)" in done and "1 object(s) of unfinished backups" in done, done
    assert not (repo_dir / "backups" / a).exists() and not stale.parent.exists()
    assert [m.id for m in load_all(open_repository(f"file://{repo_dir}"))] == [b]

    config = load_config(cfg)
    ticks = iter(range(0, 10**6, 60))
    clock_at = [time.time()]

    def clock():  # (the first two calls a minute apart: one round of jobs, then no minute passes)
        step = next(ticks)
        return clock_at[0] + min(step, 60)

    lines: list[str] = []
    d = BackupDaemon(config, open_repository(f"file://{repo_dir}"), load_keys((), keyfile),
                     str(tmp_path / "spool"), log_step=lines.append, clock=clock)
    d.run()
    try:
        assert wait_until(lambda: d.status()["last_test_restore_ok"] is not None and d.status()["backups"] == 1
                          and any("test-restore" in ln for ln in lines), 300), lines
    finally:
        d.join(120)
    st = d.status()
    assert st["last_backup_ok"] and st["jobs_failed"] == 0 and st["last_test_restore_ok"], (st, lines)
    ms = load_all(open_repository(f"file://{repo_dir}"))
    assert len(ms) == 1 and ms[0].id != b and ms[0].test_restore.get("ok"), [(m.id, m.test_restore) for m in ms]
    assert any(f"retention: deleted backup(s) {b}" in ln for ln in lines), lines


def test_a_backup_killed_mid_way_does_not_leave_its_replica_paused(bk, keyfile, tmp_path):
    """SIGKILL (the OOM killer) while the replica's SQL thread is stopped and it is out of the read
    pool: its lock goes with its connection, and the proxy resumes it. A second backup of a replica
    already paused is refused instead of pausing it twice. (The backup program is a command_prefix
    wrapper that records its pid and sleeps: still under way when the kill comes.)"""
    from proxy.backup.servers import BackupError, inspect
    from proxy.backup.take import PAUSE_LOCK, replica_paused

    pidfile = tmp_path / "program.pid"
    p = start_proxy(bk, tmp_path / "proxy", proxy={"workers": 1}, failover=failover_section(bk),
                    backup={"repository": f"file://{tmp_path / 'repo'}", "key_file": keyfile,
                            "command_prefix": f'sh -c "echo $$ > {pidfile}; exec sleep 120" wrapper'})
    cfg = p.process.config_path
    try:
        assert wait_until(lambda: sum(s["readable"] and s["role"] == "replica" for s in _status(cfg)["servers"]) == 2, 20)
        out = tmp_path / "backup.out"
        with open(out, "wb") as f:
            proc = subprocess.Popen([sys.executable, "-m", "proxy", "backup", "run", "-c", cfg], stdout=f,
                                    stderr=subprocess.STDOUT)
        try:
            assert wait_until(lambda: "checksums of" in out.read_text() and pidfile.exists(), 60), out.read_text()
            source = out.read_text().split("replication SQL thread stopped")[0].rsplit("\n", 1)[-1].split(":")[0]
            node = bk.node(source)
            assert (node.slave_status() or {}).get("Slave_SQL_Running") == "No"
        finally:
            proc.kill()
            proc.wait(30)
            if pidfile.exists():
                try:
                    os.kill(int(pidfile.read_text()), signal.SIGKILL)  # (the orphaned program)
                except (ProcessLookupError, ValueError):
                    pass
        assert "done" not in out.read_text()  # (killed before it finished)
        assert wait_until(lambda: (node.slave_status() or {}).get("Slave_SQL_Running") == "Yes", 20), node.slave_status()
        assert wait_until(lambda: {s["name"]: s["admin_state"] for s in _status(cfg)["servers"]}[source] == "", 10)
        assert "ended without putting it back" in open(p.process.log_path).read()
        # a replica another backup has paused is not paused twice
        config = load_config(cfg)
        backend = next(b for b in config.backends if b.name == source)
        with node.connect() as holder, holder.cursor() as cur:
            cur.execute("SELECT GET_LOCK(%s, 0)", (PAUSE_LOCK,))
            with pytest.raises(BackupError, match="paused by another backup"):
                with replica_paused(config, inspect(config, backend)):
                    raise AssertionError("paused twice")
    finally:
        p.process.stop()


@pytest.mark.parametrize("when", ["program running", "as the pause begins"])
def test_stopping_the_daemon_mid_backup_cancels_it_and_resumes_the_replica(bk, keyfile, tmp_path, when):
    """serve or `backup daemon` stopping while a scheduled backup runs: the backup program is ended,
    the backup fails the ordinary way (nothing stored), and its replica replicates again, instead of
    the job being cut off with the process and the replica left paused. (The program here is a
    command_prefix wrapper that only sleeps: it is still under way when the stop comes.)"""
    from proxy.backup.codec import load_keys
    from proxy.backup.daemon import BackupDaemon
    from proxy.backup.manifest import load_all
    from proxy.backup.repo import open_repository

    repo_dir = tmp_path / "repo"
    pidfile = tmp_path / "program.pid"
    cfg = write_cfg(bk, tmp_path / "c.toml", repository=f"file://{repo_dir}", key_file=keyfile,
                    schedule_full="* * * * *", command_prefix=f'sh -c "echo $$ > {pidfile}; exec sleep 120" wrapper')
    ticks = iter([0, 60])
    clock_at = time.time()
    lines: list[str] = []
    d = BackupDaemon(load_config(cfg), open_repository(f"file://{repo_dir}"), load_keys((), keyfile),
                     str(tmp_path / "spool"), log_step=lines.append, clock=lambda: clock_at + next(ticks, 60))
    d.run()
    try:
        assert wait_until(lambda: any("replication SQL thread stopped" in ln for ln in lines), 60), lines
        if when == "program running":  # (else: at once, most likely before the program starts)
            assert wait_until(pidfile.exists, 30), lines
        source = next(ln.split(":")[0] for ln in lines if "replication SQL thread stopped" in ln)
        assert (bk.node(source).slave_status() or {}).get("Slave_SQL_Running") == "No"
    finally:
        d.join(60)
    assert not any(t.is_alive() for t in d.threads), lines  # (join waits 60 s; the program sleeps 120)
    assert any("the backup under way is cancelled" in ln for ln in lines), lines
    assert (bk.node(source).slave_status() or {}).get("Slave_SQL_Running") == "Yes"
    st = d.status()
    assert st["jobs_failed"] == 1 and st["last_backup_ok"] is False, st
    assert load_all(open_repository(f"file://{repo_dir}")) == [] and not list(repo_dir.rglob("*.age"))


def test_a_replica_that_moves_during_its_backup_fails_the_backup(bk, keyfile, tmp_path):
    """A backup's data and its recorded GTID must be of one moment. Something restarting the paused
    replica's SQL thread mid-way (a failover repointing it, an operator) would make a mix whose
    point-in-time replay applies transactions twice: the backup is refused and nothing stays."""
    from proxy.backup.codec import load_keys
    from proxy.backup.repo import open_repository
    from proxy.backup.take import run_backup

    home = tmp_path / "home"
    home.mkdir()
    (home / ".my.cnf").write_text(f"[mariadb-backup]\npassword={bk.password('rwproxy')}\n")
    wrapper = tmp_path / "slow-backup"  # (stands in for ssh; gives the test a moment mid-backup)
    wrapper.write_text(f"#!/bin/sh\nsleep 3\nHOME={home} exec \"$@\"\n")
    wrapper.chmod(0o755)
    repo_dir = tmp_path / "repo"
    cfg = write_cfg(bk, tmp_path / "c.toml", repository=f"file://{repo_dir}", key_file=keyfile,
                    command_prefix=str(wrapper))
    lines: list[str] = []
    result: dict = {}

    def take():
        try:
            result["m"] = run_backup(load_config(cfg), open_repository(f"file://{repo_dir}"), load_keys((), keyfile),
                                     log_step=lines.append, tty=False)
        except Exception as e:  # noqa: BLE001 - what the test looks at
            result["e"] = e

    t = threading.Thread(target=take)
    t.start()
    try:
        assert wait_until(lambda: any("checksums of" in ln for ln in lines), 60), lines
        source = bk.node(next(ln.split(":")[0] for ln in lines if "replication SQL thread stopped" in ln))
        source.query("START SLAVE SQL_THREAD")  # (what a failover's repointing does)
        write_rows(bk, 3, "moved")
    finally:
        t.join(120)
    err = result.get("e")
    assert err is not None and "moved during the backup" in str(err), (result, lines)
    assert not list(repo_dir.rglob("*.age")) and not list(repo_dir.rglob("manifest.json"))
    assert wait_until(lambda: (source.slave_status() or {}).get("Slave_SQL_Running") == "Yes", 10)


def test_serve_archives_binlogs_and_exports_backup_metrics(bk, keyfile, tmp_path):
    import urllib.request

    mport = free_port()
    repo = tmp_path / "repo"
    p = start_proxy(bk, tmp_path / "proxy", proxy={"workers": 1}, failover=failover_section(bk),
                    metrics={"listen": f"127.0.0.1:{mport}"},
                    backup={"repository": f"file://{repo}", "key_file": keyfile, "archive_binlogs": True,
                            "archive_interval": 0.5, "archive_server_id": 4100000123})
    cfg = p.process.config_path
    try:
        rw("backup", "run", "-c", cfg)
        write_rows(bk, 10, "serve")
        assert archive_catches_up(cfg, 30), check_report(cfg)
        assert list(repo.glob("archive/*/*.json"))
        readers = [pid for pid in os.listdir("/proc") if pid.isdigit() and
                   b"--stop-never-slave-server-id=4100000123" in _cmdline(pid)]
        assert len(readers) == 1  # the reader registers with archive_server_id

        def metrics() -> str:
            return urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()

        def gauge(name: str) -> float | None:
            for line in metrics().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
            return None

        # the monitor's heartbeat writes 4 times a second, so the archive is "current" within an upload
        assert wait_until(lambda: gauge("rwproxy_backup_archive_lag_seconds") < 5, 20), metrics()
        assert wait_until(lambda: gauge("rwproxy_backup_repository_bytes") > 0, 40), metrics()  # listed every 15 s
        rows = {r["name"]: r["value"] for r in json.loads(rw("status", "--json", "--tables", "status", "-c", cfg).stdout)
                ["tables"]["status"]}
        assert float(rows["backup_archive_lag_s"]) < 5 and int(rows["backup_repository_bytes"]) > 0
    finally:
        p.process.stop()
    # the reader stopped with the proxy (its pid was the proxy's child)
    log = open(p.process.log_path).read()
    assert "binlog archiver: reading" in log


def test_a_reload_starts_moves_and_stops_the_archiver_and_the_schedules(bk, keyfile, tmp_path):
    """[backup] keys are reloadable: a reload that turns archiving on starts it, one that changes
    where it writes restarts it there, one that turns everything off stops it (they used to be
    reported as changed while the running daemon kept the settings it started with)."""
    repo1, repo2 = tmp_path / "repo1", tmp_path / "repo2"
    base = {"repository": f"file://{repo1}", "key_file": keyfile}
    sections = dict(proxy={"workers": 1}, failover=failover_section(bk))
    p = start_proxy(bk, tmp_path / "proxy", backup=base, **sections)
    cfg = p.process.config_path

    def reload_with(**backup):
        write_config(build_config(proxy_config_dict(bk, p.port, backup={**base, **backup}, **sections), source=cfg), cfg)
        out = rw("reload", "-c", cfg).stdout
        assert out.startswith("reloaded") and "needs a restart" not in out, out

    def readers() -> list[str]:
        return [pid for pid in os.listdir("/proc") if pid.isdigit()
                and b"--stop-never-slave-server-id=4100000777" in _cmdline(pid)]

    archive = dict(archive_binlogs=True, archive_interval=0.5, archive_server_id=4100000777)
    try:
        assert not readers()
        reload_with(**archive)
        write_rows(bk, 3, "reload-on")
        assert wait_until(lambda: list(repo1.glob("archive/*/*.json")), 30), open(p.process.log_path).read()[-2000:]
        assert wait_until(lambda: len(readers()) == 1, 10)
        reload_with(**archive, schedule_full="0 3 * * *")  # a schedule: the archiver reads on
        first = readers()
        assert first and "backup schedules: full \"0 3 * * *\"" in open(p.process.log_path).read()
        base["repository"] = f"file://{repo2}"
        reload_with(**archive)  # another repository: the archiver starts again, writing there
        write_rows(bk, 3, "reload-moved")
        assert wait_until(lambda: list(repo2.glob("archive/*/*.json")), 30), open(p.process.log_path).read()[-2000:]
        assert wait_until(lambda: len(readers()) == 1 and readers() != first, 10), (first, readers())
        reload_with()  # nothing to run any more
        assert wait_until(lambda: not readers(), 15), readers()
        assert "no schedule and no archiving in the config any more; stopped" in open(p.process.log_path).read()
    finally:
        p.process.stop()


def test_point_in_time_restores_match_checksums_recorded_across_a_switchover(bk, keyfile, tmp_path):
    """A writer changes a table through rwproxy (a switchover in the middle); every second the
    writes pause at a whole second and (time, GTID, CHECKSUM TABLE) is recorded; a full and an
    incremental backup are taken meanwhile; restores to 10 recorded points in random order, by
    time and by GTID, each give exactly the recorded checksum."""
    rounds = 60 if os.environ.get("RWPROXY_SLOW") == "1" else 14
    cfg = write_cfg(bk, tmp_path / "c.toml", repository=f"file://{tmp_path / 'repo'}", key_file=keyfile,
                    archive_interval=1.0, spool_dir=str(tmp_path / "spool"))
    p = start_proxy(bk, tmp_path / "proxy", proxy={"workers": 1}, failover=failover_section(bk))
    archiver = ArchiverProcess(cfg, tmp_path / "archiver.log")
    rng = random.Random(23)
    points, backups, errors = [], [], []
    try:
        with p.connect(autocommit=True) as c, c.cursor() as cur:
            cur.execute("CREATE TABLE pitr (id INT PRIMARY KEY, v INT NOT NULL)")
            cur.execute("INSERT INTO pitr VALUES " + ",".join(f"({i}, 0)" for i in range(200)))
        next_id = 200

        def backup(kind):
            try:
                backups.append(rw("backup", "run", "-c", cfg, f"--{kind}").stdout.strip().splitlines()[-1])
            except AssertionError as e:
                errors.append(e)

        bt = None
        for r in range(rounds):
            if r == 1:
                bt = threading.Thread(target=backup, args=("full",))
                bt.start()
            if r == rounds // 2:
                bt.join(120)
                replica = next(s["name"] for s in _status(p.process.config_path)["servers"]
                               if s["role"] == "replica" and s["readable"])
                rw("switchover", "-c", p.process.config_path, "--to", replica, timeout=120)
            if r == rounds // 2 + 2:
                bt = threading.Thread(target=backup, args=("incremental",))
                bt.start()
            stop = time.time() + 0.6
            with p.connect(autocommit=True) as c, c.cursor() as cur:
                while time.time() < stop:
                    if rng.random() < 0.2:
                        cur.execute("INSERT INTO pitr VALUES (%s, 1)", (next_id,))
                        next_id += 1
                    else:
                        cur.execute("UPDATE pitr SET v = v + 1 WHERE id = %s", (rng.randrange(next_id),))
            now = time.time()
            time.sleep(int(now) + 1 - now + 0.05)  # every write so far has a binlog time before T
            boundary = float(int(time.time()))
            prim = current_primary(bk)
            with prim.connect() as c, c.cursor() as cur:
                cur.execute("SELECT @@gtid_binlog_pos")
                gtid = cur.fetchone()[0]
            points.append((boundary, gtid, checksum(prim, "app.pitr")))
        bt.join(120)
        assert not errors and len(backups) == 2, errors
        assert archive_catches_up(cfg, 30), check_report(cfg)
        assert check_report(cfg)["ok"]
    finally:
        archiver.kill()
        p.process.stop()
    full = json.loads(rw("backup", "info", "-c", cfg, backups[0]).stdout)
    usable = [pt for pt in points if pt[0] >= full["consistent_at"] + 1]
    assert len(usable) >= 10, (len(usable), full["consistent_at"], points[0])
    chosen = rng.sample(usable, 10)
    for i, (t, gtid, want) in enumerate(chosen):
        by = ["--time", time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t))] if i % 2 == 0 else ["--gtid", gtid]
        out = _json_tail(rw("backup", "restore", "-c", cfg, *by, "--target-dir", str(tmp_path / f"r{i}"),
                            "--start", "--json").stdout)
        try:
            with start_restored(out) as c, c.cursor() as cur:
                cur.execute("CHECKSUM TABLE app.pitr")
                got = int(cur.fetchone()[1])
        finally:
            stop_pid(out["pid"])
        assert got == want, f"restore {by}: checksum {got}, recorded {want} (point {points.index((t, gtid, want))})"
    # a time past 2038 (mariadb-binlog's --stop-datetime wraps it): everything archived, as for any later time
    out = _json_tail(rw("backup", "restore", "-c", cfg, "--time", "2040-01-01 00:00:00Z", "--target-dir",
                        str(tmp_path / "r2040"), "--start", "--json").stdout)
    try:
        with start_restored(out) as c, c.cursor() as cur:
            cur.execute("CHECKSUM TABLE app.pitr")
            assert int(cur.fetchone()[1]) == points[-1][2]
    finally:
        stop_pid(out["pid"])


def test_backup_keys_method_credentials_from_primary_catchup_and_command_prefix(bk, keyfile, tmp_path):
    repo = f"file://{tmp_path / 'repo'}"
    cfg = write_cfg(bk, tmp_path / "m.toml", repository=repo, key_file=keyfile, method="logical")
    bid = rw("backup", "run", "-c", cfg).stdout.strip().splitlines()[-1]
    assert json.loads(rw("backup", "info", "-c", cfg, bid).stdout)["method"] == "logical"
    bad = write_cfg(bk, tmp_path / "u.toml", repository=repo, key_file=keyfile, user="rwproxy", password="wrong")
    r = rw("backup", "run", "-c", bad, check=False)
    assert r.returncode == 1 and "Access denied" in r.stderr and "Traceback" not in r.stderr, r.stderr
    prim = current_primary(bk)
    only = write_cfg(bk, tmp_path / "p.toml", nodes=[prim], repository=repo, key_file=keyfile)
    r = rw("backup", "run", "-c", only, check=False)
    assert r.returncode == 1 and "no healthy replica" in r.stderr and "from_primary" in r.stderr
    allowed = write_cfg(bk, tmp_path / "p2.toml", nodes=[prim], repository=repo, key_file=keyfile, from_primary=True)
    bid = rw("backup", "run", "-c", allowed).stdout.strip().splitlines()[-1]
    info = json.loads(rw("backup", "info", "-c", allowed, bid).stdout)
    assert info["server_role"] == "primary" and info["gtid"] and info["tables"] == {}  # GTID from mariadb-backup
    # catchup_timeout: a replica that cannot catch up (its IO thread stopped) is handed back after it
    rep = next(n for n in bk.nodes if n is not prim and n.is_running())
    with rep.connect() as c, c.cursor() as cur:
        cur.execute("STOP SLAVE IO_THREAD")
    try:
        write_rows(bk, 5, "unseen")
        quick = write_cfg(bk, tmp_path / "q.toml", repository=repo, key_file=keyfile, catchup_timeout=1.0)
        out = rw("backup", "run", "-c", quick, "--from", rep.name, timeout=120).stdout
        assert "not caught up within catchup_timeout (1 s)" in out, out
    finally:
        with rep.connect() as c, c.cursor() as cur:
            cur.execute("START SLAVE IO_THREAD")
    # command_prefix: mariadb-backup runs through it (here a wrapper standing in for ssh, whose
    # home holds the option file with the password, as a remote account's would)
    home = tmp_path / "home"
    home.mkdir()
    (home / ".my.cnf").write_text(f"[mariadb-backup]\npassword={bk.password('rwproxy')}\n")
    wrapper = tmp_path / "remote.sh"
    wrapper.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/called\nHOME={home} exec \"$@\"\n")
    wrapper.chmod(0o755)
    via = write_cfg(bk, tmp_path / "r.toml", repository=repo, key_file=keyfile, command_prefix=str(wrapper))
    bid = rw("backup", "run", "-c", via).stdout.strip().splitlines()[-1]
    assert (tmp_path / "called").read_text().startswith("mariadb-backup --user=rwproxy")
    assert "all good" in rw("backup", "verify", "-c", via, bid).stdout


def test_sandbox_seeds_a_new_replica_from_a_backup(cluster_factory):
    """The sandbox's own config has a [backup] section and key: a backup, then add-replica from it."""
    from proxy.sandbox import Cluster

    c = cluster_factory(replicas=1)
    cfg = str(c.config_path)
    with c.primary.connect() as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE app.seed (id INT PRIMARY KEY, v VARCHAR(20))")
        cur.execute("INSERT INTO app.seed VALUES (1, 'before')")
    c.wait_replicas_caught_up(30)
    bid = rw("backup", "run", "-c", cfg).stdout.strip().splitlines()[-1]
    with c.primary.connect() as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO app.seed VALUES (2, 'after')")  # replicated to the new node from the GTID on
    out = rw("sandbox", "add-replica", "--dir", str(c.dir), "--from-backup", bid).stdout
    again = Cluster(c.dir)
    node = again.node("node3")
    try:
        assert "seeded from" in out and node.slave_status()["Slave_SQL_Running"] == "Yes"
        assert wait_until(lambda: checksum(node, "app.seed") == checksum(c.primary, "app.seed"), 30)
        assert 'name = "node3"' in c.config_path.read_text()
    finally:
        node.stop()


def test_a_scratch_server_without_grants_takes_no_tcp_logins(tmp_path):
    """Test restores and point-in-time replays run mariadbd with skip-grant-tables, under which
    MariaDB lets any user in over TCP: the scratch listens on its private unix socket only."""
    from proxy.backup.restore import Scratch
    from proxy.backup.take import tool
    from proxy.sandbox.template import copy_datadir, template_datadir

    datadir = tmp_path / "data"
    copy_datadir(template_datadir(tool("mariadb-install-db"), tool("mariadbd")), datadir)
    port = free_port()
    with Scratch(datadir, port, grants=False) as s:
        with s.connect() as c, c.cursor() as cur:  # root, over the socket
            cur.execute("SELECT COUNT(*) FROM mysql.user")
        with pytest.raises(pymysql.err.OperationalError) as e:
            pymysql.connect(host="127.0.0.1", port=port, user="nobody", password="x", connect_timeout=3)
        assert e.value.args[0] == 2003, e.value  # nothing listens there
        assert (os.stat(s.socket).st_mode & 0o777) and (os.stat(os.path.dirname(s.socket)).st_mode & 0o077) == 0
    assert not os.path.exists(os.path.dirname(s.socket))  # its private directory went with it
    # restore --start leaves its server running: the socket goes in the datadir, not in a directory
    # of /tmp that would outlive the server (718 of them had piled up on a test machine)
    assert os.path.dirname(Scratch(datadir, 0, grants=False, lasting=True).socket) == str(datadir.resolve())
