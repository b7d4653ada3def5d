"""Whether a config file that holds passwords is readable by other local users.

A warning, not a refusal (a group-readable file for a service group is a choice some make), as
the one line `rwproxy check-config` and `rwproxy serve` give; write_config itself writes 0600.
"""

from __future__ import annotations

import os
import stat
import tomllib

SECRET_KEYS = ("password", "s3_secret_key", "etcd_password", "replication_password")


def _holds_secret(node) -> bool:
    if isinstance(node, dict):
        return any((k in SECRET_KEYS and isinstance(v, str) and v) or _holds_secret(v) for k, v in node.items())
    if isinstance(node, list):
        return any(_holds_secret(x) for x in node)
    return False


def exposed(path: str) -> str | None:
    """One line when `path` holds a password inline and others may read it, else None."""
    try:
        mode = os.stat(path).st_mode
        if not mode & (stat.S_IRGRP | stat.S_IROTH):
            return None
        with open(path, "rb") as f:
            if not _holds_secret(tomllib.load(f)):
                return None
    except (OSError, ValueError):
        return None
    who = "every local user" if mode & stat.S_IROTH else "its group"
    return (f"{path} holds passwords and {who} may read it (mode {stat.S_IMODE(mode):04o}): chmod 600 it, "
            f"or move the passwords to *_env / *_file keys")
