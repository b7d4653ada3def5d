"""One instance's part in a cluster of rwproxy instances coordinated through etcd.

Keys under /rwproxy/<cluster name>/ (docs/coordination.md):
  instances/<name>  this instance (address, pid, started), bound to its lease: gone when it is
  leader            the leader's name, bound to its lease; the key's create_revision is the epoch
  state             the leader's decisions (coord/shared.py), written only in a transaction that
                    compares the leader key's create_revision with the writer's epoch
  requests/<id>     operator commands given to a follower; results/<id> the leader's answers

Two threads: the session thread (lease, campaign, renew, publish when the decisions change or
it is poked) and the watch thread (applies the state on followers, tracks the leader, hands
requests to the leader). Every instance monitors for its own routing; only the leader acts on
the servers, and only while `may_act()`: its lease was last renewed, counted from when the
renewal was *sent*, less than lease_ttl - etcd_timeout ago. etcd expires the lease no sooner
than lease_ttl after it processed that renewal, so the leader has stopped before anyone else can
win (Patroni's rule, with loop_wait = lease_ttl / 3 and retry_timeout = etcd_timeout; the
config insists on etcd_timeout <= lease_ttl / 3). Every step that changes a server first checks
in etcd that the epoch is still current (`check`), and the promoted primary records the epoch in
`<heartbeat_schema>.leader_epoch`, which replicates: a stale leader finding a newer epoch on a
server it is about to change stops there.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from proxy.cluster.failover.ops import StepError
from proxy.config.fields import parse_listen
from proxy.coord import shared
from proxy.coord.etcd import KV, Etcd, EtcdError
from proxy.coord.requests import Requests

log = logging.getLogger("rwproxy.coord")


def default_instance(config) -> str:
    hp = parse_listen(config.proxy.listen)
    return f"{socket.gethostname()}:{hp[1] if hp else config.proxy.listen}"


class Coordinator:
    def __init__(self, config, failover):
        c = config.cluster
        self.config, self.failover = config, failover
        self.name = c.name
        self.me = c.instance or default_instance(config)
        self.ttl, self.timeout = c.lease_ttl, c.etcd_timeout
        self.prefix = f"/rwproxy/{c.name}/"
        self.leader_key, self.state_key = self.prefix + "leader", self.prefix + "state"
        self.etcd = Etcd(list(c.etcd_endpoints), c.etcd_timeout, ca=c.etcd_ca, cert=c.etcd_cert, key=c.etcd_key,
                         user=c.etcd_user, password=c.etcd_password)
        self.requests = Requests(self)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poke = threading.Event()
        self._foreign_said = 0  # the epoch of the last "another etcd cluster" warning
        self._lease = 0
        self._renewed_sent = 0.0  # monotonic time the last successful renewal (or grant) was sent
        self._epoch = 0  # create_revision of our leader key while we lead, else 0
        self._leader: str | None = None
        self._leader_epoch = 0
        self._published: dict | None = None  # what we last wrote to state (leader)
        self._applied: dict | None = None  # the newest state seen (any instance)
        self._etcd_ok = False
        self._etcd_error = "not connected yet"
        self._leadership_changes = 0
        self._threads: list[threading.Thread] = []
        failover.actions.fence = self
        failover.coord = self

    # ---- life ----------------------------------------------------------------------------
    def start(self) -> None:
        for target, name in ((self._session, "rwproxy-coord"), (self._watch, "rwproxy-coord-watch")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("coordination: instance %s of cluster %r through etcd %s (lease %d s)", self.me, self.name,
                 ", ".join(self.etcd.endpoints), self.ttl)

    def stop(self) -> None:
        self._stop.set()
        self._poke.set()
        self.etcd.close()  # the watch thread is blocked reading its stream: end it now
        for t in self._threads:
            t.join(self.timeout * 3 + 5)
        with self._lock:
            lease, self._lease, self._epoch = self._lease, 0, 0
        if lease:
            try:
                self.etcd.revoke(lease)  # the leader key and our instance key go at once
            except EtcdError:
                pass
        self.etcd.close()

    def poke(self) -> None:
        """The decisions may have changed: publish now (leader)."""
        self._poke.set()

    # ---- who may act -----------------------------------------------------------------------
    def leading(self) -> bool:
        with self._lock:
            return self._epoch != 0

    def leader(self) -> str | None:
        with self._lock:
            return self._leader

    def lease_id(self) -> int:
        with self._lock:
            return self._lease

    def may_act(self) -> bool:
        with self._lock:
            return self._epoch != 0 and time.monotonic() < self._renewed_sent + self.ttl - self.timeout

    def check(self, what: str, link=None) -> None:
        """Before a step that changes a server: still the leader of a current epoch (one etcd
        transaction), and, when `link` is given, that server has seen no newer epoch."""
        with self._lock:
            epoch = self._epoch
        if not epoch or not self.may_act():
            raise StepError(f"{what}: this instance is not the leader (any more): not touching the servers")
        try:
            ok, _ = self.etcd.txn([self.etcd.created(self.leader_key, epoch)], [])
        except EtcdError as e:
            raise StepError(f"{what}: cannot confirm the leadership in etcd ({e})") from None
        if not ok:
            self._step_down("the leader key changed (another instance leads)")
            raise StepError(f"{what}: epoch {epoch} is over: another instance leads")
        if link is not None:
            seen, where = self._epoch_on(link)
            mine = self.etcd.cluster_id
            if seen > epoch and where and mine and where != mine:
                if self._foreign_said != seen:
                    self._foreign_said = seen
                    log.warning("coordination: %s records epoch %d of another etcd cluster (id %s; this one is %s): "
                                "etcd was rebuilt or replaced, its revisions started again; epoch %d takes over",
                                link.name, seen, where, mine, epoch)
            elif seen > epoch:
                self._step_down(f"{link.name} records epoch {seen}")
                raise StepError(f"{what}: {link.name} already follows epoch {seen} (ours is {epoch})")

    def _epoch_on(self, link) -> tuple[int, str]:
        """(the epoch recorded on the server, the id of the etcd cluster it came from; "" if unknown)."""
        schema = self.config.monitor.heartbeat_schema
        try:  # (*: a table an older rwproxy made has no etcd_cluster)
            rows = link.q(f"SELECT * FROM `{schema}`.leader_epoch WHERE cluster = %s", (self.name,))
        except StepError as e:
            if "(1146)" in str(e) or "(1049)" in str(e):  # no table yet: no epoch was recorded
                return 0, ""
            raise
        return (int(rows[0]["epoch"]), str(rows[0].get("etcd_cluster") or "")) if rows else (0, "")

    def record(self, link) -> None:
        """On a server just promoted: our epoch, replicated to every server that follows it."""
        with self._lock:
            epoch = self._epoch
        if not epoch:
            return
        schema = self.config.monitor.heartbeat_schema
        link.q(f"CREATE DATABASE IF NOT EXISTS `{schema}`")
        link.q(f"CREATE TABLE IF NOT EXISTS `{schema}`.leader_epoch ("
               " cluster VARCHAR(64) NOT NULL PRIMARY KEY, epoch BIGINT UNSIGNED NOT NULL,"
               " leader VARCHAR(255) NOT NULL, at DECIMAL(20,6) NOT NULL,"
               " etcd_cluster VARCHAR(32) NOT NULL DEFAULT ''"
               ") ENGINE=InnoDB COMMENT='rwproxy: the leader epoch that promoted this primary'")
        link.q(f"ALTER TABLE `{schema}`.leader_epoch ADD COLUMN IF NOT EXISTS etcd_cluster VARCHAR(32) NOT NULL "
               "DEFAULT ''")  # (a table an older rwproxy made)
        # Ours if newer, or if the recorded one came from another etcd cluster (check() said so).
        # The assignments run in order and see the columns already assigned: epoch and etcd_cluster last.
        take = ("(VALUES(epoch) >= epoch OR (etcd_cluster <> '' AND VALUES(etcd_cluster) <> '' "
                "AND etcd_cluster <> VALUES(etcd_cluster)))")
        link.q(f"INSERT INTO `{schema}`.leader_epoch (cluster, epoch, leader, at, etcd_cluster) "
               f"VALUES (%s, %s, %s, %s, %s) ON DUPLICATE KEY UPDATE leader = IF({take}, VALUES(leader), leader), "
               f"at = IF({take}, VALUES(at), at), epoch = IF({take}, VALUES(epoch), epoch), "
               f"etcd_cluster = IF({take}, VALUES(etcd_cluster), etcd_cluster)",
               (self.name, epoch, self.me, time.time(), self.etcd.cluster_id))

    # ---- the session thread: lease, campaign, publish --------------------------------------
    def _session(self) -> None:
        renew_every = self.ttl / 3.0
        while not self._stop.is_set():
            try:
                self._keep_lease(renew_every)
                if not self.leading():
                    self._campaign()
                if self.leading():
                    self._publish()
                self._healthy()
            except EtcdError as e:
                self._unhealthy(str(e))
            if self.leading() and not self.may_act():
                self._step_down(f"the lease was not renewed for {self.ttl - self.timeout:g} s")
            self._poke.wait(min(renew_every, 0.5) if self.leading() else renew_every)
            self._poke.clear()

    def _keep_lease(self, renew_every: float) -> None:
        now = time.monotonic()
        if self._lease and now - self._renewed_sent < renew_every:
            return
        if self._lease:
            left = self.etcd.keepalive(self._lease)
            if left > 0:
                with self._lock:
                    self._renewed_sent = now
                return
            self._step_down("the lease expired")
            self._lease = 0
        kvs, _ = self.etcd.get(self.prefix + "instances/" + self.me)
        other = kvs[0].json() if kvs else None
        if isinstance(other, dict) and other.get("pid") != os.getpid():
            log.error("coordination: instance name %s is already registered (pid %s, listen %s): either a previous "
                      "run of this instance (gone within lease_ttl) or another instance with the same name; give "
                      "each instance its own [cluster] instance", self.me, other.get("pid"), other.get("listen"))
        lease = self.etcd.grant(self.ttl)
        with self._lock:
            self._lease, self._renewed_sent = lease, now
        info = {"name": self.me, "listen": self.config.proxy.listen, "pid": os.getpid(), "started": time.time(),
                "admin": self.config.admin.listen if self.config.admin.enabled else "",
                "metrics": self.config.metrics.listen}
        self.etcd.put(self.prefix + "instances/" + self.me, json.dumps(info), lease)

    def _campaign(self) -> None:
        e = self.etcd
        ok, doc = e.txn([e.created(self.leader_key, 0)], [e.put_op(self.leader_key, self.me, self._lease)],
                        [e.get_op(self.leader_key)])
        if ok:
            epoch = int(doc["header"]["revision"])
            self._take_lead(epoch)
            return
        kvs = doc["responses"][0].get("response_range", {}).get("kvs", [])
        if kvs:
            kv = KV.of(kvs[0])
            name = kv.value.decode("utf-8", "replace")
            if name == self.me and kv.lease == self._lease:
                # our own key on our live lease: we stepped down because etcd was unreachable, and
                # nobody can have led meanwhile (the key never went away): lead again, same epoch
                self._take_lead(kv.create_revision)
                return
            self._set_leader(name, kv.create_revision)

    def _take_lead(self, epoch: int) -> None:
        kvs, _ = self.etcd.get(self.state_key)
        last = kvs[0].json() if kvs else None
        if isinstance(last, dict):
            said = shared.apply(self.failover, last, as_leader=True)
            if said:
                log.info("coordination: carrying on from the last leader's decisions: %s", ", ".join(said))
        with self._lock:
            self._epoch, self._leader, self._leader_epoch = epoch, self.me, epoch
            self._published = None
            self._leadership_changes += 1
        log.warning("coordination: %s leads cluster %r (epoch %d); it alone fails over, switches over and fences",
                    self.me, self.name, epoch)
        self.failover.wake()

    def _set_leader(self, name: str | None, epoch: int) -> None:
        with self._lock:
            if (name, epoch) == (self._leader, self._leader_epoch):
                return
            self._leader, self._leader_epoch = name, epoch
        if name and name != self.me:
            log.info("coordination: %s leads (epoch %d); this instance follows its decisions", name, epoch)

    def _step_down(self, why: str) -> None:
        with self._lock:
            was, self._epoch = self._epoch, 0
            if was:
                self._leader = None
        if was:
            log.error("coordination: %s stops leading (epoch %d): %s; not acting on the servers", self.me, was, why)
            self._poke.set()

    def _publish(self) -> None:
        now = shared.decisions(self.failover)
        if not shared.changed(now, self._published):
            return
        with self._lock:
            epoch = self._epoch
        doc = {**now, "epoch": epoch, "leader": self.me, "at": time.time()}
        e = self.etcd
        ok, _ = e.txn([e.created(self.leader_key, epoch)], [e.put_op(self.state_key, json.dumps(doc))])
        if not ok:
            self._step_down("the leader key changed (another instance leads)")
            return
        self._published = now
        with self._lock:
            self._applied = doc

    def _healthy(self) -> None:
        if not self._etcd_ok:
            log.warning("coordination: etcd answers (%s)", self.etcd.endpoints[0] if self.etcd.endpoints else "")
        self._etcd_ok, self._etcd_error = True, ""

    def _unhealthy(self, why: str) -> None:
        if self._etcd_ok or self._etcd_error != why:
            log.error("coordination: %s; routing goes on with the last known decisions, nobody fails over "
                      "until etcd answers", why)
        self._etcd_ok, self._etcd_error = False, why

    # ---- the watch thread ---------------------------------------------------------------------
    def _watch(self) -> None:
        idle = max(2.0, float(self.ttl))
        while not self._stop.is_set():
            try:
                kvs, rev = self.etcd.get(self.prefix, prefix=True)
                for kv in kvs:
                    self._on(kv.key, "PUT", kv)
                for events in self.etcd.watch(self.prefix, rev + 1, self._stop, idle):
                    for ev in events:
                        self._on(ev.kv.key, ev.kind, ev.kv)
            except EtcdError as e:
                log.debug("coordination: watch: %s", e)
                self._stop.wait(min(1.0, self.timeout))
            except Exception:  # noqa: BLE001 - a bug here must not end the watching
                log.exception("coordination: unexpected error in the watch thread")
                self._stop.wait(1.0)

    def _on(self, key: str, kind: str, kv) -> None:
        if key == self.leader_key:
            if kind == "DELETE":
                self._set_leader(None, 0)
                if self.leading():
                    self._step_down("the leader key was deleted")
                self._poke.set()  # campaign now, not at the next renewal
            else:
                self._set_leader(kv.value.decode("utf-8", "replace"), kv.create_revision)
        elif key == self.state_key and kind == "PUT":
            doc = kv.json()
            if not isinstance(doc, dict):
                return
            with self._lock:
                self._applied = doc
                mine = self._epoch != 0
            if not mine:
                said = shared.apply(self.failover, doc)
                if said:
                    log.warning("coordination: applied %s's decision (epoch %s): %s", doc.get("leader"),
                                doc.get("epoch"), ", ".join(said))
        elif key.startswith(self.prefix + "requests/") or key.startswith(self.prefix + "results/"):
            self.requests.on(key, kind, kv)

    # ---- what status and metrics show -------------------------------------------------------------
    def instances(self) -> list[dict]:
        try:
            kvs, _ = self.etcd.get(self.prefix + "instances/", prefix=True, serializable=True)
        except EtcdError:
            return []
        with self._lock:
            leader = self._leader
        out = []
        for kv in kvs:
            d = kv.json()
            if isinstance(d, dict):
                d["leader"] = d.get("name") == leader
                out.append(d)
        return sorted(out, key=lambda d: d.get("name", ""))

    def status(self, with_instances: bool = True) -> dict:
        with self._lock:
            st = {"coordination": "etcd", "cluster": self.name, "instance": self.me, "leader": self._leader,
                  "epoch": self._leader_epoch, "leading": self._epoch != 0, "etcd_ok": self._etcd_ok,
                  "etcd_error": self._etcd_error, "leadership_changes": self._leadership_changes,
                  "state_epoch": (self._applied or {}).get("epoch")}
        st["may_act"] = self.may_act()
        if with_instances:
            st["instances"] = self.instances()
        return st
