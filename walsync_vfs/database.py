"""One replicated database as the engine keeps it: its identity and health, and the state
each role owns (sync, lineage, upload, maintenance).  Guarded by the engine lock.  Slotted:
a process may hold thousands of these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from walsync_vfs import storage
from walsync_vfs.compactor import MaintenanceState
from walsync_vfs.config import DbConfig
from walsync_vfs.errors import describe
from walsync_vfs.lease import Lease
from walsync_vfs.lineage import Lineage
from walsync_vfs.sync import SyncState
from walsync_vfs.uploader import UploadState

FAILING_AFTER = 3  # consecutive failed attempts before flush() reports the replica as failing


@dataclass(slots=True, eq=False)
class Database:
    """See the module docstring."""

    db_id: int
    path: str
    name: str = ""
    cfg: DbConfig = field(default_factory=DbConfig)
    claim: tuple[str, str] | None = None  # (replica root, name) it holds in the engine
    client: storage.ReplicaClient | None = None
    open: bool = True
    joining: bool = False  # an OPEN's worker has yet to decide who replicates it (flush waits)
    failures: int = 0  # consecutive failed syncs and uploads
    last_error: str = ""
    errors: int = 0  # failed attempts, ever
    stopped: bool = False  # it cannot be captured (out of WAL, locked by the application)
    # Commits dropped past the spool cap, or erased unread by a foreign WAL restart (their
    # changes ship in a later snapshot or resync commit).
    lost_restore_points: int = 0
    sync: SyncState = field(default_factory=SyncState)
    lineage: Lineage = field(default_factory=Lineage)
    upload: UploadState = field(default_factory=UploadState)
    upkeep: MaintenanceState = field(default_factory=MaintenanceState)
    lease: Lease | None = None  # None: fencing is off (or the first sync has not run)
    fenced: str = ""  # why another writer keeps this one from replicating ("" = it does not)
    unnamed: str = ""  # why its configuration names no replica for it ("" = it does)
    fenced_since_ns: int = 0  # time of the oldest commit fencing kept from the replica
    opened_ns: int = 0  # when it was last opened: its state is behind since then until a sync

    def fail(self, exc: BaseException) -> None:
        """Count a failed sync or upload."""
        self.failures += 1
        self.errors += 1
        self.last_error = describe(exc)

    def given_up(self) -> bool:
        """Whether to stop retrying: the database closed and its store keeps failing, or
        another writer holds its name (then nothing of it would ever be uploaded)."""
        return not self.open and (self.failures >= FAILING_AFTER or bool(self.fenced))

    def epoch(self) -> int:
        """The lease epoch its objects' keys carry (0: unfenced)."""
        return self.lease.epoch if self.lease is not None else 0

    def may_write(self, now: float) -> bool:
        """Whether it may upload now: unfenced, or within its renewed lease."""
        return self.lease is None or self.lease.valid(now)

    def busy(self) -> bool:
        """Whether anything of the database is still under way or not yet uploaded."""
        up = self.upload
        return bool(
            self.sync.syncing
            or up.pending
            or up.outbox
            or up.uploading
            or up.spilling
            or self.upkeep.maintaining
        )


def oldest_unreplicated_ns(db: Database) -> int:
    """The time of the database's oldest commit not in the replica (0: none): the first of
    each queue is its oldest (encoded segments, pending, held, owed commits, and those
    fencing dropped).  A database no sync has joined to a lineage yet (its name taken, its
    store away since the open) counts from its open: nothing says its state is replicated."""
    up, sync = db.upload, db.sync
    firsts = (
        up.outbox[0].time_ns if up.outbox else 0,
        up.pending[0][2].time_ns if up.pending else 0,
        sync.held[0].time_ns if sync.held else 0,
        sync.owed_since_ns,
        db.fenced_since_ns,
        db.opened_ns if db.open and db.lineage.generation is None else 0,
    )
    return min((t for t in firsts if t), default=0)


def stats_of(db: Database, now_ns: int) -> dict[str, Any]:
    """One database's replication state; lag is the age of its oldest unreplicated commit."""
    up, sync = db.upload, db.sync
    held = sync.held
    oldest = oldest_unreplicated_ns(db) or now_ns
    return {
        "path": db.path,
        "name": db.name,
        "generation": db.lineage.generation,
        "last_txid": db.lineage.next_txid - 1,
        "replicated_txid": up.durable_txid,
        "lag_seconds": max(0.0, (now_ns - oldest) / 1e9),
        "pending_commits": (
            sum(o.commits for o in up.outbox if o.complete)
            + up.pending_commits
            + len(held)
            + sync.owed
        ),
        "pending_bytes": up.pending_bytes + sum(o.raw_bytes for o in up.outbox),
        "bytes_uploaded": up.bytes_uploaded,
        "syncing": db.sync.syncing,
        "failures": db.failures,
        "errors": db.errors,
        "last_error": db.last_error,
        "fenced": db.fenced,
        "lease_epoch": db.lease.epoch if db.lease is not None and db.lease.held else 0,
        "stopped": db.stopped,
        "lost_restore_points": db.lost_restore_points,
    }
