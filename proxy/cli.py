"""The `rwproxy` command: serve, check-config, status and the operator commands, sandbox, demo, backup."""

from __future__ import annotations

import argparse
import sys

from proxy import __version__


def _serve(args) -> int:
    from proxy.config.load import ConfigError, load_config
    from proxy.logs import setup_logging
    from proxy.runtime.supervisor import StartupError, serve

    setup_logging(args.log_level)
    try:
        config = load_config(args.config)
        return serve(config)
    except (ConfigError, StartupError) as e:
        print(f"rwproxy: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def _check_config(args) -> int:
    from proxy.config.load import check_config_main

    if bool(args.file) == bool(args.config_opt):
        print("rwproxy check-config: name one config file: rwproxy check-config FILE (or --config FILE)",
              file=sys.stderr)
        return 2
    return check_config_main(args.file or args.config_opt)


def _control(args, cmd: str, **extra) -> dict | None:
    """Send a command to the running proxy for this config; None (and a message) if not running,
    or if what answers is another instance (started with another config)."""
    import os

    from proxy.config.load import ConfigError, load_config
    from proxy.runtime.control import request
    from proxy.runtime.rundir import control_socket, find_control_socket

    try:
        path = control_socket(load_config(args.config))
    except ConfigError as e:
        # reload: the running proxy reads the file itself, refuses it, logs and counts that
        path = find_control_socket(args.config) if cmd == "reload" else None
        if path is None:
            print(f"rwproxy: {e}", file=sys.stderr)
            return None
    try:
        hello = request(path, "hello", timeout=10)
        mine = os.path.realpath(args.config)
        if hello.get("config") != mine:
            print(f"rwproxy: the proxy answering at {path} (pid {hello.get('pid')}) was started with "
                  f"{hello.get('config')}, not {mine}; give each instance its own listen address or "
                  f"[proxy] runtime_dir", file=sys.stderr)
            return None
        return request(path, cmd, **extra)
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"rwproxy: no proxy is running for {args.config} (no control socket at {path}); "
              f"start it with: rwproxy serve --config {args.config}", file=sys.stderr)
    except OSError as e:
        print(f"rwproxy: cannot talk to the proxy at {path}: {e}", file=sys.stderr)
    return None


def _status(args) -> int:
    import json

    from proxy.observe.tables import NAMES
    from proxy.observe.statustext import format_status

    st = _control(args, "status", timeout=15)
    if st is None:
        return 1
    names = NAMES if args.all else [n.strip() for n in (args.tables or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        print(f"rwproxy: unknown table(s) {', '.join(unknown)}; the tables are: {', '.join(NAMES)}", file=sys.stderr)
        return 2
    if names:
        got = _control(args, "tables", timeout=30, names=names)
        if got is None:
            return 1
        st["tables"] = got.get("tables", {})
    if args.json:
        print(json.dumps(st, indent=2, default=str))
    else:
        print(format_status(st))
        for name, rows in st.get("tables", {}).items():
            print(f"\n{name} ({len(rows)} row(s)):")
            for r in rows:
                print("  " + ", ".join(f"{k}={v}" for k, v in r.items()))
    return 0


def _reload(args) -> int:
    r = _control(args, "reload", timeout=60)
    if r is None:
        return 1
    print(r.get("message") or r)
    later = r.get("restart_required", [])
    for line in r.get("summary") or [f"changed: {k}" for k in r.get("changed", [])]:
        key = line.split(": ", 1)[1]
        print(f"  {line}" + ("  (needs a restart; the old value runs)" if key in later else ""))
    return 0 if r.get("ok") else 1


def _said(r) -> int:
    """Print a control-plane answer's message; the exit status says whether it worked."""
    if r is None:
        return 1
    print(r.get("message") or r)
    return 0 if r.get("ok") else 1


def _server_state(args) -> int:
    return _said(_control(args, "server-state", timeout=30, server=args.server, state=args.state))


def _kill(args) -> int:
    return _said(_control(args, "kill", timeout=30, id=args.id, query_only=args.query))


def _switchover(args) -> int:
    print(f"switchover to {args.to} ...", flush=True)
    r = _control(args, "switchover", timeout=(args.timeout or 30) + 30, to=args.to, **({"timeout": args.timeout} if args.timeout else {}))
    if r is None:
        return 1
    print(r.get("message") or r)
    if r.get("ran_on"):
        print(f"(run by {r['ran_on']}, the instance that leads the cluster)")
    if r.get("ok"):
        print(f"new primary {r.get('new')}, old primary {r.get('old')} now replicates from it; "
              f"writes paused {r.get('write_pause_ms')} ms")
    return 0 if r.get("ok") else 1


def _simple(cmd):
    def run(args) -> int:
        extra = {"server": args.server} if getattr(args, "server", None) else {}
        return _said(_control(args, cmd, timeout=30, **extra))
    return run


def _demo(args) -> int:
    from proxy.sandbox.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rwproxy",
        description="A MySQL-protocol read/write-splitting proxy for MariaDB/MySQL replication clusters.",
    )
    p.add_argument("--version", action="version", version=f"rwproxy {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("serve", help="run the proxy")
    s.add_argument("--config", "-c", required=True, help="path to the TOML config file")
    s.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    s.set_defaults(func=_serve)

    c = sub.add_parser("check-config", help="validate a config file and report every mistake")
    c.add_argument("file", nargs="?", help="the config file (or --config, as the other commands take it)")
    c.add_argument("--config", "-c", dest="config_opt", metavar="CONFIG", help="the config file")
    c.set_defaults(func=_check_config)

    st = sub.add_parser("status", help="show the running proxy's view of the cluster")
    st.add_argument("--config", "-c", required=True, help="the config the proxy was started with")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--tables", help="also these admin tables, comma-separated (servers, digests, pools, sessions, "
                    "rules, users, config, events, status)")
    st.add_argument("--all", action="store_true", help="also every admin table")
    st.set_defaults(func=_status)

    rl = sub.add_parser("reload", help="re-read the config file and apply what changed (as SIGHUP does)")
    rl.add_argument("--config", "-c", required=True)
    rl.set_defaults(func=_reload)

    dr = sub.add_parser("drain", help="stop gracefully: not ready, stop accepting, end sessions after their "
                        "transactions, exit (as SIGTERM does)")
    dr.add_argument("--config", "-c", required=True)
    dr.set_defaults(func=_simple("drain"))

    sv = sub.add_parser("server", help="take a server out (offline: drain it; maintenance: at once) or back online")
    sv.add_argument("server", help="backend name (or host:port)")
    sv.add_argument("state", choices=["offline", "online", "maintenance"])
    sv.add_argument("--config", "-c", required=True)
    sv.set_defaults(func=_server_state)

    kl = sub.add_parser("kill", help="end a client session (its id is in the sessions table)")
    kl.add_argument("id", type=int)
    kl.add_argument("--query", action="store_true", help="only its running statement")
    kl.add_argument("--config", "-c", required=True)
    kl.set_defaults(func=_kill)

    rs = sub.add_parser("reset-stats", help="clear the digests and rule hit counts")
    rs.add_argument("--config", "-c", required=True)
    rs.set_defaults(func=_simple("reset-stats"))

    sw = sub.add_parser("switchover", help="planned switchover: make another server the primary")
    sw.add_argument("--config", "-c", required=True)
    sw.add_argument("--to", required=True, help="target server: HOST:PORT or its backend name")
    sw.add_argument("--timeout", type=float, default=None, help="seconds (default: failover.switchover_timeout)")
    sw.set_defaults(func=_switchover)

    ef = sub.add_parser("enable-failover", help="re-enable automatic failover after a failed one disabled it")
    ef.add_argument("--config", "-c", required=True)
    ef.set_defaults(func=_simple("enable-failover"))

    rj = sub.add_parser("rejoin", help="retry fencing/rejoining a server kept out of the cluster")
    rj.add_argument("server", help="backend name")
    rj.add_argument("--config", "-c", required=True)
    rj.set_defaults(func=_simple("rejoin"))

    d = sub.add_parser("demo", help="start a local sandbox cluster and rwproxy in front of it")
    d.add_argument("--dir", default="sandbox", help="sandbox directory (default ./sandbox)")
    d.add_argument("--replicas", type=int, default=2)
    d.add_argument("--port", type=int, default=6033, help="proxy port (default 6033)")
    d.add_argument("--exit", action="store_true", help="run the scripted tour and stop instead of serving until Ctrl-C")
    d.set_defaults(func=_demo)

    from proxy.backup.cli import register as register_backup
    from proxy.sandbox.cli import register

    register(sub)
    register_backup(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # `rwproxy status | head`: the reader left; exit quietly, as a Unix tool does on SIGPIPE
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # (so Python's own flush at exit does not complain)
        return 141
