"""The binlog archive: every binary log of whichever server is primary, stored as it grows.

`mariadb-binlog --read-from-remote-server --raw --stop-never` pulls the primary's binlogs into a
local spool directory (the server pushes each event as it commits); this module stores every
closed file once and the open file's growing tail at least every `archive_interval`, each through
zstd and age like the backups. mariadb-binlog does not reconnect after the connection drops, so
the archiver supervises it: when it exits (primary killed, switchover, network) the archiver
finds the primary again and resumes on it from the file holding the last archived GTID. Nothing
about continuity relies on file names: each stored file's info records its GTID start state
(the file's Gtid_list event) and end, and `check` walks those.

Layout: `archive/<server_id>/<binlog file>.json` (the file's info, the authority) and the data
object it names, `archive/<server_id>/<binlog file>/<first GTID>_<last GTID>.zst.age`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import tempfile
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field

from proxy.backup import binlog, codec
from proxy.backup.binlog import Position, covers, format_position, merge, parse_position
from proxy.backup.repo import RepoError, Repository
from proxy.backup.servers import BackupError, ServerInfo, connect, primary, rows, survey, take_lock

log = logging.getLogger("rwproxy.backup.archive")

PREFIX = "archive/"
_INDEX_RE = re.compile(r"\.(\d+)$")


@dataclass
class ArchivedFile:
    server_id: int
    file: str                 # the server's binlog file name
    data_key: str
    size: int                 # stored bytes
    sha256: str
    raw_size: int             # binlog bytes archived (the valid prefix, for a growing file)
    complete: bool
    start: str                # GTID position before the file (its Gtid_list)
    end: str                  # after its last archived transaction
    first_gtid: str
    first_ts: int | None
    last_ts: int | None
    transactions: int
    address: str = ""
    archived_at: float = 0.0

    @property
    def info_key(self) -> str:
        return info_key(self.server_id, self.file)

    @property
    def index(self) -> int:
        m = _INDEX_RE.search(self.file)
        return int(m.group(1)) if m else 0


def info_key(server_id: int, file: str) -> str:
    return f"{PREFIX}{server_id}/{file}.json"


def load_archive(repo: Repository) -> list[ArchivedFile]:
    out = []
    for key in repo.keys(PREFIX):
        if key.endswith(".json"):
            try:
                d = json.loads(repo.get_bytes(key))
            except RepoError:
                continue  # replaced between list and get: the next listing has it
            out.append(ArchivedFile(**{k: v for k, v in d.items() if k in ArchivedFile.__dataclass_fields__}))
    return sorted(out, key=lambda a: (a.server_id, a.index))


# ---- continuity ----------------------------------------------------------------------------------

@dataclass
class Gap:
    after: str          # the last position the archive holds before the gap
    before: str         # the first file after the gap starts from this position
    resumes_at: int | None  # time of the first transaction after the gap

    def describe(self) -> str:
        return (f"transactions after {self.after or '(start)'} up to {self.before} are missing "
                f"(the archive resumes at {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(self.resumes_at)) + ' UTC' if self.resumes_at else 'an unknown time'})")


@dataclass
class Walk:
    files: list[ArchivedFile] = field(default_factory=list)  # in replay order
    end: Position = field(default_factory=dict)
    end_ts: int | None = None
    gaps: list[Gap] = field(default_factory=list)


def walk(archive: list[ArchivedFile], start: Position, *, stop_at_gap: bool = False) -> Walk:
    """The files that carry the history on from `start`, in order, and every gap in it.

    A file continues the history when its start state is at or before what is covered so far and
    its end goes beyond; overlapping files (the same transactions in two servers' binlogs after a
    failover) are used once. A file that starts beyond the covered state is a gap."""
    w = Walk(end=dict(start))
    left = [a for a in archive if a.transactions or a.complete]
    parsed = {id(a): (parse_position(a.start), parse_position(a.end)) for a in left}
    while True:
        useful = [a for a in left if not covers(w.end, parsed[id(a)][1])]
        if not useful:
            return w
        nxt = [a for a in useful if covers(w.end, parsed[id(a)][0])]
        if nxt:
            a = max(nxt, key=lambda a: (sum(n for _, n in parsed[id(a)][1].values()), a.archived_at))
            w.files.append(a)
            w.end = merge(w.end, parsed[id(a)][1])
            w.end_ts = a.last_ts if a.last_ts is not None else w.end_ts
            continue
        # a gap: continue from the file that starts earliest beyond it
        a = min(useful, key=lambda a: sum(n for _, n in parsed[id(a)][0].values()))
        w.gaps.append(Gap(format_position(w.end), a.start, a.first_ts))
        if stop_at_gap:
            return w
        w.end = merge(w.end, parsed[id(a)][0])


# ---- storing files -------------------------------------------------------------------------------

def store_file(repo: Repository, keys: codec.Keys, path: str, *, server_id: int, address: str, level: int,
               previous: ArchivedFile | None) -> ArchivedFile | None:
    """Store the valid prefix of a (possibly growing) binlog file; returns its info, or None if it
    has nothing new since `previous`."""
    with open(path, "rb") as f:
        data = f.read()
    info = binlog.scan(data)
    if previous is not None and previous.raw_size == info.valid_bytes and previous.complete == info.complete:
        return None
    name = os.path.basename(path)
    first, end = format_position(info.first_gtid) or "none", format_position(info.end) or "none"
    data_key = f"{PREFIX}{server_id}/{name}/{first}_{end}{'' if info.complete else '_partial'}.zst.age"
    import io

    w = repo.open_write(data_key)
    try:
        stored = codec.encode(io.BytesIO(data[: info.valid_bytes]), w, keys, level=level)
    except BaseException:
        w.abort()
        raise
    w.close()
    a = ArchivedFile(server_id=server_id, file=name, data_key=data_key, size=stored.size, sha256=stored.sha256,
                     raw_size=info.valid_bytes, complete=info.complete, start=format_position(info.start),
                     end=format_position(info.end), first_gtid=format_position(info.first_gtid),
                     first_ts=info.first_ts, last_ts=info.last_ts, transactions=info.transactions,
                     address=address, archived_at=time.time())
    repo.put_bytes(a.info_key, json.dumps(asdict(a), indent=1).encode())
    if previous is not None and previous.data_key != data_key:
        repo.delete(previous.data_key)
    return a


# ---- where to resume on a primary ----------------------------------------------------------------

def server_binlogs(conn) -> list[tuple[str, Position]]:
    """(file, start position) of every binlog the server still has, oldest first."""
    out = []
    for r in rows(conn, "SHOW BINARY LOGS"):
        name = r["Log_name"]
        start: Position = {}
        for ev in rows(conn, f"SHOW BINLOG EVENTS IN '{name}' LIMIT 4"):
            if ev["Event_type"] == "Gtid_list":
                start = parse_position(ev["Info"].strip("[] "))
                break
        out.append((name, start))
    return out


def resume_file(files: list[tuple[str, Position]], archived: Position) -> tuple[str, bool]:
    """The server's file to start reading from: the last one that starts at or before what the
    archive holds. (file, False) when none does: the transactions between are gone (a gap)."""
    if not files:
        raise BackupError("the primary has no binary logs (log_bin is off?): nothing to archive")
    ok = [f for f, start in files if covers(archived, start)]
    if ok:
        return ok[-1], True
    return files[0][0], not archived


def default_reader_id(repo_url: str) -> int:
    """A server_id for the binlog reader that no real server uses: one per repository, so two
    archivers of one repository (which should not run) replace each other rather than both run."""
    return 4_000_000_000 + zlib.crc32(repo_url.encode()) % 250_000_000


class Archiver:
    """Pulls the primary's binlogs into `spool` and stores them; follows the primary."""

    def __init__(self, config, repo: Repository, keys: codec.Keys, spool: str, *, log_step=log.info):
        self.config, self.repo, self.keys, self.spool = config, repo, keys, spool
        self.log_step = log_step
        self.stop = threading.Event()
        self.proc: subprocess.Popen | None = None
        self.known: dict[tuple[int, str], ArchivedFile] = {}
        self.uploads = 0
        self.last_upload = 0.0
        self.source: ServerInfo | None = None
        self.spool_now: str | None = None  # the directory the reader writes into
        self.current_at = time.time()       # last moment everything read was also stored
        self.standby = False  # another archiver holds this repository's lock

    def archived_end(self) -> Position:
        end: Position = {}
        for a in self.known.values():
            end = merge(end, parse_position(a.end))
        return end

    def run(self) -> None:
        for a in load_archive(self.repo):
            self.known[(a.server_id, a.file)] = a
        while not self.stop.is_set():
            try:
                self._follow_once()
            except (BackupError, OSError, RepoError) as e:
                self.log_step(f"binlog archiver: {e}; retrying in 1 s")
            except Exception as e:  # noqa: BLE001 - a server error mid-survey; keep archiving
                self.log_step(f"binlog archiver: {type(e).__name__}: {e}; retrying in 1 s")
            self.stop.wait(1.0)
        self._terminate()

    def _follow_once(self) -> None:
        src = primary(self.config, survey(self.config))
        backend = next(b for b in self.config.backends if b.name == src.name)
        # One archiver per repository: `serve` and `backup daemon`, or every instance of a
        # coordinated cluster, given the same [backup] would otherwise take turns kicking each other
        # off the primary (same reader server_id) and re-read the binlogs from the start each time.
        name = f"rwproxy.archive.{self.config.backup.archive_server_id or default_reader_id(self.repo.url)}"
        lock = connect(self.config, backend, timeout=3, read_timeout=30)
        try:
            holder = take_lock(lock, name)
            if holder is not None:
                if not self.standby:
                    self.log_step(f"binlog archiver: another archiver (connection {holder} on {src.name}) archives "
                                  f"into {self.repo.url}; standing by until it stops")
                self.standby = True
                self.stop.wait(4.0)
                return
            if self.standby:  # taking over: what the other one stored is where to go on from
                self.standby = False
                self.log_step("binlog archiver: the other archiver stopped; archiving from here")
                self.known = {(a.server_id, a.file): a for a in load_archive(self.repo)}
            self._follow(src, backend)
        finally:
            lock.close()

    def _follow(self, src: ServerInfo, backend) -> None:
        conn = connect(self.config, backend, timeout=3, read_timeout=30)
        try:
            files = server_binlogs(conn)
        finally:
            conn.close()
        archived = self.archived_end()
        start_file, continuous = resume_file(files, archived)
        if not continuous:
            self.log_step(f"binlog archiver: {src.name} no longer has the binlogs after "
                          f"{format_position(archived)} (purged before they were archived): the archive has a gap; "
                          f"continuing from {start_file}")
        self.source = src
        spool = os.path.join(self.spool, str(src.server_id))
        self.spool_now = spool
        os.makedirs(spool, mode=0o700, exist_ok=True)
        os.chmod(spool, 0o700)  # the binlogs in it are the data in clear: this user's alone
        for name in os.listdir(spool):  # a fresh read rewrites from the resume file on
            os.unlink(os.path.join(spool, name))
        from proxy.backup.take import client_options, option_dir, tool

        with option_dir("archive") as tmp:

            opts = os.path.join(tmp, "client.cnf")
            client_options(self.config, backend, opts)
            reader_id = self.config.backup.archive_server_id or default_reader_id(self.repo.url)
            argv = [tool("mariadb-binlog"), f"--defaults-extra-file={opts}", "--read-from-remote-server", "--raw",
                    "--stop-never", f"--stop-never-slave-server-id={reader_id}", f"--result-file={spool}/",
                    start_file]
            self.log_step(f"binlog archiver: reading {src.name} ({src.address}) from {start_file}")
            errf = tempfile.TemporaryFile()
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=errf, stdin=subprocess.DEVNULL)
            checked = time.monotonic()
            try:
                while not self.stop.is_set() and self.proc.poll() is None:
                    self.stop.wait(min(0.5, self.config.backup.archive_interval))
                    self.upload(spool, src)
                    if time.monotonic() - checked >= 1.0:
                        checked = time.monotonic()
                        if not self._still_primary(backend):
                            self.log_step(f"binlog archiver: {src.name} is no longer the primary; following the new one")
                            break
            finally:
                self._terminate()
                self.upload(spool, src, final=True)
            errf.seek(0)
            err = errf.read().decode("utf-8", "replace").strip().splitlines()
            if not self.stop.is_set():
                self.log_step(f"binlog archiver: the stream from {src.name} ended ({err[-1] if err else 'no message'}); "
                              "finding the primary")

    def _still_primary(self, backend) -> bool:
        """A switchover leaves the old primary up as a replica (its binlog still grows, by
        replication): the archive must follow the writes, so the reader moves."""
        try:
            conn = connect(self.config, backend, timeout=2, read_timeout=5)
        except Exception:  # noqa: BLE001 - unreachable: the reader's own exit says so
            return True
        try:
            return not rows(conn, "SELECT @@read_only AS ro")[0]["ro"]
        except Exception:  # noqa: BLE001
            return True
        finally:
            conn.close()

    def _terminate(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def upload(self, spool: str, src: ServerInfo, *, final: bool = False) -> int:
        """Store closed files at once and the open one's tail once archive_interval has passed."""
        names = sorted((n for n in os.listdir(spool) if _INDEX_RE.search(n)), key=lambda n: int(_INDEX_RE.search(n).group(1)))
        due = final or time.monotonic() - self.last_upload >= self.config.backup.archive_interval
        stored = 0
        for i, name in enumerate(names):
            newest = i == len(names) - 1
            if newest and not due:
                continue
            prev = self.known.get((src.server_id, name))
            if prev is not None and prev.complete:
                continue
            a = store_file(self.repo, self.keys, os.path.join(spool, name), server_id=src.server_id,
                           address=src.address, level=self.config.backup.compress_level, previous=prev)
            if a is not None:
                self.known[(src.server_id, name)] = a
                stored += 1
            if not newest and (a or prev) and (a or prev).complete:
                os.unlink(os.path.join(spool, name))  # closed and stored: the spool keeps only the open file
        if due:
            self.last_upload = time.monotonic()
        self.uploads += stored
        if not self._unstored(spool, src):
            self.current_at = time.time()
        return stored

    def _unstored(self, spool: str, src: ServerInfo) -> bool:
        for name in os.listdir(spool):
            prev = self.known.get((src.server_id, name))
            try:
                size = os.path.getsize(os.path.join(spool, name))
            except OSError:
                continue
            if prev is None or size > prev.raw_size:
                return True
        return False

    def lag(self) -> float | None:
        """Seconds the archive is behind the primary's binlog: 0 while everything read is stored;
        else since the last moment it was (the reader down counts too). None while another archiver
        has the repository (it reports the lag)."""
        if self.standby:
            return None
        reading = self.proc is not None and self.proc.poll() is None
        if reading and self.spool_now and self.source and not self._unstored(self.spool_now, self.source):
            return 0.0
        return round(time.time() - self.current_at, 1)
