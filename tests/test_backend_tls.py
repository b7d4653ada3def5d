"""TLS from rwproxy to its backends ([backend_tls]) against a sandbox whose servers accept TLS.

The accounts are created REQUIRE SSL on the servers, so a plaintext connection from any part of
rwproxy (pools, monitor) is refused by MariaDB itself: what works below works because it is
encrypted, and Ssl_version/Ssl_cipher as seen by the backend session say so.
"""

from __future__ import annotations

import subprocess
import sys

import MySQLdb
import pymysql
import pytest

from helpers import start_proxy
from proxy.backend.tls import policies
from proxy.sandbox.certs import make_authority
from proxy.config.load import parse_config


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    from proxy.testing.clusters import start_cluster, teardown_cluster

    c = start_cluster(tmp_path_factory.mktemp("tls-sandbox"), replicas=1, tls=True)
    try:
        with c.primary.connect() as conn, conn.cursor() as cur:
            cur.execute("CREATE USER 'tlsapp'@'%' IDENTIFIED BY 'tlsapp' REQUIRE SSL")
            cur.execute("GRANT ALL ON app.* TO 'tlsapp'@'%'")
            cur.execute("ALTER USER 'rwproxy'@'%' REQUIRE SSL")  # the monitor must use TLS too
            cur.execute("CREATE USER 'plainmon'@'%' IDENTIFIED BY 'plainmon'")  # a monitor without TLS
            cur.execute("GRANT ALL ON *.* TO 'plainmon'@'%'")
            cur.execute("CREATE TABLE app.tls_rows (id INT PRIMARY KEY, b LONGBLOB)")
            cur.execute("INSERT INTO app.tls_rows SELECT seq, REPEAT(CHAR(seq % 256), 100) FROM app.seq_1_to_2000")
        c.wait_replicas_caught_up(30)
        yield c
    finally:
        teardown_cluster(c)


def _users():
    return [{"name": "tlsapp", "password": "tlsapp"}, {"name": "app", "password": "app"}]


def _ssl_status(conn) -> dict:
    with conn.cursor() as cur:
        cur.execute("SELECT @@port, VARIABLE_VALUE FROM information_schema.SESSION_STATUS "
                    "WHERE VARIABLE_NAME = 'SSL_VERSION'")
        port, version = cur.fetchone()
    return {"port": port, "version": version}


def test_verify_identity_serves_require_ssl_accounts_on_every_server(tls_cluster, tmp_path):
    ca = str(tls_cluster.tls_dir / "ca.pem")
    p = start_proxy(tls_cluster, tmp_path / "p", users=_users(), backend_tls={"mode": "verify_identity", "ca": ca})
    try:
        replica_port = tls_cluster.nodes[1].port
        with p.connect("tlsapp", "tlsapp", autocommit=True) as c:
            read = _ssl_status(c)  # an autocommit read: the replica (in the read pool: the monitor got in)
            assert read["port"] == replica_port and read["version"].startswith("TLSv1."), read
            with c.cursor() as cur:
                cur.execute("BEGIN")
            inside = _ssl_status(c)  # inside a transaction: the primary
            assert inside["port"] == tls_cluster.primary.port and inside["version"].startswith("TLSv1."), inside
            with c.cursor() as cur:
                cur.execute("INSERT INTO app.tls_rows VALUES (5000, %s)", (bytes(range(256)) * 20480,))  # 5 MiB
                cur.execute("SELECT b FROM app.tls_rows WHERE id = 5000")
                assert cur.fetchone()[0] == bytes(range(256)) * 20480
                cur.execute("ROLLBACK")
                cur.execute("SELECT id, b FROM app.tls_rows ORDER BY id")
                rows = cur.fetchall()
        with pymysql.connect(host="127.0.0.1", port=tls_cluster.primary.port, user="tlsapp", password="tlsapp",
                             ssl={"ca": ca}) as d, d.cursor() as cur:
            cur.execute("SELECT id, b FROM app.tls_rows ORDER BY id")
            assert rows == cur.fetchall() and len(rows) == 2000
        # a libmariadb client through the same path (binary protocol via server-side prepare)
        m = MySQLdb.connect(host="127.0.0.1", port=p.port, user="tlsapp", passwd="tlsapp", db="app")
        try:
            cur = m.cursor()
            cur.execute("SELECT COUNT(*), SUM(LENGTH(b)) FROM tls_rows")
            assert cur.fetchone() == (2000, 200000)
        finally:
            m.close()
    finally:
        p.process.stop()


def test_disabled_backend_tls_is_refused_by_require_ssl_account(tls_cluster, tmp_path):
    p = start_proxy(tls_cluster, tmp_path / "p", users=_users(), monitor={"user": "plainmon", "password": "plainmon"})
    try:
        with pytest.raises(pymysql.err.OperationalError) as e:
            p.connect("tlsapp", "tlsapp")
        code, msg = e.value.args
        assert code == 1045 and "Access denied for user 'tlsapp'" in msg  # MariaDB's own refusal, relayed
    finally:
        p.process.stop()


def test_wrong_ca_is_a_clear_error_for_clients_and_in_the_log(tls_cluster, tmp_path):
    other = make_authority(tmp_path / "other-ca")["ca"]
    p = start_proxy(tls_cluster, tmp_path / "p", users=_users(), backend_tls={"mode": "verify_ca", "ca": other})
    try:
        cli = subprocess.run(["mariadb", "--no-defaults", "-h127.0.0.1", f"-P{p.port}", "-utlsapp", "-ptlsapp",
                              "-e", "SELECT 1"], capture_output=True, text=True, timeout=30)
        assert cli.returncode == 1
        assert "ERROR 9001 (HY000)" in cli.stderr and "certificate verify failed" in cli.stderr, cli.stderr
        log = open(p.process.log_path).read()
        assert "CERTIFICATE_VERIFY_FAILED" in log  # the operator's line names the cause
        assert "Traceback" not in log
    finally:
        p.process.stop()


def test_unreadable_ca_stops_serve_with_one_line(tmp_path):
    cfg = tmp_path / "rw.toml"
    cfg.write_text('[proxy]\nlisten = "127.0.0.1:0"\n'  # not the default 6033, which may be taken
                   '[[backends]]\nhost = "127.0.0.1"\nport = 1\n[[users]]\nname = "app"\n'
                   '[backend_tls]\nmode = "verify_ca"\nca = "missing/ca.pem"\n')
    r = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert f"backend_tls.ca: cannot load CA file {tmp_path / 'missing' / 'ca.pem'}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_per_backend_mode_overrides_the_section(tmp_path):
    ca = make_authority(tmp_path / "ca")["ca"]
    cfg = parse_config(
        '[[backends]]\nname = "a"\nhost = "db1.example"\nport = 3306\n'
        '[[backends]]\nname = "b"\nhost = "10.0.0.2"\nport = 3306\ntls = "verify_identity"\n'
        '[[backends]]\nname = "c"\nhost = "10.0.0.3"\nport = 3306\ntls = "disabled"\n'
        f'[[users]]\nname = "app"\n[backend_tls]\nmode = "required"\nca = "{ca}"\n')
    got = policies(cfg)
    assert (got["a"].mode, got["a"].required, got["a"].hostname) == ("required", True, None)
    assert got["a"].context.verify_mode == 0  # CERT_NONE: required does not check the certificate
    assert (got["b"].mode, got["b"].hostname, got["b"].context.check_hostname) == ("verify_identity", "10.0.0.2", True)
    assert (got["c"].mode, got["c"].context, got["c"].pymysql_args()) == ("disabled", None, {"ssl_disabled": True})
