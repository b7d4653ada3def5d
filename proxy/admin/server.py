"""The admin SQL port: a MySQL-protocol server (mysql-mimic) in the control plane.

Any MySQL client connects to it (`mariadb -h127.0.0.1 -P6032 -uadmin -p`). It serves the
operator's tables through SQLite (engine.py) and the admin commands (commands.py).

mysql-mimic 3.0.5 is used for the protocol only, with its known holes closed here:
- after a failed authentication it writes the error and still starts the command phase, so a
  client that ignores the error gets its next query run: here any failed login, and any failed
  COM_CHANGE_USER, closes the connection at once (AdminConnection.authenticate);
- COM_STMT_EXECUTE pastes parameters into the SQL text without escaping: here every prepared-
  statement command is refused (ERROR 1295), so nothing is ever bound by text substitution;
- its default identity provider accepts any user: here only [[admin.users]] log in, with
  mysql_native_password against SHA1(SHA1(password)) (or the hash given in the config); an
  unknown name is checked against a random hash, so the answer does not tell who exists;
- a packet is read without any size limit, and a silent client holds its connection forever:
  here packets are capped at 1 MiB and the login must finish within 10 s;
- its reader of NUL-terminated strings loops forever when the packet ends first, so one login
  packet with an unterminated user name (before any password) or a 1-byte COM_FIELD_LIST would
  stop the whole admin port: here such packets are refused before it reads them (guard.py);
- KILL ends other admin connections, and static SELECTs and information_schema queries run in
  sqlglot's Python executor (`SELECT REPEAT('x', 1e9)` exhausts memory): here KILL means a
  client session of the proxy (admin role), and every query runs in the bounded SQLite engine.
The `stats` role may read the tables and nothing else.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
import re
import socket
import threading

from mysql_mimic import ResultColumn  # noqa: F401  (the public API this module builds on)
from mysql_mimic.auth import IdentityProvider, NativePasswordAuthPlugin, User
from mysql_mimic import connection as mimic_connection
from mysql_mimic.connection import Connection
from mysql_mimic.control import LocalControl
from mysql_mimic.errors import MysqlError
from mysql_mimic.packets import make_column_definition_41
from mysql_mimic.schema import BaseInfoSchema, com_field_list_to_show_statement, info_schema_tables, mapping_to_columns
from mysql_mimic.session import Session
from mysql_mimic.stream import ConnectionClosed, MysqlStream
from mysql_mimic.utils import aiterate
from mysql_mimic.variables import SYSTEM_VARIABLES, GlobalVariables, SessionVariables
import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from proxy import __version__
from proxy.admin import commands, engine, guard, show
from proxy.config.schema import is_native_hash
from proxy.observe.http import bound_socket
from proxy.logs import Throttle, clean
from proxy.observe.tables import COLUMNS
from proxy.protocol.packets import err_payload, frame

log = logging.getLogger("rwproxy.admin")
FAILED = Throttle(log)
MAX_PACKET = 1 << 20
LOGIN_TIMEOUT = 10.0
MAX_SQL = 256 * 1024
ADMIN, STATS = "admin", "stats"

_SQLSTATES = {1054: "42S22", 1305: "42000", 1040: "08004", 1043: "08S01", 1045: "28000", 1046: "3D000", 1047: "08S01", 1049: "42000",
              1064: "42000", 1065: "42000", 1094: "HY000", 1104: "42000", 1146: "42S02", 1193: "HY000",
              1227: "42000", 1231: "42000", 1235: "42000", 1290: "HY000", 1295: "HY000", 1300: "HY000", 1835: "HY000", 1969: "70100"}

_VARIABLES = dict(SYSTEM_VARIABLES)
_VARIABLES["version"] = (str, f"10.11.0-rwproxy-admin-{__version__}", False)
_VARIABLES["version_comment"] = (str, "rwproxy admin port", False)
_VARIABLES["default_storage_engine"] = (str, "rwproxy", True)
_VARIABLES["default_tmp_storage_engine"] = (str, "rwproxy", True)


guard.install()


class _Closed(BaseException):
    """Ends an admin connection at once. A BaseException so that mysql-mimic's generic error
    handling (which would answer and carry on) cannot catch it."""


def stored_hash(password: str) -> str:
    """SHA1(SHA1(password)) in hex, as mysql-mimic compares it ("*HEX" given in the config is used as is)."""
    if is_native_hash(password):
        return password[1:].lower()
    return hashlib.sha1(hashlib.sha1(password.encode("utf-8")).digest()).hexdigest()


class AdminIdentity(IdentityProvider):
    """Only [[admin.users]], only mysql_native_password."""

    def __init__(self, users):
        self.set_users(users)
        self._decoy = os.urandom(20).hex()  # unknown names fail exactly like a wrong password

    def set_users(self, users) -> None:
        self.users = {u.name: (stored_hash(u.password), u.role) for u in users}

    def role(self, name: str | None) -> str | None:
        entry = self.users.get(name or "")
        return entry[1] if entry else None

    def get_plugins(self):
        return [NativePasswordAuthPlugin()]

    async def get_user(self, username: str):
        entry = self.users.get(username)
        return User(name=username, auth_string=entry[0] if entry else self._decoy,
                    auth_plugin=NativePasswordAuthPlugin.name)


class BoundedStream:
    """mysql-mimic's packet stream with a size limit and exact header reads on the way in
    (its stream class is compiled, so this wraps it instead of subclassing)."""

    def __init__(self, reader, writer):
        self._inner = MysqlStream(reader, writer)
        self.reader = reader

    def __getattr__(self, name):
        return getattr(self._inner, name)

    async def read(self) -> bytes:
        data = bytearray()
        while True:
            try:
                header = await self.reader.readexactly(4)
            except (asyncio.IncompleteReadError, ConnectionError):
                raise ConnectionClosed() from None
            length = header[0] | header[1] << 8 | header[2] << 16
            expected = next(self._inner.seq)
            if header[3] != expected:
                raise _Closed(f"packets out of order (got {header[3]}, expected {expected})")
            if len(data) + length > MAX_PACKET:
                raise _Closed(f"packet larger than {MAX_PACKET} bytes")
            if length:
                try:
                    data += await self.reader.readexactly(length)
                except (asyncio.IncompleteReadError, ConnectionError):
                    raise ConnectionClosed() from None
            if length < 0xFFFFFF:
                return bytes(data)


class AdminConnection(Connection):
    """mysql-mimic's connection with the holes closed (see the module docstring)."""

    async def connection_phase(self) -> None:
        try:
            await asyncio.wait_for(super().connection_phase(), LOGIN_TIMEOUT)
        except asyncio.TimeoutError:
            raise _Closed("no login within 10 s") from None

    async def authenticate(self, username, auth_response, client_plugin_name, connect_attrs, auth_state=None,
                           server_plugin=None) -> None:
        self.session.username = None
        await super().authenticate(username=username, auth_response=auth_response,
                                   client_plugin_name=client_plugin_name, connect_attrs=connect_attrs,
                                   auth_state=auth_state, server_plugin=server_plugin)
        if self.session.username is None:  # mysql-mimic sent "Access denied": the connection ends here
            FAILED.info("admin port: failed login as %s from %s", clean(username), self.session.peer)
            raise _Closed("failed login")
        log.info("admin port: %s (%s) logged in from %s", clean(username),
                 self.session.server.identity.role(username), self.session.peer)

    def error(self, msg="", code=1105, **_kw) -> bytes:
        code = int(code)
        return err_payload(code, _SQLSTATES.get(code, "HY000").encode(), str(msg), int(self.capabilities))

    async def _refuse_ps(self, data: bytes) -> None:
        raise MysqlError("prepared statements are not supported on the rwproxy admin port; send the statement "
                         "as text (parameters are never substituted into SQL here)", 1295)

    handle_stmt_prepare = handle_stmt_execute = handle_stmt_fetch = handle_stmt_reset = _refuse_ps

    async def handle_field_list(self, data: bytes) -> None:
        """COM_FIELD_LIST (the mariadb CLI sends one per table to complete names): each column's
        definition in a packet of its own, and 1146 for a table that does not exist. mysql-mimic
        3.0.5 wrote every definition into one packet (a client read the first column only) and,
        for an unknown table, an empty packet where a definition belongs."""
        req = mimic_connection.parse_com_field_list(self.client_charset, data)  # (guarded: guard.py)
        result = await self.query(sql=com_field_list_to_show_statement(req), query_attrs={})
        rows = [row async for row in aiterate(result.rows)]
        if not rows and not req.wildcard:  # every table has a column
            raise MysqlError(f"Table '{req.table}' doesn't exist", 1146)
        for row in rows:
            await self.stream.write(make_column_definition_41(server_charset=self.server_charset, table=req.table,
                                                              name=row[0], is_com_field_list=True, default=row[4]))
        await self.stream.write(self.ok_or_eof())

    async def handle_stmt_send_long_data(self, data: bytes) -> None:
        return None  # (no reply is ever sent to this command; the statement does not exist)

    async def handle_stmt_close(self, data: bytes) -> None:
        return None


class _InfoSchema(BaseInfoSchema):
    def __init__(self, session: "AdminSession"):
        self.session = session

    async def query(self, expression):
        return await self.session.run_sql(expression)


class AdminSession(Session):
    """One admin client: its role decides what it may do."""

    def __init__(self, server: "AdminServer", peer: str):
        super().__init__(SessionVariables(GlobalVariables(_VARIABLES)))
        self.server = server
        self.peer = peer
        self.database = engine.DATABASE
        # KILL is an admin command here; static SELECTs run in SQLite like every other query.
        self.middlewares = [m for m in self.middlewares
                            if m.__name__ not in ("_kill_middleware", "_static_query_middleware")]

    async def handle_query(self, sql: str, attrs):
        if len(sql) > MAX_SQL:
            raise MysqlError(f"statement longer than {MAX_SQL} characters", 1104)
        sql = show.as_query(sql) or sql  # (SHOW PROCESSLIST, SHOW STATUS)
        try:
            shown = show.answer(sql, self.server.catalogue, self.database, self.server.cfg.query_timeout)
        except engine.QueryError as e:
            raise MysqlError(e.message, e.code) from None
        if shown is not None:
            return shown
        cmd = commands.parse(sql)
        if cmd is not None:
            role = self.server.identity.role(self.username)
            if cmd.verb != "help" and role != ADMIN:
                raise MysqlError(f"Access denied; the {role or 'current'} role may only read the tables "
                                 f"({commands.TITLES[cmd.verb]} needs the admin role)", 1227)
            log.info("admin port: %s ran %s", clean(self.username), clean(sql, 200))
            return await self.server.command(cmd)
        if commands.is_command_word(sql):
            raise MysqlError("unknown admin command; SHOW COMMANDS lists them", 1064)
        try:
            return await super().handle_query(sql, attrs)
        except SqlglotError as e:
            raise MysqlError(f"You have an error in your SQL syntax: {_syntax(e)}", 1064) from None
        except RecursionError:
            raise MysqlError("statement nested too deeply", 1064) from None

    def _parse(self, sql: str):
        """mysql-mimic's hook for the statements of a query (it runs each and answers with the
        last result only): one, as a server without CLIENT_MULTI_STATEMENTS takes; a comment
        after the last `;` is none (sqlglot makes it a statement of its own)."""
        statements = [e for e in sqlglot.parse(sql, read=self.dialect) if e and not isinstance(e, exp.Semicolon)]
        if len(statements) > 1:
            raise MysqlError("one statement at a time on the admin port", 1064)
        return statements

    async def query(self, expression, sql, attrs):
        return await self.run_sql(expression)

    async def run_sql(self, expression):
        try:
            return await self.server.select(expression, self.database)
        except engine.QueryError as e:
            raise MysqlError(e.message, e.code) from None

    async def schema(self):
        return _InfoSchema(self)

    async def init(self, connection) -> None:
        await super().init(connection)
        if not self.database:
            self.database = engine.DATABASE  # SHOW TABLES works without USE

    async def use(self, database: str) -> None:
        if database.lower() not in (engine.DATABASE, "information_schema"):
            raise MysqlError(f"Unknown database '{database}'", 1049)
        self.database = database


def _syntax(e: SqlglotError) -> str:
    """sqlglot's first error without its terminal colour codes: what went wrong and where."""
    errors = getattr(e, "errors", None) or []
    if errors:
        first = errors[0]
        where = f" at line {first.get('line')}, column {first.get('col')}" if first.get("line") else ""
        return clean(f"{first.get('description') or 'cannot parse'}{where}", 300)
    return clean(re.sub(r"\x1b\[[0-9;]*m", "", str(e)), 300)


class AdminServer:
    """Serves the admin port on its own thread and event loop in the supervisor.

    `plane` is the ControlPlane: tables(names) for the rows, admin_command(cmd) for the commands.
    """

    def __init__(self, plane, config):
        self.plane = plane
        self.cfg = config.admin
        self.identity = AdminIdentity(config.admin.users)
        self.sock: socket.socket | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.open = 0
        self._ids = itertools.count(1)
        self._control = LocalControl()
        mapping = {engine.DATABASE: {t: {c: ty for c, ty in cols} for t, cols in COLUMNS.items()}}
        data = info_schema_tables(mapping_to_columns(mapping))["information_schema"]
        self.info_tables = {name: (list(t.columns), [tuple(r) for r in t.rows]) for name, t in data.items()}
        self.catalogue = show.Catalogue(self.info_tables)
        self._server = None

    def bind(self) -> None:
        """Before the workers fork: a busy or forbidden address is a start-up error (OSError)."""
        self.sock = bound_socket(self.cfg.host, self.cfg.port)

    def start(self) -> None:
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), name="rwproxy-admin", daemon=True)
        self.thread.start()
        ready.wait(10)

    def reconfigure(self, config) -> None:
        self.cfg = config.admin
        self.identity.set_users(config.admin.users)

    def _run(self, ready: threading.Event) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)

        async def main():
            self._server = await asyncio.start_server(self._client, sock=self.sock, limit=MAX_PACKET + 8)
            ready.set()
            await self._server.serve_forever()

        try:
            self.loop.run_until_complete(main())
        except (asyncio.CancelledError, RuntimeError):
            pass
        finally:
            ready.set()

    def stop(self) -> None:
        loop = self.loop
        if loop is not None and self._server is not None:
            loop.call_soon_threadsafe(self._server.close)
            for task in asyncio.all_tasks(loop) if not loop.is_closed() else ():
                loop.call_soon_threadsafe(task.cancel)
        if self.thread is not None:
            self.thread.join(5)

    @property
    def address(self) -> tuple:
        return self.sock.getsockname() if self.sock is not None else ("", 0)

    async def _client(self, reader, writer) -> None:
        peer = writer.get_extra_info("peername")
        host = peer[0] if peer else "?"
        if self.open >= self.cfg.max_connections:
            writer.write(frame(err_payload(1040, b"08004", "Too many connections"), 0))
            writer.close()
            return
        self.open += 1
        session = AdminSession(self, host)
        conn = AdminConnection(stream=BoundedStream(reader, writer), session=session, control=self._control,
                               identity_provider=self.identity)
        conn.connection_id = next(self._ids)
        try:
            await conn.start()
        except _Closed as e:
            log.debug("admin port: closed the connection from %s: %s", host, e)
        except (ConnectionError, ConnectionClosed, asyncio.IncompleteReadError):
            pass
        except Exception as e:  # a client's mistake must never end the admin port
            log.info("admin port: connection from %s ended: %s", host, clean(str(e), 200))
        finally:
            self.open -= 1
            writer.close()

    # ---- what sessions call ---------------------------------------------------------------
    async def select(self, expression, database):
        """(rows, column names), as mysql-mimic takes a result."""
        cfg = self.cfg
        names, rows = await asyncio.get_running_loop().run_in_executor(
            None, engine.run, expression, database, self.plane.tables, self.info_tables, cfg.query_timeout,
            cfg.max_rows)
        return rows, names

    async def command(self, cmd: commands.Command):
        if cmd.verb == "help":
            return commands.HELP_ROWS, ["command", "what it does"]
        try:
            cols, rows = await asyncio.get_running_loop().run_in_executor(None, self.plane.admin_command, cmd)
        except ValueError as e:  # (the control plane's CommandError: refused, with the reason)
            raise MysqlError(str(e), getattr(e, "code", 1105)) from None
        return rows, cols


def logging_quiet() -> None:
    """mysql-mimic logs client-supplied text raw (user names, queries) at INFO and ERROR: the admin
    port logs what matters itself, cleaned (proxy/logs.py)."""
    lg = logging.getLogger("mysql_mimic")
    lg.setLevel(logging.CRITICAL)
    lg.propagate = False
