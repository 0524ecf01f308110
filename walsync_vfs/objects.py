"""walsync's objects in the store in bounded memory, at any database size.

Snapshots go up as a stream (pages -> zstd -> ``put_stream``, S3 multipart past a threshold)
and come down as one (parallel ranged GETs -> zstd -> pages); what only needs a header --
``list``, the engine's start-up, restore planning -- reads the few hundred bytes of it by
ranged GETs (FORMAT.md: a snapshot's header leads and its footer ends the object, a
segment's header and index come before its body), never the object.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

from walsync_vfs import format, storage
from walsync_vfs.format import Page
from walsync_vfs.format.container import SHA_LEN
from walsync_vfs.storage.transfer import read_ranges

# Bytes of a segment asked for first: its header and the first ~90 index entries, so most
# segments' index comes in one request.
SEGMENT_PREFIX = 4096
# Ranged GETs of a snapshot being restored: a few of them are held at once (in flight, being
# decompressed), which is most of a restore's memory.
DOWNLOAD_PART = 4 << 20


def put_snapshot(
    client: storage.ReplicaClient,
    key: str,
    pages: Iterable[Page],
    page_size: int,
    txid: int,
    time_ns: int,
    db_size: int,
) -> int:
    """Encode ``pages`` (1..db_size) as a snapshot and upload it as a stream; returns its size.

    Create-only like ``put``: a key found taken is this very snapshot if an earlier attempt
    whose reply was lost stored it (see :func:`snapshot_stored`), else the object there is
    removed and the Conflict raised, for the upload to be retried."""
    size = 0
    last = b""

    def encoded() -> Iterator[bytes]:
        nonlocal size, last
        for chunk in format.encode_snapshot(pages, page_size, txid, time_ns, db_size):
            size += len(chunk)
            last = chunk
            yield chunk

    stream = encoded()
    try:
        return client.put_stream(key, stream, size_hint=db_size * page_size)
    except storage.Conflict:
        for _ in stream:  # the footer, if the store refused before reading it all
            pass
        if not snapshot_stored(client, key, size, last[-format.SNAPSHOT_FOOTER_SIZE :]):
            raise
        return size


def snapshot_stored(client: storage.ReplicaClient, key: str, size: int, footer: bytes) -> bool:
    """Whether the object at ``key`` is the snapshot of ``size`` bytes ending in ``footer``:
    same size, same footer, and its bytes hash to the footer's SHA-256 (read as a stream,
    so never held whole).  Anything else there is damaged: it is removed (False)."""
    try:
        info = client.head(key)
        if info.size == size and _footer(client, key, size) == footer:
            sha = hashlib.sha256()
            left = size - SHA_LEN
            for piece in read_ranges(client, key, size=size):
                sha.update(piece[: max(0, left)])
                left -= len(piece)
            if sha.digest() == footer[-SHA_LEN :]:
                return True
        client.delete([key])
    except storage.StorageError:
        pass  # the upload is retried, and this looked at again
    return False


def _size(client: storage.ReplicaClient, key: str, size: int | None) -> int:
    return client.head(key).size if size is None else size


def _footer(client: storage.ReplicaClient, key: str, size: int) -> bytes:
    footer_size = format.SNAPSHOT_FOOTER_SIZE
    return client.get_range(key, max(0, size - footer_size), footer_size)


def snapshot_header(
    client: storage.ReplicaClient, key: str, size: int | None = None
) -> format.SnapshotHeader:
    """A snapshot's header (with the footer's checksum) from two ranged GETs; ``size`` from
    a listing saves a HEAD."""
    size = _size(client, key, size)
    head = client.get_range(key, 0, format.SNAPSHOT_HEADER_SIZE)
    footer = _footer(client, key, size)
    return _named_snapshot(key, format.snapshot_header(head, footer, size, key))


def open_snapshot(
    client: storage.ReplicaClient, key: str, size: int | None = None
) -> tuple[format.SnapshotHeader, Iterator[Page]]:
    """A snapshot's header and its pages, downloaded by parallel ranged GETs and checked as
    they stream (:func:`format.stream_snapshot`): memory is a few download parts."""
    size = _size(client, key, size)
    footer = _footer(client, key, size)
    pieces = read_ranges(client, key, size=size, part_size=DOWNLOAD_PART)
    header, pages = format.stream_snapshot(pieces, size, footer, key)
    return _named_snapshot(key, header), pages


def _named_snapshot(key: str, header: format.SnapshotHeader) -> format.SnapshotHeader:
    """``header``, if its object's key names its txid (a snapshot copied or renamed in the
    store would restore another state than the one asked for)."""
    format.check_named(key, header.txid, header.txid)
    return header


def segment_header(
    client: storage.ReplicaClient, key: str, size: int | None = None
) -> format.SegmentHeader:
    """A segment's header and index from the bytes before its body (one ranged GET for most
    segments, two for a long index)."""
    size = _size(client, key, size)
    prefix = client.get_range(key, 0, min(size, SEGMENT_PREFIX))

    def read_at(start: int, length: int) -> bytes:
        if start + length <= len(prefix):
            return prefix[start : start + length]
        return client.get_range(key, start, length)

    header = format.read_segment_index(read_at, size, key)
    format.check_named(key, header.first_txid, header.last_txid)
    return header
