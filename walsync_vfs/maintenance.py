"""Keeping a replica small and its restores fast: compaction and retention.

Both only ever remove objects whose every commit is available elsewhere (a merged segment,
a newer snapshot), so no restore point inside the retention window is lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from walsync_vfs import catalog, format, storage

log = logging.getLogger("walsync_vfs")


def merge_plan(
    client: storage.ReplicaClient,
    segments: list[format.ParsedKey],
    max_bytes: int,
    local: Callable[[str], bytes | None] = lambda key: None,
) -> tuple[list[tuple[str, bytes]], list[str]]:
    """Merge consecutive segments into as few as fit ``max_bytes`` of page data each:
    ``(objects to put, keys to delete once every put succeeded)``.

    ``local(key)`` may return a copy of a segment kept on this machine (see recent.py), so
    the store is only read for segments without one or whose copy fails validation.  The
    per-commit index survives the merge, so every commit stays a restore point.  Merged
    segments must be written before anything is deleted, and a plan skips commits it already
    has, so a restore running meanwhile sees either set.
    """
    keys = [catalog.object_key(k) for k in segments]
    # One GET at a time, in the engine's maintenance thread: a pool of fetch threads per merge
    # (every 32 uploads of every database) cost more CPU and memory than the merge.
    raws = [_read(client, key, local(key)) for key in keys]
    first = segments[0]
    merged, puts = [], []
    for first_txid, last_txid, data in format.merge_segments(raws, max_bytes):
        key = format.segment_key(first.name, first.generation, first_txid, last_txid)
        merged.append(key)
        if key not in keys:  # a lone segment too big to merge stays as it is
            puts.append((key, data))
    return puts, [k for k in keys if k not in merged]


def _read(client: storage.ReplicaClient, key: str, copy: bytes | None) -> format.RawSegment:
    """The segment from its local copy if that is intact, else from the store."""
    if copy is not None:
        try:
            return format.read_segment_raw(copy, key)
        except format.CorruptObject as exc:
            log.warning(
                "walsync: local copy of %s is damaged (%s); reading the store", key, exc.reason
            )
    return format.read_segment_raw(client.get(key), key)


def expired(
    objects: list[storage.ObjectInfo], retention: float, now: float | None = None
) -> list[str]:
    """Keys no restore point in the last ``retention`` seconds needs.

    The newest snapshot written before the window starts covers every point inside it
    (object write times are never earlier than the snapshot's own time, so this errs on the
    side of keeping).  Everything older than that snapshot -- earlier snapshots, segments it
    covers, whole earlier generations -- can go.
    """
    cutoff = (time.time() if now is None else now) - retention
    parsed = [(k, o) for o in objects if (k := format.parse_key(o.key)) is not None]
    anchors = [k for k, o in parsed if k.kind == "snapshot" and o.modified <= cutoff]
    if not anchors:
        return []
    anchor = max(anchors, key=lambda k: k.last_txid)
    return [
        o.key
        for k, o in parsed
        if k.last_txid < anchor.last_txid
        or (k.kind == "segment" and k.last_txid <= anchor.last_txid)
    ]
