"""Coordination through a secured etcd (real etcd on loopback): https with a client certificate
(--client-cert-auth) and etcd's own users with tokens that expire. A client without the
certificate or the CA, and an instance with a wrong password, get one clear reason and keep
serving; a leader outlives its tokens and an etcd restart that forgets them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pymysql
import pytest

from helpers import start_proxy, wait_until
from proxy.config.load import ConfigError, build_config
from proxy.coord.etcd import Etcd, EtcdError
from proxy.sandbox.certs import make_authority
from proxy.sandbox.etcd import EtcdCluster
from proxy.sandbox.fleet import coordination_section


def status(p) -> dict:
    r = subprocess.run([sys.executable, "-m", "proxy", "status", "--json", "--config", p.process.config_path],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["coordination"]


def serves(p) -> bool:
    with pymysql.connect(host=p.host, port=p.port, user="app", password="app", connect_timeout=5) as c, \
            c.cursor() as cur:
        cur.execute("SELECT 1")
        return cur.fetchone() == (1,)


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return make_authority(tmp_path_factory.mktemp("etcd-ca"))


def test_https_with_client_certificates(cluster, ca, tmp_path):
    etcd = EtcdCluster.create(tmp_path / "etcd", 1, base_port=25479, tls=ca, client_cert_auth=True).start()
    p = None
    try:
        (ep,) = etcd.endpoints
        assert ep.startswith("https://")
        good = Etcd([ep], ca=ca["ca"], cert=ca["client_cert"], key=ca["client_key"])
        good.put("/probe", "x")
        assert good.get("/probe")[0][0].value == b"x"
        # etcd asks for a certificate this client does not have
        with pytest.raises(EtcdError) as e:
            Etcd([ep], ca=ca["ca"]).get("/probe")
        assert ep in str(e.value)
        # the system's CAs do not know the sandbox's
        with pytest.raises(EtcdError) as e:
            Etcd([ep], cert=ca["client_cert"], key=ca["client_key"]).get("/probe")
        assert "CERTIFICATE_VERIFY_FAILED" in str(e.value) or "certificate verify failed" in str(e.value)

        name = "s" + uuid.uuid4().hex[:8]
        section = {**coordination_section([ep], "p1", name=name, lease_ttl=3),
                   "etcd_ca": ca["ca"], "etcd_cert": ca["client_cert"], "etcd_key": ca["client_key"]}
        p = start_proxy(cluster, tmp_path / "p1", proxy={"workers": 1}, cluster=section)
        assert wait_until(lambda: status(p)["leader"] == "p1" and status(p)["etcd_ok"], 20)
        kvs, _ = good.get(f"/rwproxy/{name}/leader")
        assert kvs and kvs[0].value.decode().startswith("p1")
        assert serves(p)
    finally:
        if p is not None:
            p.process.stop()
        etcd.stop()


def test_tls_settings_that_cannot_work_are_config_errors(ca, tmp_path):
    base = {"backends": [{"name": "n1", "host": "127.0.0.1", "port": 3306}],
            "users": [{"name": "app", "password": "app"}]}

    def check(cluster: dict) -> str:
        with pytest.raises(ConfigError) as e:
            build_config({**base, "cluster": {"coordination": "etcd", **cluster}}, source="t.toml",
                         base_dir=str(tmp_path))
        return str(e.value)

    msg = check({"etcd_endpoints": ["http://127.0.0.1:2379"], "etcd_ca": ca["ca"]})
    assert "cluster.etcd_ca" in msg and "https" in msg
    msg = check({"etcd_endpoints": ["https://127.0.0.1:2379"], "etcd_cert": ca["client_cert"]})
    assert "etcd_cert and etcd_key go together" in msg
    msg = check({"etcd_endpoints": ["https://127.0.0.1:2379"], "etcd_ca": "missing-ca.pem"})
    assert "cluster.etcd_ca" in msg and "missing-ca.pem: no such file" in msg and "\n" not in msg.strip()
    msg = check({"etcd_endpoints": ["https://127.0.0.1:2379"], "etcd_cert": ca["ca"], "etcd_key": ca["ca"]})
    assert "cluster.etcd_cert" in msg and "cannot use the TLS files" in msg
    msg = check({"etcd_endpoints": ["http://127.0.0.1:2379"], "etcd_user": "rwproxy"})
    assert "etcd_user and etcd_password go together" in msg


def etcdctl(etcd, *args, user: str = "") -> str:
    cmd = ["etcdctl", f"--endpoints={etcd.endpoints[0]}", *([f"--user={user}"] if user else []), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=20, env={**os.environ, "ETCDCTL_API": "3"})
    assert r.returncode == 0, f"{cmd}: {r.stdout}{r.stderr}"
    return r.stdout


def test_etcd_users_and_tokens_that_expire(cluster, tmp_path):
    # tokens live 2 s here (300 s by default): the leader renews its lease every lease_ttl / 3 = 1 s
    etcd = EtcdCluster.create(tmp_path / "etcd", 1, base_port=25489, extra_args=["--auth-token-ttl", "2"]).start()
    name = "u" + uuid.uuid4().hex[:8]
    good = bad = None
    try:
        etcdctl(etcd, "user", "add", "root:rootpw", "--interactive=false")
        etcdctl(etcd, "role", "add", "rwproxy")
        etcdctl(etcd, "role", "grant-permission", "rwproxy", "--prefix=true", "readwrite", f"/rwproxy/{name}/")
        etcdctl(etcd, "user", "add", "rwp:s3cret pw", "--interactive=false")
        etcdctl(etcd, "user", "grant-role", "rwp", "rwproxy")
        etcdctl(etcd, "auth", "enable")
        pw = tmp_path / "etcd-password"
        pw.write_text("s3cret pw\n")
        pw.chmod(0o600)
        section = {**coordination_section(etcd.endpoints, "p1", name=name, lease_ttl=3),
                   "etcd_user": "rwp", "etcd_password_file": str(pw)}
        good = start_proxy(cluster, tmp_path / "p1", proxy={"workers": 1}, cluster=section)
        assert wait_until(lambda: status(good)["leader"] == "p1", 20)
        leader_key = f"/rwproxy/{name}/leader"
        before = etcdctl(etcd, "get", leader_key, "-w", "json", user="root:rootpw")
        rev = json.loads(before)["kvs"][0]["create_revision"]
        time.sleep(5)  # two token lifetimes and more: every renewal after the first needs a new login
        st = status(good)
        assert st["leader"] == "p1" and st["leading"] and st["etcd_ok"], st
        after = json.loads(etcdctl(etcd, "get", leader_key, "-w", "json", user="root:rootpw"))
        assert after["kvs"][0]["create_revision"] == rev  # the same leadership all along
        assert serves(good)
        # a restarted etcd has forgotten every token: the next request logs in again by itself
        logins = open(good.process.log_path, errors="replace").read().count("etcd: logged in at")
        assert logins >= 1
        etcd.stop_member(etcd.members[0])
        etcd.restart_member(etcd.members[0])
        etcd.wait_healthy(30)
        assert wait_until(lambda: status(good)["etcd_ok"] and status(good)["leader"] == "p1", 20)
        assert wait_until(lambda: open(good.process.log_path, errors="replace").read().count("etcd: logged in at")
                          > logins, 10)

        # a wrong password: one clear reason in status and the log, the instance keeps serving
        pw2 = tmp_path / "wrong-password"
        pw2.write_text("not it\n")
        bad = start_proxy(cluster, tmp_path / "p2", proxy={"workers": 1},
                          cluster={**section, "instance": "p2", "etcd_password_file": str(pw2)})
        assert wait_until(lambda: "authentication failed" in (status(bad)["etcd_error"] or ""), 20)
        st = status(bad)
        assert not st["etcd_ok"] and not st["leading"] and "login as 'rwp' failed" in st["etcd_error"]
        assert serves(bad)
        log = open(bad.process.log_path, errors="replace").read()
        assert "authentication failed" in log and "not it" not in log
        assert status(good)["leader"] == "p1"
    finally:
        for p in (good, bad):
            if p is not None:
                p.process.stop()
        etcd.stop()
