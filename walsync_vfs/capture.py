"""The Python side of the ``walsync`` shim VFS: loading it into apsw and draining its stream.

The shim (csrc/walsync.c) publishes one record per committed transaction into a process-wide
FIFO without touching Python; a single consumer thread drains it here, so the writer never
takes the GIL.  Each database's records carry a sequence number (``seq``); a :class:`SyncPoint`
pins a read snapshot of the database together with the seq it corresponds to, which is how a
consumer lines a full copy up with the deltas that follow it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from enum import IntEnum

import apsw

from walsync_vfs import _shim

VFS_NAME = "walsync"
_FCNTL_DB_ID = 0x57530001

ffi, lib = _shim.ffi, _shim.lib
_load_lock = threading.Lock()
_loaded = False


class Kind(IntEnum):
    """Record kinds; the values are the WS_* constants of walsync.c."""

    COMMIT = 1  # one committed transaction
    GAP = 2  # the stream broke (a writer the shim did not see); resync needed
    OPEN = 3  # the first connection in this process opened the database
    CLOSE = 4  # the last connection closed it


@dataclass(frozen=True, slots=True)
class Record:
    """One published record, copied out of C memory."""

    kind: Kind
    db_id: int
    seq: int
    time_ns: int
    page_size: int = 0
    db_size: int = 0
    pages: tuple[tuple[int, bytes], ...] = ()  # (pgno, page), ascending, unique
    wal_salts: tuple[int, int] = (0, 0)
    wal_frames: tuple[int, int] = (0, 0)  # [start, end) frame indices in the WAL
    path: str = ""  # OPEN only


class CaptureError(RuntimeError):
    """The shim cannot be loaded or a database cannot be captured."""


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
            raise CaptureError(f"cannot load the walsync shim from {_shim.__file__}: {exc}") from exc
        finally:
            con.close()
        if VFS_NAME not in apsw.vfs_names():
            raise CaptureError("the walsync shim loaded but did not register its VFS")
        _loaded = True


def db_id_of(con: apsw.Connection, schema: str = "main") -> int:
    """The shim's id for the database ``con`` has open (0 if not opened through walsync)."""
    out = ffi.new("int64_t *")
    try:
        con.file_control(schema, _FCNTL_DB_ID, int(ffi.cast("intptr_t", out)))
    except apsw.Error:
        return 0
    return int(out[0])


def db_path(db_id: int) -> str:
    """The full path SQLite opened for ``db_id``."""
    p = lib.ws_db_path(db_id)
    return ffi.string(p).decode() if p != ffi.NULL else ""


def _convert(rec) -> Record:
    kind = Kind(rec.kind)
    if kind is Kind.COMMIT:
        n, ps = rec.npages, rec.page_size
        pgnos = ffi.unpack(rec.pgnos, n)
        data = ffi.buffer(rec.data, n * ps)[:]
        pages = tuple((pgnos[i], data[i * ps : (i + 1) * ps]) for i in range(n))
        return Record(
            kind, rec.db_id, rec.seq, rec.time_ns, ps, rec.db_size, pages,
            (rec.salt1, rec.salt2), (rec.frame_start, rec.frame_end),
        )  # fmt: skip
    path = ffi.string(ffi.cast("char *", rec.data)).decode() if kind is Kind.OPEN else ""
    return Record(kind, rec.db_id, rec.seq, rec.time_ns, path=path)


def take(timeout: float | None = 0.0) -> list[Record]:
    """Drain every queued record, oldest first, waiting up to ``timeout`` seconds for one.

    ``None`` waits until a record arrives or :func:`wake` is called.  The wait happens in C
    with the GIL released.  There must be exactly one consumer per process.
    """
    ms = -1 if timeout is None else int(timeout * 1000)
    if ms != 0 and not lib.ws_wait(ms if ms > 0 else 2**31 - 1):
        return []
    head = lib.ws_take()
    out = []
    rec = head
    while rec != ffi.NULL:
        out.append(_convert(rec))
        rec = rec.next
    lib.ws_free(head)
    return out


def wake() -> None:
    """Make a blocked :func:`take` return (used to stop the consumer)."""
    lib.ws_wake()


class SyncPoint:
    """A read snapshot of a database pinned together with the record seq it corresponds to.

    Holding the WAL write lock (``BEGIN IMMEDIATE``) for a moment guarantees no commit is in
    flight: the shim re-reads the WAL chain position and reports the last seq used, and a
    second connection opens a read transaction at exactly that state.  The write lock is
    released at once, so writers stall only for microseconds however long the caller then
    reads.  Every COMMIT with ``seq > self.seq`` applies on top of :attr:`reader`'s view.
    """

    def __init__(self, path: str, busy_timeout_ms: int = 60_000) -> None:
        load()
        self.reader = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READWRITE, vfs=VFS_NAME)
        writer = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READWRITE, vfs=VFS_NAME)
        try:
            for con in (self.reader, writer):
                con.set_busy_timeout(busy_timeout_ms)
            self.db_id = db_id_of(writer)
            writer.execute("BEGIN IMMEDIATE")
            try:
                self.seq = int(lib.ws_sync(self.db_id))
                self.reader.execute("BEGIN")
                self.reader.execute("SELECT 1 FROM sqlite_schema LIMIT 1").fetchall()
            finally:
                writer.execute("ROLLBACK")
        except BaseException:
            self.reader.close()
            raise
        finally:
            writer.close()

    def close(self) -> None:
        """End the read transaction and close the reader."""
        if self.reader.in_transaction:
            self.reader.execute("COMMIT")
        self.reader.close()

    def __enter__(self) -> SyncPoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
