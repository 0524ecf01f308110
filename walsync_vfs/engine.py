"""The replication engine: turns each database's captured commits into snapshots and segments.

One engine per process.  It is the capture dispatcher's default sink, so every database opened
through ``vfs="walsync"`` replicates.  Per database it keeps only a little state (no thread, no
client, no buffer beyond commits not yet uploaded):

* **Sync.**  On the first OPEN, after a GAP and on reopen, a worker takes a :class:`SyncPoint`
  and reads the database's exact bytes.  If they match the replica's latest state (whole-db
  checksum), the lineage continues; otherwise the bytes become the snapshot of a new
  generation.  After a crash, commits that never reached the store but are still in the WAL
  are first shipped as commits of the same generation, if they provably continue the
  replica's last state (:func:`_wal_survivors`); when not, they are folded into that
  snapshot: nothing is lost, only their individual restore points.
* **Upload.**  One uploader thread ships pending commits as segments through one client per
  replica root (one upload in flight per database keeps its segments in order).  A
  per-database token bucket ships the first commit after an idle spell at once and coalesces
  commits under sustained writes, one segment per interval on a clock shared by every
  database, so the uploader encodes the due segments in bursts and a small pool of put
  threads sends each burst's PUTs together.  Failures are retried with backoff; nothing is
  dropped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import itertools
import logging
import math
import os
import random
import tempfile
import threading
import time
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, TypeVar

from walsync_vfs import capture, catalog, format, heap, maintenance, storage
from walsync_vfs.capture import Kind, Record
from walsync_vfs.config import DbConfig, Settings
from walsync_vfs.dbfile import tee
from walsync_vfs.leader import Host, LeaderError
from walsync_vfs.recent import RecentCopies, Run
from walsync_vfs.spool import Outgoing, Spool
from walsync_vfs.workers import Workers

log = logging.getLogger("walsync_vfs")

MAINTENANCE_TICK = 1.0  # seconds between looks for due snapshots, compactions, retention
FAILING_AFTER = 3  # consecutive failed attempts before flush() reports the replica as failing
MAX_BACKOFF = 5.0  # seconds between retries of a failing store: recovery is noticed quickly
COALESCE = 0.01  # s: uploads falling due this close together start in one uploader wake-up
# Uploads one put thread sends at once (storage.put_all); also the ships queued or running
# per put thread (see Engine.__init__).  Batches of 16 took CPU per PUT from 187 to 51 us.
PUT_BATCH = 16
MERGED_BYTES = 4 << 20  # merged segments held at once for one batch of compaction PUTs
# s between looks at the memory cap (a sum over every database), made whenever the uploader
# wakes: for a due upload, a database past max_segment_bytes, or at least every MAINTENANCE_TICK.
SPILL_CHECK = 0.05
RELEASE_EVERY = 1.0  # s between heap.release() calls, made only after uploads freed page copies
FIRST_RETRY = 0.1  # s before a failed sync is tried again; doubles up to MAX_BACKOFF
HEAD_WAIT = 1.0  # seconds a first sync keeps the WAL pinned waiting for the replica's head


class ReplicationError(RuntimeError):
    """A database's replica cannot be written (the message says why and what to do)."""


@dataclass
class Head:
    """What the replica holds for a database: the lineage to continue, if any."""

    generation: str | None = None
    txid: int = 0  # last txid in the whole history (0 = empty replica)
    page_size: int = 0
    db_size: int = 0
    checksum: int | None = None
    time_ns: int = 0  # when the last state was committed (or snapshotted)
    wal: format.WalPos | None = None  # where its last commit ended in the source's WAL


def read_head(client: storage.ReplicaClient, name: str) -> Head:
    """Find the newest generation's last state with one LIST and one GET."""
    gens = catalog.generations(client, name)
    if not gens:
        return Head()
    gen = gens[-1]
    top = max(gen.snapshots + gen.segments, key=lambda k: (k.last_txid, k.kind == "segment"))
    key = catalog.object_key(top)
    if top.kind == "segment":
        hdr = format.read_segment_header(client.get(key), key)
        last = hdr.index[-1]
        return Head(
            gen.id,
            gen.last_txid,
            hdr.page_size,
            last.db_size,
            last.checksum,
            last.time_ns,
            last.wal,
        )
    snap, _ = format.read_snapshot(client.get(key), key)
    return Head(gen.id, gen.last_txid, snap.page_size, snap.db_size, snap.checksum, snap.time_ns)


@dataclass(slots=True)
class DbState:
    """One replicated database.  Guarded by the engine lock.  Slotted: a process may hold
    thousands of these."""

    db_id: int
    path: str
    name: str = ""
    cfg: DbConfig = field(default_factory=DbConfig)
    client: storage.ReplicaClient | None = None
    open: bool = True
    syncing: bool = False
    sync_delay: float = FIRST_RETRY  # before the next retry of a failing sync
    resync: bool = False  # a GAP or reopen arrived while a sync was running
    broken: bool = False  # commits were dropped during a sync: its lineage cannot go on
    held: list[Record] = field(default_factory=list)  # commits that arrived during a sync
    sync_seq: int = 0
    open_seq: int = 0  # seq of the latest OPEN
    pinned_seq: int = 0  # seq of the latest sync point taken
    stored_head: Head | None = None  # the replica's head, read by a first sync's first pass
    generation: str | None = None
    next_txid: int = 1
    page_size: int = 0
    checksum: format.DbChecksum | None = None
    # (seq, generation, commit): a commit stays in the lineage it was made in
    pending: list[tuple[int, str, format.Commit]] = field(default_factory=list)
    pending_bytes: int = 0
    outbox: list[Outgoing] = field(default_factory=list)  # encoded, oldest first
    held_bytes: int = 0
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
    failures: int = 0
    next_attempt: float = 0.0
    last_error: str = ""
    errors: int = 0  # failed attempts, ever
    bytes_uploaded: int = 0
    # Maintenance: periodic snapshots, compaction of small segments, retention.
    force_snapshot: bool = False
    snapshot_txid: int = 0
    snapshot_at: float = 0.0  # monotonic time of the latest snapshot
    # (first_txid, last_txid) of each small segment of the current generation uploaded since
    # the last compaction: 16 bytes each, not a ParsedKey (~300 bytes with its strings; a
    # thousand databases hold up to 32 each).
    small_segments: array = field(default_factory=lambda: array("Q"))
    recent: Run | None = None  # local copies of small_segments, so compaction needs no GETs
    maintaining: bool = False
    pruned_at: float = 0.0  # monotonic time retention last deleted objects of this database
    uploaded_since_retention: bool = False
    retained_at: float = 0.0


_E = TypeVar("_E", bound=tuple)  # an entry whose first item is a DbState
# (database, retention due, small segments to merge, their local copies)
MaintenanceJob = tuple[DbState, bool, list[format.ParsedKey], Run | None]
# (database, merged segments to put, segments to delete once they are all in)
Compaction = tuple[DbState, list[tuple[str, bytes]], list[str]]


class Engine:
    """See the module docstring."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # state changes: flush, sync points
        # The uploader waits on its own condition, so the end of every upload (which wakes
        # flushers) does not wake it too; _schedule wakes it when it has to.
        self._uploader = threading.Condition(self._lock)
        self._dbs: dict[int, DbState] = {}
        self._names: dict[str, int] = {}  # name -> db_id, to refuse two dbs on one prefix
        self._clients: dict[str, storage.ReplicaClient] = {}
        self._flushers = 0
        # (time, tie-breaker, db): when the uploader should look at a database next, so it
        # never scans every database per wake-up (see _schedule).
        self._agenda: list[tuple[float, int, DbState]] = []
        self._ticket = itertools.count()
        self._sync_retries: list[tuple[float, int, DbState]] = []  # (time, tie-breaker, db)
        self._wake_at = -math.inf  # when the waiting uploader will wake up by itself
        self._next_spill_check = 0.0
        self._spool = Spool(settings)
        self._recent = RecentCopies(self._spool)
        self._next_maintenance = 0.0
        self._freed = False  # uploads freed page copies since the last heap.release()
        self._next_release = 0.0
        self._stopped = False
        # Where this process's upload ticks fall within an interval (see _ship_time): random,
        # so processes sharing a store do not all upload at the same instant.
        self._phase = random.random()
        self._sync_pool = Workers(2, "walsync-sync")
        # One maintenance pass at a time, beside the uploads: a compaction holds a few MiB of
        # decoded pages, and many databases fall due in the same tick.
        self._maintenance_pool = Workers(1, "walsync-maintain")
        self._put_pool = Workers(settings.upload_workers, "walsync-put")
        # Ships handed to the put threads and not finished.  At most PUT_BATCH per
        # thread: a database whose turn comes later keeps its commits pending, where
        # memory_cap counts them and its next batch takes them all.  Unbounded, every due
        # database's batch sat in the queue behind a slow store or a saturated machine:
        # two thirds of the page copies held at 1,000 databases.
        self._ship_slots = PUT_BATCH * settings.upload_workers
        self._ships = 0
        self._throttled = False  # the uploader waits for slots to free up
        self._thread = threading.Thread(
            target=self._upload_loop, name="walsync-upload", daemon=True
        )
        self._thread.start()
        self._host = Host(self._promote, self._flush_for_follower)

    # ------------------------------------------------------------------ capture side

    def on_records(self, records: Iterable[Record]) -> None:
        """Dispatcher sink: called with each batch of records, in commit order.

        Wakes the uploader only when a database gets something to ship sooner than it was
        going to look (see _schedule): a steady stream of commits costs no wake-ups.
        """
        dbs, commit = self._dbs, Kind.COMMIT
        with self._lock:
            for rec in records:
                db = dbs.get(rec.db_id)
                if rec.kind is commit and db is not None:  # the hot case first
                    db.seen_seq = rec.seq
                    if db.syncing:
                        self._hold(db, rec)
                    else:
                        self._append(db, rec)
                elif rec.kind is Kind.OPEN:
                    if db is None:
                        db = self._dbs[rec.db_id] = DbState(rec.db_id, rec.path)
                    log.debug("walsync: %s opened (seq %d)", rec.path, rec.seq)
                    db.open = True
                    db.open_seq = rec.seq  # the opener's hook starts the sync: see await_sync_point
                elif db is None:
                    continue
                elif rec.kind is Kind.GAP:
                    log.info("walsync: %s changed outside the stream; resyncing", db.path)
                    self._request_sync(db)
                elif rec.kind is Kind.CLOSE:
                    log.debug("walsync: %s closed (seq %d)", db.path, rec.seq)
                    db.open = False
                    self._forget_if_done(db)

    def _hold(self, db: DbState, rec: Record) -> None:
        """Keep a commit that arrived during a sync; past the memory cap, let the next sync
        point (which comes after it) take it into its snapshot instead."""
        db.held.append(rec)
        db.held_bytes += len(rec.pages) * rec.page_size
        if db.held_bytes > self.settings.memory_cap // 4:
            log.warning(
                "walsync: %s: commits held during a sync exceed the memory cap; "
                "they will be in the next snapshot",
                db.path,
            )
            db.held.clear()
            db.held_bytes = 0
            self._break_lineage(db)

    def _break_lineage(self, db: DbState) -> None:
        """Commits were dropped: nothing may be appended to the lineage any more, and the
        next sync point starts a new generation whose snapshot holds them."""
        db.checksum = None
        db.broken = db.syncing  # a sync in flight may restore the checksum: see _sync_loop
        self._request_sync(db)

    def _request_sync(self, db: DbState) -> None:
        """Start a sync, or ask the running one to go round once more."""
        if not self._host.leads(db.db_id):
            return  # another process replicates it
        if db.syncing:
            db.resync = True
        else:
            db.syncing = True
            self._sync_pool.spawn(self._sync_loop, db)

    def _append(self, db: DbState, rec: Record) -> None:
        """Give a commit its txid and whole-db checksum and queue it for upload."""
        if rec.seq <= db.sync_seq or db.checksum is None:
            return  # inside the snapshot this lineage starts from
        if rec.page_size != db.page_size:
            # VACUUM changed the page size: the next sync point comes after this commit, so
            # the snapshot it takes contains it.
            log.info(
                "walsync: %s page size %d -> %d; resyncing", db.path, db.page_size, rec.page_size
            )
            db.sync_seq = max(db.sync_seq, rec.seq)
            db.checksum = None
            self._request_sync(db)
            return
        db.checksum.apply(rec.db_size, rec.pages)
        wal = format.WalPos(*rec.wal_salts, rec.wal_frames[1])
        commit = format.Commit(
            db.next_txid, rec.time_ns, rec.db_size, db.checksum.value, rec.pages, wal
        )
        db.next_txid += 1
        now = time.monotonic()
        first = not db.pending
        if first:
            db.quiet = now - db.arrived_at >= db.cfg.upload_interval / 4
        db.arrived_at = now
        db.pending.append((rec.seq, db.generation, commit))
        size = db.pending_bytes + len(rec.pages) * rec.page_size
        # Only these two change when the uploader should look: commits that join a batch
        # already waiting for its turn cost it nothing.
        if first or (size >= db.cfg.max_segment_bytes > db.pending_bytes):
            self._schedule(db, now)
        db.pending_bytes = size

    def _give_up(self, db: DbState) -> None:
        """A closed database whose store keeps failing: stop retrying (lock held).

        Its file holds every commit, and its next open starts from a fresh sync point that
        the replica is compared against, so nothing is lost -- only restore points.
        """
        log.error("walsync: giving up on %s after it closed: %s", db.path, db.last_error)
        for item in db.outbox:
            self._spool.discard(item)
        db.outbox, db.held, db.held_bytes = [], [], 0
        db.pending, db.pending_bytes = [], 0
        self._forget_if_done(db)

    def _forget_if_done(self, db: DbState) -> None:
        """Drop a closed database's state once everything it committed is uploaded."""
        if (
            db.open
            or db.syncing
            or db.pending
            or db.outbox
            or db.uploading
            or db.spilling
            or db.maintaining
        ):
            return
        self._dbs.pop(db.db_id, None)
        self._host.leave(db.db_id)
        self._drop_small_segments(db)
        if self._names.get(db.name) == db.db_id:
            del self._names[db.name]
        self._cond.notify_all()

    # ------------------------------------------------------------------- sync side

    def _client(self, root: str) -> storage.ReplicaClient:
        with self._lock:
            client = self._clients.get(root)
        if client is None:
            client = storage.open_replica(root, **self.settings.client_options)
            with self._lock:
                client = self._clients.setdefault(root, client)
        return client

    def _sync_loop(self, db: DbState) -> None:
        """Sync until it succeeds and no resync is due.

        A failed attempt is retried with backoff by the uploader thread (see _upload_loop),
        not by sleeping here: a worker waiting out an outage would hold up the syncs of
        every other database behind it.
        """
        while not self._stopped:
            try:
                self._sync(db)
            except Exception as exc:  # noqa: BLE001 - reported, retried, never dropped
                with self._lock:
                    db.failures += 1
                    db.errors += 1
                    db.last_error = _describe(exc)
                    self._cond.notify_all()
                    if not db.open and db.failures >= FAILING_AFTER:
                        db.syncing = False
                        self._give_up(db)
                        return
                    delay, db.sync_delay = db.sync_delay, min(db.sync_delay * 2, MAX_BACKOFF)
                    at = time.monotonic() + delay
                    heapq.heappush(self._sync_retries, (at, next(self._ticket), db))
                    if at < self._wake_at:
                        self._uploader.notify()
                log.warning(
                    "walsync: sync of %s failed (retrying in %.1fs): %s",
                    db.path,
                    delay,
                    db.last_error,
                )
                return
            with self._lock:
                db.sync_delay = FIRST_RETRY
                if db.broken:  # commits dropped while this round ran: go round afresh
                    db.broken = False
                    db.checksum = None
                    db.held, db.held_bytes = [], 0
                    db.resync = True
                held, db.held, db.held_bytes = db.held, [], 0
                for rec in held:
                    self._append(db, rec)
                if db.resync:
                    db.resync = False
                    continue
                db.syncing = False
                # Other processes' commits since the sync point (their notifications came
                # while the chain position was unknown).
                capture.lib.ws_tail(db.db_id)
                self._schedule(db, time.monotonic())  # commits held or left during the sync
                self._forget_if_done(db)
                self._cond.notify_all()
                return

    def _resolve(self, db: DbState) -> None:
        """Settle the database's knobs, name and client, once."""
        cfg = self.settings.for_db(db.path)
        name = cfg.name
        with self._lock:
            owner = self._names.setdefault(name, db.db_id)
        if owner != db.db_id:
            raise ReplicationError(
                f"{db.path}: replica name {name!r} is already used by "
                f"{self._dbs[owner].path}; give one of them another name"
            )
        db.cfg = cfg
        db.name = name
        db.client = self._client(cfg.replica_root())

    def _sync(self, db: DbState) -> None:
        """Line the lineage up with the database's current bytes (see module docstring)."""
        if not db.name:
            self._resolve(db)
        assert db.client is not None
        # The first sync in this process needs the replica's head: fetched while the pages are
        # read, so that commits a crash left in the WAL can be taken under this sync point.
        stored = db.stored_head if db.generation is None else None
        fetch = None
        with tempfile.TemporaryFile() as raw:
            with capture.SyncPoint(db.path) as sp:  # closed before the upload: it pins the WAL
                if db.generation is None and stored is None:
                    fetch = self._put_pool.submit(read_head, db.client, db.name)
                taken_ns = time.time_ns()
                page_size, db_size, pages = sp.pages()
                with self._lock:
                    db.pinned_seq = sp.seq
                    self._cond.notify_all()
                checksum = format.DbChecksum.from_pages(tee(pages, raw.write))
                seq = sp.seq
                wal_frames = sp.nframe
                if fetch is not None:
                    with contextlib.suppress(TimeoutError):  # a slow store: see below
                        stored = fetch.result(HEAD_WAIT)
                survivors = self._survivors(db, sp, stored, checksum, page_size) if stored else []
            # Commits up to the sync point still belong to the old lineage: apply them first,
            # so what we compare is everything that lineage holds.
            capture.dispatcher().barrier()
            with self._lock:
                keep = []
                for rec in db.held:
                    if rec.seq <= seq:
                        self._append(db, rec)
                    else:
                        keep.append(rec)
                db.held = keep
                db.held_bytes = sum(len(r.pages) * r.page_size for r in keep)
                if db.checksum is not None:
                    head = Head(
                        db.generation,
                        db.next_txid - 1,
                        db.page_size,
                        db.checksum.db_size,
                        db.checksum.value,
                    )
                elif db.generation is not None:  # lineage broken (page size changed)
                    head = Head(None, db.next_txid - 1)
                else:  # first sync in this process: the store has the head
                    head = stored
            if head is None:  # the store was too slow to keep the WAL pinned for it
                assert fetch is not None
                head = fetch.result()
                if (
                    wal_frames
                    and head.generation is not None
                    and not _holds(head, checksum, page_size)
                ):
                    # Ahead of the replica: a crash may have left the missing commits in the
                    # WAL.  Look under a new sync point now that the head is known.
                    log.debug("walsync: %s is ahead of its replica; looking in the WAL", db.path)
                    with self._lock:
                        db.stored_head = head
                        db.resync = True
                    return
            same = bool(survivors) or _holds(head, checksum, page_size)
            if not same and head.generation is not None:
                log.debug(
                    "walsync: %s differs from its replica (%s) at seq %d: checksum %x, "
                    "%d pages of %d",
                    db.path,
                    head,
                    seq,
                    checksum.value,
                    db_size,
                    page_size,
                )
            for batch in _batches(survivors, page_size, db.cfg.max_segment_bytes):
                db.client.put(
                    format.segment_key(db.name, head.generation, batch[0].txid, batch[-1].txid),
                    format.encode_segment(page_size, batch),
                )
            txid = head.txid + len(survivors) if same else head.txid + 1
            generation = head.generation if same else format.new_generation_id(txid)
            periodic = same and db.force_snapshot and txid > db.snapshot_txid
            if not same or periodic:
                raw.seek(0)
                db.client.put(
                    format.snapshot_key(db.name, generation, txid),
                    _snapshot(raw, page_size, txid, taken_ns, db_size),
                )
        with self._lock:
            db.stored_head = None
            db.generation = generation
            db.next_txid = txid + 1
            db.page_size = page_size
            db.checksum = checksum
            db.sync_seq = seq
            db.durable_seq = max(db.durable_seq, seq)
            db.durable_txid = max(db.durable_txid, txid)
            db.failures = 0
            db.last_error = ""
            db.force_snapshot = False
            if not same or periodic or not db.snapshot_at:
                db.snapshot_txid = txid
                db.snapshot_at = time.monotonic()
            # The first retention pass comes one pass interval after the first sync, not at
            # once: a database that only just started replicating has nothing to expire.
            db.retained_at = db.retained_at or time.monotonic()
            if not same:
                self._drop_small_segments(db)
        if not same:
            how = "new generation"
        elif periodic:
            how = "snapshot"
        elif survivors:
            how = f"continued; {len(survivors)} commits recovered from the WAL"
        else:
            how = "continued"
        log.info(
            "walsync: %s -> %s/%s at txid %d (%s)",
            db.path,
            db.client.url,
            db.name,
            txid,
            how,
        )

    def _survivors(
        self,
        db: DbState,
        sp: capture.SyncPoint,
        head: Head,
        now: format.DbChecksum,
        page_size: int,
    ) -> list[format.Commit]:
        """After a restart, the commits the replica never got that are still in the WAL (see
        :func:`_wal_survivors`); [] when the database matches the replica or they cannot be
        proven to continue it.  Their commit time is the WAL file's modification time (the
        last write to it, so not before any of them), or the replica's last commit time if
        that is later: a point-in-time restore never includes a commit made after its time."""
        if head.generation is None or _holds(head, now, page_size):
            return []
        try:
            written = os.stat(db.path + "-wal").st_mtime_ns  # stat opens no descriptor
            time_ns = max(head.time_ns, written)
            return _wal_survivors(sp, head, now, time_ns, self.settings.memory_cap)
        except (Unrecoverable, OSError) as exc:
            log.info(
                "walsync: %s: commits after txid %d are not recoverable from the WAL: %s",
                db.path,
                head.txid,
                exc,
            )
            return []

    # ----------------------------------------------------------------- upload side

    def _upload_loop(self) -> None:
        while True:
            with self._lock:
                if self._stopped:
                    return
                now = time.monotonic()
                if self._freed and now >= self._next_release:
                    self._freed = False
                    self._next_release = now + RELEASE_EVERY
                    self._lock.release()  # a few ms: capture and uploads go on meanwhile
                    try:
                        heap.release()
                    finally:
                        self._lock.acquire()
                while self._sync_retries and self._sync_retries[0][0] <= now:
                    db = heapq.heappop(self._sync_retries)[2]
                    self._sync_pool.spawn(self._sync_loop, db)
                due = self._due(now, self._ship_slots - self._ships)
                if due:
                    self._start_ships(due)
                if now >= self._next_spill_check:
                    self._next_spill_check = now + SPILL_CHECK
                    self._spill_if_over_cap()
                if now >= self._next_maintenance:
                    self._next_maintenance = now + MAINTENANCE_TICK
                    self._schedule_maintenance(now)
                wait = MAINTENANCE_TICK
                # Every slot taken: only the end of ships wakes it (see _ship_all).
                full = self._throttled = self._ships >= self._ship_slots
                if self._agenda and not full:
                    wait = min(wait, max(self._agenda[0][0] - now, COALESCE))
                if self._sync_retries:
                    wait = min(wait, max(self._sync_retries[0][0] - now, 0.0))
                self._wake_at = -math.inf if full else now + wait
                self._uploader.wait(wait)
                self._wake_at = -math.inf  # awake: what is scheduled now is seen before waiting

    def _start_ships(self, due: list[DbState]) -> None:
        """Hand the due databases' oldest segments to the put threads (lock held).

        New segments are encoded here, all of them in one go with the lock released, rather
        than one per put thread: a burst of encodes runs on warm caches without a GIL
        hand-off between them (83 vs 128 us per 10-commit segment at 100 databases), and
        the put threads are left with the requests alone.
        """
        fresh = []
        for db in due:
            db.uploading = True
            self._ships += 1
            if not db.outbox:
                fresh.append((db, self._take_batch(db)))
        self._lock.release()
        try:
            encoded = [(db, self._encode_or_none(db, batch)) for db, batch in fresh]
        finally:
            self._lock.acquire()
        for db, item in encoded:
            if item is None:
                self._ships -= 1
                db.uploading = False
                self._break_lineage(db)
            else:
                db.outbox.insert(0, item)
        ready = [(db, db.outbox[0]) for db in due if db.uploading]
        for ships in _per_client(ready):
            for i in range(0, len(ships), PUT_BATCH):
                self._put_pool.spawn(self._ship_all, ships[i][0].client, ships[i : i + PUT_BATCH])

    def _encode_or_none(self, db: DbState, batch: list) -> Outgoing | None:
        """_encode, or None (logged) if the commits cannot be encoded: they are then lost to
        the lineage, which has to start again from a snapshot that holds them."""
        try:
            return self._encode(db, batch)
        except ValueError as exc:
            log.error("walsync: cannot encode commits of %s (%s); resyncing", db.path, exc)
            with self._lock:
                db.errors += 1
                db.last_error = f"encode: {exc}"
            return None

    def _take_batch(self, db: DbState) -> list[tuple[int, str, format.Commit]]:
        """The oldest pending commits of one generation, up to max_segment_bytes."""
        pending, limit = db.pending, db.cfg.max_segment_bytes
        gen = pending[0][1]
        end, size = 0, 0
        while end < len(pending) and pending[end][1] == gen and (not end or size < limit):
            size += len(pending[end][2].pages) * db.page_size
            end += 1
        batch, db.pending = pending[:end], pending[end:]
        db.pending_bytes -= size
        return batch

    def _encode(self, db: DbState, batch: list[tuple[int, str, format.Commit]]) -> Outgoing:
        commits = [c for _, _, c in batch]
        gen = batch[0][1]
        page_size = next((len(p) for c in commits for _, p in c.pages), db.page_size)
        raw_bytes = sum(len(c.pages) for c in commits) * page_size
        level = format.SMALL_SEGMENT_LEVEL if _small(raw_bytes, db) else format.SEGMENT_LEVEL
        return Outgoing(
            format.segment_key(db.name, gen, commits[0].txid, commits[-1].txid),
            gen,
            batch[-1][0],
            commits[0].txid,
            commits[-1].txid,
            raw_bytes,
            format.encode_segment(page_size, commits, level),
        )

    def _ship_all(
        self, client: storage.ReplicaClient, ships: list[tuple[DbState, Outgoing]]
    ) -> None:
        """Upload the oldest outgoing segment of each of these databases (one store) in one
        go (:func:`storage.put_all`), settle each, then give their slots back.  An uploader
        that found every slot taken is woken once half of them are free, not at each
        ship's end: databases fall due in bursts, and a wake-up per ship doubled its CPU."""
        settled = 0
        try:
            objects, sending = [], []
            for db, item in ships:
                try:
                    objects.append((item.key, item.payload()))
                    sending.append((db, item))
                except OSError as exc:  # a spooled segment that cannot be read back
                    self._upload_failed(db, exc)
                    settled += 1
            results = storage.put_all(client, objects)
            for (db, item), (_, data), exc in zip(sending, objects, results, strict=True):
                if exc is None:
                    self._uploaded(db, item, data)
                else:
                    self._upload_failed(db, exc)
                settled += 1
        except Exception as exc:  # a bug: never leave a database marked as uploading
            log.exception("walsync: uploads failed")
            for db, _ in ships[settled:]:
                self._upload_failed(db, exc)
        finally:
            with self._lock:
                self._ships -= len(ships)
                if self._throttled and self._ships <= self._ship_slots // 2:
                    self._throttled = False
                    self._uploader.notify()

    def _upload_failed(self, db: DbState, exc: Exception) -> None:
        """Retry later with backoff; nothing is dropped (but a closed database's store that
        keeps failing is given up on: see _give_up)."""
        with self._lock:
            db.uploading = False
            db.failures += 1
            db.errors += 1
            db.last_error = _describe(exc)
            db.next_attempt = time.monotonic() + min(0.1 * 2 ** (db.failures - 1), MAX_BACKOFF)
            self._cond.notify_all()
            if not db.open and db.failures >= FAILING_AFTER:
                self._give_up(db)
                return
            self._schedule(db, time.monotonic())
        log.warning(
            "walsync: upload for %s failed (attempt %d): %s", db.name, db.failures, db.last_error
        )

    def _uploaded(self, db: DbState, item: Outgoing, data: bytes) -> None:
        """A segment is in the store: keep its local copy for compaction, mark it durable."""
        self._spool.discard(item)
        run = None
        with self._lock:
            # Compaction merges runs of consecutive small segments of the current generation.
            if _small(item.raw_bytes, db) and item.generation == db.generation:
                key = format.ParsedKey(
                    db.name, item.generation, "segment", item.first_txid, item.last_txid
                )
                db.small_segments.extend((key.first_txid, key.last_txid))
                run = db.recent = db.recent or self._recent.new_run(key)
            else:
                self._drop_small_segments(db)
        if run is not None:  # a file write: outside the engine lock, before flush() returns
            self._recent.keep(run, key, data)
        with self._lock:
            db.outbox.remove(item)
            db.uploading = False
            db.failures = 0
            db.last_error = ""
            db.durable_seq = max(db.durable_seq, item.last_seq)
            db.durable_txid = item.last_txid
            db.bytes_uploaded += len(data)
            self._freed = True
            db.uploaded_since_retention = True
            self._schedule(db, time.monotonic())
            self._forget_if_done(db)
            self._cond.notify_all()

    def _drop_small_segments(self, db: DbState) -> None:
        """They will not be merged (lineage changed, or the database is forgotten): forget
        them and their local copies (lock held)."""
        db.small_segments = array("Q")
        self._recent.drop(db.recent)
        db.recent = None

    def _spill_if_over_cap(self) -> None:
        """Past the memory cap, move the biggest backlog to the local spool (lock held)."""
        mem = sum(db.pending_bytes + sum(i.memory for i in db.outbox) for db in self._dbs.values())
        if mem <= self.settings.memory_cap:
            return
        candidates = [
            db
            for db in self._dbs.values()
            if not db.spilling and (db.pending or any(i.data is not None for i in db.outbox))
        ]
        if candidates:
            db = max(candidates, key=lambda d: d.pending_bytes + sum(i.memory for i in d.outbox))
            db.spilling = True
            batches = []
            while db.pending:
                batches.append(self._take_batch(db))
            self._put_pool.spawn(self._spill, db, batches)

    def _spill(self, db: DbState, batches: list[list]) -> None:
        try:
            items = [self._encode(db, b) for b in batches]
            with self._lock:
                db.outbox.extend(items)
                in_flight = db.outbox[0] if db.uploading else None
                backlog = [i for i in db.outbox if i.data is not None and i is not in_flight]
            for item in backlog:
                self._spool.spill(item)
        except OSError as exc:  # spool full or disk full: see spool.py for the policy
            log.error(
                "walsync: cannot spool %s (%s); its unsent commits will be in a new "
                "snapshot once the store is back",
                db.name,
                exc,
            )
            with self._lock:
                in_flight = db.outbox[0] if db.uploading else None
                for item in db.outbox:
                    if item is not in_flight:
                        self._spool.discard(item)
                db.outbox[:] = [in_flight] if in_flight else []
                db.pending.clear()
                db.pending_bytes = 0
                self._drop_small_segments(db)
                db.errors += 1
                db.last_error = f"spool: {exc}"
                self._break_lineage(db)  # the lineage has a hole now
        with self._lock:
            db.spilling = False
            self._cond.notify_all()

    def _schedule_maintenance(self, now: float) -> None:
        """Start due snapshots, compactions and retention runs.  Each needs new commits or
        uploads since its last run, so idle databases never cause a request."""
        jobs = []
        for db in self._dbs.values():
            cfg = db.cfg
            if db.checksum is None:
                continue
            retain = (
                cfg.retention > 0
                and db.uploaded_since_retention
                and now - db.retained_at >= max(MAINTENANCE_TICK, cfg.retention / 10)
            )
            compact = len(db.small_segments) >= 2 * cfg.compact_segments
            if not db.maintaining and (retain or compact):
                segs, run = (_small_keys(db), db.recent) if compact else ([], None)
                if compact:
                    db.small_segments, db.recent = array("Q"), None
                if retain:
                    db.uploaded_since_retention = False
                    db.retained_at = now
                db.maintaining = True
                jobs.append((db, retain, segs, run))
            if (
                not db.syncing
                and cfg.snapshot_interval
                and now - db.snapshot_at >= cfg.snapshot_interval
                and db.next_txid - 1 > db.snapshot_txid
            ):
                db.force_snapshot = True
                self._request_sync(db)
        if jobs:
            self._maintenance_pool.spawn(self._maintain_all, jobs)

    def _maintain_all(self, jobs: list[MaintenanceJob]) -> None:
        """The due databases' retention passes and compactions.  Each database's merge is
        planned on its own, but the merged segments' PUTs and the originals' deletes go out
        together for up to PUT_BATCH databases (or MERGED_BYTES of merged segments): with
        one upload clock, a tick's compactions fall due together, and two blocking requests
        per database were most of a compaction's CPU.  Failures are logged; the work is
        simply due again later."""
        group: list[Compaction] = []
        size = 0
        for db, retain, segs, run in jobs:
            try:
                plan = self._plan_maintenance(db, retain, segs, run)
            except Exception as exc:  # noqa: BLE001 - maintenance can always wait
                self._maintenance_failed(db, exc)
                plan = None
            self._recent.drop(run)
            if plan is None:
                self._maintained(db)
                continue
            group.append((db, *plan))
            size += sum(len(data) for _, data in plan[0])
            if len(group) >= PUT_BATCH or size >= MERGED_BYTES:
                self._compact_group(group)
                group, size = [], 0
        if group:
            self._compact_group(group)

    def _plan_maintenance(
        self, db: DbState, retain: bool, segs: list[format.ParsedKey], run: Run | None
    ) -> tuple[list[tuple[str, bytes]], list[str]] | None:
        """Apply retention (if due) and plan the merge of ``segs`` (whose local copies ``run``
        holds), from at most one LIST; None when there is nothing to merge."""
        if retain or run is None or db.pruned_at >= run.started:
            # The LIST (every object of the database: it grows with the retention window) is
            # for retention, and for telling which of segs still exist -- unless all of them
            # were uploaded after retention last deleted anything and have local copies.
            objects = db.client.list(db.name + "/")
            doomed = maintenance.expired(objects, db.cfg.retention) if retain else []
            if doomed:
                db.client.delete(doomed)
                db.pruned_at = time.monotonic()
                log.info("walsync: %s retention removed %d objects", db.name, len(doomed))
            alive = {o.key for o in objects} - set(doomed)
            segs = [k for k in segs if catalog.object_key(k) in alive]
        if len(segs) < 2:
            return None
        copies = self._recent.read(run)
        return maintenance.merge_plan(db.client, segs, db.cfg.max_segment_bytes, copies.get)

    def _compact_group(self, group: list[Compaction]) -> None:
        """Write the planned merged segments, then delete the originals of every database
        whose merged segments are all in the store (per client: one put_all, one delete)."""
        for entries in _per_client(group):
            client = entries[0][0].client
            done = entries  # until the PUTs are settled, a failure is everyone's
            try:
                objects = [obj for _, puts, _ in entries for obj in puts]
                results = iter(storage.put_all(client, objects))
                done = []
                for db, puts, doomed in entries:
                    failed = [exc for exc in itertools.islice(results, len(puts)) if exc]
                    if failed:
                        self._maintenance_failed(db, failed[0])
                    else:
                        done.append((db, puts, doomed))
                client.delete([key for _, _, doomed in done for key in doomed])
                for db, puts, doomed in done:
                    log.info(
                        "walsync: %s compacted %d segments into %s",
                        db.name,
                        len(doomed),
                        [key for key, _ in puts],
                    )
            except Exception as exc:  # noqa: BLE001 - maintenance can always wait
                for db, _, _ in done:
                    self._maintenance_failed(db, exc)
            finally:
                for db, _, _ in entries:
                    self._maintained(db)

    def _maintenance_failed(self, db: DbState, exc: Exception) -> None:
        log.warning("walsync: maintenance of %s failed: %s", db.name, _describe(exc))
        with self._lock:
            db.errors += 1

    def _maintained(self, db: DbState) -> None:
        with self._lock:
            db.maintaining = False
            self._forget_if_done(db)
            self._cond.notify_all()

    def _schedule(self, db: DbState, now: float) -> None:
        """Put ``db`` on the uploader's agenda for when its next upload is due (lock held).

        Called wherever that time can move earlier: a first pending commit, a segment's worth
        of pending bytes, the end of an upload or a sync, a flush.  The uploader pops what is
        due instead of scanning every database per wake-up -- that scan, at every commit
        batch, was the biggest per-commit cost with 100 databases.  It is woken only if the
        new time comes before the one it is already waiting for.
        """
        at = self._ship_time(db, now)
        if at >= db.due_at:
            return
        db.due_at = at
        heapq.heappush(self._agenda, (at, next(self._ticket), db))
        if at < self._wake_at:
            self._uploader.notify()

    def _ship_time(self, db: DbState, now: float) -> float:
        """When the database's pending commits should ship (inf: nothing to do for now)."""
        if not (db.pending or db.outbox) or db.uploading or db.syncing:
            return math.inf  # an upload's or sync's end schedules it again
        s = db.cfg
        # Refill the token bucket.
        if s.upload_interval > 0:
            db.tokens = min(s.upload_burst, db.tokens + (now - db.token_time) / s.upload_interval)
        else:
            db.tokens = s.upload_burst
        db.token_time = now
        at = db.next_attempt
        # A full segment waits for nothing, nor does a backlog of encoded segments (left by
        # an outage or read back from the spool): catching up must not take one interval
        # per segment.
        urgent = self._flushers or db.pending_bytes >= s.max_segment_bytes or len(db.outbox) > 1
        # Burst tokens are for a commit that follows a quiet spell (the first after idle
        # ships at once); a steady stream ships one segment per upload_interval, on the
        # ticks of this process's upload clock.  On a shared clock the busy databases fall
        # due together and ship in one burst (encoded in one go, see _start_ships) instead
        # of one at a time all through the interval: fewer wake-ups, and the code runs warm.
        # A database off the clock (its stream began with a burst upload) drifts onto it by
        # at most a tenth of an interval per upload: never two uploads within an interval,
        # and a commit waits at most 1.1 intervals.
        interval = s.upload_interval
        if interval > 0 and not urgent and not (db.quiet and db.tokens >= 1):
            target = db.shipped_at + interval
            phase = self._phase * interval
            tick = math.ceil((target - phase) / interval - 1e-9) * interval + phase
            at = max(at, min(tick, target + interval / 10))
        return at

    def _due(self, now: float, room: int) -> list[DbState]:
        """Up to ``room`` databases whose pending commits should ship now (from the agenda;
        lock held).  The others stay due on the agenda, their commits pending."""
        ready: list[DbState] = []
        agenda = self._agenda
        while agenda and agenda[0][0] <= now and len(ready) < room:
            at, _, db = heapq.heappop(agenda)
            if at != db.due_at:
                continue  # superseded by an earlier entry
            db.due_at = math.inf
            due = self._ship_time(db, now)
            if due <= now:
                db.tokens = max(db.tokens - 1, 0)
                # A paced upload counts from its tick, however late it starts, so a slow
                # burst does not push the database off the clock (see _ship_time).
                db.shipped_at = due if now - due < db.cfg.upload_interval else now
                db.quiet = False
                ready.append(db)
            else:
                self._schedule(db, now)
        return ready

    def await_sync_point(self, db_id: int, timeout: float) -> None:
        """Start the sync of a newly opened database and block its opener until the engine
        has pinned its sync point.

        The shim publishes nothing for a database until its chain position is known, so a
        commit made between open and sync point would be folded into the snapshot and the
        lineage could not continue.  Holding the opener for those few milliseconds keeps a
        reopened database in its generation.
        """
        capture.dispatcher().barrier(timeout)
        with self._lock:
            db = self._dbs.get(db_id)
            if db is None:
                return  # not ours (routed elsewhere) or already forgotten
        if not self._host.join(db_id, db.path):
            return  # another process of this host replicates it
        with self._lock:
            if db.pinned_seq < db.open_seq:
                # Only now: the hook has put the database in WAL mode.  A sync already running
                # may have pinned before this open; it then goes round once more.
                self._request_sync(db)
            if not self._cond.wait_for(
                lambda: self._stopped or db.pinned_seq >= db.open_seq or db.failures, timeout
            ):
                return

    # ---------------------------------------------------------------------- flush

    def flush(self, timeout: float | None = None) -> None:
        """Block until every commit made before the call is in its replica (those of
        databases another process replicates: by asking that process)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            followed = [db for db in self._dbs.values() if not self._host.leads(db.db_id)]
        for db in followed:
            try:
                if self._host.ask_flush(db.db_id, deadline):
                    continue
            except LeaderError as exc:
                raise ReplicationError(f"replica of {db.path} is failing: {exc}") from None
        self._flush(deadline)

    def _flush_for_follower(self, db_id: int, timeout: float) -> str | None:
        """A follower's flush: make every commit in the WAL durable (None, or why not)."""
        capture.lib.ws_tail(db_id)
        try:
            self._flush(time.monotonic() + timeout, only=db_id)
        except ReplicationError as exc:
            return str(exc)
        return None

    def _promote(self, db_id: int) -> None:
        """This process leads a database it followed: sync, which continues the lineage
        from the WAL if the previous leader left commits unshipped."""
        with self._lock:
            db = self._dbs.get(db_id)
            if db is not None:
                self._request_sync(db)

    def _flush(self, deadline: float | None, only: int | None = None) -> None:
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        capture.dispatcher().barrier(left if left is not None else 60.0)
        with self._lock:
            marks = {
                db.db_id: db.seen_seq
                for db in self._dbs.values()
                if (only is None or db.db_id == only) and self._host.leads(db.db_id)
            }
            self._flushers += 1
            now = time.monotonic()
            for db in self._dbs.values():  # all urgent now
                self._schedule(db, now)
            try:
                while True:
                    waiting = [
                        db
                        for i, m in marks.items()
                        if (db := self._dbs.get(i)) is not None
                        and (db.syncing or db.durable_seq < m)
                    ]
                    if not waiting:
                        return
                    for db in waiting:
                        if db.failures >= FAILING_AFTER:
                            raise ReplicationError(
                                f"replica of {db.path} is failing: {db.last_error}"
                            )
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        names = ", ".join(db.path for db in waiting)
                        raise TimeoutError(f"flush timed out; not yet replicated: {names}")
                    self._cond.wait(left if left is not None else 1.0)
            finally:
                self._flushers -= 1

    def stats(self) -> list[dict]:
        now = time.time_ns()
        with self._lock:
            return [
                dict(stats_of(db, now), leader=self._host.leads(db.db_id))
                for db in self._dbs.values()
            ]

    def forget_after_fork(self) -> None:
        """In a forked child: this engine's threads stayed in the parent; let go of what
        the child inherited from it (the parent keeps its locks and socket)."""
        self._host.after_fork_in_child()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._cond.notify_all()
            self._uploader.notify()
        self._host.stop()
        self._thread.join()
        self._put_pool.shutdown(wait=True)
        self._maintenance_pool.shutdown(wait=True)
        self._sync_pool.shutdown(wait=False, cancel=True)
        self._recent.close()


def _holds(head: Head, now: format.DbChecksum, page_size: int) -> bool:
    """Does the replica's last state equal the database's pinned bytes?"""
    return (
        head.generation is not None
        and head.checksum == now.value
        and head.page_size == page_size
        and head.db_size == now.db_size
    )


class Unrecoverable(Exception):
    """Why commits after the replica's last one cannot be taken from the WAL."""


def _wal_survivors(
    sp: capture.SyncPoint, head: Head, now: format.DbChecksum, time_ns: int, cap: int
) -> list[format.Commit]:
    """The WAL's commits after the replica's last one, as txids ``head.txid + 1, ...``;
    raises :class:`Unrecoverable` unless they provably lead from the replica's last state to
    the pinned one.

    The replica's last commit ended at WAL frame F (when its salts are still the WAL's), or
    else the replica may equal the db file alone (F = 0: the WAL was checkpointed and
    restarted since).  The state at F of every page a frame after F touches, with the pinned
    state for the rest, must have the replica's whole-db checksum: that proves the replica
    holds exactly that state -- a checkpoint that already copied later frames into the db
    file fails it -- so replaying the frames after F, one commit frame at a time, gives each
    later commit's exact state; the last must be the pinned state.  At most ``cap`` bytes of
    frames are read: beyond that a new generation is cheaper than holding them.
    """
    if head.checksum is None or head.page_size != sp.wal_page_size:
        raise Unrecoverable("the WAL is empty or has another page size")
    pos = head.wal
    same_wal = pos is not None and (pos.salt1, pos.salt2) == sp.salts
    start = pos.end if same_wal else 0
    where = f"WAL frames {start}..{sp.nframe} ({'same WAL' if same_wal else 'from the start'})"
    if not start < sp.nframe:
        raise Unrecoverable(f"no {where}")
    if (sp.nframe - start) * head.page_size > cap:
        raise Unrecoverable(f"{where} exceed memory_cap")
    commits: list[format.Commit] = []
    try:
        frames = list(sp.frames(start))
        touched = {pgno for pgno, _, _ in frames if pgno <= head.db_size}
        touched.update(range(now.db_size + 1, head.db_size + 1))  # cut off since: all needed
        state = now.copy()
        state.apply(head.db_size, sp.pages_as_of(start, sorted(touched)))
        if state.value != head.checksum:
            raise Unrecoverable(f"what precedes {where} is not the replica's last state")
        pages: dict[int, bytes] = {}
        last = None  # the latest commit frame
        for i, frame in enumerate(frames, start + 1):
            pgno, commit_size, page = frame
            wal = format.WalPos(*sp.salts, i)
            if not pages and frame == last:
                # Without powersafe overwrite, synchronous=FULL pads a commit to a sector
                # boundary with copies of its commit frame: part of that commit, as the shim
                # publishes it (a real transaction like this would change nothing anyway).
                commits[-1] = dataclasses.replace(commits[-1], wal=wal)
                continue
            pages[pgno] = page
            if commit_size:  # a commit frame: the transaction's pages are complete
                kept = tuple(sorted((p, d) for p, d in pages.items() if p <= commit_size))
                state.apply(commit_size, kept)
                txid = head.txid + len(commits) + 1
                commits.append(format.Commit(txid, time_ns, commit_size, state.value, kept, wal))
                pages, last = {}, frame
    except (capture.CaptureError, ValueError) as exc:  # e.g. the db file no longer has a page
        raise Unrecoverable(f"{where}: {exc}") from exc
    if state.value != now.value or state.db_size != now.db_size:
        raise Unrecoverable(f"replaying {where} does not give the database's state")
    return commits


def _per_client(entries: list[_E]) -> Iterable[list[_E]]:
    """Entries that start with a database, grouped by the client of its replica root (one
    batch of requests per store), in their order."""
    groups: dict[int, list[_E]] = {}
    for entry in entries:
        groups.setdefault(id(entry[0].client), []).append(entry)
    return groups.values()


def _small(raw_bytes: int, db: DbState) -> bool:
    """Whether a segment of ``raw_bytes`` page bytes is one compaction merges."""
    return raw_bytes < db.cfg.max_segment_bytes // 4


def _small_keys(db: DbState) -> list[format.ParsedKey]:
    """The keys of the database's small segments (all of its current generation)."""
    pairs = db.small_segments
    assert db.generation is not None
    return [
        format.ParsedKey(db.name, db.generation, "segment", first, last)
        for first, last in zip(pairs[::2], pairs[1::2], strict=True)
    ]


def _batches(
    commits: list[format.Commit], page_size: int, max_bytes: int
) -> Iterator[list[format.Commit]]:
    """Consecutive commits in segments of about ``max_bytes`` of pages (at least one each)."""
    batch: list[format.Commit] = []
    size = 0
    for commit in commits:
        if batch and size >= max_bytes:
            yield batch
            batch, size = [], 0
        batch.append(commit)
        size += len(commit.pages) * page_size
    if batch:
        yield batch


def _snapshot(raw: BinaryIO, page_size: int, txid: int, time_ns: int, db_size: int) -> bytes:
    """Encode the raw pages spooled at a sync point as a snapshot object."""
    with tempfile.TemporaryFile() as out:
        writer = format.SnapshotWriter(out, page_size, txid, time_ns, db_size)
        for _ in range(db_size):
            writer.add_page(raw.read(page_size))
        writer.finish()
        out.seek(0)
        return out.read()


def _describe(exc: BaseException) -> str:
    """One line for logs and errors; storage errors already are one clear line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        text
        if isinstance(exc, storage.StorageError | ReplicationError)
        else (f"{type(exc).__name__}: {text}")
    )


def stats_of(db: DbState, now_ns: int) -> dict:
    """One database's replication state; lag is the age of its oldest unreplicated commit."""
    oldest = db.pending[0][2].time_ns if db.pending else (db.held[0].time_ns if db.held else now_ns)
    return {
        "path": db.path,
        "name": db.name,
        "generation": db.generation,
        "last_txid": db.next_txid - 1,
        "replicated_txid": db.durable_txid,
        "lag_seconds": max(0.0, (now_ns - oldest) / 1e9),
        "pending_commits": len(db.pending) + len(db.held),
        "pending_bytes": db.pending_bytes,
        "bytes_uploaded": db.bytes_uploaded,
        "syncing": db.syncing,
        "failures": db.failures,
        "errors": db.errors,
        "last_error": db.last_error,
    }
