"""A backup's manifest: what it is, where it came from, what it holds, and how to check it.

The manifest is the last object a backup writes (`backups/<ID>/manifest.json`): a backup without
one did not finish and is never listed, restored or counted as kept. It names every stored
object with its size and SHA-256, the GTID position at the consistent point (where point-in-time
recovery starts replaying binlogs), the InnoDB LSNs an incremental builds on, and the per-table
checksums a test restore compares against. It holds no table data, so it is stored unencrypted:
`list`, `info`, `check` and `expire` work on a machine without the key.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

FULL, INCREMENTAL = "full", "incremental"
PHYSICAL, LOGICAL = "physical", "logical"
PREFIX = "backups/"


def backup_id(kind: str, when: float) -> str:
    """pgBackRest-style, sortable by time: 20261204-211400F / ...I."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(when)) + ("F" if kind == FULL else "I")


def iso(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass
class StoredObject:
    key: str
    size: int
    sha256: str
    raw_size: int


@dataclass
class Manifest:
    id: str
    kind: str                      # full | incremental
    method: str                    # physical | logical
    parent: str | None             # the backup an incremental applies on
    start: float                   # epoch seconds
    end: float
    server: str                    # backend name
    address: str
    server_id: int
    server_role: str               # replica | primary
    version: str
    gtid: str                      # GTID position at the consistent point ("" if unknown)
    consistent_at: float = 0.0     # when the data stopped at `gtid` (the pause; a primary's backup: its end)
    from_lsn: int = 0
    to_lsn: int = 0
    objects: list[StoredObject] = field(default_factory=list)
    compression: str = "zstd"
    encryption: str = "age"
    key_id: str = ""
    tables: dict[str, dict] = field(default_factory=dict)   # "db.t": {"rows": n, "checksum": c}
    test_restore: dict = field(default_factory=dict)         # {"time", "ok", "detail", "seconds"}
    format: int = 1

    @property
    def stored_size(self) -> int:
        return sum(o.size for o in self.objects)

    @property
    def raw_size(self) -> int:
        return sum(o.raw_size for o in self.objects)

    @property
    def key(self) -> str:
        return manifest_key(self.id)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Manifest":
        d = json.loads(data)
        d["objects"] = [StoredObject(**o) for o in d.get("objects", [])]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def manifest_key(bid: str) -> str:
    return f"{PREFIX}{bid}/manifest.json"


def load_all(repo) -> list[Manifest]:
    """Every finished backup in the repository, oldest first."""
    out = []
    for key in repo.keys(PREFIX):
        if key.endswith("/manifest.json"):
            out.append(Manifest.from_json(repo.get_bytes(key)))
    return sorted(out, key=lambda m: (m.start, m.id))


def chain(manifests: list[Manifest], bid: str) -> list[Manifest]:
    """The full backup and the incrementals leading to `bid`, in the order they are applied."""
    by_id = {m.id: m for m in manifests}
    if bid not in by_id:
        raise KeyError(bid)
    out = [by_id[bid]]
    while out[-1].parent:
        parent = by_id.get(out[-1].parent)
        if parent is None:
            raise KeyError(out[-1].parent)
        out.append(parent)
    return list(reversed(out))


def unfinished(repo, manifests: list[Manifest]) -> list[str]:
    """Objects under backups/ that belong to no finished backup (a crashed or running backup)."""
    done = {m.id for m in manifests}
    return [k for k in repo.keys(PREFIX) if k[len(PREFIX):].split("/", 1)[0] not in done]
