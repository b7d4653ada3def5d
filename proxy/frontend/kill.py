"""KILL [QUERY | CONNECTION] <id> and COM_PROCESS_KILL, answered with rwproxy's session ids.

A client learns its connection id from rwproxy's greeting (mysql_thread_id()). The mariadb
CLI's Ctrl-C, and the query timeouts of Connector/J and Connector/NET, send `KILL QUERY <that
id>` on a second connection, which may land on another worker. Forwarded to the primary as
it is, the id would name an unrelated thread there, so numeric KILLs never reach a server
as they are. The worker that owns the session (id >> 24, see Worker.new_session_id) kills
whatever the session is running, on whichever server runs it, by sending KILL for the
backend thread over a fresh connection as the *killing* user, so the server applies its own
privilege rules (another user's session needs CONNECTION ADMIN or SUPER, as on the server).
Where no server would see the KILL (another user's session running nothing, or its read still
queued on a shared connection) one is asked first (may_kill), so the answer is still the server's.
An id that is no session may be a backend thread id that one of rwproxy's sessions got from
CONNECTION_ID(): every worker is asked for it. Anything else gets ERROR 1094. Workers reach
each other over unix datagram sockets beside the control socket (mode 0600).

A session whose client disconnects in the middle of a statement has that statement killed
too (ProxySQL does the same): a lock wait or a long UPDATE must not run on after nobody waits
for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket

from proxy.backend.connection import BackendError
from proxy.backend.opening import connect
from proxy.logs import clean
from proxy.routing.classify import F_MULTI, READ, statement_texts
from proxy.protocol.constants import (
    COM_QUERY, DEFAULT_CHARSET, ER_CONNECTION_KILLED, ER_KILL_DENIED_ERROR, ER_NO_SUCH_THREAD, ER_QUERY_INTERRUPTED,
    ER_UNKNOWN_ERROR, ER_WRONG_ARGUMENTS,
)
from proxy.protocol.packets import ProtocolError, command, execute_int_param, ok_packet, parse_err
from proxy.protocol.scan import SIMPLE

log = logging.getLogger("rwproxy.kill")

MISSING = "missing"  # no live session with that id
NO_SUCH_THREAD, KILL_DENIED = ER_NO_SUCH_THREAD[0], ER_KILL_DENIED_ERROR[0]

_KILL = re.compile(
    rb"\A\s*(?:/\*(?!!).*?\*/\s*)*KILL\s+(?:(?:HARD|SOFT)\s+)?(?:(CONNECTION|QUERY)\s+)?"
    rb"(\d{1,20}|'\d{1,20}'|\"\d{1,20}\"|\?)\s*;?\s*\Z",
    re.IGNORECASE | re.DOTALL,
)


def parse_kill(sql) -> tuple[bool, int | None] | None:
    """(kills the connection?, id) of `KILL [HARD|SOFT] [CONNECTION|QUERY] <number>`, with id None
    for a `?` placeholder (a prepared statement's), else None (KILL USER, KILL QUERY ID and
    anything else go to the primary as before)."""
    m = _KILL.match(sql)
    if m is None:
        return None
    target = m.group(2)  # (a quoted number is what Connector/Python sends for a str parameter)
    return (m.group(1) or b"CONNECTION").upper() == b"CONNECTION", None if target == b"?" else int(target.strip(b"'\""))


async def kill_backend_thread(worker, server_name: str, user, thread_id: int, connection: bool):
    """KILL a backend thread as `user`; None when done, else (code, sqlstate, message)."""
    server = worker.servers.get(server_name)
    if server is None:
        return (NO_SUCH_THREAD, "HY000", f"Unknown thread id: {thread_id}")
    timeout = worker.config.pool.connect_timeout
    sql = b"KILL " + (b"CONNECTION " if connection else b"QUERY ") + str(thread_id).encode()
    try:
        conn = await connect(server, None, 0, user.name, user.password, None, DEFAULT_CHARSET, timeout,
                             worker.backend_tls.get(server_name))
    except BackendError as e:
        return (e.code, e.sqlstate, e.message)
    try:
        resp = await conn.command(command(COM_QUERY, sql), SIMPLE, timeout=timeout + 5)
    except (ConnectionError, asyncio.TimeoutError) as e:
        return (2013, "HY000", f"Lost connection to backend {server_name} while killing thread {thread_id}: {e or 'timeout'}")
    finally:
        conn.close()
    if resp[4] == 0xFF:
        return parse_err(resp[4:])
    return None


def _find(worker, target: int, by_thread: bool):
    """The live session with id `target`, or (by_thread) the one holding backend thread `target`
    (what CONNECTION_ID() returned it), preferring a match on the primary."""
    if not by_thread:
        return next((c for c in worker.clients if c.conn_id == target and c.state is not None and not c.closed), None)
    found = [c for c in worker.clients if c.state is not None and not c.closed
             and any(be.thread_id == target and not be.closed for be in c.backends.values())]
    primary = [c for c in found if any(be.thread_id == target and be.server.name == worker.primary_name
                                       for be in c.backends.values())]
    return (primary or found or [None])[0]


async def kill_session(worker, target: int, connection: bool, user, by_thread: bool = False):
    """Kill session `target` of this worker for `user`: None, MISSING or (code, sqlstate, message)."""
    client = _find(worker, target, by_thread)
    if client is None:
        return MISSING
    target = client.conn_id
    same_user = client.user.name == user.name
    if same_user:
        user = client.user  # (its credential logs in even when the config holds only a hash)
    running = [be for be in client.backends.values() if be.relaying_for(client)]
    e, line, cmd = client.shared_entry, client.shared_on, client.inflight
    asked = same_user  # a server has judged whether `user` may do this
    if e is not None and e.relayed == 0 and cmd is not None:
        asked = True
        if cmd.cls.route == READ:  # a read queued on a shared connection: its answer becomes ERROR 1317
            if not same_user and (err := await may_kill(worker, client, user)) is not None:
                return err  # (no server sees this cancel: ask one first, as for an idle session)
            e.cancelled = True
        else:  # a write cannot be dropped (it may run): stop it on the server, as on an own connection
            err = await kill_shared_write(worker, line, e, user)
            if err is not None and err[0] != NO_SUCH_THREAD:  # no such thread: it just finished
                return (KILL_DENIED, err[1], f"You are not owner of thread {target}") if err[0] == KILL_DENIED else err
    if connection and not same_user:
        # every backend thread of the session: the server decides whether `user` may end them
        targets = [be for be in client.backends.values() if not be.closed]
    else:
        targets = running
    if not targets and not asked:
        # nothing for a server to refuse (an idle session, or one whose connections went back to
        # the pool): ask one whether `user` may kill this user's threads
        err = await may_kill(worker, client, user)
        if err is not None:
            return err
    # A server closes a killed connection without a word; the answer its stopped statement gets
    # (1317) must not reach the client first, so it is left unread unless the KILL is refused.
    held = [be for be in running if be.transport.is_reading()] if connection else []
    for be in held:
        be.transport.pause_reading()
    for be in targets:
        err = await kill_backend_thread(worker, be.server.name, user, be.thread_id, connection and not same_user)
        if err is not None and err[0] != NO_SUCH_THREAD:  # no such thread: it just finished
            for b in held:
                if not b.closed:
                    b.transport.resume_reading()
            if err[0] == KILL_DENIED:  # name the session, not the backend thread
                err = (KILL_DENIED, err[1], f"You are not owner of thread {target}")
            return err
    if connection:
        log.info("session %d: killed by %s (KILL CONNECTION)", target, clean(user.name))
        client.close()  # the client sees its connection closed, as after a server's KILL
    return None


async def may_kill(worker, client, user):
    """Whether `user` may kill session `client` of another user, as a server decides it (None:
    yes; else its error, 1095 naming the session): a KILL QUERY as `user` of one of the session's
    idle connections, or of one opened as the session's user for the question when it holds none.
    Harmless either way: a server clears an idle thread's KILL QUERY before its next command."""
    be = next((b for b in client.backends.values() if not b.closed and b.thread_id), None)
    if be is not None:
        err = await kill_backend_thread(worker, be.server.name, user, be.thread_id, False)
    else:
        name = worker.primary_name or next(iter(worker.servers), None)
        server = worker.servers.get(name) if name else None
        if server is None:
            return (KILL_DENIED, "HY000", f"You are not owner of thread {client.conn_id}")
        cu = client.user
        try:
            probe = await connect(server, None, 0, cu.name, cu.password, None, DEFAULT_CHARSET,
                                  worker.config.pool.connect_timeout, worker.backend_tls.get(name))
        except BackendError as e:
            return (e.code, e.sqlstate, e.message)
        try:
            err = await kill_backend_thread(worker, name, user, probe.thread_id, False)
        finally:
            probe.close()
    if err is None or err[0] == NO_SUCH_THREAD:
        return None
    return (KILL_DENIED, err[1], f"You are not owner of thread {client.conn_id}") if err[0] == KILL_DENIED else err


class Peers:
    """Worker-to-worker requests, one unix datagram socket per worker: KILL of a session another
    worker serves, and closing the statements shared connections keep prepared on a server."""

    def __init__(self, worker, directory: str):
        self.worker = worker
        self.directory = directory  # the instance's runtime directory (runtime/rundir.py)
        self.sock: socket.socket | None = None
        self.pending: dict[int, asyncio.Future] = {}
        self.seq = 0

    def path(self, index: int) -> str:
        return os.path.join(self.directory, f"worker-{index}.sock")

    def start(self, loop) -> None:
        path = self.path(self.worker.index)
        try:
            os.unlink(path)  # left by this instance's worker that was killed (the directory is this instance's)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.setblocking(False)
        self.sock = sock
        loop.add_reader(sock.fileno(), self._readable)

    def stop(self) -> None:
        if self.sock is not None:
            self.worker.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
            try:
                os.unlink(self.path(self.worker.index))
            except OSError:
                pass

    def _readable(self) -> None:
        while self.sock is not None:
            try:
                data, addr = self.sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            try:
                msg = json.loads(data)
                if msg["t"] == "kill":
                    self.worker.loop.create_task(self._serve(msg, addr))
                elif msg["t"] == "free":
                    shared = self.worker.shared
                    n = shared.forget_statements(str(msg["server"])) if shared is not None else 0
                    self._answer({"t": "reply", "seq": msg["seq"], "freed": n}, addr)
                elif msg["t"] == "reply":
                    f = self.pending.pop(msg["seq"], None)
                    if f is not None and not f.done():
                        f.set_result(msg)
            except (ValueError, KeyError, TypeError):
                log.warning("worker %d: ignored a malformed peer message", self.worker.index)

    async def _serve(self, msg: dict, addr) -> None:
        user = self.worker.users.get(msg["user"])
        res = MISSING if user is None else await kill_session(self.worker, msg["id"], msg["conn"], user, msg["thr"])
        self._answer({"t": "reply", "seq": msg["seq"], "missing": res is MISSING,
                      "error": list(res) if isinstance(res, tuple) else None}, addr)

    def _answer(self, reply: dict, addr) -> None:
        if self.sock is None:
            return
        try:
            self.sock.sendto(json.dumps(reply).encode(), addr)
        except OSError as e:
            log.info("worker %d: could not answer a request from %s: %s", self.worker.index, addr, e)

    async def free_statements(self, server: str, wait: float = 1.0) -> int:
        """Ask every other worker to close the statements its shared connections keep prepared
        on `server` (SharedLines.forget_statements); how many they closed, as far as they answered
        within `wait` seconds."""
        loop = self.worker.loop
        asked = []
        for i in range(self.worker.count):
            if i == self.worker.index or self.sock is None:
                continue
            self.seq += 1
            f = loop.create_future()
            self.pending[self.seq] = f
            asked.append((self.seq, f))
            try:
                self.sock.sendto(json.dumps({"t": "free", "seq": self.seq, "server": server}).encode(), self.path(i))
            except OSError:  # no such worker (or it is restarting): nothing kept there
                f.cancel()
        if asked:
            await asyncio.wait([f for _, f in asked], timeout=wait)
        for seq, _ in asked:
            self.pending.pop(seq, None)
        return sum(f.result().get("freed", 0) for _, f in asked if f.done() and not f.cancelled())

    async def kill(self, owner: int, target: int, connection: bool, user, by_thread: bool = False):
        """Ask worker `owner` to kill session `target`; same results as kill_session."""
        self.seq += 1
        seq = self.seq
        f = self.worker.loop.create_future()
        self.pending[seq] = f
        msg = {"t": "kill", "seq": seq, "id": target, "conn": connection, "user": user.name, "thr": by_thread}
        try:
            self.sock.sendto(json.dumps(msg).encode(), self.path(owner))
            reply = await asyncio.wait_for(f, self.worker.config.pool.connect_timeout + 15)
        except OSError:  # no such worker (or it is restarting): its sessions are gone
            return MISSING
        except asyncio.TimeoutError:
            return (ER_UNKNOWN_ERROR[0], "HY000", f"rwproxy worker {owner} did not answer the KILL in time; try again")
        finally:
            self.pending.pop(seq, None)
        if reply["missing"]:
            return MISSING
        return tuple(reply["error"]) if reply["error"] else None


# ---- the session's side (functions of a ClientConnection `s`) -------------------------------

def kill_statement(s, pkt, flags: int) -> bool:
    """Take a numeric KILL statement off the normal path; False for anything else."""
    if flags & F_MULTI:
        texts = statement_texts(bytes(pkt[5:]))  # (None: it does not lex; the server's syntax error answers)
        if not texts or not any((k := parse_kill(t)) is not None and k[1] is not None for t in texts):
            return False
        s.spawn(kill_in_multi(s, texts))
        return True
    k = parse_kill(bytes(pkt[5:]))
    if k is None or k[1] is None:  # (`KILL ?` as text: the server's syntax error)
        return False
    s.spawn(kill(s, *k))
    return True


def _sql_string(text: str) -> str:
    """`text` inside a single-quoted SQL string (the server's own error text, bounded)."""
    return text[:512].replace("\\", "\\\\").replace("'", "''")


async def kill_in_multi(s, texts: list[bytes]) -> None:
    """A multi-statement with KILLs in it (node-mysql2's tests send `KILL ?; SELECT SLEEP(0.05)`):
    the ids are rwproxy's, so rwproxy carries the KILLs out, before the rest runs, and the session
    then runs the multi-statement with each KILL replaced by what answers as it did: DO 0 (an OK
    packet) or a SIGNAL of its error, with nothing after it, as a server stops a multi-statement
    at its first error. Sent as it was, the server answered 1094 for rwproxy's ids, and a small id
    named some other backend thread."""
    out = []
    for sql in texts:
        k = parse_kill(sql)
        if k is None or k[1] is None:
            out.append(sql)
            continue
        res = await kill_outcome(s, *k)
        if s.closed:
            return
        if res is None:
            out.append(b"DO 0")
            continue
        if k[0] and k[1] == s.conn_id:  # its own connection: the server ends it at once
            s.send_error(*res)
            return s.close()
        code, state, message = res
        state = state.decode() if isinstance(state, bytes) else state
        out.append(f"SIGNAL SQLSTATE '{state}' SET MYSQL_ERRNO = {int(code)}, "
                   f"MESSAGE_TEXT = '{_sql_string(message)}'".encode())
        break
    s.reader.put_back(command(COM_QUERY, b"; ".join(out)))


def kill_prepared(s, stmt, pkt) -> None:
    """COM_STMT_EXECUTE of a prepared `KILL [QUERY] <id | ?>` (DBD::MariaDB's server-side
    prepares, Connector/J's useServerPrepStmts): answered here, like the text statement, since
    the id is rwproxy's. The server only checked the statement when it was prepared."""
    connection, target = stmt.kill
    stmt.long_data = False
    if target is None:
        try:
            target, stmt.types = execute_int_param(pkt, stmt.types_at, stmt.types)
        except ProtocolError as e:
            return s.send_error(*ER_WRONG_ARGUMENTS, f"Incorrect arguments to mysqld_stmt_execute ({e})")
        target &= 0xFFFFFFFFFFFFFFFF  # as the server reads a thread id
    s.spawn(kill(s, connection, target))


async def kill(s, connection: bool, target: int) -> None:
    """KILL [QUERY | CONNECTION] <target> from session `s`, answered as the server would."""
    res = await kill_outcome(s, connection, target)
    if res is None:
        return s.write(ok_packet(1, s.status))
    s.send_error(*res)
    if connection and target == s.conn_id:  # as the server does for one's own id
        s.close()


async def kill_outcome(s, connection: bool, target: int):
    """Carry out KILL [QUERY | CONNECTION] <target> from session `s`: None when done, else the
    server's error for it (code, sqlstate, message)."""
    w = s.worker
    if target == s.conn_id:  # as the server does for one's own id
        if connection:
            return (*ER_CONNECTION_KILLED, "Connection was killed")
        return (*ER_QUERY_INTERRUPTED, "Query execution was interrupted")
    res = await _kill_on(s, w.worker_of(target), target, connection, False)
    if res is MISSING:
        # not a session id: a backend thread id of one of rwproxy's sessions (CONNECTION_ID())?
        for i in range(w.count):
            res = await _kill_on(s, i, target, connection, True)
            if res is not MISSING:
                break
    if res is MISSING:
        return (*ER_NO_SUCH_THREAD, f"Unknown thread id: {target}")
    return res


async def _kill_on(s, owner, target: int, connection: bool, by_thread: bool):
    w = s.worker
    if owner == w.index:
        return await kill_session(w, target, connection, s.user, by_thread)
    if owner is None or w.peers is None:
        return MISSING
    return await w.peers.kill(owner, target, connection, s.user, by_thread)


async def kill_shared_write(worker, line, e, user, wait: float = 1.0):
    """KILL QUERY of the write `e` queued on shared connection `line`. Nothing queues behind a
    write (shared.EXCLUSIVE) and the connection takes nothing new until this is done, so once the
    write heads the queue (reads ahead of it take at most a millisecond or so) the KILL can only
    stop it. None when done (or the write finished first), else (code, sqlstate, message)."""
    loop = worker.loop
    line.reserve(True)
    try:
        deadline = loop.time() + wait
        while e in line.queue and line.queue[0] is not e and loop.time() < deadline and not line.closed:
            await asyncio.sleep(0.001)
        if line.closed or not line.queue or line.queue[0] is not e or e.relayed:
            return None
        return await kill_backend_thread(worker, line.server.name, user, line.thread_id, False)
    finally:
        line.reserve(False)


def stop_running(s, why: str = "client went away during a statement") -> None:
    """The client of session `s` disconnected (or an operator said so): stop what its statement
    still runs on a backend."""
    w = s.worker
    cmd = s.inflight
    if s.shared_entry is not None and cmd is not None and cmd.cls.route != READ:
        log.info("session %d: %s; killing its write on a shared connection to %s", s.conn_id, why,
                 s.shared_on.server.name)
        w.loop.create_task(kill_shared_write(w, s.shared_on, s.shared_entry, s.user))
    for be in s.backends.values():
        if be.relaying_for(s) and be.thread_id:
            log.info("session %d: %s; killing it on %s (thread %d)", s.conn_id, why, be.server.name, be.thread_id)
            w.loop.create_task(kill_backend_thread(w, be.server.name, s.user, be.thread_id, False))
