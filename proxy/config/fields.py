"""The building blocks of the schema: field specs (S, I, F, ...) and the value checkers they name.

Kept apart from the sections (schema.py) so the schema reads as the list of keys it is.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import field

_LISTEN_RE = re.compile(r"\[([0-9A-Fa-f:.]+(?:%[\w.-]+)?)\]:(\d{1,5})|([^\s:\[\]]+):(\d{1,5})")
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,63}")


def parse_listen(text: str) -> tuple[str, int] | None:
    """Split "host:port" / "[v6]:port" (port 0-65535; 0 = any free port)."""
    m = _LISTEN_RE.fullmatch(text)
    if not m:
        return None
    host, port = (m[1], m[2]) if m[1] else (m[3], m[4])
    return (host, int(port)) if int(port) <= 65535 else None


def format_hostport(host: str, port: int) -> str:
    """Inverse of parse_listen: IPv6 literals get brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_error(value: str) -> str | None:
    if parse_listen(value) is None:
        return f'expected "host:port" (IPv6 as "[::1]:6033"), got {show(value)}'
    return None


def socket_error(value: str) -> str | None:
    if value and not value.startswith("/"):
        return "must be an absolute path to the server's Unix socket (e.g. /run/mysqld/mysqld.sock), or \"\" for TCP"
    return None


def listen_socket_error(value: str) -> str | None:
    """[proxy] socket: "" or an absolute path that fits a Unix socket name (107 bytes on Linux)."""
    if value and not value.startswith("/"):
        return f"must be an absolute path (e.g. /run/rwproxy/mysql.sock), or \"\" for none, got {show(value)}"
    if len(value.encode()) > 107:
        return f"is {len(value.encode())} bytes long; a Unix socket path may have at most 107"
    return None


def identifier_error(value: str) -> str | None:
    if not _IDENT_RE.fullmatch(value):
        return f"expected an identifier ([A-Za-z_][A-Za-z0-9_$]*, at most 64 characters), got {show(value)}"
    return None


def account_name_error(value: str) -> str | None:
    """A client's user name ends at its first NUL and a server takes at most 128 characters: such a
    [[users]] or [[admin.users]] name could never log in."""
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return f"a user name with control characters can never log in, got {show(value)}"
    if len(value) > 128:
        return f"at most 128 characters (a server's limit for user names), got {len(value)}"
    return None


_INSTANCE_RE = re.compile(r"[A-Za-z0-9_.:@-]{0,128}")


def instance_error(value: str) -> str | None:
    if not _INSTANCE_RE.fullmatch(value):
        return f"expected letters, digits and _ . : @ - (at most 128), got {show(value)}"
    return None


def url_error(value: str) -> str | None:
    if not re.fullmatch(r"https?://[^/\s]+/?", value):
        return f"expected http://host:port or https://host:port, got {show(value)}"
    return None


def regex_error(value: str) -> str | None:
    try:
        re.compile(value, re.IGNORECASE)
    except re.error as exc:
        return f"invalid regular expression {show(value)}: {exc}"
    return None


_HASH_RE = re.compile(r"\*[0-9A-Fa-f]{40}")


def is_native_hash(password: str) -> bool:
    """A mysql_native_password hash as the server stores it ("*" + 40 hex digits of
    SHA1(SHA1(password))), given instead of the clear password."""
    return isinstance(password, str) and bool(_HASH_RE.fullmatch(password))


def secret_keys(cls) -> list[str]:
    """The password keys of a section that may also come from `<key>_env` or `<key>_file`."""
    names = {f.name for f in dataclasses.fields(cls)}
    return [n for n in names if n + "_env" in names and n + "_file" in names]


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_str(s: str) -> str:
    parts = []
    for ch in s:
        if ch in _ESCAPES:
            parts.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            parts.append(f"\\u{ord(ch):04x}")
        else:
            parts.append(ch)
    return '"' + "".join(parts) + '"'


def show(value) -> str:
    """Render a user value JSON-style for error messages (strings in double quotes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, str):
        return toml_str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return str(value)


# -- field spec helpers -------------------------------------------------------

def _key(default, kind: str, *, required=False, factory=None, repr=True, **spec):
    meta = {"kind": kind, "required": required, **spec}
    if factory is not None:
        return field(default_factory=factory, metadata=meta, repr=repr)
    return field(default=default, metadata=meta, repr=repr)


def S(default="", *, nonempty=False, check=None, **kw):
    """String key (optionally non-empty and/or passed through a checker)."""
    return _key(default, "str", nonempty=nonempty, check=check, **kw)


def I(default, lo=None, hi=None, **kw):  # noqa: E743 - short names keep the tables readable
    """Integer key within [lo, hi] (bool rejected)."""
    return _key(default, "int", lo=lo, hi=hi, **kw)


def F(default, *, positive=False, hi=None):
    """Duration in seconds: >= 0, or > 0 when positive, at most hi (a year if None); ints become floats."""
    return _key(float(default), "float", positive=positive, hi=hi)


def B(default):
    return _key(default, "bool")


def E(default, *choices, **kw):
    """String enum; choices listed in the order error messages show them."""
    return _key(default, "enum", choices=choices, **kw)


def L(check=None):
    """Array of strings, stored as a tuple so the config stays hashable (check: of the whole list)."""
    return _key((), "strs", check=check)


def T(cls):
    """Sub-table ([section.sub])."""
    return _key(None, "table", cls=cls, factory=cls)


def A(cls, min_items=0):
    """Array of tables ([[section]]), stored as a tuple."""
    return _key((), "tables", cls=cls, min_items=min_items)


def set_hostport(obj) -> None:
    hp = parse_listen(obj.listen)
    if hp is None:
        raise ValueError(f"invalid listen address {obj.listen!r}")
    object.__setattr__(obj, "host", hp[0])
    object.__setattr__(obj, "port", hp[1])


def optional_listen_error(value: str) -> str | None:
    return listen_error(value) if value else None


def env_name_error(value: str) -> str | None:
    if value and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        return f"expected an environment variable name, got {show(value)}"
    return None


def absolute_path_error(value: str) -> str | None:
    return None if not value or value.startswith("/") else f"must be an absolute path, got {show(value)}"


def PW_ENV():
    """The environment variable a password is read from (at start and at every reload)."""
    return S(check=env_name_error)


def PW_FILE():
    """A file whose first line is the password (owner-only permissions expected)."""
    return S()

def repository_error(value: str) -> str | None:
    if value.startswith("s3://"):  # a bucket name as S3 allows it (3-63 of a-z 0-9 . -)
        if re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?", value):
            return None
    elif not value or value.startswith(("file:///", "/")):
        return None
    return f'expected "file:///ABSOLUTE/PATH", "/ABSOLUTE/PATH" or "s3://BUCKET/PREFIX", got {show(value)}'


def endpoint_error(value: str) -> str | None:
    if not value or re.fullmatch(r"https?://[^/\s]+/?", value):
        return None
    return f'expected the S3 API URL, http://host:port or https://host (or "" for AWS), got {show(value)}'


_AGE_RECIPIENT = re.compile(r"age1[02-9ac-hj-np-z]{58}")  # bech32, as `age-keygen` and `rwproxy backup keygen` print


def recipients_error(values) -> str | None:
    for i, v in enumerate(values):
        if not _AGE_RECIPIENT.fullmatch(v):
            return (f"[{i}] is not an age public key (age1 and 58 more characters, as `rwproxy backup keygen` "
                    f"prints it), got {show(v)}")
    return None


def cron_error(value: str) -> str | None:
    if not value:
        return None
    from proxy.backup.schedule import CronError, Cron  # late: the schedule module imports nothing of ours

    try:
        Cron(value)
    except CronError as e:
        return str(e)
    return None
