"""The replication engine: turns each database's captured commits into snapshots and segments.

One engine per process.  It is the capture dispatcher's default sink, so every database opened
through ``vfs="walsync"`` replicates.  Per database it keeps only a little state
(:class:`Database`: no thread, no client, no buffer beyond commits not yet uploaded).  The
engine holds the lock and the threads, and wires the roles together:

* **Sync** (sync.py, lineage.py, recovery.py).  On the first OPEN, after a GAP and on reopen,
  a worker takes a sync point and reads the database's exact bytes; the lineage continues
  if they match the replica's latest state, else they become the snapshot of a new
  generation.  Commits a crash left in the WAL are recovered when they provably continue it.
* **Upload** (uploader.py).  One uploader thread starts the due uploads on a shared clock;
  a pool of put threads sends them, one upload in flight per database keeping its segments
  in order.  Failures are retried with backoff; nothing is dropped.
* **Maintenance** (compactor.py).  Periodic snapshots, compaction and retention, one pass at
  a time beside the uploads.
* **Lease** (lease.py).  A sync first holds the database name's writer lease in the store;
  the uploader thread has it renewed, and a writer refused or fenced out by another stops
  uploading, says so once, and tries again on the sync's backoff.
"""

from __future__ import annotations

import atexit
import heapq
import itertools
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from walsync_vfs import capture, descriptors, format, heap, storage, sync
from walsync_vfs.backoff import Backoff
from walsync_vfs.capture import JournalModeError, Kind, Record
from walsync_vfs.compactor import MAINTENANCE_TICK, Compactor
from walsync_vfs.config import ConfigError, Settings
from walsync_vfs.database import FAILING_AFTER, Database, oldest_unreplicated_ns, stats_of
from walsync_vfs.errors import FlushTimeoutError, NameTaken, ReplicationError
from walsync_vfs.leader import Host, LeaderError
from walsync_vfs.lease import Lease, Refused, Unfenceable, renew_all
from walsync_vfs.lineage import Head, decide, extend_runs, read_head
from walsync_vfs.recent import RecentCopies
from walsync_vfs.spool import Spool
from walsync_vfs.uploader import PUT_BATCH, RETRY, Pending, Queued, Uploader
from walsync_vfs.workers import Workers

__all__ = ["Engine", "ReplicationError", "stats_of"]

log = logging.getLogger("walsync_vfs")

COALESCE = 0.01  # s: uploads falling due this close together start in one uploader wake-up
# s between looks at the memory cap (a sum over every database), made whenever the uploader
# wakes: for a due upload, a database past max_segment_bytes, or at least every MAINTENANCE_TICK.
SPILL_CHECK = 0.05
RELEASE_EVERY = 1.0  # s between heap.release() calls, made only after uploads freed page copies
# A database out of WAL is looked at again this often: commits made back in WAL before the
# next look go into the resuming sync point's state, without restore points of their own.  A
# look also claims the lease (two requests to the store), so other stops (an application's
# EXCLUSIVE lock, which may last) keep the sync backoff.
LOOK_AGAIN = Backoff(first=0.1, cap=0.5)
BEHIND_A_SYNC_WAIT = 0.25  # s an opener waits for a sync that is past its sync point
BARRIER_FLOOR = 0.5  # s a flush waits for the capture thread to hand over what it holds
FLUSH_LOOK = 0.25  # s between a waiting flush's looks at what it waits for
LEADER_STATS_WAIT = 0.5  # s stats() waits for the leaders of databases it follows
HELD_WAIT = 0.05  # s between looks at the memory held commits are appended into
_COMMIT = int(Kind.COMMIT)  # a ws_rec's kind, compared on the capture path without the enum


class NameInUse(Exception):
    """The replica name belongs to a closed database still finishing its uploads."""


class Engine:
    """See the module docstring."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # state changes: flush, sync points
        # The uploader waits on its own condition, so the end of every upload (which wakes
        # flushers) does not wake it too; Uploader.schedule wakes it when it has to.
        self._wake = threading.Condition(self._lock)
        self._dbs: dict[int, Database] = {}
        # (replica root, name) -> db_id: two databases must not share one prefix
        self._names: dict[tuple[str, str], int] = {}
        self._clients: dict[str, storage.ReplicaClient] = {}
        self._sync_retries: list[tuple[float, int, Database]] = []  # (time, tie-breaker, db)
        self._ticket = itertools.count()
        self._next_spill_check = 0.0
        self._spool = Spool(settings)
        self._next_maintenance = 0.0
        self._next_release = 0.0
        self._stopped = False
        self._join_pool = Workers(2, "walsync-join")
        # A store that hangs holds a sync for its timeouts: each replica root has syncs of
        # its own, so one root's outage never delays another root's databases.
        self._sync_pools: dict[str, Workers] = {}
        self.compactor = Compactor(
            self._lock, self._cond, RecentCopies(self._spool), self.forget_if_done
        )
        self.uploads = Uploader(
            settings, self._lock, (self._cond, self._wake), self._spool, self, self.compactor
        )
        self._thread: threading.Thread | None = None  # runs while a database is kept
        self._host = Host(self._promote, self._flush_for_follower, self._stats_for_follower)
        self._leases: set[Lease] = set()  # held or being released: released at exit too
        atexit.register(self._release_leases)

    def database(self, path: str) -> Database | None:
        """The state kept for the database at ``path``, if any."""
        with self._lock:
            return next((db for db in self._dbs.values() if db.path == path), None)

    # ------------------------------------------------------------------ capture side

    def on_records(self, batch: capture.Batch) -> None:
        """Dispatcher sink: called with each batch of records, in commit order.

        Every database's records are taken in rounds.  The commits at the front of each
        database's records that extend its lineage as it is go through in one C call for all
        of them (lineage.extend_runs), onto the run each database has open, so a drain
        holding one commit for each of many databases releases the GIL once, not once per
        database, and makes no Python object per commit; a record that cannot go that way
        (another kind, a commit during a sync, one the C refused) is converted and handled
        on its own, and the next round goes on after it.
        Wakes the uploader only when a database gets something to ship sooner than it was
        going to look (see Uploader.schedule): a steady stream of commits costs no wake-ups.
        """
        dbs = self._dbs
        with self._lock:
            now = time.monotonic()
            # (a database's records, the next one to handle, whether it may go through C)
            left = [(chain, chain.first, True) for chain in batch.chains()]
            while left:
                later, starts, ready = [], [], []
                for chain, rec, in_c in left:
                    db = dbs.get(chain.db_id)
                    # Not during a sync (it holds them), nor on a broken lineage or one
                    # that lost a commit.
                    if in_c and db is not None and rec.kind == _COMMIT and not db.sync.syncing:
                        lineage = db.lineage
                        if lineage.checksum is not None and lineage.whole:
                            run = db.upload.open_run(lineage.generation)
                            extent, max_bytes = chain.max_db_size, db.cfg.max_segment_bytes
                            starts.append((lineage, rec, run, extent, max_bytes))
                            ready.append((chain, db))
                            continue
                    self._on_record(capture.convert(rec))
                    if rec.next:  # a NULL pointer is false
                        later.append((chain, rec.next, True))
                made = extend_runs(starts) if starts else []
                for (chain, db), ext in zip(ready, made, strict=True):
                    if ext.last_seq:
                        db.upload.seen_seq = ext.last_seq
                        if ext.made:
                            self._queue_runs(db, ext, now)
                    if ext.next:  # the C stopped at it: it goes the general way
                        later.append((chain, ext.next, False))
                left = later

    def _queue_runs(self, db: Database, ext: capture.Extension, now: float) -> None:
        """Queue what extend_runs made: commits on the database's open run (its pending
        item, which now ends at a later seq) and runs begun after it (lock held)."""
        lineage, up = db.lineage, db.upload
        gen = lineage.generation
        assert gen is not None
        began = [(run.last_seq, gen, run) for run in ext.began] if ext.began else []
        if ext.open is not None:
            seq = ext.open.last_seq if began else ext.last_seq
            up.pending[-1] = (seq, gen, ext.open)
        self._pend(db, began, ext.pages * lineage.page_size, now)

    def _on_record(self, rec: Record) -> None:
        """Handle one record (lock held)."""
        db = self._dbs.get(rec.db_id)
        if rec.kind is Kind.COMMIT and db is not None:
            db.upload.seen_seq = rec.seq
            if type(rec.pages) is capture.SpooledPages and not self._spooled(db, rec):
                return
            if db.sync.syncing:
                self._hold(db, rec)
            else:
                self._append(db, rec)
        elif rec.kind is Kind.OPEN:
            if db is None:
                db = self._dbs[rec.db_id] = Database(rec.db_id, rec.path)
                self._ensure_thread()
                descriptors.make_room(len(self._dbs))
            log.debug("walsync: %s opened (seq %d)", rec.path, rec.seq)
            db.open = db.joining = True
            db.opened_ns = rec.time_ns
            db.sync.open_seq = rec.seq
            self._join_pool.spawn(self._join_opened, db)
        elif db is None:
            return
        elif rec.kind is Kind.GAP:
            if rec.missed:
                # A process without the shim restarted the WAL over them before they were read.
                db.lost_restore_points += rec.missed
                log.warning(
                    "walsync: %s: %d commits made outside the stream were erased from the WAL "
                    "before they were read; their restore points are lost, their changes ship "
                    "with the resync",
                    db.path,
                    rec.missed,
                )
            log.info("walsync: %s changed outside the stream; resyncing", db.path)
            db.lineage.lost(rec.seq)
            self._request_sync(db)
        elif rec.kind is Kind.CLOSE:
            log.debug("walsync: %s closed (seq %d)", db.path, rec.seq)
            db.open = False
            if db.stopped and self._cancel_retry(db):
                db.sync.syncing = False  # nothing to look at until it is opened again
            if db.given_up() and self._cancel_retry(db):
                db.sync.syncing = False
                self.give_up(db)  # rather than after one more refused attempt
            else:
                self.forget_if_done(db)

    def _spooled(self, db: Database, rec: Record) -> bool:
        """Count a giant commit's frames, in a file of the spool directory, against the spool
        cap (lock held).  Past the cap its restore point is given up, as for held commits:
        the file goes, and the next sync point's snapshot holds the commit."""
        assert isinstance(rec.pages, capture.SpooledPages)
        try:
            self._spool.count(rec.pages.file_bytes, rec.pages)
            return True
        except OSError as exc:
            self._past_spool_cap(db, f"a commit of {len(rec.pages)} pages", exc, 1)
        return False

    def _cancel_retry(self, db: Database) -> bool:
        """Drop the database's pending sync retry, if it has one (lock held)."""
        kept = [entry for entry in self._sync_retries if entry[2] is not db]
        if len(kept) == len(self._sync_retries):
            return False
        self._sync_retries[:] = kept
        heapq.heapify(self._sync_retries)
        return True

    def _ensure_thread(self) -> None:
        """Start the uploader thread if it ended (lock held)."""
        if self._thread is None and not self._stopped:
            self._thread = threading.Thread(target=self._loop, name="walsync-upload", daemon=True)
            self._thread.start()

    def _hold(self, db: Database, rec: Record) -> None:
        """Keep a commit that arrived during a sync: in memory up to a quarter of the memory
        cap, then in the spool.  Past the spool's cap the held commits' restore points are
        given up (and counted): the next sync point, which comes after them, takes them into
        its snapshot."""
        state = db.sync
        if state.held_bytes + rec.memory <= self.settings.memory_cap // 4:
            state.hold(rec)
            return
        try:
            state.hold_spooled(rec, self._spool)
            return
        except OSError as exc:  # spool full or disk full
            lost = state.drop_held(self._spool) + 1
            reason = exc
        self._past_spool_cap(db, "commits held during a sync", reason, lost)

    def _past_spool_cap(self, db: Database, what: str, reason: OSError, lost: int) -> None:
        """Commits the spool could not take: their restore points are given up (counted,
        logged) and the next sync point's snapshot holds them (lock held)."""
        db.lost_restore_points += lost
        db.errors += 1
        db.last_error = f"spool: {reason}"
        log.warning(
            "walsync: %s: %s passed the spool cap (%s); restore points lost: %d, their "
            "changes will be in the next snapshot",
            db.path,
            what,
            reason,
            lost,
        )
        self.break_lineage(db)

    def break_lineage(self, db: Database) -> None:
        """Commits were dropped: nothing may be appended to the lineage any more, and the
        next sync point starts a new generation whose snapshot holds them."""
        db.lineage.checksum = None
        db.sync.broken = db.sync.syncing  # a sync in flight may restore it: see _sync_loop
        self._request_sync(db)

    def _request_sync(self, db: Database) -> None:
        """Start a sync, or ask the running one to go round once more."""
        if not self._host.leads(db.db_id):
            return  # another process replicates it
        if db.sync.syncing:
            db.sync.resync = True
        else:
            db.sync.syncing = True
            self._spawn_sync(db)

    def _spawn_sync(self, db: Database) -> None:
        """Run the database's sync on its replica root's workers (lock held)."""
        if db.claim is not None:
            root = db.claim[0]
        else:
            try:
                root = self.settings.for_db(db.path).replica_root()
            except ConfigError:
                root = ""  # the sync reports it
        pool = self._sync_pools.get(root)
        if pool is None:
            pool = self._sync_pools[root] = Workers(2, "walsync-sync")
        pool.spawn(self._sync_loop, db)

    def _append(self, db: Database, rec: Record) -> None:
        """Give a commit its txid and whole-db checksum and queue it for upload."""
        lineage = db.lineage
        if not lineage.follows(rec):
            return  # inside the snapshot this lineage starts from
        if rec.page_size != lineage.page_size:
            # VACUUM changed the page size: the next sync point comes after this commit, so
            # the snapshot it takes contains it.
            log.info(
                "walsync: %s page size %d -> %d; resyncing",
                db.path,
                lineage.page_size,
                rec.page_size,
            )
            lineage.break_at(rec.seq)
            self._request_sync(db)
            return
        self._queue(db, lineage.generation, [(rec.seq, lineage.extend(rec))])

    def _queue(self, db: Database, generation: str | None, commits: Sequence[Queued]) -> None:
        """Queue (seq, commit or run of commits)s of the lineage's generation for upload
        (lock held)."""
        assert generation is not None
        now = time.monotonic()
        page_size, up = db.lineage.page_size, db.upload
        pending, size = [], 0
        for seq, c in commits:
            pending.append((seq, generation, c))
            size += c.page_count * page_size
            # An exact type test: isinstance against an abstract Sequence is slow.
            if type(c) is format.Commit and type(c.pages) is capture.SpooledPages:
                up.disk_bytes += c.page_count * page_size
        self._pend(db, pending, size, now)

    def _pend(self, db: Database, items: Sequence[Pending], size: int, now: float) -> None:
        """Add ``items`` (``size`` bytes of pages) to the database's pending commits,
        schedule its upload if they are due, and spill past the memory cap (lock held)."""
        up = db.upload
        grown = up.pending_bytes + size
        due = up.queue(items, grown, now, db.cfg)
        up.pending_bytes = grown  # before scheduling: a segment's worth is due at once
        if due:
            self.uploads.schedule(db, now)
        self._check_cap(db)

    def _check_cap(self, db: Database) -> None:
        """A database past the memory cap on its own has the uploader spill at once (lock
        held): asleep while a slow store keeps every ship slot, it would look only when a
        ship ends, and a fast writer's commits would pile up in memory meanwhile."""
        if db.upload.memory > self.settings.memory_cap and not db.upload.spilling:
            self._next_spill_check = 0.0
            self._wake.notify()

    def give_up(self, db: Database) -> None:
        """A closed database whose store keeps failing: stop retrying (lock held).

        Its file holds every commit, and its next open starts from a fresh sync point that
        the replica is compared against, so nothing is lost -- only restore points.
        """
        log.error("walsync: giving up on %s after it closed: %s", db.path, db.last_error)
        self.uploads.discard(db)
        db.sync.drop_held(self._spool)
        self.forget_if_done(db)

    def forget_if_done(self, db: Database) -> None:
        """Drop a closed database's state once everything it committed is uploaded."""
        if db.open or db.busy() or self._dbs.get(db.db_id) is not db:
            return
        del self._dbs[db.db_id]
        if db.lease is not None:
            self.uploads.pool.spawn(self._release, db.lease)  # the next writer may start at once
        self._host.leave(db.db_id)
        self.compactor.drop_copies(db)
        if db.claim is not None and self._names.get(db.claim) == db.db_id:
            del self._names[db.claim]
            for waiting in self._dbs.values():
                if waiting.client is None:  # one may be waiting for this name
                    self._retry_now(waiting)
        self._cond.notify_all()
        if not self._dbs:
            self._wake.notify()  # the uploader thread ends

    # ------------------------------------------------------------------- sync side

    def _client(self, root: str) -> storage.ReplicaClient:
        with self._lock:
            client = self._clients.get(root)
        if client is None:
            client = storage.open_replica(root, **self.settings.client_options)
            with self._lock:
                client = self._clients.setdefault(root, client)
        return client

    def _sync_loop(self, db: Database) -> None:
        """Sync until it succeeds and no resync is due.

        A failed attempt is retried with backoff by the uploader thread (see _loop), not by
        sleeping here: a worker waiting out an outage would hold up the syncs of every other
        database behind it.
        """
        state = db.sync
        while not self._stopped:
            with self._lock:
                if not db.open and db.lineage.generation is None:
                    self._never_held(db)
                    return
            try:
                try:
                    self._sync(db)
                finally:
                    with self._lock:
                        state.past_pin = False
            except capture.ClosedError:
                with self._lock:
                    self._never_held(db)
                return
            except capture.Uncapturable as exc:
                self._stop(db, exc)
                return
            except capture.EmptyFileError:
                with self._lock:  # look again once its opener has written to it
                    self._retry_later(db)
                return
            except capture.StillOpenError:
                with self._lock:  # look again once a VACUUM INTO would have closed it
                    state.seen_open = True
                    self._retry_later(db)
                return
            except NameInUse as exc:
                log.debug("walsync: %s", exc)
                with self._lock:  # retried at once when the other one is forgotten
                    self._retry_later(db)
                return
            except Exception as exc:  # noqa: BLE001 - reported, retried, never dropped
                # The sync point's own connections open and close the database: whether its
                # application still has it open is known once their records are in.
                capture.dispatcher().barrier()
                with self._lock:
                    fenced = self._fenced(db, exc)
                    db.fail(exc)
                    if isinstance(exc, NameTaken):
                        db.failures = max(db.failures, FAILING_AFTER)
                    self._cond.notify_all()
                    if db.given_up():
                        state.syncing = False
                        self.give_up(db)
                        return
                    delay = self._retry_later(db)
                if fenced:
                    return
                log.warning(
                    "walsync: sync of %s failed (retrying in %.1fs): %s",
                    db.path,
                    delay,
                    db.last_error,
                )
                return
            with self._lock:
                state.retries = 0
                if not state.broken:
                    self._append_held(db)
                if state.broken:  # commits dropped while this round ran: go round afresh
                    state.broken = False
                    db.lineage.checksum = None
                    state.drop_held(self._spool)
                    state.resync = True
                if state.resync or state.pinned_seq < state.open_seq:
                    state.resync = False
                    continue
                state.syncing = False
                # Other processes' commits since the sync point (their notifications came
                # while the chain position was unknown).
                capture.lib.ws_tail(db.db_id)
                self.uploads.schedule(db, time.monotonic())  # commits held during the sync
                self.forget_if_done(db)
                self._cond.notify_all()
                return

    def _retry_later(self, db: Database, backoff: Backoff = RETRY) -> float:
        """Have the uploader thread start the sync again after a backoff (lock held)."""
        db.sync.retries += 1
        delay = backoff.delay(db.sync.retries)
        at = time.monotonic() + delay
        heapq.heappush(self._sync_retries, (at, next(self._ticket), db))
        if at < self.uploads.wake_at:
            self._wake.notify()
        return delay

    def _stop(self, db: Database, exc: capture.Uncapturable) -> None:
        """A database cannot be captured (out of WAL mode, or locked by the application):
        say so once (ERROR), make flush() fail once what was committed before is uploaded
        (the store is not failing: that still ships), and look again with backoff while it
        is open: once it can be, replication resumes (after a switch out of WAL, in a new
        generation)."""
        with self._lock:
            if not db.stopped:  # logged before flush() can raise
                log.error("walsync: %s", exc)
            db.stopped = True
            db.errors += 1
            db.last_error = str(exc)  # already one line saying what to do
            self.uploads.schedule(db, time.monotonic())  # a sync kept them waiting
            self._cond.notify_all()
            if not db.open:  # nothing to look at until it is opened again
                db.sync.syncing = False
                self.forget_if_done(db)
                return
            self._retry_later(db, LOOK_AGAIN if isinstance(exc, JournalModeError) else RETRY)

    def _retry_now(self, db: Database) -> None:
        """Move the database's sync retry, if one is waiting out its backoff, to now."""
        if not self._cancel_retry(db):
            return  # none waiting: its sync is running, or done
        heapq.heappush(self._sync_retries, (time.monotonic(), next(self._ticket), db))
        self._wake.notify()

    def _resolve(self, db: Database) -> None:
        """Settle the database's knobs, name and client, once."""
        cfg = self.settings.for_db(db.path)
        name = cfg.name
        claim = (cfg.replica_root(), name)
        with self._lock:
            owner = self._names.setdefault(claim, db.db_id)
            other = self._dbs[owner]
        if other is not db:
            if not other.open:
                raise NameInUse(
                    f"{db.path}: waiting for {other.path}, closed, to finish its uploads"
                )
            raise NameTaken(
                f"{db.path}: replica name {name!r} is already used by "
                f"{other.path}; give one of them another name"
            )
        db.cfg = cfg
        db.name = name
        db.claim = claim
        # Its commits bigger than a segment reach Python as files in the spool directory.
        spool_dir = os.fsencode(self._spool.directory())
        capture.lib.ws_spool_big(db.db_id, cfg.max_segment_bytes, spool_dir)
        db.client = self._client(cfg.replica_root())
        if cfg.fencing:
            db.client.create_only = True
            db.lease = Lease(db.client, name, db.path, cfg.lease_time)
            with self._lock:
                self._leases.add(db.lease)

    def _claim(self, db: Database, read: bool) -> tuple[bool, Head | None]:
        """Hold the database name's writer lease (renewed if held), then read the replica's
        head if ``read``: a new holder must continue from what the last one wrote.  Whether
        the holding is new (another writer may have extended the replica since this lineage
        started), and the head; raises Refused or Unfenceable, which _fenced reports."""
        lease = db.lease
        fresh = False
        if lease is not None:
            before = lease.epoch
            lease.acquire()
            fresh = lease.epoch != before
            with self._lock:
                if db.fenced:
                    log.warning("walsync: %s: the other writer let go; replicating again", db.path)
                    db.fenced, db.fenced_since_ns = "", 0
        assert db.client is not None
        return fresh, read_head(db.client, db.name) if read else None

    def _fenced(self, db: Database, exc: Exception) -> bool:
        """If ``exc`` says another writer holds the lease (or the store cannot fence): say so
        once, stop shipping and let the next sync start afresh (lock held)."""
        if not isinstance(exc, Refused | Unfenceable):
            return False
        if db.fenced != str(exc):
            log.error("walsync: %s", exc)
            db.fenced = str(exc)
        if not db.fenced_since_ns:  # its lag runs from the oldest commit it drops, or now
            db.fenced_since_ns = oldest_unreplicated_ns(db) or time.time_ns()
        self._start_afresh(db)
        return True

    def _start_afresh(self, db: Database) -> None:
        """Drop what the database has not shipped and forget its lineage, so that its next
        sync continues from the replica's head (lock held): another writer may have
        extended it meanwhile.  The database holds the dropped commits, so they are in the
        snapshot that sync takes; their restore points are counted as lost."""
        up = db.upload
        db.lost_restore_points += db.sync.drop_held(self._spool) + up.drop_pending()
        db.lineage.generation, db.lineage.checksum = None, None  # a sync may hold it: in place
        for item in up.outbox[1:] if up.uploading else up.outbox:
            self._spool.discard(item)
        up.outbox[:] = up.outbox[:1] if up.uploading else []
        self.compactor.drop_copies(db)
        self._cond.notify_all()

    def _renew_leases(self, now: float) -> None:
        """Have due lease renewals made by the put threads, those of one store a batch at
        a time (lease.renew_all: one wake-up for the batch's replies) (lock held)."""
        due: dict[int, list[tuple[Database, Lease]]] = {}
        for db in self._dbs.values():
            lease = db.lease
            if lease is not None and lease.renew_due(now) and not lease.renewing:
                lease.renewing = True
                due.setdefault(id(lease.client), []).append((db, lease))
        for group in due.values():
            for i in range(0, len(group), PUT_BATCH):
                self.uploads.pool.spawn(self._renew, group[i : i + PUT_BATCH])

    def _renew(self, group: list[tuple[Database, Lease]]) -> None:
        try:
            errors = renew_all([lease for _, lease in group])
        except Exception as exc:  # noqa: BLE001 - the leases lapse; uploads wait for them
            errors = [exc] * len(group)
        with self._lock:
            for (db, lease), error in zip(group, errors, strict=True):
                lease.renewing = False
                if error is None:
                    self.uploads.schedule(db, time.monotonic())
                elif self._fenced(db, error):
                    self._request_sync(db)
        for (db, _), error in zip(group, errors, strict=True):
            if error is not None and not isinstance(error, Refused):
                log.warning("walsync: renewing the lease of %s failed: %s", db.path, error)

    def _release(self, lease: Lease) -> None:
        """Release a forgotten database's lease; until done, exit releases it too."""
        lease.release()
        with self._lock:
            self._leases.discard(lease)

    def _release_leases(self) -> None:
        """At exit: let the next writer take over at once rather than after the lease time,
        waiting at most a second or two for the store."""
        with self._lock:
            leases = list(self._leases)
        if leases:
            t = threading.Thread(target=_release_all, args=(leases,), daemon=True)
            t.start()
            t.join(2.0)

    def _pinned(self, db: Database, seq: int) -> None:
        with self._lock:
            db.sync.pinned_seq = seq
            db.sync.past_pin = True
            self._cond.notify_all()

    def _head_at(self, db: Database, seq: int, stored: Head | None) -> Head | None:
        """The head a sync point at ``seq`` compares with: the lineage's end once the commits
        up to the sync point, which still belong to it, are applied (see sync.pin)."""
        capture.dispatcher().barrier()
        with self._lock:
            for rec in db.sync.take_held(self._spool, seq):
                if db.lineage.generation is None:
                    db.sync.owe(rec)  # in the first snapshot, once the store takes it
                else:
                    self._append(db, rec)
            return db.lineage.head(stored)

    def _append_held(self, db: Database) -> None:
        """Append the commits held during the sync (lock held), a quarter of the memory cap
        at a time: held past the cap they wait in the spool, and read back all at once they
        would take all that memory.  Past the cap the lock is let go until the uploader has
        spilled or shipped some; commits arriving meanwhile are held behind them."""
        state, cap = db.sync, self.settings.memory_cap
        while state.held and not state.broken and not self._stopped:
            for rec in state.take_held(self._spool, budget=cap // 4):
                self._append(db, rec)
            up = db.upload
            while (up.memory > cap or up.spilling) and not state.broken and not self._stopped:
                self._check_cap(db)
                self._cond.wait(HELD_WAIT)

    def _never_held(self, db: Database) -> None:
        """A database closed before it ever held one to replicate (a ``VACUUM INTO``
        output): forget it (lock held)."""
        db.sync.syncing = False
        self.forget_if_done(db)
        self._cond.notify_all()

    def _sync(self, db: Database) -> None:
        """Line the lineage up with the database's current bytes (see sync.py)."""
        # Without a place in the WAL's chain (a first sync, a gap) the leader reads nothing
        # until its sync point, so the WAL may restart meanwhile: a checkpoint waiting for it
        # would hold the write lock the sync point takes (csrc/walsync.c).
        capture.read_any(db.db_id)
        if db.client is None:  # a first sync (a follower has its name, not its client)
            self._resolve(db)
        client = db.client
        assert client is not None
        lineage, state = db.lineage, db.sync
        stored = state.stored_head if lineage.generation is None else None
        read = lineage.generation is None and stored is None
        # Beside the sync point, which must not wait for the store (its opener waits).
        claim: Future[tuple[bool, Head | None]] = self.uploads.pool.submit(self._claim, db, read)

        def fetch_head() -> Future[Head]:
            head: Future[Head] = Future()
            claim.add_done_callback(lambda done: _chain(done, head))
            return head

        with tempfile.TemporaryFile() as raw:
            fetch = fetch_head if read else None
            pinned = sync.pin(
                db.path,
                raw,
                stored,
                fetch,
                lambda seq: self._pinned(db, seq),
                lambda seq, stored: self._head_at(db, seq, stored),
                enable_wal=lineage.generation is None,
                seen_open=state.seen_open,
            )
            head = pinned.head
            if head is None:  # the store was too slow to keep the WAL pinned for it
                assert pinned.fetch is not None
                head = pinned.fetch.result()
                if pinned.ahead_of(head):  # look in the WAL under a new sync point
                    log.debug("walsync: %s is ahead of its replica; looking in the WAL", db.path)
                    with self._lock:
                        state.stored_head = head
                        state.resync = True
                    return
            if claim.result()[0] and not read:
                with self._lock:  # the lineage was built under an earlier holding
                    self._start_afresh(db)
                    state.resync = True
                return
            # A gap the WAL cannot bridge: on a resync the lineage's end is known page by page.
            survivors, bridged = pinned.survivors, False
            base, max_bytes = lineage.checksum, db.cfg.max_segment_bytes
            if not survivors and base is not None and head.generation == lineage.generation:
                survivors = sync.changed_pages(raw, pinned, base, head, max_bytes)
                bridged = bool(survivors)
            upkeep = db.upkeep
            snapshot = (upkeep.force_snapshot, upkeep.snapshot_txid)
            decision = decide(
                head, pinned.checksum, pinned.page_size, survivors, *snapshot, bridged=bridged
            )
            with self._lock:  # commits arriving meanwhile are held, not pending
                up = db.upload
                queue = up.shipping()
            now = [] if queue else decision.survivors
            epoch = db.epoch()
            put = sync.write(client, db.name, head, decision, pinned, raw, now, max_bytes, epoch)
            with self._lock:
                db.upload.bytes_uploaded += put
            if not db.may_write(time.monotonic()):
                with self._lock:  # it may have landed after a takeover: claim and look again
                    state.resync = True
                return
        with self._lock:
            state.stored_head = None
            lineage.restart(
                decision, pinned.page_size, pinned.checksum, pinned.seq, pinned.wal, pinned.taken_ns
            )
            # Commits recovered from the WAL (or the pages a gap changed) behind others still
            # pending ship after them.
            if queue and decision.survivors:
                behind = [(pinned.seq, commit) for commit in decision.survivors]
                self._queue(db, decision.generation, behind)
            # A periodic snapshot holds the state, not the restore points of the commits
            # still queued before it: those are durable once their segments are stored.
            if not decision.continues or not up.shipping():
                up.durable_seq = max(up.durable_seq, pinned.seq)
                up.durable_txid = max(up.durable_txid, decision.txid)
            db.failures = 0
            db.last_error = ""
            db.stopped = False
            state.owed, state.owed_since_ns = 0, 0
            self.compactor.synced(db, decision, time.monotonic())
        log.info(
            "walsync: %s -> %s/%s at txid %d (%s)",
            db.path,
            client.url,
            db.name,
            decision.txid,
            decision.how,
        )

    def _join_opened(self, db: Database) -> None:
        """_join for an OPEN record; a configuration that cannot name the database is one
        error line here (its opener's connection hook raises it)."""
        try:
            self._join(db)
        except ConfigError as exc:
            log.error("walsync: %s: not replicated: %s", db.path, exc)
            with self._lock:  # an ATTACH has no open to fail: flush() raises it instead
                db.unnamed = db.last_error = str(exc)
                db.errors += 1
        else:
            with self._lock:
                db.unnamed = ""
        finally:
            with self._lock:
                db.joining = False
                self._cond.notify_all()

    def _join(self, db: Database) -> bool:
        """Take part for a newly opened database and start its sync if this process leads it
        (a worker does it for every OPEN: replication does not wait for a connection hook)."""
        cfg = self.settings.for_db(db.path)
        replica = self._replica_url(cfg.replica_root(), cfg.name)
        with self._lock:
            if self._dbs.get(db.db_id) is not db or not db.open:
                return False  # closed (and forgotten) before this worker ran
            if not self._host.join(db.db_id, db.path, replica):
                # Another process of this host replicates it; stats() still names it.
                db.cfg = cfg
                db.name = db.name or db.cfg.name
                problem = self._other_replica(db)
                if problem:
                    log.warning("walsync: %s", problem)
                return False
            if db.sync.pinned_seq < db.sync.open_seq:
                if db.sync.syncing:
                    self._retry_now(db)  # its opener has written to it since an empty look
                else:
                    self._request_sync(db)
        return True

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
        if not self._join(db):
            return
        with self._lock:
            state = db.sync

            def ready() -> bool:
                return self._stopped or state.pinned_seq >= state.open_seq or bool(db.failures)

            # Behind a sync past its own sync point (a reopen), this one's comes only once
            # that sync is done with the store: wait a moment for it, never for the store.
            deadline = time.monotonic() + timeout
            if self._cond.wait_for(lambda: ready() or state.past_pin, timeout) and not ready():
                wait = min(BEHIND_A_SYNC_WAIT, deadline - time.monotonic())
                self._cond.wait_for(ready, max(0.0, wait))

    # ---------------------------------------------------------------- the uploader

    def _loop(self) -> None:
        """The uploader thread: starts due uploads and sync retries, spills past the memory
        cap, schedules maintenance and gives freed memory back, then sleeps until the next of
        those is due or it is woken."""
        uploads = self.uploads
        while True:
            with self._lock:
                if self._stopped:
                    return
                if not self._dbs and not self._sync_retries and not uploads.freed:
                    self._thread = None  # nothing kept: the next OPEN starts another
                    return
                now = time.monotonic()
                if uploads.freed and now >= self._next_release:
                    uploads.freed = False
                    self._next_release = now + RELEASE_EVERY
                    self._lock.release()  # a few ms: capture and uploads go on meanwhile
                    try:
                        heap.release()
                    finally:
                        self._lock.acquire()
                while self._sync_retries and self._sync_retries[0][0] <= now:
                    self._spawn_sync(heapq.heappop(self._sync_retries)[2])
                uploads.start(now)
                if now >= self._next_spill_check:
                    self._next_spill_check = now + SPILL_CHECK
                    uploads.spill_if_over_cap(self._dbs.values())
                if now >= self._next_maintenance:
                    self._next_maintenance = now + MAINTENANCE_TICK
                    self.compactor.schedule(self._dbs.values(), now, self._request_sync)
                    self._renew_leases(now)
                wait = MAINTENANCE_TICK
                # Every slot taken: only the end of ships wakes it (see ShipSlots.give_back).
                full = uploads.slots.check_full()
                next_due = uploads.clock.next_due()
                if next_due < math.inf and not full:
                    wait = min(wait, max(next_due - now, COALESCE))
                if self._sync_retries:
                    wait = min(wait, max(self._sync_retries[0][0] - now, 0.0))
                uploads.wake_at = -math.inf if full else now + wait
                self._wake.wait(wait)
                uploads.wake_at = -math.inf  # awake: what is scheduled now is seen before waiting

    # ---------------------------------------------------------------------- flush

    def flush(self, timeout: float | None = None) -> None:
        """Block until every commit made before the call is in its replica (those of
        databases another process replicates: by asking that process)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            followed = [
                db
                for db in self._dbs.values()
                # One only read here has nothing of this process's to wait for.
                if not self._host.leads(db.db_id) and capture.lib.ws_app_writable(db.db_id)
            ]
        for db in followed:
            problem = self._other_replica(db)
            if problem:
                raise ReplicationError(problem)
            try:
                if self._host.ask_flush(db.db_id, deadline):
                    continue
            except LeaderError as exc:
                raise ReplicationError(str(exc)) from None  # the leader's words, whole
        self._flush(deadline)

    def _replica_url(self, root: str, name: str) -> str:
        """Where a database of this name goes under ``root``, spelled as its store spells it
        ("" if the root is not a valid replica: that error is the sync's to report)."""
        try:
            return storage.database_url(self._client(root), name)
        except storage.StorageError:
            return ""

    def _other_replica(self, db: Database) -> str:
        """Why a database this process follows is not replicated where this process is
        configured to replicate it ("" if it is, or if either side is unknown)."""
        differ = self._host.other_replica(db.db_id)
        if differ is None:
            return ""
        theirs, ours = differ
        return (
            f"{db.path} is replicated by another process to {theirs}, not to {ours} as "
            "configured here; configure the same replica in every process that opens it"
        )

    def _flush_for_follower(self, db_id: int, timeout: float) -> str | None:
        """A follower's flush: make every commit in the WAL durable (None, or why not)."""
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

    def _led(self, only: int | None) -> list[Database]:
        """The databases this process leads (``only`` that one, if given; lock held)."""
        return [
            db
            for db in self._dbs.values()
            if (only is None or db.db_id == only) and self._host.leads(db.db_id)
        ]

    def _flush(self, deadline: float | None, only: int | None = None) -> None:
        with self._lock:
            led = [db.db_id for db in self._led(only)]
        for db_id in led:  # commits other processes made, not yet seen by the WAL poll
            capture.lib.ws_tail(db_id)
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:  # the hand-over takes a moment, which even a flush given no time waits for
            capture.dispatcher().barrier(max(left, BARRIER_FLOOR) if left is not None else 60.0)
        except TimeoutError:
            raise FlushTimeoutError(
                "flush timed out before the capture thread handed over every commit; give "
                "flush() more time"
            ) from None
        with self._lock:
            for db in self._dbs.values():
                if db.unnamed and only in (None, db.db_id):
                    raise ReplicationError(f"replica of {db.path} is failing: {db.unnamed}")
            marks = {db.db_id: db.upload.seen_seq for db in self._led(only)}
            now = time.monotonic()
            # Failures from before this flush may be of an outage that is over: a failing
            # database is tried again now, not after its backoff, and only a failure of
            # that try (or a later one) makes this flush report it as failing.
            errors = {}
            for db in self._dbs.values():
                if db.db_id not in marks:
                    continue
                errors[db.db_id] = db.errors
                if db.failures or db.stopped:
                    db.upload.next_attempt = min(db.upload.next_attempt, now)
                    self._retry_now(db)
            self.uploads.clock.flushers += 1
            for db in self._dbs.values():  # all urgent now
                self.uploads.schedule(db, now)
            try:
                while True:
                    waiting = [
                        state
                        for i, m in marks.items()
                        if (state := self._dbs.get(i)) is not None
                        and (state.joining or state.sync.syncing or state.upload.durable_seq < m)
                    ]
                    if not waiting:
                        return
                    for db in waiting:
                        if db.fenced:
                            raise ReplicationError(db.fenced)
                        if db.sync.syncing and (
                            locked := capture.exclusive_problem(db.db_id, db.path)
                        ):  # its sync point may be waiting for that lock still
                            raise ReplicationError(f"replica of {db.path} is failing: {locked}")
                        # A stopped database's commits made before the stop ship first.
                        failing = db.failures >= FAILING_AFTER or (
                            db.stopped and not db.upload.shipping()
                        )
                        if failing and db.errors > errors[db.db_id]:
                            raise ReplicationError(
                                f"replica of {db.path} is failing: {db.last_error}"
                            )
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        names = ", ".join(db.path for db in waiting)
                        raise FlushTimeoutError(
                            f"flush timed out; not yet replicated: {names}; see "
                            "walsync_vfs.stats() for their lag and last_error, or give "
                            "flush() more time"
                        )
                    # Nothing signals a lock an application holds: look again now and then.
                    self._cond.wait(min(left, FLUSH_LOOK) if left is not None else FLUSH_LOOK)
            finally:
                self.uploads.clock.flushers -= 1

    def stats(self) -> list[dict[str, Any]]:
        """Each database's stats_of.  One another process replicates has the leader's
        figures, asked of it now; if it does not answer, only its path and name, every
        other field None: zeros would read as a healthy replica during an outage."""
        now = time.time_ns()
        with self._lock:
            states = [(db.db_id, stats_of(db, now)) for db in self._dbs.values()]
        followed = [db_id for db_id, _ in states if not self._host.leads(db_id)]
        theirs = self._host.ask_stats(followed, LEADER_STATS_WAIT) if followed else {}
        out = []
        for db_id, state in states:
            leads = db_id not in followed
            if not leads:
                leader = theirs.get(db_id, {})
                state = {k: v if k in ("path", "name") else leader.get(k) for k, v in state.items()}
            out.append(dict(state, leader=leads))
        return out

    def _stats_for_follower(self, db_id: int) -> dict[str, Any] | None:
        """A follower's stats(): this leader's figures for the database (None if it does
        not lead it, or no longer has it)."""
        with self._lock:
            db = self._dbs.get(db_id)
            if db is None or not self._host.leads(db_id):
                return None
            return stats_of(db, time.time_ns())

    def forget_after_fork(self) -> None:
        """In a forked child: this engine's threads stayed in the parent; let go of what
        the child inherited from it (the parent keeps its locks and socket)."""
        self._host.after_fork_in_child()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._cond.notify_all()
            self._wake.notify()
        self._host.stop()
        if self._thread is not None:
            self._thread.join()
        self.uploads.pool.shutdown(wait=True)
        self.compactor.pool.shutdown(wait=True)
        for pool in (self._join_pool, *self._sync_pools.values()):
            pool.shutdown(wait=False, cancel=True)
        self.compactor.recent.close()


def _chain(claim: Future[tuple[bool, Head | None]], head: Future[Head]) -> None:
    """Settle ``head`` with the head a claim read, or its error."""
    error = claim.exception()
    if error is not None:
        head.set_exception(error)
    else:
        found = claim.result()[1]
        assert found is not None
        head.set_result(found)


def _release_all(leases: list[Lease]) -> None:
    for lease in leases:
        lease.release()
