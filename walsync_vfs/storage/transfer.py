"""Big objects in bounded memory: a stream cut into parts, parts and ranges moved on a few
threads at once with results in order, and a parallel ranged download.

Both backends' ``put_stream`` take a :data:`Source`; :func:`read_ranges` reads any
:class:`~walsync_vfs.storage.ReplicaClient`.  Memory is a few parts, whatever the size.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, BinaryIO, TypeVar

from walsync_vfs.workers import Workers

if TYPE_CHECKING:
    from walsync_vfs.storage import ReplicaClient

MIN_PART_SIZE = 5 << 20  # S3's smallest part (every part but the last)
MAX_PARTS = 10_000  # S3's most parts in one upload
PART_SIZE = 6 << 20  # default part and range size
# put_stream holds up to this much to decide between one PUT and a multipart upload, so it
# is also a bound on the memory a stream takes: two parts.
MULTIPART_THRESHOLD = 2 * PART_SIZE
TRANSFER_WORKERS = 2  # parts (or ranges) of one object in flight at once
READ_SIZE = 1 << 20  # bytes asked of a file source at a time

# What put_stream uploads: an iterable of byte chunks (any sizes), or a binary file open for
# reading (read from its current position to its end).
Source = Iterable[bytes] | BinaryIO
# A part of a stream as :func:`pieces` cuts it: buffers to send back to back.
Part = list[memoryview]

T = TypeVar("T")
R = TypeVar("R")


def chunks(source: Source) -> Iterator[bytes]:
    """The source's bytes as they come, in non-empty chunks."""
    if hasattr(source, "read"):
        read: Callable[[int], bytes] = source.read  # type: ignore[union-attr]
        while data := read(READ_SIZE):
            yield data
    else:
        for data in source:  # type: ignore[union-attr]
            if data:
                yield bytes(data)


def pieces(source: Source, size: int) -> Iterator[Part]:
    """The source cut into parts of exactly ``size`` bytes, the last one shorter (none at
    all for an empty source).  A part is the source's own chunks (or views of them, where a
    boundary cuts one), never joined: no byte is copied, and no part-sized buffer is
    allocated, so memory is the parts alive and nothing more."""
    part: Part = []
    filled = 0
    for data in chunks(source):
        view = memoryview(data)
        while filled + len(view) >= size:
            cut = size - filled
            part.append(view[:cut])
            view = view[cut:]
            filled = 0
            yield _taken(part)
        if view:
            part.append(view)
            filled += len(view)
    if part:
        yield _taken(part)


def _taken(part: Part) -> Part:
    """``part``'s pieces in a new list, ``part`` emptied: a suspended generator that yields
    this holds nothing of what it handed out."""
    whole = part[:]
    part.clear()
    return whole


def part_size_for(part_size: int, size_hint: int | None) -> int:
    """``part_size``, raised (to whole MiB) when ``size_hint`` bytes would need more than
    S3's part limit (with room to spare for a hint that was a little low)."""
    size = max(part_size, MIN_PART_SIZE)
    if size_hint:
        needed = -(-size_hint // (MAX_PARTS * 9 // 10))
        size = max(size, -(-needed // (1 << 20)) << 20)
    return size


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``fn`` over ``items`` on up to ``workers`` daemon threads, results in the items'
    order.  An item is taken from ``items`` only when fewer than ``workers`` are pending,
    so at most ``workers`` items and results (plus the one handed out) exist at once.

    The first exception is raised here once its turn comes; leaving early (an exception,
    or closing the iterator) cancels what has not started and waits for what has, so no
    thread still works on the caller's behalf afterwards."""
    pool = Workers(max(1, workers), "walsync-transfer")
    pending: collections.deque[Future] = collections.deque()
    try:
        for item in items:
            if len(pending) >= workers:
                yield pending.popleft().result()
            pending.append(pool.submit(fn, item))
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        for future in pending:
            if not future.cancelled():
                future.exception()  # waits; its error, if any, is the first one's echo
        pool.shutdown(wait=False)


def read_ranges(
    client: ReplicaClient,
    key: str,
    *,
    size: int | None = None,
    part_size: int = PART_SIZE,
    workers: int = TRANSFER_WORKERS,
) -> Iterator[bytes]:
    """The object's bytes in order, in pieces of ``part_size``, fetched by ranged GETs on
    ``workers`` threads at once: memory is about ``workers + 1`` pieces at any object size.

    ``size`` (from a listing, or :meth:`ReplicaClient.head`) saves one request.  An object
    that changes meanwhile is not detected here: walsync's objects are written once, and
    their readers check their SHA-256.  Write it to a file with ``for piece in ...:
    out.write(piece)``; feed a decompressor the same way."""
    if size is None:
        size = client.head(key).size
    starts = range(0, size, part_size)
    yield from ordered_map(
        lambda start: _range(client, key, start, min(part_size, size - start)), starts, workers
    )


def _range(client: ReplicaClient, key: str, start: int, length: int) -> bytes:
    data = client.get_range(key, start, length)
    if len(data) != length:
        from walsync_vfs.storage import StorageError

        raise StorageError(
            f"{client.url}/{key} shrank while being read: {len(data)} of {length} bytes "
            f"at offset {start}"
        )
    return data
