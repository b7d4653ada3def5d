"""Reading PyMySQL errors the same way across the control plane (monitor, failover)."""

from __future__ import annotations

import pymysql


def describe(exc: BaseException) -> str:
    """One line for logs and status: "message (code)" for server errors, else the exception."""
    if isinstance(exc, pymysql.MySQLError) and len(exc.args) >= 2:
        return f"{exc.args[1]} ({exc.args[0]})"
    return f"{type(exc).__name__}: {exc}"


def error_code(exc: BaseException) -> int:
    """The server's error number, 0 when the exception carries none."""
    return exc.args[0] if isinstance(exc, pymysql.MySQLError) and exc.args and isinstance(exc.args[0], int) else 0
