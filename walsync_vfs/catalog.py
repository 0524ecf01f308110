"""Reading a replica's layout: which databases, generations, snapshots and segments it holds.

Keys carry everything a plan needs (name, generation, kind, txid range), so one LIST is the
whole catalog; object contents are only fetched to show commit times or to verify.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from walsync_vfs import format, lease, storage

FETCH_WORKERS = 8


def object_key(k: format.ParsedKey) -> str:
    """The store key a parsed key came from."""
    if k.kind == "snapshot":
        return format.snapshot_key(k.name, k.generation, k.last_txid, k.epoch)
    part = (k.part, k.parts) if k.parts else None
    return format.segment_key(k.name, k.generation, k.first_txid, k.last_txid, k.epoch, part)


@dataclass
class Generation:
    """One lineage: snapshots and segments sharing a generation id, in txid order."""

    id: str
    snapshots: list[format.ParsedKey] = field(default_factory=list)
    # Whole segments, and the parts of every commit whose parts are all there, in order.
    segments: list[format.ParsedKey] = field(default_factory=list)
    # Parts of commits that lack a part (an upload cut short): never restored.
    partial: list[format.ParsedKey] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)  # object key -> bytes

    @property
    def first_txid(self) -> int:
        return min(k.first_txid for k in self.snapshots + self.segments + self.partial)

    @property
    def last_txid(self) -> int:
        """Its last complete commit (a commit missing parts is not one)."""
        whole = self.snapshots + self.segments
        return max((k.last_txid for k in whole), default=self.first_txid - 1)

    def restorable(self, without: AbstractSet[str] = frozenset()) -> list[tuple[int, int]]:
        """The txid ranges a restore can reach: from each snapshot on through the segments
        that follow it without a hole, merged.  Empty without a snapshot.  The objects keyed
        in ``without`` (damaged ones) count as missing; a part, as its whole commit."""
        split = {k.first_txid for k in self.segments if k.parts and object_key(k) in without}
        segments = sorted(
            (
                k
                for k in self.segments
                if object_key(k) not in without and not (k.parts and k.first_txid in split)
            ),
            key=lambda k: k.first_txid,
        )
        snapshots = [k for k in self.snapshots if object_key(k) not in without]
        ranges = []
        for snap in sorted(snapshots, key=lambda k: k.last_txid):
            end = snap.last_txid
            for seg in segments:
                if seg.first_txid <= end + 1 < seg.last_txid + 1:
                    end = seg.last_txid
            ranges.append((snap.last_txid, end))
        return _joined(ranges)


def spell_ranges(ranges: list[tuple[int, int]]) -> str:
    """``[(1, 2), (3, 9), (22, 22)]`` -> ``"txids 1..9, 22"`` (adjacent ranges joined: a
    new generation's txids go on from the last one's)."""
    return "txids " + ", ".join(f"{a}..{b}" if a != b else f"{a}" for a, b in _joined(ranges))


def _joined(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Ranges in order, those that overlap or touch made one."""
    joined: list[tuple[int, int]] = []
    for a, b in ranges:
        if joined and a <= joined[-1][1] + 1:
            joined[-1] = (joined[-1][0], max(joined[-1][1], b))
        else:
            joined.append((a, b))
    return joined


def generations(client: storage.ReplicaClient, name: str) -> list[Generation]:
    """Every generation of database ``name``, oldest first (see :func:`read`)."""
    return read(client, name)[0]


def read(
    client: storage.ReplicaClient, name: str
) -> tuple[list[Generation], list[format.ParsedKey], list[format.ParsedKey]]:
    """:func:`scan` of one LIST of database ``name``, with the lease's epoch read after it:
    objects a fenced writer left (see :func:`leftovers`) and objects of an epoch no lease
    granted are not part of any generation."""
    objects = client.list(name + "/")
    return scan(objects, name, granted_epoch(client, name))


def granted_epoch(client: storage.ReplicaClient, name: str) -> int | None:
    """The epoch of the lease object of ``name``: the highest any writer was granted
    (FORMAT.md §2.1); None without a readable one (missing, damaged, or not readable with
    these credentials: a restore may only be allowed the data).  Read after a listing, it
    covers every object the listing holds: a writer takes the lease before it writes."""
    try:
        holder = lease.Holder.decode(client.get(format.lease_key(name)))
    except storage.StorageError:
        return None
    return None if holder is lease.UNREADABLE else holder.epoch


def scan(
    objects: list[storage.ObjectInfo], name: str, ceiling: int | None = None
) -> tuple[list[Generation], list[format.ParsedKey], list[format.ParsedKey]]:
    """The generations of ``name`` in a listing, the leftovers of fenced writers, and the
    objects keyed with an epoch above ``ceiling`` (the lease's): no writer was granted one,
    so they are no history's (a copy under a made-up key), and they fence nothing."""
    ours = [(k, obj) for obj in objects if (k := format.parse_key(obj.key)) and k.name == name]
    stray = {k for k, _ in ours if ceiling is not None and k.epoch > ceiling}
    fenced = leftovers([k for k, _ in ours if k not in stray])
    gens: dict[str, Generation] = {}
    for k, obj in ours:
        if k in fenced or k in stray:
            continue
        g = gens.setdefault(k.generation, Generation(k.generation))
        (g.snapshots if k.kind == "snapshot" else g.segments).append(k)
        g.sizes[obj.key] = obj.size
    for g in gens.values():
        g.snapshots.sort(key=lambda k: k.last_txid)
        g.segments, g.partial = _complete(g.segments)
    ordered = [gens[i] for i in sorted(gens)]
    return ordered, sorted(fenced, key=object_key), sorted(stray, key=object_key)


def _complete(
    segments: list[format.ParsedKey],
) -> tuple[list[format.ParsedKey], list[format.ParsedKey]]:
    """Whole segments and complete part sets in txid order, and the parts of incomplete ones
    (a commit is only ever restored with all its parts; FORMAT.md §4.5).  Of several complete
    sets of one commit (written again after a restart), the first in key order is taken."""
    sets: dict[tuple[int, int, int], list[format.ParsedKey]] = defaultdict(list)
    kept, partial = [], []
    for k in segments:
        if k.parts:
            sets[(k.first_txid, k.epoch, k.parts)].append(k)
        else:
            kept.append(k)
    taken: set[int] = set()
    for (txid, _, count), parts in sorted(sets.items()):
        parts.sort(key=lambda k: k.part)
        if txid not in taken and [k.part for k in parts] == list(range(count)):
            taken.add(txid)
            kept += parts
        else:
            partial += parts
    kept.sort(key=lambda k: (k.first_txid, k.last_txid, k.part))
    return kept, partial


def units(segments: list[format.ParsedKey]) -> list[list[format.ParsedKey]]:
    """Segments grouped into what is applied as one: a whole segment, or all parts of one
    commit (``segments`` as :class:`Generation` holds them)."""
    out: list[list[format.ParsedKey]] = []
    for k in segments:
        if k.part and out and out[-1][-1].parts and out[-1][-1].first_txid == k.first_txid:
            out[-1].append(k)
        else:
            out.append([k])
    return out


def leftovers(keys: list[format.ParsedKey]) -> set[format.ParsedKey]:
    """Objects no history uses: written under a lease epoch at or after the txid where a
    writer of a higher epoch took over (FORMAT.md §2.1).

    Txids are one line across generations, and each new lease holder continues from the
    head it read, so every epoch owns the txids from where it took over up to where the next
    one did; what a paused old holder wrote past that point is garbage, never history.
    """
    by_epoch: dict[int, list[format.ParsedKey]] = defaultdict(list)
    for k in keys:
        by_epoch[k.epoch].append(k)
    fenced: set[format.ParsedKey] = set()
    cutoff = math.inf
    for epoch in sorted(by_epoch, reverse=True):
        kept = []
        for k in by_epoch[epoch]:
            if k.last_txid >= cutoff:
                fenced.add(k)
            else:
                kept.append(k)
        if kept:
            cutoff = min(cutoff, *(_takes_over_at(k) for k in kept))
    return fenced


def _takes_over_at(k: format.ParsedKey) -> int:
    """The first txid whose history this object states: a segment's first commit; a
    generation's first snapshot stands for everything up to its txid (FORMAT.md §1), a later
    snapshot restates its generation's history and only follows it."""
    if k.kind == "segment":
        return k.first_txid
    starts = int(k.generation[:16], 16) == k.last_txid
    return k.last_txid if starts else k.last_txid + 1


def databases(client: storage.ReplicaClient) -> dict[str, int]:
    """Names of the databases under a replica root, with their object counts."""
    names: dict[str, int] = defaultdict(int)
    for obj in client.list(""):
        k = format.parse_key(obj.key)
        if k is not None:
            names[k.name] += 1
    return dict(sorted(names.items()))
