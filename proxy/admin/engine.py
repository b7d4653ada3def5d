"""The SQL engine behind the admin port's tables: SQLite, fed from a live snapshot per query.

ProxySQL's admin is SQLite underneath, and for the same reason: operators get WHERE, ORDER BY,
GROUP BY, LIMIT, joins, CTEs and aggregates for free. A statement arrives parsed by sqlglot
(MySQL dialect), is checked to read only known tables, is written out in SQLite's dialect and
runs on a fresh in-memory database holding just the tables it names (filled from the control
plane's tables at that moment, so every query sees the present).

Hostile or careless SQL stays harmless: the database is private to the query; an authorizer
allows reading and nothing else (no ATTACH, no PRAGMA, no writes, no extension loading); a
progress handler stops a query after [admin] query_timeout; strings and blobs are capped at
16 MiB (SQLite's SQLITE_LIMIT_LENGTH) and results at [admin] max_rows rows.
"""

from __future__ import annotations

import sqlite3
import time

from sqlglot import exp
from sqlglot.dialects.sqlite import SQLite
from sqlglot.errors import SqlglotError

from proxy.observe.tables import COLUMNS

DATABASE = "rwproxy"
ER_NO_SUCH_TABLE = (1146, "42S02")
ER_BAD_DB = (1049, "42000")
ER_PARSE = (1064, "42000")
ER_READ_ONLY = (1290, "HY000")
ER_STATEMENT_TIMEOUT = (1969, "70100")
ER_TOO_BIG = (1104, "42000")
ER_UNKNOWN = (1105, "HY000")
ER_BAD_FIELD = (1054, "42S22")
ER_NO_FUNCTION = (1305, "42000")
ER_NOT_SUPPORTED = (1235, "42000")

_ALLOWED = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
_DENIED_FUNCTIONS = {"load_extension", "readfile", "writefile", "edit", "fts3_tokenizer"}
MAX_LENGTH = 16 << 20


class QueryError(Exception):
    """An error the admin client receives: (code, sqlstate), message."""

    def __init__(self, error: tuple[int, str], message: str):
        super().__init__(message)
        self.code, self.sqlstate = error
        self.message = message


def _authorize(action, arg1, arg2, dbname, source):
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in _DENIED_FUNCTIONS:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK if action in _ALLOWED else sqlite3.SQLITE_DENY


def is_query(expression) -> bool:
    """A statement that only reads (SELECT, UNION ..., WITH ... SELECT)."""
    return isinstance(expression, exp.Query)


def referenced(expression, database: str | None, info_tables: dict) -> tuple[set[str], set[str]]:
    """(rwproxy tables, information_schema tables) the statement reads; QueryError for anything else."""
    if expression.find(exp.Parameter) is not None:  # @v: SQLite would take it for a bound parameter
        raise QueryError(ER_NOT_SUPPORTED, "user variables (@name) are not supported on the admin port")
    if expression.find(exp.Placeholder) is not None:  # ?, :name in a text statement, as a server refuses it
        raise QueryError(ER_PARSE, "You have an error in your SQL syntax: a parameter marker outside a "
                         "prepared statement (the admin port takes statements as text)")
    ctes = {c.alias_or_name.lower() for c in expression.find_all(exp.CTE)}
    mine, info = set(), set()
    for t in expression.find_all(exp.Table):
        if not isinstance(t.this, exp.Identifier):
            raise QueryError(ER_PARSE, "table functions are not supported on the admin port")
        db = (t.db or database or "").lower()
        name = t.name.lower()
        if not t.db and name in ctes:
            continue
        if db in ("", DATABASE):
            if name not in COLUMNS:
                raise QueryError(ER_NO_SUCH_TABLE, f"Table '{DATABASE}.{name}' doesn't exist; "
                                 f"the tables are: {', '.join(COLUMNS)}")
            mine.add(name)
        elif db == "information_schema":
            if name not in info_tables:
                raise QueryError(ER_NO_SUCH_TABLE, f"Table 'information_schema.{name}' doesn't exist")
            info.add(name)
        else:
            raise QueryError(ER_BAD_DB, f"Unknown database '{db}'")
    return mine, info


def _unqualify(node):
    """rwproxy.x -> x (the tables live in SQLite's main database)."""
    if isinstance(node, exp.Table) and node.db.lower() == DATABASE:
        node.set("db", None)
    return node


class _SQLite(SQLite):
    """SQLite with every identifier in backticks: mysql-mimic's SHOW rewrites alias columns to
    keywords (`Table`), and SQLite reads an unknown double-quoted name as a string literal, so a
    misspelt column would answer with its own name instead of ERROR 1054."""

    class Tokenizer(SQLite.Tokenizer):
        IDENTIFIERS = ["`"]


def without_dual(expression):
    """`SELECT 1 FROM DUAL` as MySQL means it: no table at all."""
    for sel in expression.find_all(exp.Select):
        key = "from_" if "from_" in sel.args else "from"  # (sqlglot renamed the argument)
        f = sel.args.get(key)
        if (f is not None and isinstance(f.this, exp.Table) and not f.this.db and f.this.name.lower() == "dual"
                and not sel.args.get("joins")):
            sel.set(key, None)
    return expression


def to_sqlite(expression, database: str | None) -> str:
    expr = expression.copy().transform(_unqualify)
    if database and database.lower() == "information_schema":
        def qualify(node):
            if isinstance(node, exp.Table) and not node.db:
                node.set("db", exp.to_identifier("information_schema"))
            return node
        expr = expr.transform(qualify)
    try:
        return expr.sql(dialect=_SQLite, identify=True)
    except SqlglotError as e:
        raise QueryError(ER_PARSE, f"cannot run this statement: {e}") from None


def run(expression, database: str | None, fetch, info_tables: dict, timeout: float, max_rows: int):
    """Run a read-only statement; (column names, rows). `fetch(names)` returns {name: [row dicts]};
    `info_tables` is {name: (columns, rows)} for information_schema."""
    if not is_query(expression):
        if isinstance(expression, (exp.Column, exp.Literal, exp.Identifier)):  # a bare word or value: not a statement
            raise QueryError(ER_PARSE, "You have an error in your SQL syntax: this is not a statement (type HELP)")
        if isinstance(expression, exp.Describe):  # EXPLAIN <query>: the tables have no plan to show
            raise QueryError(ER_NOT_SUPPORTED, "EXPLAIN of a query is not supported on the admin port")
        if isinstance(expression, exp.Command) and str(expression.this).upper() in ("SHOW", "DESC", "DESCRIBE"):
            raise QueryError(ER_NOT_SUPPORTED, f"This version of the rwproxy admin port doesn't yet support "
                             f"'{str(expression.this).upper()} {str(expression.expression or '')[:60]}'")
        raise QueryError(ER_READ_ONLY, "the rwproxy admin tables are read-only; change things with the admin "
                         "commands (type HELP) or in the config file and RELOAD CONFIG")
    expression = without_dual(expression)
    mine, info = referenced(expression, database, info_tables)
    sql = to_sqlite(expression, database)
    data = fetch(sorted(mine)) if mine else {}
    db = _database()
    try:
        for name in mine:
            cols = COLUMNS[name]
            _load(db, "main", name, [c for c, _ in cols], [t for _, t in cols],
                  [tuple(r.get(c) for c, _ in cols) for r in data.get(name, [])])
        if info:
            db.execute("ATTACH DATABASE ':memory:' AS information_schema")
            for name in info:
                cols, rows = info_tables[name]
                _load(db, "information_schema", name, cols, ["" for _ in cols], rows)
        names, rows = _execute(db, sql, timeout, max_rows)
        return _names(expression, names), rows
    finally:
        db.close()


def run_on_rows(sql: str, names: list[str], rows: list[tuple], timeout: float) -> list[tuple]:
    """Run `sql` over one table `t` holding `rows` (a SHOW's result under its WHERE: show.py)."""
    db = _database()
    try:
        _load(db, "main", "t", names, ["" for _ in names], rows)
        return _execute(db, sql, timeout, len(rows))[1]
    finally:
        db.close()


def _database():
    db = sqlite3.connect(":memory:", check_same_thread=False)
    db.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_LENGTH)
    db.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 1)
    return db


def _execute(db, sql: str, timeout: float, max_rows: int) -> tuple[list[str], list[tuple]]:
    """(column names, rows) of `sql`, read-only, stopped after `timeout` s, errors as a server words them."""
    for name, nargs, fn in _FUNCTIONS:
        db.create_function(name, nargs, fn)
    deadline = time.monotonic() + timeout
    db.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 2000)
    db.set_authorizer(_authorize)
    try:
        cur = db.execute(sql)
        rows = cur.fetchmany(max_rows + 1)
    except sqlite3.OperationalError as e:
        text = str(e)
        if text == "interrupted":
            raise QueryError(ER_STATEMENT_TIMEOUT, f"Query execution was interrupted (the admin port's "
                             f"query_timeout of {timeout:g} s was exceeded)") from None
        if text.startswith("not authorized"):
            raise QueryError(ER_READ_ONLY, "not allowed on the admin port (it only reads its tables)") from None
        if text.startswith("no such column: "):
            raise QueryError(ER_BAD_FIELD, f"Unknown column '{text[16:]}'") from None
        if text.startswith("no such function: "):
            raise QueryError(ER_NO_FUNCTION, f"FUNCTION {text[18:]} does not exist on the admin port "
                             "(its tables run on SQLite: see docs/operations.md)") from None
        if "syntax error" in text or "null character" in text:
            raise QueryError(ER_PARSE, f"You have an error in your SQL syntax: {text}") from None
        raise QueryError(ER_UNKNOWN, f"{text} (in: {sql[:200]})") from None
    except (sqlite3.DataError, sqlite3.Error) as e:
        if "too big" in str(e):
            raise QueryError(ER_TOO_BIG, f"result too large: {e}") from None
        raise QueryError(ER_UNKNOWN, str(e)) from None
    if len(rows) > max_rows:
        raise QueryError(ER_TOO_BIG, f"the result has more than {max_rows} rows ([admin] max_rows); add a "
                         f"LIMIT or a WHERE")
    return [d[0] for d in cur.description or ()], rows


def _now() -> str:
    """NOW(): the same UTC text the tables' times use, so `last_seen > NOW() - ...` style filters compare."""
    t = time.time()
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}"


# MySQL functions an operator reaches for that SQLite lacks (sqlglot translates CONCAT, IFNULL, ...)
_FUNCTIONS = (("NOW", 0, _now), ("UNIX_TIMESTAMP", 0, lambda: int(time.time())))


def _names(expression, sqlite_names: list[str]) -> list[str]:
    """Column names as MySQL would give them (`CONCAT('a', 'b')`, not SQLite's `'a' || 'b'`)."""
    if not isinstance(expression, exp.Select):
        return sqlite_names
    picks = expression.expressions
    if len(picks) != len(sqlite_names) or any(isinstance(e, exp.Star) or isinstance(e.unalias(), exp.Star)
                                               for e in picks):
        return sqlite_names
    out = []
    for e, fallback in zip(picks, sqlite_names):
        if isinstance(e, (exp.Alias, exp.Column)):
            out.append(e.alias_or_name or fallback)
        else:
            out.append(e.sql(dialect="mysql"))
    return out


def _load(db, schema: str, name: str, cols: list[str], types: list[str], rows: list[tuple]) -> None:
    decl = ", ".join(f'"{c}" {t}'.rstrip() for c, t in zip(cols, types))
    db.execute(f'CREATE TABLE {schema}."{name}" ({decl})')
    if rows:
        marks = ", ".join("?" * len(cols))
        db.executemany(f'INSERT INTO {schema}."{name}" VALUES ({marks})', rows)
