"""Shipping commits: when each database's pending commits are due, how they are batched and
encoded into segments, and the put threads that upload them.

A per-database token bucket ships the first commit after an idle spell at once and
coalesces commits under sustained writes, one segment per interval on a clock shared by
every database, so the due segments are encoded in bursts and a small pool of put threads
sends each burst's PUTs together.  Failures are retried with backoff; nothing is dropped.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import random
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from walsync_vfs import capture, format, storage
from walsync_vfs.backoff import Backoff
from walsync_vfs.spool import Outgoing, Spool, completes
from walsync_vfs.workers import Workers

if TYPE_CHECKING:
    from walsync_vfs.config import DbConfig, Settings
    from walsync_vfs.database import Database

log = logging.getLogger("walsync_vfs")

# Uploads one put thread sends at once (storage.put_all); also the ships queued or running
# per put thread (see ShipSlots).
PUT_BATCH = 16
# Segments past a quarter of max_segment_bytes encoded between two measurements of which zstd
# level suits a database's stream (see Uploader._encode).
LEVEL_PROBE_EVERY = 16
# zstd workers for the segments a flush() waits on: one per core, as the flushing threads sleep.
FLUSH_COMPRESSION_THREADS = os.cpu_count() or 1
# Between retries of a failing store (uploads and syncs): recovery is noticed quickly.
RETRY = Backoff(first=0.1, cap=5.0)

# A commit, or a run of commits the capture packed (never bigger than a segment), which the
# capture may still add to while it is the newest pending item ...
Shippable = format.Commit | capture.OpenRun
# ... and sealed once taken for a segment.
Shipped = format.Commit | format.PackedRun
# (seq of its last commit, generation, commits): a commit stays in the lineage it was made in
Pending = tuple[int, str, Shippable]
Taken = tuple[int, str, Shipped]
Queued = tuple[int, Shippable]  # as the engine queues them: (seq, commits)
_E = TypeVar("_E", bound=tuple[Any, ...])  # an entry whose first item is a Database


def is_small(raw_bytes: int, max_segment_bytes: int) -> bool:
    """Whether a segment of ``raw_bytes`` page bytes is one compaction merges.  Pending
    bytes past that ship without waiting for the upload clock's tick (see ship_time): such
    a segment is never merged again, and a busy writer's uploads then overlap the writes
    that follow instead of all falling on the next flush."""
    return raw_bytes < max_segment_bytes // 4


def part_pages(page_size: int, max_bytes: int) -> int:
    """Pages in each part of a commit bigger than a segment (FORMAT.md §4.5)."""
    return max(1, max_bytes // page_size)


def part_count(commit: Shippable, page_size: int, max_bytes: int) -> int:
    """How many segment objects a commit goes in: 1, or its parts."""
    per_part = part_pages(page_size, max_bytes)
    return max(1, -(-commit.page_count // per_part))


def part_bytes(commit: format.Commit, index: int, page_size: int, max_bytes: int) -> int:
    """Page bytes of part ``index`` of a commit bigger than a segment."""
    per_part = part_pages(page_size, max_bytes)
    return min(per_part, len(commit.pages) - index * per_part) * page_size


def encode_part(
    commit: format.Commit, index: int, page_size: int, max_bytes: int, fast: bool = False
) -> format.Encoded:
    """The object of part ``index`` of a commit bigger than a segment (FORMAT.md §4.5), at
    the fast level if ``fast``.  Pages in a spool file are read a chunk at a time into the
    compressor, never a Python object per page."""
    per_part = part_pages(page_size, max_bytes)
    pages = commit.pages[index * per_part : (index + 1) * per_part]
    part = format.Part(index, part_count(commit, page_size, max_bytes), len(commit.pages))
    if isinstance(pages, capture.SpooledPages):
        pgnos: Sequence[int] = pages.pgnos
        data: Iterable[format.Page] = pages.chunks()
    else:
        pgnos, data = [pgno for pgno, _ in pages], (page for _, page in pages)
    level = format.segment_level(small=False, fast=fast)
    return format.encode_part(page_size, commit, part, pgnos, data, level)


def encode_commits(
    name: str,
    generation: str,
    page_size: int,
    max_bytes: int,
    commits: list[format.Commit],
    epoch: int = 0,
) -> Iterator[tuple[str, bytes | memoryview]]:
    """(key, object) of each segment the commits go in, made one at a time: consecutive
    commits about ``max_bytes`` of pages per segment, and a bigger commit in parts."""
    for batch in batches(commits, page_size, max_bytes):
        c = batch[0]
        count = part_count(c, page_size, max_bytes) if len(batch) == 1 else 1
        if count == 1:
            key = format.segment_key(name, generation, c.txid, batch[-1].txid, epoch)
            yield key, format.encode_segment(page_size, batch).data
            continue
        for i in range(count):
            key = format.segment_key(name, generation, c.txid, c.txid, epoch, (i, count))
            yield key, encode_part(c, i, page_size, max_bytes).data


def per_client(entries: list[_E]) -> Iterable[list[_E]]:
    """Entries that start with a database, grouped by the client of its replica root (one
    batch of requests per store), in their order."""
    groups: dict[int, list[_E]] = {}
    for entry in entries:
        groups.setdefault(id(entry[0].client), []).append(entry)
    return groups.values()


@dataclass(slots=True)
class UploadState:
    """A database's commits on their way to the store, and its token bucket."""

    pending: list[Pending] = field(default_factory=list)
    pending_bytes: int = 0
    outbox: list[Outgoing] = field(default_factory=list)  # encoded, oldest first
    uploading: bool = False  # a PUT of this database is under way (outbox[0])
    spilling: bool = False
    seen_seq: int = 0  # last COMMIT seq received
    durable_seq: int = 0  # every commit up to this seq is in the replica
    durable_txid: int = 0
    tokens: float = 0.0
    token_time: float = 0.0
    quiet: bool = True  # the oldest pending commit came after a quiet spell
    arrived_at: float = 0.0  # monotonic time the latest commit reached the engine
    shipped_at: float = 0.0  # monotonic time the latest upload was started
    due_at: float = math.inf  # earliest time the uploader has been asked to look at it
    next_attempt: float = 0.0  # no upload before this (backoff after a failure)
    bytes_uploaded: int = 0
    next_part: int = 0  # pending[0] is bigger than a segment: its part to encode next
    disk_bytes: int = 0  # of pending_bytes, pages read from a file when encoded, not memory
    fast_level: bool = False  # segments take format.FAST_SEGMENT_LEVEL (Uploader._encode)
    level_probe: int = 0  # segments to encode before measuring the levels again

    def shipping(self) -> bool:
        """Whether commits are pending, encoded or being uploaded."""
        return bool(self.pending or self.outbox or self.uploading)

    def open_run(self, generation: str | None) -> capture.OpenRun | None:
        """The run the capture adds its next commits of ``generation`` to: the newest
        pending item, if it is a run of that generation (a run taken from pending is sealed,
        and anything queued after it closes it)."""
        if self.pending:
            _, gen, last = self.pending[-1]
            if type(last) is capture.OpenRun and gen == generation:
                return last
        return None

    def queue(self, items: Sequence[Pending], grown: int, now: float, cfg: DbConfig) -> bool:
        """Add pending commits that bring the pending bytes to ``grown`` (the caller sets
        them; commits added to the open run count too); True when the uploader should look
        at the database again: a first pending commit, or a segment's worth.  Commits that
        join a batch already waiting for its turn cost the uploader nothing; but a
        segment's worth crossed is: it ships at once, not at the time the quarter crossed
        before it set (see UploadClock.ship_time)."""
        first = not self.pending
        if first:
            self.quiet = now - self.arrived_at >= cfg.upload_interval / 4
        self.arrived_at = now
        self.pending += items
        before, limit = self.pending_bytes, cfg.max_segment_bytes
        return first or before < limit // 4 <= grown or before < limit <= grown

    @property
    def memory(self) -> int:
        """Bytes of commits held in memory (pending, or encoded and not spilled)."""
        return self.pending_bytes - self.disk_bytes + sum(i.memory for i in self.outbox)

    @property
    def pending_commits(self) -> int:
        return sum(c.commit_count for _, _, c in self.pending)

    def drop_pending(self) -> int:
        """Forget every pending commit; returns how many there were."""
        n = self.pending_commits
        self.pending, self.pending_bytes, self.next_part, self.disk_bytes = [], 0, 0, 0
        return n


class UploadClock:
    """The process's upload clock and the agenda of when each database is due.

    Where this process's upload ticks fall within an interval (``phase``, a fraction) is
    random, so processes sharing a store do not all upload at the same instant.
    """

    def __init__(self, phase: float) -> None:
        self.phase = phase
        self.flushers = 0  # flush() calls waiting: every upload is urgent meanwhile
        # (time, tie-breaker, db): when to look at a database next, so the uploader never
        # scans every database per wake-up (see schedule).
        self._agenda: list[tuple[float, int, Database]] = []
        self._ticket = itertools.count()

    def ship_time(self, db: Database, now: float) -> float:
        """When the database's pending commits should ship (inf: nothing to do for now)."""
        up, s = db.upload, db.cfg
        # A stopped database (out of WAL) syncs no more until it can be captured again: what
        # it committed before ships meanwhile.
        syncing = db.sync.syncing and not db.stopped
        if not (up.pending or up.outbox) or up.uploading or up.spilling or syncing:
            return math.inf  # an upload's, spill's or sync's end schedules it again
        if not db.may_write(now):
            return math.inf  # the lease's renewal schedules it again
        # Refill the token bucket.
        if s.upload_interval > 0:
            up.tokens = min(s.upload_burst, up.tokens + (now - up.token_time) / s.upload_interval)
        else:
            up.tokens = s.upload_burst
        up.token_time = now
        at = up.next_attempt
        # A full segment waits for nothing, nor does a backlog of encoded segments (left by
        # an outage or read back from the spool): catching up must not take one interval
        # per segment.
        urgent = (
            self.flushers
            or up.pending_bytes >= s.max_segment_bytes
            or len(up.outbox) > 1
        )
        # Burst tokens are for a commit that follows a quiet spell (the first after idle
        # ships at once); a steady stream ships one segment per upload_interval, on the
        # ticks of this process's upload clock.  On a shared clock the busy databases fall
        # due together and ship in one burst (encoded in one go, see Uploader.start) instead
        # of one at a time all through the interval: fewer wake-ups, and the code runs warm.
        # A database off the clock (its stream began with a burst upload) drifts onto it by
        # at most a tenth of an interval per upload: never two uploads within an interval,
        # and a commit waits at most 1.1 intervals.
        interval = s.upload_interval
        if interval <= 0 or urgent:
            return at
        if not is_small(up.pending_bytes, s.max_segment_bytes):
            # A segment compaction will not merge ships without waiting for the clock's
            # tick, but at most ten times an interval: each upload costs the writer's
            # threads a few GIL hand-offs, however few bytes it carries.
            return max(at, up.shipped_at + interval / 10)
        if not (up.quiet and up.tokens >= 1):
            target = up.shipped_at + interval
            phase = self.phase * interval
            tick = math.ceil((target - phase) / interval - 1e-9) * interval + phase
            at = max(at, min(tick, target + interval / 10))
        return at

    def schedule(self, db: Database, now: float) -> float | None:
        """Put ``db`` on the agenda for when its next upload is due; that time if it moved
        earlier (the uploader may have to wake up for it), else None.

        Called wherever that time can move earlier: a first pending commit, a segment's worth
        of pending bytes, the end of an upload or a sync, a flush.  The uploader pops what is
        due instead of scanning every database per wake-up, a cost that grows with the
        number of databases at every commit batch.
        """
        at = self.ship_time(db, now)
        if at >= db.upload.due_at:
            return None
        db.upload.due_at = at
        heapq.heappush(self._agenda, (at, next(self._ticket), db))
        return at

    def due(self, now: float, room: int) -> list[Database]:
        """Up to ``room`` databases whose pending commits should ship now, each charged a
        token.  The others stay due on the agenda, their commits pending."""
        ready: list[Database] = []
        agenda = self._agenda
        while agenda and agenda[0][0] <= now and len(ready) < room:
            at, _, db = heapq.heappop(agenda)
            up = db.upload
            if at != up.due_at:
                continue  # superseded by an earlier entry
            up.due_at = math.inf
            due = self.ship_time(db, now)
            if due <= now:
                up.tokens = max(up.tokens - 1, 0)
                # A paced upload counts from its tick, however late it starts, so a slow
                # burst does not push the database off the clock (see ship_time).
                up.shipped_at = due if now - due < db.cfg.upload_interval else now
                up.quiet = False
                ready.append(db)
            else:
                self.schedule(db, now)
        return ready

    def next_due(self) -> float:
        """The earliest time on the agenda (inf: nothing scheduled)."""
        return self._agenda[0][0] if self._agenda else math.inf


class ShipSlots:
    """Ships handed to the put threads and not finished, at most ``capacity``.

    A database whose turn comes later keeps its commits pending, where memory_cap counts
    them and its next batch takes them all.  Unbounded, every due database's batch would sit
    in the queue behind a slow store or a saturated machine, holding its page copies.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self.throttled = False  # the uploader waits for slots to free up

    @property
    def free(self) -> int:
        return self.capacity - self.in_use

    def check_full(self) -> bool:
        """Whether every slot is taken; the uploader then waits for give_back to wake it."""
        self.throttled = self.in_use >= self.capacity
        return self.throttled

    def give_back(self, n: int) -> bool:
        """Free ``n`` slots; True when a throttled uploader should wake up: once half of them
        are free, not at each ship's end (databases fall due in bursts, and a wake-up per
        ship doubled its CPU)."""
        self.in_use -= n
        if self.throttled and self.in_use <= self.capacity // 2:
            self.throttled = False
            return True
        return False


# A batch of pending commits for one segment; or one commit bigger than a segment and which
# of its parts to encode, (index, count).
Shipment = tuple[list[Taken], tuple[int, int] | None]


def take_batch(up: UploadState, page_size: int, max_bytes: int) -> Shipment:
    """Take the oldest pending commits of one generation while they come to less than
    ``max_bytes`` of pages (the last item taken, a run of up to a segment, may bring them
    to twice that: what crossed a segment's worth ships together); a commit bigger than a
    segment goes alone, one part per call (it stays pending until its last part is
    taken)."""
    pending = up.pending
    seq, gen, first = pending[0]
    count = part_count(first, page_size, max_bytes)
    if count > 1:
        assert isinstance(first, format.Commit)  # a packed run is never bigger than a segment
        index = up.next_part
        size = part_bytes(first, index, page_size, max_bytes)
        up.pending_bytes -= size
        if isinstance(first.pages, capture.SpooledPages):
            up.disk_bytes -= size
        if index + 1 == count:
            up.pending, up.next_part = pending[1:], 0
        else:
            up.next_part = index + 1
        return [(seq, gen, first)], (index, count)
    end, size, per_part = 0, 0, part_pages(page_size, max_bytes)
    while end < len(pending) and pending[end][1] == gen and (not end or size < max_bytes):
        pages = pending[end][2].page_count
        if end and pages > per_part:  # bigger than a segment: in parts, on its own
            break
        size += pages * page_size
        end += 1
    batch, up.pending = pending[:end], pending[end:]
    up.pending_bytes -= size
    return [_sealed(item) for item in batch], None


def _sealed(item: Pending) -> Taken:
    """A pending item taken for a segment: a run is complete, its bytes stay put from now on."""
    seq, gen, c = item
    return (seq, gen, c.seal() if isinstance(c, capture.OpenRun) else c)


def batches(
    commits: list[format.Commit], page_size: int, max_bytes: int
) -> Iterator[list[format.Commit]]:
    """Consecutive commits in segments of about ``max_bytes`` of pages (at least one each); a
    commit bigger than that is a batch of its own."""
    batch: list[format.Commit] = []
    size = 0
    for commit in commits:
        big = len(commit.pages) * page_size > max_bytes
        if batch and (size >= max_bytes or big):
            yield batch
            batch, size = [], 0
        batch.append(commit)
        size += len(commit.pages) * page_size
    if batch:
        yield batch


def encode(
    name: str,
    page_size: int,
    max_segment_bytes: int,
    shipment: Shipment,
    epoch: int = 0,
    fast: bool = False,
) -> Outgoing:
    """One segment of a batch of pending commits (of one generation), or one part of a commit,
    keyed with the lease ``epoch`` of its writer; at the fast level if ``fast``."""
    batch, part = shipment
    gen = batch[0][1]
    if part is not None:
        seq, _, whole = batch[0]
        assert isinstance(whole, format.Commit)
        encoded = encode_part(whole, part[0], page_size, max_segment_bytes, fast)
        return Outgoing(
            format.segment_key(name, gen, whole.txid, whole.txid, epoch, part),
            gen,
            seq,
            whole.txid,
            whole.txid,
            part_bytes(whole, part[0], page_size, max_segment_bytes),
            encoded.data,
            sha256=encoded.sha256,
            part=part,
            time_ns=whole.time_ns,
        )
    commits = [c for _, _, c in batch]
    page_size = _page_size(commits[0], page_size)
    raw_bytes = sum(c.page_count for c in commits) * page_size
    level = format.segment_level(is_small(raw_bytes, max_segment_bytes), fast)
    first, last = commits[0].txid, commits[-1].last_txid
    encoded = format.encode_segment(page_size, commits, level)
    return Outgoing(
        format.segment_key(name, gen, first, last, epoch),
        gen,
        batch[-1][0],
        first,
        last,
        raw_bytes,
        encoded.data,
        sha256=encoded.sha256,
        time_ns=commits[0].time_ns,
    )


def _page_size(commit: Shipped, page_size: int) -> int:
    """The page size the commit was made with (the lineage's may have changed since)."""
    if isinstance(commit, format.PackedRun):
        return commit.page_size
    return next((len(p) for _, p in commit.pages), page_size)


class UploadHost(Protocol):
    """What the uploader asks of the engine that owns the databases (lock held)."""

    def break_lineage(self, db: Database) -> None: ...
    def give_up(self, db: Database) -> None: ...
    def forget_if_done(self, db: Database) -> None: ...


class LocalCopies(Protocol):
    """Where uploaded segments go for compaction (see compactor.Compactor)."""

    def kept(self, db: Database, item: Outgoing, data: bytes | memoryview) -> None: ...
    def drop_copies(self, db: Database) -> None: ...


class Uploader:
    """Hands due databases' segments to the put threads and settles each upload.

    ``lock`` guards every database; of ``conditions`` (on that lock), the first is notified
    when a database's state changes (flushers wait on it), the second wakes the thread that
    calls :meth:`start`.
    """

    def __init__(
        self,
        settings: Settings,
        lock: threading.Lock,
        conditions: tuple[threading.Condition, threading.Condition],
        spool: Spool,
        host: UploadHost,
        copies: LocalCopies,
    ) -> None:
        self.settings = settings
        self._lock = lock
        self._changed, self._wake = conditions
        self._spool = spool
        self._host = host
        self._copies = copies
        self.clock = UploadClock(random.random())
        self.slots = ShipSlots(PUT_BATCH * settings.upload_workers)
        self.pool = Workers(settings.upload_workers, "walsync-put")
        self.wake_at = -math.inf  # when the waiting uploader will wake up by itself
        self.freed = False  # uploads freed page copies since the last heap.release()

    def schedule(self, db: Database, now: float) -> None:
        """Put ``db`` on the agenda (lock held); wake the uploader only if the new time comes
        before the one it is already waiting for."""
        at = self.clock.schedule(db, now)
        if at is not None and at < self.wake_at:
            self._wake.notify()

    def start(self, now: float) -> None:
        """Hand the due databases' oldest segments to the put threads (lock held).

        New segments are encoded here, all of them in one go with the lock released, rather
        than one per put thread: a burst of encodes runs on warm caches without a GIL
        hand-off between them, and the put threads are left with the requests alone.
        """
        due = self.clock.due(now, self.slots.free)
        if not due:
            return
        fresh = []
        for db in due:
            db.upload.uploading = True
            self.slots.in_use += 1
            if not db.upload.outbox:
                fresh.append((db, self._take(db)))
        # A flush() waits on these: its threads leave their cores to the compression.
        threads = FLUSH_COMPRESSION_THREADS if self.clock.flushers else 0
        self._lock.release()
        try:
            with format.compression_threads(threads):
                encoded = [(db, self._encode_or_none(db, batch)) for db, batch in fresh]
        finally:
            self._lock.acquire()
        for db, item in encoded:
            if item is None:
                self.slots.in_use -= 1
                db.upload.uploading = False
                self._host.break_lineage(db)
            else:
                db.upload.outbox.insert(0, item)
        ready = [(db, db.upload.outbox[0]) for db in due if db.upload.uploading]
        for ships in per_client(ready):
            for i in range(0, len(ships), PUT_BATCH):
                self.pool.spawn(self._ship_all, ships[i][0].client, ships[i : i + PUT_BATCH])

    def _take(self, db: Database) -> Shipment:
        return take_batch(db.upload, db.lineage.page_size, db.cfg.max_segment_bytes)

    def _encode(self, db: Database, batch: Shipment) -> Outgoing:
        """Encode at the level the database's stream was last measured to suit.

        Every LEVEL_PROBE_EVERY-th segment past a quarter of max_segment_bytes (the first
        included) is measured at the other level too (compressed, the output dropped as it
        comes), and the next ones take the fast level unless level 1 saves a tenth over it:
        that costs one compression a measurement, where level 1 on data it cannot shrink
        further costs twice to four times the fast level's CPU on every segment.  Parts and small
        segments (a new table's few pages say too little about the stream) are not
        measured.  A spill racing an upload's encode of the same database only moves when
        the next measurement falls.
        """
        up, limit = db.upload, db.cfg.max_segment_bytes
        item = encode(db.name, db.lineage.page_size, limit, batch, db.epoch(), up.fast_level)
        if batch[1] is not None or is_small(item.raw_bytes, limit):
            return item
        if up.level_probe > 0:
            up.level_probe -= 1
            return item
        up.level_probe = LEVEL_PROBE_EVERY - 1
        mine = format.encoded_body_length(item.payload())
        other_level = format.segment_level(small=False, fast=not up.fast_level)
        other = format.compressed_size([c for _, _, c in batch[0]], other_level)
        fast, usual = (mine, other) if up.fast_level else (other, mine)
        up.fast_level = fast * 10 <= usual * 11
        return item

    def _encode_or_none(self, db: Database, batch: Shipment) -> Outgoing | None:
        """The segment, or None (logged) if the commits cannot be encoded: they are then lost
        to the lineage, which has to start again from a snapshot that holds them."""
        try:
            return self._encode(db, batch)
        except (ValueError, OSError) as exc:  # OSError: pages on disk could not be read
            log.error("walsync: cannot encode commits of %s (%s); resyncing", db.path, exc)
            with self._lock:
                db.errors += 1
                db.last_error = f"encode: {exc}"
            return None

    def _ship_all(
        self, client: storage.ReplicaClient, ships: list[tuple[Database, Outgoing]]
    ) -> None:
        """Upload the oldest outgoing segment of each of these databases (one store) in one
        go (:func:`storage.put_all`), settle each, then give their slots back."""
        settled = 0
        try:
            objects: list[tuple[str, bytes | memoryview]] = []
            sending = []
            for db, item in ships:
                try:
                    objects.append((item.key, item.payload()))
                    sending.append((db, item))
                except OSError as unreadable:  # a spooled segment that cannot be read back
                    self._failed(db, unreadable)
                    settled += 1
            results = storage.put_all(client, objects, [item.sha256 for _, item in sending])
            for i, ((db, item), error) in enumerate(zip(sending, results, strict=True)):
                # Settling a part lets the next part of its commit be encoded at once: by
                # then, nothing here may hold this one's bytes any more.
                key, data = objects[i]
                objects[i] = (key, b"")
                if error is not None and not storage.stored_before(client, key, data, error):
                    self._failed(db, error)
                elif db.may_write(time.monotonic()):
                    self._copies.kept(db, item, data)
                    stored = len(data)
                    del data
                    self._uploaded(db, item, stored)
                else:
                    self._unconfirmed(db)
                settled += 1
        except Exception as exc:  # a bug: never leave a database marked as uploading
            log.exception("walsync: uploads failed")
            for db, _ in ships[settled:]:
                self._failed(db, exc)
        finally:
            with self._lock:
                if self.slots.give_back(len(ships)):
                    self._wake.notify()

    def _failed(self, db: Database, exc: Exception) -> None:
        """Retry later with backoff; nothing is dropped (but a closed database's store that
        keeps failing is given up on: see Engine.give_up)."""
        with self._lock:
            db.upload.uploading = False
            db.fail(exc)
            db.upload.next_attempt = time.monotonic() + RETRY.delay(db.failures)
            self._changed.notify_all()
            if db.given_up():
                self._host.give_up(db)
                return
            self.schedule(db, time.monotonic())
        log.warning(
            "walsync: upload for %s failed (attempt %d): %s", db.name, db.failures, db.last_error
        )

    def _unconfirmed(self, db: Database) -> None:
        """A segment landed after the lease may have passed to another writer, which then
        ignores it: not durable yet.  Once the lease is renewed (nobody took it meanwhile, so
        the segment is history) it is sent again and settled by its Conflict; if the lease
        was taken, the engine drops it (Engine._start_afresh)."""
        with self._lock:
            db.upload.uploading = False
            self.schedule(db, time.monotonic())
            self._changed.notify_all()

    def _uploaded(self, db: Database, item: Outgoing, stored: int) -> None:
        """A segment of ``stored`` bytes is in the store: mark it durable and let go of it."""
        self._spool.discard(item)
        with self._lock:
            up = db.upload
            up.outbox.remove(item)
            item.data = None
            up.uploading = False
            if not db.stopped:  # the store works; the stop still stands
                db.failures = 0
                db.last_error = ""
            if item.complete:  # a commit's earlier parts make nothing durable yet
                up.durable_seq = max(up.durable_seq, item.last_seq)
                up.durable_txid = item.last_txid
            up.bytes_uploaded += stored
            self.freed = True
            db.upkeep.uploaded_since_retention = True
            self.schedule(db, time.monotonic())
            self._host.forget_if_done(db)
            self._changed.notify_all()

    def discard(self, db: Database) -> None:
        """Drop everything the database has not uploaded (lock held)."""
        up = db.upload
        for item in up.outbox:
            self._spool.discard(item)
        up.outbox = []
        up.drop_pending()

    def spill_if_over_cap(self, dbs: Iterable[Database]) -> None:
        """Past the memory cap, move the biggest backlog to the local spool (lock held)."""
        dbs = list(dbs)
        if sum(db.upload.memory for db in dbs) <= self.settings.memory_cap:
            return
        candidates = [
            db
            for db in dbs
            if not db.upload.spilling
            and (db.upload.pending or any(i.data is not None for i in db.upload.outbox))
        ]
        if candidates:
            db = max(candidates, key=lambda d: d.upload.memory)
            db.upload.spilling = True
            taken = []
            while db.upload.pending:
                taken.append(self._take(db))
            self.pool.spawn(self._spill, db, taken)

    def _spill(self, db: Database, taken: list[Shipment]) -> None:
        """Encode and spill the taken commits one segment at a time (after the encoded ones
        already waiting), so spilling never holds more than one more segment in memory."""
        up = db.upload
        try:
            with self._lock:
                in_flight = up.outbox[0] if up.uploading else None
                backlog = [i for i in up.outbox if i.data is not None and i is not in_flight]
            for item in backlog:
                self._spool.spill(item)
            taken.reverse()
            while taken:
                item = self._encode(db, taken.pop())  # its pages go with the shipment
                with self._lock:
                    up.outbox.append(item)
                self._spool.spill(item)
        except OSError as exc:  # spool full or disk full: see spool.py for the policy
            log.error(
                "walsync: cannot spool %s (%s); its unsent commits will be in a new "
                "snapshot once the store is back",
                db.name,
                exc,
            )
            with self._lock:
                in_flight = up.outbox[0] if up.uploading else None
                for item in up.outbox:
                    if item is not in_flight:
                        self._spool.discard(item)
                        if item.complete:
                            db.lost_restore_points += item.last_txid - item.first_txid + 1
                # A commit in parts is lost once, with its last part.
                unsent = [c for batch, part in taken if completes(part) for _, _, c in batch]
                lost = sum(c.commit_count for c in unsent)
                db.lost_restore_points += up.drop_pending() + lost
                up.outbox[:] = [in_flight] if in_flight else []
                self._copies.drop_copies(db)
                db.errors += 1
                db.last_error = f"spool: {exc}"
                self._host.break_lineage(db)  # the lineage has a hole now
        with self._lock:
            up.spilling = False
            self.schedule(db, time.monotonic())
            self._changed.notify_all()
