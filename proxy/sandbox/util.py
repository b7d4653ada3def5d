"""Small helpers shared by the sandbox modules: errors, binaries, ports, GTIDs."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import socket
import stat
from pathlib import Path

# Debian puts mariadbd in /usr/sbin, which is not on a normal user's PATH.
_EXTRA_DIRS = ("/usr/sbin", "/usr/local/sbin", "/usr/local/mysql/bin")

# Linux limits sun_path to 108 bytes including the trailing NUL.
MAX_SOCKET_PATH = 107


class SandboxError(Exception):
    """A sandbox failure with a one-line, user-facing message (no traceback)."""


class PortInUse(SandboxError):
    """A node port is taken; callers (e.g. test fixtures) may retry elsewhere."""

    def __init__(self, port: int, detail: str = ""):
        self.port = port
        msg = f"port {port} on 127.0.0.1 is already in use"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg + "; choose another --base-port or stop what is using it")


def find_binary(name: str, explicit: str | None = None) -> str:
    """Locate a MariaDB binary, failing with the one line that tells how to fix it."""
    hint = f"{name} not found: install the Debian package mariadb-server (apt-get install mariadb-server)"
    if explicit:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            return os.path.abspath(explicit)
        found = shutil.which(explicit)
        if found:
            return found
        raise SandboxError(hint)
    path = os.environ.get("PATH", "")
    found = shutil.which(name, path=os.pathsep.join([path, *_EXTRA_DIRS]))
    if not found:
        raise SandboxError(hint)
    return found


def port_is_free(port: int) -> bool:
    """Whether mariadbd could bind 127.0.0.1:port (it uses SO_REUSEADDR too, so TIME_WAIT is fine)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        return True
    except OSError as e:
        if e.errno in (errno.EADDRINUSE, errno.EACCES):
            return False
        raise
    finally:
        s.close()


def check_ports_free(ports) -> None:
    """Fail before anything starts, naming the first busy port."""
    for port in ports:
        if not 0 < port < 65536:
            raise SandboxError(f"port {port} is out of range")
        if not port_is_free(port):
            raise PortInUse(port)


def find_free_base_port(count: int, start: int = 24306, end: int = 60000) -> int:
    """First port p >= start such that p..p+count-1 are all free (for tests and benchmarks)."""
    p = start
    while p + count <= end:
        for i in range(count):
            if not port_is_free(p + i):
                p = p + i + 1
                break
        else:
            return p
    raise SandboxError(f"no block of {count} free ports between {start} and {end}")


def socket_path(base_dir: Path, node_name: str) -> Path:
    """DIR/<node>/mysql.sock, or a short /tmp/rwp-<hash>/ path if that is too long for a unix socket."""
    p = base_dir / node_name / "mysql.sock"
    if len(str(p).encode()) <= MAX_SOCKET_PATH:
        return p
    digest = hashlib.sha1(str(base_dir).encode()).hexdigest()[:12]
    return Path("/tmp") / f"rwp-{digest}" / f"{node_name}.sock"


def private_dir(path: Path) -> None:
    """Make `path` (0700), or accept it only if this user owns it and no one else may write it: a
    socket directory under /tmp that another local user made first could hold their listener."""
    path.mkdir(parents=True, mode=0o700, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise SandboxError(f"{path} is not a directory owned by this user and writable by it alone; remove it")


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def tail(path: Path, lines: int = 8, start: int = 0) -> str:
    """Last lines of a log file written after byte offset start, for error messages."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(start if start <= size else 0, size - 16384))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def write_private(path, text: str) -> None:
    """A file only its owner reads (it holds passwords); one left readable by an older version is made so."""
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def process_cmdline(pid: int) -> list[str] | None:
    """Its argv from /proc, None once it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]


def process_alive(pid: int) -> bool:
    """True while pid exists and is not a zombie; reaps it if it is our child."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    if state not in (b"Z", b"X"):
        return True
    # A zombie thread-group leader can outlive its other threads briefly, and the process's
    # sockets close only when the last thread exits: gone means no thread but the leader.
    try:
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False
