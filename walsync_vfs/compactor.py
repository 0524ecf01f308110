"""Keeping a replica small and its restores fast: periodic snapshots, compaction, retention.

Compaction merges runs of small segments this process uploaded (read back from local copies,
see recent.py); retention deletes what no restore point inside the window needs.  Both only
ever remove objects whose every commit is available elsewhere (a merged segment, a newer
snapshot), so no restore point inside the retention window is lost.  Each kind of work needs
new commits or uploads since it last ran, so idle databases never cause a request.  Now and
then a retention pass also aborts uploads a crash abandoned (S3 keeps their parts).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from walsync_vfs import catalog, format, storage
from walsync_vfs.errors import describe
from walsync_vfs.recent import RecentCopies, Run
from walsync_vfs.spool import Outgoing
from walsync_vfs.uploader import PUT_BATCH, is_small, per_client
from walsync_vfs.workers import Workers

if TYPE_CHECKING:
    from walsync_vfs.config import DbConfig
    from walsync_vfs.database import Database
    from walsync_vfs.lineage import Decision

log = logging.getLogger("walsync_vfs")

MAINTENANCE_TICK = 1.0  # seconds between looks for due snapshots, compactions, retention
MERGED_BYTES = 4 << 20  # merged segments held at once for one batch of compaction PUTs
UPLOAD_SWEEP_INTERVAL = 3600.0  # seconds between a database's looks for abandoned uploads
STALE_UPLOAD_AGE = 3600.0  # an unfinished upload this old, not this process's, was abandoned
LISTED_TIME_SLACK = 1.0  # S3 lists LastModified to the second: a write may be that much later

# (database, retention due, small segments to merge, their local copies)
Job = tuple["Database", bool, list[format.ParsedKey], Run | None]
# (objects to put, keys to delete once every put succeeded)
Plan = tuple[list[tuple[str, bytes | memoryview]], list[str]]
# (database, merged segments to put, segments to delete once they are all in)
Compaction = tuple["Database", list[tuple[str, bytes | memoryview]], list[str]]


def _pairs() -> array[int]:
    return array("Q")


@dataclass(slots=True)
class MaintenanceState:
    """A database's periodic snapshots, small segments awaiting compaction, and retention."""

    force_snapshot: bool = False  # the next sync point writes a periodic snapshot
    snapshot_txid: int = 0
    snapshot_at: float = 0.0  # monotonic time of the latest snapshot
    # (first_txid, last_txid) of each small segment of the current generation uploaded since
    # the last compaction: 16 bytes each, not a ParsedKey (~300 bytes with its strings; a
    # thousand databases hold up to 32 each).
    small_segments: array[int] = field(default_factory=_pairs)
    recent: Run | None = None  # local copies of small_segments, so compaction needs no GETs
    maintaining: bool = False
    pruned_at: float = 0.0  # monotonic time retention last deleted objects of this database
    uploaded_since_retention: bool = False
    retained_at: float = 0.0
    swept_at: float = float("-inf")  # monotonic time of the last look for abandoned uploads


def retention_due(state: MaintenanceState, cfg: DbConfig, now: float) -> bool:
    """Retention runs after new uploads, at most every tenth of the window (or tick)."""
    return (
        cfg.retention > 0
        and state.uploaded_since_retention
        and now - state.retained_at >= max(MAINTENANCE_TICK, cfg.retention / 10)
    )


def compaction_due(state: MaintenanceState, cfg: DbConfig) -> bool:
    """Compaction runs once ``compact_segments`` small segments are waiting."""
    return len(state.small_segments) >= 2 * cfg.compact_segments  # two txids per segment


def snapshot_due(state: MaintenanceState, cfg: DbConfig, now: float, last_txid: int) -> bool:
    """A periodic snapshot is due after ``snapshot_interval`` if there are new commits."""
    return bool(
        cfg.snapshot_interval
        and now - state.snapshot_at >= cfg.snapshot_interval
        and last_txid > state.snapshot_txid
    )


def small_keys(
    name: str, generation: str, state: MaintenanceState, epoch: int = 0
) -> list[format.ParsedKey]:
    """The keys of the database's small segments (all of its current generation and lease
    epoch)."""
    pairs = state.small_segments
    return [
        format.ParsedKey(name, generation, "segment", first, last, epoch)
        for first, last in zip(pairs[::2], pairs[1::2], strict=True)
    ]


def consecutive(segments: list[format.ParsedKey]) -> list[list[format.ParsedKey]]:
    """``segments`` cut where one does not continue the txids of the one before: a segment
    this process did not upload through the uploader (a resync's commit) sits in between."""
    runs: list[list[format.ParsedKey]] = []
    for seg in segments:
        if runs and seg.first_txid == runs[-1][-1].last_txid + 1:
            runs[-1].append(seg)
        else:
            runs.append([seg])
    return runs


def merge_plan(
    client: storage.ReplicaClient,
    segments: list[format.ParsedKey],
    max_bytes: int,
    local: Callable[[str], bytes | None] = lambda key: None,
) -> Plan:
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
        key = format.segment_key(first.name, first.generation, first_txid, last_txid, first.epoch)
        merged.append(key)
        if key not in keys:  # a lone segment too big to merge stays as it is
            puts.append((key, data))
    return puts, [k for k in keys if k not in merged]


def _read(client: storage.ReplicaClient, key: str, copy: bytes | None) -> format.RawSegment:
    """The segment from its local copy if that is intact, else from the store (either way,
    one whose key names its txids)."""
    if copy is not None:
        try:
            return _named(key, format.read_segment_raw(copy, key))
        except format.CorruptObject as exc:
            log.warning(
                "walsync: local copy of %s is damaged (%s); reading the store", key, exc.reason
            )
    return _named(key, format.read_segment_raw(client.get(key), key))


def _named(key: str, raw: format.RawSegment) -> format.RawSegment:
    format.check_named(key, raw.first_txid, raw.last_txid)
    return raw


def expired(
    objects: list[storage.ObjectInfo],
    retention: float,
    now: float | None = None,
    epoch: int | None = None,
) -> list[str]:
    """Keys no restore point in the last ``retention`` seconds needs.

    The newest snapshot written before the window starts covers every point inside it
    (object write times are never earlier than the snapshot's own time, and listed ones at
    most LISTED_TIME_SLACK earlier than the write, so this errs on the side of keeping).
    Everything older than that snapshot -- earlier snapshots, segments it covers, whole
    earlier generations -- can go.

    The leftovers of fenced writers (catalog.leftovers) go too, and never anchor anything:
    the anchor is a snapshot of the one history that lease holders extend.  Objects keyed
    with an epoch above the holder's own ``epoch`` are no writer's (none was granted one
    while it holds the lease): they neither make its own objects leftovers nor go.
    """
    cutoff = (time.time() if now is None else now) - retention
    parsed = [(k, o) for o in objects if (k := format.parse_key(o.key)) is not None]
    parsed = [(k, o) for k, o in parsed if epoch is None or k.epoch <= epoch]
    fenced = catalog.leftovers([k for k, _ in parsed])
    parsed = [(k, o) for k, o in parsed if k not in fenced]
    doomed = sorted(catalog.object_key(k) for k in fenced)
    anchors = [
        k for k, o in parsed if k.kind == "snapshot" and o.modified + LISTED_TIME_SLACK <= cutoff
    ]
    if not anchors:
        return doomed
    anchor = max(anchors, key=lambda k: k.last_txid)
    return doomed + [
        o.key
        for k, o in parsed
        if k.last_txid < anchor.last_txid
        or (k.kind == "segment" and k.last_txid <= anchor.last_txid)
    ]


def confirmed(db: Database) -> bool:
    """Whether the database may delete objects now: unfenced, or its lease is still its own
    in the store (one GET), so a holder paused past its lease never deletes."""
    lease = db.lease
    if lease is None:
        return True
    if not lease.valid():
        return False
    try:
        return lease.confirm()
    except storage.StorageError:
        return False


class Compactor:
    """Runs the due maintenance of every database, one pass at a time beside the uploads: a
    compaction holds a few MiB of decoded pages, and many databases fall due in the same tick.

    ``lock`` guards every database; ``changed`` is notified when a pass ends; ``settled`` is
    called (lock held) when a database's pass ended, so a closed one can be forgotten.
    """

    def __init__(
        self,
        lock: threading.Lock,
        changed: threading.Condition,
        recent: RecentCopies,
        settled: Callable[[Database], None],
    ) -> None:
        self._lock = lock
        self._changed = changed
        self.recent = recent
        self._settled = settled
        self.pool = Workers(1, "walsync-maintain")

    def schedule(
        self, dbs: Iterable[Database], now: float, request_sync: Callable[[Database], None]
    ) -> None:
        """Start due compactions and retention runs, and ask for due periodic snapshots
        (lock held)."""
        jobs: list[Job] = []
        for db in dbs:
            cfg, state = db.cfg, db.upkeep
            if db.lineage.checksum is None:
                continue
            retain = retention_due(state, cfg, now)
            compact = compaction_due(state, cfg)
            if not state.maintaining and (retain or compact):
                segs: list[format.ParsedKey] = []
                run = None
                if compact:
                    assert db.lineage.generation is not None
                    gen = db.lineage.generation
                    segs, run = small_keys(db.name, gen, state, db.epoch()), state.recent
                    state.small_segments, state.recent = _pairs(), None
                if retain:
                    state.uploaded_since_retention = False
                    state.retained_at = now
                state.maintaining = True
                jobs.append((db, retain, segs, run))
            if not db.sync.syncing and snapshot_due(state, cfg, now, db.lineage.next_txid - 1):
                state.force_snapshot = True
                request_sync(db)
        if jobs:
            self.pool.spawn(self._maintain_all, jobs)

    def synced(self, db: Database, decision: Decision, now: float) -> None:
        """A sync point was settled (lock held): note its snapshot; a new generation leaves
        nothing to compact."""
        state = db.upkeep
        state.force_snapshot = False
        if decision.snapshot or not state.snapshot_at:
            state.snapshot_txid = decision.txid
            state.snapshot_at = now
        # The first retention pass comes one pass interval after the first sync, not at
        # once: a database that only just started replicating has nothing to expire.
        state.retained_at = state.retained_at or now
        if not decision.continues:
            self.drop_copies(db)

    def kept(self, db: Database, item: Outgoing, data: bytes | memoryview) -> None:
        """A segment is in the store: remember it (and keep a local copy) if compaction will
        merge it -- a small segment of the current generation."""
        run = None
        with self._lock:
            state = db.upkeep
            if (
                item.part is None  # a commit's parts are never merged (FORMAT.md §4.5)
                and is_small(item.raw_bytes, db.cfg.max_segment_bytes)
                and item.generation == db.lineage.generation
            ):
                key = format.ParsedKey(
                    db.name,
                    item.generation,
                    "segment",
                    item.first_txid,
                    item.last_txid,
                    db.epoch(),
                )
                state.small_segments.extend((key.first_txid, key.last_txid))
                run = state.recent = state.recent or self.recent.new_run(key)
            else:
                self.drop_copies(db)
        if run is not None:  # a file write: outside the engine lock, before flush() returns
            self.recent.keep(run, key, data)

    def drop_copies(self, db: Database) -> None:
        """The small segments will not be merged (lineage changed, or the database is
        forgotten): forget them and their local copies (lock held)."""
        db.upkeep.small_segments = _pairs()
        self.recent.drop(db.upkeep.recent)
        db.upkeep.recent = None

    def _maintain_all(self, jobs: list[Job]) -> None:
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
                plan = self._plan(db, retain, segs, run)
            except Exception as exc:  # noqa: BLE001 - maintenance can always wait
                self._failed(db, exc)
                plan = None
            self.recent.drop(run)
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

    def _plan(
        self, db: Database, retain: bool, segs: list[format.ParsedKey], run: Run | None
    ) -> Plan | None:
        """Apply retention (if due) and plan the merge of ``segs`` (whose local copies ``run``
        holds), from at most one LIST; None when there is nothing to merge."""
        assert db.client is not None
        if retain or run is None or db.upkeep.pruned_at >= run.started:
            # The LIST (every object of the database: it grows with the retention window) is
            # for retention, and for telling which of segs still exist -- unless all of them
            # were uploaded after retention last deleted anything and have local copies.
            objects = db.client.list(db.name + "/")
            epoch = db.lease.epoch if db.lease is not None else None
            doomed = expired(objects, db.cfg.retention, epoch=epoch) if retain else []
            if doomed and not confirmed(db):
                doomed = []  # only the lease holder deletes
            if doomed:
                db.client.delete(doomed)
                db.upkeep.pruned_at = time.monotonic()
                log.info("walsync: %s retention removed %d objects", db.name, len(doomed))
            alive = {o.key for o in objects} - set(doomed)
            segs = [k for k in segs if catalog.object_key(k) in alive]
            if retain:
                self._sweep_uploads(db)
        runs = [r for r in consecutive(segs) if len(r) >= 2]
        if not runs:
            return None
        copies = self.recent.read(run)
        puts: list[tuple[str, bytes | memoryview]] = []
        deletes: list[str] = []
        for segments in runs:
            more, gone = merge_plan(db.client, segments, db.cfg.max_segment_bytes, copies.get)
            puts += more
            deletes += gone
        return puts, deletes

    def _sweep_uploads(self, db: Database) -> None:
        """Abort the database's abandoned uploads, at most every UPLOAD_SWEEP_INTERVAL (one
        LIST; only the lease holder, whose own uploads are the only live ones)."""
        assert db.client is not None
        now = time.monotonic()
        if now - db.upkeep.swept_at < UPLOAD_SWEEP_INTERVAL or not confirmed(db):
            return
        db.upkeep.swept_at = now
        aborted = db.client.abort_stale_uploads(db.name + "/", STALE_UPLOAD_AGE)
        if aborted:
            log.info("walsync: %s aborted %d abandoned uploads", db.name, aborted)

    def _compact_group(self, group: list[Compaction]) -> None:
        """Write the planned merged segments, then delete the originals of every database
        whose merged segments are all in the store (per client: one put_all, one delete)."""
        for entries in per_client(group):
            client = entries[0][0].client
            assert client is not None
            done = entries  # until the PUTs are settled, a failure is everyone's
            try:
                objects = [obj for _, puts, _ in entries for obj in puts]
                results = iter(storage.put_all(client, objects))
                done = []
                for db, puts, doomed in entries:
                    sent = zip(puts, itertools.islice(results, len(puts)), strict=True)
                    failed = [
                        exc
                        for (key, data), exc in sent
                        if exc and not storage.stored_before(client, key, data, exc)
                    ]
                    if failed:
                        self._failed(db, failed[0])
                    else:
                        done.append((db, puts, doomed))
                client.delete([key for db, _, doomed in done if confirmed(db) for key in doomed])
                for db, puts, doomed in done:
                    log.info(
                        "walsync: %s compacted %d segments into %s",
                        db.name,
                        len(doomed),
                        [key for key, _ in puts],
                    )
            except Exception as exc:  # noqa: BLE001 - maintenance can always wait
                for db, _, _ in done:
                    self._failed(db, exc)
            finally:
                for db, _, _ in entries:
                    self._maintained(db)

    def _failed(self, db: Database, exc: Exception) -> None:
        log.warning("walsync: maintenance of %s failed: %s", db.name, describe(exc))
        with self._lock:
            db.errors += 1

    def _maintained(self, db: Database) -> None:
        with self._lock:
            db.upkeep.maintaining = False
            self._settled(db)
            self._changed.notify_all()
