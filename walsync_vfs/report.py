"""``list`` and ``verify``: what a replica holds, and whether all of it is sound."""

from __future__ import annotations

import os
import tempfile

from walsync_vfs import catalog, format, storage
from walsync_vfs.restore import Plan, RestoreError, iso_time, replay, split_url


def open_target(url: str, **options: object) -> tuple[storage.ReplicaClient, str | None]:
    """``root/name`` of a replicated database -> (root client, name); a bare root -> name None."""
    try:
        root, name = split_url(url)
    except RestoreError:
        root, name = url, None
    if name is not None:
        client = storage.open_replica(root, **options)
        if catalog.generations(client, name):
            return client, name
    return storage.open_replica(url, **options), None


def describe_database(client: storage.ReplicaClient, name: str) -> dict:
    """Generations with their snapshots and segment txid/time ranges and sizes."""
    gens = catalog.generations(client, name)
    seg_keys = [catalog.object_key(k) for g in gens for k in g.segments]
    headers = {}
    for key, blob in catalog.fetch_all(client, seg_keys).items():
        try:
            headers[key] = (
                format.read_segment_header(blob, key) if isinstance(blob, bytes) else None
            )
        except format.CorruptObject:
            headers[key] = None
    out = []
    for g in gens:
        times = [
            (h.index[0].time_ns, h.index[-1].time_ns)
            for k in g.segments
            if (h := headers.get(catalog.object_key(k)))
        ]
        out.append(
            {
                "generation": g.id,
                "first_txid": g.first_txid,
                "last_txid": g.last_txid,
                "snapshots": [
                    {"txid": s.last_txid, "bytes": g.sizes[catalog.object_key(s)]}
                    for s in g.snapshots
                ],
                "segments": {
                    "count": len(g.segments),
                    "first_txid": g.segments[0].first_txid if g.segments else None,
                    "last_txid": g.segments[-1].last_txid if g.segments else None,
                    "first_time": iso_time(min(t[0] for t in times)) if times else None,
                    "last_time": iso_time(max(t[1] for t in times)) if times else None,
                    "bytes": sum(g.sizes[catalog.object_key(k)] for k in g.segments),
                },
            }
        )
    return {"url": f"{client.url}/{name}", "name": name, "generations": out}


def describe_root(client: storage.ReplicaClient) -> dict:
    return {
        "url": client.url,
        "databases": [describe_database(client, name) for name in catalog.databases(client)],
    }


def format_database(info: dict) -> str:
    lines = [f"{info['url']}"]
    for g in info["generations"]:
        segs = g["segments"]
        lines.append(f"  generation {g['generation']}  txids {g['first_txid']}..{g['last_txid']}")
        for s in g["snapshots"]:
            lines.append(f"    snapshot  txid {s['txid']}  {s['bytes']} bytes")
        if segs["count"]:
            lines.append(
                f"    segments  {segs['count']}  txids {segs['first_txid']}..{segs['last_txid']}"
                f"  {segs['first_time']} .. {segs['last_time']}  {segs['bytes']} bytes"
            )
    return "\n".join(lines)


def verify(client: storage.ReplicaClient, name: str) -> list[str]:
    """Every problem found, one line each naming the object (empty list = sound).

    Downloads and decodes every object (SHA-256 and structure), checks that each generation's
    segments chain txid by txid from its snapshot, and replays each generation to its end
    comparing the whole-database checksum after every commit.
    """
    problems: list[str] = []
    gens = catalog.generations(client, name)
    if not gens:
        return [f"{client.url}/{name}: no replica found"]
    keys = [catalog.object_key(k) for g in gens for k in g.snapshots + g.segments]
    for key, blob in catalog.fetch_all(client, keys).items():
        if isinstance(blob, Exception):
            problems.append(f"{key}: {blob}")
            continue
        try:
            if "/seg/" in key:
                for _ in format.iter_segment_commits(blob, key):
                    pass
            else:
                for _ in format.read_snapshot(blob, key)[1]:
                    pass
        except format.CorruptObject as exc:
            problems.append(str(exc))
    for g in gens:
        if not g.snapshots:
            problems.append(f"{name}/{g.id}: generation has no snapshot")
            continue
        expected = g.snapshots[0].last_txid + 1
        for seg in g.segments:
            if seg.first_txid > expected:
                problems.append(
                    f"{catalog.object_key(seg)}: txids {expected}..{seg.first_txid - 1} missing "
                    "before it"
                )
            expected = max(expected, seg.last_txid + 1)
        if problems:
            continue  # replay would only repeat what is already reported
        fd, tmp = tempfile.mkstemp(suffix=".db")
        os.close(fd)
        try:
            replay(client, Plan(name, g.id, g.snapshots[0], g.segments, None), tmp)
        except (RestoreError, format.CorruptObject, storage.StorageError) as exc:
            problems.append(str(exc))
        finally:
            os.remove(tmp)
    return problems
