"""Batch inserts with MariaDB Connector/Python's executemany, straight to the primary and through
rwproxy, in alternating rounds: rows per second, and the COM_STMT_EXECUTE commands the primary
counted per batch (one COM_STMT_BULK_EXECUTE carries the whole batch; without array binding
the connector sends one execute per row).

    rwproxy sandbox up && rwproxy serve --config sandbox/rwproxy.toml &
    python -m benchmarks.bulk_insert --target direct=3307 --target rwproxy=6033

Each --target is LABEL=PORT (an older rwproxy on another port compares with the one before).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _executes(conn) -> int:
    cur = conn.cursor()
    cur.execute("SHOW GLOBAL STATUS LIKE 'Com_stmt_execute'")
    n = int(cur.fetchone()[1])
    cur.close()
    return n


def run(args) -> dict:
    import mariadb  # MariaDB Connector/Python (a test dependency)

    targets = [t.split("=", 1) for t in args.target]
    status = mariadb.connect(host="127.0.0.1", port=args.primary, user=args.user, password=args.password,
                             autocommit=True)
    rows = [(i, f"row {i}", i / 7) for i in range(args.rows)]
    out: dict[str, dict[str, list]] = {label: {"rps": [], "executes": []} for label, _ in targets}
    for rnd in range(args.rounds):
        order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
        for label, port in order:
            c = mariadb.connect(host="127.0.0.1", port=int(port), user=args.user, password=args.password,
                                database=args.db, autocommit=True)
            cur = c.cursor()
            cur.execute(f"CREATE OR REPLACE TABLE `bulk_bench_{label}` (id INT PRIMARY KEY, s VARCHAR(40), d DOUBLE)")
            before, t0 = _executes(status), time.perf_counter()
            cur.executemany(f"INSERT INTO `bulk_bench_{label}` VALUES (?, ?, ?)", rows)
            dt = time.perf_counter() - t0
            out[label]["executes"].append(_executes(status) - before)
            out[label]["rps"].append(args.rows / dt)
            cur.execute(f"DROP TABLE `bulk_bench_{label}`")
            c.close()
            print(f"round {rnd + 1}/{args.rounds} {label}: {args.rows / dt:,.0f} rows/s, "
                  f"{out[label]['executes'][-1]} executes", file=sys.stderr)
    status.close()
    return {label: {"rps": statistics.median(v["rps"]), "executes": statistics.median(v["executes"])}
            for label, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", action="append", required=True, help="LABEL=PORT, the first one is the reference")
    ap.add_argument("--primary", type=int, required=True, help="the primary's port (its statement counters)")
    ap.add_argument("--user", default="app")
    ap.add_argument("--password", default="app")
    ap.add_argument("--db", default="app")
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="", help="write the table to benchmarks/results/<this>.md")
    args = ap.parse_args()
    r = run(args)
    ref = next(iter(r.values()))["rps"]
    lines = [f"# executemany of {args.rows:,} rows (MariaDB Connector/Python), {date.today()}", "",
             f"Median of {args.rounds} alternating rounds; one connection; rows of (INT, VARCHAR, DOUBLE).", "",
             "| target | rows per second | ratio | COM_STMT_EXECUTE on the primary per batch |",
             "|---|---:|---:|---:|"]
    for label, v in r.items():
        lines.append(f"| {label} | {v['rps']:,.0f} | {v['rps'] / ref:.2f} | {v['executes']:,.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        (RESULTS / f"{args.out}.md").write_text(text)


if __name__ == "__main__":
    main()
