"""Where benchmark results go: benchmarks/results/<tag>-<date>.{json,md} and <tag>-latest.*"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def save(tag: str, result: dict, md: str) -> None:
    """Write the run's JSON and Markdown under a dated name and as the tag's latest."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.date.today().isoformat()
    for name in (f"{tag}-{stamp}", f"{tag}-latest"):
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (RESULTS / f"{name}.md").write_text(md)
    print("\n" + md)
