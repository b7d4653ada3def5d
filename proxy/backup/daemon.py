"""Scheduled backups, test restores and the binlog archiver, in `rwproxy serve` or `rwproxy backup daemon`.

Jobs run one at a time on one thread (a test restore never competes with a backup for the same
replica); the archiver has its own. After each scheduled backup the retention policy is applied,
as pgBackRest expires after every backup. `status()` is what the operator sees: the last backup,
the last successful test restore, the archive's lag and the repository's size (the admin tables
and /metrics read it).
"""

from __future__ import annotations

import logging
import threading
import time

from proxy.backup.schedule import Cron

log = logging.getLogger("rwproxy.backup")

JOBS = ("full", "incremental", "test-restore")
REFRESH = 15.0  # s between listings of the repository for its size (a big bucket lists in pages of 1,000)


def schedules(backup_config) -> dict[str, Cron]:
    """The configured jobs: name -> schedule."""
    out = {}
    for job, expr in (("full", backup_config.schedule_full), ("incremental", backup_config.schedule_incremental),
                      ("test-restore", backup_config.schedule_test_restore)):
        if expr:
            out[job] = Cron(expr)
    return out


def due(plan: dict[str, Cron], last_tick: float, now: float) -> list[str]:
    """Jobs whose schedule has a minute in (last_tick, now]; a full due with an incremental wins."""
    out = [job for job, cron in plan.items() if cron.next_after(last_tick) <= now]
    if "full" in out and "incremental" in out:
        out.remove("incremental")
    return out


class BackupDaemon:
    def __init__(self, config, repo, keys, spool: str, *, log_step=log.info, clock=time.time, may_run=None):
        self.config, self.repo, self.keys, self.spool = config, repo, keys, spool
        self.log_step = log_step
        self.clock = clock
        # with [cluster] coordination only the leader runs the schedules (each instance has the same
        # [backup]: every one would back up at the same minute)
        self.may_run = may_run or (lambda: True)
        self.stop = threading.Event()
        self.plan = schedules(config.backup)
        self.archiver = None
        self.archiver_thread: threading.Thread | None = None
        self.scheduler_thread: threading.Thread | None = None  # runs the jobs, one at a time
        self.busy = ""  # the job under way
        self.threads: list[threading.Thread] = []
        self.state = {"last_backup": None, "last_backup_ok": None, "last_backup_error": "", "last_test_restore": None,
                      "last_test_restore_ok": None, "repository_bytes": None, "archive_lag_s": None,
                      "backups": 0, "jobs_failed": 0}
        self.lock = threading.Lock()

    def run(self) -> None:
        """Start the threads and return (serve) — or block until stopped (daemon command: use join)."""
        self._start_archiver()
        self.scheduler_thread = self._thread("backup-scheduler", self._schedule_loop)
        self._say_plan()

    def _say_plan(self) -> None:
        if self.plan:
            self.log_step("backup schedules: " + ", ".join(f"{j} \"{c.expr}\"" for j, c in self.plan.items()))

    def _start_archiver(self) -> None:
        if self.config.backup.archive_binlogs:
            from proxy.backup.archive import Archiver

            self.archiver = Archiver(self.config, self.repo, self.keys, self.spool, log_step=self.log_step)
            self.archiver_thread = self._thread("binlog-archiver", self.archiver.run)  # (its own stop event)

    def _stop_archiver(self, timeout: float = 30) -> None:
        a, t = self.archiver, self.archiver_thread
        self.archiver = self.archiver_thread = None
        if a is not None:
            a.stop.set()  # it uploads what it read, then its reader ends
            t.join(timeout)

    def reconfigure(self, config, repo, keys, spool: str) -> None:
        """A reload: the next job runs with the new settings (one running finishes with the old);
        the archiver starts again on them unless only schedules or retention changed."""
        from proxy.config import diff

        quiet = ("backup.schedule_", "backup.keep_", "backup.method", "backup.from_primary", "backup.checksum_tables",
                 "backup.catchup_timeout")
        moved = [k for k in diff.changes(self.config, config) if k.startswith(("backup.", "backends", "monitor."))
                 and not k.startswith(quiet)] or spool != self.spool
        self.config, self.repo, self.keys, self.spool = config, repo, keys, spool
        self.plan = schedules(config.backup)
        if moved or (self.archiver is None) != (not config.backup.archive_binlogs):
            self._stop_archiver()
            self._start_archiver()
        self._say_plan()

    def _thread(self, name, fn) -> threading.Thread:
        t = threading.Thread(target=fn, name=name, daemon=True)
        t.start()
        self.threads.append(t)
        return t

    def join(self, timeout: float = 30) -> None:
        from proxy.backup.take import cancel

        self.stop.set()
        if self.archiver is not None:
            self.archiver.stop.set()
        jobs = self.scheduler_thread
        # (a backup cut off with the process would leave its replica paused)
        if jobs is not None and cancel(jobs) or self.busy:
            self.log_step("stopping: the backup under way is cancelled; its replica resumes")
        for t in self.threads:
            t.join(timeout)
        if jobs is not None and not jobs.is_alive():
            cancel(jobs, on=False)

    def _schedule_loop(self) -> None:
        last = self.clock()
        self._refresh()
        refreshed = time.monotonic()
        while not self.stop.wait(1.0):
            now = self.clock()
            for job in due(self.plan, last, now):
                if self.may_run():
                    self.run_job(job)
                else:
                    self.log_step(f"scheduled {job}: left to the leader instance")
            last = now
            if time.monotonic() - refreshed > REFRESH:
                self._refresh()
                refreshed = time.monotonic()

    def run_job(self, job: str) -> bool:
        from proxy.backup.servers import BackupError

        self.log_step(f"scheduled {job} starting")
        self.busy = job
        try:
            if job == "test-restore":
                from proxy.backup.restore import test_restore

                r = test_restore(self.repo, self.keys, log_step=self.log_step, tty=False)
                with self.lock:
                    self.state["last_test_restore"] = r["time"]
                    self.state["last_test_restore_ok"] = r["ok"]
                return bool(r["ok"])
            from proxy.backup.take import run_backup

            m = run_backup(self.config, self.repo, self.keys, kind=job, log_step=self.log_step, tty=False)
            with self.lock:
                self.state.update(last_backup=m.end, last_backup_ok=True, last_backup_error="")
            self.expire()
            return True
        except Exception as e:  # noqa: BLE001 - a failed job is logged and counted; the schedule goes on
            msg = str(e) if isinstance(e, BackupError) else f"{type(e).__name__}: {e}"
            self.log_step(f"scheduled {job} failed: {msg}")
            with self.lock:
                self.state["jobs_failed"] += 1
                if job != "test-restore":
                    self.state.update(last_backup_ok=False, last_backup_error=msg)
            return False
        finally:
            self.busy = ""
            self._refresh()

    def expire(self) -> None:
        from proxy.backup.retention import expire, plan_expiry

        d = plan_expiry(self.repo, self.config.backup)
        expire(self.repo, d)  # (not the objects of unfinished backups: one may be running elsewhere)
        if d.delete or d.delete_binlogs:
            self.log_step(f"retention: deleted backup(s) {', '.join(d.delete) or '-'} and "
                          f"{len(d.delete_binlogs)} archived binlog file(s)")

    def _refresh(self) -> None:
        """What the operator surface shows; read from the repository, so a restart loses nothing."""
        from proxy.backup.manifest import load_all

        try:
            ms = load_all(self.repo)
            size = sum(self.repo.sizes("").values())
        except Exception as e:  # noqa: BLE001 - an unreachable bucket must not stop the schedule
            self.log_step(f"backup repository {self.repo.url} unreadable: {e}")
            return
        tested = [m.test_restore for m in ms if m.test_restore.get("ok")]
        with self.lock:
            self.state["backups"] = len(ms)
            self.state["repository_bytes"] = size
            if ms and self.state["last_backup"] is None:
                self.state["last_backup"] = ms[-1].end
            if tested:
                self.state["last_test_restore"] = max(t["time"] for t in tested)
                self.state["last_test_restore_ok"] = True

    def status(self) -> dict:
        with self.lock:
            st = dict(self.state)
        a = self.archiver
        if a is not None:
            st["archive_lag_s"] = a.lag()
            st["archive_source"] = a.source.name if a.source else None
        return st
