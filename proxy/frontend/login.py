"""The front end's handshake and authentication (also reused by COM_CHANGE_USER).

The proxy verifies clients against the users in its config. It knows each
password, so mysql_native_password and caching_sha2_password tokens are checked
by recomputing them. caching_sha2_password behaves as on MySQL 8: the first
login of a user (per worker process) must go through full authentication,
either the clear password over TLS or the RSA public-key exchange; later logins
take the fast path.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import struct
from dataclasses import dataclass

from proxy.backend.connection import BackendError
from proxy.config.schema import UserConfig, is_native_hash
from proxy.logs import Throttle, clean
from proxy.protocol import auth, ed25519
from proxy.protocol.constants import (
    CLIENT_COMPRESS,
    CLIENT_CONNECT_ATTRS,
    CLIENT_MYSQL,
    CLIENT_PLUGIN_AUTH,
    CLIENT_PROTOCOL_41,
    CLIENT_SECURE_CONNECTION,
    CLIENT_SESSION_TRACK,
    CLIENT_SSL,
    CR_CONN_HOST_ERROR,
    ER_ACCESS_DENIED_ERROR,
    ER_HANDSHAKE_ERROR,
    ER_NET_PACKETS_OUT_OF_ORDER,
    ER_NOT_SUPPORTED_AUTH_MODE,
    ER_SECURE_TRANSPORT_REQUIRED,
    ER_TOO_MANY_USER_CONNECTIONS,
    MARIADB_CLIENT_EXTENDED_METADATA,
    MARIADB_CLIENT_STMT_BULK_OPERATIONS,
    PROXY_CAPABILITIES,
    SERVER_STATUS_AUTOCOMMIT,
    SERVER_STATUS_NO_BACKSLASH_ESCAPES,
    SESSION_SHAPING_CAPABILITIES,
    UTF8MB4_GENERAL_CI,
)
from proxy.protocol.handshake import OldClient, build_greeting, parse_response
from proxy.protocol.packets import (
    ProtocolError, err_packet, err_payload, frame, login_ok_packet, read_lenenc_int, read_nul_str,
)

log = logging.getLogger("rwproxy.login")
# The greeting's flags: as a MariaDB server's, without CLIENT_MYSQL, so that MariaDB clients read the
# extended capabilities rwproxy offers: array binding (COM_STMT_BULK_EXECUTE) and extended column
# types (a session-shaping flag: such sessions use server connections of their own kind). Not the
# metadata cache, which leaves column definitions out of results. And compression.
OFFERED = (PROXY_CAPABILITIES & ~CLIENT_MYSQL | MARIADB_CLIENT_STMT_BULK_OPERATIONS | MARIADB_CLIENT_EXTENDED_METADATA
           | CLIENT_COMPRESS)
FAILED_LOGINS = Throttle(log)  # a client may try as often as it likes; the log says so a few times a second


class AccessDenied(Exception):
    """Login refused; `seq` is the sequence number the ERR packet must carry."""

    def __init__(self, message: str, seq: int):
        super().__init__(message)
        self.seq = seq


@dataclass(slots=True)
class ChangeUser:
    user: str
    auth_response: bytes
    database: str | None
    charset: int | None
    plugin: str


def parse_change_user(payload: bytes, caps: int) -> ChangeUser:
    """COM_CHANGE_USER's fields; ProtocolError if the packet is cut short or garbled."""
    try:
        return _parse_change_user(payload, caps)
    except (IndexError, struct.error) as e:
        raise ProtocolError(f"truncated packet ({e})") from None


def _parse_change_user(payload: bytes, caps: int) -> ChangeUser:
    user, pos = read_nul_str(payload, 1)
    if caps & CLIENT_SECURE_CONNECTION:
        n = payload[pos]
        if pos + 1 + n > len(payload):
            raise ProtocolError("auth response runs past the packet")
        token = bytes(payload[pos + 1 : pos + 1 + n])
        pos += 1 + n
    else:
        token, pos = read_nul_str(payload, pos)
    # The server's checks (sql_acl.cc): the database field must be there (its NUL may be the
    # packet's end), and a client that negotiated plugin auth must send a charset and more
    if pos >= len(payload):
        raise ProtocolError("no database field")
    db, pos = read_nul_str(payload + b"\x00", pos)
    if caps & CLIENT_PLUGIN_AUTH and pos + 2 >= len(payload):
        raise ProtocolError("no authentication plugin field")
    charset = None
    if caps & CLIENT_PROTOCOL_41 and pos + 2 <= len(payload):
        charset = struct.unpack_from("<H", payload, pos)[0]
        pos += 2
    plugin = b""
    if caps & CLIENT_PLUGIN_AUTH and pos < len(payload):
        plugin, pos = read_nul_str(payload + b"\x00", pos)
    if caps & CLIENT_CONNECT_ATTRS and pos < len(payload):
        read_lenenc_int(payload, pos)  # attributes are not needed by the proxy
    return ChangeUser(user.decode("utf-8", "replace"), token, db.decode("utf-8", "replace") or None, charset, plugin.decode("ascii", "replace"))


def access_denied_message(user: str, host: str, token: bytes) -> str:
    return f"Access denied for user '{user}'@'{host}' (using password: {'YES' if token else 'NO'})"


class Authenticator:
    """Verifies one client login; `io` is the client connection (read_packet/write)."""

    def __init__(self, users, default_plugin: str, rsa: auth.RSAKeyPair | None, sha2_cache: set,
                 timeout: float = 30.0, accounts=None):
        self.users = users  # name -> UserConfig
        self.default_plugin = default_plugin
        self.rsa = rsa
        self.sha2_cache = sha2_cache
        self.timeout = timeout  # seconds a client has to answer each step of the exchange
        self.accounts = accounts  # frontend.accounts.ServerAccounts ([auth] server_accounts), or None

    async def login(self, io, user: str, plugin: str, token: bytes, salt: bytes, seq: int, host: str, tls: bool,
                    change_user: bool = False):
        """Run the plugin exchange; returns (UserConfig, next seq). Raises AccessDenied with the
        message, asyncio.TimeoutError when the client stops answering. `change_user`: for
        COM_CHANGE_USER, where the server answers an empty token with a switch and a new salt."""
        ucfg = self.users.get(user)
        if ucfg is None and self.accounts is not None:
            return await self._server_account(io, user, plugin, token, salt, seq, host)
        wanted = (ucfg.auth_plugin if ucfg is not None else "") or (
            plugin if plugin in auth.SUPPORTED else self.default_plugin)
        if wanted == auth.ED25519:
            return await self._ed25519(io, ucfg, seq, host)
        # Auth switch: ask the client to answer with the plugin this user needs. A client
        # whose plugin differs from the greeting's may also have sent no data at all
        # (libmariadb does), expecting the switch to bring a salt for its plugin. An unknown
        # user goes the same way as a known one with a password (as MariaDB does), so the
        # exchange does not tell who exists.
        password = ucfg.password if ucfg is not None else "?"
        if plugin != wanted or (not token and password and (change_user or plugin != self.default_plugin)):
            salt = auth.nonce()
            io.write(frame(b"\xfe" + wanted.encode() + b"\x00" + salt + b"\x00", seq))
            seq, token = await io.read_packet(self.timeout)
            seq += 1
        if ucfg is None:
            raise AccessDenied(access_denied_message(user, host, token), seq)
        if wanted == auth.NATIVE:
            if is_native_hash(ucfg.password):
                # configured as the server stores it: the client's answer gives SHA1(password),
                # which logs the session in to the backends (as for [auth] server_accounts)
                stage1 = auth.native_stage1(bytes.fromhex(ucfg.password[1:]), salt, token)
                if stage1 is None:
                    raise AccessDenied(access_denied_message(user, host, token), seq)
                return dataclasses.replace(ucfg, password=stage1), seq
            if not auth.verify(auth.NATIVE, ucfg.password, salt, token):
                raise AccessDenied(access_denied_message(user, host, token), seq)
            return ucfg, seq
        return await self._sha2(io, ucfg, salt, token, seq, host, tls)

    async def _server_account(self, io, user: str, plugin: str, token: bytes, salt: bytes, seq: int, host: str):
        """A user only the primary knows: mysql_native_password against its stored hash; the session
        then logs in to the backends with SHA1(password) recovered from the client's answer."""
        account = await self.accounts.lookup(user, host)
        if plugin != auth.NATIVE or not token:  # (an unknown name takes the same turn: nothing to tell)
            salt = auth.nonce()
            io.write(frame(b"\xfe" + auth.NATIVE.encode() + b"\x00" + salt + b"\x00", seq))
            seq, token = await io.read_packet(self.timeout)
            seq += 1
        credential = _server_credential(account, salt, token)
        if credential is None and account is not None:
            account = await self.accounts.lookup(user, host, fresh=True)  # its password may have changed
            credential = _server_credential(account, salt, token)
        if credential is None:
            raise AccessDenied(access_denied_message(user, host, token), seq)
        return UserConfig(name=user, password=credential), seq

    async def _ed25519(self, io, ucfg, seq, host):
        """Always an auth switch: the greeting's 20-byte salt is too short for this plugin,
        whose scramble is 32 random bytes (sent without a NUL, as the server does)."""
        scramble = os.urandom(32)
        io.write(frame(b"\xfe" + auth.ED25519.encode() + b"\x00" + scramble, seq))
        seq, signature = await io.read_packet(self.timeout)
        seq += 1
        if not ed25519.verify(ucfg.password.encode(), scramble, signature):
            raise AccessDenied(access_denied_message(ucfg.name, host, signature), seq)
        return ucfg, seq

    async def _sha2(self, io, ucfg, salt, token, seq, host, tls):
        if not ucfg.password and not token.strip(b"\x00"):
            return ucfg, seq
        if not auth.verify(auth.CACHING_SHA2, ucfg.password, salt, token):
            raise AccessDenied(access_denied_message(ucfg.name, host, token), seq)
        if ucfg.name in self.sha2_cache:
            io.write(frame(b"\x01" + auth.SHA2_FAST_AUTH_OK, seq))
            return ucfg, seq + 1
        io.write(frame(b"\x01" + auth.SHA2_PERFORM_FULL_AUTH, seq))
        seq, data = await io.read_packet(self.timeout)
        seq += 1
        if tls:
            clear = data.rstrip(b"\x00")
        else:
            if data != auth.SHA2_REQUEST_PUBLIC_KEY or self.rsa is None:
                raise AccessDenied(access_denied_message(ucfg.name, host, token), seq)
            io.write(frame(b"\x01" + self.rsa.public_pem, seq))
            seq, data = await io.read_packet(self.timeout)
            seq += 1
            try:
                clear = self.rsa.decrypt_password(data, salt)
            except Exception:
                raise AccessDenied(access_denied_message(ucfg.name, host, token), seq) from None
        if clear != ucfg.password.encode():
            raise AccessDenied(access_denied_message(ucfg.name, host, token), seq)
        self.sha2_cache.add(ucfg.name)
        log.info("user %s: caching_sha2_password full authentication (%s) succeeded", clean(ucfg.name), "TLS" if tls else "RSA")
        return ucfg, seq



def _server_credential(account, salt: bytes, token: bytes):
    """What the session logs in to the backends with for a server account: "" (no password) or
    the Stage1; None when the client's answer does not match the account."""
    if account is None:
        return None
    if not account.stored:
        return "" if not token.strip(b"\x00") else None
    return auth.native_stage1(account.stored, salt, token)


@dataclass(slots=True)
class Login:
    """What the handshake settled: the session starts from this."""
    user: object  # the UserConfig authenticated
    caps: int  # capability flags agreed with the client
    charset: int  # the client's character set
    database: str | None  # the database it asked for
    salt: bytes  # the greeting's scramble (COM_CHANGE_USER checks against it again)
    tls: bool  # the connection is encrypted
    seq: int  # the sequence number the final OK (or error) of the login carries


async def handshake(io, worker, conn_id: int, host: str) -> Login | None:
    """Greeting, optional TLS upgrade, authentication. The Login, or None after the error has
    been sent (or the client went away). `io` is the session: write(), read_packet(), start_tls()."""
    w = worker
    try:
        salt = auth.nonce()
        offered = OFFERED | (CLIENT_SSL if w.tls_context else 0)
        greeting = build_greeting(w.server_version, conn_id, salt, offered, UTF8MB4_GENERAL_CI,
                                  start_status(w, w.primary_name), w.auth_plugin)  # (as the primary's own)
        io.write(frame(greeting, 0))
        seq, payload = await io.read_packet(w.config.pool.connect_timeout + 8)
        resp = parse_response(payload)
        tls = False
        if resp.ssl_request:
            if not w.tls_context:
                raise ProtocolError("client asked for TLS, which is not configured")
            if seq != 1:
                return _out_of_order(io)
            io.start_tls(w.tls_context)
            tls = True
            seq, payload = await io.read_packet(10)
            resp = parse_response(payload)
        if seq != 1 + tls:  # as the server answers (and then closes)
            return _out_of_order(io)
        seq += 1
        if w.config.proxy.tls.require and not tls and host != "localhost":  # (the Unix socket is secure)
            msg = "Connections using insecure transport are prohibited while --require_secure_transport=ON."
            io.write(err_packet(seq, ER_SECURE_TRANSPORT_REQUIRED, msg))
            return None
        caps = resp.capabilities & (offered | SESSION_SHAPING_CAPABILITIES) & (PROXY_CAPABILITIES | OFFERED)
        try:
            user, seq = await w.authenticator.login(io, resp.user, resp.plugin, resp.auth_response, salt, seq, host, tls)
        except AccessDenied as e:
            FAILED_LOGINS.info("client %s: %s", host, clean(str(e), 256))
            io.write(err_packet(e.seq, ER_ACCESS_DENIED_ERROR, str(e), caps))
            return None
        if user.require_tls and not tls:
            msg = f"Access denied for user '{user.name}'@'{host}': this user must connect with TLS"
            io.write(err_packet(seq, ER_ACCESS_DENIED_ERROR, msg, caps))
            return None
        return Login(user, caps, resp.charset, resp.database, salt, tls, seq)
    except OldClient as e:  # (a 4.0 client reads no SQLSTATE: capabilities 0)
        if e.secure:
            io.write(err_packet(2, ER_HANDSHAKE_ERROR, "Bad handshake", 0))
        elif not e.password:
            FAILED_LOGINS.info("client %s: %s", host, clean(access_denied_message(e.user, host, b""), 256))
            io.write(err_packet(2, ER_ACCESS_DENIED_ERROR, access_denied_message(e.user, host, b""), 0))
        else:
            io.write(err_packet(2, ER_NOT_SUPPORTED_AUTH_MODE, "Client does not support authentication protocol "
                                "requested by server; consider upgrading MariaDB client", 0))
        return None
    except (ProtocolError, ValueError, IndexError) as e:
        io.write(err_packet(2, ER_HANDSHAKE_ERROR, f"Bad handshake: {e}"))
        return None
    except (ConnectionError, asyncio.TimeoutError, OSError):
        return None


def _out_of_order(io) -> None:
    io.write(err_packet(1, ER_NET_PACKETS_OUT_OF_ORDER, "Got packets out of order"))  # (seq 1, as the server)


def admit_user(s, user, seq: int) -> bool:
    """Count session `s` against `user`'s max_connections (releasing the user it counted against
    before, after COM_CHANGE_USER); False after the error was sent, as MariaDB words it."""
    if s.counted_user is not None:
        s.worker.release_user(s.counted_user)
        s.counted_user = None
    if not s.worker.admit_user(user):
        log.info("session %d: user %s is at its max_connections (%d)", s.conn_id, clean(user.name),
                 user.max_connections)
        s.write(err_packet(seq, ER_TOO_MANY_USER_CONNECTIONS, f"User {user.name} already has more than "
                              "'max_user_connections' active connections", s.caps))
        return False
    s.counted_user = user.name
    return True


def start_status(w, name: str | None) -> int:
    """Status flags a new session (login, COM_CHANGE_USER, COM_RESET_CONNECTION) on server `name`
    starts with: autocommit as that server's global value, which the monitor reads, as a direct
    login there would. With `autocommit = 0` in the servers' configuration the application
    expects its writes to wait for COMMIT."""
    st = w.topology.servers.get(name) if name else None
    if st is None:
        return SERVER_STATUS_AUTOCOMMIT
    return ((SERVER_STATUS_AUTOCOMMIT if st.autocommit else 0)
            | (SERVER_STATUS_NO_BACKSLASH_ESCAPES if st.no_backslash_escapes else 0))


def login_ok(s, seq: int) -> bytes:
    """The OK that ends session `s`'s login or COM_CHANGE_USER (its database as session state to a
    client that tracks it, as a server's)."""
    return login_ok_packet(seq, s.status, s.db, bool(s.caps & CLIENT_SESSION_TRACK))


async def start_writer(s) -> None:
    """Connect a new session's primary connection, with the primary's global autocommit."""
    name = s.writer()
    s.status = start_status(s.worker, name)
    await s.backend_for(name)


async def open_session(session, seq: int) -> bool:
    """After authentication: make sure the session can be served, and connect its primary now so
    that a wrong database or a backend refusing the user is reported at login, as a server would.
    If the primary is unreachable the session still starts: reads go to replicas and writes wait
    for a primary; if it is full (1040) too, and its writes get the 1040 a client of the server
    gets. True once the final OK is sent."""
    w = session.worker
    try:
        if not w.primary_ok and not w.topology.readers:
            if w.topology.writes_held:  # a failover or switchover is under way: worth waiting for
                await w.wait_for_primary()
            else:
                servers = [w.topology.primary] if w.topology.primary else list(w.topology.servers.values())
                msg = "; ".join(f"Can't connect to backend {b.name} ({w.servers[b.name].where}): it is {b.state}"
                                + (f" ({b.last_error})" if b.last_error else "") for b in servers)
                session.write(err_packet(seq, CR_CONN_HOST_ERROR, msg or "rwproxy: no backend is configured"))
                return False
        if w.primary_ok:
            try:
                await start_writer(session)
            except BackendError as e:
                if not e.unavailable or not w.topology.readers:
                    session.write(frame(err_payload(e.code, e.sqlstate.encode(), e.message), seq))
                    return False
        session.write(login_ok(session, seq))
        return True
    except (ConnectionError, asyncio.TimeoutError, OSError):
        return False
