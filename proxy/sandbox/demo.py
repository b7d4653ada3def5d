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

    from proxy.runtime.launcher import ProxyProcess
    from proxy.sandbox import Cluster, SandboxError

    try:
        existing = os.path.isfile(os.path.join(args.dir, "sandbox.json"))
        # An existing sandbox keeps its own shape; --replicas applies to a new one.
        cluster = Cluster(args.dir, replicas=None if existing else args.replicas, proxy_port=args.port)
        print(f"Starting the sandbox cluster in {cluster.dir} ...")
        cluster.up()
    except (SandboxError, OSError) as e:  # (OSError: a directory that cannot be made or written)
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
    """A few statements that show where rwproxy sends what (`SELECT @@port` tells who answered)."""
    by_port = {n.port: n.name for n in cluster.nodes}
    conn = pymysql.connect(host="127.0.0.1", port=port, user="app", password="app", database="app", autocommit=True)
    print("\nA short tour through rwproxy (127.0.0.1:%d):" % port)

    def run(sql, note=""):
        with conn.cursor() as cur:
            cur.execute(sql)
            rows = cur.fetchall() if cur.description else None
        print(f"  mysql> {sql}")
        if rows is None:
            print(f"         OK, {cur.rowcount} row(s) affected{note}")
        for row in rows or ():
            answered = f"   <- answered by {by_port[row[0]]}" if row and row[0] in by_port else ""
            print("         " + " | ".join(str(v) for v in row) + answered + note)

    run("CREATE TABLE IF NOT EXISTS demo (id INT AUTO_INCREMENT PRIMARY KEY, note VARCHAR(100), at DATETIME(6))")
    run("INSERT INTO demo (note, at) VALUES ('hello through rwproxy', NOW(6))")
    run("SELECT @@port, COUNT(*) FROM demo", "   (right after this session's write: the primary)")
    time.sleep(1.2)  # past the read-your-writes window
    for _ in range(3):
        run("SELECT @@port, COUNT(*) FROM demo")
    run("BEGIN")
    run("SELECT @@port, COUNT(*) FROM demo", "   (inside a transaction: the primary)")
    run("COMMIT")
    conn.close()
    time.sleep(0.6)  # the workers publish their counters twice a second
    from proxy.config.load import load_config
    from proxy.runtime.control import request
    from proxy.runtime.rundir import control_socket
    from proxy.observe.statustext import format_status

    try:
        print("\n$ rwproxy status --config " + str(cluster.config_path))
        print(format_status(request(control_socket(load_config(str(cluster.config_path))), "status", timeout=10)))
    except OSError as e:
        print(f"(status unavailable: {e})")
    _admin_tour(pymysql, cluster)


def _admin_tour(pymysql, cluster) -> None:
    """The admin port and the health check the sandbox config turned on."""
    import urllib.request

    from proxy.sandbox.render import admin_ports

    admin_port, metrics_port = admin_ports(cluster.proxy_port)
    if not admin_port:
        return
    sql = "SELECT digest_text, count, ROUND(p99_ms, 2) AS p99_ms FROM digests ORDER BY total_ms DESC LIMIT 3"
    print(f"\n$ mariadb -h127.0.0.1 -P{admin_port} -uadmin -p... -e \"{sql}\"   (the admin port)")
    try:
        conn = pymysql.connect(host="127.0.0.1", port=admin_port, user="admin", password=cluster.admin_password)
        with conn.cursor() as cur:
            cur.execute(sql)
            for row in cur.fetchall():
                print("  " + " | ".join(str(v) for v in row))
        conn.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/health/ready", timeout=5) as r:
            print(f"\n$ curl http://127.0.0.1:{metrics_port}/health/ready\n  {r.read().decode().strip()}")
    except (OSError, pymysql.MySQLError) as e:
        print(f"(admin port unavailable: {e})")
