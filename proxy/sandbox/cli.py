"""`rwproxy sandbox up|status|down`: argparse wiring; the top-level CLI calls register()."""

from __future__ import annotations

import argparse
import sys
import time

from proxy.sandbox.cluster import DEFAULTS, TOPOLOGIES, Cluster
from proxy.sandbox.render import admin_ports
from proxy.sandbox.util import SandboxError


def _dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default="sandbox", help="sandbox directory (default: ./sandbox)")


def register(subparsers) -> argparse.ArgumentParser:
    """Add `sandbox` to a top-level subparsers object; each leaf sets func(args) -> exit code."""
    sb = subparsers.add_parser("sandbox", help="run a local MariaDB primary-replica cluster",
                               description="A real MariaDB cluster on 127.0.0.1 for the demo, tests and benchmarks.")
    sub = sb.add_subparsers(dest="sandbox_command", metavar="{up,status,down}")
    sub.required = True

    up = sub.add_parser("up", help="create (or restart) the cluster and write DIR/rwproxy.toml")
    _dir_arg(up)
    # None means "as created" for an existing sandbox, else the documented default
    up.add_argument("--replicas", type=int, default=None,
                    help=f"number of replicas besides the master(s) (default {DEFAULTS['replicas']})")
    up.add_argument("--topology", choices=TOPOLOGIES, default=None,
                    help=f"default {DEFAULTS['topology']}")
    up.add_argument("--base-port", type=int, default=None,
                    help=f"port of node1; the others follow (default {DEFAULTS['base_port']})")
    up.add_argument("--semi-sync", action="store_true", default=None,
                    help="enable semi-synchronous replication")
    up.add_argument("--tls", action="store_true", default=None,
                    help="servers accept TLS (a CA and certificates made in DIR/tls); the proxy config uses it")
    up.add_argument("--server-option", action="append", default=None, metavar="NAME[=VALUE]",
                    help="an extra [mariadbd] line for every node, e.g. thread_handling=pool-of-threads "
                         "(repeatable; kept for later ups; change it only while the sandbox is down)")
    up.add_argument("--proxy-port", type=int, default=None,
                    help=f"listen port written to rwproxy.toml (default {DEFAULTS['proxy_port']})")
    up.add_argument("--proxies", type=int, default=0, metavar="N",
                    help="also start N rwproxy instances of one coordinated cluster behind HAProxy on the proxy "
                         "port (needs --etcd; docs/coordination.md)")
    up.add_argument("--etcd", type=int, default=0, metavar="M",
                    help="with --proxies: the size of the etcd cluster started for them (3 recommended)")
    up.add_argument("--mariadbd", default=None, help="path of the mariadbd binary (default: search PATH, /usr/sbin)")
    up.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each step (default 60)")
    up.set_defaults(func=cmd_up)

    st = sub.add_parser("status", help="show nodes, roles, replication and lag")
    _dir_arg(st)
    st.set_defaults(func=cmd_status)

    dn = sub.add_parser("down", help="stop every node of the sandbox (data is kept)")
    _dir_arg(dn)
    dn.set_defaults(func=cmd_down)

    ar = sub.add_parser("add-replica", help="a new replica seeded from a backup, replicating from its GTID position")
    _dir_arg(ar)
    ar.add_argument("--from-backup", required=True, metavar="ID", help="backup id (`rwproxy backup list`)")
    ar.add_argument("--config", help="config with the [backup] section (default: DIR/rwproxy.toml)")
    ar.set_defaults(func=cmd_add_replica)
    return sb


def _run(fn, args) -> int:
    """SandboxError is the user's problem, not ours: one clear message, exit 1, no traceback."""
    try:
        return fn(args)
    except SandboxError as e:
        print(f"rwproxy sandbox: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a directory that cannot be made or written, a full disk...
        where = f": {e.filename}" if e.filename else f" (writing under {args.dir})" if getattr(args, "dir", None) else ""
        print(f"rwproxy sandbox: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rwproxy sandbox: interrupted", file=sys.stderr)
        return 130


def cmd_up(args) -> int:
    def go(args) -> int:
        t0 = time.monotonic()
        cluster = Cluster(args.dir, replicas=args.replicas, topology=args.topology, base_port=args.base_port,
                          semi_sync=args.semi_sync, proxy_port=args.proxy_port, mariadbd=args.mariadbd,
                          tls=args.tls, server_options=args.server_option)
        existed = cluster.bootstrapped
        cluster.up(timeout=args.timeout)
        if not existed:
            was = "created"
        elif cluster.last_started:
            was = f"restarted ({', '.join(cluster.last_started)})"
        else:
            was = "already running, checked"
        fleet = None
        if args.proxies:
            from proxy.sandbox import fleet as fleets

            if args.etcd < 1:
                raise SandboxError("--proxies needs --etcd M (the etcd members to start; 3 is the usual)")
            fleet = fleets.up(cluster, args.proxies, args.etcd, timeout=args.timeout)
        print(cluster.status_table())
        print(f"\nsandbox {was} in {time.monotonic() - t0:.1f}s ({cluster.topology}) in {cluster.dir}")
        print(f"proxy config: {cluster.config_path}")
        print(f"admin shell:  mariadb --defaults-file={cluster.primary.cnf}")
        if fleet:
            if fleet["revived"]:
                print(f"fleet: started again {', '.join(fleet['revived'])}; the rest was running")
            print(f"etcd: {', '.join(fleet['etcd'])}")
            for p in fleet["proxies"]:
                print(f"{p['name']}: 127.0.0.1:{p['port']} (pid {p['pid']}, metrics :{p['metrics']}, "
                      f"config {p['config']})")
            print(f"HAProxy in front of them: mariadb -h127.0.0.1 -P{fleet['front']} -uapp -papp app   "
                  f"(which instance leads: rwproxy status -c {fleet['proxies'][0]['config']})")
            return 0
        admin_port, metrics_port = admin_ports(cluster.proxy_port)
        if admin_port:
            print(f"rwproxy admin port (once rwproxy runs): mariadb -h127.0.0.1 -P{admin_port} -uadmin "
                  f"-p'{cluster.admin_password}'")
            print(f"metrics: http://127.0.0.1:{metrics_port}/metrics   (plain HTTP without a password, as "
                  f"Prometheus scrapes; on loopback)")
        return 0
    return _run(go, args)


def cmd_status(args) -> int:
    def go(args) -> int:
        cluster = Cluster(args.dir)
        rows = cluster.status()
        from proxy.sandbox.render import status_table
        print(status_table(rows, cluster.semi_sync))
        return 0 if all(r["state"] == "up" for r in rows) else 3
    return _run(go, args)


def cmd_down(args) -> int:
    def go(args) -> int:
        from proxy.sandbox import fleet as fleets

        cluster = Cluster(args.dir)
        stopped = fleets.down(cluster.dir) + cluster.down()
        print(f"stopped: {', '.join(stopped)}" if stopped else "no node was running")
        return 0
    return _run(go, args)


def cmd_add_replica(args) -> int:
    def go(args) -> int:
        from proxy.backup.context import BackupContext
        from proxy.backup.manifest import load_all
        from proxy.backup.restore import restore
        from proxy.backup.servers import BackupError
        from proxy.config.load import ConfigError, load_config

        cluster = Cluster(args.dir)
        try:
            ctx = BackupContext(load_config(args.config or str(cluster.config_path)))
            m = next((m for m in load_all(ctx.repo) if m.id == args.from_backup), None)
            if m is None:
                raise SandboxError(f"no backup {args.from_backup} in {ctx.repo.url}")
            if not m.gtid:
                raise SandboxError(f"backup {m.id} has no GTID position to start replication from")
            node = cluster.add_replica(lambda datadir: restore(ctx.repo, ctx.keys, str(datadir), bid=m.id,
                                                               log_step=print), m.gtid)
        except (BackupError, ConfigError) as e:
            raise SandboxError(str(e)) from None
        print(f"{node.name} on port {node.port}: seeded from {m.id}, replicating from GTID {m.gtid}; "
              f"{cluster.config_path} lists it (reload a running proxy: rwproxy reload -c {cluster.config_path})")
        return 0
    return _run(go, args)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (python -m proxy.sandbox) until the top-level CLI wires register() in."""
    parser = argparse.ArgumentParser(prog="rwproxy")
    subparsers = parser.add_subparsers(dest="command", metavar="{sandbox}")
    subparsers.required = True
    register(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
