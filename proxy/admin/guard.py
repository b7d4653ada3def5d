"""Packets mysql-mimic 3.0.5 must never parse.

Its reader of NUL-terminated strings (compiled, in mysql_mimic.types) loops forever when the
packet ends before the NUL. One login packet with an unterminated user name, sent before any
password, or a one-byte COM_FIELD_LIST, would then spin the admin port's thread for good. The
compiled parsers cannot be changed from here, so the Python callers' references to them are
replaced with checks that walk the same fields and refuse a packet whose NUL-terminated
strings are not all there (1043 Bad handshake at login, 1835 Malformed packet after), then
call the original parser. Text that is not valid UTF-8 (a statement, a database, a table) gets
the server's 1300 instead of Python's codec message, and a character set number mysql-mimic
does not know is taken as the default one, as the server takes it, instead of failing with
Python's enum message.
"""

from __future__ import annotations

from mysql_mimic import auth as mimic_auth
from mysql_mimic import connection as mimic_connection
from mysql_mimic import packets as mimic_packets
from mysql_mimic.charset import Collation
from mysql_mimic.errors import MysqlError

from proxy.protocol.constants import (
    CLIENT_COMPRESS, CLIENT_CONNECT_WITH_DB, CLIENT_PLUGIN_AUTH, CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA, CLIENT_PROTOCOL_41,
    CLIENT_SECURE_CONNECTION, UTF8MB4_GENERAL_CI,
)


class Malformed(ValueError):
    pass


class Unsupported(Malformed):
    """A well-formed request the admin port cannot honour: the client is told why."""


def _nul(data: bytes, pos: int) -> int:
    """The position after the NUL-terminated string at pos."""
    end = data.find(b"\0", pos)
    if end < 0:
        raise Malformed("a string has no terminating NUL")
    return end + 1


def _lenenc(data: bytes, pos: int) -> int:
    """The position after the length-encoded string at pos."""
    if pos >= len(data):
        raise Malformed("packet ends inside a length")
    first = data[pos]
    size = {0xFC: 2, 0xFD: 3, 0xFE: 8}.get(first, 0)
    if first in (0xFB, 0xFF):
        raise Malformed("bad length prefix")
    n = int.from_bytes(data[pos + 1:pos + 1 + size], "little") if size else first
    return pos + 1 + size + n


def _known_collation(data: bytes, pos: int, size: int) -> bytes:
    """`data` with the collation number at pos (size bytes) replaced by utf8mb4_general_ci when
    mysql-mimic does not know it (its enum lookup raised ValueError with Python's words): the
    server takes an unknown number as its default character set."""
    try:
        Collation(int.from_bytes(data[pos:pos + size], "little"))
        return data
    except ValueError:
        return data[:pos] + UTF8MB4_GENERAL_CI.to_bytes(size, "little") + data[pos + size:]


def check_handshake_response(capabilities: int, data: bytes) -> bytes:
    caps = int(capabilities) & int.from_bytes(data[:4], "little")
    if len(data) < 32:
        raise Malformed("login packet too short")
    data = _known_collation(data, 8, 1)
    if data[0] & CLIENT_COMPRESS and not int(capabilities) & CLIENT_COMPRESS:
        # Connector/Python compresses when asked whether or not the greeting offered it, and
        # would wait for compressed answers forever: refuse it in the last uncompressed packet.
        raise Unsupported("the admin port does not speak the compressed protocol; connect without compression")
    if len(data) == 32:
        return data  # an SSL request
    if not caps & CLIENT_PROTOCOL_41:
        raise Malformed("pre-4.1 login packet")
    pos = _nul(data, 32)  # user name
    if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
        pos = _lenenc(data, pos)
    else:
        pos += 1 + (data[pos] if pos < len(data) else 0)
    if caps & CLIENT_CONNECT_WITH_DB:
        pos = _nul(data, pos)
    if caps & CLIENT_PLUGIN_AUTH:
        _nul(data, pos)
    return data


def check_change_user(capabilities: int, data: bytes) -> bytes:
    caps = int(capabilities)
    pos = _nul(data, 0)  # user name
    if caps & CLIENT_SECURE_CONNECTION:
        pos += 1 + (data[pos] if pos < len(data) else 0)
    else:
        pos = _nul(data, pos)
    pos = _nul(data, pos)  # database
    if pos < len(data):  # the optional part
        if caps & CLIENT_PROTOCOL_41:
            data = _known_collation(data, pos, 2)
            pos += 2
        if caps & CLIENT_PLUGIN_AUTH:
            _nul(data, pos)
    return data


def _guarded(parse, check, code: int, message: str):
    def guarded(*args, **kw):  # (mysql-mimic passes capabilities= and data= by keyword)
        capabilities = kw["capabilities"] if "capabilities" in kw else args[0]
        data = kw["data"] if "data" in kw else args[-1]
        try:
            fixed = check(capabilities, data)
        except Unsupported as e:
            raise MysqlError(f"{message}: {e}", code) from None
        except Malformed:
            raise MysqlError(message, code) from None
        if fixed is not data:
            args, kw = _with_data(args, kw, fixed)
        return _as_server(parse, *args, **kw)
    return guarded


def _with_data(args: tuple, kw: dict, data: bytes) -> tuple[tuple, dict]:
    """A parser's arguments with `data` (its last, positional or by keyword) replaced."""
    if "data" in kw:
        return args, {**kw, "data": data}
    return (*args[:-1], data), kw


def _as_server(parse, *args, **kw):
    """mysql-mimic's parser, with text that is not valid UTF-8 answered as the server words it
    (1300), not with Python's codec message."""
    try:
        return parse(*args, **kw)
    except UnicodeDecodeError as e:
        bad = e.object[e.start:e.start + 8].hex().upper()
        raise MysqlError(f"Invalid utf8mb4 character string: '{bad}'", 1300) from None


def _field_list(parse):
    def guarded(*args, **kw):
        data = kw["data"] if "data" in kw else args[-1]
        if b"\0" not in data:
            raise MysqlError("Malformed communication packet", 1835)
        table, _, wildcard = data.partition(b"\0")
        fixed = table + b"\0" + wildcard.split(b"\0", 1)[0]  # (a NUL in the wildcard reached SQLite's error)
        args, kw = _with_data(args, kw, fixed)
        return _as_server(parse, *args, **kw)
    return guarded


def _text(parse):
    def guarded(*args, **kw):
        return _as_server(parse, *args, **kw)
    return guarded


def _str_null(reader) -> bytes:
    start = reader.tell()
    rest = reader.read()
    end = rest.find(b"\0")
    if end < 0:
        raise MysqlError("Malformed communication packet", 1835)
    reader.seek(start + end + 1)
    return rest[:end]


_installed = False


def install() -> None:
    """Put the checks in front of mysql-mimic's parsers (once; a changed mysql-mimic fails loudly)."""
    global _installed
    if _installed:
        return
    for module, name in ((mimic_packets, "parse_handshake_response"), (mimic_packets, "parse_handshake_response_41"),
                         (mimic_packets, "parse_com_change_user"), (mimic_packets, "parse_com_query"),
                         (mimic_connection, "parse_com_field_list"), (mimic_connection, "parse_com_init_db"),
                         (mimic_auth, "read_str_null")):
        if not callable(getattr(module, name, None)):
            raise ImportError(f"mysql-mimic changed: {module.__name__}.{name} is gone; recheck proxy/admin/guard.py")
    bad_login = (1043, "Bad handshake")
    mimic_packets.parse_handshake_response = _guarded(mimic_packets.parse_handshake_response,
                                                      check_handshake_response, *bad_login)
    mimic_packets.parse_handshake_response_41 = _guarded(mimic_packets.parse_handshake_response_41,
                                                         check_handshake_response, *bad_login)
    mimic_packets.parse_com_change_user = _guarded(mimic_packets.parse_com_change_user, check_change_user,
                                                   1835, "Malformed communication packet")
    mimic_packets.parse_com_query = _text(mimic_packets.parse_com_query)
    mimic_connection.parse_com_init_db = _text(mimic_connection.parse_com_init_db)
    mimic_connection.parse_com_field_list = _field_list(mimic_connection.parse_com_field_list)
    mimic_auth.read_str_null = _str_null  # (pure Python there: the clear-password plugin's reader)
    _installed = True
