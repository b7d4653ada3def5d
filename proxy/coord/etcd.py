"""A small etcd v3 client over its JSON gateway (HTTP), on urllib3.

etcd (3.4 in Debian 12, 3.5 elsewhere) serves the v3 API as JSON on its client port: keys and
values are base64, 64-bit numbers are strings, and fields at their zero value are left out
(a PUT event has no "type", a failed transaction no "succeeded"). The `etcd3` package is
unmaintained and breaks on current protobuf; `etcd3gw` pulls in futurist and pbr for what is a
dozen POSTs here. urllib3 is already a dependency (boto3's) and is thread-safe with a bounded
pool. Every call has a timeout; an endpoint that does not answer is skipped for the next.

Secured etcd as Patroni users run it: https endpoints checked against `ca` (else the system's
CAs), a client certificate for --client-cert-auth, and etcd's own users (POST auth/authenticate
gives a token sent as the Authorization header; etcd forgets tokens after --auth-token-ttl,
300 s by default, and then answers "invalid auth token": the client logs in again, once, and
repeats the request).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import ssl
import threading
from dataclasses import dataclass

import urllib3

log = logging.getLogger("rwproxy.coord")


class EtcdError(Exception):
    """etcd could not be reached or refused the request; the message says which endpoint and why."""


# What etcd (3.4/3.5) answers when the token is missing, expired or from before a restart.
_TOKEN_ERRORS = ("invalid auth token", "user name is empty", "auth: revision in header is old")


def tls_context(ca: str = "", cert: str = "", key: str = "") -> ssl.SSLContext:
    """The context for https endpoints; EtcdError (one line) when a file cannot be used."""
    for path in (ca, cert, key):
        if path and not os.path.isfile(path):
            raise EtcdError(f"{path}: no such file")
        if path and not os.access(path, os.R_OK):
            raise EtcdError(f"{path}: not readable by this user")
    try:
        ctx = ssl.create_default_context(cafile=ca or None)
        if cert:
            ctx.load_cert_chain(cert, key or None)
    except (ssl.SSLError, OSError, ValueError) as e:
        raise EtcdError(f"cannot use the TLS files (ca {ca or 'system'}, cert {cert or 'none'}): "
                        f"{getattr(e, 'reason', None) or e}") from None
    return ctx


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: str) -> str:
    """The range_end that selects every key starting with `prefix` (the prefix, last byte + 1)."""
    raw = prefix.encode()
    return b64(raw[:-1] + bytes([raw[-1] + 1]))


@dataclass(frozen=True)
class KV:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int

    @classmethod
    def of(cls, d: dict) -> "KV":
        return cls(unb64(d.get("key")).decode("utf-8", "replace"), unb64(d.get("value")),
                   int(d.get("create_revision", 0)), int(d.get("mod_revision", 0)), int(d.get("lease", 0)))

    def json(self):
        try:
            return json.loads(self.value)
        except ValueError:
            return None


@dataclass(frozen=True)
class Event:
    kind: str  # "PUT" or "DELETE"
    kv: KV


class Etcd:
    """Requests to the first endpoint that answers (the last one that did is tried first)."""

    def __init__(self, endpoints: list[str], timeout: float = 1.0, *, ca: str = "", cert: str = "", key: str = "",
                 user: str = "", password: str = ""):
        if not endpoints:
            raise ValueError("no etcd endpoints")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout = timeout
        tls = {}
        if any(e.lower().startswith("https://") for e in self.endpoints):
            tls = {"ssl_context": tls_context(ca, cert, key)}
        self._http = urllib3.PoolManager(maxsize=4, retries=False, **tls)
        self._good = 0
        self._lock = threading.Lock()
        # The etcd cluster's id (every answer's header): an epoch recorded on a server under another
        # cluster (etcd rebuilt from scratch) is not comparable with this cluster's revisions.
        self.cluster_id = ""
        self._watching = None  # the open watch response (close() shuts it down)
        self._user, self._password = user, password
        self._token = ""  # etcd auth: the token of the last login (sent as Authorization)

    def close(self) -> None:
        """Also ends a watch blocked in a read (it would otherwise wait out its idle timeout)."""
        r = self._watching
        if r is not None:
            try:
                r.shutdown()
            except Exception:  # noqa: BLE001 - already closed
                pass
        self._http.clear()

    # ---- the transport -----------------------------------------------------------------
    def _order(self) -> list[str]:
        with self._lock:
            g = self._good
        return self.endpoints[g:] + self.endpoints[:g]

    def _headers(self, token: bool = True) -> dict:
        h = {"Content-Type": "application/json"}
        if token and self._token:
            h["Authorization"] = self._token
        return h

    def _post(self, ep: str, path: str, data: bytes, t: float, token: bool = True) -> tuple[dict | None, str]:
        """(the answer, "") or (None, why not) from one endpoint."""
        try:
            r = self._http.request("POST", f"{ep}/v3/{path}", body=data, headers=self._headers(token),
                                   timeout=urllib3.Timeout(connect=min(t, 1.0), read=t))
        except urllib3.exceptions.SSLError as e:
            return None, f"TLS: {_reason(e)}"
        except urllib3.exceptions.HTTPError as e:
            return None, type(e).__name__
        try:
            doc = json.loads(r.data or b"{}")
        except ValueError:
            return None, f"HTTP {r.status}, not JSON"
        if r.status != 200 or "error" in doc:
            return None, str(doc.get("error") or doc.get("message") or f"HTTP {r.status}")
        return doc, ""

    def _login(self, ep: str, t: float) -> str:
        """Get a token from `ep` ("" on success, else why not)."""
        data = json.dumps({"name": self._user, "password": self._password}).encode()
        doc, why = self._post(ep, "auth/authenticate", data, t, token=False)
        if doc is None:
            self._token = ""
            return f"login as {self._user!r} failed: {why}"
        token = str(doc.get("token", ""))
        if not token or not token.isascii() or not token.isprintable():
            self._token = ""
            return f"login as {self._user!r} failed: etcd answered without a usable token"
        self._token = token  # (threads share it: one login serves them all)
        log.info("etcd: logged in at %s as %r", ep, self._user)
        return ""

    def call(self, path: str, body: dict, timeout: float | None = None) -> dict:
        """POST to /v3/<path>; the decoded answer. EtcdError when no endpoint answered well."""
        errors = []
        data = json.dumps(body).encode()
        t = self.timeout if timeout is None else timeout
        for ep in self._order():
            if self._user and not self._token:
                why = self._login(ep, t)
                if why:
                    errors.append(f"{ep}: {why}")
                    continue
            doc, why = self._post(ep, path, data, t)
            if doc is None and self._user and any(x in why for x in _TOKEN_ERRORS):
                why = self._login(ep, t)  # the token expired (or etcd restarted): once more with a new one
                if not why:
                    doc, why = self._post(ep, path, data, t)
            if doc is None:
                errors.append(f"{ep}: {why}")
                continue  # e.g. "etcdserver: request timed out" from a member without quorum
            with self._lock:
                self._good = self.endpoints.index(ep)
                self.cluster_id = str(doc.get("header", {}).get("cluster_id", "") or self.cluster_id)
            return doc
        raise EtcdError("etcd did not answer: " + "; ".join(errors))

    # ---- key-value -----------------------------------------------------------------------
    def get(self, key: str, *, prefix: bool = False, serializable: bool = False) -> tuple[list[KV], int]:
        """(the keys, the store's revision)."""
        body = {"key": b64(key), "serializable": serializable}
        if prefix:
            body["range_end"] = prefix_end(key)
        doc = self.call("kv/range", body)
        return [KV.of(k) for k in doc.get("kvs", [])], int(doc.get("header", {}).get("revision", 0))

    def put(self, key: str, value: str | bytes, lease: int = 0) -> int:
        doc = self.call("kv/put", {"key": b64(key), "value": b64(value), "lease": str(lease)})
        return int(doc.get("header", {}).get("revision", 0))

    def delete(self, key: str) -> None:
        self.call("kv/deleterange", {"key": b64(key)})

    def txn(self, compare: list[dict], success: list[dict], failure: list[dict] | None = None) -> tuple[bool, dict]:
        """(succeeded, the whole answer)."""
        doc = self.call("kv/txn", {"compare": compare, "success": success, "failure": failure or []})
        return bool(doc.get("succeeded")), doc

    # the pieces of a transaction
    @staticmethod
    def created(key: str, revision: int) -> dict:
        """Compare: `key` was created at `revision` (0: it does not exist)."""
        return {"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": str(revision)}

    @staticmethod
    def put_op(key: str, value: str | bytes, lease: int = 0) -> dict:
        return {"request_put": {"key": b64(key), "value": b64(value), "lease": str(lease)}}

    @staticmethod
    def get_op(key: str) -> dict:
        return {"request_range": {"key": b64(key)}}

    @staticmethod
    def delete_op(key: str) -> dict:
        return {"request_delete_range": {"key": b64(key)}}

    # ---- leases ----------------------------------------------------------------------------
    def grant(self, ttl: int) -> int:
        doc = self.call("lease/grant", {"TTL": str(ttl)})
        return int(doc["ID"])

    def keepalive(self, lease: int) -> int:
        """Renew; the TTL left (0: the lease is gone)."""
        doc = self.call("lease/keepalive", {"ID": str(lease)})
        return int(doc.get("result", doc).get("TTL", 0))

    def revoke(self, lease: int) -> None:
        self.call("lease/revoke", {"ID": str(lease)})

    # ---- watching ----------------------------------------------------------------------------
    def watch(self, prefix: str, start_revision: int, stop: threading.Event, idle: float):
        """Yield lists of Events under `prefix` from `start_revision` until `stop` is set, nothing
        arrives for `idle` seconds (the caller watches again: a member cut off from the others
        must not keep us waiting forever), or the stream breaks (EtcdError)."""
        body = json.dumps({"create_request": {"key": b64(prefix), "range_end": prefix_end(prefix),
                                              "start_revision": str(start_revision)}}).encode()
        last = None
        for ep in self._order():
            try:
                if self._user and not self._token:
                    why = self._login(ep, self.timeout)
                    if why:
                        last = f"{ep}: {why}"
                        continue
                r = self._http.request("POST", f"{ep}/v3/watch", body=body, preload_content=False,
                                       headers=self._headers(),
                                       timeout=urllib3.Timeout(connect=min(self.timeout, 1.0), read=idle))
            except urllib3.exceptions.HTTPError as e:
                last = f"{ep}: {type(e).__name__}"
                continue
            self._watching = r
            try:
                yield from self._events(r, stop)
                return
            except EtcdError as e:
                if any(x in str(e) for x in _TOKEN_ERRORS):
                    self._token = ""  # log in again before the next watch
                raise
            finally:
                self._watching = None
                r.release_conn()
        raise EtcdError(f"cannot watch: {last}")

    @staticmethod
    def _events(r, stop: threading.Event):
        try:
            yield from watch_events(r.stream(4096, decode_content=False), stop)
        except (urllib3.exceptions.HTTPError, OSError) as e:
            if isinstance(e, urllib3.exceptions.ReadTimeoutError) or "timed out" in str(e):
                return  # idle: watch again
            raise EtcdError(f"watch broke: {type(e).__name__}") from None


def _reason(e: Exception) -> str:
    """The SSL error's own words (e.g. CERTIFICATE_VERIFY_FAILED), not urllib3's wrapping."""
    inner = e
    for _ in range(5):
        nxt = inner.__cause__ or (inner.args[-1] if inner.args and isinstance(inner.args[-1], Exception) else None)
        if nxt is None or nxt is inner:
            break
        inner = nxt
    return str(getattr(inner, "reason", None) or getattr(inner, "verify_message", None) or inner)[:200]


def watch_events(chunks, stop: threading.Event):
    """Lists of Events from the bytes of a watch stream: the gateway sends one JSON object per
    message, and a chunk may end anywhere inside one. EtcdError when etcd ends the watch."""
    dec = json.JSONDecoder()
    buf = ""
    for chunk in chunks:
        if stop.is_set():
            return
        buf += chunk.decode("utf-8", "replace")
        while True:
            buf = buf.lstrip()
            if not buf:
                break
            try:
                doc, end = dec.raw_decode(buf)
            except ValueError:
                break  # the rest of the object is still on its way
            buf = buf[end:]
            res = doc.get("result") or {}
            if "error" in doc or res.get("canceled"):
                raise EtcdError(f"watch ended: {doc.get('error') or res.get('cancel_reason') or 'canceled'}")
            evs = [Event(e.get("type", "PUT"), KV.of(e.get("kv", {}))) for e in res.get("events", [])]
            if evs:
                yield evs
