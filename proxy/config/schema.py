"""The rwproxy configuration schema: one frozen dataclass per TOML section.

Every TOML key is a dataclass field whose metadata carries its spec (kind,
bounds, choices, extra checker).  The validator in ``proxy.config`` and the
TOML emitter at the bottom of this module are generic walks over these
classes, so adding a key is a one-line change here and nothing else.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from functools import cached_property

from proxy.config.fields import (  # noqa: F401 - some re-exported: the rest of rwproxy imports them from here
    PW_ENV, PW_FILE, A, B, E, F, I, L, S, T, absolute_path_error, account_name_error, cron_error, endpoint_error,
    env_name_error, format_hostport,
    identifier_error, instance_error, is_native_hash, listen_error, listen_socket_error, optional_listen_error, parse_listen, regex_error,
    recipients_error, repository_error, secret_keys, set_hostport, show, socket_error, toml_str, url_error,
)

AUTH_PLUGINS = ("mysql_native_password", "caching_sha2_password")
RYW_NONE, RYW_SESSION, RYW_GTID = RYW_MODES = ("none", "session", "gtid")
BALANCE_LEAST_OUTSTANDING, BALANCE_ROUND_ROBIN, BALANCE_LOWEST_LAG = BALANCE_POLICIES = (
    "least-outstanding", "round-robin", "lowest-lag")
ROUTE_PRIMARY, ROUTE_REPLICA, ROUTE_REJECT = RULE_ROUTES = ("primary", "replica", "reject")
ROUTE_AUTO = "auto"  # [[users]] default_route: split as the statement says
PRIMARY_REPLICA, MASTER_MASTER = TOPOLOGIES = ("primary-replica", "master-master")
COORD_NONE, COORD_ETCD = COORDINATIONS = ("none", "etcd")
SPREAD_SESSION, SPREAD_TRANSACTION = WRITE_SPREADS = ("session", "transaction")
# TLS from rwproxy to a backend, named and meant as the mysql/mariadb clients' --ssl-mode
BACKEND_TLS_MODES = ("disabled", "preferred", "required", "verify_ca", "verify_identity")

# -- sections -----------------------------------------------------------------

@dataclass(frozen=True)
class TLSConfig:
    cert: str = S()
    key: str = S()
    ca: str = S()  # the cert's issuer(s): sent with it as its chain, as a server's ssl_ca is
    require: bool = B(False)
    rsa_private_key: str = S()

    @property
    def enabled(self) -> bool:
        return bool(self.cert)


@dataclass(frozen=True)
class ProxyConfig:
    listen: str = S("127.0.0.1:6033", check=listen_error)
    socket: str = S(check=listen_socket_error)  # a Unix socket clients may connect to as well ("" = none)
    workers: int = I(0, 0, 254)  # session ids carry the worker index in their top byte
    cpu_affinity: str = E("none", "none", "spread")
    scheduling: str = E("normal", "normal", "batch")  # workers' Linux policy: SCHED_OTHER or SCHED_BATCH
    server_version: str = S()
    max_connections: int = I(10000, 1)
    max_allowed_packet: int = I(64 << 20, 1024, 1 << 30)  # bytes; a bigger client packet gets 1153
    client_idle_timeout: float = F(28800.0)
    auth_plugin: str = E("mysql_native_password", *AUTH_PLUGINS)
    runtime_dir: str = S(check=lambda v: None if not v or v.startswith("/") else
                         f"must be an absolute path (or \"\" for the default), got {show(v)}")
    # s `rwproxy drain` / SIGTERM lets sessions finish their transactions before closing them
    shutdown_timeout: float = F(30.0)
    # s a draining proxy keeps accepting after /health/ready turned 503 (only with [metrics] listen:
    # a load balancer needs a few checks to notice; without a health endpoint nobody is watching)
    drain_grace: float = F(2.0)
    tls: TLSConfig = T(TLSConfig)
    host: str = field(init=False, default="")   # derived from listen
    port: int = field(init=False, default=0)    # derived from listen

    def __post_init__(self):
        set_hostport(self)


@dataclass(frozen=True)
class BackendConfig:
    name: str = S()   # "" -> "host:port" (filled in by __post_init__)
    host: str = S("127.0.0.1", nonempty=True, required=True)
    port: int = I(3306, 1, 65535, required=True)
    weight: int = I(1, 0, 1000)
    role: str = E("auto", "auto", "primary", "replica", "master")
    priority: int = I(0)
    no_promotion: bool = B(False)
    max_connections: int = I(0, 0)
    socket: str = S(check=socket_error)  # Unix socket of a server on this host ("" = TCP to host:port)
    tls: str = E("", "", *BACKEND_TLS_MODES)  # "" = backend_tls.mode

    def __post_init__(self):
        if not self.name:
            object.__setattr__(self, "name", self.address)

    @property
    def where(self) -> str:
        """How rwproxy reaches it, for messages: the socket path or host:port."""
        return self.socket or self.address

    def pymysql_args(self) -> dict:
        """Connection arguments for the control plane's PyMySQL connections."""
        return {"unix_socket": self.socket} if self.socket else {"host": self.host, "port": self.port}

    @property
    def address(self) -> str:
        return format_hostport(self.host, self.port)


@dataclass(frozen=True)
class BackendTLSConfig:
    """TLS on rwproxy's own connections to the backends: the workers' pools and the monitor's."""
    mode: str = E("disabled", *BACKEND_TLS_MODES)
    ca: str = S()    # PEM CA bundle checked by verify_ca / verify_identity ("" = the system's CAs)
    cert: str = S()  # client certificate, for accounts created REQUIRE X509 ("" = none)
    key: str = S()


@dataclass(frozen=True)
class UserConfig:
    name: str = S("app", nonempty=True, required=True, check=account_name_error)
    password: str = S(repr=False)  # clear text, or the mysql_native_password hash "*<40 hex digits>"
    password_env: str = PW_ENV()
    password_file: str = PW_FILE()
    auth_plugin: str = E("", "", *AUTH_PLUGINS, "client_ed25519")  # ed25519: per user only (an auth switch)
    default_route: str = E(ROUTE_AUTO, ROUTE_AUTO, ROUTE_PRIMARY, ROUTE_REPLICA)
    read_your_writes: str = E("", "", *RYW_MODES)
    max_connections: int = I(0, 0)
    require_tls: bool = B(False)


@dataclass(frozen=True)
class RuleConfig:
    match: str = S(check=regex_error)
    digest: str = S()
    route: str = E(ROUTE_PRIMARY, *RULE_ROUTES, required=True)
    error_code: int = I(1105, 1, 65535)
    error_message: str = S("statement rejected by rwproxy rule")
    users: tuple[str, ...] = L()

    @cached_property
    def regex(self) -> re.Pattern | None:
        """Compiled `match` (case-insensitive), or None for a digest rule."""
        return re.compile(self.match, re.IGNORECASE) if self.match else None

    def applies_to(self, user: str) -> bool:
        return not self.users or user in self.users


@dataclass(frozen=True)
class RoutingConfig:
    read_write_split: bool = B(True)
    primary_serves_reads: bool = B(False)
    reads_on_primary_when_no_replica: bool = B(True)
    max_replica_lag: float = F(1.0, positive=True)
    balance: str = E(BALANCE_LEAST_OUTSTANDING, *BALANCE_POLICIES)
    read_your_writes: str = E(RYW_SESSION, *RYW_MODES)
    read_your_writes_window: float = F(1.0)
    gtid_wait_timeout: float = F(0.5)
    readonly_functions: tuple[str, ...] = L()
    digest_cache_size: int = I(10000, 16)
    max_session_history: int = I(1000, 1)
    max_prepared_per_connection: int = I(1024, 1)
    max_prepared_per_session: int = I(16382, 1)  # statements a client may hold prepared at once (rwproxy's memory)
    replica_error_backoff: float = F(5.0)  # s a replica that refused a user's connection gets no new reads of that user
    rules: tuple[RuleConfig, ...] = A(RuleConfig)


@dataclass(frozen=True)
class MonitorConfig:
    user: str = S()
    password: str = S(repr=False)
    password_env: str = PW_ENV()
    password_file: str = PW_FILE()
    interval: float = F(0.1, positive=True)
    connect_timeout: float = F(0.5, positive=True)
    read_timeout: float = F(0.5, positive=True)
    replication_interval: float = F(0.5)
    heartbeat: bool = B(True)
    heartbeat_interval: float = F(0.25, positive=True)
    heartbeat_schema: str = S("rwproxy", check=identifier_error)
    failcount: int = I(3, 1)
    readmit_after: int = I(5, 1)
    # a calm server is checked on events (its heartbeats, its writer's heartbeats, a closed
    # connection) instead of every interval (cluster/monitor/cadence.py); false = every interval
    steady_checks: bool = B(True)


@dataclass(frozen=True)
class ClusterConfig:
    topology: str = E(PRIMARY_REPLICA, *TOPOLOGIES)
    write_spread: str = E(SPREAD_SESSION, *WRITE_SPREADS)
    # several rwproxy instances, one cluster (proxy/coord, docs/coordination.md): "none" = this
    # instance decides alone; "etcd" = the instances elect a leader, which alone acts on servers
    coordination: str = E(COORD_NONE, *COORDINATIONS)
    etcd_endpoints: tuple = L()
    name: str = S("default", check=identifier_error)  # the cluster's name: etcd keys /rwproxy/<name>/
    instance: str = S(check=instance_error)  # this instance's name, unique in the cluster ("" = host:port)
    lease_ttl: int = I(10, 2, 3600)  # s: a silent leader is replaced after at most this
    etcd_timeout: float = F(1.0, positive=True)  # s per etcd request; at most lease_ttl / 3
    # https endpoints: the CA bundle that signed etcd's certificate ("" = the system's CAs), and a
    # client certificate for an etcd started with --client-cert-auth
    etcd_ca: str = S()
    etcd_cert: str = S()
    etcd_key: str = S()
    # an etcd with authentication enabled: the user rwproxy logs in as (a token, renewed when it expires)
    etcd_user: str = S()
    etcd_password: str = S(repr=False)
    etcd_password_env: str = PW_ENV()
    etcd_password_file: str = PW_FILE()


@dataclass(frozen=True)
class FailoverConfig:
    auto_failover: bool = B(True)
    failcount: int = I(5, 1)
    verify_with_replicas: bool = B(True)
    # s an unanswering primary and all its replicas' receiving ends must have been silent (no
    # answer; no event, no heartbeat) for it to count as hung without waiting for failcount (0 = off)
    replica_silence: float = F(0.6)
    # s: MASTER_HEARTBEAT_PERIOD rwproxy gives the replicas (0 = leave theirs), so an idle primary
    # still tells them it lives, and a silent one can be told from a quiet one
    replica_heartbeat_period: float = F(0.2, hi=4294967)  # (MariaDB's largest MASTER_HEARTBEAT_PERIOD)
    failover_cooldown: float = F(60.0)
    write_hold_timeout: float = F(10.0)
    auto_rejoin: bool = B(True)
    # make a read-only primary writable again (a restart with read_only=1 in its my.cnf), as
    # MaxScale's enforce_writable_master; off: it stays read-only and writes get 1290
    enforce_writable_primary: bool = B(False)
    pre_failover_hook: str = S()
    post_failover_hook: str = S()
    hook_timeout: float = F(10.0, positive=True)
    switchover_timeout: float = F(10.0, positive=True)
    catchup_timeout: float = F(10.0, positive=True)
    replication_user: str = S()
    replication_password: str = S(repr=False)
    replication_password_env: str = PW_ENV()
    replication_password_file: str = PW_FILE()


@dataclass(frozen=True)
class PoolConfig:
    connect_timeout: float = F(2.0, positive=True)
    idle_timeout: float = F(300.0)
    max_idle_per_backend: int = I(64, 0)
    reset_on_release: bool = B(True)
    multiplex: bool = B(True)
    shared_connections: int = I(2, 1, 64)
    multiplex_max_bytes: int = I(65536, 0)
    multiplex_max_time: float = F(0.01, positive=True)
    # bytes: the servers send results to rwproxy in chunks of this size (backend.grow_net_buffer);
    # 0 = the server's own net_buffer_length (16 KiB by default)
    backend_net_buffer: int = I(128 << 10, 0, 16 << 20)
    # ms a session's connection may sit unused before it goes back to the pool, when nothing ties
    # the session to it (0 = never; the session keeps its connections for life)
    idle_release: int = I(1000, 0)
    # connections each server gets from this rwproxy instance (all workers together; 0 = no limit);
    # a backend's own max_connections overrides it
    max_server_connections: int = I(64, 0)
    queue_timeout: float = F(10.0, positive=True)  # s a statement waits for a connection at that limit


@dataclass(frozen=True)
class AuthConfig:
    """Who may log in besides [[users]]."""
    # accounts that exist only on the primary (mysql_native_password), looked up by the monitor user
    server_accounts: bool = B(False)
    server_accounts_ttl: float = F(60.0, positive=True)  # s a looked-up account is trusted


@dataclass(frozen=True)
class StatsConfig:
    """Per-statement statistics in every worker (digests, latency histograms, per-server counters)."""
    enabled: bool = B(True)
    max_digests: int = I(10000, 100)  # per worker; the least recently seen 10% go when it is full
    max_digest_length: int = I(1024, 64, 1 << 20)  # characters of digest text kept
    events: int = I(200, 10)  # topology, failover and reload events kept for the admin `events` table


ADMIN_ROLES = ("admin", "stats")


@dataclass(frozen=True)
class AdminUserConfig:
    name: str = S(nonempty=True, required=True, check=account_name_error)
    password: str = S(repr=False)  # clear text or "*<40 hex>" (mysql_native_password hash)
    password_env: str = PW_ENV()
    password_file: str = PW_FILE()
    role: str = E("admin", *ADMIN_ROLES)  # stats: read the tables only


@dataclass(frozen=True)
class AdminConfig:
    """The admin SQL port (mysql-mimic): on when at least one [[admin.users]] entry exists."""
    listen: str = S("127.0.0.1:6032", check=listen_error)
    max_connections: int = I(32, 1, 10000)
    query_timeout: float = F(10.0, positive=True)  # s an admin query may run before it is stopped
    max_rows: int = I(100000, 1, 10_000_000)  # rows an admin query may return
    users: tuple[AdminUserConfig, ...] = A(AdminUserConfig)
    host: str = field(init=False, default="")
    port: int = field(init=False, default=0)

    def __post_init__(self):
        set_hostport(self)

    @property
    def enabled(self) -> bool:
        return bool(self.users)


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus /metrics and the /health/live, /health/ready checks, over HTTP."""
    listen: str = S(check=optional_listen_error)  # "" = off; e.g. "127.0.0.1:9033"
    ready_without_primary: bool = B(False)  # read-only mode: ready while no primary is known
    host: str = field(init=False, default="")
    port: int = field(init=False, default=0)

    def __post_init__(self):
        if self.listen:
            set_hostport(self)



@dataclass(frozen=True)
class BackupConfig:
    """`rwproxy backup ...`: base backups, the binlog archive and point-in-time recovery (docs/backups.md)."""
    repository: str = S(check=repository_error)  # "" = no backups
    s3_endpoint: str = S(check=endpoint_error)   # "" = AWS; e.g. "http://127.0.0.1:9000" for MinIO
    s3_region: str = S()
    s3_access_key: str = S()  # "" = boto3's usual places (AWS_ACCESS_KEY_ID, ~/.aws, an instance role)
    s3_secret_key: str = S(repr=False)
    s3_secret_key_env: str = PW_ENV()
    s3_secret_key_file: str = PW_FILE()
    recipients: tuple[str, ...] = L(check=recipients_error)  # age public keys backups are encrypted to
    key_file: str = S()  # an age identity file: decrypts (restore, verify), and encrypts to its own recipient
    compress_level: int = I(1, 1, 19)  # zstd; 1 measured 159 MiB/s here, 3 about 50
    method: str = E("physical", "physical", "logical")
    from_primary: bool = B(False)  # allow backing up the primary when no replica is healthy
    user: str = S()  # "" = the monitor's login
    password: str = S(repr=False)
    password_env: str = PW_ENV()
    password_file: str = PW_FILE()
    command_prefix: str = S()  # run mariadb-backup where the data is, e.g. "ssh db2" ("" = this host)
    checksum_tables: bool = B(True)  # record CHECKSUM TABLE per table at the consistent point
    catchup_timeout: float = F(600.0, positive=True)  # s a paused replica may take to catch up before it rejoins anyway
    archive_binlogs: bool = B(False)  # `rwproxy serve` also runs the binlog archiver
    archive_interval: float = F(10.0, positive=True)  # s between uploads of the growing binlog's tail
    archive_server_id: int = I(0, 0, 4294967295)  # the binlog reader's server_id (0 = derived from the repository)
    spool_dir: str = S(check=absolute_path_error)  # "" = under the runtime directory
    schedule_full: str = S(check=cron_error)  # cron: "0 1 * * 0" = Sundays 01:00 (UTC)
    schedule_incremental: str = S(check=cron_error)
    schedule_test_restore: str = S(check=cron_error)
    keep_daily: int = I(7, 0)
    keep_weekly: int = I(4, 0)
    keep_monthly: int = I(6, 0)
    keep_min_full: int = I(2, 1)

    @property
    def enabled(self) -> bool:
        return bool(self.repository)


@dataclass(frozen=True)
class Config:
    proxy: ProxyConfig = T(ProxyConfig)
    backends: tuple[BackendConfig, ...] = A(BackendConfig, min_items=1)
    backend_tls: BackendTLSConfig = T(BackendTLSConfig)
    users: tuple[UserConfig, ...] = A(UserConfig, min_items=1)
    auth: AuthConfig = T(AuthConfig)
    routing: RoutingConfig = T(RoutingConfig)
    monitor: MonitorConfig = T(MonitorConfig)
    cluster: ClusterConfig = T(ClusterConfig)
    failover: FailoverConfig = T(FailoverConfig)
    pool: PoolConfig = T(PoolConfig)
    stats: StatsConfig = T(StatsConfig)
    admin: AdminConfig = T(AdminConfig)
    metrics: MetricsConfig = T(MetricsConfig)
    backup: BackupConfig = T(BackupConfig)
    source: str = field(default="<string>", compare=False)  # where it was read from; not a key
    _users: dict = field(init=False, default=None, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_users", {u.name: u for u in self.users})

    def user(self, name: str) -> UserConfig | None:
        return self._users.get(name)

    def monitor_credentials(self) -> tuple[str, str]:
        """The monitor's login; an empty monitor.user borrows the first [[users]] entry."""
        if self.monitor.user:
            return self.monitor.user, self.monitor.password
        if self.users:
            return self.users[0].name, self.users[0].password
        return "", ""

    def to_toml(self) -> str:
        """TOML text that parse_config() turns back into an equal Config."""
        from proxy.config.emit import emit  # the emitter reads these classes; import late

        out = ["# rwproxy configuration (generated by Config.to_toml)"]
        emit(self, "", None, out)
        return "\n".join(out) + "\n"


def spec_fields(cls) -> list[dataclasses.Field]:
    """The fields of a section class that are TOML keys (derived fields excluded)."""
    return [f for f in dataclasses.fields(cls) if "kind" in f.metadata]
