"""Taking a backup: pick the server, pause it at a consistent point, stream it into the repository.

From a replica by default (the healthy one with the lowest lag): rwproxy stops its SQL thread
itself, so the consistent point is known exactly (`gtid_slave_pos` once the thread stopped) and
the per-table checksums a test restore compares against are taken at that very point. Before the
pause a running proxy takes the replica out of its read pool (OFFLINE: no client reads data that
stopped moving); after the backup the SQL thread restarts and, once the replica has caught up,
the proxy gets it back. The stream never lands on local disk: mariadb-backup (or mariadb-dump)
writes to a pipe that zstd and age read from, and the repository uploads as it goes.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager

from proxy.backup import codec
from proxy.backup.manifest import FULL, INCREMENTAL, PHYSICAL, Manifest, StoredObject, backup_id, load_all
from proxy.backup.progress import Progress, mib, rate
from proxy.backup.repo import RepoError, Repository
from proxy.backup.servers import (BackupError, ServerInfo, choose_source, connect, credentials, data_size, rows,
                                  survey, table_checksums, take_lock)

log = logging.getLogger("rwproxy.backup")

_EXTRA_DIRS = ("/usr/sbin", "/usr/local/sbin", "/usr/local/mysql/bin")
PACKAGES = {"mariadb-backup": "mariadb-backup", "mbstream": "mariadb-backup", "mariadb-dump": "mariadb-client",
            "mariadb-binlog": "mariadb-client", "mariadb": "mariadb-client", "mariadbd": "mariadb-server",
            "mariadb-install-db": "mariadb-server"}


def tool(name: str) -> str:
    found = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *_EXTRA_DIRS]))
    if not found:
        raise BackupError(f"{name} not found: install the Debian package {PACKAGES.get(name, name)}")
    return found


_OPTION_DIR = re.compile(r"rwproxy-(?:backup|archive)-(\d+)-[A-Za-z0-9_]+")


@contextmanager
def option_dir(kind: str):
    """A private (0700) directory for the option file that holds the password, named with this
    process's pid. A run killed by SIGKILL (a test's crash, the OOM killer) unwinds nothing and left
    its file in $TMPDIR (300 of them on a test machine); each run now first removes those of this
    user whose process is gone."""
    from proxy.sandbox.util import process_alive

    base = tempfile.gettempdir()
    for name in os.listdir(base):
        m = _OPTION_DIR.fullmatch(name)
        if m is None or process_alive(int(m.group(1))):
            continue
        path = os.path.join(base, name)
        try:
            st = os.lstat(path)  # (a symlink is not a directory here)
        except OSError:
            continue
        if st.st_uid == os.getuid() and stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f"rwproxy-{kind}-{os.getpid()}-") as tmp:
        yield tmp


def client_options(config, backend, path: str) -> None:
    """A [client] option file (mode 0600) so the password never shows in `ps`."""
    user, password = credentials(config)
    lines = ["[client]", f"user={user}", f"password={password}"]
    if backend.socket:
        lines.append(f"socket={backend.socket}")
    else:
        lines += [f"host={backend.host}", f"port={backend.port}", "protocol=tcp"]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")


# ---- the running proxy (if any) --------------------------------------------------------------------

class ProxyLink:
    """The running `rwproxy serve` for this config, told to take a server out and back; None-safe."""

    def __init__(self, config):
        from proxy.runtime.rundir import control_socket

        self.path = control_socket(config)
        self.config = config

    def ask(self, cmd: str, **kw) -> dict | None:
        from proxy.runtime.control import request

        try:
            hello = request(self.path, "hello", timeout=5)
            if hello.get("config") != os.path.realpath(self.config.source):
                return None
            return request(self.path, cmd, timeout=30, **kw)
        except (OSError, ValueError):
            return None

    def admin_state(self, name: str) -> str | None:
        st = self.ask("status")
        if not st:
            return None
        for s in st.get("servers", []):
            if s["name"] == name:
                return s.get("admin_state") or ""
        return None

    def set_state(self, name: str, state: str, lock: str = "") -> bool:
        r = self.ask("server-state", server=name, state=state, lock=lock)
        return bool(r and r.get("ok"))


# Held by the backup on its connection to the replica it pauses: a second backup of that replica
# waits its turn, and the running proxy resumes a replica whose backup died with the pause in force
# (the lock goes with the connection; failover/rejoin.py release_abandoned_pauses).
PAUSE_LOCK = "rwproxy.backup.pause"


@contextmanager
def replica_paused(config, src: ServerInfo, *, log_step=log.info):
    """Out of the read pool, SQL thread stopped: yields the GTID position of the consistent point."""
    backend = next(b for b in config.backends if b.name == src.name)
    conn = connect(config, backend)
    try:
        if take_lock(conn, PAUSE_LOCK) is not None:
            raise BackupError(f"{src.name} is paused by another backup right now (it holds the lock "
                              f"{PAUSE_LOCK} there); try again when it is done")
    except BaseException:
        conn.close()
        raise
    link = ProxyLink(config)
    state = link.admin_state(src.name)
    took_out = False
    if state == "":
        took_out = link.set_state(src.name, "offline", lock=PAUSE_LOCK)
        log_step(f"{src.name} taken out of the running proxy's read pool for the backup")
    elif state is None:
        log_step(f"no running proxy for {config.source} to tell; pausing {src.name} anyway")
    try:
        rows(conn, "STOP SLAVE SQL_THREAD")
        where = "SELECT @@gtid_slave_pos AS g, @@gtid_current_pos AS c"
        at = rows(conn, where)[0]
        gtid = at["g"] or ""
        log_step(f"{src.name}: replication SQL thread stopped at GTID {gtid or '(none)'}")
        yield gtid
        # The data and the GTID recorded must be of one moment: a replica that moved meanwhile (a
        # failover repointing or promoting it, an operator's START SLAVE) makes the backup a mix,
        # whose point-in-time replay from that GTID would apply some transactions twice.
        end = rows(conn, where)[0]
        if (end["g"], end["c"]) != (at["g"], at["c"]):
            raise BackupError(f"{src.name} moved during the backup (GTID {at['g'] or '-'} -> {end['g'] or '-'}, "
                              f"current {at['c'] or '-'} -> {end['c'] or '-'}): something restarted its replication "
                              f"or wrote to it (a failover?); this backup is not of one moment and is discarded")
    finally:
        try:
            rows(conn, "START SLAVE SQL_THREAD")
            _wait_caught_up(conn, config.backup.catchup_timeout, src.name, log_step)
        finally:
            if took_out:
                link.set_state(src.name, "online")
                log_step(f"{src.name} back in the running proxy's read pool")
            conn.close()  # (last: the lock goes with it, after the proxy was told)


def _wait_caught_up(conn, timeout: float, name: str, log_step) -> None:
    deadline = time.monotonic() + timeout
    while True:
        s = rows(conn, "SHOW SLAVE STATUS")
        s = s[0] if s else {}
        if s.get("Slave_SQL_Running") == "Yes" and s.get("Seconds_Behind_Master") == 0:
            log_step(f"{name}: replication SQL thread running again, caught up")
            return
        if time.monotonic() > deadline:
            log_step(f"{name}: not caught up within catchup_timeout ({timeout:.0f} s); the proxy's lag check "
                     "keeps reads off it until it is")
            return
        time.sleep(0.2)


# ---- the stream ------------------------------------------------------------------------------------

# zstd worker threads: on the 2-core test machine a 1 GiB physical backup went from 165 MiB/s
# (one thread, 64 KiB pipe) to 200 (1 MiB pipe), 235 (+ a reader thread) and 320-380 (+ 2 zstd
# workers); more than 4 buys little and takes cores from the server it runs beside.
COMPRESS_THREADS = min(os.cpu_count() or 1, 4)

_CHECKPOINT_RE = re.compile(r"latest check point \(for incremental\): '(\d+)'")
_REDO_RE = re.compile(r"Redo log \(from LSN (\d+) to (\d+)\) was copied")
_BINLOG_RE = re.compile(r"GTID of the last change '([0-9,\- ]*)'")
_DUMP_GTID_RE = re.compile(rb"gtid_slave_pos\s*=\s*'([0-9,\-]*)'")


_running: dict = {}  # thread ident -> the backup program that thread runs now (cancel)
_cancelled: set = set()  # threads whose backups are cancelled: a program they start next is ended at once
_running_lock = threading.Lock()


def cancel(thread: threading.Thread, on: bool = True) -> bool:
    """`serve` or `backup daemon` is stopping: end the backup program `thread` runs, and any it
    starts later, so that its backup fails the ordinary way (nothing stored, its replica resumed and
    put back) instead of being cut off with the process, its replica left paused. True if a program
    was running. on=False when that thread has ended (its ident may be reused)."""
    with _running_lock:
        if not on:
            _cancelled.discard(thread.ident)
            return False
        _cancelled.add(thread.ident)
        proc = _running.get(thread.ident)
    if proc is not None:
        _kill(proc)
    return proc is not None


def _kill(proc) -> None:
    """The program and whatever it started (a command_prefix wrapper's children hold the pipe too)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass


def _stream(argv: list[str], repo: Repository, key: str, keys: codec.Keys, level: int, progress: Progress,
            tap=None) -> tuple[codec.Stored, str]:
    """Run argv, store its stdout as `key`; returns what was stored and the command's stderr."""
    errf = tempfile.TemporaryFile()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errf, stdin=subprocess.DEVNULL, start_new_session=True)
    me = threading.get_ident()
    with _running_lock:
        _running[me] = proc
        stopped = me in _cancelled
    if stopped:  # cancelled before it started
        _kill(proc)
    try:
        return _store(proc, errf, argv, repo, key, keys, level, progress, tap)
    finally:
        with _running_lock:
            _running.pop(me, None)


def _store(proc, errf, argv, repo, key, keys, level, progress, tap) -> tuple[codec.Stored, str]:
    _widen_pipe(proc.stdout.fileno())
    writer = repo.open_write(key)
    pre = codec.Prefetch(proc.stdout)
    src = pre if tap is None else tap(pre)
    try:
        stored = codec.encode(src, writer, keys, level=level, progress=progress,
                              threads=COMPRESS_THREADS)
        rc = proc.wait()
    except BaseException:
        _kill(proc)
        proc.wait()
        pre.close()
        writer.abort()
        raise
    errf.seek(0)
    err = errf.read().decode("utf-8", "replace")
    if rc != 0:
        writer.abort()
        tail = "\n".join("    " + ln for ln in err.strip().splitlines()[-8:])
        raise BackupError(f"{os.path.basename(argv[0]) if argv else 'backup'} failed (exit {rc}):\n{tail}")
    writer.close()
    return stored, err


def _widen_pipe(fd: int) -> None:
    """A 1 MiB pipe instead of 64 KiB: mariadb-backup keeps writing while a chunk is compressed."""
    import fcntl

    try:
        fcntl.fcntl(fd, 1031, 1 << 20)  # F_SETPIPE_SZ; the default /proc/sys/fs/pipe-max-size is 1 MiB
    except OSError:
        pass


class _GtidTap:
    """Reads through a dump's first MiB for the `gtid_slave_pos='...'` that --master-data writes."""

    def __init__(self, src):
        self.src, self.head, self.gtid = src, b"", ""

    def read(self, n=-1):
        b = self.src.read(n)
        if not self.gtid and len(self.head) < (1 << 20):
            self.head += b
            m = _DUMP_GTID_RE.search(self.head)
            if m:
                self.gtid = m.group(1).decode()
        return b


def _physical(config, backend, repo, key, keys, progress, incremental_lsn: int | None) -> tuple[codec.Stored, dict]:
    prefix = shlex.split(config.backup.command_prefix)
    with option_dir("backup") as tmp:
        if prefix:  # the remote side's own option files hold the password (docs/backups.md)
            user, _ = credentials(config)
            argv = [*prefix, "mariadb-backup", f"--user={user}", f"--host={backend.host}", f"--port={backend.port}"]
            work = "/tmp"
        else:
            opts = os.path.join(tmp, "client.cnf")
            client_options(config, backend, opts)
            argv = [tool("mariadb-backup"), f"--defaults-extra-file={opts}"]
            work = tmp
        argv += ["--backup", "--stream=mbstream", f"--target-dir={work}", "--slave-info"]
        if incremental_lsn is not None:
            argv.append(f"--incremental-lsn={incremental_lsn}")
        stored, err = _stream(argv, repo, key, keys, config.backup.compress_level, progress)
    info: dict = {}
    if m := _CHECKPOINT_RE.search(err):
        info["to_lsn"] = int(m.group(1))
    if m := _REDO_RE.search(err):
        info["from_lsn_log"], info["last_lsn"] = int(m.group(1)), int(m.group(2))
    if m := _BINLOG_RE.search(err):
        info["gtid"] = m.group(1).strip()
    return stored, info


def _logical(config, backend, repo, key, keys, progress, on_primary: bool) -> tuple[codec.Stored, dict]:
    with option_dir("backup") as tmp:
        opts = os.path.join(tmp, "client.cnf")
        client_options(config, backend, opts)
        argv = [tool("mariadb-dump"), f"--defaults-extra-file={opts}", "--single-transaction", "--all-databases",
                "--routines", "--events", "--triggers", "--hex-blob", "--flush-privileges"]
        if on_primary:
            argv += ["--master-data=2", "--gtid"]
        tap = _GtidTap
        holder: dict = {}

        def make(src):
            holder["tap"] = tap(src)
            return holder["tap"]

        stored, _ = _stream(argv, repo, key, keys, config.backup.compress_level, progress, tap=make)
    gtid = holder["tap"].gtid if "tap" in holder else ""
    return stored, {"gtid": gtid} if gtid else {}


def latest_of_server(manifests: list[Manifest], server_id: int) -> Manifest | None:
    physical = [m for m in manifests if m.method == PHYSICAL and m.server_id == server_id]
    return physical[-1] if physical else None


def run_backup(config, repo: Repository, keys: codec.Keys, *, kind: str | None = None, method: str | None = None,
               source: str | None = None, tty: bool | None = None, log_step=log.info, now=time.time) -> Manifest:
    method = method or config.backup.method
    kind = kind or FULL
    if kind == INCREMENTAL and method != PHYSICAL:
        raise BackupError("incremental backups are physical (InnoDB LSNs); use --method physical")
    servers = survey(config)
    src = choose_source(config, servers, source)
    backend = next(b for b in config.backends if b.name == src.name)
    manifests = load_all(repo)
    parent = None
    if kind == INCREMENTAL:
        parent = latest_of_server(manifests, src.server_id)
        if parent is None:
            log_step(f"no earlier physical backup of {src.name} (server_id {src.server_id}) to build on: "
                     f"taking a full backup")
            kind = FULL
    started = now()
    bid = backup_id(kind, started)
    while any(m.id == bid for m in manifests) or repo.keys(f"backups/{bid}/"):
        time.sleep(1.0)
        started = now()
        bid = backup_id(kind, started)
    key = f"backups/{bid}/{'data.mbstream' if method == PHYSICAL else 'dump.sql'}.zst.age"
    log_step(f"backup {bid}: {kind} {method} from {src.name} ({src.address}, {src.role}, "
             f"lag {'-' if src.lag is None else f'{src.lag:.0f} s'}) into {repo.url}")
    conn = connect(config, backend)
    try:
        total = data_size(conn)
    finally:
        conn.close()
    tables: dict = {}

    def body(gtid: str) -> tuple[codec.Stored, dict, float]:
        nonlocal tables
        if gtid and config.backup.checksum_tables:
            t0 = time.monotonic()
            c = connect(config, backend)
            try:
                tables = table_checksums(c)
            finally:
                c.close()
            log_step(f"checksums of {len(tables)} table(s) recorded at the consistent point "
                     f"({time.monotonic() - t0:.1f} s)")
        progress = Progress(f"backup {bid}", total, tty=tty)
        try:
            if method == PHYSICAL:
                stored, info = _physical(config, backend, repo, key, keys, progress,
                                         parent.to_lsn if parent else None)
            else:
                stored, info = _logical(config, backend, repo, key, keys, progress, on_primary=not src.is_replica)
        finally:
            took = progress.close()
        return stored, info, took

    if src.is_replica:
        try:
            with replica_paused(config, src, log_step=log_step) as gtid:
                consistent_at = now()
                stored, info, took = body(gtid)
        except BackupError:
            if repo.keys(key):  # stored, but not of one moment: not left behind for a restore to find
                repo.delete(key)
            raise
        info["gtid"] = gtid
    else:
        stored, info, took = body("")
        consistent_at = now()
    m = Manifest(id=bid, kind=kind, method=method, parent=parent.id if parent else None, start=started, end=now(),
                 server=src.name, address=src.address, server_id=src.server_id, server_role=src.role,
                 version=src.version, gtid=info.get("gtid", ""), consistent_at=consistent_at, from_lsn=parent.to_lsn if parent else 0,
                 to_lsn=info.get("to_lsn", 0), compression=f"zstd-{config.backup.compress_level}",
                 key_id=keys.key_id, tables=tables)

    m.objects.append(StoredObject(key, stored.size, stored.sha256, stored.raw_size))
    try:
        repo.put_bytes(m.key, m.to_json())
    except RepoError:  # (a disk that filled up just now): no data object is left without its manifest
        try:
            repo.delete(key)
        except RepoError:
            pass
        raise
    log_step(f"backup {bid} done: {mib(stored.raw_size)} read, {mib(stored.size)} stored "
             f"(ratio {stored.raw_size / max(stored.size, 1):.1f}), {rate(stored.raw_size, took)}; "
             f"GTID {m.gtid or '-'}")
    return m
