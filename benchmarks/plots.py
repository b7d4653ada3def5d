"""Curves from benchmark results: QPS and p99 latency against client threads for direct MariaDB,
rwproxy's modes and the peers (HAProxy, the bare forwarder), from a `benchmarks.run` results file.

    python -m benchmarks.plots benchmarks/results/issue22-latest.json [more.json ...]
Writes <name>.png beside each file. benchmarks.run calls it after every run.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def throughput_plot(path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return None
    r = json.loads(path.read_text())
    rows = r.get("summary") or []
    tests = sorted({x["test"] for x in rows})
    if not rows or not tests:
        return None
    fig, axes = plt.subplots(len(tests), 2, figsize=(10, 3.4 * len(tests)), squeeze=False)
    for row, test in enumerate(tests):
        mine = [x for x in rows if x["test"] == test]
        threads = sorted({x["threads"] for x in mine})
        qa, la = axes[row]
        direct = [statistics.median([x["direct_qps"] for x in mine if x["threads"] == t]) for t in threads]
        direct_p99 = [statistics.median([x["direct_p99_ms"] for x in mine if x["threads"] == t and x.get("direct_p99_ms")]
                                        or [float("nan")]) for t in threads]
        qa.plot(threads, direct, "k--o", label="direct")
        la.plot(threads, direct_p99, "k--o", label="direct")
        for mode in sorted({x["mode"] for x in mine}):
            pts = sorted((x["threads"], x["proxy_qps"], x.get("proxy_p99_ms")) for x in mine if x["mode"] == mode)
            label = mode if mode in ("haproxy", "forwarder") else f"rwproxy {mode}"
            qa.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
            la.plot([p[0] for p in pts], [p[2] if p[2] is not None else float("nan") for p in pts], "o-", label=label)
        for ax, what in ((qa, "queries per second"), (la, "p99 latency, ms")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(threads)
            ax.set_xticklabels([str(t) for t in threads])
            ax.set_xlabel("client threads")
            ax.set_ylabel(what)
            ax.set_title(f"{test} ({r.get('date', '')[:10]})")
            ax.legend(fontsize=8)
        la.set_yscale("log")
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    for name in (argv if argv is not None else sys.argv[1:]):
        out = throughput_plot(Path(name))
        if out:
            print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
