"""`rwproxy demo`: a sandbox cluster, rwproxy in front of it, and a short guided tour.

It is what the README's first command runs: everything local, nothing to
configure. The sandbox is left running afterwards so the user can keep
playing with it (`rwproxy sandbox down --dir DIR` stops it).
"""

from __future__ import annotations

import os
import time


def run_demo(args) -> int:
    import pymysql

    from .launcher import ProxyProcess
    from .sandbox import Cluster, SandboxError

    try:
        existing = os.path.isfile(os.path.join(args.dir, "sandbox.json"))
        # An existing sandbox keeps its own shape; --replicas applies to a new one.
        cluster = Cluster(args.dir, replicas=None if existing else args.replicas, proxy_port=args.port)
        print(f"Starting the sandbox cluster in {cluster.dir} ...")
        cluster.up()
    except SandboxError as e:
        print(f"rwproxy demo: {e}")
        return 1
    print(cluster.status_table())
    print(f"\nStarting rwproxy: rwproxy serve --config {cluster.config_path}")
    proxy = ProxyProcess(str(cluster.config_path), "127.0.0.1", args.port, log_path=str(cluster.dir / "rwproxy.log"))
    try:
        proxy.start()
    except RuntimeError as e:
        print(f"rwproxy demo: {e}")
        return 1
    try:
        _tour(pymysql, args.port, cluster)
        if args.exit:
            print(f"\nDone (--exit): rwproxy stopped; the cluster keeps running. Stop it with: rwproxy sandbox down --dir {cluster.dir}")
            return 0
        print(
            f"\nrwproxy is serving on 127.0.0.1:{args.port} (log: {proxy.log_path}). Try:\n"
            f"  mariadb -h127.0.0.1 -P{args.port} -uapp -papp app\n"
            f"Stop the cluster later with: rwproxy sandbox down --dir {cluster.dir}"
        )
        print("Press Ctrl-C to stop rwproxy.")
        try:
            while proxy.proc.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            print()
        return 0
    finally:
        proxy.stop()


def _tour(pymysql, port: int, cluster) -> None:
    by_port = {n.port: n.name for n in cluster.nodes}
    conn = pymysql.connect(host="127.0.0.1", port=port, user="app", password="app", database="app", autocommit=True)
    steps = [
        ("CREATE TABLE IF NOT EXISTS demo (id INT AUTO_INCREMENT PRIMARY KEY, note VARCHAR(100), at DATETIME(6))", None),
        ("INSERT INTO demo (note, at) VALUES ('hello through rwproxy', NOW(6))", None),
        ("SELECT id, note, at FROM demo ORDER BY id DESC LIMIT 3", None),
        ("SELECT @@port AS answered_by_port, @@read_only AS read_only", "where"),
    ]
    print("\nA short tour through rwproxy (127.0.0.1:%d):" % port)
    with conn.cursor() as cur:
        for sql, kind in steps:
            cur.execute(sql)
            print(f"  mysql> {sql}")
            if cur.description:
                for row in cur.fetchall():
                    print("         " + " | ".join(str(v) for v in row))
                    if kind == "where":
                        print(f"         (answered by {by_port.get(row[0], '?')})")
            else:
                print(f"         OK, {cur.rowcount} row(s) affected")
    conn.close()
