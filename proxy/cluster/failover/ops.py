"""The SQL side of failover: short admin connections, GTID arithmetic, the promotion steps.

Kept apart from ``proxy.failover`` (which decides *when* and *what*) so every
statement rwproxy runs on a server during a failover, switchover or rejoin is
in one readable place, and the GTID rules are plain functions that unit tests
can pin down.  Everything here blocks: it runs on the failover thread (or the
caller of ``Failover.switchover``), never on a proxy event loop.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from dataclasses import dataclass, field

import pymysql
import pymysql.cursors

from proxy.backend.tls import pymysql_connect
from proxy.cluster.gtid import merge, reached, seqs
from proxy.cluster.sqlerrors import describe

log = logging.getLogger("rwproxy.failover")

IDLE_SQL_STATE = "Slave has read all relay log"  # Slave_SQL_Running_State once the relay log is applied
SYSTEM_USERS = ("system user", "event_scheduler", "unauthenticated user")


class StepError(Exception):
    """A failover/switchover step failed; str() says which step and why, for the log and the caller."""


# ---- one server's facts -------------------------------------------------------------

@dataclass
class Facts:
    """A fresh look at one server, taken on the failover thread (never from a stale snapshot)."""
    name: str
    host: str
    port: int
    read_only: bool = True
    server_id: int | None = None
    current_pos: str = ""
    slave_pos: str = ""
    binlog_pos: str = ""
    io_pos: str = ""  # Gtid_IO_Pos: what the IO thread has received into the relay log
    replicating: bool = False
    io_state: str = ""
    sql_state: str = ""
    sql_error: str = ""
    sql_delay: int = 0  # MASTER_DELAY: such a replica is never promoted (its relay log is hours long on purpose)
    source_host: str = ""
    source_port: int = 0
    source_id: int | None = None
    master_user: str = ""
    connect_retry: int | None = None
    semi_slave: bool = False
    semi_master: bool = False
    semi_timeout: int | None = None
    semi_wait_point: str = ""
    priority: int = 0
    index: int = 0
    no_promotion: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def received(self) -> str:
        """Everything it holds or will hold once its relay log is applied."""
        return merge(self.io_pos, self.current_pos, self.binlog_pos)

    @property
    def applied(self) -> str:
        return merge(self.current_pos, self.binlog_pos)

    def follows(self, host: str, port: int, server_id: int | None) -> bool:
        """Replicates (or tries to) from that server: same id, or same host:port."""
        if not self.replicating:
            return False
        if server_id is not None and self.source_id == server_id:
            return True
        return (self.source_host, self.source_port) == (host, port)


def rank_key(f: Facts) -> tuple:
    """Most received transactions first (it will have them all once applied), then most applied,
    then the configured priority, then config order (earlier wins)."""
    return (sum(seqs(f.received).values()), sum(seqs(f.applied).values()), f.priority, -f.index)


def why_not(f: Facts) -> str:
    """Why this replica may not be promoted ('' if it may)."""
    if f.no_promotion:
        return "no_promotion"
    if f.sql_error:
        return "its SQL thread failed"
    if f.sql_delay:
        return f"MASTER_DELAY={f.sql_delay}"
    return ""


def choose(candidates: list[Facts]) -> Facts | None:
    return max(candidates, key=rank_key) if candidates else None


# ---- connections ------------------------------------------------------------------

class Link:
    """One admin connection (the monitor's credentials). release() hands it back to its LinkCache
    (or closes it when it broke or has none): connecting costs more than a whole promotion step."""

    def __init__(self, backend, user: str, password: str,
                 connect_timeout: float = 1.0, read_timeout: float = 10.0, home: "LinkCache | None" = None,
                 tls=None):
        self.name, self.host, self.port = backend.name, backend.host, backend.port
        self.home, self.broken = home, False
        try:
            self.conn = pymysql_connect(tls, **backend.pymysql_args(), user=user, password=password,
                                        connect_timeout=connect_timeout, read_timeout=read_timeout,
                                        write_timeout=read_timeout, autocommit=True, charset="utf8mb4",
                                        cursorclass=pymysql.cursors.DictCursor)
        except (pymysql.MySQLError, OSError) as exc:
            raise StepError(f"cannot connect to {backend.name} ({backend.where}): {describe(exc)}") from None

    def q(self, sql: str, args=None) -> list[dict]:
        try:
            with self.conn.cursor() as cur:
                cur.execute(sql, args)
                return list(cur.fetchall())
        except (pymysql.MySQLError, OSError) as exc:
            if isinstance(exc, (pymysql.err.OperationalError, pymysql.err.InterfaceError, OSError)):
                self.broken = True
            shown = sql if len(sql) < 80 else sql[:77] + "..."
            raise StepError(f"{self.name}: {shown}: {describe(exc)}") from None

    def value(self, sql: str, args=None):
        rows = self.q(sql, args)
        return next(iter(rows[0].values())) if rows else None

    def close(self) -> None:
        self.broken = True
        try:
            self.conn.close()
        except Exception:
            pass

    def release(self) -> None:
        if self.home is not None and not self.broken:
            self.home.put(self)
        else:
            self.close()

    def __enter__(self) -> "Link":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class LinkCache:
    """Idle admin connections by backend name; take() gives one thread sole use until release()."""

    def __init__(self, connect):
        self._connect = connect  # (ServerState-like) -> Link
        self._idle: dict[str, Link] = {}
        self._lock = threading.Lock()

    def take(self, s) -> Link:
        with self._lock:
            link = self._idle.pop(s.name, None)
        if link is not None:
            try:
                link.conn.ping(reconnect=False)
                return link
            except Exception:
                link.close()
        link = self._connect(s)
        link.home = self
        return link

    def put(self, link: Link) -> None:
        with self._lock:
            old = self._idle.pop(link.name, None)
            self._idle[link.name] = link
        if old is not None and old is not link:
            old.close()

    def has(self, name: str) -> bool:
        with self._lock:
            return name in self._idle

    def close(self) -> None:
        with self._lock:
            links, self._idle = list(self._idle.values()), {}
        for link in links:
            link.close()


def read_facts(link: Link, facts: Facts) -> Facts:
    row = link.q("SELECT @@read_only AS ro, @@server_id AS sid, @@gtid_current_pos AS cur, "
                 "@@gtid_slave_pos AS slave, @@gtid_binlog_pos AS binlog, "
                 "@@rpl_semi_sync_slave_enabled AS semi_slave, @@rpl_semi_sync_master_enabled AS semi_master, "
                 "@@rpl_semi_sync_master_timeout AS semi_timeout, "
                 "@@rpl_semi_sync_master_wait_point AS semi_wait_point")[0]
    facts.read_only, facts.server_id = bool(int(row["ro"])), int(row["sid"])
    facts.current_pos, facts.slave_pos, facts.binlog_pos = row["cur"] or "", row["slave"] or "", row["binlog"] or ""
    facts.semi_slave, facts.semi_master = bool(int(row["semi_slave"])), bool(int(row["semi_master"]))
    facts.semi_timeout, facts.semi_wait_point = int(row["semi_timeout"]), str(row["semi_wait_point"])
    rows = [r for r in link.q("SHOW SLAVE STATUS") if r.get("Master_Host")]
    facts.replicating = bool(rows)
    if rows:
        r = rows[0]
        facts.io_pos = r.get("Gtid_IO_Pos") or ""
        facts.io_state, facts.sql_state = r.get("Slave_IO_Running") or "", r.get("Slave_SQL_Running") or ""
        facts.sql_error = r.get("Last_SQL_Error") or ""
        facts.sql_delay = int(r.get("SQL_Delay") or 0)
        facts.source_host, facts.source_port = r["Master_Host"], int(r["Master_Port"])
        facts.source_id = int(r["Master_Server_Id"]) if r.get("Master_Server_Id") else None
        facts.master_user = r.get("Master_User") or ""
        facts.connect_retry = int(r["Connect_Retry"]) if r.get("Connect_Retry") is not None else None
    return facts


# ---- the steps ------------------------------------------------------------------------

def catch_up(link: Link, facts: Facts, timeout: float) -> str:
    """Let a replica apply what it already received (its relay log) before it is promoted.

    Waits with MASTER_GTID_WAIT on its Gtid_IO_Pos in short slices; a replica whose SQL
    thread says it has read the whole relay log is done even if the wait disagrees (the
    last received transaction was cut off by the crash, so it can never be applied).
    Returns a note for the log.
    """
    want = facts.io_pos
    if not want or reached(facts.applied, want):
        return "nothing left to apply"
    if facts.sql_state != "Yes":
        link.q("START SLAVE SQL_THREAD")
    deadline = time.monotonic() + timeout
    idle = 0
    while True:
        if link.value("SELECT MASTER_GTID_WAIT(%s, 0.2) AS r", (want,)) == 0:
            return f"applied its relay log up to {want}"
        st = (link.q("SHOW SLAVE STATUS") or [{}])[0]
        if st.get("Slave_SQL_Running") != "Yes":
            raise StepError(f"{facts.name}: replication SQL thread stopped while applying its relay log: "
                            f"{st.get('Last_SQL_Error') or 'no error given'}")
        idle = idle + 1 if str(st.get("Slave_SQL_Running_State") or "").startswith(IDLE_SQL_STATE) else 0
        if idle >= 2:
            pos = link.value("SELECT @@gtid_slave_pos AS p")
            return f"applied its whole relay log (at {pos}; the last received transaction was incomplete)"
        if time.monotonic() > deadline:
            raise StepError(f"{facts.name} did not apply its relay log up to {want} within {timeout:g} s "
                            f"(catchup_timeout; at {link.value('SELECT @@gtid_slave_pos AS p')})")


def promote(link: Link, semi: dict | None) -> str:
    """Make a replica the primary; returns its GTID position at that moment (the old history's end)."""
    link.q("STOP SLAVE")
    link.q("RESET SLAVE ALL")
    if semi is not None:
        # before writes are possible: every commit from now on waits for a replica's ack
        if semi.get("wait_point") in ("AFTER_SYNC", "AFTER_COMMIT"):
            link.q(f"SET GLOBAL rpl_semi_sync_master_wait_point = {semi['wait_point']}")
        if semi.get("timeout"):
            link.q("SET GLOBAL rpl_semi_sync_master_timeout = %s", (int(semi["timeout"]),))
        link.q("SET GLOBAL rpl_semi_sync_master_enabled = ON")
    link.q("SET GLOBAL read_only = 0")
    row = link.q("SELECT @@gtid_binlog_pos AS b, @@gtid_current_pos AS c")[0]
    return merge(row["b"], row["c"])


def replicate_from(link: Link, source_host: str, source_port: int, user: str, password: str,
                   semi: dict | None, slave_pos: str | None = None, connect_retry: int | None = None,
                   heartbeat: float = 0.0) -> None:
    """STOP SLAVE; [gtid_slave_pos]; CHANGE MASTER ... MASTER_USE_GTID=slave_pos; START SLAVE.

    An empty user keeps the credentials the replica already has (CHANGE MASTER leaves unnamed
    options alone), which is what repointing an existing replica needs.
    """
    link.q("STOP SLAVE")
    if slave_pos is not None:
        link.q("SET GLOBAL gtid_slave_pos = %s", (slave_pos,))
    opts = ["MASTER_HOST = %s", "MASTER_PORT = %s"]
    args: list = [source_host, int(source_port)]
    if user:
        opts += ["MASTER_USER = %s", "MASTER_PASSWORD = %s"]
        args += [user, password]
    if connect_retry:
        opts.append("MASTER_CONNECT_RETRY = %s")
        args.append(int(connect_retry))
    if heartbeat:
        opts.append("MASTER_HEARTBEAT_PERIOD = %s")
        args.append(float(heartbeat))
    opts.append("MASTER_USE_GTID = slave_pos")
    link.q("CHANGE MASTER TO " + ", ".join(opts), args)
    if semi is not None:
        link.q("SET GLOBAL rpl_semi_sync_master_enabled = OFF")
        link.q("SET GLOBAL rpl_semi_sync_slave_enabled = ON")
    link.q("START SLAVE")


def set_heartbeat(link: Link, period: float) -> None:
    """Give a running replica MASTER_HEARTBEAT_PERIOD = period (CHANGE MASTER needs it stopped for
    a moment; it resumes where it was). A replica whose threads are not both running is left alone:
    someone stopped it (an operator, a backup's pause), and START SLAVE would undo that."""
    st = link.q("SHOW SLAVE STATUS")
    if not st or st[0].get("Slave_IO_Running") != "Yes" or st[0].get("Slave_SQL_Running") != "Yes":
        raise StepError(f"{link.name}: replication is not running: MASTER_HEARTBEAT_PERIOD left as it is")
    link.q("STOP SLAVE")
    try:
        link.q("CHANGE MASTER TO MASTER_HEARTBEAT_PERIOD = %s", (float(period),))
    finally:
        link.q("START SLAVE")


def busy_sessions(link: Link, skip_users: tuple[str, ...]) -> list[dict]:
    """Application sessions on a primary that are running a statement or hold a writing transaction.

    Idle sessions with only a read snapshot open are not waited for (they would block a
    switchover for as long as a pooled connection sits idle); their next write fails
    with error 1290 and is safe to retry on the new primary.
    """
    users = SYSTEM_USERS + tuple(skip_users)
    marks = ", ".join(["%s"] * len(users))
    return link.q(
        "SELECT p.ID AS id, p.USER AS user, p.COMMAND AS command, p.TIME AS time, LEFT(p.INFO, 60) AS info "
        "FROM information_schema.PROCESSLIST p "
        "LEFT JOIN information_schema.INNODB_TRX t ON t.trx_mysql_thread_id = p.ID "
        f"WHERE p.ID <> CONNECTION_ID() AND p.USER NOT IN ({marks}) "
        "AND p.COMMAND NOT IN ('Binlog Dump', 'Daemon', 'Slave_IO', 'Slave_SQL', 'Slave_worker') "
        "AND (p.COMMAND = 'Query' OR t.trx_rows_modified > 0 OR t.trx_rows_locked > 0 "
        "OR t.trx_tables_locked > 0)", users)


def semi_clients(link: Link) -> int:
    rows = link.q("SHOW GLOBAL STATUS LIKE 'Rpl_semi_sync_master_clients'")
    return int(rows[0]["Value"]) if rows else 0


def run_hook(command: str, env: dict[str, str], timeout: float) -> tuple[int | None, str]:
    """(exit status or None on timeout, the tail of its output)."""
    try:
        res = subprocess.run(command, shell=True, env=env, timeout=timeout, capture_output=True, text=True,
                             stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"") + (exc.stderr or b"")
        text = out.decode("utf-8", "replace") if isinstance(out, bytes) else out
        return None, _tail(text)
    return res.returncode, _tail(res.stdout + res.stderr)


def _tail(text: str, lines: int = 5) -> str:
    return " | ".join(line for line in text.strip().splitlines()[-lines:])
