"""A real etcd cluster on loopback for the sandbox, tests and benchmarks (Debian `etcd-server`).

Each member is an `etcd` child with its data, log and pid file in its own directory, on two
ports (clients, peers) picked free on 127.0.0.1; members are stopped, paused and restarted by
pid only. Nothing here is used by a production proxy: users bring their own etcd.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from proxy.sandbox.util import SandboxError, port_is_free, process_alive, process_cmdline


def _free_ports(n: int, start: int) -> list[int]:
    out, p = [], start
    while len(out) < n and p < 65000:
        if port_is_free(p):
            out.append(p)
        p += 1
    if len(out) < n:
        raise SandboxError("no free ports for etcd on 127.0.0.1")
    return out


def etcd_binary() -> str:
    found = shutil.which("etcd") or (os.path.exists("/usr/bin/etcd") and "/usr/bin/etcd")
    if not found:
        raise SandboxError("etcd not found: install the Debian package etcd-server (apt-get install etcd-server)")
    return found


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    dir: Path
    proc: subprocess.Popen | None = None
    scheme: str = "http"  # https: clients over TLS (peers stay on plain loopback)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def pid(self) -> int | None:
        try:
            return int((self.dir / "etcd.pid").read_text())
        except (OSError, ValueError):
            return None

    def running(self) -> bool:
        """Its recorded pid runs etcd on this member's directory: not a zombie (a killed member
        whose parent has not reaped it yet) and not another process that got the pid since."""
        pid = self.pid()
        if pid is None:
            return False
        if self.proc is not None and self.proc.pid == pid:
            return self.proc.poll() is None
        return process_alive(pid) and str(self.dir / "data") in (process_cmdline(pid) or [])


@dataclass
class EtcdCluster:
    """N members; `endpoints` is what goes into [cluster] etcd_endpoints. With `tls` (the paths
    certs.make_authority returns) clients speak https, and with `client_cert_auth` etcd asks them
    for a certificate signed by the same CA; extra_args go to every member (e.g. --auth-token-ttl)."""

    dir: Path
    members: list[Member] = field(default_factory=list)
    token: str = ""
    tls: dict = field(default_factory=dict)
    client_cert_auth: bool = False
    extra_args: list = field(default_factory=list)

    @property
    def endpoints(self) -> list[str]:
        return [m.url for m in self.members]

    @classmethod
    def create(cls, dirpath: str | Path, n: int = 3, base_port: int = 23790, *, tls: dict | None = None,
               client_cert_auth: bool = False, extra_args: list | None = None) -> "EtcdCluster":
        d = Path(dirpath)
        d.mkdir(parents=True, exist_ok=True)
        ports = _free_ports(2 * n, base_port)
        scheme = "https" if tls else "http"
        members = [Member(f"etcd{i + 1}", ports[2 * i], ports[2 * i + 1], d / f"etcd{i + 1}", scheme=scheme)
                   for i in range(n)]
        c = cls(d, members, token=f"rwproxy-{os.getpid()}-{int(time.time())}", tls=dict(tls or {}),
                client_cert_auth=client_cert_auth, extra_args=list(extra_args or []))
        (d / "etcd.json").write_text(json.dumps({"token": c.token, "tls": c.tls, "client_cert_auth": client_cert_auth,
                                                 "extra_args": c.extra_args, "members": [
            {"name": m.name, "client_port": m.client_port, "peer_port": m.peer_port} for m in members]}))
        return c

    @classmethod
    def load(cls, dirpath: str | Path) -> "EtcdCluster":
        d = Path(dirpath)
        spec = json.loads((d / "etcd.json").read_text())
        scheme = "https" if spec.get("tls") else "http"
        return cls(d, [Member(m["name"], m["client_port"], m["peer_port"], d / m["name"], scheme=scheme)
                       for m in spec["members"]], token=spec["token"], tls=spec.get("tls", {}),
                   client_cert_auth=spec.get("client_cert_auth", False), extra_args=spec.get("extra_args", []))

    def _argv(self, m: Member) -> list[str]:
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        return [etcd_binary(), "--name", m.name, "--data-dir", str(m.dir / "data"),
                "--listen-client-urls", m.url, "--advertise-client-urls", m.url,
                "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
                "--initial-cluster", initial, "--initial-cluster-token", self.token,
                "--initial-cluster-state", "new",
                # loopback: short heartbeats so a lost member is noticed in well under a second
                "--heartbeat-interval", "50", "--election-timeout", "500",
                "--log-outputs", str(m.dir / "etcd.log"), "--logger", "zap",
                *self._tls_args(), *self.extra_args]

    def _tls_args(self) -> list[str]:
        if not self.tls:
            return []
        args = ["--cert-file", self.tls["server_cert"], "--key-file", self.tls["server_key"],
                "--trusted-ca-file", self.tls["ca"]]
        return args + (["--client-cert-auth"] if self.client_cert_auth else [])

    def client_context(self) -> ssl.SSLContext | None:
        """What a client of this cluster needs for https (the CA, and the client certificate)."""
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=self.tls["ca"])
        if self.client_cert_auth:
            ctx.load_cert_chain(self.tls["client_cert"], self.tls["client_key"])
        return ctx

    def start_member(self, m: Member) -> None:
        if m.running():
            return
        m.dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "ETCD_UNSUPPORTED_ARCH": os.environ.get("ETCD_UNSUPPORTED_ARCH", "")}
        with open(m.dir / "stderr.log", "ab") as err:
            m.proc = subprocess.Popen(self._argv(m), stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env,
                                      start_new_session=True)
        (m.dir / "etcd.pid").write_text(str(m.proc.pid))

    def start(self, timeout: float = 60) -> "EtcdCluster":
        for m in self.members:
            self.start_member(m)
        self.wait_healthy(timeout)
        return self

    def healthy(self, m: Member) -> bool:
        try:
            with urllib.request.urlopen(f"{m.url}/health", timeout=1, context=self.client_context()) as r:
                return json.loads(r.read()).get("health") in (True, "true")
        except (OSError, ValueError):
            return False

    def wait_healthy(self, timeout: float = 60, members: list[Member] | None = None) -> None:
        deadline = time.monotonic() + timeout
        for m in members or self.members:
            while not self.healthy(m):
                if not m.running():
                    raise SandboxError(f"etcd member {m.name} exited; see {m.dir / 'etcd.log'}")
                if time.monotonic() > deadline:
                    raise SandboxError(f"etcd member {m.name} not healthy after {timeout:.0f} s; "
                                       f"see {m.dir / 'etcd.log'}")
                time.sleep(0.1)

    def signal(self, m: Member, sig: int) -> None:
        pid = m.pid()
        if pid is not None:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def stop_member(self, m: Member, timeout: float = 10) -> None:
        pid = m.pid()
        if pid is None:
            return
        if not m.running():  # gone long ago: its pid may be another process's by now
            (m.dir / "etcd.pid").unlink(missing_ok=True)
            return
        self.signal(m, signal.SIGCONT)
        self.signal(m, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while m.running() and time.monotonic() < deadline:
            if m.proc is not None:
                m.proc.poll()
            time.sleep(0.05)
        if m.running():
            self.signal(m, signal.SIGKILL)
            if m.proc is not None:
                m.proc.wait(5)
        (m.dir / "etcd.pid").unlink(missing_ok=True)

    def restart_member(self, m: Member) -> None:
        """Start a stopped member again on its data (it rejoins the cluster it was in)."""
        if m.running():
            return
        argv = self._argv(m)
        argv[argv.index("new")] = "existing"
        m.dir.mkdir(parents=True, exist_ok=True)
        with open(m.dir / "stderr.log", "ab") as err:
            m.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True)
        (m.dir / "etcd.pid").write_text(str(m.proc.pid))

    def stop(self) -> None:
        for m in self.members:
            self.stop_member(m)
