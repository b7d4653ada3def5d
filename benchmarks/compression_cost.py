"""What the compressed client protocol costs rwproxy: CPU per result and bytes on the wire.

Runs the same 1,000-row query (about 62 KB of packets) over one connection with and without
CLIENT_COMPRESS, in alternating rounds, and reads the CPU of every rwproxy process of the
instance (supervisor and workers, /proc) around each run.

    rwproxy sandbox up && rwproxy serve --config sandbox/rwproxy.toml &
    python -m benchmarks.compression_cost --port 6033 --user app --password app --pid <rwproxy pid>
"""

from __future__ import annotations

import argparse
import statistics
import sys

from proxy.runtime.launcher import process_and_children, process_cpu_seconds
from proxy.testing.rawclient import RawClient

SQL = b"\x03SELECT seq, CONCAT('row-', seq, '-', REPEAT('abcdefgh', 5)), seq * 7 FROM seq_1_to_1000"


def run(args) -> dict:
    pids = process_and_children(args.pid)
    cpu = {False: [], True: []}
    wire = {}
    for rnd in range(args.rounds):
        for compress in (False, True):
            c = RawClient("127.0.0.1", args.port, user=args.user, password=args.password, db=args.db, compress=compress)
            c.send(SQL, 0)
            c.read_until_eof()
            before = sum(map(process_cpu_seconds, pids))
            for _ in range(args.queries):
                c.frames.clear()
                c.send(SQL, 0)
                c.read_until_eof()
            cpu[compress].append(1e6 * (sum(map(process_cpu_seconds, pids)) - before) / args.queries)
            if compress:
                wire = {"plain": sum(len(f[3]) for f in c.frames), "compressed": sum(f[1] + 7 for f in c.frames)}
            c.close()
            print(f"round {rnd + 1}/{args.rounds} compress={compress}: {cpu[compress][-1]:.0f} us CPU per result",
                  file=sys.stderr)
    return {"plain_us": statistics.median(cpu[False]), "compressed_us": statistics.median(cpu[True]), **wire}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=6033)
    ap.add_argument("--user", default="app")
    ap.add_argument("--password", default="app")
    ap.add_argument("--db", default="app", help="a database the user may use (the sandbox's app)")
    ap.add_argument("--pid", type=int, required=True, help="pid of the `rwproxy serve` process")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--queries", type=int, default=300)
    r = run(ap.parse_args())
    print(f"| 1,000-row result | rwproxy CPU per result | bytes to the client |\n|---|---:|---:|\n"
          f"| uncompressed | {r['plain_us']:.0f} µs | {r['plain']:,} |\n"
          f"| compressed (zlib level 1) | {r['compressed_us']:.0f} µs | {r['compressed']:,} |")


if __name__ == "__main__":
    main()
