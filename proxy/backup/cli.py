"""`rwproxy backup ...`: argparse wiring and the operator's output for each command."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys

from proxy.backup.servers import BackupError

log = logging.getLogger("rwproxy.backup")


def _say(text: str) -> None:
    print(text, flush=True)


def Context(config_path: str):
    """The config's [backup] section opened (repository, keys) for a CLI command."""
    from proxy.backup.context import BackupContext
    from proxy.config.load import load_config

    return BackupContext(load_config(config_path))


def _keygen(args) -> int:
    from proxy.backup.codec import keygen

    try:
        pub = keygen(args.out)
    except FileExistsError:
        raise BackupError(f"{args.out} exists; keygen never overwrites a key") from None
    _say(f"wrote {args.out} (keep it secret and somewhere other than the backups)\nrecipient: {pub}\n"
         f"put the recipient in [backup] recipients on machines that only take backups, and key_file = "
         f"\"{os.path.abspath(args.out)}\" where backups are restored or verified")
    return 0


def _run(args) -> int:
    from proxy.backup.take import run_backup

    ctx = Context(args.config)
    kind = "incremental" if args.incremental else "full"
    m = run_backup(ctx.config, ctx.repo, ctx.keys, kind=kind, method=args.method, source=args.source, log_step=_say)
    _say(m.id)
    return 0


def _list(args) -> int:
    from proxy.backup.archive import load_archive
    from proxy.backup.manifest import iso, load_all

    ctx = Context(args.config)
    ms = load_all(ctx.repo)
    if args.json:
        print(json.dumps([json.loads(m.to_json()) for m in ms], indent=1))
        return 0
    head = ("ID", "KIND", "METHOD", "SERVER", "CONSISTENT AT", "SECONDS", "DATA MiB", "STORED MiB", "RATIO", "GTID",
            "TEST RESTORE")
    rows = [head]
    for m in ms:
        tr = m.test_restore
        rows.append((m.id, m.kind + (f" (on {m.parent})" if m.parent else ""), m.method, m.server,
                     iso(m.consistent_at or m.end), f"{m.end - m.start:.0f}", f"{m.raw_size / 2**20:.1f}",
                     f"{m.stored_size / 2**20:.1f}", f"{m.raw_size / max(m.stored_size, 1):.1f}", m.gtid or "-",
                     ("OK " if tr.get("ok") else "FAILED ") + iso(tr["time"]) if tr else "never"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        print("  ".join(v.ljust(widths[i]) for i, v in enumerate(r)).rstrip())
    archive = load_archive(ctx.repo)
    total = sum(ctx.repo.sizes("").values())
    print(f"\n{len(ms)} backup(s), {len(archive)} archived binlog file(s), {total / 2**20:.1f} MiB in {ctx.repo.url}")
    if ms:
        _print_windows(ctx, ms, archive)
    return 0


def _print_windows(ctx, ms, archive) -> list:
    from proxy.backup.archive import walk
    from proxy.backup.binlog import parse_position
    from proxy.backup.manifest import iso

    windows = []
    for m in ms:
        if not m.gtid:
            continue
        w = walk(archive, parse_position(m.gtid), stop_at_gap=True)
        end = iso(w.end_ts) if w.end_ts and w.end_ts > (m.consistent_at or m.end) else iso(m.consistent_at or m.end)
        windows.append((m.id, iso(m.consistent_at or m.end), end, w.gaps[0] if w.gaps else None))
    if windows:
        print("recoverable to any point:")
        for bid, a, b, gap in windows:
            print(f"  from {bid}: {a} .. {b}" + (f"  (not after: {gap.describe()})" if gap else ""))
    return windows


def _info(args) -> int:
    from proxy.backup.manifest import load_all
    from proxy.backup.restore import backup_chain

    ctx = Context(args.config)
    c = backup_chain(ctx.repo, load_all(ctx.repo), args.id)
    out = json.loads(c[-1].to_json())
    out["chain"] = [m.id for m in c]
    print(json.dumps(out, indent=1))
    return 0


def _verify(args) -> int:
    from proxy.backup.restore import verify

    ctx = Context(args.config)
    problems = verify(ctx.repo, ctx.keys, args.id, log_step=_say)
    for p in problems:
        print(f"  {p}")
    return 1 if problems else 0


def _restore(args) -> int:
    from proxy.backup.restore import parse_time, restore

    ctx = Context(args.config)
    given = [x for x in (args.backup, args.time, args.gtid) if x]
    if len(given) > 1:
        raise BackupError("give one of --backup, --time, --gtid")
    r = restore(ctx.repo, ctx.keys, args.target_dir, bid=args.backup,
                at_time=parse_time(args.time) if args.time else None, at_gtid=args.gtid, port=args.port or 0,
                start=args.start, log_step=_say)
    if args.json:
        print(json.dumps(r, indent=1))
    return 0


def _test_restore(args) -> int:
    from proxy.backup.restore import test_restore

    ctx = Context(args.config)
    r = test_restore(ctx.repo, ctx.keys, args.id, log_step=_say)
    return 0 if r["ok"] else 1


def _check(args) -> int:
    from proxy.backup.check import check

    ctx = Context(args.config)
    report = check(ctx.config, ctx.repo)
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        for line in report["lines"]:
            print(line)
    return 0 if report["ok"] else 1


def _expire(args) -> int:
    from proxy.backup.manifest import load_all, unfinished
    from proxy.backup.retention import expire, plan_expiry

    ctx = Context(args.config)
    d = plan_expiry(ctx.repo, ctx.config.backup)
    stale = unfinished(ctx.repo, load_all(ctx.repo))
    for bid in d.keep:
        print(f"keep    {bid}  ({d.why[bid]})")
    for bid in d.delete:
        print(f"delete  {bid}")
    for a in d.delete_binlogs:
        print(f"delete  binlog {a.file} of server {a.server_id} (ends at {a.end}, before the oldest kept backup)")
    for k in stale:
        print(f"delete  {k} (left by a backup that did not finish)")
    if not args.yes:
        if d.delete or d.delete_binlogs or stale:
            print("nothing deleted: run again with --yes to delete the above")
        return 0
    expire(ctx.repo, d, stale)
    print(f"deleted {len(d.delete)} backup(s), {len(d.delete_binlogs)} archived binlog file(s)"
          + (f", {len(stale)} object(s) of unfinished backups" if stale else ""))
    return 0


def _archive(args) -> int:
    from proxy.backup.archive import Archiver

    ctx = Context(args.config)
    a = Archiver(ctx.config, ctx.repo, ctx.keys, ctx.spool(), log_step=_say)
    signal.signal(signal.SIGTERM, lambda *_: a.stop.set())
    try:
        a.run()
    except KeyboardInterrupt:  # the reader process was stopped on the way out (Archiver._follow_once)
        a.stop.set()
    return 0


def _daemon(args) -> int:
    from proxy.backup.daemon import BackupDaemon

    ctx = Context(args.config)
    d = BackupDaemon(ctx.config, ctx.repo, ctx.keys, ctx.spool(), log_step=_say)
    if not d.plan and not ctx.config.backup.archive_binlogs:
        raise BackupError("nothing to run: set [backup] schedule_full, schedule_incremental, "
                          "schedule_test_restore or archive_binlogs = true")
    signal.signal(signal.SIGTERM, lambda *_: d.stop.set())
    hup = []  # SIGHUP (systemctl reload): re-read the config here, between waits
    signal.signal(signal.SIGHUP, lambda *_: hup.append(1))
    d.run()  # (starts the threads and returns)
    try:
        while not d.stop.wait(0.5):  # until SIGTERM or Ctrl-C
            if hup:
                hup.clear()
                _reload_daemon(d, args.config)
    except KeyboardInterrupt:
        pass
    _say("backup daemon stopping")
    d.join()
    return 0


def _reload_daemon(d, path: str) -> None:
    """SIGHUP: the daemon takes the file's [backup] as serve's reload does (a running job finishes
    with the old settings); a file that does not load changes nothing. (SIGHUP used to end the
    daemon on the spot: its default action, with a backup's program left running.)"""
    from proxy.config.load import ConfigError

    try:
        ctx = Context(path)
        if not ctx.config.backup.archive_binlogs and not any(
                getattr(ctx.config.backup, k) for k in ("schedule_full", "schedule_incremental", "schedule_test_restore")):
            raise BackupError("nothing to run: no schedule and archive_binlogs = false")
    except (ConfigError, BackupError, OSError) as e:
        _say(f"reload (SIGHUP) refused, the daemon keeps its settings: {'; '.join(str(e).splitlines())}")
        return
    d.reconfigure(ctx.config, ctx.repo, ctx.keys, ctx.spool())
    _say("reloaded (SIGHUP)")


def register(subparsers) -> None:
    bk = subparsers.add_parser("backup", help="backups, the binlog archive and point-in-time recovery ([backup])",
                               description="Backups of the cluster's data into a directory or an S3 bucket, "
                                           "a continuous binlog archive, point-in-time restores, proven by restoring.")
    sub = bk.add_subparsers(dest="backup_command", metavar="COMMAND")
    sub.required = True

    def cmd(name, fn, help, config=True):
        p = sub.add_parser(name, help=help)
        if config:
            p.add_argument("--config", "-c", required=True, help="the rwproxy config file (its [backup] section)")
        p.set_defaults(func=lambda a: _guard(fn, a))
        return p

    k = cmd("keygen", _keygen, "make an age key file for encrypting backups", config=False)
    k.add_argument("--out", required=True)
    r = cmd("run", _run, "take a backup (from the healthiest replica unless --from)")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--full", action="store_true", help="a full backup (the default)")
    g.add_argument("--incremental", action="store_true", help="changes since the last backup of the same server")
    r.add_argument("--from", dest="source", help="the server to back up (backend name or host:port)")
    r.add_argument("--method", choices=["physical", "logical"], help="default: [backup] method")
    ls = cmd("list", _list, "backups, chains, sizes, test restores and the recoverable window")
    ls.add_argument("--json", action="store_true")
    i = cmd("info", _info, "one backup's manifest")
    i.add_argument("id")
    v = cmd("verify", _verify, "check hashes, decryption and decompression without restoring")
    v.add_argument("id", nargs="?")
    rs = cmd("restore", _restore, "restore a backup, to a point in time with archived binlogs")
    rs.add_argument("--target-dir", required=True, help="a new or empty directory: the restored datadir")
    rs.add_argument("--backup", help="backup id (default: the newest, or the newest before --time/--gtid)")
    rs.add_argument("--time", help='recover to this moment: "2026-12-01 12:00:00" (local time) or ISO 8601 with a zone')
    rs.add_argument("--gtid", help="recover up to and including this GTID, e.g. 0-1-1234")
    rs.add_argument("--port", type=int, help="with --start: the port (default: a free one)")
    rs.add_argument("--start", action="store_true", help="start a mariadbd on the restored data (127.0.0.1)")
    rs.add_argument("--json", action="store_true", help="print what was done as JSON")
    tr = cmd("test-restore", _test_restore, "restore into a scratch server and check every table")
    tr.add_argument("id", nargs="?")
    cmd("archive", _archive, "archive the primary's binlogs continuously (until Ctrl-C)")
    c = cmd("check", _check, "prove the binlog archive continuous from the oldest backup to now")
    c.add_argument("--json", action="store_true")
    e = cmd("expire", _expire, "apply the retention policy (shows what it would delete unless --yes)")
    e.add_argument("--yes", action="store_true")
    cmd("daemon", _daemon, "run the [backup] schedules (and the archiver if archive_binlogs) until stopped")


def _guard(fn, args) -> int:
    from proxy.backup.codec import CodecError
    from proxy.backup.repo import RepoError
    from proxy.config.load import ConfigError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return fn(args)
    except (BackupError, RepoError, CodecError) as e:
        print(f"rwproxy backup: {e}", file=sys.stderr)
        return 1
    except ConfigError as e:
        print(f"rwproxy: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rwproxy backup: interrupted", file=sys.stderr)
        return 130
