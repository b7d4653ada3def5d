"""The metrics and health endpoint ([metrics] listen): GET /metrics (Prometheus text format),
/health/live and /health/ready (for load balancers and orchestrators), on its own thread in
the supervisor.

/health/live answers 200 while the control plane runs. /health/ready answers 200 while the
proxy serves, is not draining and knows a writable primary (or, with ready_without_primary,
can at least serve reads), else 503; the body says why in one line, so `curl` shows it.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from proxy.logs import clean
from proxy.observe.metrics import registry_for

log = logging.getLogger("rwproxy.metrics")

MAX_CONNECTIONS = 128  # at once; more are closed at once (a flood must not become threads without end)


class _BoundedServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with at most MAX_CONNECTIONS handler threads. Scrapers and health
    checkers open a handful; a client holding hundreds open gets the rest closed at once,
    while the endpoint goes on answering within its bound (each idle one is dropped after the
    handler's timeout)."""

    daemon_threads = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._refused = 0

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self._refused += 1
            if self._refused in (1, 1000) or self._refused % 100000 == 0:
                log.warning("metrics: %d connections at once (the most served); %d refused so far",
                            MAX_CONNECTIONS, self._refused)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def bound_socket(host: str, port: int, backlog: int = 64) -> socket.socket:
    """A listening TCP socket the worker processes do not inherit (OSError when the address is taken)."""
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
        s.listen(backlog)
    except OSError:
        s.close()
        raise
    s.set_inheritable(False)
    return s


class MetricsServer:
    def __init__(self, plane, metrics_config):
        self.plane = plane
        self.cfg = metrics_config
        self.registry = registry_for(plane)
        self.sock: socket.socket | None = None
        self.httpd: _BoundedServer | None = None
        self.thread: threading.Thread | None = None

    def bind(self) -> None:
        """Before the workers fork: a busy or forbidden address is a start-up error (OSError)."""
        self.sock = bound_socket(self.cfg.host, self.cfg.port)

    def reconfigure(self, metrics_config) -> None:
        self.cfg = metrics_config  # (listen is restart-only; ready_without_primary applies now)

    @property
    def address(self) -> tuple:
        return self.sock.getsockname() if self.sock is not None else ("", 0)

    def start(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 5  # a client that sends nothing is dropped (scrapers send at once)
            server_version = "rwproxy"

            def do_GET(self):
                server.handle(self, body=True)

            def do_HEAD(self):
                server.handle(self, body=False)

            def log_message(self, fmt, *args):  # (no access log on stderr)
                return

        httpd = _BoundedServer(self.address, Handler, bind_and_activate=False)
        httpd.socket.close()
        httpd.socket = self.sock
        self.httpd = httpd
        self.thread = threading.Thread(target=httpd.serve_forever, name="rwproxy-metrics", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()

    def handle(self, req: BaseHTTPRequestHandler, body: bool) -> None:
        path = req.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                data, status, ctype = generate_latest(self.registry), 200, CONTENT_TYPE_LATEST
            elif path == "/health/live":
                data, status, ctype = b"live\n", 200, "text/plain; charset=utf-8"
            elif path == "/health/ready":
                ok, why = self.plane.ready()
                data, status, ctype = f"{'ready' if ok else 'not ready'}: {why}\n".encode(), 200 if ok else 503, \
                    "text/plain; charset=utf-8"
            elif path == "/health":
                ok, why = self.plane.ready()
                data = json.dumps({"live": True, "ready": ok, "reason": why}).encode() + b"\n"
                status, ctype = 200 if ok else 503, "application/json"
            else:
                data, status, ctype = b"not found: try /metrics, /health/live, /health/ready\n", 404, "text/plain"
        except Exception as e:  # a scrape must get an answer, never take the endpoint down
            log.exception("metrics: %s failed", clean(path, 100))
            data, status, ctype = f"error: {type(e).__name__}: {e}\n".encode(), 500, "text/plain"
        try:
            req.send_response(status)
            req.send_header("Content-Type", ctype)
            req.send_header("Content-Length", str(len(data)))
            req.end_headers()
            if body:
                req.wfile.write(data)
        except OSError:
            pass
