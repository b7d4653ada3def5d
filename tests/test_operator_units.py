"""Issue 21's decisions as values, without servers: admin commands, the admin SQL engine, the
reload diff, and the statistics recorder's bounds and merges."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import sqlglot

from proxy.admin import commands, engine
from proxy.config import diff
from proxy.config.load import parse_config
from proxy.observe import merge
from proxy.observe.recorder import BOUNDS, NB, Recorder, percentile
from proxy.routing import classify as C

# ---- commands --------------------------------------------------------------------------------------


@pytest.mark.parametrize("sql, want", [
    ("SWITCHOVER TO 'node2'", commands.Command("switchover", target="node2")),
    ("switchover to `node 2`;", commands.Command("switchover", target="node 2")),
    ('SWITCHOVER TO "it""s"', commands.Command("switchover", target='it"s')),
    ("/* hi */ ENABLE FAILOVER", commands.Command("enable-failover")),
    ("SET SERVER 'node3' OFFLINE", commands.Command("server-state", target="node3", state="offline")),
    ("set server node3 maintenance", commands.Command("server-state", target="node3", state="maintenance")),
    ("SET SERVER '127.0.0.1:3306' ONLINE", commands.Command("server-state", target="127.0.0.1:3306", state="online")),
    ("REJOIN SERVER 'node1'", commands.Command("rejoin", target="node1")),
    ("RELOAD CONFIG", commands.Command("reload")),
    ("KILL SESSION 42", commands.Command("kill", session=42)),
    ("KILL QUERY 7", commands.Command("kill", session=7, query_only=True)),
    ("KILL 7 -- trailing", commands.Command("kill", session=7)),
    ("RESET STATS", commands.Command("reset-stats")),
    ("SHOW COMMANDS", commands.Command("help")),
    ("SELECT * FROM servers", None),
    ("SET SERVER 'x' SIDEWAYS", None),
    ("SWITCHOVER TO 'a'; DROP TABLE x", None),
    ("KILL SESSION 99999999999999999999999", None),
])
def test_commands_parse(sql, want):
    assert commands.parse(sql) == want


def test_a_near_miss_is_answered_as_a_command_not_as_sql():
    assert commands.is_command_word("SET SERVER 'x' SIDEWAYS")
    assert commands.is_command_word("SWITCHOVER node2")
    assert not commands.is_command_word("SET @a = 1") and not commands.is_command_word("SELECT 1")


# ---- the admin SQL engine ---------------------------------------------------------------------------

SERVERS = [{"name": "node1", "role": "primary", "weight": 1, "lag_ms": None},
           {"name": "node2", "role": "replica", "weight": 3, "lag_ms": 12.5},
           {"name": "node3", "role": "replica", "weight": 1, "lag_ms": 3.0}]


def _run(sql, timeout=2.0, max_rows=1000):
    asked = []

    def fetch(names):
        asked.append(names)
        return {"servers": SERVERS, "digests": [{"digest_text": "SELECT ?", "count": 3, "user": "app"}]}

    cols, rows = engine.run(sqlglot.parse_one(sql, read="mysql"), engine.DATABASE, fetch, {}, timeout, max_rows)
    return cols, rows, asked


def test_engine_runs_mysql_syntax_on_the_snapshot_and_fetches_only_what_it_reads():
    cols, rows, asked = _run("SELECT role, COUNT(*) AS n, SUM(weight) FROM servers GROUP BY role ORDER BY n DESC LIMIT 5")
    assert cols == ["role", "n", "SUM(weight)"] and rows == [("replica", 2, 4), ("primary", 1, 1)]
    assert asked == [["servers"]]
    _, rows, _ = _run("SELECT name FROM servers WHERE lag_ms IS NOT NULL ORDER BY lag_ms LIMIT 1")
    assert rows == [("node3",)]
    _, rows, asked = _run("SELECT s.name, d.count FROM servers s JOIN digests d ON d.user = 'app' WHERE s.role = 'primary'")
    assert rows == [("node1", 3)] and asked == [["digests", "servers"]]
    assert _run("SELECT 1 + 1")[1] == [(2,)] and _run("SELECT 1 + 1")[2] == []


def test_engine_names_columns_as_mysql_does_and_has_now():
    cols, rows, _ = _run("SELECT CONCAT('a', 'b'), IFNULL(NULL, 2) AS x, name, NOW() > '2020' FROM servers LIMIT 1")
    assert cols == ["CONCAT('a', 'b')", "x", "name", "NOW() > '2020'"] and rows == [("ab", 2, "node1", 1)]


@pytest.mark.parametrize("sql, code", [
    ("DELETE FROM servers", 1290), ("UPDATE servers SET weight = 0", 1290), ("DROP TABLE servers", 1290),
    ("SELECT * FROM nosuch", 1146), ("SELECT nosuch FROM servers", 1054), ("SELECT * FROM mysql.user", 1049),
    ("SELECT load_extension('x')", 1290),
])
def test_engine_refuses_with_the_servers_codes(sql, code):
    with pytest.raises(engine.QueryError) as e:
        _run(sql)
    assert e.value.code == code


def test_engine_bounds_time_and_rows():
    with pytest.raises(engine.QueryError) as e:
        _run("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT COUNT(*) FROM r", timeout=0.2)
    assert e.value.code == 1969  # (the query never ends by itself: only the timeout stops it)
    with pytest.raises(engine.QueryError) as e:
        _run("SELECT * FROM servers", max_rows=2)
    assert e.value.code == 1104


# ---- reload diff ------------------------------------------------------------------------------------

BASE = ("[proxy]\nlisten = '127.0.0.1:7000'\n[[backends]]\nname = 'a'\nhost = '127.0.0.1'\nport = 1\n"
        "[[backends]]\nname = 'b'\nhost = '127.0.0.1'\nport = 2\n[[users]]\nname = 'app'\npassword = 'x'\n")


def test_diff_names_changes_by_backend_name_and_keeps_restart_only_values():
    old = parse_config(BASE)
    new = parse_config(BASE.replace("port = 2\n", "port = 2\nweight = 5\n").replace("7000", "7001")
                       + "[[users]]\nname = 'two'\npassword = 'y'\n")
    changed = diff.changes(old, new)
    assert "backends[b].weight" in changed and "proxy.listen" in changed and "users[two].password" in changed
    assert [k for k in changed if diff.restart_only(k)] == ["proxy.listen"]
    run = diff.effective(old, new)
    assert run.proxy.listen == "127.0.0.1:7000" and run.backends[1].weight == 5 and run.user("two") is not None
    assert diff.changes(old, parse_config(BASE)) == []
    # for people: a new entry is one line, not one per field (rwproxy reload printed ten for a user)
    assert diff.summary(old, new) == ["changed: backends[b].weight", "changed: proxy.listen", "added: users[two]"]
    assert diff.summary(new, old)[-1] == "removed: users[two]"


# ---- the recorder -------------------------------------------------------------------------------------

def _session(user="app", db="app"):
    return SimpleNamespace(user=SimpleNamespace(name=user), db=db, sent_at=0.0, done_at=0.0, stat_rows={},
                           stat_table=None, stat_db=None)


def _cmd(digest, route=C.READ):
    return SimpleNamespace(cls=SimpleNamespace(route=route, digest=digest), packet=b"\x03" + digest.encode())


def test_recorder_counts_per_digest_and_server():
    r = Recorder(max_digests=100)
    s = _session()
    for i in range(5):
        s.sent_at = time.monotonic() - 0.002
        r.record(s, _cmd("SELECT ? FROM t"), "node2", error=(i == 4), rows=3, nbytes=100)
    s.sent_at = time.monotonic()
    r.record(s, _cmd("INSERT INTO t VALUES (?)", C.WRITE), "node1", error=False, rows=0, nbytes=11)
    r.lost(s, _cmd("SELECT ? FROM t"), "node2")
    rows = {row[1]: row for row in r.digest_rows()}
    sel = rows["SELECT ? FROM t"]
    assert sel[2:6] == ("app", "app", "read", 5) and sel[9] == 1 and sel[10] == 15  # errors, rows sent
    assert 0.002 <= sel[7] <= sel[8]  # min <= max, both at least the 2 ms
    summary = r.summary()
    assert summary["servers"]["node2"]["ok"][C.READ] == 4 and summary["servers"]["node2"]["err"][C.READ] == 1
    assert summary["servers"]["node2"]["lost"][C.READ] == 1 and summary["servers"]["node1"]["ok"][C.WRITE] == 1
    assert summary["servers"]["node2"]["bytes_in"] == 500
    buckets, total = summary["hist"]["read"]
    assert len(buckets) == NB and sum(buckets) == 5 and abs(total - sel[6]) < 1e-9  # sum = the digest's total
    assert sum(summary["hist"]["write"][0]) == 1


def test_recorder_memory_is_bounded_and_evicted_figures_are_kept_in_totals():
    r = Recorder(max_digests=100)
    s = _session()
    for i in range(1000):
        s.sent_at = time.monotonic()
        r.record(s, _cmd(f"SELECT {i}"), "node2", error=False, rows=1, nbytes=1)
    assert r.ndigests <= 100 and sum(len(t) for t in r.tables.values()) == r.ndigests
    assert r.evicted == 1000 - r.ndigests
    assert r.folded[C.READ][0] + sum(row[5] for row in r.digest_rows()) == 1000  # no statement lost from the totals
    assert "SELECT 999" in {row[1] for row in r.digest_rows()}  # the most recent stay
    r.reset()
    assert r.digest_rows() == [] and r.evicted == 0
    assert r.summary()["servers"]["node2"]["ok"][C.READ] == 1000  # Prometheus counters survive RESET STATS


def test_recorder_cuts_long_digest_text():
    r = Recorder(max_digests=100, max_text=64)
    s = _session()
    for tail in ("a", "b"):
        s.sent_at = time.monotonic()
        r.record(s, _cmd("SELECT " + "x" * 100 + tail), "node2", error=False, rows=0, nbytes=0)
    (row,) = r.digest_rows()
    assert len(row[1]) == 67 and row[1].endswith("...") and row[5] == 2


def test_merge_adds_workers_and_takes_percentiles_from_buckets():
    buckets = [0] * NB
    buckets[3] = 98  # <= 1 ms
    buckets[10] = 2  # <= 250 ms
    w1 = [("id", "SELECT ?", "app", "app", "read", 60, 0.5, 0.0005, 0.2, 1, 60, 10.0, 20.0, tuple(buckets))]
    w2 = [("id", "SELECT ?", "app", "app", "read", 40, 0.3, 0.0004, 0.1, 0, 40, 5.0, 30.0, tuple([0] * NB))]
    (m,) = merge.digests([w1, None, w2])
    assert m["count"] == 100 and m["errors"] == 1 and m["rows_sent"] == 100
    assert m["first_seen"] == 5.0 and m["last_seen"] == 30.0 and m["max_ms"] == 200.0
    assert m["p50_ms"] == BOUNDS[3] * 1000
    assert percentile(buckets, 100, 0.99, 0.2) == 0.2  # capped at the max seen
    assert percentile([0] * NB, 0, 0.99, 1.0) == 0.0


# ---- secrets -----------------------------------------------------------------------------------------

def test_every_password_can_come_from_a_variable_or_a_file(tmp_path, monkeypatch):
    from proxy.config.load import ConfigError

    (tmp_path / "adm.secret").write_text("from-a-file\nsecond line ignored\n")
    monkeypatch.setenv("RWP_T_MON", "mon-pw")
    monkeypatch.setenv("RWP_T_REPL", "repl-pw")
    text = (BASE + "[monitor]\nuser = 'm'\npassword_env = 'RWP_T_MON'\n"
            "[failover]\nreplication_user = 'r'\nreplication_password_env = 'RWP_T_REPL'\n"
            "[[admin.users]]\nname = 'a'\npassword_file = 'adm.secret'\n")
    cfg = parse_config(text, "x.toml", base_dir=str(tmp_path))
    assert cfg.monitor.password == "mon-pw" and cfg.failover.replication_password == "repl-pw"
    assert cfg.admin.users[0].password == "from-a-file"
    assert "mon-pw" not in cfg.to_toml() and "from-a-file" not in cfg.to_toml()  # written back as references
    monkeypatch.delenv("RWP_T_REPL")
    with pytest.raises(ConfigError, match=r"failover.replication_password_env: environment variable RWP_T_REPL is not set"):
        parse_config(text, "x.toml", base_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="give only one of password, password_env"):
        parse_config(BASE.replace("password = 'x'", "password = 'x'\npassword_env = 'RWP_T_MON'"), "x.toml")
