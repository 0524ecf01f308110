"""``list`` and ``verify``: what a replica holds, and whether all of it is sound."""

from __future__ import annotations

import os
import tempfile
from array import array
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO, NamedTuple

from walsync_vfs import catalog, format, objects, storage
from walsync_vfs.restore import (
    WRITE_BUFFER,
    Image,
    RestoreError,
    decode_object,
    first_integrity_problem,
    iso_time,
    prefetch_pool,
    prefetched,
    split_url,
)

# Segments verify decodes ahead of the one it replays.  Fewer than restore's PREFETCH: each
# decoded segment holds up to max_segment_bytes of pages (plus its download and a joined copy
# while it decodes), and reading further ahead raises the peak without speeding verify up.
VERIFY_PREFETCH = 2
VERIFY_PASSES = 5  # listings a verify of a replica that keeps changing reads from


def open_target(url: str, **options: object) -> tuple[storage.ReplicaClient, str | None]:
    """``root/name`` of a replicated database -> (root client, name); a bare root -> name None."""
    try:
        root, name = split_url(url)
    except RestoreError:
        root, name = url, None
    if name is not None:
        try:
            client = storage.open_replica(root, **options)
        except storage.StorageError:  # file:///backups: "file://" is no root, the whole is
            return storage.open_replica(url, **options), None
        if catalog.generations(client, name):
            return client, name
    return storage.open_replica(url, **options), None


def describe_database(client: storage.ReplicaClient, name: str) -> dict:
    """Generations with their snapshots, segment txid and time ranges, and sizes.

    Times are those of each generation's first and last commits, read from the index of its
    first and last segments that read cleanly: two GETs per generation, not the replica.
    """
    gens = catalog.generations(client, name)
    with ThreadPoolExecutor(catalog.FETCH_WORKERS) as pool:
        times = list(pool.map(lambda g: _time_range(client, g), gens))
    out = []
    for g, (first_time, last_time) in zip(gens, times, strict=True):
        out.append(
            {
                "generation": g.id,
                "first_txid": g.first_txid,
                "last_txid": g.last_txid,
                "restorable": g.restorable(),
                "snapshots": [
                    {"txid": s.last_txid, "bytes": g.sizes[catalog.object_key(s)]}
                    for s in g.snapshots
                ],
                "segments": {
                    "count": len(g.segments),
                    "first_txid": g.segments[0].first_txid if g.segments else None,
                    "last_txid": g.segments[-1].last_txid if g.segments else None,
                    "first_time": first_time,
                    "last_time": last_time,
                    "bytes": sum(g.sizes[catalog.object_key(k)] for k in g.segments),
                },
            }
        )
    return {"url": storage.database_url(client, name), "name": name, "generations": out}


def _time_range(
    client: storage.ReplicaClient, g: catalog.Generation
) -> tuple[str | None, str | None]:
    """ISO times of the first commit of the first readable segment and the last commit of the
    last (None if none reads: ``verify`` says why)."""
    keys = [catalog.object_key(k) for k in g.segments]
    first = next((h.index[0] for h in _headers(client, g, keys)), None)
    last = next((h.index[-1] for h in _headers(client, g, keys[::-1])), None)
    return (
        iso_time(first.time_ns) if first else None,
        iso_time(last.time_ns) if last else None,
    )


def _headers(
    client: storage.ReplicaClient, g: catalog.Generation, keys: list[str]
) -> Iterator[format.SegmentHeader]:
    """The headers (and indexes) of those of ``keys`` that read and check out, lazily, in
    order: only the bytes before each body, by ranged GETs."""
    for key in keys:
        try:
            yield objects.segment_header(client, key, g.sizes[key])
        except (format.CorruptObject, storage.StorageError):
            continue


def describe_root(client: storage.ReplicaClient) -> dict:
    return {
        "url": client.url,
        "databases": [describe_database(client, name) for name in catalog.databases(client)],
    }


def format_database(info: dict) -> str:
    lines = [f"{info['url']}"]
    for g in info["generations"]:
        segs = g["segments"]
        ranges = g["restorable"]
        reach = catalog.spell_ranges(ranges) if ranges else "nothing restorable (no snapshot)"
        lines.append(f"  generation {g['generation']}  {reach}")
        for s in g["snapshots"]:
            lines.append(f"    snapshot  txid {s['txid']}  {s['bytes']} bytes")
        if segs["count"]:
            lines.append(
                f"    segments  {segs['count']}  txids {segs['first_txid']}..{segs['last_txid']}"
                f"  {segs['first_time']} .. {segs['last_time']}  {segs['bytes']} bytes"
            )
    return "\n".join(lines)


class Verdict(NamedTuple):
    """What verify found: one line per problem, naming its object (none: sound), and the
    txid ranges a restore can reach with the damaged objects left out."""

    problems: list[str]
    restorable: list[tuple[int, int]]


@dataclass
class _Findings:
    """What verifying one listing found so far."""

    problems: list[str] = field(default_factory=list)
    damaged: set[str] = field(default_factory=set)  # keys of objects that failed a check
    missing: set[str] = field(default_factory=set)  # keys listed but not found
    unsound: set[str] = field(default_factory=set)  # generations whose replay fails SQLite's check

    def damage(self, key: str, line: str) -> None:
        """The object ``key`` failed a check, as ``line`` says (naming it)."""
        self.damaged.add(key)
        self.problems.append(line)

    def object_problem(self, key: str, exc: Exception) -> None:
        """An object failed to read or decode: one line naming ``key`` (format and replay
        errors already start with it)."""
        if isinstance(exc, storage.ObjectNotFound):
            self.missing.add(key)
            self.damage(key, f"{key}: object listed but missing")
        elif isinstance(exc, format.CorruptObject | RestoreError):
            self.damage(key, str(exc))
        else:
            self.damage(key, f"{key}: {exc}")


def verify(client: storage.ReplicaClient, name: str) -> Verdict:
    """Every problem found, and what is restorable around them.

    Each object is downloaded once and checked whole (SHA-256, structure, zstd); each
    generation is replayed from its first snapshot through its segments the way restore does,
    comparing the whole-database checksum after every commit, and its final image must pass
    ``PRAGMA integrity_check``.  Objects are streamed through restore's prefetch window and
    the replay goes to a temporary file, so memory stays at a few segments (plus the
    snapshot being read) however large the replica is.

    A replica being written changes under the reads: an object listed and then gone, and
    listed no longer (compaction replaced it, retention removed it), makes verify start
    again from a fresh listing; one still listed is missing.
    """
    for _ in range(VERIFY_PASSES):
        objects = client.list(name + "/")
        ceiling = catalog.granted_epoch(client, name)  # named in the stray objects' lines
        gens, _, stray = catalog.scan(objects, name, ceiling)
        if not gens:
            return Verdict([f"{storage.database_url(client, name)}: no replica found"], [])
        found = _Findings([f"{name}/{line}" for line in _overlaps(gens)])
        found.problems += [
            f"{catalog.object_key(k)}: keyed with lease epoch {k.epoch}, which no writer was "
            f"granted (the lease is at {ceiling}); not part of the history"
            for k in stray
        ]
        for g in gens:
            _verify_generation(client, name, g, found)
        if not found.missing or found.missing & _listed(client, name):
            restorable = [
                r for g in gens if g.id not in found.unsound for r in g.restorable(found.damaged)
            ]
            return Verdict(found.problems, restorable)
    return Verdict(
        [
            f"{storage.database_url(client, name)}: objects kept being replaced (compaction, "
            "retention) while verify read them; run it again"
        ],
        [],
    )


def _listed(client: storage.ReplicaClient, name: str) -> set[str]:
    """The keys of every snapshot and segment listed now."""
    return {
        catalog.object_key(k)
        for g in catalog.generations(client, name)
        for k in (*g.snapshots, *g.segments)
    }


def ignored(client: storage.ReplicaClient, name: str) -> list[str]:
    """The objects fenced writers left, which no history uses (FORMAT.md §2.1), one line each."""
    gens, fenced, _ = catalog.read(client, name)
    return [
        f"{catalog.object_key(k)}: written under lease epoch {k.epoch} after a writer of a "
        "higher epoch took over; not part of the history"
        for k in fenced
    ] + [
        f"{catalog.object_key(k)}: part {k.part} of a commit whose {k.parts} parts are not "
        "all stored (an upload cut short); never restored"
        for g in gens
        for k in g.partial
    ]


def _overlaps(gens: list[catalog.Generation]) -> list[str]:
    """Generations whose txid ranges overlap: two writers' histories mixed (a replica written
    unfenced by two writers); one history never does that."""
    ordered = sorted(gens, key=lambda g: g.first_txid)
    return [
        f"{g.id}: txids {g.first_txid}..{g.last_txid} overlap generation {prev.id} "
        f"(txids {prev.first_txid}..{prev.last_txid})"
        for prev, g in zip(ordered, ordered[1:], strict=False)
        if g.first_txid <= prev.last_txid
    ]


_UNKNOWN = 0  # a txid's checksum the replay never reached


class _History:
    """The whole-database checksum after each txid a generation's replay has reached, so
    objects outside the replayed chain (a later snapshot, a segment a compacted one covers)
    can be checked against it; 8 bytes per commit."""

    def __init__(self, base: int) -> None:
        self.base = base  # txid of the generation's first snapshot
        self.checksums = array("Q")

    def add(self, commits: list[format.Commit], upto: int) -> None:
        for c in commits:
            if self.base + len(self.checksums) < c.txid <= upto:
                self.checksums.append(c.checksum)

    def resume(self, txid: int, checksum: int) -> None:
        """The replay goes on from a snapshot at ``txid`` after a hole, whose txids it never
        reached."""
        while self.base + len(self.checksums) < txid - 1:
            self.checksums.append(_UNKNOWN)
        if self.base + len(self.checksums) == txid - 1:
            self.checksums.append(checksum)

    def disagrees(self, txid: int, checksum: int) -> bool:
        """True if the replay reached ``txid`` and had another checksum there."""
        i = txid - self.base - 1
        return 0 <= i < len(self.checksums) and self.checksums[i] not in (_UNKNOWN, checksum)


def _verify_generation(
    client: storage.ReplicaClient, name: str, g: catalog.Generation, found: _Findings
) -> None:
    """Check one generation into ``found``; the replay stops at the first break in its chain,
    but every object is still checked on its own."""
    seg_keys = [catalog.object_key(s) for s in g.segments]
    snap_keys = [catalog.object_key(s) for s in g.snapshots]
    if not snap_keys:
        found.problems.append(f"{name}/{g.id}: generation has no snapshot")
    holes = _holes(g)
    with (
        tempfile.TemporaryDirectory(prefix="walsync-verify-") as tmp,
        open(os.path.join(tmp, "replay.db"), "w+b", buffering=WRITE_BUFFER) as f,
        prefetch_pool() as pool,
    ):
        segments = prefetched(
            pool, seg_keys, lambda key: decode_object(client, key), VERIFY_PREFETCH
        )
        image, history = None, _History(g.snapshots[0].last_txid if snap_keys else 0)
        if snap_keys:
            image = _replay_from(client, g, g.snapshots[0], f, found)
        for key, future in segments:
            if key in holes:
                line, resume = holes[key]
                if resume is None:
                    found.problems.append(line)
                    image = None  # replay cannot cross a hole; the objects are still checked
                else:  # commits that never reached the store: restore goes on from a snapshot
                    image = _replay_from(client, g, resume, f, found)
                    if image is not None:
                        history.resume(image.result.txid, image.checksum.value)
            try:
                _, header, commits = future.result()
            except (format.CorruptObject, storage.StorageError) as exc:
                found.object_problem(key, exc)
                image = None
                continue
            for c in commits:
                if history.disagrees(c.txid, c.checksum):
                    found.damage(key, f"{key}: txid {c.txid} differs from the replayed history")
                    break
            if image is not None:
                try:
                    image.apply_segment(key, header, commits)
                except RestoreError as exc:
                    found.object_problem(key, exc)
                    image = None
                    continue
                history.add(commits, image.result.txid)
        if image is not None and (bad := first_integrity_problem(f.name, mmap=False)) is not None:
            found.unsound.add(g.id)
            found.problems.append(
                f"{name}/{g.id}: database replayed to txid {image.result.txid} fails "
                f"integrity_check: {bad}"
            )
        for key in snap_keys[1:]:  # one at a time: a snapshot is as large as the database
            try:
                snap = _read_snapshot(client, key, g.sizes[key])
            except (format.CorruptObject, storage.StorageError) as exc:
                found.object_problem(key, exc)
                continue
            if history.disagrees(snap.txid, snap.checksum):
                found.damage(key, f"{key}: snapshot differs from the replayed history")


def _replay_from(
    client: storage.ReplicaClient,
    g: catalog.Generation,
    snap: format.ParsedKey,
    f: BinaryIO,
    found: _Findings,
) -> Image | None:
    """The image of snapshot ``snap`` in the replay file ``f`` (None, and a problem, if it
    does not read)."""
    key = catalog.object_key(snap)
    f.seek(0)
    f.truncate()
    try:
        return Image.from_snapshot(f, g.id, objects.open_snapshot(client, key, g.sizes[key]))
    except (format.CorruptObject, storage.StorageError) as exc:
        found.object_problem(key, exc)
        return None


def _holes(g: catalog.Generation) -> dict[str, tuple[str, format.ParsedKey | None]]:
    """Segment key -> the line for txids missing before it, from the listing alone, and the
    snapshot the chain goes on from if one is there (restore then skips the hole)."""
    if not g.snapshots:
        return {}
    holes, expected = {}, g.snapshots[0].last_txid + 1
    for seg in g.segments:
        if seg.first_txid > expected:
            key = catalog.object_key(seg)
            resume = max(
                (s for s in g.snapshots if seg.first_txid - 1 <= s.last_txid <= seg.last_txid),
                key=lambda s: s.last_txid,
                default=None,
            )
            line = f"{key}: txids {expected}..{seg.first_txid - 1} missing before it"
            holes[key] = (line, resume)
        expected = max(expected, seg.last_txid + 1)
    return holes


def _read_snapshot(client: storage.ReplicaClient, key: str, size: int) -> format.SnapshotHeader:
    """Stream a snapshot through its checks (SHA-256, frame, checksum), keeping no page."""
    header, pages = objects.open_snapshot(client, key, size)
    for _ in pages:
        pass
    return header
