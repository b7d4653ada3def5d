"""TLS on rwproxy's own connections to its backends (pools, KILL, monitor, failover).

Modes mean what the mysql/mariadb clients' --ssl-mode means, so an operator's
habits carry over: ``preferred`` uses TLS when the server offers it,
``required`` insists on it without checking the certificate, ``verify_ca``
also checks it against ``backend_tls.ca`` (or the system's CAs) and
``verify_identity`` also checks the name in it against the backend's host.

The SSL contexts are built once per process (they are not picklable, and
loading a CA bundle costs milliseconds); a bad file is a startup error naming
the key, never a failure at the first client's query.
"""

from __future__ import annotations

import ssl

import pymysql

DISABLED, PREFERRED, REQUIRED, VERIFY_CA, VERIFY_IDENTITY = (
    "disabled", "preferred", "required", "verify_ca", "verify_identity")

# MySQL client error for a TLS failure (CR_SSL_CONNECTION_ERROR), SQLSTATE HY000
CR_SSL_CONNECTION_ERROR = 2026


class BackendTLSError(ValueError):
    """A backend_tls file could not be loaded; the message names the key and the file."""


class BackendTLS:
    """How one backend is reached: its mode, the context and the name to check."""

    __slots__ = ("mode", "context", "hostname")

    def __init__(self, mode: str, context: ssl.SSLContext | None, hostname: str | None):
        self.mode = mode
        self.context = context
        self.hostname = hostname

    @property
    def required(self) -> bool:
        """No plaintext fallback: a server that does not offer TLS is an error."""
        return self.mode not in (DISABLED, PREFERRED)

    def pymysql_args(self) -> dict:
        """PyMySQL arguments for the same policy (preferred is handled by pymysql_connect)."""
        if self.mode == DISABLED:
            return {"ssl_disabled": True}
        return {"ssl": self.context}


def _context(mode: str, cfg, source: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if mode in (VERIFY_CA, VERIFY_IDENTITY):
        try:
            if cfg.ca:
                ctx.load_verify_locations(cafile=cfg.ca)
            else:
                ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        except (OSError, ssl.SSLError) as e:
            raise BackendTLSError(f"{source}: backend_tls.ca: cannot load CA file {cfg.ca}: {e}") from None
        ctx.check_hostname = mode == VERIFY_IDENTITY
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cfg.cert:
        try:
            ctx.load_cert_chain(cfg.cert, cfg.key)
        except (OSError, ssl.SSLError) as e:
            raise BackendTLSError(
                f"{source}: backend_tls.cert/key: cannot load client certificate {cfg.cert} / key {cfg.key}: {e}"
            ) from None
    return ctx


def policies(config) -> dict[str, BackendTLS]:
    """backend name -> its BackendTLS; raises BackendTLSError for unreadable files."""
    contexts: dict[str, ssl.SSLContext] = {}
    out = {}
    for b in config.backends:
        mode = b.tls or config.backend_tls.mode
        ctx = None
        if mode != DISABLED:
            if mode not in contexts:
                contexts[mode] = _context(mode, config.backend_tls, config.source)
            ctx = contexts[mode]
        out[b.name] = BackendTLS(mode, ctx, b.host if mode == VERIFY_IDENTITY else None)
    return out


_made: list[tuple[object, dict[str, BackendTLS]]] = []


def policies_for(config) -> dict[str, BackendTLS]:
    """policies(config), built once per process and config (contexts load files)."""
    for cfg, made in _made:
        if cfg is config:
            return made
    made = policies(config)
    _made[:] = [(config, made)] + _made[:3]
    return made


def control_connect(config, backend, **kwargs) -> pymysql.connections.Connection:
    """A control-plane PyMySQL connection to `backend` (a BackendConfig) under its TLS policy."""
    return pymysql_connect(policies_for(config).get(backend.name), **backend.pymysql_args(), **kwargs)


PYMYSQL_MAX_TIMEOUT = 31_536_000  # PyMySQL refuses a longer connect_timeout (a year)

def pymysql_connect(tls: BackendTLS | None, **kwargs) -> pymysql.connections.Connection:
    """pymysql.connect under the backend's TLS policy (the control plane's connections).

    PyMySQL has no "preferred" with a context of our own: try TLS, and only when
    the server says it has none, connect again in plaintext. Timeouts derived from the
    config (twice monitor.connect_timeout...) are held to PyMySQL's most, a year.
    """
    if kwargs.get("connect_timeout") is not None:
        kwargs["connect_timeout"] = min(kwargs["connect_timeout"], PYMYSQL_MAX_TIMEOUT)
    if tls is None:
        return pymysql.connect(ssl_disabled=True, **kwargs)
    try:
        return pymysql.connect(**tls.pymysql_args(), **kwargs)
    except pymysql.err.OperationalError as e:
        if tls.mode == PREFERRED and e.args and e.args[0] == CR_SSL_CONNECTION_ERROR and "support" in str(e):
            return pymysql.connect(ssl_disabled=True, **kwargs)
        raise
