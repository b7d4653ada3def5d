"""The client Unix socket ([proxy] socket): what `mariadb -S`, PHP's `localhost` and other
same-host clients connect to, as they would to mysqld's own socket (ProxySQL and MaxScale
listeners offer the same).

One listening socket, bound by the supervisor and shared by every worker (each accepts from it
in its own event loop, as each does from its TCP port). The file is created like mysqld's:
mode 0777, access decided by the login (and by the permissions of the directory that holds it).
A file left by an instance that died is replaced; a socket something still answers on, or a
path that is not a socket, is a start-up error, so two instances never share one silently.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

class UnixSocketError(Exception):
    """One line for the operator: the path cannot be listened on, and why."""


def _in_use(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        return True  # (EAGAIN: a full backlog is somebody's; EACCES: not ours to take over)
    finally:
        probe.close()


class UnixListener:
    """The bound socket and the file it made (removed on close only if it is still that file)."""

    def __init__(self, path: str):
        self.path = path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise UnixSocketError(f"cannot listen on {path}: {e.strerror}") from None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise UnixSocketError(f"cannot listen on {path}: it exists and is not a socket; remove it or "
                                      f"change [proxy] socket")
            if _in_use(path):
                raise UnixSocketError(f"cannot listen on {path}: another process listens on it; stop it or "
                                      f"change [proxy] socket")
            os.unlink(path)  # left by a process that died
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Mode 0777 from bind itself, not a chmod after it, which would follow a symlink put in
        # the socket's place meanwhile (bound once at start-up, before any thread runs).
        mask = os.umask(0)
        try:
            s.bind(path)
            s.listen(1024)
        except OSError as e:
            s.close()
            raise UnixSocketError(f"cannot listen on {path}: {e.strerror}") from None
        finally:
            os.umask(mask)
        s.setblocking(False)
        self.sock = s
        self.inode = os.lstat(path).st_ino

    def close(self) -> None:
        """Stop listening (new clients are refused at once); the file stays until remove()."""
        self.sock.close()

    def remove(self) -> None:
        self.sock.close()
        try:
            if os.lstat(self.path).st_ino == self.inode:
                os.unlink(self.path)
        except OSError:
            pass
