"""Operator commands given to any instance, carried out once, by the leader.

A follower puts requests/<id> (bound to its lease: a request whose asker died goes away) and
waits for results/<id>. The leader takes a request by deleting it in a transaction that checks
it still exists (so two leaders in a row cannot both run it), runs it on a thread of its own,
and answers in results/<id> (bound to the leader's lease; the asker deletes it once read).
"""

from __future__ import annotations

import json
import logging
import threading
import uuid

from proxy.coord.etcd import EtcdError

log = logging.getLogger("rwproxy.coord")


class Requests:
    def __init__(self, coord):
        self.coord = coord
        self.handlers: dict = {}  # op -> callable(args) -> dict (set by the control plane)
        self._cond = threading.Condition()
        self._results: dict[str, dict] = {}
        self._waiting: set[str] = set()

    def forward(self, op: str, args: dict, timeout: float) -> dict:
        """Ask the leader to run `op`; its answer (a dict with ok and message)."""
        c = self.coord
        lease, leader = c.lease_id(), c.leader()
        if not leader:
            return {"ok": False, "message": f"{op}: no leader instance is known (is etcd reachable?); try again"}
        rid = uuid.uuid4().hex
        with self._cond:
            self._waiting.add(rid)
        try:
            c.etcd.put(c.prefix + "requests/" + rid, json.dumps({"op": op, "args": args, "from": c.me}), lease)
            log.info("coordination: %s forwarded to the leader %s", op, leader)
            with self._cond:
                self._cond.wait_for(lambda: rid in self._results, timeout)
                res = self._results.pop(rid, None)
            if res is None:
                return {"ok": False, "message": f"{op}: the leader {leader} did not answer within {timeout:g} s"}
            return res
        except EtcdError as e:
            return {"ok": False, "message": f"{op}: cannot reach etcd to forward it to the leader: {e}"}
        finally:
            with self._cond:
                self._waiting.discard(rid)
            try:
                c.etcd.delete(c.prefix + "results/" + rid)
            except EtcdError:
                pass

    def on(self, key: str, kind: str, kv) -> None:
        c = self.coord
        rid = key.rsplit("/", 1)[1]
        if key.startswith(c.prefix + "results/"):
            if kind == "PUT":
                with self._cond:
                    if rid in self._waiting:
                        doc = kv.json()
                        self._results[rid] = doc if isinstance(doc, dict) else {"ok": False, "message": "bad answer"}
                        self._cond.notify_all()
            return
        if kind != "PUT" or not c.leading():
            return
        e = c.etcd
        try:
            ok, _ = e.txn([e.created(key, kv.create_revision)], [e.delete_op(key)])
        except EtcdError:
            return
        if not ok:
            return  # taken already
        threading.Thread(target=self._run, args=(rid, kv.json()), name="rwproxy-coord-request", daemon=True).start()

    def _run(self, rid: str, req) -> None:
        c = self.coord
        if not isinstance(req, dict) or req.get("op") not in self.handlers:
            res = {"ok": False, "message": f"unknown request {str(req)[:60]!r}"}
        else:
            log.warning("coordination: running %s for instance %s", req["op"], req.get("from"))
            try:
                res = self.handlers[req["op"]](req.get("args") or {})
            except Exception as exc:  # noqa: BLE001 - the asker gets the message
                res = {"ok": False, "message": f"{req['op']} failed on the leader: {exc}"}
        res = {**res, "ran_on": c.me}
        try:
            c.etcd.put(c.prefix + "results/" + rid, json.dumps(res, default=str), c.lease_id())
        except EtcdError as e:
            log.error("coordination: could not answer request %s: %s", rid, e)
        c.poke()

