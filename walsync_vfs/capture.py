"""The Python side of the ``walsync`` shim VFS: loading it into apsw and draining its stream.

The shim (csrc/walsync.c) publishes one record per committed transaction into a process-wide
FIFO without touching Python; a single consumer thread drains it here, so the writer never
takes the GIL.  The drain verifies and indexes the records in C with the GIL released and
hands each sink one :class:`Batch`; records become Python objects only when a sink
iterates it, so a sink that ignores them costs nothing per commit.

Each database's records carry a sequence number (``seq``); a :class:`SyncPoint`
pins a read snapshot of the database together with the seq it corresponds to, which is how a
consumer lines a full copy up with the deltas that follow it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import overload

import apsw

from walsync_vfs import _shim, format

VFS_NAME = "walsync"
# Seconds the dispatcher waits after a busy drain: one wake-up and GIL hand-off per burst
# instead of per commit, for at most this much lag on a busy stream (none on a sparse one).
LINGER = 0.05
# An application's EXCLUSIVE lock kept this long past a commit is locking_mode=EXCLUSIVE, not
# a commit about to unlock.
EXCLUSIVE_HELD_NS = 100_000_000
# A lock kept this long on a database still to be switched to WAL: a read in EXCLUSIVE mode
# (or one never finished), which a switch would wait for in vain.
LOCK_KEPT_NS = 2_000_000_000
_FCNTL_DB_ID = 0x57530001

ffi, lib = _shim.ffi, _shim.lib
log = logging.getLogger("walsync_vfs")
_load_lock = threading.Lock()
_loaded = False
_ERR_LEN = 512
# A giant commit's pages are read back this many bytes at a time (SpooledPages.chunks) ...
READ_CHUNK = 1 << 20
# ... and at most this many pages in one read: with the frame headers between them, the
# iovecs of one preadv stay within Linux's IOV_MAX of 1024.
READ_RUN = 512
ENTRY_SIZE = format.SEGMENT_ENTRY.size  # csrc/commits.c packs index entries of this size


class Kind(IntEnum):
    """Record kinds; the values are the WS_* constants of walsync.c."""

    COMMIT = 1  # one committed transaction
    GAP = 2  # the stream broke (a writer the shim did not see); resync needed
    OPEN = 3  # the first connection in this process opened the database
    CLOSE = 4  # the last connection closed it


@dataclass(slots=True)
class Record:
    """One published record, copied out of C memory (treat as read-only; not frozen because
    frozen dataclasses cost a microsecond more per record on the capture path)."""

    kind: Kind
    db_id: int
    seq: int
    time_ns: int
    page_size: int = 0
    db_size: int = 0
    # (pgno, page), ascending, unique: a tuple, or SpooledPages for a commit too big for memory
    pages: Sequence[tuple[int, bytes]] = ()
    wal_salts: tuple[int, int] = (0, 0)
    wal_frames: tuple[int, int] = (0, 0)  # [start, end) frame indices in the WAL
    path: str = ""  # OPEN only
    missed: int = 0  # GAP only: commits known to be lost with it (0: none known)

    @property
    def memory(self) -> int:
        """Bytes of page images it holds in memory (none when they are in a spool file)."""
        return 0 if isinstance(self.pages, SpooledPages) else len(self.pages) * self.page_size


class SpooledPages(Sequence[tuple[int, bytes]]):
    """The pages of a commit too big to hold in memory: (pgno, page) in pgno order, read on
    demand from the shim's copy of its WAL frames (a file of its own, closed once this object
    and every slice of it are gone), so a giant transaction never has all its pages in memory
    at once.  A slice is another SpooledPages over the same file, read nothing yet."""

    __slots__ = ("_fd", "_owner", "_page_size", "_frame_size", "_pgnos", "_frames", "__weakref__")

    def __init__(
        self,
        fd: int,
        page_size: int,
        pgnos: array[int],
        frames: array[int],
        owner: SpooledPages | None = None,
    ) -> None:
        self._fd = fd  # owned (closed with this object), or ``owner``'s
        self._owner = owner
        self._page_size = page_size
        self._frame_size = 24 + page_size
        self._pgnos = pgnos
        self._frames = frames  # the frame holding each page's newest version, in the file
        if owner is None:
            weakref.finalize(self, os.close, fd)

    def __len__(self) -> int:
        return len(self._pgnos)

    @property
    def pgnos(self) -> array[int]:
        return self._pgnos

    @property
    def file_bytes(self) -> int:
        """The size of the file holding the commit's frames."""
        return os.fstat(self._fd).st_size

    def _page(self, i: int) -> tuple[int, bytes]:
        at = self._frames[i] * self._frame_size + 24
        data = os.pread(self._fd, self._page_size, at)
        if len(data) != self._page_size:
            raise OSError(f"short read of a spooled page at offset {at}")
        return self._pgnos[i], data

    @overload
    def __getitem__(self, i: int) -> tuple[int, bytes]: ...
    @overload
    def __getitem__(self, i: slice) -> SpooledPages: ...
    def __getitem__(self, i: int | slice) -> tuple[int, bytes] | SpooledPages:
        if isinstance(i, slice):
            owner = self._owner or self
            return SpooledPages(self._fd, self._page_size, self._pgnos[i], self._frames[i], owner)
        return self._page(range(len(self))[i])

    def chunks(self, size: int = READ_CHUNK) -> Iterator[memoryview]:
        """The pages' bytes back to back, about ``size`` bytes (whole pages) at a time, in
        one buffer reused for every chunk: each is valid until the next is asked for.

        A run of pages in consecutive frames is one read, their frame headers scattered into
        a scratch buffer, so a part costs a few system calls per MiB, not one per page."""
        ps, frames = self._page_size, self._frames
        per_chunk = max(1, min(size // ps, READ_RUN))
        buf = memoryview(bytearray(per_chunk * ps))
        scratch = bytearray(24)
        for start in range(0, len(frames), per_chunk):
            stop = min(start + per_chunk, len(frames))
            i = start
            while i < stop:
                run = i + 1  # pages i..run-1 are in consecutive frames
                while run < stop and frames[run] == frames[run - 1] + 1:
                    run += 1
                pieces: list[memoryview | bytearray] = []
                for k in range(i - start, run - start):
                    pieces += (buf[k * ps : (k + 1) * ps], scratch)
                at = frames[i] * self._frame_size + 24
                want = (run - i) * self._frame_size - 24
                if os.preadv(self._fd, pieces[:-1], at) != want:
                    raise OSError(f"short read of spooled pages at offset {at}")
                i = run
            yield buf[: (stop - start) * ps]


class CaptureError(RuntimeError):
    """The shim cannot be loaded or a database cannot be captured."""


class Uncapturable(CaptureError):
    """A database cannot be captured as the application has it now; replication resumes
    once that changes."""


class JournalModeError(Uncapturable):
    """A replicated database left WAL mode: its commits can no longer be captured."""


class ExclusiveLockError(Uncapturable):
    """A connection of this process keeps the database locked in ``locking_mode=EXCLUSIVE``
    (an ATTACH takes that mode from its connection's main database): no sync point can get
    in until that connection lets go."""


class NoLockError(Uncapturable):
    """A connection of this process opened the database with nolock=1: SQLite refuses it WAL."""


class OrphanedWalError(Uncapturable):
    """The WAL this process's connections write was deleted under them by another copy of
    SQLite in the process: until they close, their commits reach no file anyone else reads."""


class ClosedError(CaptureError):
    """A database not in WAL mode that the application closed before the engine could
    switch it (a ``VACUUM INTO`` output): nothing of it to replicate."""


def load() -> None:
    """Load the shim into apsw's SQLite once per process (idempotent, thread-safe).

    apsw links its own SQLite and exports no ``sqlite3_*`` symbols, so the VFS must be
    registered from inside it: ``load_extension`` on a throwaway connection.  The path is the
    one Python already imported, so the loader hands SQLite the same mapped library.
    """
    global _loaded
    with _load_lock:
        if _loaded:
            return
        con = apsw.Connection(":memory:")
        try:
            con.enable_load_extension(True)
            con.load_extension(_shim.__file__, "sqlite3_walsync_init")
        except apsw.Error as exc:
            raise CaptureError(
                f"cannot load the walsync shim from {_shim.__file__}: {exc}"
            ) from exc
        finally:
            con.close()
        if VFS_NAME not in apsw.vfs_names():
            raise CaptureError("the walsync shim loaded but did not register its VFS")
        _loaded = True


def db_id_of(con: apsw.Connection, schema: str = "main") -> int:
    """The shim's id for the database ``con`` has open as ``schema`` (0 if that database
    is not replicated: another VFS, a temporary or an in-memory database)."""
    out = ffi.new("int64_t *")
    try:
        con.file_control(schema, _FCNTL_DB_ID, int(ffi.cast("intptr_t", out)))
    except apsw.Error:
        return 0
    return int(out[0])


class StillOpenError(CaptureError):
    """A database not in WAL mode, written and still open at the engine's first look: a
    ``VACUUM INTO`` closes its output right after committing it, but a thread preempted in
    between still has it open.  The engine looks again after a while before switching it."""


class EmptyFileError(CaptureError):
    """A database file with nothing in it yet: not switched to WAL (its opener may be a
    ``VACUUM INTO``, which refuses an output file that is not empty)."""


class DatabaseLockedError(CaptureError):
    """Another connection holds the lock an internal connection's statement needs."""


def exclusive_problem(db_id: int, path: str) -> str | None:
    """Why database ``db_id`` cannot be replicated now, if a connection of this process
    keeps it locked in ``locking_mode=EXCLUSIVE`` (or, before its switch to WAL, keeps any
    lock for long); else None."""
    if lib.ws_app_exclusive_ns(db_id) >= EXCLUSIVE_HELD_NS:
        return (
            f"{path}: a connection of this process keeps it locked in locking_mode=EXCLUSIVE "
            "(an ATTACH takes that mode from its connection's main database), so it cannot "
            "be replicated until that connection lets go of it; use locking_mode=NORMAL there"
        )
    if lib.ws_app_locked_ns(db_id) >= LOCK_KEPT_NS:
        return (
            f"{path}: a connection of this process keeps it locked, so it cannot be switched "
            "to WAL and replicated until that connection lets go of it: in "
            "locking_mode=EXCLUSIVE (an ATTACH takes that mode from its connection's main "
            "database) even a read keeps its lock; use locking_mode=NORMAL there, or finish "
            "that connection's read"
        )
    return None


def switch_to_wal(
    switch: Callable[[], str],
    timeout_s: float,
    locked: type[Exception],
    give_up: Callable[[], None] = lambda: None,
) -> str:
    """Run ``switch`` (a ``PRAGMA journal_mode=WAL``) again while it raises ``locked``, for
    up to ``timeout_s``: the pragma upgrades its own read transaction, for which SQLite never
    calls the busy handler, and the opener and the engine may switch at the same time.
    ``give_up`` raises if waiting on is in vain.  Returns the journal mode SQLite kept."""
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    while True:
        try:
            return switch()
        except locked:
            give_up()
            if time.monotonic() > deadline:
                raise
        time.sleep(delay)  # no event to wait on: the lock is another connection's
        delay = min(delay * 2, 0.05)


class InternalConnection:
    """A connection of the engine's own, opened through the shim on SQLite's C API: apsw
    neither lists it in ``apsw.connections()`` nor runs ``apsw.connection_hooks`` on it, so
    an application never sees it.  Errors are :class:`CaptureError`."""

    def __init__(self, path: str, busy_timeout_ms: int) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        err = ffi.new("char[]", _ERR_LEN)
        self._db = lib.ws_conn_open(os.fsencode(path), busy_timeout_ms, err, _ERR_LEN)
        if self._db == ffi.NULL:
            raise CaptureError(f"{path}: cannot open: {ffi.string(err).decode()}")

    def query(self, sql: str) -> str:
        """Run one statement; the first column of its first row, as text ('' if none)."""
        out = ffi.new("char[]", _ERR_LEN)
        rc = lib.ws_conn_query(self._db, sql.encode(), out, _ERR_LEN)
        text = str(ffi.string(out).decode())
        if rc & 0xFF == apsw.SQLITE_BUSY:
            raise DatabaseLockedError(f"{self.path}: {sql}: {text}")
        if rc != apsw.SQLITE_OK:
            raise CaptureError(f"{self.path}: {sql}: {text}")
        return text

    def switch_to_wal(self, give_up: Callable[[], None]) -> str:
        """``PRAGMA journal_mode=WAL`` (see :func:`switch_to_wal`)."""
        return switch_to_wal(
            lambda: self.query("PRAGMA journal_mode=WAL"),
            self.busy_timeout_ms / 1000,
            DatabaseLockedError,
            give_up,
        )

    def file_control(self, op: int, arg: object) -> None:
        """``sqlite3_file_control`` on the main database (a missing answer leaves ``arg``)."""
        lib.ws_conn_fcntl(self._db, op, arg)

    @property
    def in_transaction(self) -> bool:
        return bool(lib.ws_conn_in_txn(self._db))

    def close(self) -> None:
        if self._db != ffi.NULL:
            lib.ws_conn_close(self._db)
            self._db = ffi.NULL


_KINDS = {int(k): k for k in Kind}
_COMMIT = Kind.COMMIT


def convert(rec) -> Record:
    """A published record (``ws_rec *``) as a Python :class:`Record`."""
    kind = _KINDS[rec.kind]
    if kind is _COMMIT:  # the hot path: once per replicated transaction
        n, ps, buffer = rec.npages, rec.page_size, ffi.buffer
        pages: Sequence[tuple[int, bytes]]
        if rec.spool_fd >= 0:  # too big for memory: its frames are in a file, now ours
            fd, rec.spool_fd = rec.spool_fd, -1
            pgnos, frames = array("I"), array("I")
            pgnos.frombytes(buffer(rec.pgnos, 4 * n))
            frames.frombytes(buffer(rec.frames, 4 * n))
            pages = SpooledPages(fd, ps, pgnos, frames)
        elif n == 1:  # most small transactions: cheaper than the general way
            pages = ((rec.pgnos[0], buffer(rec.pages[0], ps)[:]),)
        else:
            pgnos = ffi.unpack(rec.pgnos, n)
            pages = tuple(
                zip(pgnos, [buffer(p, ps)[:] for p in ffi.unpack(rec.pages, n)], strict=True)
            )
        return Record(
            kind, rec.db_id, rec.seq, rec.time_ns, ps, rec.db_size, pages,
            (rec.salt1, rec.salt2), (rec.frame_start, rec.frame_end),
        )  # fmt: skip
    path = ffi.string(rec.path).decode() if kind is Kind.OPEN else ""
    missed = rec.npages if kind is Kind.GAP else 0
    return Record(kind, rec.db_id, rec.seq, rec.time_ns, path=path, missed=missed)


class OpenRun:
    """Commits of one lineage packed in C for one segment (csrc/commits.c, ``ws_run``), which
    the capture may still add to while it is its database's newest pending item (see
    :func:`extend_runs`).  Its numbers are read from C; its bytes only once :meth:`seal` has
    handed them to a :class:`format.PackedRun` (the uploader does, under the engine lock, when
    it takes the run): until then they move as the run grows."""

    __slots__ = ("_run", "page_size")

    def __init__(self, run: object) -> None:
        """Take over a ``ws_run *`` that ws_extend_all began."""
        self._run = ffi.gc(run, lib.ws_run_free)
        self.page_size = int(self._run.page_size)

    @property
    def txid(self) -> int:
        return int(self._run.first_txid)

    @property
    def last_txid(self) -> int:
        return int(self._run.last_txid)

    @property
    def time_ns(self) -> int:
        """The first commit's time."""
        return int(self._run.first_time_ns)

    @property
    def wal(self) -> format.WalPos:
        """Where the last commit ended in the source's WAL."""
        run = self._run
        return format.WalPos(run.salt1, run.salt2, run.wal_end)

    @property
    def last_seq(self) -> int:
        """The capture record seq of its last commit."""
        return int(self._run.last_seq)

    @property
    def commit_count(self) -> int:
        return int(self._run.ncommit)

    @property
    def page_count(self) -> int:
        return int(self._run.pages)

    def seal(self) -> format.PackedRun:
        """Nothing more is added: its commits, over the memory the C wrote them in (now
        owned by the memoryviews)."""
        run = self._run
        assert not run.sealed, "a run is sealed once"
        run.sealed = 1
        entries, block = run.entries, run.blocks
        run.entries, run.blocks, run.last_block = ffi.NULL, ffi.NULL, ffi.NULL
        memory = _RunMemory(entries, block)
        index = ffi.buffer(memory.owned(entries), run.ncommit * ENTRY_SIZE)
        head = ffi.sizeof("ws_block")
        records = []
        while block:  # a NULL pointer is false
            owned = ffi.buffer(memory.owned(block), head + block.used)
            records.append(memoryview(owned)[head:])
            block = block.next
        return format.PackedRun(self.page_size, memoryview(index), records)  # type: ignore[arg-type]


class _RunMemory:
    """A sealed run's entries and blocks, freed by one C call once the last of their buffers
    is gone: a C destructor per block would hand the GIL over once per block."""

    __slots__ = ("_entries", "_blocks", "_left")

    def __init__(self, entries: object, blocks: object) -> None:
        self._entries, self._blocks, self._left = entries, blocks, 0

    def owned(self, piece: object) -> object:
        """``piece``, kept until the cdata returned is collected."""
        self._left += 1
        return ffi.gc(piece, self._release)

    def _release(self, _piece: object) -> None:
        self._left -= 1
        if not self._left:
            lib.ws_run_memory_free(self._entries, self._blocks)


@dataclass(slots=True)
class Extension:
    """What :func:`extend_runs` made of one database's records."""

    next: object  # the first record not taken (ws_rec *; NULL, which is false, if none)
    last_seq: int  # of the last record taken (0: none)
    made: int  # commits made (records inside the sync state are taken, not made)
    pages: int  # of the commits made
    open: OpenRun | None  # the run it was given, which its first commits went on
    began: list[OpenRun]  # runs begun after it, in order: the last one is open
    next_txid: int
    time_ns: int


# Where a lineage's end is, for extend_runs: (first record (ws_rec *), the run its commits go
# on (None: begin one), extent: the most pages the database has in its commits from there,
# checksum, page_size, next_txid, time_ns, sync_seq, max_bytes)
RunStart = tuple[object, OpenRun | None, int, format.DbChecksum, int, int, int, int, int]


def extend_runs(starts: Sequence[RunStart]) -> list[Extension]:
    """Extend the lineages' ends, checksums included, by the records from each start on
    that the lineage can take as they are (csrc/commits.c): one C call with the GIL released
    for every database, packing their commits onto the run given (begun at once, for a first
    commit) and runs begun after it, each at most about ``max_bytes`` of pages: no Python
    object per commit or page, and per database only a few numbers unless a run begins.
    Records up to a lineage's ``sync_seq`` are taken and skipped (they are in the state it
    started from).  A record it cannot take, the caller handles as a :class:`Record`; none
    of a database's is taken when memory runs out.  Each database must appear once."""
    n = len(starts)
    # Flat arrays, one slot (or WS_IN_N / WS_OUT_N numbers) per database: a few cffi calls a
    # drain rather than a struct's fields per database.
    ends, views, recs, runs, times = [], [], [], [], []
    numbers: list[int] = []  # WS_IN_N of them per database, in csrc/commits.c's order
    try:
        for rec, run, extent, ck, page_size, txid, time_ns, sync_seq, max_bytes in starts:
            size, value = ck.db_size, ck.value
            ends.append((size, value))
            # Exported while C writes to it: the array cannot be resized meanwhile.
            view = ffi.from_buffer("uint64_t[]", ck.reserve(extent))
            views.append(view)
            recs.append(rec)
            runs.append(ffi.NULL if run is None else run._run)
            numbers += (len(view), size, value, txid, sync_seq, page_size, max_bytes)
            times.append(time_ns)
        c_times, c_out = ffi.new("int64_t[]", times), ffi.new("uint64_t[]", n * lib.WS_OUT_N)
        c_next, c_began = ffi.new("ws_rec *[]", n), ffi.new("ws_run *[]", n)
        lib.ws_extend_all(
            n, ffi.new("ws_rec *[]", recs), ffi.new("ws_run *[]", runs),
            ffi.new("uint64_t *[]", views), ffi.new("uint64_t[]", numbers), c_times, c_out,
            c_next, c_began,
        )  # fmt: skip
    except BaseException:
        for view in views:
            ffi.release(view)
        for (_, _, _, ck, *_), (size, value) in zip(starts, ends, strict=False):
            ck.settle(size, value)  # those reserved: the others are as they were
        raise
    for view in views:
        ffi.release(view)
    stride = lib.WS_OUT_N
    made = ffi.unpack(c_out, n * stride)
    times, nexts, began = ffi.unpack(c_times, n), ffi.unpack(c_next, n), ffi.unpack(c_began, n)
    result = []
    for i, (_, run, _, ck, *_) in enumerate(starts):
        last_seq, count, pages, db_size, value, next_txid = made[i * stride : (i + 1) * stride]
        ck.settle(db_size, value)
        runs_began, fresh = [], began[i]
        while fresh:  # a NULL pointer is false
            runs_began.append(OpenRun(fresh))
            fresh = fresh.next
        ext = (nexts[i], last_seq, count, pages, run, runs_began, next_txid, times[i])
        result.append(Extension(*ext))
    return result


class Batch:
    """What one drain of the queue holds for one sink: the records of one or more databases,
    each database's in commit order.

    Iterating converts them to :class:`Record` (Python copies, safe to keep).  The batch
    itself points into C memory that is freed after the sink returns: a sink must not keep
    it (iterating it afterwards yields nothing).  One batch per sink, not per database, so
    a drain touching many databases costs one sink call.
    """

    __slots__ = ("commits", "gaps", "_heads")

    def __init__(self) -> None:
        self.commits = 0  # COMMIT records in the batch
        self.gaps = 0
        self._heads: list = []  # each database's records (ws_batch *)

    def add(self, b) -> None:
        """Add one database's records (a ``ws_batch *`` from :func:`drain`)."""
        self.commits += b.ncommit
        self.gaps += b.ngap
        self._heads.append(b)

    def __iter__(self) -> Iterator[Record]:
        for b in self._heads:
            rec = b.first
            while rec:  # a NULL pointer is false
                yield convert(rec)
                rec = rec.next

    def chains(self) -> list:
        """Each database's records as a ``ws_batch *`` (``first`` record, linked by ``next``;
        ``max_db_size``): for a sink that takes runs of commits in C (see
        :func:`extend_runs`) rather than iterating."""
        return self._heads

    def release(self) -> None:
        """Forget the C memory (called once the sink has returned)."""
        self._heads = []


def drain(timeout: float | None = 0.0, linger: float = 0.0) -> list:
    """Drain every queued record, grouped per database (``ws_batch *`` each: ``db_id``,
    ``nrec``, ``ncommit``, ``ngap``, ``open_path``, ``first``), waiting up to ``timeout``
    seconds for one (``None``: until a record arrives or :func:`wake` is called).  If the
    previous drain returned records, first sleep ``linger`` seconds so commits batch up.

    All of it is one C call with the GIL released, which also frees the previous drain's
    records: what it returns is valid until the next call.  There must be exactly one
    consumer per process.
    """
    ms = -1 if timeout is None else int(timeout * 1000)
    groups = []
    b = lib.ws_drain(ms, int(linger * 1e6))
    while b != ffi.NULL:
        groups.append(b)
        b = b.next
    return groups


def read_any(db_id: int) -> None:
    """Leader: a sync is under way; if the shim has no place in the WAL's chain, the WAL may
    restart past frames not yet read (the sync point's snapshot holds them).  See
    ws_read_any in csrc/walsync.c."""
    lib.ws_read_any(db_id)


def wake() -> None:
    """Make a blocked :func:`drain` return (used by barriers and to stop the consumer)."""
    lib.ws_wake()


class SyncPoint:
    """A database's exact bytes at a known record seq, readable while writers go on.

    Holding the WAL write lock (``BEGIN IMMEDIATE``) for a moment guarantees no commit is in
    flight: the shim re-reads the WAL chain and reports the last seq used and how many WAL
    frames make up the state.  Before the lock is released, a read transaction pins that state
    (the checkpointer cannot copy later frames into the db file) and the shim refuses WAL
    restarts (the frames we read stay put).  Writers stall only for those microseconds.

    :meth:`pages` then reads the raw pages: each page's newest frame among the first
    ``nframe`` WAL frames, else the db file.  (The backup API is no substitute: it rewrites the
    change counter and schema cookie of page 1.)  Every COMMIT with ``seq > self.seq`` applies
    on top of these bytes.
    """

    def __init__(
        self,
        path: str,
        busy_timeout_ms: int = 60_000,
        *,
        enable_wal: bool = False,
        seen_open: bool = False,
    ) -> None:
        """``enable_wal``: switch a database in another journal mode to WAL (its first sync
        in this process: an attached database, or one opened without the connection hook);
        otherwise such a database raises :class:`JournalModeError`.  ``seen_open``: an
        earlier look found the application still had it open (see :meth:`_check_in_use`)."""
        load()
        self.path = path
        self._held = False
        if enable_wal and os.path.getsize(path) == 0:
            raise EmptyFileError(f"{path}: empty")
        self.reader = InternalConnection(path, busy_timeout_ms)
        try:
            writer = InternalConnection(path, busy_timeout_ms)
        except BaseException:
            self.reader.close()
            raise
        try:
            out = ffi.new("int64_t *")
            writer.file_control(_FCNTL_DB_ID, out)
            self.db_id = int(out[0])
            self._check_exclusive()
            if lib.ws_wal_orphaned(self.db_id):
                raise OrphanedWalError(
                    f"{path}: its WAL was deleted under this process's connections (by another "
                    "SQLite library in the process, stdlib sqlite3 beside apsw; by the process "
                    "this one was forked from while it had the database open, whose close "
                    "checkpointed it; or with the database's files): their commits reach no "
                    "file a replicator reads; close and reopen them, open a database with one "
                    "library per process, and close it before fork()"
                )
            # Before any read: without locks, that connection may be writing right now.
            if enable_wal and lib.ws_app_nolock(self.db_id):
                raise NoLockError(
                    f"{path}: a connection of this process opened it with nolock=1, to which "
                    "SQLite refuses WAL, so it cannot be replicated; open it without nolock "
                    "(it is left in its journal mode)"
                )
            try:
                mode = writer.query("PRAGMA journal_mode")
                if mode != "wal" and enable_wal:
                    self._check_in_use(writer, seen_open)
                    mode = writer.switch_to_wal(self._check_exclusive)
            except DatabaseLockedError:
                self._check_exclusive()
                raise
            if mode != "wal":
                raise JournalModeError(
                    f"{path}: no longer in WAL mode (a connection set another journal_mode): "
                    "replication of it has stopped; run PRAGMA journal_mode=WAL on it to resume"
                )
            pos = ffi.new("ws_pos *")
            writer.query("BEGIN IMMEDIATE")
            try:
                if not lib.ws_sync(self.db_id, pos):
                    raise CaptureError(f"{path}: not opened through the walsync VFS")
                # Read under the write lock, which the shim stamps commits under: every commit
                # in the pinned state is stamped before this time, every later one after it.
                self.taken_ns = time.time_ns()
                lib.ws_hold(self.db_id, 1)
                self._held = True
                self.reader.query("BEGIN")
                self.reader.query("SELECT 1 FROM sqlite_schema LIMIT 1")
            finally:
                writer.query("ROLLBACK")
        except BaseException:
            self.close()
            raise
        finally:
            writer.close()
        self.seq = int(pos.seq)
        self.wal_page_size = int(pos.page_size)
        self.nframe = int(pos.nframe)  # the pinned state is WAL frames [0, nframe) + the db file
        self.salts = (int(pos.salt1), int(pos.salt2))

    def _check_exclusive(self) -> None:
        """Raise :class:`ExclusiveLockError` if an application connection keeps the database
        locked past its commits: waiting for the lock would be in vain."""
        problem = exclusive_problem(self.db_id, self.path)
        if problem:
            raise ExclusiveLockError(problem)

    def _check_in_use(self, writer: InternalConnection, seen_open: bool) -> None:
        """Raise :class:`ClosedError` unless the application still has the database open
        once no write transaction is under way on it: a ``VACUUM INTO`` writes its output
        in one transaction and closes it right after, so an output found complete is one
        to leave as it is, in its journal mode.  Found open at a first look, raise
        :class:`StillOpenError`: the close may be a moment away, and a switch would turn
        the output into a WAL database the engine replicates."""
        writer.query("BEGIN IMMEDIATE")
        try:
            in_use = lib.ws_app_open(self.db_id)
        finally:
            writer.query("ROLLBACK")
        if not in_use:
            raise ClosedError(f"{self.path}: closed before it could be switched to WAL")
        if not seen_open:
            raise StillOpenError(f"{self.path}: written and still open; looking again")

    def _file(self, op: int) -> object:
        """The reader's own open sqlite3_file for the db (or its WAL): see ws_read()."""
        out = ffi.new("void **")
        self.reader.file_control(op, out)
        if out[0] == ffi.NULL:
            raise CaptureError(f"{self.path}: file handle unavailable")
        return out[0]

    def _frame_size(self) -> int:
        return 24 + self.wal_page_size

    def _newest(self, wal: object, end: int) -> dict[int, int]:
        """pgno -> offset of the page data of its newest frame among WAL frames [0, end)."""
        newest: dict[int, int] = {}
        hdr = ffi.new("unsigned char[]", 4)
        size = self._frame_size()
        for off in range(32, 32 + end * size, size):
            _read(wal, hdr, 4, off)
            newest[int.from_bytes(ffi.buffer(hdr, 4), "big")] = off + 24
        return newest

    def _check_salts(self, wal: object) -> None:
        """A foreign process could still restart the WAL: then what was read is not the state."""
        hdr = ffi.new("unsigned char[]", 8)
        _read(wal, hdr, 8, 16)
        salts = ffi.buffer(hdr, 8)[:]
        if (int.from_bytes(salts[:4], "big"), int.from_bytes(salts[4:], "big")) != self.salts:
            raise CaptureError(f"{self.path}: WAL restarted during the snapshot")

    def pages(self) -> tuple[int, int, Iterator[bytes]]:
        """(page_size, db_size, iterator over pages 1..db_size) of the pinned state."""
        db = self._file(apsw.SQLITE_FCNTL_FILE_POINTER)
        hdr = ffi.new("unsigned char[]", 100)
        if self.nframe:
            page_size = self.wal_page_size
            wal = self._file(apsw.SQLITE_FCNTL_JOURNAL_POINTER)
            _read(wal, hdr, 8, 32 + (self.nframe - 1) * self._frame_size())
            db_size = int.from_bytes(ffi.buffer(hdr, 8)[4:8], "big")  # the last frame commits
        else:
            size = lib.ws_file_size(db)
            page_size = 4096
            if size >= 100:
                _read(db, hdr, 100, 0)
                page_size = int.from_bytes(ffi.buffer(hdr, 100)[16:18], "big")
                page_size = 65536 if page_size == 1 else page_size
            db_size = max(size, 0) // page_size
        pgnos = self.pages_as_of(self.nframe, range(1, db_size + 1), page_size)
        return page_size, db_size, (page for _, page in pgnos)

    def pages_as_of(
        self, frame: int, pgnos: Iterable[int], page_size: int | None = None
    ) -> Iterator[tuple[int, bytes]]:
        """(pgno, page) as WAL frames [0, frame) and the db file have each page: the database
        at the commit ending at ``frame`` (pages a later checkpoint copied into the db file
        excepted, which is why callers check the result against a whole-db checksum)."""
        db = self._file(apsw.SQLITE_FCNTL_FILE_POINTER)
        wal = self._file(apsw.SQLITE_FCNTL_JOURNAL_POINTER) if self.nframe else None
        newest = self._newest(wal, frame) if wal is not None else {}
        size = page_size or self.wal_page_size
        buf = ffi.new("unsigned char[]", size)
        for pgno in pgnos:
            off = newest.get(pgno)
            if off is None:
                _read(db, buf, size, (pgno - 1) * size)
            else:
                _read(wal, buf, size, off)
            yield pgno, ffi.buffer(buf)[:]
        if wal is not None:
            self._check_salts(wal)

    def frames(self, start: int) -> Iterator[tuple[int, int, bytes]]:
        """(pgno, db size if a commit frame else 0, page) of WAL frames [start, nframe)."""
        wal = self._file(apsw.SQLITE_FCNTL_JOURNAL_POINTER)
        size = self._frame_size()
        buf = ffi.new("unsigned char[]", size)
        for i in range(start, self.nframe):
            _read(wal, buf, size, 32 + i * size)
            frame = ffi.buffer(buf)
            yield (int.from_bytes(frame[0:4], "big"), int.from_bytes(frame[4:8], "big"), frame[24:])
        self._check_salts(wal)

    def close(self) -> None:
        """End the read transaction, let WAL restarts happen again, close the reader."""
        if self._held:
            lib.ws_hold(self.db_id, -1)
            self._held = False
        if self.reader.in_transaction:
            self.reader.query("COMMIT")
        self.reader.close()

    def __enter__(self) -> SyncPoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read(file: object, buf: object, n: int, off: int) -> None:
    rc = lib.ws_read(file, buf, n, off)
    if rc != 0:
        raise CaptureError(f"read of {n} bytes at offset {off} failed (SQLite error {rc})")


Sink = Callable[[Batch], None]


class Dispatcher:
    """The process's single consumer of the shim's queue: routes records to per-database sinks.

    One daemon thread blocks in C (GIL released) until records arrive, then hands each sink
    one :class:`Batch` with its databases' records, each database's in commit order.  A
    database's sink is chosen when its OPEN record arrives: a sink routed to its path, else
    :attr:`default` (the replication engine), else the records are dropped.

    With no database open in the process (and no route or barrier waiting) the thread ends:
    the next first open starts another (see :func:`dispatcher`).
    """

    def __init__(self, default: Sink | None = None) -> None:
        self.default = default  # set before the thread starts: its first drain may hold OPENs
        self._by_id: dict[int, Sink | None] = {}
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._requested = self._served = 0  # barrier bookkeeping
        self._retired = False  # its thread ended: barriers go to the next dispatcher
        self._thread = threading.Thread(target=self._run, name="walsync-capture", daemon=True)
        self._thread.start()

    def route_path(self, path: str, sink: Sink | None) -> None:
        """Send the records of the database at ``path`` to ``sink`` from its next OPEN on.
        Routes belong to the process, not to this consumer: one that retires while a route
        is being added leaves it to the next."""
        key = os.path.realpath(path)
        with _load_lock:
            if sink is None:
                _routes.pop(key, None)
            else:
                _routes[key] = sink

    def set_default(self, sink: Sink) -> None:
        """Route databases whose OPEN arrives from now on, and no other sink claims, to
        ``sink`` (under the lock: a drain routes all its records with one default)."""
        with self._lock:
            self.default = sink

    def barrier(self, timeout: float = 10.0) -> None:
        """Return once every record queued before the call has been handed to its sink."""
        with self._cond:
            if not self._retired:
                self._requested += 1
                target = self._requested
                wake()
                if not self._cond.wait_for(lambda: self._served >= target, timeout):
                    raise TimeoutError("capture dispatcher did not drain in time")
                return
        dispatcher().barrier(timeout)

    def _route(self, groups: list) -> dict[Sink, Batch]:
        """Each database's records to its sink; an OPEN in the drain (re)chooses it."""
        out: dict[Sink, Batch] = {}
        with self._lock:
            for b in groups:
                if b.open_path != ffi.NULL:
                    path = os.path.realpath(ffi.string(b.open_path).decode())
                    sink = self._by_id[b.db_id] = _routes.get(path, self.default)
                else:
                    sink = self._by_id.get(b.db_id, self.default)
                if sink is not None:
                    if sink not in out:
                        out[sink] = Batch()
                    out[sink].add(b)
        return out

    def _run(self) -> None:
        look = True  # whether the last databases may have closed
        while True:
            with self._lock:
                requested = self._requested
            # A waiting barrier needs a pass that starts after it: drain without blocking.
            # Otherwise linger after a busy pass: commits arriving meanwhile queue up without
            # waking this thread, so a busy writer pays one wake-up per LINGER, not per
            # commit.  Idle, the thread blocks in C and costs nothing.
            idle = requested == self._served
            if idle and look and lib.ws_open_count() == 0 and self._retire():
                return
            groups = drain(None if idle else 0, LINGER if idle else 0)
            # Only a drain holding more than commits (a CLOSE among them) can leave no
            # database open: each look is a C call, a GIL hand-off, so not one per drain.
            look = not groups or any(b.nrec != b.ncommit for b in groups)
            self._hand_over(groups)
            with self._cond:
                self._served = requested
                self._cond.notify_all()

    def _hand_over(self, groups: list) -> None:
        for sink, batch in self._route(groups).items():
            try:
                sink(batch)
            except Exception:  # a sink's bug must not stop capture for every database
                log.exception("walsync: capture sink failed")
            finally:
                batch.release()

    def _retire(self) -> bool:
        """End this consumer if nothing can need it: records published before this look are
        handed over first (then it stays), later ones go to the dispatcher the first open
        that published them starts."""
        global _dispatcher
        with _load_lock:
            groups = drain(0)
            if not groups:
                with self._lock:
                    if _routes or self._requested != self._served:
                        return False
                    self._retired = True
                if _dispatcher is self:
                    _dispatcher = None
                return True
        self._hand_over(groups)
        return False


_dispatcher: Dispatcher | None = None
_default_sink: Sink | None = None  # outlives a retired dispatcher
_routes: dict[str, Sink] = {}  # realpath -> sink (Dispatcher.route_path), under _load_lock


def _forget_dispatcher_in_child() -> None:
    """A forked child has no consumer thread (the shim forgot the parent's queue too)."""
    global _dispatcher, _default_sink, _load_lock
    _dispatcher = _default_sink = None
    _load_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_dispatcher_in_child)


def dispatcher(default: Sink | None = None) -> Dispatcher:
    """The process-wide :class:`Dispatcher`, started on first use.  A ``default`` sink given
    here receives every database whose OPEN the dispatcher routes from now on, including
    OPENs queued before it started."""
    global _dispatcher, _default_sink
    with _load_lock:
        if default is not None:
            _default_sink = default
        if _dispatcher is None:
            _dispatcher = Dispatcher(_default_sink)
        elif default is not None:
            _dispatcher.set_default(default)
        return _dispatcher
