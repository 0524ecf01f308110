"""Sync points: reading a database's exact bytes (and the replica's head) while its WAL is
pinned, and writing what the lineage decision needs -- recovered commits, a snapshot.

On the first OPEN, after a GAP and on reopen, the engine takes a :class:`capture.SyncPoint`
and reads the database's pages into a temporary file, computing their whole-db checksum;
:func:`lineage.decide` then says whether the lineage continues.  A snapshot streams from that
file to the store after the sync point is released (:func:`objects.put_snapshot`), so writers
go on while it uploads and memory stays a few MiB at any database size.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import BinaryIO

from walsync_vfs import capture, format, recovery, storage
from walsync_vfs.capture import Record
from walsync_vfs.dbfile import tee
from walsync_vfs.lineage import Decision, Head, holds
from walsync_vfs.objects import put_snapshot
from walsync_vfs.spool import Spool
from walsync_vfs.uploader import encode_commits

log = logging.getLogger("walsync_vfs")

READ_SIZE = 1 << 20  # bytes of spooled pages read at a time while a snapshot streams up

HEAD_WAIT = 1.0  # seconds a first sync keeps the WAL pinned waiting for the replica's head


@dataclass(slots=True)
class SyncState:
    """Where a database's sync stands, and the commits that arrive meanwhile."""

    syncing: bool = False
    retries: int = 0  # consecutive failed syncs (their backoff)
    resync: bool = False  # a GAP or reopen arrived while a sync was running
    broken: bool = False  # commits were dropped during a sync: its lineage cannot go on
    # Commits that arrived during a sync, in order; past a share of the memory cap, in the
    # spool (they keep their restore points up to its cap).
    held: list[Record | SpooledCommit] = field(default_factory=list)
    held_bytes: int = 0  # page bytes of the held commits in memory
    open_seq: int = 0  # seq of the latest OPEN
    pinned_seq: int = 0  # seq of the latest sync point taken
    # Commits a first sync point took in that has not reached the store yet (its retries
    # take later ones): what the database still owes the replica, for stats().
    owed: int = 0
    owed_since_ns: int = 0
    past_pin: bool = False  # the sync running has taken its sync point (it may await the store)
    stored_head: Head | None = None  # the replica's head, read by a first sync's first pass
    seen_open: bool = False  # not in WAL, written and still open at a look (StillOpenError)

    def hold(self, rec: Record) -> None:
        self.held.append(rec)
        self.held_bytes += rec.memory

    def hold_spooled(self, rec: Record, spool: Spool) -> None:
        """Hold ``rec`` in the spool; raises :class:`SpoolFull` or the OSError of the write."""
        path = spool.store(pickle.dumps(rec, pickle.HIGHEST_PROTOCOL), ".wheld")
        self.held.append(SpooledCommit(rec.seq, rec.time_ns, path))

    def drop_held(self, spool: Spool) -> int:
        """Give up the held commits; how many there were (restore points lost)."""
        for item in self.held:
            if isinstance(item, SpooledCommit):
                spool.remove(item.path)
        dropped = len(self.held)
        self.held, self.held_bytes = [], 0
        return dropped

    def owe(self, rec: Record) -> None:
        self.owed += 1
        self.owed_since_ns = self.owed_since_ns or rec.time_ns

    def take_held(
        self, spool: Spool, upto: float = float("inf"), budget: float = float("inf")
    ) -> list[Record]:
        """Take the held commits up to seq ``upto``, keeping the later ones: the first of
        them, and the ones after it while their pages come to less than ``budget`` bytes
        (the spooled ones are read back)."""
        taken: list[Record] = []
        size = n = 0
        while n < len(self.held) and self.held[n].seq <= upto and (not taken or size < budget):
            item = self.held[n]
            rec = item if isinstance(item, Record) else item.load(spool)
            taken.append(rec)
            size += rec.memory
            n += 1
        del self.held[:n]
        self.held_bytes = sum(r.memory for r in self.held if isinstance(r, Record))
        return taken


@dataclass(slots=True)
class SpooledCommit:
    """A held commit whose record waits in a spool file."""

    seq: int
    time_ns: int
    path: str

    def load(self, spool: Spool) -> Record:
        with open(self.path, "rb") as f:
            rec: Record = pickle.load(f)
        spool.remove(self.path)
        return rec


@dataclass
class Pinned:
    """What a sync point read: the database's state, and the replica's head if it came."""

    path: str
    seq: int
    page_size: int
    db_size: int
    checksum: format.DbChecksum
    wal_frames: int
    wal: format.WalPos  # where the pinned state ends in the WAL
    taken_ns: int
    head: Head | None  # what the lineage continues from (None: the replica's, not read in time)
    fetch: Future[Head] | None  # the replica head's read, if this sync started one
    survivors: list[format.Commit]  # commits recovered from the WAL (see recovery.py)

    def ahead_of(self, head: Head) -> bool:
        """Whether the database may be ahead of a replica ``head`` read too late for this sync
        point: a crash may have left the missing commits in the WAL, for another to take."""
        return (
            bool(self.wal_frames)
            and head.generation is not None
            and not holds(head, self.checksum, self.page_size)
        )


def pin(
    path: str,
    raw: BinaryIO,
    stored: Head | None,
    fetch_head: Callable[[], Future[Head]] | None,
    pinned: Callable[[int], None],
    head_at: Callable[[int, Head | None], Head | None],
    enable_wal: bool = False,
    seen_open: bool = False,
) -> Pinned:
    """Take a sync point of ``path`` and copy its pages to ``raw``.

    ``fetch_head`` starts reading the replica's head (a first sync in this process): it is
    awaited for HEAD_WAIT while the WAL is pinned, so that commits a crash left in the WAL can
    be taken under this sync point.  ``pinned(seq)`` is called once the sync point is taken,
    ``head_at(seq, stored)`` once the pages are read: it gives the head the lineage continues
    from, with every commit up to the sync point in it (the replica's head on a first sync;
    on a resync the lineage's own end, whose commits a gap hid from the stream the WAL may
    still hold).  The sync point is released before any upload: it pins the WAL.
    ``enable_wal``, ``seen_open``: see :class:`capture.SyncPoint`.
    """
    fetch = None
    with capture.SyncPoint(path, enable_wal=enable_wal, seen_open=seen_open) as sp:
        if fetch_head is not None:
            fetch = fetch_head()
        taken_ns = sp.taken_ns
        page_size, db_size, pages = sp.pages()
        pinned(sp.seq)
        checksum = format.DbChecksum.from_pages(tee(pages, raw.write))
        if fetch is not None:
            with contextlib.suppress(TimeoutError):  # a slow store: the engine reads it later
                stored = fetch.result(HEAD_WAIT)
        head = head_at(sp.seq, stored)
        survivors = (
            recovery.survivors(path, sp, head, checksum, page_size, taken_ns) if head else []
        )
        return Pinned(
            path,
            sp.seq,
            page_size,
            db_size,
            checksum,
            sp.nframe,
            format.WalPos(*sp.salts, sp.nframe),
            taken_ns,
            head,
            fetch,
            survivors,
        )


def changed_pages(
    raw: BinaryIO, pinned: Pinned, base: format.DbChecksum, head: Head, max_bytes: int
) -> list[format.Commit]:
    """The pinned state as one commit on top of ``head``, the lineage's end whose page hashes
    ``base`` holds: the pages that differ, read from ``raw`` (the pinned pages).  A gap whose
    commits the WAL no longer holds then costs those pages, not a new generation's snapshot;
    only the gap's own restore points are lost.  Empty if they are more than
    ``max_bytes``, if there are none (a database only cut short), or if the lock page would
    be one of them (SQLite never writes it: a commit never gives it)."""
    size = pinned.page_size
    if head.page_size != size or holds(head, pinned.checksum, size):
        return []
    changed = pinned.checksum.changed_since(base, max_bytes // size)
    if not changed or format.lock_page(size) in changed:
        return []
    raw.flush()
    fd = raw.fileno()
    pages = [(pgno, os.pread(fd, size, (pgno - 1) * size)) for pgno in changed]
    time_ns = max(pinned.taken_ns, head.time_ns)  # a lineage's times never go backwards
    value = pinned.checksum.value
    # A WAL a checkpoint emptied holds none of it: its position is unknown (FORMAT.md §4.2)
    wal = pinned.wal if pinned.wal.end else None
    return [format.Commit(head.txid + 1, time_ns, pinned.db_size, value, pages, wal)]


def write(
    client: storage.ReplicaClient,
    name: str,
    head: Head,
    decision: Decision,
    pinned: Pinned,
    raw: BinaryIO,
    survivors: list[format.Commit],
    max_segment_bytes: int,
    epoch: int = 0,
) -> int:
    """Upload ``survivors`` (commits recovered from the WAL that nothing pending precedes:
    shipped before the sync ends, so a process killed again soon after still finds them in
    the store), then the snapshot if the decision (taken against ``head``) takes one; every
    key carries the writer's lease ``epoch``.  Returns the bytes of the segments put."""
    if not decision.continues and head.generation is not None:
        log.debug(
            "walsync: %s differs from its replica (%s) at seq %d: checksum %x, %d pages of %d",
            pinned.path,
            head,
            pinned.seq,
            pinned.checksum.value,
            pinned.db_size,
            pinned.page_size,
        )
    objects = encode_commits(
        name, decision.generation, pinned.page_size, max_segment_bytes, survivors, epoch
    )
    stored = 0
    for key, data in objects:  # encoded one at a time
        try:
            client.put(key, data)
        except storage.Conflict as exc:
            if not storage.stored_before(client, key, data, exc):
                raise
        stored += len(data)
    if decision.snapshot:
        raw.seek(0)
        key = format.snapshot_key(name, decision.generation, decision.txid, epoch)
        pages = _pages(raw, pinned.page_size, pinned.db_size)
        put_snapshot(
            client, key, pages, pinned.page_size, decision.txid, pinned.taken_ns, pinned.db_size
        )
    return stored


def _pages(raw: BinaryIO, page_size: int, db_size: int) -> Iterator[memoryview]:
    """The ``db_size`` pages spooled at a sync point, read a MiB at a time."""
    per_read = max(1, READ_SIZE // page_size)
    for start in range(0, db_size, per_read):
        count = min(per_read, db_size - start)
        block = memoryview(raw.read(count * page_size))
        if len(block) != count * page_size:
            raise OSError(f"the sync point's spool ended at page {start + len(block) // page_size}")
        for i in range(count):
            yield block[i * page_size : (i + 1) * page_size]
