"""Backups on a sysbench dataset (issue 23): throughput next to mariadb-backup alone, ratio,
restore time, binlog replay rate, and reads through rwproxy during a backup.

A sandbox (a primary and 2 replicas, larger InnoDB settings) gets a sysbench dataset of about
--size-mib. Then, in alternating rounds:

- the limit: `mariadb-backup --backup --stream=mbstream > /dev/null` from a replica;
- `rwproxy backup run` (physical, zstd level 1, age, into a directory repository) from the same
  replica, with checksum_tables off (its stream rate is what is compared; the checksums' cost is
  measured once beside it);
- `rwproxy backup restore` of it (download, hash, decrypt, decompress, prepare).

Once: binlog replay for point-in-time recovery (sysbench oltp_write_only on the primary for
--write-seconds while `rwproxy backup archive` runs, then a restore to the last GTID: replayed
binlog MiB/s), and oltp_read_only through rwproxy (default config) without and during a backup.

    python -m benchmarks.backup                  # ~1 GiB, ~15 minutes
    python -m benchmarks.backup --size-mib 256   # quicker
Results: benchmarks/results/backup-<date>.{json,md} (and -latest).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.run import sysbench
from proxy.config.load import build_config, write_config
from proxy.runtime.launcher import ProxyProcess, free_port
from proxy.testing.clusters import running_cluster

RESULTS = Path(__file__).parent / "results"
SB_TABLES = 8


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def rw(*args, timeout=3600) -> str:
    r = subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"rwproxy {' '.join(args)}: {r.stdout[-1000:]}\n{r.stderr[-2000:]}")
    return r.stdout


def config(cluster, tmp: Path, port: int, key: str, **backup) -> str:
    path = str(tmp / f"rwproxy-{len(list(tmp.glob('*.toml')))}.toml")
    data = {"proxy": {"listen": f"127.0.0.1:{port}", "workers": 2},
            "backends": [{"name": n.name, "host": "127.0.0.1", "port": n.port} for n in cluster.nodes],
            "users": [{"name": "app", "password": "app"}], "monitor": {"user": "rwproxy", "password": cluster.password("rwproxy")},
            "backup": {"repository": f"file://{tmp / 'repo'}", "key_file": key, **backup}}
    write_config(build_config(data, source=path), path)
    return path


def raw_backup(node, tmp: Path, password: str) -> dict:
    opts = tmp / "raw.cnf"
    opts.write_text(f"[client]\nuser=rwproxy\npassword={password}\nhost=127.0.0.1\nport={node.port}\nprotocol=tcp\n")
    t0 = time.monotonic()
    with open(os.devnull, "wb") as null:
        p = subprocess.Popen(["mariadb-backup", f"--defaults-extra-file={opts}", "--backup", "--stream=mbstream",
                              f"--target-dir={tmp}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        n = 0
        while chunk := p.stdout.read(1 << 20):
            n += len(chunk)
            null.write(chunk)
        p.wait()
    s = time.monotonic() - t0
    return {"bytes": n, "seconds": round(s, 2), "mib_s": round(n / 2**20 / s, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--write-seconds", type=int, default=30)
    ap.add_argument("--read-seconds", type=int, default=30)
    args = ap.parse_args(argv)
    rows_per_table = int(args.size_mib * 2**20 / 250 / SB_TABLES)  # ~250 bytes per sysbench row with its index
    result: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "size_mib_target": args.size_mib,
                    "rounds": []}
    with tempfile.TemporaryDirectory(prefix="rwp-bench-backup-") as tmp_s, \
            running_cluster(Path(tmp_s) / "sandbox", replicas=2,
                            server_options=["innodb_buffer_pool_size=256M", "innodb_log_file_size=256M"]) as cluster:
        tmp = Path(tmp_s)
        key = str(tmp / "backup.key")
        rw("backup", "keygen", "--out", key)
        say(f"sysbench prepare: {SB_TABLES} tables x {rows_per_table} rows")
        with cluster.primary.connect() as c, c.cursor() as cur:
            cur.execute("CREATE DATABASE IF NOT EXISTS sbtest")
            cur.execute("GRANT ALL ON sbtest.* TO 'app'@'%'")
        sb_prepare = ["sysbench", "oltp_read_only", "--mysql-host=127.0.0.1", f"--mysql-port={cluster.primary.port}",
                      "--mysql-user=app", "--mysql-password=app", "--mysql-db=sbtest", f"--tables={SB_TABLES}",
                      f"--table-size={rows_per_table}", "--threads=2", "prepare"]
        subprocess.run(sb_prepare, check=True, capture_output=True, timeout=7200)
        cluster.wait_replicas_caught_up(1800)
        with cluster.primary.connect() as c, c.cursor() as cur:
            cur.execute("SELECT SUM(DATA_LENGTH + INDEX_LENGTH) FROM information_schema.TABLES WHERE TABLE_SCHEMA='sbtest'")
            result["dataset_mib"] = round(int(cur.fetchone()[0]) / 2**20, 1)
        say(f"dataset: {result['dataset_mib']} MiB")
        replica = cluster.replicas[0]
        port = free_port()
        cfg = config(cluster, tmp, port, key, checksum_tables=False)
        for r in range(args.rounds):
            order = ["raw", "rwproxy"] if r % 2 == 0 else ["rwproxy", "raw"]
            rnd: dict = {}
            for what in order:
                if what == "raw":
                    rnd["raw"] = raw_backup(replica, tmp, cluster.password("rwproxy"))
                    say(f"round {r + 1}: mariadb-backup alone {rnd['raw']['mib_s']} MiB/s")
                else:
                    t0 = time.monotonic()
                    out = rw("backup", "run", "-c", cfg, "--from", replica.name)
                    wall = time.monotonic() - t0
                    bid = out.strip().splitlines()[-1]
                    m = json.loads(rw("backup", "info", "-c", cfg, bid))
                    o = m["objects"][0]
                    rate = next(ln for ln in out.splitlines() if " done: " in ln)
                    rnd["rwproxy"] = {"id": bid, "raw_bytes": o["raw_size"], "stored_bytes": o["size"],
                                      "ratio": round(o["raw_size"] / o["size"], 2), "command_seconds": round(wall, 2),
                                      "stream_mib_s": float(rate.rsplit("MiB/s", 1)[0].rsplit(", ", 1)[1])}
                    say(f"round {r + 1}: rwproxy backup {rnd['rwproxy']['stream_mib_s']} MiB/s, ratio {rnd['rwproxy']['ratio']}")
            target = tmp / f"restore-{r}"
            t0 = time.monotonic()
            rw("backup", "restore", "-c", cfg, "--backup", rnd["rwproxy"]["id"], "--target-dir", str(target))
            rnd["restore_seconds"] = round(time.monotonic() - t0, 2)
            say(f"round {r + 1}: restore {rnd['restore_seconds']} s")
            subprocess.run(["rm", "-rf", str(target)])
            rnd["ratio_to_raw"] = round(rnd["rwproxy"]["stream_mib_s"] / rnd["raw"]["mib_s"], 2)
            result["rounds"].append(rnd)
        # the checksums' cost, once
        cfg_ck = config(cluster, tmp, port, key, checksum_tables=True)
        t0 = time.monotonic()
        out = rw("backup", "run", "-c", cfg_ck, "--from", replica.name)
        result["with_checksums_seconds"] = round(time.monotonic() - t0, 2)
        result["checksum_line"] = next((ln for ln in out.splitlines() if "checksums of" in ln), "")
        say(f"with table checksums: {result['with_checksums_seconds']} s ({result['checksum_line']})")
        # binlog replay: a write load archived, then restored to its end
        arch_cfg = config(cluster, tmp, port, key, checksum_tables=False, archive_interval=1.0,
                          spool_dir=str(tmp / "spool"))
        base = rw("backup", "run", "-c", arch_cfg, "--from", replica.name).strip().splitlines()[-1]
        archiver = subprocess.Popen([sys.executable, "-m", "proxy", "backup", "archive", "-c", arch_cfg],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            say(f"oltp_write_only on the primary for {args.write_seconds} s (archived)")
            w = sysbench("oltp_write_only", "127.0.0.1", cluster.primary.port, 4, args.write_seconds, SB_TABLES,
                         rows_per_table)
            with cluster.primary.connect() as c, c.cursor() as cur:
                cur.execute("SELECT @@gtid_binlog_pos")
                end = cur.fetchone()[0]
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if json.loads(subprocess.run([sys.executable, "-m", "proxy", "backup", "check", "-c", arch_cfg, "--json"],
                                             capture_output=True, text=True).stdout)["archive_lag_s"] == 0.0:
                    break
                time.sleep(1)
        finally:
            os.killpg(archiver.pid, signal.SIGTERM)
            archiver.wait(30)
        out = rw("backup", "restore", "-c", arch_cfg, "--gtid", end, "--target-dir", str(tmp / "pitr"), "--json")
        rep = json.loads(out[out.index("\n{") + 1:])
        result["replay"] = {"base": base, "write_qps": w["qps"], "binlog_mib": round(rep["replay_bytes"] / 2**20, 1),
                            "replay_seconds": rep["replay_seconds"],
                            "replay_mib_s": round(rep["replay_bytes"] / 2**20 / rep["replay_seconds"], 1),
                            "restore_seconds": rep["seconds"], "gtid": rep["gtid"], "target": end}
        say(f"replay: {result['replay']['binlog_mib']} MiB of binlog in {rep['replay_seconds']} s")
        subprocess.run(["rm", "-rf", str(tmp / "pitr")])
        # reads through rwproxy (default config) without and during a backup
        proxy = ProxyProcess(cfg, "127.0.0.1", port, log_path=str(tmp / "proxy.log")).start()
        try:
            reads = {}
            for phase in ("idle", "backup", "idle2"):
                stop = threading.Event()
                ran = []

                def loop():
                    while not stop.is_set():
                        rw("backup", "run", "-c", cfg, "--from", replica.name)
                        ran.append(1)
                t = threading.Thread(target=loop) if phase == "backup" else None
                if t:
                    t.start()
                    time.sleep(1)
                reads[phase] = sysbench("oltp_read_only", "127.0.0.1", port, 8, args.read_seconds, SB_TABLES,
                                        rows_per_table)
                stop.set()
                if t:
                    t.join(3600)
                    reads[phase]["backups_during"] = len(ran)
                say(f"reads through rwproxy, {phase}: {reads[phase]['qps']:.0f} QPS, errors {reads[phase]['errors']}")
            result["reads"] = reads
        finally:
            proxy.stop()
    write_results(result)
    return 0


def write_results(result: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.date.today().isoformat()
    text = json.dumps(result, indent=1)
    for name in (f"backup-{stamp}.json", "backup-latest.json"):
        (RESULTS / name).write_text(text)
    md = markdown(result)
    for name in (f"backup-{stamp}.md", "backup-latest.md"):
        (RESULTS / name).write_text(md)
    print(md)


def markdown(r: dict) -> str:
    rounds = r["rounds"]
    lines = [f"# Backups (issue 23), {r['date']}", "",
             f"{r['machine']}; sysbench dataset {r['dataset_mib']} MiB (8 tables); a primary and 2 replicas on "
             f"loopback; backups of a replica into a directory repository on the same disk.", "",
             "| round | mariadb-backup alone, MiB/s | rwproxy backup (zstd-1 + age), MiB/s | ratio | compression | "
             "restore s |", "|---|---:|---:|---:|---:|---:|"]
    for i, x in enumerate(rounds):
        lines.append(f"| {i + 1} | {x['raw']['mib_s']} | {x['rwproxy']['stream_mib_s']} | {x['ratio_to_raw']} | "
                     f"{x['rwproxy']['ratio']} | {x['restore_seconds']} |")
    rp, rd = r["replay"], r["reads"]
    lines += ["", f"- Table checksums at the consistent point: a backup with them took {r['with_checksums_seconds']} s "
                  f"({r['checksum_line'].strip()}).",
              f"- Point-in-time recovery: {rp['binlog_mib']} MiB of binlog (oltp_write_only, {rp['write_qps']:.0f} QPS "
              f"while archived) replayed in {rp['replay_seconds']} s = {rp['replay_mib_s']} MiB/s; the whole restore "
              f"to GTID {rp['gtid']} took {rp['restore_seconds']} s.",
              f"- oltp_read_only through rwproxy (8 threads): {rd['idle']['qps']:.0f} QPS without a backup, "
              f"{rd['backup']['qps']:.0f} during backups ({rd['backup'].get('backups_during', 0)} taken, the replica "
              f"out of the read pool while paused; {rd['backup']['errors']} errors), {rd['idle2']['qps']:.0f} after "
              f"(ratio during/without {rd['backup']['qps'] / ((rd['idle']['qps'] + rd['idle2']['qps']) / 2):.2f})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
