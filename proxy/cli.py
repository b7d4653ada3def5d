"""The `rwproxy` command: serve, check-config, sandbox, demo."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def _serve(args) -> int:
    from .config import ConfigError, load_config
    from .server import StartupError, serve, setup_logging

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
    from .config import check_config_main

    return check_config_main(args.file)


def _control(args, cmd: str, **extra) -> dict | None:
    """Send a command to the running proxy for this config; None (and a message) if not running."""
    from .config import ConfigError, load_config
    from .control import request, socket_path

    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"rwproxy: {e}", file=sys.stderr)
        return None
    path = socket_path(config)
    try:
        return request(path, cmd, **extra)
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"rwproxy: no proxy is running for {args.config} (no control socket at {path}); "
              f"start it with: rwproxy serve --config {args.config}", file=sys.stderr)
    except OSError as e:
        print(f"rwproxy: cannot talk to the proxy at {path}: {e}", file=sys.stderr)
    return None


def _status(args) -> int:
    import json

    from .controlplane import format_status

    st = _control(args, "status", timeout=10)
    if st is None:
        return 1
    print(json.dumps(st, indent=2) if args.json else format_status(st))
    return 0


def _demo(args) -> int:
    from .demo import run_demo

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
    c.add_argument("file")
    c.set_defaults(func=_check_config)

    st = sub.add_parser("status", help="show the running proxy's view of the cluster")
    st.add_argument("--config", "-c", required=True, help="the config the proxy was started with")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=_status)

    d = sub.add_parser("demo", help="start a local sandbox cluster and rwproxy in front of it")
    d.add_argument("--dir", default="sandbox", help="sandbox directory (default ./sandbox)")
    d.add_argument("--replicas", type=int, default=2)
    d.add_argument("--port", type=int, default=6033, help="proxy port (default 6033)")
    d.add_argument("--exit", action="store_true", help="run the scripted tour and stop instead of serving until Ctrl-C")
    d.set_defaults(func=_demo)

    from .sandbox.cli import register

    register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)
