"""Reading a replica's layout: which databases, generations, snapshots and segments it holds.

Keys carry everything a plan needs (name, generation, kind, txid range), so one LIST is the
whole catalog; object contents are only fetched to show commit times or to verify.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from walsync_vfs import format, storage

FETCH_WORKERS = 8


def object_key(k: format.ParsedKey) -> str:
    """The store key a parsed key came from."""
    if k.kind == "snapshot":
        return format.snapshot_key(k.name, k.generation, k.last_txid)
    return format.segment_key(k.name, k.generation, k.first_txid, k.last_txid)


@dataclass
class Generation:
    """One lineage: snapshots and segments sharing a generation id, in txid order."""

    id: str
    snapshots: list[format.ParsedKey] = field(default_factory=list)
    segments: list[format.ParsedKey] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)  # object key -> bytes

    @property
    def first_txid(self) -> int:
        return min(k.first_txid for k in self.snapshots + self.segments)

    @property
    def last_txid(self) -> int:
        return max(k.last_txid for k in self.snapshots + self.segments)


def generations(client: storage.ReplicaClient, name: str) -> list[Generation]:
    """Every generation of database ``name``, oldest first, from one LIST."""
    gens: dict[str, Generation] = {}
    for obj in client.list(name + "/"):
        k = format.parse_key(obj.key)
        if k is None or k.name != name:
            continue  # foreign files are ignored
        g = gens.setdefault(k.generation, Generation(k.generation))
        (g.snapshots if k.kind == "snapshot" else g.segments).append(k)
        g.sizes[obj.key] = obj.size
    for g in gens.values():
        g.snapshots.sort(key=lambda k: k.last_txid)
        g.segments.sort(key=lambda k: (k.first_txid, k.last_txid))
    return [gens[i] for i in sorted(gens)]


def databases(client: storage.ReplicaClient) -> dict[str, int]:
    """Names of the databases under a replica root, with their object counts."""
    names: dict[str, int] = defaultdict(int)
    for obj in client.list(""):
        k = format.parse_key(obj.key)
        if k is not None:
            names[k.name] += 1
    return dict(sorted(names.items()))

