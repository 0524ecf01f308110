"""Rebuilding a database from its replica: plan from one LIST, replay, verify everything.

A restore picks the generation holding the target, downloads its snapshot and the segments
after it, checks every object's SHA-256 and the whole-database checksum after every commit,
runs ``PRAGMA integrity_check`` and only then moves the result to its final name.  The
snapshot and the parts of a commit bigger than a segment stream (parallel ranged GETs, zstd,
pages written as they come), so memory grows neither with the database nor with its
transactions; planning reads snapshot and segment headers only.

The checksum is kept as its value and the database's size (``format.ReadBackChecksum``), not
a hash per page, so memory does not grow with the database there either: the share of a page
a commit rewrites or cuts off is hashed again from the old page, read back from where it is
(:meth:`Image.old_hashes`): the page an earlier commit of the same segment gave, not written
yet, else the output (``PageSink.read``), a MiB at a time.  The parts of a commit never
repeat a page, so theirs are all in the output as it was before the commit.

Prefetch threads download and decode a few segments ahead, up to PREFETCH_BYTES (GET,
SHA-256 and zstd all release the GIL); the calling thread applies them strictly in txid
order, each whole segment checked in full before its pages are written in one batch.  A
commit in parts is written part by part, batch by batch, and counts only once its last part
has checked out: until then a failed check or download abandons it (a restore's file gets
back the pages its parts overwrote, a follower rolls its transaction back).  A restore that
meets an object compaction or retention of a live replica replaced keeps the image it has
built and plans only the rest (:func:`_restore_into`).  :class:`Follower` keeps applying new
segments as they arrive (``restore --follow``), in place, as SQLite transactions
(``inplace.py``).
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
import tempfile
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import BinaryIO, Protocol, TypeVar
from urllib.parse import quote, unquote

import apsw

from walsync_vfs import catalog, format, inplace, objects, storage
from walsync_vfs.dbfile import apply_pages, page_runs, read_pages, write_pages
from walsync_vfs.format import check_name
from walsync_vfs.storage.transfer import read_ranges
from walsync_vfs.workers import Workers

PREFETCH = 4  # segments downloaded and decoded ahead of the one being applied ...
PREFETCH_BYTES = 8 << 20  # ... as long as they come to no more than this (but always one)
STREAM_PIECE = 2 << 20  # the ranged GETs of a part of a commit, applied as it downloads
WRITE_BUFFER = 1 << 20  # snapshot pages arrive in order: write them a MiB at a time
INTEGRITY_MMAP = 16 << 20  # bytes of a restored file its integrity check maps (see below)
READ_BACK = 1 << 20  # bytes of old pages read back at once for the checksum


# Tries in a row that get a restore no further, when listed objects vanish or a listing has
# a hole (compaction or retention of a live replica), before the last error is final.
RESTORE_ATTEMPTS = 3


class RestoreError(Exception):
    """A restore cannot produce a correct database; the message is one line saying why."""


class Hole(RestoreError):
    """A listing has no segment for some txids of a generation's chain.  On a live replica a
    LIST is no snapshot: taken while compaction replaced those segments, it can miss both the
    originals and the merged one.  Planning again from a fresh listing decides."""


class Vanished(RestoreError):
    """An object listed a moment ago is gone: compaction or retention of a live replica
    replaced it between the LIST and the GET.  Planning again finds its replacement."""

    def __init__(self, key: str) -> None:
        super().__init__(f"{key}: object listed but missing")


@dataclass(frozen=True)
class Plan:
    """What to download: one snapshot, then segments that chain txid by txid."""

    name: str
    generation: str
    snapshot: format.ParsedKey
    segments: list[format.ParsedKey]
    target_txid: int | None  # None: replay to the end (or to the timestamp)
    sizes: Mapping[str, int]  # of the generation's objects, by key, from the listing


@dataclass(frozen=True)
class Result:
    txid: int
    time_ns: int
    db_size: int
    page_size: int


def split_url(url: str) -> tuple[str, str]:
    """``<replica root>/<name>`` -> (root, name); a file URL's name is percent-decoded, as
    its root is."""
    root, sep, name = url.rstrip("/").rpartition("/")
    if not sep or not root or root.endswith(":/") or root.endswith(":"):
        raise RestoreError(f"{url}: expected <replica root>/<database name>")
    if root.lower().startswith("file:"):
        name = unquote(name)
    try:
        check_name(name)
    except ValueError as exc:
        raise RestoreError(str(exc)) from exc
    return root, name


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def iso_time(ns: int) -> str:
    """A commit time as restore --timestamp reads it, to the nanosecond (UTC)."""
    seconds, fraction = divmod(ns, 1_000_000_000)
    whole = (EPOCH + timedelta(seconds=seconds)).isoformat(timespec="seconds")
    return whole.replace("+00:00", f".{fraction:09d}+00:00")


def _outside(
    client: storage.ReplicaClient,
    name: str,
    gens: list[catalog.Generation],
    txid: int | None,
    timestamp_ns: int | None,
) -> RestoreError:
    """The error for a target the replica cannot restore, saying what it can: a txid range,
    and for a timestamp the earliest restorable time (a snapshot header, on this path only)."""
    restorable = [g for g in gens if g.snapshots]
    if not restorable:
        return RestoreError(f"{name}: no generation has a snapshot, nothing can be restored")
    first = restorable[0].snapshots[0]
    available = catalog.spell_ranges([r for g in restorable for r in g.restorable()])
    if timestamp_ns is None:
        return RestoreError(
            f"{name}: txid {txid} is not in the retained history (available: {available})"
        )
    key = catalog.object_key(first)
    since = iso_time(objects.snapshot_header(client, key, restorable[0].sizes[key]).time_ns)
    return RestoreError(
        f"{name}: timestamp {iso_time(timestamp_ns)} is before the retained history "
        f"(available: {since} onwards, {available})"
    )


def _lacks_snapshot(
    client: storage.ReplicaClient,
    name: str,
    g: catalog.Generation,
    before: catalog.Generation | None,
    txid: int | None,
    timestamp_ns: int | None,
) -> RestoreError | None:
    """For a generation without a snapshot (lost: the engine writes it first): an error if the
    target is in it, rather than a silently older database from the generation ``before``.
    A time after that one's last commit may be in it: its snapshot, which is not there to
    date, was taken between the two."""
    start = int(g.id[:16], 16)  # the generation id begins with its snapshot's txid (FORMAT.md)
    if txid is not None:
        reached = txid >= start
    elif timestamp_ns is not None and g.segments:
        key = catalog.object_key(g.segments[0])
        header = objects.segment_header(client, key, g.sizes[key])
        reached = header.index[0].time_ns <= timestamp_ns or (
            before is not None and (ended := _end_time(client, before)) is not None
            and ended <= timestamp_ns
        )  # fmt: skip
    else:  # the latest state, or a time nothing in it can be dated by (a lone part)
        reached = True
    if not reached:
        return None
    held = f"txids {start}..{g.last_txid}" if g.last_txid >= start else f"its state at txid {start}"
    return RestoreError(
        f"{name}: generation {g.id} has no snapshot, so {held} cannot be restored; choose an "
        "earlier --txid or --timestamp"
    )


def _end_time(client: storage.ReplicaClient, g: catalog.Generation) -> int | None:
    """The time of the generation's last commit (None: nothing in it to date it by)."""
    last = max(g.snapshots + g.segments, key=lambda k: k.last_txid, default=None)
    if last is None:
        return None
    key = catalog.object_key(last)
    if last in g.segments:
        return objects.segment_header(client, key, g.sizes[key]).index[-1].time_ns
    return objects.snapshot_header(client, key, g.sizes[key]).time_ns


def _snapshot_at(
    client: storage.ReplicaClient, g: catalog.Generation, snaps: list[format.ParsedKey],
    timestamp_ns: int,
) -> format.ParsedKey | None:  # fmt: skip
    """The newest snapshot taken at or before the timestamp (read from headers alone)."""
    for snap in reversed(snaps):
        key = catalog.object_key(snap)
        if objects.snapshot_header(client, key, g.sizes[key]).time_ns <= timestamp_ns:
            return snap
    return None


def plan(
    client: storage.ReplicaClient,
    name: str,
    txid: int | None = None,
    timestamp_ns: int | None = None,
    damaged: frozenset[str] = frozenset(),
) -> Plan:
    """Choose the snapshot and the chain of segments that rebuild ``name`` as of ``txid`` or
    ``timestamp_ns`` (default: the newest commit), passing over the ``damaged`` snapshots.
    A hole in the chain before the target is an error, never a silently older database."""
    gens = catalog.generations(client, name)
    return _choose(client, name, gens, txid, timestamp_ns, damaged)


def _choose(
    client: storage.ReplicaClient,
    name: str,
    gens: list[catalog.Generation],
    txid: int | None = None,
    timestamp_ns: int | None = None,
    damaged: frozenset[str] = frozenset(),
) -> Plan:
    """`plan` from a listing already made (a follower lists once per poll)."""
    if not gens:
        raise RestoreError(f"no replica of {name!r} found at {client.url}")
    for i in reversed(range(len(gens))):
        g = gens[i]
        if not g.snapshots:
            before = gens[i - 1] if i else None
            if error := _lacks_snapshot(client, name, g, before, txid, timestamp_ns):
                raise error
            continue
        intact = [s for s in g.snapshots if catalog.object_key(s) not in damaged]
        snaps = [s for s in intact if txid is None or s.last_txid <= txid]
        if timestamp_ns is not None:
            found = _snapshot_at(client, g, snaps, timestamp_ns)
            snaps = [found] if found else []
        if not snaps:
            if len(intact) < len(g.snapshots):  # never an older generation instead
                raise RestoreError(f"{name}: no intact snapshot leads to the state asked for")
            continue
        snap = snaps[-1]
        chain = _chain(name, g, snap.last_txid, txid)
        reached = (chain[-1] if chain else snap).last_txid
        if txid is not None and reached < txid:
            raise _outside(client, name, gens, txid, timestamp_ns)
        if txid is None and reached < g.last_txid:
            # The generation goes on past what can be rebuilt (its later segments are
            # missing, or the snapshots after them damaged): its newest state, or the one at
            # the timestamp, may be among the commits that cannot be: never an older one.
            target = "its newest state" if timestamp_ns is None else (
                f"the state at {iso_time(timestamp_ns)}"
            )
            damage = " or damaged" if len(intact) < len(g.snapshots) else ""
            raise RestoreError(
                f"{name}: {target} cannot be restored: generation {g.id} goes on to txid "
                f"{g.last_txid}, but the segments after txid {reached} are missing{damage} "
                "(list shows what is there; an earlier --txid can be restored)"
            )
        return Plan(name, g.id, snap, chain, txid, g.sizes)
    raise _outside(client, name, gens, txid, timestamp_ns)


def _chain(
    name: str, g: catalog.Generation, after: int, txid: int | None = None
) -> list[format.ParsedKey]:
    """The segments of ``g`` that continue a database at txid ``after``, up to ``txid``
    (default: the generation's end).  A hole before the target is an error."""
    chain: list[format.ParsedKey] = []
    expected = after + 1
    for unit in catalog.units(g.segments):  # a whole segment, or every part of one commit
        seg = unit[0]
        if txid is not None and expected > txid:
            break
        if seg.last_txid < expected:
            continue  # already covered (a compacted segment overlaps smaller ones)
        if seg.first_txid > expected:
            raise Hole(
                f"{name}: segments for txids {expected}..{seg.first_txid - 1} are missing "
                f"in generation {g.id}"
            )
        chain += unit
        expected = seg.last_txid + 1
    return chain


@contextmanager
def prefetch_pool() -> Iterator[Workers]:
    """Daemon threads for downloads; leaving early drops the queued ones and waits for none
    in flight: a stopped follower must not wait for a store that hangs, nor keep the
    interpreter from exiting."""
    pool = Workers(PREFETCH, "walsync-prefetch")
    try:
        yield pool
    finally:
        pool.shutdown(wait=False, cancel=True)


@contextmanager
def uninterrupted() -> Iterator[None]:
    """A file and the result that says what it holds change together inside: a signal
    handler that would stop the command there defers the stop to the end of the block
    (:func:`defer`).  Handlers run on the main thread only, so only its blocks count."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _critical.append(None)
    try:
        yield
    finally:
        _critical.pop()
        if not _critical and _deferred:
            _deferred.pop()()


def defer(stop: Callable[[], None]) -> bool:
    """For a signal handler: run ``stop`` when the :func:`uninterrupted` block under way
    ends, and say so (False: none is, stop now)."""
    if not _critical:
        return False
    _deferred[:] = [stop]
    return True


_critical: list[None] = []  # the main thread's uninterrupted() blocks under way
_deferred: list[Callable[[], None]] = []  # a stop to run when the last one ends


Decoded = tuple[str, format.SegmentHeader, list[format.Commit]]
T = TypeVar("T")


def prefetched(
    pool: Workers,
    keys: list[str],
    fetch: Callable[[str], T],
    depth: int = PREFETCH,
    cost: Callable[[str], int] = lambda key: 0,
) -> Iterator[tuple[str, Future[T]]]:
    """``fetch(key)`` for each key in ``pool``, ``depth`` ahead (but no more than
    PREFETCH_BYTES of ``cost``, and always one), handed out in key order.

    The first ones start now rather than at the first ``next()``, so they overlap whatever
    the caller does first.  At most ``depth`` + 1 results are held at once; a failed fetch
    raises only from its own future, so a caller may carry on past it.
    """
    todo = deque(keys)
    window: deque[tuple[str, Future[T], int]] = deque()
    held = 0

    def fill() -> None:
        nonlocal held
        while todo and len(window) < depth:
            c = cost(todo[0])
            if window and held + c > PREFETCH_BYTES:
                return
            key = todo.popleft()
            window.append((key, pool.submit(fetch, key), c))
            held += c

    def in_order() -> Iterator[tuple[str, Future[T]]]:
        nonlocal held
        while window:
            key, future, c = window.popleft()
            held -= c
            fill()
            yield key, future

    fill()
    return in_order()


def decode_object(client: storage.ReplicaClient, key: str, upto_txid: int | None = None) -> Decoded:
    """Download one segment and check and decode it whole (SHA-256, frame, zstd, records,
    and that its key names its txids)."""
    return _named(key, *format.decode_segment(client.get(key), key, upto_txid))


def _named(key: str, header: format.SegmentHeader, commits: list[format.Commit]) -> Decoded:
    format.check_named(key, header.first_txid, header.last_txid)
    return key, header, commits


def _decoded(
    pool: Workers,
    client: storage.ReplicaClient,
    segments: list[format.ParsedKey],
    sizes: Mapping[str, int],
    upto_txid: int | None = None,
) -> Iterator[Decoded]:
    """Each segment downloaded and fully decoded in ``pool`` (see `prefetched`), in key order;
    the first bad one raises.  A part of a commit (the commit bigger than a segment) is only
    opened there: its pages come as it downloads (:func:`format.stream_part`).  The
    downloads start at once, not at the first ``next``."""
    streamed = {catalog.object_key(seg) for seg in segments if seg.parts}
    # Only an object's size is listed, not what it decompresses to: that is estimated at the
    # highest ratio decoded so far, and until one is decoded, only one is fetched.  A replica
    # of very compressible pages (a segment of zeros is a hundredth of its pages) must not
    # have a window of them decoded at once.
    ratio = 0.0

    def fetch(key: str) -> Decoded | None:
        nonlocal ratio
        if key in streamed:
            return None
        decoded = decode_object(client, key, upto_txid)
        # Two fetches ending together may keep the lower ratio: the next one raises it again.
        ratio = max(ratio, decoded[1].raw_length / max(1, sizes.get(key, 0)))
        return decoded

    def pieces(key: str) -> Iterator[bytes]:
        try:
            yield from read_ranges(client, key, size=sizes[key], part_size=STREAM_PIECE)
        except storage.ObjectNotFound:
            raise Vanished(key) from None

    def open_part(key: str) -> Decoded:
        # Opened only when its turn comes: its pieces download while it is applied.
        return _named(key, *format.stream_part(pieces(key), sizes[key], key, upto_txid))

    def cost(key: str) -> int:
        # What a decoded segment holds: the object, and what it decompresses to.
        if key in streamed:
            return 0
        size = sizes.get(key, 0)
        return size + int(size * ratio) if ratio else PREFETCH_BYTES + 1  # over: fetched alone

    keys = [catalog.object_key(seg) for seg in segments]
    fetched = prefetched(pool, keys, fetch, cost=cost)

    def results() -> Iterator[Decoded]:
        for key, future in fetched:
            try:
                yield future.result() or open_part(key)
            except storage.ObjectNotFound:
                raise Vanished(key) from None

    return results()


@contextmanager
def _progress(total: int, desc: str, enabled: bool) -> Iterator[Callable[[], object]]:
    """A tick per object on a terminal's progress bar; tqdm is imported only then."""
    if not enabled:
        yield lambda: None
        return
    from tqdm import tqdm

    with tqdm(total=total, unit="obj", desc=desc, initial=1) as bar:
        yield lambda: bar.update(1)


@dataclass
class _Assembly:
    """A commit whose parts (FORMAT.md §4.5) are being applied: what its next part must be."""

    commit: format.Commit  # as its first part states it (pages aside)
    count: int
    commit_pages: int
    old_size: int  # the database's size before the commit
    next: int = 0  # the part expected next
    last_pgno: int = 0
    pages: int = 0  # pages applied so far
    new_pages: int = 0  # of them, pages past old_size

    def same(self, c: format.Commit) -> bool:
        a = self.commit
        return (c.txid, c.time_ns, c.db_size, c.checksum, c.wal) == (
            a.txid, a.time_ns, a.db_size, a.checksum, a.wal
        )  # fmt: skip


class PageSink(Protocol):
    """Where an image's verified pages go.  ``write`` may be called several times for one
    commit applied in parts; ``commit`` follows once the pages written since the last one
    are a whole commit's (or segment's), ``abandon`` if they are not to be kept.  ``read``
    gives ``count`` pages from ``first`` as the last commit left them, for any page the commit
    in progress has not written (zeros past the end)."""

    def write(self, pages: Sequence[tuple[int, format.Page]], db_size: int) -> None: ...

    def read(self, first: int, count: int) -> bytes: ...

    def commit(self, db_size: int) -> None: ...

    def abandon(self) -> None: ...


class FileSink:
    """A file nobody reads until it is complete: pages go straight in, past ``f``'s buffer
    (``apply_pages`` flushes it first), so they read back straight too.

    A commit in parts abandoned half-way (a restore that carries on after a part vanished)
    leaves the file as the last commit left it: the pages its parts overwrite are saved
    first, in an unnamed file next to ``f``, and put back, and the size is set back.  A write
    that ``commit`` follows at once (a whole segment, a commit's last batch) needs no saving,
    so each write waits for the next call to tell which it is: memory holds one batch.
    """

    def __init__(self, f: BinaryIO, page_size: int, db_size: int) -> None:
        self.file = f
        self.page_size = page_size
        self.db_size = db_size  # as the last commit left it
        self._held: Sequence[tuple[int, format.Page]] = ()
        self._written = False  # pages of the commit in progress are in the file
        self._originals: BinaryIO | None = None  # of the pages they overwrote, in order
        self._original_pgnos = array("I")

    def write(self, pages: Sequence[tuple[int, format.Page]], db_size: int) -> None:
        if self._held:
            self._write_undoably(self._held)
        self._held = pages

    def read(self, first: int, count: int) -> bytes:
        return read_pages(self.file.fileno(), self.page_size, first, count)

    def commit(self, db_size: int) -> None:
        apply_pages(self.file, self.page_size, db_size, self._held)
        self.db_size = db_size
        self._forget()

    def abandon(self) -> None:
        if self._written:
            fd = self.file.fileno()
            if self._originals is not None:
                write_pages(fd, self.page_size, self._saved())
            os.ftruncate(fd, self.db_size * self.page_size)
        self._forget()

    def _write_undoably(self, pages: Sequence[tuple[int, format.Page]]) -> None:
        """Write pages of a commit still in progress, saving those they overwrite first (the
        pages past the last commit's size need no saving: ``abandon`` cuts them off, and only
        ``commit`` sets the size).  The parts of a commit never repeat a page, so each page
        is saved once, before the commit's first write to it."""
        fd, page_size = self.file.fileno(), self.page_size
        self.file.flush()
        overwritten = [pgno for pgno, _ in pages if pgno <= self.db_size]
        if overwritten:
            originals = self._originals or self._new_originals()
            runs = page_runs(((pgno, pgno) for pgno in overwritten), max(1, READ_BACK // page_size))
            for first, run in runs:
                originals.write(read_pages(fd, page_size, first, len(run)))
            self._original_pgnos.extend(overwritten)
        self._written = True
        write_pages(fd, page_size, pages)

    def _new_originals(self) -> BinaryIO:
        """The unnamed file for saved pages, next to the output (it has room for them)."""
        name = self.file.name  # an int for a file opened from a descriptor
        folder = os.path.dirname(os.path.abspath(name)) if isinstance(name, str) else None
        self._originals = tempfile.TemporaryFile(dir=folder)  # noqa: SIM115 (see _forget)
        return self._originals

    def _saved(self) -> Iterator[tuple[int, format.Page]]:
        """The saved originals, read back a run at a time."""
        assert self._originals is not None
        self._originals.seek(0)
        size = self.page_size
        step = max(1, READ_BACK // size)
        for i in range(0, len(self._original_pgnos), step):
            pgnos = self._original_pgnos[i : i + step]
            run = memoryview(self._originals.read(len(pgnos) * size))
            yield from ((pgno, run[k * size : (k + 1) * size]) for k, pgno in enumerate(pgnos))

    def _forget(self) -> None:
        """Nothing of a commit in progress any more: drop what was held or saved for it."""
        self._held, self._written = (), False
        if self._originals is not None:
            self._originals.close()
            self._originals = None
        self._original_pgnos = array("I")


class Image:
    """A database being rebuilt, with its whole-database checksum and last commit."""

    def __init__(
        self, sink: PageSink, generation: str, checksum: format.ReadBackChecksum, result: Result
    ) -> None:
        self.sink = sink
        self.generation = generation
        self.checksum = checksum
        self.result = result
        # A commit applied in parts, some of them written already: until its last part has
        # checked out, the file is no commit's image.
        self.assembly: _Assembly | None = None

    @classmethod
    def from_snapshot(
        cls,
        f: BinaryIO,
        generation: str,
        snapshot: tuple[format.SnapshotHeader, Iterator[format.Page]],
    ) -> Image:
        """Write a snapshot's pages, as they stream in, into the empty file ``f``; the reader
        (``objects.open_snapshot``) checks SHA-256 and checksum before the last page, so the
        checksum its header states is the image's."""
        header, pages = snapshot
        f.writelines(pages)
        f.flush()
        checksum = format.ReadBackChecksum(header.checksum, header.db_size)
        result = Result(header.txid, header.time_ns, header.db_size, header.page_size)
        sink = FileSink(f, header.page_size, header.db_size)
        return cls(sink, generation, checksum, result)

    def apply_segment(
        self,
        key: str,
        header: format.SegmentHeader,
        commits: list[format.Commit],
        timestamp_ns: int | None = None,
    ) -> bool:
        """Check one segment's commits against the image, then write their pages in one batch.

        Commits already in the image are skipped; False once a commit later than
        ``timestamp_ns`` ends the replay.  Every error is raised before anything is written,
        but after the checksum has taken in the commits checked so far.
        """
        page_size = self.result.page_size
        if header.page_size != page_size:
            raise RestoreError(f"{key}: page size {header.page_size}, snapshot has {page_size}")
        if header.part is not None:
            return not commits or self._apply_part(key, header.part, commits[0], timestamp_ns)
        if self.assembly is not None:
            raise RestoreError(f"{key}: txid {self.assembly.commit.txid} lacks parts")
        pages: dict[int, format.Page] = {}  # a page rewritten by several commits is written once
        old = self.old_hashes(pages)
        result, reached = self.result, False
        for commit in commits:
            if commit.txid <= result.txid:
                continue
            if commit.txid != result.txid + 1:
                raise RestoreError(f"{key}: expected txid {result.txid + 1}, got {commit.txid}")
            if timestamp_ns is not None and commit.time_ns > timestamp_ns:
                reached = True
                break
            try:
                self.checksum.apply(commit.db_size, commit.pages, page_size, old)
            except ValueError as exc:
                raise RestoreError(f"{key}: txid {commit.txid}: {exc}") from None
            if self.checksum.value != commit.checksum:
                raise RestoreError(
                    f"{key}: whole-database checksum mismatch after txid {commit.txid}"
                )
            pages.update(commit.pages)
            result = Result(commit.txid, commit.time_ns, commit.db_size, page_size)
        if result is not self.result:
            kept = sorted(item for item in pages.items() if item[0] <= result.db_size)
            self.sink.write(kept, result.db_size)
            with uninterrupted():
                self.sink.commit(result.db_size)
                self.result = result
        return not reached

    def _apply_part(
        self, key: str, part: format.Part, commit: format.Commit, timestamp_ns: int | None
    ) -> bool:
        """Check one part of a commit against the parts before it and write its pages; the
        last part checks the whole commit.  False if the commit is later than
        ``timestamp_ns``, which ends the replay."""
        a, result = self.assembly, self.result
        if a is None and commit.txid <= result.txid:
            return True  # already in the image
        if part.index == 0 and a is None:
            if commit.txid != result.txid + 1:
                raise RestoreError(f"{key}: expected txid {result.txid + 1}, got {commit.txid}")
            if timestamp_ns is not None and commit.time_ns > timestamp_ns:
                return False
            old_size = self.checksum.resize(commit.db_size, result.page_size, self.stored_hashes)
            a = self.assembly = _Assembly(commit, part.count, part.commit_pages, old_size)
        if (
            a is None
            or (part.index, part.count, part.commit_pages) != (a.next, a.count, a.commit_pages)
            or not a.same(commit)
        ):
            wanted = f"part {a.next} of txid {a.commit.txid}" if a else "a first part"
            raise RestoreError(f"{key}: part {part.index} of txid {commit.txid}, expected {wanted}")
        pages = commit.pages
        for batch in pages.batches() if isinstance(pages, format.StreamedPages) else (pages,):
            pgnos = [pgno for pgno, _ in batch]
            if pgnos and pgnos[0] <= a.last_pgno:
                raise RestoreError(f"{key}: page {pgnos[0]} after page {a.last_pgno} of the commit")
            try:  # the pages before this commit are in the sink: parts never repeat a page
                self.checksum.update(batch, a.old_size, result.page_size, self.stored_hashes)
            except ValueError as exc:
                raise RestoreError(f"{key}: txid {commit.txid}: {exc}") from None
            self.sink.write(batch, commit.db_size)
            a.pages += len(pgnos)
            a.new_pages += sum(1 for pgno in pgnos if pgno > a.old_size)
            a.last_pgno = pgnos[-1] if pgnos else a.last_pgno
        a.next += 1
        if not part.last:
            return True
        self.assembly = None
        given = format.new_pages(a.old_size, commit.db_size, result.page_size)
        if a.pages != a.commit_pages or a.new_pages != given:
            raise RestoreError(f"{key}: the parts of txid {commit.txid} lack pages")
        if self.checksum.value != commit.checksum:
            raise RestoreError(f"{key}: whole-database checksum mismatch after txid {commit.txid}")
        with uninterrupted():
            self.sink.commit(commit.db_size)
            self.result = Result(commit.txid, commit.time_ns, commit.db_size, result.page_size)
        return True

    def abandon(self, checksum: format.ReadBackChecksum) -> None:
        """Back to the last commit written in full, whose checksum was ``checksum``: what was
        written since is dropped (a failed check, a failed write)."""
        self.sink.abandon()
        self.checksum = checksum
        self.assembly = None

    def stored_hashes(self, first: int, count: int) -> int:
        """The XOR of the page hashes of ``count`` pages from ``first`` as the sink holds
        them, read a bounded run at a time (a shrink may cut off most of the database)."""
        page_size = self.result.page_size
        step = max(1, READ_BACK // page_size)
        value = 0
        for start in range(first, first + count, step):
            n = min(step, first + count - start)
            value ^= format.run_hash(start, self.sink.read(start, n), page_size)
        return value

    def old_hashes(self, pending: dict[int, format.Page]) -> format.OldHashes:
        """Old pages for the checksum of a segment's next commit: the page an earlier commit
        of the segment wrote (``pending``, not in the sink yet), else the sink's."""

        def old(first: int, count: int) -> int:
            if not pending:
                return self.stored_hashes(first, count)
            value, start = 0, first
            for pgno in range(first, first + count):
                data = pending.get(pgno)
                if data is not None:
                    value ^= format.page_hash(pgno, data) ^ self.stored_hashes(start, pgno - start)
                    start = pgno + 1
            return value ^ self.stored_hashes(start, first + count - start)

        return old


def _apply(
    image: Image,
    segments: Iterator[Decoded],
    timestamp_ns: int | None = None,
    tick: Callable[[], object] = lambda: None,
) -> None:
    """Apply decoded segments to ``image`` in order, until one holds a commit later than
    ``timestamp_ns``.  On any error, from a segment or from its download, the image is back
    at the last commit applied in full (a commit in parts half applied is abandoned), so
    whoever carries on starts from there."""
    saved = image.checksum.copy()  # as of the last commit applied in full
    try:
        for key, header, commits in segments:
            tick()
            more = image.apply_segment(key, header, commits, timestamp_ns)
            if image.assembly is None:
                saved = image.checksum.copy()
            if not more:
                break
    except BaseException:
        image.abandon(saved)
        raise


def _carry_on(
    client: storage.ReplicaClient,
    name: str,
    image: Image,
    g: catalog.Generation,
    upto_txid: int | None = None,
    timestamp_ns: int | None = None,
    progress: bool = False,
) -> None:
    """Continue ``image`` along ``g``'s chain from its txid, up to ``upto_txid`` (default:
    the generation's end) or ``timestamp_ns``; see `_apply` for errors.  A hole in the
    chain raises Hole before anything is applied.  The progress bar counts the image so far
    as one object, as it counts a snapshot."""
    chain = _chain(name, g, image.result.txid, upto_txid)
    with prefetch_pool() as pool, _progress(len(chain) + 1, name, progress) as tick:
        _apply(image, _decoded(pool, client, chain, g.sizes, upto_txid), timestamp_ns, tick)


def _replay(
    client: storage.ReplicaClient,
    p: Plan,
    f: BinaryIO,
    timestamp_ns: int | None = None,
    progress: bool = False,
    started: Callable[[Image], object] = lambda image: None,
) -> Image:
    """Write the planned state into ``f``: the snapshot streams in while the first segments
    download, then each segment is applied as soon as it is decoded.  ``started`` gets the
    image once the snapshot is in: if a segment fails, the image is at the last commit
    applied in full, and a caller can carry on from there."""
    snap_key = catalog.object_key(p.snapshot)
    with prefetch_pool() as pool:
        segments = _decoded(pool, client, p.segments, p.sizes, p.target_txid)
        try:
            snapshot = objects.open_snapshot(client, snap_key, p.sizes[snap_key])
            image = Image.from_snapshot(f, p.generation, snapshot)
        except storage.ObjectNotFound:
            raise Vanished(snap_key) from None
        started(image)
        with _progress(len(p.segments) + 1, p.name, progress) as tick:
            _apply(image, segments, timestamp_ns, tick)
    return image


def replay(
    client: storage.ReplicaClient,
    p: Plan,
    out_path: str,
    timestamp_ns: int | None = None,
    progress: bool = False,
) -> Result:
    """Write the planned state into ``out_path`` (created or truncated), verifying as it goes."""
    with open(out_path, "w+b", buffering=WRITE_BUFFER) as f:
        return _replay(client, p, f, timestamp_ns, progress).result


def _planned_end(p: Plan) -> int:
    """The last txid ``p`` replays (a timestamp may end it sooner)."""
    end = (p.segments[-1] if p.segments else p.snapshot).last_txid
    return end if p.target_txid is None else min(end, p.target_txid)


def _continuable(client: storage.ReplicaClient, p: Plan, image: Image) -> catalog.Generation | None:
    """``p``'s generation in a fresh listing, for ``image`` (built from ``p``) to continue
    in; None if the generation or ``p``'s snapshot is gone: retention may have removed
    segments after the image too, and only a new plan can tell.  Raises Hole if the
    generation now ends before ``p``'s chain did: a LIST taken while compaction replaced the
    last segments can miss them, and the restore must not come out older than planned."""
    gens = catalog.generations(client, p.name)
    g = next((g for g in gens if g.id == p.generation), None)
    if g is None or catalog.object_key(p.snapshot) not in g.sizes:
        return None
    listed, planned = max(g.last_txid, image.result.txid), _planned_end(p)
    if listed < planned:
        raise Hole(
            f"{p.name}: segments for txids {listed + 1}..{planned} are missing in generation {g.id}"
        )
    return g


def _restore_into(
    client: storage.ReplicaClient,
    name: str,
    f: BinaryIO,
    txid: int | None = None,
    timestamp_ns: int | None = None,
    progress: bool = False,
) -> Result:
    """Write ``name`` as of ``txid`` or ``timestamp_ns`` (default: its newest commit) into
    the empty file ``f``.

    A live replica can change under a restore (Vanished, Hole: compaction or retention
    replaced objects it listed), mostly the newest segments, which it reads last.  The image
    built so far is kept, and the rest of the plan, up to the txid it ends at, is found in a
    fresh listing: from scratch only when that rest cannot follow the image (see
    `_continuable`).  RESTORE_ATTEMPTS tries in a row that take the image no further make
    the last error final (one that does is not counted: the image cannot go past the end of
    its plan).
    """
    p: Plan | None = None
    image: Image | None = None

    def started(built: Image) -> None:
        nonlocal image
        image = built

    stalled = 0
    damaged: set[str] = set()  # snapshots that failed their checks: restore around them
    first_damage: format.CorruptObject | None = None
    while True:
        reached = image.result.txid if image is not None else None
        try:
            if p is None or image is None or (g := _continuable(client, p, image)) is None:
                p, image = plan(client, name, txid, timestamp_ns, frozenset(damaged)), None
                f.seek(0)
                f.truncate()
                image = _replay(client, p, f, timestamp_ns, progress, started)
            else:
                _carry_on(client, name, image, g, _planned_end(p), timestamp_ns, progress)
            return image.result
        except RestoreError as exc:
            if first_damage is not None:
                raise first_damage from None  # what stands between the target and the rest
            if not isinstance(exc, Vanished | Hole):
                raise
            progressed = image is not None and (reached is None or image.result.txid > reached)
            stalled = 0 if progressed else stalled + 1
            if stalled == RESTORE_ATTEMPTS:
                raise
        except format.CorruptObject as exc:
            if p is None or exc.key != catalog.object_key(p.snapshot) or exc.key in damaged:
                raise
            # An earlier snapshot and the segments after it may rebuild the same state.
            damaged.add(exc.key)
            first_damage = first_damage or exc
            p = image = None


def _output_path(out: str, force: bool) -> str:
    """``out`` as an absolute path without symlinks, once it is a place a database file can
    be installed: a new file in an existing directory, or with ``force`` an existing regular
    file (a device, pipe or directory is never replaced)."""
    if not out:
        raise RestoreError("the output path is empty; name the database file to write")
    if out == "-":
        raise RestoreError("restore writes a database file, not standard output; name the file")
    if out.endswith(os.sep):
        raise RestoreError(f"{out} names a directory; name the database file to write")
    # Through a symlink, the database is its target: that file is checked and replaced.
    out = os.path.realpath(out)
    if os.path.islink(out):
        raise RestoreError(f"{out} is a symlink that leads to no file (a loop); fix the link")
    where = os.path.dirname(out)
    if not os.path.isdir(where):
        raise RestoreError(f"{where}: no such directory to restore {os.path.basename(out)} in")
    if os.path.exists(out):
        if not stat.S_ISREG(os.stat(out).st_mode):
            raise RestoreError(f"{out} exists and is not a regular file; restore to a file path")
        if not force:
            raise RestoreError(f"{out} already exists; pass --force to overwrite it")
        fd = _keep(out)  # a follower's output: not while that follower runs
        if fd is not None:
            os.close(fd)
        if seen := _open_elsewhere(out):
            raise RestoreError(
                f"{out} is open ({seen}); close it first, or restore to another path"
            )
    return out


def _keep(path: str) -> int | None:
    """A descriptor holding the follower lock of the file at ``path`` (a ``flock``, which
    SQLite's POSIX locks never meet); None if there is no file there.  Raises RestoreError
    if another follower holds it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    _lock_or_refuse(fd, f"{path} is kept up to date by another follower; stop it first")
    return fd


def _lock_or_refuse(fd: int, refusal: str) -> None:
    """Take the ``flock`` of ``fd``, or close it and raise RestoreError(refusal) if another
    process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RestoreError(refusal) from None


# struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid.
_FLOCK = struct.Struct("hh4xqqi4x")
_SHM_DMS = 128  # the wal-index byte every connection to a WAL database holds a read lock on
# A database file's lock bytes from PENDING_BYTE: pending, reserved and the shared range.
_LOCK_BYTES = inplace.SHARED_FIRST + inplace.SHARED_SIZE - inplace.PENDING_BYTE
FENCE_ATTEMPTS = 100


def _open_elsewhere(path: str) -> str | None:
    """How a process is seen to have the database at ``path`` open, or None: in WAL mode each
    SQLite connection holds a read lock on its wal-index's DMS byte while it is open
    (src/os_unix.c, unixShmMap); in a rollback journal mode, only a connection inside a
    transaction holds a lock, on the database file's lock bytes (an idle one holds none, and
    goes on reading the file it opened).  Open-file-description locks test both without
    touching this process's own locks."""
    for file, start, length, seen in (
        (path + "-shm", _SHM_DMS, 1, "its wal-index is in use"),
        (path, inplace.PENDING_BYTE, _LOCK_BYTES, "a connection is inside a transaction on it"),
    ):
        try:
            fd = os.open(file, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue  # no wal-index: no connection in WAL mode (the file is there)
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, 0, start, length, 0))
        except OSError:
            return seen
        finally:
            os.close(fd)  # drops that lock, and no other
    return None


def _fence_off(path: str) -> int | None:
    """Before the file at ``path`` is replaced: a descriptor holding its RESERVED byte, as a
    writer in the middle of a transaction would.  Connections still open on it go on reading
    it, but take no journal at ``path``-journal for a hot one of theirs: rolling the new
    file's journal back into the old file would delete it under the follower's update.  None
    if there is no file."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    reserved = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, inplace.RESERVED_BYTE, 1, 0)
    for _ in range(FENCE_ATTEMPTS):  # a writer of it may hold it a moment
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, reserved)
            break
        except OSError:
            time.sleep(0.01)
    return fd


STAGE_ATTEMPTS = 10


@dataclass
class _Stage:
    """The temporary file a new output is built in, and the descriptor of its lock."""

    path: str
    fd: int

    def keep_lock(self) -> int:
        """Once the file is installed as the output: its lock, for a follower to keep as
        the output's (see :func:`_keep`)."""
        fd, self.fd = self.fd, -1
        return fd


@contextmanager
def _staged(out: str) -> Iterator[_Stage]:
    """The temporary file a new ``out`` is built under, removed unless it was installed.  It
    is locked (a ``flock``) while it is built and installed: a second restore or follower of
    the same ``out`` is refused instead of writing into it.  One left by a restore that was
    killed holds no lock: it is taken over."""
    tmp = f"{out}.walsync-tmp"
    for _ in range(STAGE_ATTEMPTS):
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        _lock_or_refuse(
            fd,
            f"{out} is being restored by another process ({tmp} is in use); wait for it to "
            "finish, or restore to another path",
        )
        if _same_file(fd, tmp):
            break
        os.close(fd)  # the one it opened was installed or removed meanwhile: open anew
    else:
        raise RestoreError(f"{tmp} keeps changing under this restore; restore to another path")
    stage = _Stage(tmp, fd)
    try:
        yield stage
    finally:
        if _same_file(fd, tmp):  # not installed
            os.remove(tmp)
        if stage.fd >= 0:
            os.close(stage.fd)


def _same_file(fd: int, path: str) -> bool:
    """Whether ``path`` names the file open as ``fd``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def first_integrity_problem(path: str, mmap: bool = True, live: bool = False) -> str | None:
    """SQLite's first ``PRAGMA integrity_check`` complaint about the database at ``path``, or
    None if it is sound.  Opened immutable (no ``-wal``/``-shm`` is created), or for a
    ``live`` rollback-mode file others write, as a plain reader that waits for the writer.
    Reading through mmap is faster, but what is mapped counts in the process's RSS: only the
    first INTEGRITY_MMAP bytes are, the rest is read."""
    check = apsw.Connection(
        f"file:{quote(path)}" + ("" if live else "?immutable=1"),
        flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI,
        vfs="unix",
    )
    try:
        check.setbusytimeout(int(inplace.LOCK_TIMEOUT * 1000))
        if mmap:
            check.execute(f"PRAGMA mmap_size={min(os.path.getsize(path), INTEGRITY_MMAP)}")
        problems = [r[0] for r in check.execute("PRAGMA integrity_check")]
    except apsw.Error as exc:  # too broken to check at all ("database disk image is malformed")
        return str(exc)
    finally:
        check.close()
    if problems == ["ok"]:
        return None
    # Rows may hold several lines under "*** in database main ***".
    return next(line for row in problems for line in row.splitlines() if line[:3] != "***")


def _install(tmp: str, out: str) -> None:
    """Check ``tmp`` with SQLite, make it durable, and rename it over ``out``: whoever opens
    ``out`` gets the old file or the new one, complete."""
    _check_durable(tmp)
    _replace(tmp, out)


def _check_durable(tmp: str) -> None:
    """``PRAGMA integrity_check`` of ``tmp``, and fsync.  The fsync runs alongside the check
    (one writes the file back, the other reads it; both release the GIL)."""
    with open(tmp, "rb+") as f, ThreadPoolExecutor(1) as pool:
        synced = pool.submit(os.fsync, f.fileno())
        problem = first_integrity_problem(tmp)
        synced.result()
    if problem is not None:
        raise RestoreError(f"restored database fails integrity_check: {problem}")


def _replace(tmp: str, out: str) -> None:
    """Rename the checked ``tmp`` over ``out``."""
    for suffix in ("-wal", "-shm", "-journal"):  # a stale WAL would be applied on open
        if os.path.exists(out + suffix):
            os.remove(out + suffix)
    os.replace(tmp, out)


def restore(
    url: str,
    out: str,
    txid: int | None = None,
    timestamp_ns: int | None = None,
    force: bool = False,
    client_options: dict | None = None,
    progress: bool = False,
) -> Result:
    """Restore ``url`` (replica root + '/' + name) into the file ``out``; see module docstring."""
    root, name = split_url(url)
    out = _output_path(out, force)
    client = storage.open_replica(root, **(client_options or {}))
    return restore_from(client, name, out, txid, timestamp_ns, progress, force)


def restore_from(
    client: storage.ReplicaClient,
    name: str,
    out: str,
    txid: int | None = None,
    timestamp_ns: int | None = None,
    progress: bool = False,
    force: bool = True,
) -> Result:
    """:func:`restore` through an open client, into a checked output path (without
    ``force``, one that did not exist: another restore may have made it meanwhile)."""
    try:
        with _staged(out) as stage:
            tmp = stage.path
            with open(tmp, "w+b", buffering=WRITE_BUFFER) as f:
                result = _restore_into(client, name, f, txid, timestamp_ns, progress)
            if txid is not None and result.txid != txid:
                raise RestoreError(f"{name}: replay ended at txid {result.txid}, wanted {txid}")
            if not force and os.path.exists(out):  # restores of one out take turns on tmp
                raise RestoreError(
                    f"{out} was made by another restore meanwhile; pass --force to overwrite it"
                )
            _install(tmp, out)
            return result
    except format.CorruptObject as exc:
        raise RestoreError(str(exc)) from exc


class Follower:
    """Keeps ``out`` a verified copy of a replicated database's newest state (a read replica).

    ``out`` is a rollback-journal-mode database that other processes read with plain SQLite.
    The first image (snapshot and chain) is built under a temporary name, checked with
    ``PRAGMA integrity_check`` and renamed over ``out``; so is the image of a new generation.
    After that every new segment is checked in full (SHA-256, whole-database checksum)
    before any of its pages is written, then applied in place as one SQLite write
    transaction (``inplace.LiveDatabase``: SQLite's locks and hot journal), so a reader sees
    each commit whole or not at all, and a follower killed half-way leaves a hot journal
    that the next read-write opener of ``out`` (or the next follower) rolls back.  A commit
    stored in parts is one transaction across its parts.  Rollback-journal mode because
    readers of a WAL database would need the writer's ``-wal``/``-shm``.
    """

    def __init__(
        self, url: str, out: str, force: bool = False, client_options: dict | None = None
    ) -> None:
        root, self.name = split_url(url)
        self.out = _output_path(out, force)
        self._kept = _keep(self.out)  # one follower per output file
        inplace.roll_back(self.out)  # left by a follower killed mid-update: undo it first
        self.client = storage.open_replica(root, **(client_options or {}))
        self.published: Result | None = None
        self.generation: str | None = None  # of the published file
        self._image: Image | None = None
        self._live: inplace.LiveDatabase | None = None
        self._fence: int | None = None  # the file it replaced last, for connections still on it

    def __enter__(self) -> Follower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop writing ``out``; it stays at its last commit."""
        self._drop()
        for fd in (self._fence, self._kept):
            if fd is not None:
                os.close(fd)
        self._fence = self._kept = None

    def poll(self) -> bool:
        """Bring ``out`` up to the replica's newest commit; True if ``out`` changed.

        On error ``out`` is left at the last commit applied in full, and the next poll
        carries on from there.
        """
        before = (self.published, self.generation)
        try:
            try:
                self._poll()
            except (Vanished, Hole, storage.ObjectNotFound):
                self._poll()  # listed, then replaced by compaction or retention: list again
        finally:  # after an error too: the segments applied before a bad one are out
            if self._image is not None:
                self.published, self.generation = self._image.result, self._image.generation
        return (self.published, self.generation) != before

    def integrity_problem(self) -> str | None:
        """``PRAGMA integrity_check`` of ``out`` as readers see it (None: ok).  Called
        between polls, when this process holds no lock on it."""
        return first_integrity_problem(self.out, mmap=False, live=True)

    def _poll(self) -> None:
        gens = catalog.generations(self.client, self.name)
        p = _choose(self.client, self.name, gens)
        if not self._catch_up(p, gens):
            self._rebuild(p)

    def _catch_up(self, p: Plan, gens: list[catalog.Generation]) -> bool:
        """Apply the new segments of ``out``'s generation; False when it has to start over
        from ``p``'s snapshot (a new generation, or retention removed segments it needs)."""
        image = self._image
        if image is None or image.generation != p.generation:
            return False
        (g,) = [g for g in gens if g.id == p.generation]
        try:
            _carry_on(self.client, self.name, image, g)
        except Hole:
            return False
        except inplace.ForeignWriter:
            self._drop()  # out no longer holds this image: rebuilt at the next poll
            raise
        return True

    def _rebuild(self, p: Plan) -> None:
        """Build ``p``'s image under a temporary name and install it as ``out``."""
        self._drop()
        inplace.roll_back(self.out)  # readers see the last commit while the new one builds
        with _staged(self.out) as stage:
            with open(stage.path, "w+b", buffering=WRITE_BUFFER) as f:
                image = _replay(self.client, p, f)
                page1 = image.sink.read(1, 1)  # as the replica has it, for the checksum
                inplace.set_rollback_mode(f)
            _check_durable(stage.path)
            with uninterrupted():  # out and what this follower says it holds change together
                self._take_over(stage, image, page1)

    def _take_over(self, stage: _Stage, image: Image, page1: bytes) -> None:
        """Rename the checked image over ``out`` and go on writing it in place."""
        fence = _fence_off(self.out)
        _replace(stage.path, self.out)
        kept, self._kept = self._kept, stage.keep_lock()  # the lock moved with the file
        if kept is not None:
            os.close(kept)
        if fence is not None:  # a fenced file keeps its disk space: the last one only
            if self._fence is not None:
                os.close(self._fence)
            self._fence = fence
        self._live = inplace.LiveDatabase(self.out, image.result.page_size, page1)
        image.sink = self._live
        self._image = image

    def _drop(self) -> None:
        self._image = None
        if self._live is not None:
            self._live.close()
            self._live = None
