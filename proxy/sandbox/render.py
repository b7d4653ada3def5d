"""Text output of the sandbox: the status table and the ready-made rwproxy.toml."""

from __future__ import annotations

from typing import Any, Iterable


def _toml_str(value: str) -> str:
    """A TOML basic string (only what names and passwords can need)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def proxy_config_toml(nodes: Iterable[Any], topology: str, proxy_port: int,
                      app_user: tuple[str, str], monitor_user: tuple[str, str],
                      repl_user: tuple[str, str], ca: str = "",
                      admin_password: str = "", backups: str = "") -> str:
    """rwproxy.toml for this cluster; written here so the sandbox does not depend on proxy.config.

    Backends carry no role: the proxy learns roles from read_only, as it must after a failover.
    The replication account lets failover repoint replicas and rejoin an old primary.
    With a CA (a sandbox made with --tls) the proxy talks TLS to the servers and checks their certificates.
    With an admin password, the admin port listens one below the proxy port (6032 beside 6033, as
    ProxySQL's do) and the metrics endpoint 3000 above it (9033).
    With a backups directory, `rwproxy backup ...` works at once: a repository there, encrypted to
    the sandbox's own key file (backup.key beside this config).
    """
    out = ["# Written by `rwproxy sandbox up`: a proxy config for this sandbox cluster.",
           "[proxy]", f"listen = {_toml_str(f'127.0.0.1:{proxy_port}')}", ""]
    for node in nodes:
        out += ["[[backends]]", f"name = {_toml_str(node.name)}", 'host = "127.0.0.1"',
                f"port = {int(node.port)}", ""]
    if ca:
        out += ["[backend_tls]", 'mode = "verify_identity"', f"ca = {_toml_str(ca)}", ""]
    out += ["[[users]]", f"name = {_toml_str(app_user[0])}", f"password = {_toml_str(app_user[1])}", "",
            "[monitor]", f"user = {_toml_str(monitor_user[0])}", f"password = {_toml_str(monitor_user[1])}", "",
            "[cluster]", f"topology = {_toml_str(topology)}", "",
            "[failover]", f"replication_user = {_toml_str(repl_user[0])}",
            f"replication_password = {_toml_str(repl_user[1])}", ""]
    if admin_password:
        admin_port, metrics_port = admin_ports(proxy_port)
        out += ["[admin]", f"listen = {_toml_str(f'127.0.0.1:{admin_port}')}", "",
                "[[admin.users]]", 'name = "admin"', f"password = {_toml_str(admin_password)}", "",
                "[metrics]", f"listen = {_toml_str(f'127.0.0.1:{metrics_port}')}", ""]
    if backups:
        out += ["[backup]", f"repository = {_toml_str('file://' + backups)}", 'key_file = "backup.key"', ""]
    return "\n".join(out)


def admin_ports(proxy_port: int) -> tuple[int, int]:
    """(admin port, metrics port) written beside a proxy port; 0 (any free port) stays 0."""
    if not proxy_port:
        return 0, 0
    return (proxy_port - 1 if proxy_port > 1024 else proxy_port + 1), (proxy_port + 3000 if proxy_port < 62535 else 0)


COLUMNS = [("node", "NODE"), ("port", "PORT"), ("role", "ROLE"), ("state", "STATE"),
           ("read_only", "READ_ONLY"), ("replication", "REPLICATION"), ("lag", "LAG")]


def status_table(rows: list[dict[str, Any]], semi_sync: bool) -> str:
    """Fixed-width table of Cluster.status() rows; the semi-sync column only when enabled."""
    cols = COLUMNS + ([("semi_sync_text", "SEMI_SYNC")] if semi_sync else [])
    cells = [[title for _, title in cols]]
    for row in rows:
        cells.append(["-" if row.get(key) is None else str(row.get(key)) for key, _ in cols])
    widths = [max(len(r[i]) for r in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)
