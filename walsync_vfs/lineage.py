"""A database's lineage: the generation, txids and whole-db checksum its commits extend, and
the decision a sync point makes about it.

At a sync point the engine holds the database's exact bytes (their whole-db checksum) and the
replica's head.  If they match -- or commits a crash left in the WAL provably lead from the
head to them -- the lineage continues; otherwise the bytes become the snapshot of a new
generation.  :func:`decide` makes that choice without any I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from walsync_vfs import capture, catalog, format, objects, storage
from walsync_vfs.capture import Record


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
    """Find the newest generation's last state with one LIST and the header of its newest
    object (ranged GETs: a few hundred bytes, whatever the object's size)."""
    gens = catalog.generations(client, name)
    if not gens:
        return Head()
    gen = gens[-1]
    top = max(gen.snapshots + gen.segments, key=lambda k: (k.last_txid, k.kind == "segment"))
    key = catalog.object_key(top)
    if top.kind == "segment":
        hdr = objects.segment_header(client, key, gen.sizes[key])
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
    snap = objects.snapshot_header(client, key, gen.sizes[key])
    return Head(gen.id, gen.last_txid, snap.page_size, snap.db_size, snap.checksum, snap.time_ns)


def holds(head: Head, now: format.DbChecksum, page_size: int) -> bool:
    """Does the replica's last state equal the database's pinned bytes?"""
    return (
        head.generation is not None
        and head.checksum == now.value
        and head.page_size == page_size
        and head.db_size == now.db_size
    )


@dataclass(frozen=True)
class Decision:
    """What a sync point does with the lineage."""

    generation: str
    txid: int  # the txid of the database's state at the sync point
    continues: bool  # the lineage goes on (else: a new generation starts from a snapshot)
    survivors: list[format.Commit]  # commits recovered from the WAL, shipped before it
    periodic: bool  # a continuing lineage takes its periodic snapshot here
    bridged: bool = False  # survivors is one commit of the pages a gap changed (sync.py)

    @property
    def snapshot(self) -> bool:
        """Whether the database's bytes at the sync point are written as a snapshot."""
        return not self.continues or self.periodic

    @property
    def how(self) -> str:
        """The sync's outcome in a few words, for the log."""
        if not self.continues:
            return "new generation"
        if self.periodic:
            return "snapshot"
        if self.bridged:
            pages = self.survivors[0].page_count
            return f"continued; {pages} pages changed outside the stream, as one commit"
        if self.survivors:
            return f"continued; {len(self.survivors)} commits recovered from the WAL"
        return "continued"


def decide(
    head: Head,
    pinned: format.DbChecksum,
    page_size: int,
    survivors: list[format.Commit],
    snapshot_due: bool = False,
    snapshot_txid: int = 0,
    new_generation: Callable[[int], str] = format.new_generation_id,
    bridged: bool = False,
) -> Decision:
    """Continue the replica's lineage from ``head``, through the WAL ``survivors`` if any (they
    lead from it to the ``pinned`` state; ``bridged``: one commit of the pages a gap changed),
    or start a new generation.  A due periodic snapshot is taken only if the lineage has
    moved past the last one (``snapshot_txid``)."""
    continues = bool(survivors) or holds(head, pinned, page_size)
    if continues:
        assert head.generation is not None  # holds() and survivors both need a replica
        txid = head.txid + len(survivors)
        periodic = snapshot_due and txid > snapshot_txid
        return Decision(head.generation, txid, True, survivors, periodic, bridged)
    txid = head.txid + 1
    return Decision(new_generation(txid), txid, False, [], False)


@dataclass(slots=True)
class Lineage:
    """This process's end of a database's lineage: what its next commit extends."""

    generation: str | None = None  # None until the first sync point in this process
    next_txid: int = 1
    page_size: int = 0
    checksum: format.DbChecksum | None = None  # None: broken, the next sync starts afresh
    sync_seq: int = 0  # commits up to this seq are in the state the lineage started from
    # The stream lost the commit at this seq (a GAP): none after it extends the lineage
    # until a sync point past it, whose state holds them all.
    gap_seq: int = 0
    time_ns: int = 0  # when its last state was committed (or pinned)
    # Where its last state ended in the source's WAL; a run's is read from it when asked for.
    wal: format.WalPos | capture.OpenRun | None = None

    def head(self, stored: Head | None) -> Head | None:
        """The head a sync point compares the database with: this lineage's end, or on the
        first sync in this process, the replica's (``stored``, None if not read yet)."""
        if self.checksum is not None:
            return Head(
                self.generation,
                self.next_txid - 1,
                self.page_size,
                self.checksum.db_size,
                self.checksum.value,
                self.time_ns,
                self.wal.wal if isinstance(self.wal, capture.OpenRun) else self.wal,
            )
        if self.generation is not None:  # broken (page size changed, commits dropped)
            return Head(None, self.next_txid - 1)
        return stored

    @property
    def whole(self) -> bool:
        """Whether every commit since the lineage's sync point reached the stream."""
        return self.gap_seq <= self.sync_seq

    def follows(self, rec: Record) -> bool:
        """Whether the commit ``rec`` extends the lineage (not inside the state it started
        from, not after a commit the stream lost, and the lineage is not broken)."""
        return (
            self.sync_seq < rec.seq
            and (self.whole or rec.seq < self.gap_seq)
            and self.checksum is not None
        )

    def lost(self, seq: int) -> None:
        """The stream lost the commit at ``seq``: a later one would be built on a state
        without it, so the lineage ends before it until a sync point past it."""
        self.gap_seq = max(self.gap_seq, seq)

    def extend(self, rec: Record) -> format.Commit:
        """The commit ``rec`` as the lineage's next txid, with its whole-db checksum."""
        assert self.checksum is not None
        self.checksum.apply(rec.db_size, rec.pages)
        self.wal = format.WalPos(*rec.wal_salts, rec.wal_frames[1])
        # A clock stepped back must not order a commit before the one it follows: a restore
        # to a timestamp would then include commits made after it (FORMAT.md).
        self.time_ns = max(rec.time_ns, self.time_ns)
        commit = format.Commit(
            self.next_txid, self.time_ns, rec.db_size, self.checksum.value, rec.pages, self.wal
        )
        self.next_txid += 1
        return commit

    def break_at(self, seq: int) -> None:
        """The lineage cannot go on; the sync point after ``seq`` starts it again."""
        self.sync_seq = max(self.sync_seq, seq)
        self.checksum = None

    def restart(
        self,
        decision: Decision,
        page_size: int,
        checksum: format.DbChecksum,
        seq: int,
        wal: format.WalPos,
        time_ns: int,
    ) -> None:
        """Go on from the state pinned at sync point ``seq`` (the WAL up to ``wal``), as
        ``decision`` says."""
        self.generation = decision.generation
        self.next_txid = decision.txid + 1
        self.page_size = page_size
        self.checksum = checksum
        self.sync_seq = seq
        self.wal = wal
        last = decision.survivors[-1].time_ns if decision.survivors else 0
        self.time_ns = max(self.time_ns, time_ns, last)


def extend_runs(
    starts: Sequence[tuple[Lineage, object, capture.OpenRun | None, int, int]],
) -> list[capture.Extension]:
    """For each (lineage, first record (``ws_rec *``), the run its commits go on (None: begin
    one), extent, max_bytes), the commits from that record on that extend the lineage as they
    are, each with its txid and whole-db checksum: every database in one C call (see
    capture.extend_runs).  Each lineage must have a checksum (not be broken) and appear
    once."""
    args = []
    for lineage, rec, run, extent, max_bytes in starts:
        ck = lineage.checksum
        assert ck is not None
        args.append((rec, run, extent, ck, lineage.page_size, lineage.next_txid,
                     lineage.time_ns, lineage.sync_seq, max_bytes))  # fmt: skip
    exts = capture.extend_runs(args)
    for (lineage, *_), ext in zip(starts, exts, strict=True):
        lineage.next_txid, lineage.time_ns = ext.next_txid, ext.time_ns
        if ext.made:
            lineage.wal = ext.began[-1] if ext.began else ext.open
    return exts
