"""Restoring: a backup chain, then archived binlogs up to a time or a GTID; and proving backups.

Everything is downloaded, hash-checked, decrypted and decompressed into a staging directory
beside the target first; only when all of it was good, and the data prepared (and binlogs
replayed), is the staging directory renamed to the target. So a wrong key, a flipped byte or a
missing object fails before the target is touched. Binlog replay runs in a private mariadbd
(grants skipped, its own socket) fed by `mariadb-binlog --start-position=<GTID after the
backup>` per archived file, so each transaction is applied exactly once even where two servers'
archived binlogs overlap after a failover.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pymysql

from proxy.backup import codec
from proxy.backup.archive import ArchivedFile, load_archive, walk
from proxy.backup.binlog import Position, covers, format_position, parse_position
from proxy.backup.manifest import LOGICAL, Manifest, chain, iso, load_all
from proxy.backup.progress import Progress
from proxy.backup.repo import RepoError, Repository
from proxy.backup.servers import BackupError, quote_ident, user_tables
from proxy.logs import clean
from proxy.backup.take import tool

log = logging.getLogger("rwproxy.backup")


def parse_time(text: str) -> float:
    """"2026-12-01 12:00:00" (this machine's local time), or with a zone ("...Z", "+01:00")."""
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise BackupError(f"--time {text!r}: expected YYYY-MM-DD HH:MM:SS (local time) or ISO 8601 with a zone") from None
    return dt.timestamp() if dt.tzinfo else time.mktime(dt.timetuple()) + dt.microsecond / 1e6


# ---- a private mariadbd on a restored datadir ----------------------------------------------------

class Scratch:
    """mariadbd on `datadir`, loopback only, its files beside the data, signalled by pid only."""

    def __init__(self, datadir: Path, port: int, *, grants: bool, server_id: int = 1, writable: bool = False,
                 lasting: bool = False):
        from proxy.sandbox.node import Node
        from proxy.sandbox.util import find_free_base_port

        port = port or find_free_base_port(1, start=45000 + os.getpid() % 5000)  # (0: any free one)
        self.datadir = datadir
        # A server left running (restore --start) keeps its socket in its datadir (none left behind)
        own = lasting and len(str(Path(datadir).resolve() / "mysql.sock")) < 100
        sockdir = Path(datadir).resolve() if own else Path(tempfile.mkdtemp(prefix="rwp-restore-", dir="/tmp"))
        self.sockdir = None if own else sockdir
        spec = {"name": "restored", "role": "primary" if writable else "replica", "port": port,
                "server_id": server_id, "dir": str(datadir), "datadir": str(datadir),
                "socket": str(sockdir / "mysql.sock"), "pid_file": str(datadir / "mariadbd.pid"),
                "cnf": str(datadir / "rwproxy-restored.cnf"), "error_log": str(datadir / "error.log")}
        # Without grants, the unix socket in a private directory is the only way in: MariaDB lets
        # anyone log in over TCP under skip-grant-tables (checked: any user, any password), and a
        # test restore of production data would otherwise be open to every local user meanwhile.
        self.node = Node(spec, mariadbd=tool("mariadbd"),
                         options=() if grants else ("skip-grant-tables", "skip-networking"))
        self.grants = grants

    @property
    def socket(self) -> str:
        return str(self.node.socket)

    def start(self, timeout: float = 120) -> None:
        self.node.write_cnf()
        self.node.spawn()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.node.connect(connect_timeout=1).close()
                return
            except pymysql.err.OperationalError as e:
                if e.args and e.args[0] in (1045, 1698):  # up, and refusing root: the restored grants
                    return
            if not self.node.is_running() or time.monotonic() > deadline:
                from proxy.sandbox.util import tail

                self.stop()
                raise BackupError(f"the restored server did not start; last lines of {self.node.error_log}:\n"
                                  + tail(self.node.error_log, 8))
            time.sleep(0.2)

    def connect(self, **kw):
        return self.node.connect(**kw)

    def stop(self) -> None:
        self.node.stop()

    def cleanup(self) -> None:
        shutil.rmtree(self.sockdir, ignore_errors=True) if self.sockdir is not None else None

    def __enter__(self) -> "Scratch":
        """`with Scratch(...) as s:` a server that lives for one step: started, then stopped and
        its socket directory removed however the step ends."""
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self.cleanup()


# ---- choosing what to restore ---------------------------------------------------------------------

@dataclass
class Plan:
    backups: list[Manifest]          # the chain, full first
    binlogs: list[ArchivedFile]      # archived files to replay, in order
    start: Position                  # the chain's consistent point
    stop_gtid: str = ""
    stop_time: float | None = None

    @property
    def last(self) -> Manifest:
        return self.backups[-1]


def backup_chain(repo: Repository, manifests: list[Manifest], bid: str) -> list[Manifest]:
    """manifest.chain(), with a missing backup or parent said in one line (BackupError)."""
    try:
        return chain(manifests, bid)
    except KeyError as e:
        if e.args[0] == bid:
            raise BackupError(f"no backup {clean(bid, 100)} in {repo.url}; `rwproxy backup list` shows them") from None
        raise BackupError(f"backup {bid} needs {e.args[0]}, which is not in the repository") from None


def _gtid_target(text: str):
    """--gtid as a position, or one line saying what a GTID looks like (a ValueError's traceback before)."""
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if parts and all(re.fullmatch(r"\d{1,10}-\d{1,10}-\d{1,20}", p) for p in parts):
        pos = parse_position(text)
        if len(pos) == len(parts) and all(d < 2**32 and s < 2**32 and n < 2**64 for d, (s, n) in pos.items()):
            return pos
    raise BackupError(f"--gtid {text!r}: expected DOMAIN-SERVER_ID-SEQUENCE, one per domain, e.g. 0-1-1234 "
                      f"or 0-1-1234,1-2-56")


def plan(repo: Repository, *, bid: str | None = None, at_time: float | None = None, at_gtid: str | None = None,
         manifests: list[Manifest] | None = None) -> Plan:
    manifests = load_all(repo) if manifests is None else manifests
    if not manifests:
        raise BackupError(f"no finished backup in {repo.url}")
    target_pos = _gtid_target(at_gtid) if at_gtid else None
    if bid:
        m = None  # (backup_chain names it if it is not there)
    elif at_time is not None or target_pos is not None:
        def before(m: Manifest) -> bool:
            if not m.gtid:
                return False
            if target_pos is not None:
                return covers(target_pos, parse_position(m.gtid))
            return (m.consistent_at or m.end) <= at_time

        ok = [m for m in manifests if before(m)]
        if not ok:
            what = at_gtid if at_gtid else iso(at_time)
            raise BackupError(f"no backup was taken before {what}; the oldest is {manifests[0].id} "
                              f"({iso(manifests[0].consistent_at or manifests[0].end)}, GTID {manifests[0].gtid or '-'})")
        m = ok[-1]
    else:
        m = manifests[-1]
    backups = backup_chain(repo, manifests, bid or m.id)
    m = backups[-1]
    p = Plan(backups, [], parse_position(m.gtid), at_gtid or "", at_time)
    if at_time is None and target_pos is None:
        return p
    if not m.gtid:
        raise BackupError(f"backup {m.id} has no recorded GTID position: point-in-time recovery cannot start from it")
    if target_pos is not None and covers(p.start, target_pos):
        return p  # the backup stopped exactly there (mariadb-binlog refuses a stop position equal to the start)
    w = walk(load_archive(repo), p.start, stop_at_gap=True)
    if target_pos is not None:
        if not covers(w.end, target_pos):
            why = f"; {w.gaps[0].describe()}" if w.gaps else ""
            raise BackupError(f"the binlog archive reaches only {format_position(w.end) or '(nothing)'} after backup "
                              f"{m.id}, not {at_gtid}{why}")
        for a in w.files:
            if covers(p.start, parse_position(a.end)):
                continue
            p.binlogs.append(a)
            if covers(parse_position(a.end), target_pos):
                break
    else:
        if w.end_ts is None or w.end_ts < at_time - 1:
            if w.gaps:
                raise BackupError(f"cannot recover to {iso(at_time)}: {w.gaps[0].describe()}")
            newest = iso(w.end_ts) if w.end_ts else "nothing after the backup"
            if w.end_ts is None or w.end_ts < at_time - 60:
                log.warning("the binlog archive's last transaction is at %s; restoring to %s replays up to it",
                            newest, iso(at_time))
        p.binlogs = [a for a in w.files if a.first_ts is None or a.first_ts < at_time]
    return p


# ---- steps ----------------------------------------------------------------------------------------

def fetch(repo: Repository, keys: codec.Keys, key: str, sha256: str, out, *, name: str, progress=None) -> int:
    try:
        src = repo.open_read(key)
    except RepoError as e:
        raise BackupError(str(e)) from None
    try:
        return codec.decode(src, out, keys, sha256=sha256, name=name, progress=progress)
    except codec.CodecError as e:
        raise BackupError(str(e)) from None
    finally:
        src.close()


def _extract_physical(repo, keys, m: Manifest, into: Path, progress) -> None:
    into.mkdir(parents=True, mode=0o700)
    proc = subprocess.Popen([tool("mbstream"), "-x", "-C", str(into)], stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        for o in m.objects:
            fetch(repo, keys, o.key, o.sha256, proc.stdin, name=f"backup {m.id} ({o.key})", progress=progress)
        proc.stdin.close()
    except OSError:  # mbstream stopped reading (a full disk): its own message says why
        proc.kill()
        err = proc.stderr.read().decode("utf-8", "replace")
        proc.wait()
        raise BackupError(f"mbstream could not unpack backup {m.id} into {into}: "
                          f"{_last_lines(err) or 'it stopped reading'}") from None
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    err = proc.stderr.read().decode("utf-8", "replace")
    if proc.wait() != 0:
        raise BackupError(f"mbstream could not unpack backup {m.id}: {_last_lines(err)}")


def _last_lines(text: str, n: int = 3) -> str:
    return " / ".join(ln.strip() for ln in text.strip().splitlines()[-n:])[-300:]


def _run(argv: list[str], what: str, **kw) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        tail = "\n".join("    " + ln for ln in (r.stdout + r.stderr).strip().splitlines()[-8:])
        raise BackupError(f"{what} failed (exit {r.returncode}):\n{tail}")
    return r.stdout


def _prepare(full: Path, incrementals: list[Path]) -> None:
    mb = tool("mariadb-backup")
    _run([mb, "--prepare", f"--target-dir={full}"], "mariadb-backup --prepare")
    for inc in incrementals:
        _run([mb, "--prepare", f"--target-dir={full}", f"--incremental-dir={inc}"],
             f"mariadb-backup --prepare --incremental-dir={inc.name}")


def _fresh_datadir(into: Path) -> None:
    from proxy.sandbox.template import copy_datadir, template_datadir

    copy_datadir(template_datadir(tool("mariadb-install-db"), tool("mariadbd")), into)


def _client(scratch: Scratch) -> list[str]:
    return [tool("mariadb"), "--no-defaults", f"--socket={scratch.socket}", "-uroot", "--binary-mode",
            "--max-allowed-packet=1G"]


def _replay(scratch: Scratch, files: list[tuple[ArchivedFile, Path]], start: Position, p: Plan, log_step) -> str:
    """Apply archived binlogs from `start` to the plan's target; returns the GTID reached."""
    client = subprocess.Popen(_client(scratch), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    applied = dict(start)
    env = {**os.environ, "TZ": "UTC"}
    try:
        for a, path in files:
            argv = [tool("mariadb-binlog"), "--no-defaults"]
            if applied:
                argv.append(f"--start-position={format_position(applied)}")
            if p.stop_gtid:
                argv.append(f"--stop-position={p.stop_gtid}")
            if p.stop_time is not None and p.stop_time < 2**31 - 1:  # (later: after every event; mariadb-binlog wraps it)
                argv.append("--stop-datetime=" + time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(p.stop_time)))
            argv.append(str(path))
            r = subprocess.run(argv, stdout=client.stdin, stderr=subprocess.PIPE, env=env)
            if r.returncode != 0:
                raise BackupError(f"mariadb-binlog could not read {a.file} of server {a.server_id}: "
                                  f"{r.stderr.decode('utf-8', 'replace').strip()[-300:]}")
            end = parse_position(a.end)
            applied = {d: v for d, v in {**applied, **end}.items()}
        client.stdin.close()
    except BaseException:
        client.kill()
        client.wait()
        raise
    err = client.stderr.read().decode("utf-8", "replace")
    if client.wait() != 0:
        raise BackupError(f"replaying binlogs failed: {err.strip()[-400:]}")
    conn = scratch.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT @@gtid_binlog_pos")
            reached = cur.fetchone()[0] or ""
    finally:
        conn.close()
    log_step(f"replayed {len(files)} archived binlog file(s) up to GTID {reached or format_position(start)}")
    return reached


def restore(repo: Repository, keys: codec.Keys, target_dir: str, *, bid: str | None = None,
            at_time: float | None = None, at_gtid: str | None = None, port: int = 0, start: bool = False,
            tty: bool | None = None, log_step=log.info) -> dict:
    """Restore into target_dir (absent or empty); returns what was done."""
    p = plan(repo, bid=bid, at_time=at_time, at_gtid=at_gtid)
    target = Path(os.path.abspath(target_dir))
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise BackupError(f"--target-dir {target} exists and is not empty; give a new or empty directory")
    staging = target.parent / f".{target.name}.rwproxy-restore-{os.getpid()}"
    log_step(f"restoring backup {p.last.id} ({' + '.join(m.id for m in p.backups)})"
             + (f" and {len(p.binlogs)} archived binlog file(s)" if p.binlogs else "") + f" into {target}")
    t0 = time.monotonic()
    result = {"backup": p.last.id, "chain": [m.id for m in p.backups], "target": str(target), "gtid": p.last.gtid}
    try:
        try:
            staging.mkdir(parents=True, mode=0o700)  # decrypted data: this user's alone
        except OSError as e:
            raise BackupError(f"cannot make {staging}: {e.strerror}") from None
        total = sum(o.raw_size for m in p.backups for o in m.objects)
        progress = Progress(f"restore {p.last.id}", total, tty=tty)
        try:
            for m in p.backups:
                if m.method == LOGICAL:
                    with open(staging / f"{m.id}.sql", "wb") as f:
                        fetch(repo, keys, m.objects[0].key, m.objects[0].sha256, f, name=f"backup {m.id}",
                              progress=progress)
                else:
                    _extract_physical(repo, keys, m, staging / m.id, progress)
            binlog_files = []
            for a in p.binlogs:
                path = staging / "binlogs" / f"{a.server_id}-{a.file}"
                path.parent.mkdir(exist_ok=True)
                with open(path, "wb") as f:
                    fetch(repo, keys, a.data_key, a.sha256, f, name=f"archived binlog {a.file} of server {a.server_id}")
                binlog_files.append((a, path))
        finally:
            progress.close()
        log_step(f"downloaded and checked in {time.monotonic() - t0:.1f} s")
        first = p.backups[0]
        if first.method == LOGICAL:
            datadir = staging / "data"
            _fresh_datadir(datadir)
            with Scratch(datadir, 0, grants=False, writable=True) as scratch:
                with open(staging / f"{first.id}.sql", "rb") as f:
                    r = subprocess.run(_client(scratch), stdin=f, capture_output=True)
                if r.returncode != 0:
                    raise BackupError(f"loading dump {first.id} failed: {r.stderr.decode('utf-8', 'replace')[-400:]}")
                if binlog_files:
                    result["gtid"] = _replay(scratch, binlog_files, p.start, p, log_step)
        else:
            datadir = staging / first.id
            t1 = time.monotonic()
            _prepare(datadir, [staging / m.id for m in p.backups[1:]])
            log_step(f"prepared in {time.monotonic() - t1:.1f} s")
            if binlog_files:
                t1 = time.monotonic()
                with Scratch(datadir, 0, grants=False) as scratch:
                    result["gtid"] = _replay(scratch, binlog_files, p.start, p, log_step)
                result["replay_seconds"] = round(time.monotonic() - t1, 2)
                result["replay_bytes"] = sum(a.raw_size for a, _ in binlog_files)
        for leftover in ("rwproxy-restored.cnf", "mariadbd.pid"):
            (datadir / leftover).unlink(missing_ok=True)
        if target.exists():
            target.rmdir()
        os.rename(datadir, target)
    except OSError as e:  # a full disk while writing a dump or a binlog file, a vanished directory
        where = f" ({e.filename})" if e.filename else ""
        raise BackupError(f"restore into {target} failed: {e.strerror or e}{where}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result["seconds"] = round(time.monotonic() - t0, 2)
    log_step(f"restored {p.last.id} into {target} in {result['seconds']:.1f} s")
    if start:
        s = Scratch(target, port, grants=True, server_id=int(time.time()) % 100000 + 1000,
                    writable=True, lasting=True)
        s.start()
        result["port"] = s.node.port
        result["pid"] = s.node.pid()
        result["socket"] = s.socket
        log_step(f"mariadbd (pid {result['pid']}) serves the restored data on 127.0.0.1:{s.node.port}; "
                 f"stop it with: kill {result['pid']}")
    return result


# ---- verify and test-restore ------------------------------------------------------------------------

def verify(repo: Repository, keys: codec.Keys, bid: str | None = None, *, log_step=log.info) -> list[str]:
    """Check every object of the backup(s) (and the binlog archive when no id is given): hashes,
    and when the key is there, decryption and decompression. Returns the problems found."""
    manifests = load_all(repo)
    targets = backup_chain(repo, manifests, bid) if bid else manifests
    problems = []
    check_content = bool(keys.identities)
    items = [(f"backup {m.id}", o.key, o.sha256) for m in targets for o in m.objects]
    if not bid:
        items += [(f"archived binlog {a.file} of server {a.server_id}", a.data_key, a.sha256)
                  for a in load_archive(repo)]
    for what, key, sha in items:
        try:
            if check_content:
                fetch(repo, keys, key, sha, None, name=what)
            else:
                with repo.open_read(key) as f:
                    _, got = codec.hash_stream(f)
                if got != sha:
                    raise BackupError(f"{what}: stored bytes do not match the manifest's SHA-256")
        except (BackupError, RepoError) as e:
            problems.append(str(e))
    log_step(f"verified {len(items)} object(s)" + ("" if check_content else " (hashes only: no key_file to decrypt with)")
             + (f": {len(problems)} problem(s)" if problems else ": all good"))
    return problems


def table_report(conn) -> dict[str, dict]:
    out = {}
    with conn.cursor() as cur:
        for schema, table in user_tables(conn):
            q = f"{quote_ident(schema)}.{quote_ident(table)}"
            cur.execute(f"CHECK TABLE {q}")
            status = [r for r in cur.fetchall() if r["Msg_type"] in ("status", "error")]
            cur.execute(f"SELECT COUNT(*) AS n FROM {q}")
            n = cur.fetchone()["n"]
            cur.execute(f"CHECKSUM TABLE {q}")
            c = cur.fetchone()["Checksum"]
            out[f"{schema}.{table}"] = {"rows": int(n), "checksum": None if c is None else int(c),
                                        "check": ",".join(r["Msg_text"] for r in status) or "OK"}
    return out


def test_restore(repo: Repository, keys: codec.Keys, bid: str | None = None, *, tty: bool | None = None,
                 log_step=log.info) -> dict:
    """Restore into a scratch server, check every table against the manifest, record the result."""
    p = plan(repo, bid=bid)
    m = p.last
    work = Path(tempfile.mkdtemp(prefix="rwproxy-test-restore-"))
    t0 = time.monotonic()
    problems: list[str] = []
    tables: dict = {}
    try:
        try:
            restore(repo, keys, str(work / "data"), bid=m.id, tty=tty, log_step=log_step)
            with Scratch(work / "data", 0, grants=False) as s:
                conn = s.connect(cursorclass=pymysql.cursors.DictCursor, read_timeout=3600)
                try:
                    tables = table_report(conn)
                finally:
                    conn.close()
        except BackupError as e:
            problems.append(str(e))
        for name, t in tables.items():
            if t["check"] != "OK":
                problems.append(f"{name}: CHECK TABLE says {t['check']}")
        if m.tables and not problems:
            for name, want in m.tables.items():
                got = tables.get(name)
                if got is None:
                    problems.append(f"{name}: missing from the restored data")
                elif (got["rows"], got["checksum"]) != (want["rows"], want["checksum"]):
                    problems.append(f"{name}: {got['rows']} rows, checksum {got['checksum']}; the backup recorded "
                                    f"{want['rows']} rows, checksum {want['checksum']}")
            for name in tables.keys() - m.tables.keys():
                problems.append(f"{name}: in the restored data but not in the backup's table list")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ok = not problems
    detail = "; ".join(problems) if problems else (
        f"{len(tables)} table(s) checked" + (", checksums match the backup" if m.tables else
                                              " (CHECK TABLE only: no checksums were recorded; backups of a primary have none)"))
    m.test_restore = {"time": time.time(), "ok": ok, "detail": detail, "seconds": round(time.monotonic() - t0, 1),
                      "tables": len(tables)}
    repo.put_bytes(m.key, m.to_json())
    log_step(f"test restore of {m.id}: {'OK' if ok else 'FAILED'}: {detail}")
    return m.test_restore
