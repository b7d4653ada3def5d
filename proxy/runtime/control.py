"""The control socket: operator commands (`rwproxy status`, switchover, ...) to a running proxy.

One JSON request line in, one JSON reply line out, over a unix socket only the proxy's user
can reach (mode 0600), in the instance's runtime directory (rundir.py). The supervisor serves it;
the CLI finds it from the config, and asks `hello` first to check it reached the instance that
config names.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading

log = logging.getLogger("rwproxy.control")


class ControlServer:
    """A unix-socket server in the supervisor: one JSON request line in, one JSON reply line out.

    Handlers run on their own threads (a switchover may take seconds); the socket is
    only reachable by the same user (mode 0600).
    """

    def __init__(self, path: str, handlers: dict):
        self.path = path
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        handlers_ = handlers

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                try:
                    req = json.loads(self.rfile.readline(65536) or b"{}")
                    fn = handlers_.get(req.get("cmd"))
                    reply = fn(req) if fn else {"ok": False, "message": f"unknown command {req.get('cmd')!r}"}
                except ValueError as e:  # refused (unknown server, not allowed now): the message says why
                    reply = {"ok": False, "message": str(e)}
                except Exception as e:  # an operator tool must get an answer, not a hang
                    log.exception("control command failed")
                    reply = {"ok": False, "message": f"{type(e).__name__}: {e}"}
                try:
                    self.wfile.write(json.dumps(reply, default=str).encode() + b"\n")
                except OSError:
                    pass  # the asker gave up (a readiness probe, a timed-out CLI): nothing to tell

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        old = os.umask(0o077)
        try:
            self.server = Server(path, Handler)
        finally:
            os.umask(old)
        threading.Thread(target=self.server.serve_forever, name="control-socket", daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def request(path: str, cmd: str, timeout: float = 60.0, **args) -> dict:
    """Send one command to a running proxy's control socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data or b"{}")
