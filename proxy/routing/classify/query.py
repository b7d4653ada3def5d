"""sqlglot side of the classifier: parse a query-shaped statement and walk its AST.

A statement is a READ only if sqlglot (mysql dialect, errors raised, never IGNORE) parses it
as a single pure query AND the token scan (rules.py) finds nothing suspicious: two
independent detectors, so a construct one of them drops does not send a write to a replica.
"""

from __future__ import annotations

from sqlglot import exp
from sqlglot.dialects.dialect import Dialect
from sqlglot.errors import ErrorLevel

from proxy.routing.classify.funcs import READONLY_FUNCS

_DIALECT = Dialect.get_or_raise("mysql")


def _types(*names: str) -> tuple[type, ...]:
    return tuple(getattr(exp, n) for n in names if isinstance(getattr(exp, n, None), type))


# Nodes that make a statement a write wherever they sit (CTEs, subqueries, set operations).
_WRITE_NODES = _types(
    "Insert", "Update", "Delete", "Merge", "Create", "Drop", "Alter", "Command", "TruncateTable",
    "Lock", "Into", "PropertyEQ", "NextValueFor", "LoadData", "Transaction", "Commit", "Rollback",
    "Use", "Set", "SetItem", "Copy", "Grant", "Revoke", "Analyze", "Kill",
)
_QUERY_ROOTS = _types("Select", "SetOperation", "Subquery")


class QueryParser:
    """Reuses one tokenizer and parser (saves sqlglot's ~10 µs per-call setup)."""

    def __init__(self) -> None:
        self._tokenizer = _DIALECT.tokenizer()
        self._parser = _DIALECT.parser(error_level=ErrorLevel.RAISE)

    def parse(self, sql: str) -> list:
        return self._parser.parse(self._tokenizer.tokenize(sql), sql)


def check_tree(tree, readonly: frozenset[str]) -> tuple[bool, set[str]]:
    """(is a write, names of CTEs/derived-table aliases).

    The alias names let the token scan ignore `cte (a, b) AS` and `AS d (a, b)`, which look
    like function calls to a tokenizer.
    """
    if not isinstance(tree, _QUERY_ROOTS):
        return True, set()
    aliases: set[str] = set()
    write = False
    for node in tree.walk():
        if isinstance(node, _WRITE_NODES):
            write = True
        elif isinstance(node, exp.Anonymous):
            if not _anonymous_ok(node, readonly):
                write = True
        elif isinstance(node, (exp.TableAlias, exp.CTE)):
            name = node.alias if isinstance(node, exp.CTE) else node.name
            if name:
                aliases.add(name.upper())
        elif isinstance(node, exp.Select) and node.args.get("into") is not None:
            write = True
    return write, aliases


def _anonymous_ok(node, readonly: frozenset[str]) -> bool:
    this = node.this
    quoted = isinstance(this, exp.Identifier) and this.quoted
    name = (this.name if isinstance(this, exp.Identifier) else str(this)).upper()
    parent = node.parent
    if isinstance(parent, exp.Dot) and parent.expression is node:
        qual = parent.this.name.upper() if isinstance(parent.this, exp.Expression) else ""
        return f"{qual}.{name}" in readonly or name in readonly
    if quoted:
        return name in readonly
    return name in READONLY_FUNCS or name in readonly
