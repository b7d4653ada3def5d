"""Micro-benchmark of proxy.classify (statement classification on the proxy's hot path).

Reports:
- cached classification cost (µs per statement, key computation included) for the sysbench
  statements, each call on a fresh bytes object with different literals, as a proxy sees them;
- miss cost (the full path: digest, lexing, rules, sqlglot parse) with sqlglotc and, in a
  subprocess where the compiled modules are hidden by a sys.meta_path finder, without it;
- the digest-cache hit ratio over an oltp_read_write statement mix generated the way sysbench
  sends it with --db-ps-mode=disable (literals inlined, table picked per statement);
- the cost of big statements (cheap scan) and of a big IN-list SELECT miss.

Usage: python benchmarks/classify_micro.py [--quick] [--out benchmarks/results]
The machine is shared and noisy: every figure is the median of several repeats.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


class _PurePython(importlib.abc.MetaPathFinder):
    """Loads sqlglot's .py sources instead of the sqlglotc extension modules overlaid on them."""

    def find_spec(self, name, path, target=None):
        if name != "sqlglot" and not name.startswith("sqlglot."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or not (spec.origin or "").endswith(".so"):
            return spec
        py = os.path.join(os.path.dirname(spec.origin), name.rsplit(".", 1)[-1] + ".py")
        return importlib.util.spec_from_file_location(name, py)


if "--pure" in sys.argv:
    sys.meta_path.insert(0, _PurePython())
sys.path.insert(0, ROOT)

import sqlglot  # noqa: E402
import sqlglot.tokens  # noqa: E402

from proxy.routing.classify import Classifier  # noqa: E402
from proxy.routing.classify.query import QueryParser  # noqa: E402

# ---------------------------------------------------------------- sysbench-like statements


def _sb_str(rnd: random.Random, groups: int) -> str:
    return "-".join("".join(rnd.choice("0123456789") for _ in range(11)) for _ in range(groups))


def sysbench_stmt(kind: str, rnd: random.Random, tables: int, size: int = 100000) -> bytes:
    t = rnd.randint(1, tables)
    i = rnd.randint(1, size)
    if kind == "point":
        s = f"SELECT c FROM sbtest{t} WHERE id={i}"
    elif kind == "range":
        s = f"SELECT c FROM sbtest{t} WHERE id BETWEEN {i} AND {i + 99}"
    elif kind == "sum":
        s = f"SELECT SUM(k) FROM sbtest{t} WHERE id BETWEEN {i} AND {i + 99}"
    elif kind == "order":
        s = f"SELECT c FROM sbtest{t} WHERE id BETWEEN {i} AND {i + 99} ORDER BY c"
    elif kind == "distinct":
        s = f"SELECT DISTINCT c FROM sbtest{t} WHERE id BETWEEN {i} AND {i + 99} ORDER BY c"
    elif kind == "index_update":
        s = f"UPDATE sbtest{t} SET k=k+1 WHERE id={i}"
    elif kind == "non_index_update":
        s = f"UPDATE sbtest{t} SET c='{_sb_str(rnd, 10)}' WHERE id={i}"
    elif kind == "delete":
        s = f"DELETE FROM sbtest{t} WHERE id={i}"
    elif kind == "insert":
        s = (f"INSERT INTO sbtest{t} (id, k, c, pad) VALUES "
             f"({i}, {rnd.randint(1, size)}, '{_sb_str(rnd, 10)}', '{_sb_str(rnd, 5)}')")
    elif kind == "begin":
        s = "BEGIN"
    elif kind == "commit":
        s = "COMMIT"
    else:
        raise ValueError(kind)
    return s.encode()


KINDS = ["point", "range", "sum", "order", "distinct", "index_update", "non_index_update",
         "delete", "insert", "begin", "commit"]
OLTP_RW = (["begin"] + ["point"] * 10 + ["range", "sum", "order", "distinct", "index_update",
                                         "non_index_update", "delete", "insert", "commit"])


def _median_us(fn, repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


def bench_cached(quick: bool) -> dict:
    n, repeats = (2000, 5) if quick else (20000, 9)
    rnd = random.Random(1)
    out = {}
    for kind in KINDS:
        c = Classifier()
        stmts = [sysbench_stmt(kind, rnd, 1) for _ in range(n)]
        for s in stmts[:10]:
            c.classify(s)

        def run() -> float:
            batch = [bytes(s) for s in stmts]  # fresh objects: no cached hashes
            t0 = time.perf_counter()
            for s in batch:
                c.classify(s)
            return (time.perf_counter() - t0) / len(batch) * 1e6
        out[kind] = round(_median_us(run, repeats), 2)
        assert c.cache_info()["misses"] <= 1
    return out


MISS_EXTRA = {
    "multi_join": (b"SELECT o.id, c.name, SUM(l.qty * l.price) AS total FROM orders o "
                   b"JOIN customers c ON c.id = o.customer_id JOIN lines l ON l.order_id = o.id "
                   b"WHERE o.created > '2024-01-01' AND c.country IN ('NL', 'BE', 'DE') "
                   b"GROUP BY o.id, c.name HAVING total > 100 ORDER BY total DESC LIMIT 50"),
    "set_autocommit": b"SET autocommit = 0",
    "show": b"SHOW TABLES LIKE 'sb%'",
}


def bench_miss(quick: bool) -> dict:
    repeats = 5 if quick else 15
    rnd = random.Random(2)
    c = Classifier()
    qp = QueryParser()
    out = {}
    stmts = {k: sysbench_stmt(k, rnd, 1) for k in KINDS} | MISS_EXTRA
    for kind, s in stmts.items():
        c.full_classify(s)

        def run(s=s) -> float:
            t0 = time.perf_counter()
            for _ in range(20):
                c.full_classify(s)
            return (time.perf_counter() - t0) / 20 * 1e6

        def parse(s=s) -> float:
            text = s.decode()
            t0 = time.perf_counter()
            for _ in range(20):
                qp.parse(text)
            return (time.perf_counter() - t0) / 20 * 1e6
        out[kind] = {"full_path_us": round(_median_us(run, repeats), 1),
                     "sqlglot_parse_us": round(_median_us(parse, repeats), 1)}
    return out


def bench_hit_ratio(quick: bool, tables: int) -> dict:
    txns = 2000 if quick else 20000
    rnd = random.Random(3)
    c = Classifier()
    stmts = [sysbench_stmt(k, rnd, tables) for _ in range(txns) for k in OLTP_RW]
    t0 = time.perf_counter()
    for s in stmts:
        c.classify(s)
    elapsed = time.perf_counter() - t0
    info = c.cache_info()
    return {"tables": tables, "transactions": txns, "statements": len(stmts),
            "hits": info["hits"], "misses": info["misses"], "parses": info["parses"],
            "hit_ratio": round(info["hit_ratio"], 5),
            "mean_us_per_statement_incl_misses": round(elapsed / len(stmts) * 1e6, 2)}


def bench_big() -> dict:
    c = Classifier()
    out = {}
    rows = b",".join(b"(%d, 'user%d@example.com', 'x''y')" % (i, i) for i in range(25000))
    cases = {
        "insert_1MB_cheap_scan_ms": b"INSERT INTO t VALUES " + rows,
        "insert_20KB_cheap_scan_ms": b"INSERT INTO t VALUES " + rows[:20000].rsplit(b",(", 1)[0],
        "select_in_3000_ids_miss_ms": (b"SELECT id, name FROM users WHERE id IN ("
                                       + b",".join(b"%d" % i for i in range(100000, 103000)) + b")"),
    }
    for name, raw in cases.items():
        def run(raw=raw) -> float:
            c.cache_clear()
            t0 = time.perf_counter()
            c.classify(raw)
            return (time.perf_counter() - t0) * 1e3
        out[name] = round(_median_us(run, 5), 2)
    raw = cases["select_in_3000_ids_miss_ms"]
    c.classify(raw)

    def hit() -> float:
        t0 = time.perf_counter()
        c.classify(bytes(raw))
        return (time.perf_counter() - t0) * 1e3
    out["select_in_3000_ids_hit_ms"] = round(_median_us(hit, 9), 3)
    return out


def env() -> dict:
    return {"python": platform.python_version(), "sqlglot": sqlglot.__version__,
            "sqlglotc": bool(sqlglot.tokens.SQLGLOTC_INSTALLED), "cpus": os.cpu_count(),
            "loadavg": [round(x, 2) for x in os.getloadavg()], "machine": platform.machine()}


def pure_subprocess(quick: bool) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--pure", "--json-only"] + (["--quick"] if quick else [])
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout)


def to_markdown(r: dict) -> str:
    e, p = r["env"], r.get("pure", {})
    lines = [f"# Classifier micro-benchmark ({r['date']})", "",
             f"Python {e['python']}, sqlglot {e['sqlglot']} (sqlglotc {e['sqlglot' + 'c']}), "
             f"{e['cpus']} CPUs, load average {e['loadavg']} (shared, noisy machine: medians of repeats).",
             "", "## Cached classification (key computation + LRU lookup), µs per statement", "",
             "| statement | µs |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in r["cached_us"].items()]
    lines += ["", "## Miss cost, µs per statement (full path; sqlglot parse alone for reference)", "",
              "| statement | full path, sqlglotc | full path, pure Python | parse, sqlglotc | parse, pure |",
              "|---|---:|---:|---:|---:|"]
    for k, v in r["miss"].items():
        pv = p.get("miss", {}).get(k, {})
        lines.append(f"| {k} | {v['full_path_us']} | {pv.get('full_path_us', '-')} | "
                     f"{v['sqlglot_parse_us']} | {pv.get('sqlglot_parse_us', '-')} |")
    lines += ["", "## Digest-cache hit ratio, sysbench oltp_read_write mix (--db-ps-mode=disable)", "",
              "| tables | statements | misses | parses | hit ratio | mean µs/statement (incl. misses) |",
              "|---:|---:|---:|---:|---:|---:|"]
    for h in r["hit_ratio"]:
        lines.append(f"| {h['tables']} | {h['statements']} | {h['misses']} | {h['parses']} | "
                     f"{h['hit_ratio'] * 100:.3f}% | {h['mean_us_per_statement_incl_misses']} |")
    lines += ["", "## Big statements", "", "| case | ms |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in r["big"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pure", action="store_true", help="(internal) without sqlglotc")
    ap.add_argument("--json-only", action="store_true", help="(internal) miss figures as JSON")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    a = ap.parse_args()
    if a.json_only:
        print(json.dumps({"env": env(), "miss": bench_miss(a.quick)}))
        return
    date = datetime.date.today().isoformat()
    r = {"date": date, "env": env(), "cached_us": bench_cached(a.quick), "miss": bench_miss(a.quick),
         "hit_ratio": [bench_hit_ratio(a.quick, t) for t in (1, 4, 10)], "big": bench_big()}
    r["pure"] = pure_subprocess(a.quick)
    assert r["env"]["sqlglotc"] and not r["pure"]["env"]["sqlglotc"]
    md = to_markdown(r)
    print(md)
    if not a.quick:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"classify-{date}.md"), "w") as f:
            f.write(md)
        with open(os.path.join(a.out, f"classify-{date}.json"), "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
