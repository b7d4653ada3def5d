"""Cron-style schedules for backups and test restores, in UTC.

Five fields as in crontab(5): minute hour day-of-month month day-of-week, each `*`, a number, a
range `a-b`, a step `*/n` or `a-b/n`, or a comma list of those; Sunday is 0 or 7. As in cron, when
both day fields are restricted a day matching either runs. Small enough to own, and its errors
name the field that is wrong.
"""

from __future__ import annotations

import calendar
import time

_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7))


class CronError(ValueError):
    pass


def _parse_field(text: str, name: str, lo: int, hi: int) -> frozenset[int]:
    out: set[int] = set()
    for part in text.split(","):
        body, _, step_s = part.partition("/")
        try:
            step = int(step_s) if step_s else 1
            if body == "*":
                a, b = lo, hi
            elif "-" in body:
                a_s, b_s = body.split("-", 1)
                a, b = int(a_s), int(b_s)
            else:
                a = b = int(body)
                if step_s:
                    b = hi
        except ValueError:
            raise CronError(f"cron {name} field {text!r}: expected *, N, A-B, */N or A-B/N (comma-separated)") from None
        if step < 1 or not (lo <= a <= hi and lo <= b <= hi and a <= b):
            raise CronError(f"cron {name} field {text!r}: values must be in {lo}-{hi}")
        out.update(range(a, b + 1, step))
    return frozenset(out)


class Cron:
    def __init__(self, expr: str):
        parts = expr.split()
        if len(parts) != 5:
            raise CronError(f"cron schedule {expr!r}: expected 5 fields (minute hour day-of-month month "
                            f"day-of-week), e.g. \"0 1 * * *\" for 01:00 every day")
        self.expr = expr
        sets = [_parse_field(p, *f) for p, f in zip(parts, _FIELDS)]
        self.minutes, self.hours, self.days, self.months, dow = sets
        self.dows = frozenset(d % 7 for d in dow)
        self.days_any, self.dows_any = parts[2] == "*", parts[4] == "*"

    def matches(self, ts: float) -> bool:
        t = time.gmtime(ts)
        if t.tm_min not in self.minutes or t.tm_hour not in self.hours or t.tm_mon not in self.months:
            return False
        return self._day_ok(t)

    def next_after(self, ts: float) -> float:
        """The first whole minute after ts that matches (searched minute by minute, days skipped)."""
        t = (int(ts) // 60 + 1) * 60
        limit = t + 366 * 86400 * 5
        while t < limit:
            g = time.gmtime(t)
            if g.tm_mon not in self.months or not self._day_ok(g):
                t = calendar.timegm((g.tm_year, g.tm_mon, g.tm_mday, 0, 0, 0)) + 86400
                continue
            if self.matches(t):
                return float(t)
            t += 60
        raise CronError(f"cron schedule {self.expr!r} never runs")

    def _day_ok(self, g) -> bool:
        dom, dow = g.tm_mday in self.days, (g.tm_wday + 1) % 7 in self.dows
        if self.days_any or self.dows_any:
            return dom and dow
        return dom or dow
