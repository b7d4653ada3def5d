"""Instructions per statement on rwproxy's hot path, counted by valgrind (callgrind), for this
tree and optionally another checkout: a hot-path A/B that a noisy shared machine cannot blur.

Runs benchmarks/dispatch_micro.py (real session, router, classifier, backend connection and C
scanner over in-memory transports) under callgrind twice per case, with 0 and N statements,
and divides the difference by N, so start-up and warm-up cancel out. Instruction counts do
not depend on what else the machine is doing (the same total twice, seen on this machine
with the other core loaded); they are not time, but a change that adds work adds them.

    python -m benchmarks.dispatch_instructions [--statements 5000] [--other /path/to/checkout]
Results: benchmarks/results/dispatch-instructions-<date>.json and .md (and *-latest.*).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from .report import save

CASES = ["point select (replica)", "UPDATE (primary)", "BEGIN (primary)", "prepared point select",
         "shared point select"]  # (the last: the default configuration, multiplexed)
ROOT = Path(__file__).resolve().parent.parent


def instructions(tree: Path, n: int, case: str, stats: str = "on") -> int:
    """Instructions callgrind counts for dispatch_micro in `tree` with n statements of `case`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cg.out"
        env = dict(os.environ, PYTHONPATH=str(tree), PYTHONHASHSEED="0", RWPROXY_DISPATCH_STATS=stats)
        res = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
                              "-m", "benchmarks.dispatch_micro", str(n), case],
                             cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
        m = re.search(r"Collected : (\d+)", res.stderr)
        if res.returncode != 0 or m is None:
            raise RuntimeError(f"callgrind run failed in {tree}:\n{res.stderr[-2000:]}")
        return int(m.group(1))


def per_statement(tree: Path, n: int, case: str, stats: str = "on") -> float:
    return (instructions(tree, n, case, stats) - instructions(tree, 0, case, stats)) / n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--statements", type=int, default=5000, help="statements per measured run")
    ap.add_argument("--other", default="", help="another checkout of rwproxy to compare with (e.g. the commit before)")
    ap.add_argument("--other-label", default="other")
    ap.add_argument("--tag", default="dispatch-instructions")
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--stats-off", action="store_true",
                    help="compare this tree with itself under [stats] enabled = false (what statistics cost)")
    args = ap.parse_args(argv)
    trees = {"this tree": ROOT}
    if args.other:
        trees[args.other_label] = Path(args.other).resolve()
    elif args.stats_off:
        trees["stats off"] = ROOT
    cases = [c for c in CASES if not args.cases or c in args.cases.split(",")]
    table: dict[str, dict[str, float]] = {case: {} for case in cases}
    for case in cases:
        for label, tree in trees.items():
            stats = "off" if label == "stats off" else "on"
            table[case][label] = round(per_statement(tree, args.statements, case, stats))
            print(f"{case:24s} {label:12s} {table[case][label]:>9,.0f} instructions per statement", flush=True)
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "statements": args.statements,
              "trees": {k: str(v) for k, v in trees.items()}, "instructions_per_statement": table}
    lines = [f"# Hot-path instructions per statement, {result['date']}", "",
             f"valgrind --tool=callgrind over benchmarks/dispatch_micro.py ({args.statements} statements per case, "
             "minus a run with none), Python " + sys.version.split()[0] + ".", "",
             "| case | " + " | ".join(trees) + (" | change |" if len(trees) == 2 else " |"),
             "|---|" + "---:|" * (len(trees) + (1 if len(trees) == 2 else 0))]
    for case, row in table.items():
        cells = [f"{row[k]:,.0f}" for k in trees]
        if len(trees) == 2:
            a, b = (row[k] for k in trees)
            cells.append(f"{(a - b) / b * 100:+.1f} %")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    save(args.tag, result, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
