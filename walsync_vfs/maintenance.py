"""Keeping a replica small and its restores fast: compaction and retention.

Both only ever remove objects whose every commit is available elsewhere (a merged segment,
a newer snapshot), so no restore point inside the retention window is lost.
"""

from __future__ import annotations

import time

from walsync_vfs import catalog, format, storage


def compact(
    client: storage.ReplicaClient, segments: list[format.ParsedKey], max_bytes: int
) -> list[str]:
    """Merge consecutive segments into as few as fit ``max_bytes`` of page data each, upload
    the merged ones, then delete the originals.  Returns the keys written.

    The per-commit index survives the merge, so every commit stays a restore point.  Merged
    segments are written before anything is deleted, and a plan skips commits it already has,
    so a restore running meanwhile sees either set.
    """
    keys = [catalog.object_key(k) for k in segments]
    groups: list[tuple[int, list[format.Commit]]] = []
    size = 0
    for key in keys:
        # One GET at a time, in the engine's maintenance thread: a pool of fetch threads per
        # merge (every 32 uploads of every database) cost more CPU and memory than the merge.
        blob = client.get(key)
        header, commits = format.decode_segment(blob, key)  # one validation pass, not two
        for commit in commits:
            pages = len(commit.pages) * header.page_size
            if not groups or groups[-1][0] != header.page_size or size + pages > max_bytes:
                groups.append((header.page_size, []))
                size = 0
            groups[-1][1].append(commit)
            size += pages
    first = segments[0]
    merged = [
        format.segment_key(first.name, first.generation, c[0].txid, c[-1].txid) for _, c in groups
    ]
    written = []
    for (page_size, commits), key in zip(groups, merged, strict=True):
        if key not in keys:  # a lone segment too big to merge stays as it is
            client.put(key, format.encode_segment(page_size, commits))
            written.append(key)
    client.delete([k for k in keys if k not in merged])
    return written


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
