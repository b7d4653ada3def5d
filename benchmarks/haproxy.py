"""HAProxy as a peer in the benchmarks: plain TCP to the primary, as teams put it in front of
MariaDB today (Debian package `haproxy`). Started, measured and stopped like rwproxy (by pid)."""

from __future__ import annotations

import shutil
from pathlib import Path

from proxy.runtime.launcher import ProxyProcess


class HAProxyProcess(ProxyProcess):
    """HAProxy with `threads` threads (the same CPU budget as rwproxy's workers), TCP mode."""

    def __init__(self, port: int, backend_port: int, threads: int, log_path: str, directory: str):
        super().__init__("", "127.0.0.1", port, log_path=log_path)
        self.backend_port, self.threads = backend_port, max(1, threads)
        self.cfg = Path(directory) / f"haproxy-{port}.cfg"
        self.cfg.write_text(
            "global\n"
            f"    nbthread {self.threads}\n"
            "    maxconn 4000\n"
            "defaults\n"
            "    mode tcp\n"
            "    timeout connect 5s\n"
            "    timeout client 1h\n"
            "    timeout server 1h\n"
            "listen mysql\n"
            f"    bind 127.0.0.1:{port}\n"
            f"    server primary 127.0.0.1:{backend_port}\n")

    def command(self) -> list[str]:
        exe = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
        if exe is None:
            raise RuntimeError("haproxy is not installed (Debian package haproxy; ./dev.sh setup installs it)")
        return [exe, "-db", "-f", str(self.cfg)]

    def _control_ready(self) -> bool:
        return True  # no control socket: listening is all there is
