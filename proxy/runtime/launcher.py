"""Start `rwproxy serve` as a child process and wait until it accepts clients.

Used by the demo, the tests and the benchmarks, so that all of them exercise
the same command a user runs. The process is stopped by its pid.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time


class ProxyProcess:
    def __init__(self, config_path: str, host: str, port: int, log_path: str | None = None, log_level: str = "INFO",
                 source: str | None = None, env: dict | None = None):
        self.env = env or {}  # extra environment (e.g. a password_env variable)
        self.config_path = str(config_path)
        self.host = host
        self.port = port
        self.log_path = log_path or self.config_path + ".log"
        self.log_level = log_level
        self.source = source or _repo_root()  # the checkout whose `proxy` package runs (benchmark A/Bs)
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def command(self) -> list[str]:
        """The command line start() runs (benchmarks start other proxies the same way). -P: the
        current directory is not put first on the path, so `source` (PYTHONPATH) decides which
        checkout's `proxy` runs even when started from inside another checkout."""
        return [sys.executable, "-P", "-m", "proxy", "serve", "--config", self.config_path, "--log-level", self.log_level]

    def start(self, timeout: float = 20.0) -> "ProxyProcess":
        log = open(self.log_path, "ab")
        cmd = self.command()
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [self.source, env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rwproxy exited with status {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    pass
            except OSError:
                time.sleep(0.1)
                continue
            if self._control_ready():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"rwproxy did not listen on {self.host}:{self.port} within {timeout}s:\n{self.log_tail()}")

    def _control_ready(self) -> bool:
        """The control socket (for `rwproxy status`) is up too, not just the listening port."""
        try:
            from proxy.config.load import load_config
            from proxy.runtime.rundir import control_socket

            path = control_socket(load_config(self.config_path))
        except Exception:
            return True  # not a config we can read: the port is all we can wait for
        try:  # a stale socket file from a killed proxy refuses connections
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(0.5)
                s.connect(path)
            return True
        except OSError:
            return False

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return b"\n".join(f.read().splitlines()[-lines:]).decode("utf-8", "replace")
        except OSError:
            return ""

    def child_pids(self) -> list[int]:
        """The supervisor and its worker processes (for CPU accounting)."""
        return process_and_children(self.proc.pid) if self.proc else []

    def cpu_seconds(self) -> float:
        """User+system CPU of the proxy's processes so far (from /proc)."""
        return sum(process_cpu_seconds(pid) for pid in self.child_pids())

    def rss_kib(self) -> int:
        total = 0
        for pid in self.child_pids():
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1])
            except OSError:
                pass
        return total

    stop_signal = signal.SIGINT  # rwproxy: stop now (SIGTERM drains)

    def stop(self, timeout: float = 10.0, drain: bool = False) -> None:
        """SIGINT (stop now), or SIGTERM with drain=True (graceful: sessions end after their
        transactions); SIGKILL to every process of the proxy if it is still there after `timeout`.
        Its worker processes are looked up first, so none outlives a supervisor that exited."""
        if not self.proc or self.proc.poll() is not None:
            return
        children = {pid: _cmdline(pid) for pid in self.child_pids() if pid != self.proc.pid}
        self.proc.send_signal(signal.SIGTERM if drain else self.stop_signal)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            for pid in self.child_pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait(5)
        deadline = time.monotonic() + 5.0
        for pid, cmd in children.items():  # (the same process, not a reused pid)
            while _cmdline(pid) == cmd and cmd and time.monotonic() < deadline:
                time.sleep(0.05)
            if _cmdline(pid) == cmd and cmd:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def process_and_children(pid: int) -> list[int]:
    """`pid` and its child processes (an rwproxy supervisor and its workers), from /proc."""
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return pids


def process_cpu_seconds(pid: int) -> float:
    """User+system CPU one process has used so far (from /proc/PID/stat); 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _repo_root() -> str:
    """The folder holding the `proxy` package this module was loaded from."""
    import proxy

    return os.path.dirname(os.path.dirname(os.path.abspath(proxy.__file__)))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
