"""Load and validate the rwproxy TOML configuration.

The schema lives in ``proxy.config_schema`` as frozen dataclasses whose field
metadata describes each key; this module walks those specs generically, so
every mistake in a file is reported in one go, each line naming the file, the
key path and what is wrong (``rwproxy.toml: backends[2].port: expected an
integer 1-65535, got "abc"``).  Cross-key rules (TLS pairs, duplicates, rule
shape) run afterwards on the typed values.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
import tempfile
import tomllib

from proxy.config.exposure import exposed
from proxy.config.schema import (  # noqa: F401 - re-exported public API
    AdminConfig, is_native_hash, secret_keys, AUTH_PLUGINS, MASTER_MASTER, PRIMARY_REPLICA, RYW_MODES, BackendConfig, ClusterConfig, Config, FailoverConfig,
    MonitorConfig, PoolConfig, ProxyConfig, RoutingConfig, RuleConfig, TLSConfig, UserConfig,
    COORD_ETCD, format_hostport, parse_listen, show, spec_fields, url_error,
)

__all__ = [
    "ConfigError", "load_config", "parse_config", "build_config", "write_config", "check_config_main",
    "Config", "ProxyConfig", "TLSConfig", "BackendConfig", "UserConfig", "RoutingConfig", "RuleConfig",
    "MonitorConfig", "ClusterConfig", "FailoverConfig", "PoolConfig",
]


class ConfigError(Exception):
    """All problems found in one configuration; str() is one problem per line."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


_BAD = object()  # a value that failed validation


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _section_index(cls=Config, header: str = "", index: dict | None = None) -> dict[str, list[str]]:
    """key -> the section headers it belongs to, for "belongs in [routing]" hints."""
    index = {} if index is None else index
    for f in spec_fields(cls):
        kind, sub = f.metadata["kind"], _join(header, f.name)
        if kind in ("table", "tables"):
            _section_index(f.metadata["cls"], sub, index)
        elif header:
            index.setdefault(f.name, []).append(header)
    return index


def _headers() -> dict[str, str]:
    """section path -> how it is written in TOML ([x] or [[x]])."""
    out, todo = {}, [(Config, "")]
    while todo:
        cls, prefix = todo.pop()
        for f in spec_fields(cls):
            if f.metadata["kind"] in ("table", "tables"):
                path = prefix + f.name
                out[path] = f"[{path}]" if f.metadata["kind"] == "table" else f"[[{path}]]"
                todo.append((f.metadata["cls"], path + "."))
    return out


_KEY_SECTIONS = _section_index()
_HEADERS = _headers()


def _suggest(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {show(close[0])}?" if close else ""


def _unknown_key(key: str, known: list[str], section: str) -> str:
    elsewhere = [s for s in _KEY_SECTIONS.get(key, []) if s != section]
    if elsewhere:
        return "unknown key; it belongs in " + " or ".join(_HEADERS[s] for s in elsewhere)
    return "unknown key" + _suggest(key, known)


# Bounds on every integer and duration: a value past them (TOML integers have no limit) used to
# pass the check and then stop `serve` with an OverflowError where it reached C (a deque's length)
# or fail a thread (PyMySQL takes timeouts up to a year). 2**31 - 1 of anything and 365 days (a
# server's own most for wait_timeout) are past any sensible setting.
MAX_INT = 2**31 - 1
MAX_SECONDS = 31_536_000


def _expected(meta, value=None) -> str:
    kind, lo, hi = meta["kind"], meta.get("lo"), meta.get("hi")
    if kind == "int":
        if lo is not None and hi is not None:
            return f"an integer {lo}-{hi}"
        return f"an integer {lo}-{MAX_INT}" if lo is not None else f"an integer up to {MAX_INT}"
    if kind == "float":
        top = MAX_SECONDS if hi is None else hi
        over = type(value) in (int, float) and value > top
        return "a number of seconds " + ("> 0" if meta["positive"] else ">= 0") + (f" and at most {top:.0f}" if over else "")
    if kind == "enum":
        return "one of " + ", ".join(show(c) for c in meta["choices"])
    return {"bool": "a boolean (true or false)", "strs": "an array of strings",
            "str": "a non-empty string" if meta.get("nonempty") else "a string"}[kind]


def _scalar_ok(v, meta) -> bool:
    kind = meta["kind"]
    if kind == "int":
        return (type(v) is int and (meta["lo"] is None or v >= meta["lo"])
                and v <= (MAX_INT if meta["hi"] is None else meta["hi"]) and v >= -MAX_INT)
    if kind == "float":
        return (type(v) in (int, float) and math.isfinite(v) and v <= (meta.get("hi") or MAX_SECONDS)
                and (v > 0 if meta["positive"] else v >= 0))
    if kind == "bool":
        return type(v) is bool
    if kind == "str":
        return isinstance(v, str) and (bool(v) or not meta.get("nonempty"))
    if kind == "enum":
        return isinstance(v, str) and v in meta["choices"]
    return isinstance(v, list) and all(isinstance(x, str) for x in v)  # strs


class _Validator:
    """One pass over a parsed TOML document; collects errors instead of stopping."""

    def __init__(self):
        self.errors: list[str] = []
        self.positions: dict[str, list[int]] = {}  # array path -> original index of each kept item
        self.bad: set[str] = set()  # paths whose value was rejected (and replaced by the default)

    def error(self, path: str, msg: str) -> None:
        self.bad.add(path)
        self.errors.append(f"{path}: {msg}")

    def cross(self, path: str, msg: str, *involved: str) -> None:
        """A cross-key error, unless it would only echo a key already reported as bad."""
        if not any(p in self.bad for p in (path, *involved)):
            self.error(path, msg)

    def where(self, array: str, i: int) -> str:
        """Path of the i-th *kept* element (entries that failed to build were dropped)."""
        return f"{array}[{self.positions.get(array, range(i + 1))[i]}]"

    def table(self, cls, raw: dict, path: str):
        """Build cls from raw; a bad optional key falls back to its default."""
        specs = {f.name: f for f in spec_fields(cls)}
        section = path.split("[")[0] if "[" in path else path
        for key in raw:
            if key not in specs:
                self.error(_join(path, key), _unknown_key(key, list(specs), section))
        kwargs, ok = {}, True
        for name, f in specs.items():
            meta, p = f.metadata, _join(path, name)
            if name not in raw:
                if meta["required"]:
                    self.error(p, "missing required key")
                    ok = False
                elif meta.get("min_items"):
                    self.error(p, f"at least one {_HEADERS[p]} entry is required")
                continue
            value = self.value(raw[name], meta, p)
            if value is not _BAD:
                kwargs[name] = value
            elif meta["required"]:
                ok = False
        return cls(**kwargs) if ok else None

    def value(self, v, meta, path: str):
        kind = meta["kind"]
        if kind == "table":
            if not isinstance(v, dict):
                self.error(path, f"expected a table ({_HEADERS[path]}), got {show(v)}")
                return _BAD
            return self.table(meta["cls"], v, path)
        if kind == "tables":
            if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
                self.error(path, f"expected an array of tables ({_HEADERS[path]}), got {show(v)}")
                return _BAD
            if len(v) < meta["min_items"]:
                self.error(path, f"at least one {_HEADERS[path]} entry is required")
            built = [self.table(meta["cls"], x, f"{path}[{i}]") for i, x in enumerate(v)]
            self.positions[path] = [i for i, x in enumerate(built) if x is not None]
            return tuple(x for x in built if x is not None)
        if not _scalar_ok(v, meta):
            self.error(path, f"expected {_expected(meta, v)}, got {show(v)}")
            return _BAD
        check = meta.get("check")
        if check and (msg := check(v)):
            self.error(path, msg)
            return _BAD
        return float(v) if kind == "float" else tuple(v) if kind == "strs" else v

    def cross_check(self, cfg: Config) -> None:
        """Rules that involve more than one key."""
        tls, err, cert = cfg.proxy.tls, self.cross, "proxy.tls.cert"
        if tls.cert and not tls.key:
            err("proxy.tls.key", "required when proxy.tls.cert is set")
        if tls.key and not tls.cert:
            err(cert, "required when proxy.tls.key is set")
        if tls.ca and not tls.cert:
            err("proxy.tls.ca", "needs proxy.tls.cert and proxy.tls.key", cert, "proxy.tls.key")
        if tls.require and not tls.cert:
            err("proxy.tls.require", "true needs proxy.tls.cert and proxy.tls.key", cert, "proxy.tls.key")
        for i, user in enumerate(cfg.users):
            if user.require_tls and not tls.cert:
                err(self.where("users", i) + ".require_tls", "true needs proxy.tls.cert and proxy.tls.key",
                    cert, "proxy.tls.key")
        btls = cfg.backend_tls
        if btls.cert and not btls.key:
            err("backend_tls.key", "required when backend_tls.cert is set")
        if btls.key and not btls.cert:
            err("backend_tls.cert", "required when backend_tls.key is set")
        self.duplicates(cfg)
        primary = None
        for i, b in enumerate(cfg.backends):
            at = self.where("backends", i)
            if b.role == "master" and cfg.cluster.topology != MASTER_MASTER:
                err(at + ".role", '"master" needs cluster.topology = "master-master"', "cluster.topology")
            if b.role == "primary" and cfg.cluster.topology == PRIMARY_REPLICA:
                if primary is not None:
                    err(at + ".role", f'only one backend may be "primary" ({primary} already is)',
                        "cluster.topology")
                primary = primary or at
        for i, rule in enumerate(cfg.routing.rules):
            at = self.where("routing.rules", i)
            if bool(rule.match) == bool(rule.digest):
                err(at, 'give exactly one of "match" or "digest" (got ' + ("both)" if rule.match else "neither)"),
                    at + ".match", at + ".digest")
            if rule.route != "reject":
                for key in ("error_code", "error_message"):
                    if getattr(rule, key) != getattr(RuleConfig, key):
                        err(f"{at}.{key}", 'only used with route = "reject"')
            for j, name in enumerate(rule.users):
                if cfg.user(name) is None and not any(p.startswith("users[") for p in self.bad):
                    err(f"{at}.users[{j}]", f"unknown user {show(name)}" + _suggest(name, [u.name for u in cfg.users]))
        if (cfg.monitor.password or cfg.monitor.password_env or cfg.monitor.password_file) and not cfg.monitor.user:
            err("monitor.password", "set but monitor.user is empty (the first [[users]] entry would be used)",
                "monitor.user")
        self.passwords(cfg)
        self.operator(cfg)
        self.coordination(cfg)

    def coordination(self, cfg: Config) -> None:
        """[cluster] coordination: endpoints given, and a lease a leader can renew in time."""
        c = cfg.cluster
        for i, url in enumerate(c.etcd_endpoints):
            msg = url_error(url)
            if msg:
                self.error(f"cluster.etcd_endpoints[{i}]", msg)
        if c.coordination == COORD_ETCD and not c.etcd_endpoints:
            self.cross("cluster.etcd_endpoints", 'required with coordination = "etcd" (e.g. '
                       '["http://10.0.0.1:2379", "http://10.0.0.2:2379", "http://10.0.0.3:2379"])', "cluster.coordination")
        if bool(c.etcd_cert) != bool(c.etcd_key):
            self.cross("cluster.etcd_cert" if c.etcd_key else "cluster.etcd_key",
                       "etcd_cert and etcd_key go together (a client certificate and its key)",
                       "cluster.etcd_key" if c.etcd_key else "cluster.etcd_cert")
        tls_files = [k for k in ("etcd_ca", "etcd_cert", "etcd_key") if getattr(c, k)]
        plain = [u for u in c.etcd_endpoints if not u.lower().startswith("https://")]
        if tls_files and plain:
            self.cross(f"cluster.{tls_files[0]}", f"is for https endpoints, but {plain[0]} is http: "
                       "give every etcd endpoint as https://", "cluster.etcd_endpoints")
        has_password = bool(c.etcd_password or c.etcd_password_env or c.etcd_password_file)
        if bool(c.etcd_user) != has_password:
            self.cross("cluster.etcd_password" if c.etcd_user else "cluster.etcd_user",
                       "etcd_user and etcd_password go together (etcd_password may come from "
                       "etcd_password_env or etcd_password_file)", "cluster.etcd_user" if c.etcd_user else "cluster.etcd_password")
        if c.coordination == COORD_ETCD and c.etcd_timeout > c.lease_ttl / 3:
            self.cross("cluster.etcd_timeout", f"{c.etcd_timeout:g} s is more than lease_ttl / 3 "
                       f"({c.lease_ttl / 3:g} s): the leader renews every lease_ttl / 3 and must be able to retry "
                       "before its lease runs out", "cluster.lease_ttl")

    def passwords(self, cfg: Config) -> None:
        """Hashed passwords only where rwproxy can still log in with them."""
        for i, u in enumerate(cfg.users):
            if not is_native_hash(u.password):
                continue
            at = self.where("users", i)
            plugin = u.auth_plugin or cfg.proxy.auth_plugin
            if plugin != "mysql_native_password":
                self.cross(at + ".password", f'a hashed password ("*" + 40 hex digits) works with mysql_native_password '
                           f'only; this user authenticates with {plugin} (set auth_plugin = "mysql_native_password" '
                           f'or give the clear password, e.g. through password_env)', at + ".auth_plugin")
            if i == 0 and not cfg.monitor.user:
                self.cross("monitor.user", f"needed: {at} has a hashed password, which the monitor cannot log "
                           "in with (give [monitor] user and password)", at + ".password")

    def operator(self, cfg: Config) -> None:
        """The admin port and the metrics endpoint."""
        admin = cfg.admin
        if not admin.users and admin.listen != AdminConfig.listen:
            self.cross("admin.users", "the admin port needs at least one [[admin.users]] entry with a password "
                       "(rwproxy has no default admin password)", "admin.listen")
        names = {}
        for i, u in enumerate(admin.users):
            at = self.where("admin.users", i)
            if not (u.password or u.password_env or u.password_file):
                self.cross(at + ".password", "required: the admin port has no default password and takes no "
                           "empty one (password, password_env or password_file)")
            if u.name in names:
                self.error(at + ".name", f"duplicate admin user {show(u.name)} (same as {names[u.name]})")
            names.setdefault(u.name, at)
        taken = {format_hostport(cfg.proxy.host, cfg.proxy.port): "proxy.listen"}
        if admin.users:
            addr = format_hostport(admin.host, admin.port)
            if addr in taken and admin.port:
                self.cross("admin.listen", f"same address as {taken[addr]}", taken[addr])
            taken.setdefault(addr, "admin.listen")
        m = cfg.metrics
        if m.listen:
            addr = format_hostport(m.host, m.port)
            if addr in taken and m.port:
                self.cross("metrics.listen", f"same address as {taken[addr]}", taken[addr])

    def duplicates(self, cfg: Config) -> None:
        addresses, names, users = {}, {}, {}
        mine = {format_hostport(h, cfg.proxy.port) for h in (cfg.proxy.host.lower(), *(
            ("127.0.0.1", "localhost", "::1") if cfg.proxy.host in ("0.0.0.0", "::", "127.0.0.1") else ()))}
        for i, b in enumerate(cfg.backends):
            at = self.where("backends", i)
            addr = format_hostport(b.host.lower(), b.port)
            if addr in mine and not b.socket:
                self.cross(at, f"{addr} is rwproxy's own proxy.listen: it would connect to itself", "proxy.listen")
            elif addr in addresses:
                self.error(at, f"duplicate backend {addr} (same host:port as {addresses[addr]})")
            elif b.name in names:
                self.error(at + ".name", f"duplicate backend name {show(b.name)} (same as {names[b.name]})")
            addresses.setdefault(addr, at)
            names.setdefault(b.name, at)
        for i, u in enumerate(cfg.users):
            at = self.where("users", i)
            if u.name in users:
                self.error(at + ".name", f"duplicate user {show(u.name)} (same as {users[u.name]})")
            users.setdefault(u.name, at)


def _anchored(section, keys: tuple[str, ...], base_dir: str):
    paths = {k: os.path.normpath(os.path.join(base_dir, getattr(section, k)))
             for k in keys if getattr(section, k) and not os.path.isabs(getattr(section, k))}
    return dataclasses.replace(section, **paths) if paths else section


def _resolve_tls(cfg: Config, base_dir: str) -> Config:
    """Relative TLS (and backup key) file paths are relative to the config file, not the cwd."""
    tls = _anchored(cfg.proxy.tls, ("cert", "key", "ca", "rsa_private_key"), base_dir)
    btls = _anchored(cfg.backend_tls, ("ca", "cert", "key"), base_dir)
    backup = _anchored(cfg.backup, ("key_file",), base_dir)
    cluster = _anchored(cfg.cluster, ("etcd_ca", "etcd_cert", "etcd_key"), base_dir)
    if tls is cfg.proxy.tls and btls is cfg.backend_tls and backup is cfg.backup and cluster is cfg.cluster:
        return cfg
    return dataclasses.replace(cfg, proxy=dataclasses.replace(cfg.proxy, tls=tls), backend_tls=btls, backup=backup,
                               cluster=cluster)


def _read_secret(path: str, base_dir: str | None) -> str:
    if base_dir is not None and not os.path.isabs(path):
        path = os.path.normpath(os.path.join(base_dir, path))
    with open(path, "rb") as f:
        data = f.read(65537)
    if len(data) > 65536:
        raise ValueError(f"{path} is larger than 64 KiB; expected one line holding the password")
    text = data.decode("utf-8")
    return text.splitlines()[0] if text else ""


def _resolve_secrets(obj, path: str, errors: list[str], base_dir: str | None):
    """Fill each password from its `_env` variable or `_file` (exactly one source per password);
    returns the section with the values in place (recursively)."""
    changes = {}
    for key in secret_keys(type(obj)):
        env, file = getattr(obj, key + "_env"), getattr(obj, key + "_file")
        given = [k for k, v in ((key, getattr(obj, key)), (key + "_env", env), (key + "_file", file)) if v]
        at = _join(path, key)
        if len(given) > 1:
            errors.append(f"{at}: give only one of {', '.join(given)}")
            continue
        if env:
            value = os.environ.get(env)
            if value is None:
                errors.append(f"{at}_env: environment variable {env} is not set")
                continue
            changes[key] = value
        elif file:
            try:
                changes[key] = _read_secret(file, base_dir)
            except OSError as e:
                errors.append(f"{at}_file: cannot read {file}: {e.strerror or e}")
            except (ValueError, UnicodeDecodeError) as e:
                errors.append(f"{at}_file: {file}: {e}")
    for f in spec_fields(type(obj)):
        kind, value = f.metadata["kind"], getattr(obj, f.name)
        if kind == "table":
            new = _resolve_secrets(value, _join(path, f.name), errors, base_dir)
            if new is not value:
                changes[f.name] = new
        elif kind == "tables":
            items = tuple(_resolve_secrets(x, f"{_join(path, f.name)}[{i}]", errors, base_dir) for i, x in enumerate(value))
            if any(a is not b for a, b in zip(items, value)):
                changes[f.name] = items
    return dataclasses.replace(obj, **changes) if changes else obj


def build_config(data: dict, source: str = "<dict>", base_dir: str | None = None) -> Config:
    """Validate an already-parsed TOML document (a dict) into a Config."""
    v = _Validator()
    cfg = v.table(Config, data, "")
    v.cross_check(cfg)
    if v.errors:
        raise ConfigError([f"{source}: {e}" for e in v.errors])
    errors: list[str] = []
    cfg = _resolve_secrets(cfg, "", errors, base_dir)
    if not errors:  # the same checks again on passwords that came from a variable or a file
        after = _Validator()
        after.passwords(cfg)
        errors = after.errors
        errors += [f"admin.users[{i}].password: {'$' + u.password_env if u.password_env else u.password_file} "
                   "is empty; the admin port takes no empty password"
                   for i, u in enumerate(cfg.admin.users) if not u.password]
    if errors:
        raise ConfigError([f"{source}: {e}" for e in errors])
    if base_dir is not None:
        cfg = _resolve_tls(cfg, base_dir)
    c = cfg.cluster
    if c.coordination == COORD_ETCD and (c.etcd_ca or c.etcd_cert):
        from proxy.coord.etcd import EtcdError, tls_context
        try:  # (after the paths are anchored: a relative file is next to the config)
            tls_context(c.etcd_ca, c.etcd_cert, c.etcd_key)
        except EtcdError as e:
            raise ConfigError([f"{source}: cluster.{'etcd_ca' if c.etcd_ca else 'etcd_cert'}: {e}"]) from None
    return dataclasses.replace(cfg, source=source)


def parse_config(text: str, source: str = "<string>", base_dir: str | None = None) -> Config:
    """Parse TOML text; source names it in errors, base_dir anchors relative TLS paths."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: TOML syntax error: {exc}"]) from None
    return build_config(data, source, base_dir)


def load_config(path: str) -> Config:
    """Read and validate the file at path (errors name it exactly as given)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: cannot read: not valid UTF-8 (byte {exc.start})"]) from None
    return parse_config(text, path, os.path.dirname(os.path.abspath(path)))


def write_config(config: Config, path: str) -> None:
    """Write config as TOML (owner-only, it holds passwords), atomically.

    The text is re-validated first so a bad programmatic Config fails here
    with a ConfigError rather than when the proxy starts.
    """
    text = config.to_toml()
    parse_config(text, path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".rwproxy-", suffix=".toml", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def check_config_main(path: str) -> int:
    """`rwproxy check-config FILE`: 0 and a summary on stdout, or 1 and the errors on stderr."""
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 1
    print(f"OK: {path}: {len(cfg.backends)} backends, {len(cfg.users)} users, "
          f"listening on {format_hostport(cfg.proxy.host, cfg.proxy.port)}"
          + (f" and {cfg.proxy.socket}" if cfg.proxy.socket else ""))
    if (warning := exposed(path)):
        print(f"warning: {warning}", file=sys.stderr)
    return 0
