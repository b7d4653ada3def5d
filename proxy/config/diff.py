"""What a reload changes: the keys that differ between two configurations, which of them need a
restart, and the configuration that runs meanwhile (the new one, with the restart-only keys
kept as they are running)."""

from __future__ import annotations

import dataclasses

from proxy.config.schema import Config, spec_fields

# Keys a running proxy cannot change: sockets already bound, processes already forked, TLS
# contexts already loaded, the cluster mode everything was built for.
RESTART_ONLY = ("proxy.listen", "proxy.socket", "proxy.workers", "proxy.cpu_affinity", "proxy.scheduling", "proxy.runtime_dir", "proxy.tls.",
                "proxy.auth_plugin", "proxy.server_version", "admin.listen", "metrics.listen", "cluster.topology",
                "cluster.coordination", "cluster.etcd_endpoints", "cluster.name", "cluster.instance",
                "cluster.lease_ttl", "cluster.etcd_timeout", "cluster.etcd_ca", "cluster.etcd_cert", "cluster.etcd_key",
                "cluster.etcd_user", "cluster.etcd_password", "cluster.etcd_password_env", "cluster.etcd_password_file",
                "backend_tls.", "pool.multiplex")


def flatten(cfg: Config) -> dict[str, object]:
    """section.key -> value; arrays of named tables by name (backends[node2].weight), others by index."""
    out: dict[str, object] = {}

    def walk(obj, prefix: str) -> None:
        for f in spec_fields(type(obj)):
            value, path, kind = getattr(obj, f.name), prefix + f.name, f.metadata["kind"]
            if kind == "table":
                walk(value, path + ".")
            elif kind == "tables":
                for i, item in enumerate(value):
                    key = getattr(item, "name", None) or str(i)
                    walk(item, f"{path}[{key}].")
            else:
                out[path] = value

    walk(cfg, "")
    return out


def readdressed(old, new) -> bool:
    """A backend (same name) that a reload gives another address: its connections and its
    checker start again from scratch."""
    return (old.host, old.port, old.socket) != (new.host, new.port, new.socket)


def changes(old: Config, new: Config) -> list[str]:
    a, b = flatten(old), flatten(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k, _MISSING) != b.get(k, _MISSING))


def summary(old: Config, new: Config) -> list[str]:
    """changes() for people: a named entry a reload adds or removes is one line ("added:
    users[ptest]") instead of one per field; any other key is "changed: <key>"."""
    a, b = flatten(old), flatten(new)
    out: list[str] = []
    for k in changes(old, new):
        if "]." in k and (k not in a or k not in b):  # a field of an entry only one side has
            line = ("added: " if k not in a else "removed: ") + k.split("].", 1)[0] + "]"
            if line not in out:
                out.append(line)
        else:
            out.append("changed: " + k)
    return out


def restart_only(key: str) -> bool:
    return any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESTART_ONLY)


def effective(old: Config, new: Config) -> Config:
    """`new`, with every restart-only key as `old` runs it."""
    rep = dataclasses.replace
    proxy = rep(new.proxy, listen=old.proxy.listen, workers=old.proxy.workers, cpu_affinity=old.proxy.cpu_affinity,
                scheduling=old.proxy.scheduling,
                runtime_dir=old.proxy.runtime_dir, tls=old.proxy.tls, auth_plugin=old.proxy.auth_plugin,
                server_version=old.proxy.server_version)
    return rep(new, proxy=proxy, admin=rep(new.admin, listen=old.admin.listen),
               metrics=rep(new.metrics, listen=old.metrics.listen),
               cluster=rep(new.cluster, topology=old.cluster.topology), backend_tls=old.backend_tls,
               pool=rep(new.pool, multiplex=old.pool.multiplex))


class _Missing:
    def __repr__(self) -> str:
        return "<absent>"


_MISSING = _Missing()
