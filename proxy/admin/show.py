"""SHOW and DESCRIBE on the admin port, answered in the shapes a MariaDB server gives.

GUI clients and the mariadb CLI learn a table through SHOW [FULL] COLUMNS/FIELDS, DESCRIBE, SHOW
INDEX, SHOW CREATE TABLE and SHOW TABLE STATUS. mysql-mimic 3.0.5 answered an unknown table with an
empty set (a server gives 1146), ignored a WHERE, put SHOW FULL COLUMNS' columns in another order
with the text 'NULL' as collation, and left FIELDS, INDEXES, KEYS, CREATE TABLE, CREATE DATABASE and
TABLE STATUS to fail as "read-only" or "unsupported". Here each form is matched on the text (sqlglot
parses only some of them), the rows are built from the tables' declared columns, and LIKE or WHERE
filters them in a private SQLite database, as the engine runs every other admin query.
"""

from __future__ import annotations

import re

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from proxy.admin import engine
from proxy.observe.tables import COLUMNS, INT, REAL

_COLLATION = "utf8mb4_general_ci"
_IDENT = r"(?:`(?:[^`]|``)+`|[A-Za-z0-9_$]+)"
_NAME = rf"({_IDENT})(?:\s*\.\s*({_IDENT}))?"  # [db.]table: group 1 and the optional group 2
_FROM = r"(?:FROM|IN)"
_TAIL = r"(?:\s+(LIKE\s+.+|WHERE\s+.+))?"
_FORMS = (
    ("columns", re.compile(rf"SHOW\s+(FULL\s+|EXTENDED\s+(?:FULL\s+)?)?(?:COLUMNS|FIELDS)\s+{_FROM}\s+{_NAME}"
                           rf"(?:\s+{_FROM}\s+({_IDENT}))?{_TAIL}", re.I | re.S)),
    ("index", re.compile(rf"SHOW\s+(EXTENDED\s+)?(?:INDEX|INDEXES|KEYS)\s+{_FROM}\s+{_NAME}"
                         rf"(?:\s+{_FROM}\s+({_IDENT}))?{_TAIL}", re.I | re.S)),
    ("describe", re.compile(rf"(?:DESC|DESCRIBE|EXPLAIN)\s+(?!(?:SELECT|WITH|INSERT|UPDATE|DELETE|REPLACE|TABLE|VALUES|"
                            rf"EXTENDED|PARTITIONS|FORMAT|ANALYZE|FOR)\b){_NAME}(?:\s+({_IDENT}|'(?:[^'\\]|\\.|'')*'))?()",
                            re.I | re.S)),
    ("create_table", re.compile(rf"SHOW\s+CREATE\s+TABLE\s+{_NAME}()()", re.I | re.S)),
    ("create_db", re.compile(rf"SHOW\s+CREATE\s+(?:DATABASE|SCHEMA)\s+(?:IF\s+NOT\s+EXISTS\s+)?({_IDENT})()()",
                             re.I | re.S)),
    ("status", re.compile(rf"SHOW\s+TABLE\s+STATUS(?:\s+{_FROM}\s+({_IDENT}))?(){_TAIL}", re.I | re.S)),
    ("tables", re.compile(rf"SHOW\s+(FULL\s+)?TABLES(?:\s+{_FROM}\s+({_IDENT}))?(){_TAIL}", re.I | re.S)),
)
_COMMENTS = re.compile(r"\A(?:\s*(?:/\*(?!!).*?\*/|(?:--\s|#)[^\n]*))+", re.S)  # in front (tools put their name there)
_COLUMNS = ("Field", "Type", "Null", "Key", "Default", "Extra")
_FULL_COLUMNS = ("Field", "Type", "Collation", "Null", "Key", "Default", "Extra", "Privileges", "Comment")
_INDEX = ("Table", "Non_unique", "Key_name", "Seq_in_index", "Column_name", "Collation", "Cardinality", "Sub_part",
          "Packed", "Null", "Index_type", "Comment", "Index_comment", "Ignored")
_STATUS = ("Name", "Engine", "Version", "Row_format", "Rows", "Avg_row_length", "Data_length", "Max_data_length",
           "Index_length", "Data_free", "Auto_increment", "Create_time", "Update_time", "Check_time", "Collation",
           "Checksum", "Create_options", "Comment", "Max_index_length", "Temporary")
_TYPES = {INT: "bigint(20)", REAL: "double"}


def _ident(text: str | None) -> str | None:
    if text is None:
        return None
    return text[1:-1].replace("``", "`") if text.startswith("`") else text


def _quoted(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


class Catalogue:
    """The admin port's two databases and their tables' columns: `rwproxy` (observe.tables) and
    `information_schema` (mysql-mimic's, {name: (columns, rows)})."""

    def __init__(self, info_tables: dict):
        self.dbs = {engine.DATABASE: {name: [(c, _TYPES.get(t, "text")) for c, t in cols]
                                      for name, cols in COLUMNS.items()},
                    "information_schema": {name: [(c, "text") for c in cols]
                                           for name, (cols, _rows) in info_tables.items()}}

    def database(self, name: str | None, current: str | None) -> str:
        db = (name or current or engine.DATABASE).lower()
        if db not in self.dbs:
            raise engine.QueryError(engine.ER_BAD_DB, f"Unknown database '{name or current}'")
        return db

    def table(self, db_name: str | None, table: str, current: str | None) -> tuple[str, str, list]:
        """(db, table, [(column, type)]), or 1146 as a server names a missing table."""
        db = (db_name or current or engine.DATABASE).lower()
        cols = self.dbs.get(db, {}).get(table.lower())
        if cols is None:
            raise engine.QueryError(engine.ER_NO_SUCH_TABLE, f"Table '{db_name or current or engine.DATABASE}."
                                    f"{table}' doesn't exist")
        return db, table.lower(), cols


def answer(sql: str, catalogue: Catalogue, current: str | None, timeout: float):
    """(rows, column names) for a SHOW/DESCRIBE form this module knows, None for anything else
    (mysql-mimic and the engine take it). Raises engine.QueryError as a server would answer."""
    text = _bare(sql)
    for kind, pattern in _FORMS:
        m = pattern.fullmatch(text)
        if m is not None:
            return _answer(kind, m, catalogue, current, timeout)
    return None


def _bare(sql: str) -> str:
    """The statement without the comments in front of it, surrounding blanks and a final ';'."""
    return _COMMENTS.sub("", sql).strip().rstrip(";").strip()


_PROCESSLIST = re.compile(r"SHOW\s+(?:FULL\s+)?PROCESSLIST", re.I)
PROCESSLIST_SQL = ("SELECT id AS Id, user AS User, host AS Host, db, state AS Command, seconds AS Time, "
                   "pinned AS State, digest AS Info FROM sessions ORDER BY id")
_STATUS_FORM = re.compile(rf"SHOW\s+(?:GLOBAL\s+|SESSION\s+|LOCAL\s+)?STATUS{_TAIL}", re.I | re.S)


def as_query(sql: str) -> str | None:
    """The SHOW forms answered by a query of one of the tables, as that query; None for others.
    SHOW [FULL] PROCESSLIST lists the proxy's client sessions, as a server lists its own; SHOW
    [GLOBAL|SESSION] STATUS [LIKE|WHERE] the `status` table (uptime, sessions, statements...),
    where an operator used to ProxySQL's admin or a server looks first (mysql-mimic answered it
    with an empty set)."""
    text = _bare(sql)
    if _PROCESSLIST.fullmatch(text):
        return PROCESSLIST_SQL
    m = _STATUS_FORM.fullmatch(text)
    if m is None:
        return None
    tail = m.group(1) or ""
    if tail[:4].upper() == "LIKE":
        tail = "WHERE Variable_name " + tail
    return f"SELECT * FROM (SELECT name AS Variable_name, value AS Value FROM status) AS s {tail}"


def _table(catalogue: Catalogue, first: str, second: str | None, db_clause: str | None, current):
    """(db, table, columns) named `first.second`, or `first` (in `db_clause`, else the current database)."""
    db, table = (first, second) if second is not None else (db_clause, first)
    return catalogue.table(_ident(db), _ident(table), current)


def _answer(kind, m, catalogue: Catalogue, current, timeout):
    if kind in ("columns", "index"):
        modifier, first, second, db_clause, tail = m.groups()
        _, _, cols = _table(catalogue, first, second, db_clause, current)
        if kind == "index":  # the tables have no indexes
            return _filtered(_INDEX, [], tail, timeout)
        full = bool(modifier) and "FULL" in modifier.upper()
        return _filtered(_FULL_COLUMNS if full else _COLUMNS, _column_rows(cols, full), tail, timeout)
    if kind == "describe":
        first, second, column, _ = m.groups()
        _, _, cols = _table(catalogue, first, second, None, current)
        tail = None
        if column is not None:  # DESCRIBE t col: the column, or a LIKE pattern in quotes
            tail = "LIKE " + (column if column.startswith("'") else "'" + _ident(column).replace("'", "''") + "'")
        return _filtered(_COLUMNS, _column_rows(cols, False), tail, timeout)
    if kind == "create_table":
        first, second, _, _ = m.groups()
        db, table, cols = _table(catalogue, first, second, None, current)
        lines = ",\n".join(f"  {_quoted(c)} {t} DEFAULT NULL" for c, t in cols)
        temporary = "TEMPORARY " if db == "information_schema" else ""
        return [(table, f"CREATE {temporary}TABLE {_quoted(table)} (\n{lines}\n) ENGINE=MEMORY "
                        f"DEFAULT CHARSET=utf8mb4 COLLATE={_COLLATION}")], ["Table", "Create Table"]
    if kind == "create_db":
        db = catalogue.database(_ident(m.group(1)), current)
        return [(db, f"CREATE DATABASE {_quoted(db)} /*!40100 DEFAULT CHARACTER SET utf8mb4 "
                     f"COLLATE {_COLLATION} */")], ["Database", "Create Database"]
    if kind == "status":
        db_name, _, tail = m.groups()
        db = catalogue.database(_ident(db_name), current)
        rows = [(name, "MEMORY", 10, "Fixed", None, 0, 0, 0, 0, 0, None, None, None, None, _COLLATION, None, "",
                 "", 0, "Y" if db == "information_schema" else "N") for name in sorted(catalogue.dbs[db])]
        return _filtered(_STATUS, rows, tail, timeout)
    modifier, db_name, _, tail = m.groups()  # SHOW [FULL] TABLES
    db = catalogue.database(_ident(db_name), current)
    kind_of = "SYSTEM VIEW" if db == "information_schema" else "BASE TABLE"
    names = (f"Tables_in_{db}",) + (("Table_type",) if modifier else ())
    rows = [(name, kind_of)[:len(names)] for name in sorted(catalogue.dbs[db])]
    return _filtered(names, rows, tail, timeout)


def _column_rows(cols, full: bool) -> list[tuple]:
    if full:
        return [(c, t, _COLLATION if t == "text" else None, "YES", "", None, "", "select", "") for c, t in cols]
    return [(c, t, "YES", "", None, "") for c, t in cols]


def _filtered(names, rows, tail: str | None, timeout: float):
    """`rows` under a LIKE (on the first column, as a server applies it) or a WHERE (any column)."""
    if not tail:
        return rows, list(names)
    if tail[:4].upper() == "LIKE":
        condition = f"{_quoted(names[0])} {tail}"
    else:
        condition = tail[5:].strip()
    try:
        tree = sqlglot.parse_one(f"SELECT * FROM t WHERE {condition}", read="mysql")
        if not isinstance(tree, exp.Select) or sum(1 for _ in tree.find_all(exp.Select)) != 1 \
                or sum(1 for _ in tree.find_all(exp.Table)) != 1:
            raise engine.QueryError(engine.ER_PARSE, "a SHOW ... LIKE or WHERE may only name the result's columns")
        sql = engine.to_sqlite(tree.transform(_backslash_escape), None)
    except SqlglotError as e:
        raise engine.QueryError(engine.ER_PARSE, f"You have an error in your SQL syntax: {str(e)[:200]}") from None
    except RecursionError:
        raise engine.QueryError(engine.ER_PARSE, "statement nested too deeply") from None
    return engine.run_on_rows(sql, list(names), rows, timeout), list(names)


def _backslash_escape(node):
    """LIKE patterns escape with a backslash in MariaDB; SQLite has no escape character unless told."""
    if isinstance(node, exp.Like) and not isinstance(node.parent, exp.Escape):
        return exp.Escape(this=node.copy(), expression=exp.Literal.string("\\"))
    return node
