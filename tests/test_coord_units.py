"""The coordination pieces that need no servers: the etcd gateway's encodings, the watch stream
parser, the decisions' comparison, and the config rules for [cluster] coordination."""

from __future__ import annotations

import base64
import json
import threading

import pytest

from proxy.config.load import ConfigError, build_config
from proxy.coord import shared
from proxy.coord.etcd import KV, EtcdError, prefix_end, watch_events


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def test_prefix_end_selects_exactly_the_prefix():
    assert base64.b64decode(prefix_end("/rwproxy/a/")) == b"/rwproxy/a0"  # '/' + 1 == '0'
    assert base64.b64decode(prefix_end("ab")) == b"ac"


def test_kv_from_the_gateway_with_zero_fields_left_out():
    kv = KV.of({"key": b64("/k"), "create_revision": "7"})
    assert (kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.lease) == ("/k", b"", 7, 0, 0)
    assert KV.of({"key": b64("/k"), "value": b64('{"a": 1}')}).json() == {"a": 1}
    assert KV.of({"key": b64("/k"), "value": b64("not json")}).json() is None


def test_watch_stream_split_anywhere_gives_whole_events():
    msgs = [{"result": {"header": {}, "created": True}},
            {"result": {"events": [{"kv": {"key": b64("/p/state"), "value": b64("x"), "create_revision": "5"}}]}},
            {"result": {"events": [{"type": "DELETE", "kv": {"key": b64("/p/leader"), "mod_revision": "9"}}]}}]
    raw = "".join(json.dumps(m) + "\n" for m in msgs).encode()
    for cut in range(1, len(raw), 7):  # every way of splitting the stream in two pieces (step 7)
        got = [e for evs in watch_events([raw[:cut], raw[cut:]], threading.Event()) for e in evs]
        assert [(e.kind, e.kv.key) for e in got] == [("PUT", "/p/state"), ("DELETE", "/p/leader")], cut
    one_byte = [raw[i:i + 1] for i in range(len(raw))]
    assert len([e for evs in watch_events(one_byte, threading.Event()) for e in evs]) == 2


def test_watch_stream_cancelled_or_erroring_is_an_error():
    with pytest.raises(EtcdError, match="compacted"):
        list(watch_events([json.dumps({"result": {"canceled": True, "cancel_reason": "compacted"}}).encode()],
                          threading.Event()))
    with pytest.raises(EtcdError, match="boom"):
        list(watch_events([json.dumps({"error": "boom"}).encode()], threading.Event()))
    stop = threading.Event()
    stop.set()
    assert list(watch_events([b'{"result": {"events": [{"kv": {"key": "YQ=="}}]}}'], stop)) == []


def test_decisions_changed_ignores_who_and_when():
    now = {"primary": "node1", "writes_held": False, "admin": {}}
    assert shared.changed(now, None)
    assert not shared.changed(now, {**now, "at": 1.0, "epoch": 3, "leader": "p1"})
    assert shared.changed(now, {**now, "primary": "node2"})
    assert shared.changed({**now, "admin": {"node3": "offline"}}, now)


def _cfg(**cluster):
    return build_config({"proxy": {"listen": "127.0.0.1:7000"},
                         "backends": [{"name": "a", "host": "127.0.0.1", "port": 3306}],
                         "users": [{"name": "u", "password": "p"}], "cluster": cluster}, source="t.toml")


def test_config_rules_for_etcd_coordination():
    c = _cfg(coordination="etcd", etcd_endpoints=["http://127.0.0.1:2379"], instance="proxy-a").cluster
    assert (c.lease_ttl, c.etcd_timeout, c.name) == (10, 1.0, "default")
    assert _cfg().cluster.coordination == "none"
    with pytest.raises(ConfigError, match="etcd_endpoints: required"):
        _cfg(coordination="etcd")
    with pytest.raises(ConfigError, match=r"etcd_timeout: 2 s is more than lease_ttl / 3"):
        _cfg(coordination="etcd", etcd_endpoints=["http://127.0.0.1:2379"], lease_ttl=5, etcd_timeout=2.0)
    with pytest.raises(ConfigError, match=r"etcd_endpoints\[0\]: expected http://host:port"):
        _cfg(coordination="etcd", etcd_endpoints=["127.0.0.1:2379"])
    with pytest.raises(ConfigError, match="cluster.instance"):
        _cfg(coordination="etcd", etcd_endpoints=["http://127.0.0.1:2379"], instance="a/../b")


def test_a_backup_pause_travels_with_the_decisions():
    """A replica a backup paused (OFFLINE, with the lock its process holds there) is part of what
    the leader publishes, so the next leader can resume it if that backup dies meanwhile."""
    from proxy.cluster.failover import Failover
    from proxy.config.load import build_config

    cfg = build_config({"backends": [{"name": "a", "host": "127.0.0.1", "port": 1},
                                     {"name": "b", "host": "127.0.0.1", "port": 2}],
                        "users": [{"name": "u", "password": "p"}]})
    leader, follower = Failover(cfg, lambda _t: None), Failover(cfg, lambda _t: None)
    leader.state.paused_by_backup("b", "rwproxy.backup.pause")
    leader.monitor.set_admin_state("b", "offline")
    first = shared.decisions(leader)
    assert shared.apply(follower, first) == ["b offline"]
    assert follower.state.backup_pauses() == {"b": "rwproxy.backup.pause"}
    leader.state.paused_by_backup("b", "")
    leader.monitor.set_admin_state("b", "")
    second = shared.decisions(leader)
    assert shared.changed(second, first)
    assert shared.apply(follower, second) == ["b online"] and follower.state.backup_pauses() == {}
