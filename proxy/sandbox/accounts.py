"""The sandbox's server accounts: created on the first master and replicated everywhere.

The accounts that can do more than the application (`rwproxy` bypasses read_only and can
change replication; `repl` reads every binlog) get a password of their own in each sandbox,
kept in DIR/sandbox.json and written into DIR/rwproxy.toml (both mode 0600), so no sandbox has
a password anyone knows in advance: the servers listen on 127.0.0.1, which every local user can
reach. `app` keeps `app`: the README's one-line login, for an account that can only touch the
`app` database. A sandbox made before this keeps the passwords its servers already have.
"""

from __future__ import annotations

import secrets

# name -> grants, and why the account exists (docs/sandbox.md has the table)
ACCOUNTS: dict[str, dict[str, str]] = {
    "app": {"grants": "ALL PRIVILEGES ON app.*",
            "why": "the application: no global privilege, so read_only stops it on replicas (error 1290)"},
    "rwproxy": {"grants": "ALL PRIVILEGES ON *.*",
                "why": "the proxy's monitor/failover user (reads status, flips read_only, repoints replicas)"},
    "repl": {"grants": "REPLICATION SLAVE ON *.*", "why": "replication threads"},
    "root": {"grants": "ALL (localhost, unix socket only)", "why": "admin via the socket"},
}
FIXED = {"app": "app", "root": ""}  # root: over the unix socket only, as Debian's own root


def new_accounts() -> dict[str, dict[str, str]]:
    """The accounts of a new sandbox, each with its password (a random one unless FIXED)."""
    return {name: {"password": FIXED[name] if name in FIXED else secrets.token_urlsafe(12), **info}
            for name, info in ACCOUNTS.items()}


def saved_accounts(saved: dict | None) -> dict[str, dict[str, str]]:
    """The accounts of an existing sandbox from its state file (passwords as its servers have
    them); one made before the state kept them had the old fixed ones."""
    out = {}
    for name, info in ACCOUNTS.items():
        password = ((saved or {}).get(name) or {}).get("password")
        out[name] = {"password": password if password is not None else FIXED.get(name, name), **info}
    return out


def passwords(accounts: dict[str, dict[str, str]]) -> dict[str, str]:
    """name -> password, as the nodes log in."""
    return {name: info["password"] for name, info in accounts.items()}
