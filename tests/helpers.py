"""Test helpers: a running rwproxy in front of the session's sandbox cluster."""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass

import pymysql
import pytest

from proxy.config.load import build_config, write_config
from proxy.config.schema import parse_listen
from proxy.runtime.launcher import ProxyProcess, free_port

SHA2_USER, SHA2_PASSWORD = "sha2user", "s3cret-sha2"


def self_signed_cert(dirpath: str) -> tuple[str, str]:
    """Write a throwaway certificate and key for 127.0.0.1 (TLS tests only)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rwproxy-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path = os.path.join(dirpath, "cert.pem")
    key_path = os.path.join(dirpath, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
    return cert_path, key_path


def failover_section(cluster) -> dict:
    """[failover] with the sandbox's replication account (its password is the sandbox's own)."""
    return {"replication_user": "repl", "replication_password": cluster.password("repl")}


def proxy_config_dict(cluster, port: int, /, **sections) -> dict:
    """A config for `cluster` listening on `port`; keyword arguments override whole sections."""
    data = {
        "proxy": {"listen": f"127.0.0.1:{port}", "workers": 2},
        "backends": [{"name": n.name, "host": "127.0.0.1", "port": n.port} for n in cluster.nodes],
        "users": [
            {"name": "app", "password": "app"},
            {"name": SHA2_USER, "password": SHA2_PASSWORD, "auth_plugin": "caching_sha2_password"},
        ],
        "monitor": {"user": "rwproxy", "password": cluster.password("rwproxy")},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


@dataclass
class RunningProxy:
    host: str
    port: int
    process: ProxyProcess
    cluster: object
    cert: str = ""
    key: str = ""

    def connect(self, user="app", password="app", database="app", **kw) -> pymysql.Connection:
        return pymysql.connect(host=self.host, port=self.port, user=user, password=password, database=database, **kw)


def start_proxy(sandbox, dirpath, /, **sections) -> RunningProxy:
    """rwproxy in front of `sandbox`; keyword arguments override config sections (e.g. cluster=...)."""
    dirpath.mkdir(parents=True, exist_ok=True)
    listen = sections.get("proxy", {}).get("listen")
    host, port = parse_listen(listen) if listen else ("127.0.0.1", free_port())
    cfg = build_config(proxy_config_dict(sandbox, port, **sections), source=str(dirpath / "rwproxy.toml"))
    path = str(dirpath / "rwproxy.toml")
    write_config(cfg, path)
    proc = ProxyProcess(path, host, port, log_path=str(dirpath / "rwproxy.log")).start()
    tls = sections.get("proxy", {}).get("tls", {})
    return RunningProxy(host, port, proc, sandbox, tls.get("cert", ""), tls.get("key", ""))


def worker_pids(p: RunningProxy) -> list[int]:
    """The worker processes of a running proxy (its supervisor's children)."""
    return [pid for pid in p.process.child_pids() if pid != p.process.proc.pid]


def ensure_backend_user(cluster, user: str, password: str) -> None:
    """Create a user on the primary (it replicates) for front-end auth tests."""
    with cluster.primary.connect() as conn, conn.cursor() as cur:
        cur.execute(f"CREATE USER IF NOT EXISTS '{user}'@'%' IDENTIFIED BY '{password}'")
        cur.execute(f"GRANT ALL ON app.* TO '{user}'@'%'")
    cluster.wait_replicas_caught_up(30)


@pytest.fixture(scope="session")
def proxy(cluster, tmp_path_factory) -> RunningProxy:
    """rwproxy (2 workers, optional TLS) in front of the session cluster."""
    d = tmp_path_factory.mktemp("proxy")
    cert, key = self_signed_cert(str(d))
    ensure_backend_user(cluster, SHA2_USER, SHA2_PASSWORD)
    p = start_proxy(cluster, d, proxy={"tls": {"cert": cert, "key": key}})
    try:
        yield p
    finally:
        p.process.stop()


@pytest.fixture
def direct(cluster):
    """A connection straight to the primary, as app."""
    conn = pymysql.connect(host="127.0.0.1", port=cluster.primary.port, user="app", password="app", database="app")
    try:
        yield conn
    finally:
        conn.close()


def require_c(impl, module: str):
    """`impl` from an optional C extension, or skip the test when it is not built; under
    RWPROXY_REQUIRE_C=1 (CI) a missing extension is a failure instead."""
    if impl is None:
        msg = f"C extension {module} is not built (run: python setup.py build_ext --inplace)"
        if os.environ.get("RWPROXY_REQUIRE_C") == "1":
            pytest.fail(msg + " and RWPROXY_REQUIRE_C=1")
        pytest.skip(msg)
    return impl


def wait_until(pred, timeout, step=0.1, ignore_errors=True) -> bool:
    """Poll PRED until it is true or TIMEOUT seconds pass; errors count as "not yet" (a server
    that is restarting refuses connections for a while)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return True
        except Exception:  # noqa: BLE001
            if not ignore_errors:
                raise
        time.sleep(step)
    return False


@pytest.fixture
def semisync(cluster_factory):
    """A private semi-sync cluster (primary + 2 replicas) with app.acked (w, seq), for writers whose
    every acknowledged row is checked after a failover."""
    cl = cluster_factory(replicas=2, semi_sync=True)
    with cl.primary.connect(database="app") as c, c.cursor() as cur:
        cur.execute("CREATE TABLE acked (w INT, seq INT, PRIMARY KEY (w, seq))")
    cl.wait_replicas_caught_up(30)
    return cl
