"""Each rwproxy instance's own runtime directory: its lock, its control socket, its workers' KILL
sockets and a note saying who it is.

Several instances run on one host (several listen addresses, several network namespaces, the
scale-out set-ups). They must never share or remove each other's sockets, so the directory is
named for what identifies an instance: its network namespace and its listen address
(`$TMPDIR/rwproxy-<uid>/<netns>-<host>-<port>`), or set in `[proxy] runtime_dir`. The running
instance holds an exclusive lock on `rwproxy.lock` there for its whole life: a second instance
with the same directory refuses to start (naming the first), and only the lock holder creates or
removes the sockets. `instance.json` says which config and pid own it, so the CLI can check that
it reached the instance its --config names.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import stat
import tempfile

MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes; leave room for the longest name used here


class RuntimeDirError(Exception):
    """One line for the operator: why this directory cannot be this instance's."""


def _netns() -> str:
    """The network namespace's inode: two instances in different namespaces may share host:port."""
    try:
        return str(os.stat("/proc/self/ns/net").st_ino)
    except OSError:
        return "0"


def default_dir(host: str, port: int) -> str:
    safe_host = re.sub(r"[^0-9A-Za-z._-]", "_", host)
    return os.path.join(tempfile.gettempdir(), f"rwproxy-{os.getuid()}", f"{_netns()}-{safe_host}-{port}")


def path_for(config) -> str:
    """This config's runtime directory (configured, or the default for its listen address)."""
    return config.proxy.runtime_dir or default_dir(config.proxy.host, config.proxy.port)


def control_socket(config) -> str:
    return os.path.join(path_for(config), "control.sock")


def find_control_socket(config_path: str) -> str | None:
    """The control socket of the running instance started with `config_path`, found without
    validating the file (`rwproxy reload` of a file that now has an error must still reach the
    proxy, so that it refuses, logs and counts it): its raw [proxy] keys, else the default
    runtime directories' instance.json."""
    import tomllib

    mine = os.path.realpath(config_path)
    try:
        with open(config_path, "rb") as f:
            raw = tomllib.load(f).get("proxy", {})
        if isinstance(raw.get("runtime_dir"), str) and raw["runtime_dir"]:
            return os.path.join(raw["runtime_dir"], "control.sock")
    except (OSError, ValueError, AttributeError):
        pass
    root = os.path.join(tempfile.gettempdir(), f"rwproxy-{os.getuid()}")
    try:
        names = os.listdir(root)
    except OSError:
        return None
    for name in names:
        ident = read_identity(os.path.join(root, name)) or {}
        if ident.get("config") == mine:
            return os.path.join(root, name, "control.sock")
    return None


def worker_socket(directory: str, index: int) -> str:
    return os.path.join(directory, f"worker-{index}.sock")


def read_identity(directory: str) -> dict | None:
    try:
        with open(os.path.join(directory, "instance.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class RuntimeDir:
    """The directory of the running instance; claim() before serving, release() at the end."""

    def __init__(self, path: str):
        self.path = path
        self._lock_fd: int | None = None

    def claim(self, identity: dict) -> None:
        """Create (0700) and lock the directory for this process; raises RuntimeDirError."""
        if len(worker_socket(self.path, 254)) + 4 > MAX_SOCKET_PATH:  # (+4: worker-254.ctl.sock)
            raise RuntimeDirError(f"runtime directory {self.path} is too long for unix socket paths "
                                  f"(at most {MAX_SOCKET_PATH - 16} characters); set a shorter [proxy] runtime_dir")
        parent = os.path.dirname(self.path)
        for d in (parent, self.path):
            try:
                os.mkdir(d, 0o700)
            except FileExistsError:
                pass
            except OSError as e:
                raise RuntimeDirError(f"cannot create runtime directory {d}: {e.strerror}") from None
        # the parent too (by default /tmp/rwproxy-<uid>, a name anyone can take first): its owner
        # could swap our directory for theirs, control socket included
        pst = os.stat(parent)
        if pst.st_uid not in (0, os.getuid()) or (pst.st_mode & 0o022 and not pst.st_mode & stat.S_ISVTX):
            raise RuntimeDirError(f"{parent}, where the runtime directory is, belongs to another user or others may "
                                  f"write it; remove it or set [proxy] runtime_dir")
        st = os.lstat(self.path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise RuntimeDirError(f"runtime directory {self.path} is not a directory owned by this user and "
                                  f"writable by it alone; remove it or set [proxy] runtime_dir")
        fd = os.open(os.path.join(self.path, "rwproxy.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            other = read_identity(self.path) or {}
            raise RuntimeDirError(
                f"another rwproxy (pid {other.get('pid', '?')}, config {other.get('config', '?')}, listening on "
                f"{other.get('listen', '?')}) uses runtime directory {self.path}; stop it, or give this instance "
                f"its own [proxy] runtime_dir") from None
        os.set_inheritable(fd, False)
        self._lock_fd = fd
        for name in os.listdir(self.path):  # sockets left by an instance that died: ours to replace
            if name.endswith(".sock"):
                try:
                    os.unlink(os.path.join(self.path, name))
                except OSError:
                    pass
        tmp = os.path.join(self.path, ".instance.json")
        try:
            with open(tmp, "w") as f:
                json.dump(identity, f)
            os.replace(tmp, os.path.join(self.path, "instance.json"))
        except OSError as e:  # a full disk: one line at start-up, and the lock let go
            try:
                os.unlink(tmp)
            except OSError:
                pass
            self.release()
            raise RuntimeDirError(f"cannot write {tmp}: {e.strerror}; free space there or set [proxy] "
                                  f"runtime_dir") from None

    def release(self) -> None:
        """Remove what this instance created, then unlock (only the holder ever removes anything)."""
        if self._lock_fd is None:
            return
        for name in os.listdir(self.path):
            if name.endswith(".sock") or name == "instance.json":
                try:
                    os.unlink(os.path.join(self.path, name))
                except OSError:
                    pass
        os.close(self._lock_fd)
        self._lock_fd = None
