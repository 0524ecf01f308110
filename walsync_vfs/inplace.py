"""Applying batches of pages to a live rollback-journal database as SQLite's own writer would.

``restore --follow`` keeps its output up to date in place: other processes read it with plain
SQLite (rollback-journal mode) while batches land.  Each batch is one SQLite write
transaction, made by hand with the same locks and the same hot journal as SQLite's pager and
unix VFS (https://www.sqlite.org/lockingv3.html, https://www.sqlite.org/fileformat2.html
"the rollback journal"):

1. SHARED, then RESERVED: POSIX locks on the bytes SQLite uses (a read lock on the PENDING
   byte while a read lock on the SHARED range is taken, then a write lock on the RESERVED
   byte).  Readers keep reading the old content; RESERVED tells them a journal they may see
   is live, not hot.
2. ``<db>-journal``: a header whose magic and record count stay zero until the records are
   durable, then one record (page number, original page, checksum) for every page the batch
   overwrites inside the original size; fsync (its directory too), header completed, fsync.
   From here on a process killed at any point leaves a hot journal that the next read-write
   opener rolls back, as after a crashed SQLite writer.
3. PENDING (new readers wait), EXCLUSIVE (a write lock on the SHARED range, retried until
   the readers in progress finish), the new pages written, the file cut or extended to its new
   size, page 1 with a new file change counter (bytes 24-27, and 92-95 equal to it, so the
   in-header size at 28-31 is valid and readers' page caches see the change) and the
   rollback-mode version bytes (18-19 = 1); fsync.
4. The journal deleted: the commit point.  Locks released.

POSIX locks belong to the process, and closing any descriptor of the file drops them all:
while a batch is open this process must not open the database any other way (SQLite
included).  Rolling back a hot journal is left to SQLite itself (:func:`roll_back`), opened
only while no lock is held.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import struct
import tempfile
import time
from array import array
from collections.abc import Iterator, Sequence
from typing import BinaryIO

import apsw

from walsync_vfs.dbfile import read_pages, write_pages
from walsync_vfs.format import Page
from walsync_vfs.format.checksum import PENDING_BYTE, lock_page

RESERVED_BYTE = PENDING_BYTE + 1
SHARED_FIRST = PENDING_BYTE + 2
SHARED_SIZE = 510
JOURNAL_MAGIC = bytes.fromhex("d9d505f920a163d7")
# SQLite's unix VFS reports powersafe overwrite, for which the pager uses 512-byte sectors.
SECTOR_SIZE = 512
LOCK_TIMEOUT = 30.0  # seconds readers may hold the database before a batch gives up
HELD_BYTES = 32 << 20  # new pages held in memory before they go to a staging file
# Database header: file format versions (1 = rollback journal), change counter, size in
# pages, and "version valid for", which must equal the counter for the size to be trusted.
FORMAT_VERSIONS = slice(18, 20)
ROLLBACK_MODE = b"\x01\x01"
CHANGE_COUNTER = slice(24, 28)
SIZE_IN_HEADER = slice(28, 32)
VALID_FOR = slice(92, 96)


class LiveDatabaseError(Exception):
    """A batch could not be applied; the database is as it was before it."""


class ForeignWriter(LiveDatabaseError):
    """The database was written by someone else since this writer's last batch."""


def set_rollback_mode(f: BinaryIO) -> None:
    """Mark the database file ``f`` (positioned anywhere) as rollback-journal mode."""
    f.seek(FORMAT_VERSIONS.start)
    f.write(ROLLBACK_MODE)
    f.flush()


def roll_back(path: str) -> None:
    """Have SQLite roll back a hot journal of ``path`` left by a writer that died, if any.
    Call only while this process holds no lock on ``path``."""
    if not os.path.exists(path + "-journal"):
        return
    con = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READWRITE, vfs="unix")
    try:
        con.setbusytimeout(int(LOCK_TIMEOUT * 1000))
        con.execute("SELECT count(*) FROM sqlite_schema").fetchall()
    finally:
        con.close()


def journal_checksum(nonce: int, page: Page) -> int:
    """pager.c's record checksum: the nonce plus every 200th byte, counted from the end."""
    return (nonce + sum(memoryview(page)[len(page) - 200 : 0 : -200])) & 0xFFFFFFFF


class LiveDatabase:
    """A rollback-mode database others read, written one batch at a time (module docstring).

    ``write`` adds pages to the open batch (beginning one if needed), ``commit`` makes the
    batch visible at once, ``abandon`` drops it, ``read`` reads pages as the last batch left
    them.  The file's change counter is expected to be the one this writer last set: anything
    else means another process wrote the file.
    """

    def __init__(self, path: str, page_size: int, page1: bytes | None = None) -> None:
        self.path = path
        self.journal = path + "-journal"
        self.page_size = page_size
        self.fd = os.open(path, os.O_RDWR)
        self._lock_page = lock_page(page_size)  # SQLite never stores a page there
        stored = os.pread(self.fd, page_size, 0)
        self._counter = self._change_counter(stored)
        # Page 1 as it was given (default: as stored), which `read` returns: the file's
        # differs in the header fields a batch sets (counter, size, rollback mode).
        self._page1 = stored if page1 is None else page1
        self._batch: _Batch | None = None
        self._checked = False  # the change counter, since the last batch ended

    def close(self) -> None:
        self.abandon()
        os.close(self.fd)

    def write(self, pages: Sequence[tuple[int, Page]], db_size: int) -> None:
        if self._batch is None:
            self._batch = _Batch(self)
        self._batch.add(pages)

    def read(self, first: int, count: int) -> bytes:
        """``count`` pages from ``first`` as the last batch left them (zeros past the end):
        an open batch holds its new pages apart until it commits."""
        if self._batch is None and not self._checked:  # a batch checks under its lock
            self.check_writer(os.pread(self.fd, CHANGE_COUNTER.stop, 0))
            self._checked = True
        pages = read_pages(self.fd, self.page_size, first, count)
        return self._page1 + pages[self.page_size :] if first == 1 and count else pages

    def commit(self, db_size: int) -> None:
        """Make the open batch visible to readers as one transaction of ``db_size`` pages."""
        batch, self._batch, self._checked = self._batch, None, False
        if batch is not None:
            self._counter = batch.commit(db_size, (self._counter + 1) & 0xFFFFFFFF)
            if batch.new_page1 is not None:
                self._page1 = bytes(batch.new_page1)

    def abandon(self) -> None:
        """Drop the open batch: readers keep seeing the database as it was."""
        batch, self._batch, self._checked = self._batch, None, False
        if batch is not None:
            batch.abandon()

    @staticmethod
    def _change_counter(page1: bytes) -> int:
        return int.from_bytes(page1[CHANGE_COUNTER], "big")

    def check_writer(self, page1: bytes) -> None:
        """Raise ForeignWriter unless page 1 has the change counter this writer last set."""
        if self._change_counter(page1) != self._counter:
            raise ForeignWriter(
                f"{self.path} was written by another process: the follower must be its "
                "only writer (it rebuilds the file)"
            )

    # Locks, as SQLite's unix VFS takes them (os_unix.c, unixLock).

    def _try_lock(self, kind: int, start: int, length: int) -> bool:
        try:
            fcntl.lockf(self.fd, kind | fcntl.LOCK_NB, length, start, os.SEEK_SET)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise
        return True

    def _lock(self, kind: int, start: int, length: int, what: str) -> None:
        """Take the lock, retrying while another process holds a conflicting one."""
        deadline = time.monotonic() + LOCK_TIMEOUT
        pause = 0.0005
        while not self._try_lock(kind, start, length):
            if time.monotonic() > deadline:
                raise LiveDatabaseError(
                    f"{self.path}: other processes held it for {LOCK_TIMEOUT:.0f} s "
                    f"(waiting for {what}); the batch is retried at the next poll"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.01)

    def lock_reserved(self) -> None:
        self._lock(fcntl.LOCK_SH, PENDING_BYTE, 1, "SHARED")
        self._lock(fcntl.LOCK_SH, SHARED_FIRST, SHARED_SIZE, "SHARED")
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, PENDING_BYTE, os.SEEK_SET)
        self._lock(fcntl.LOCK_EX, RESERVED_BYTE, 1, "RESERVED")

    def lock_exclusive(self) -> None:
        self._lock(fcntl.LOCK_EX, PENDING_BYTE, 1, "PENDING")
        self._lock(fcntl.LOCK_EX, SHARED_FIRST, SHARED_SIZE, "readers to finish")

    def unlock(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, SHARED_FIRST + SHARED_SIZE - PENDING_BYTE,
                    PENDING_BYTE, os.SEEK_SET)  # fmt: skip


class _Batch:
    """One write transaction: journal of the originals, new pages held until commit."""

    def __init__(self, db: LiveDatabase) -> None:
        self.db = db
        self.nonce = secrets.randbits(32)
        self.jfd = -1
        self.journal_end = SECTOR_SIZE
        self.records = 0
        self.new_page1: Page | None = None
        self.held: list[tuple[int, Page]] = []
        self.held_bytes = 0
        self.staged_pgnos = array("I")
        self.stage: BinaryIO | None = None
        self.writing = False
        roll_back(db.path)  # a journal a killed writer left: SQLite plays it back first
        try:
            db.lock_reserved()
            self._open_journal()
        except BaseException:
            self.abandon()
            raise

    def _open_journal(self) -> None:
        """Under RESERVED: check nobody else wrote the file, start the journal with its
        header (magic and record count zero until the records are durable) and page 1."""
        db, ps = self.db, self.db.page_size
        self.orig_size = os.fstat(db.fd).st_size // ps
        self.page1 = os.pread(db.fd, ps, 0)
        db.check_writer(self.page1)
        self.journaled = bytearray(self.orig_size // 8 + 1)
        mode = os.fstat(db.fd).st_mode & 0o777
        self.jfd = os.open(db.journal, os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode)
        header = bytes(12) + struct.pack(">IIII", self.nonce, self.orig_size, SECTOR_SIZE, ps)
        self._pwrite(self.jfd, header.ljust(SECTOR_SIZE, b"\0"), 0)
        self._journal([(1, self.page1)])  # page 1 changes in every batch (its counter)

    def add(self, pages: Sequence[tuple[int, Page]]) -> None:
        self._journal(self._originals([pgno for pgno, _ in pages]))
        for pgno, data in pages:
            if pgno == 1:
                self.new_page1 = data
            else:
                self.held.append((pgno, data))
                self.held_bytes += len(data)
        if self.held_bytes > HELD_BYTES:
            self._spill()

    def _originals(self, pgnos: list[int]) -> Iterator[tuple[int, bytes]]:
        """The current content of the pages not journaled yet, read a run at a time."""
        ps, fd = self.db.page_size, self.db.fd
        wanted = [
            p for p in pgnos
            if p <= self.orig_size and p != self.db._lock_page
            and not self.journaled[p >> 3] & (1 << (p & 7))
        ]  # fmt: skip
        i = 0
        while i < len(wanted):
            j = i + 1
            while j < len(wanted) and wanted[j] == wanted[j - 1] + 1 and j - i < 256:
                j += 1
            run = os.pread(fd, (j - i) * ps, (wanted[i] - 1) * ps)
            for k, pgno in enumerate(wanted[i:j]):
                yield pgno, run[k * ps : (k + 1) * ps]
            i = j

    def _journal(self, originals: Iterator[tuple[int, bytes]] | list[tuple[int, bytes]]) -> None:
        chunk: list[bytes] = []
        for pgno, data in originals:
            self.journaled[pgno >> 3] |= 1 << (pgno & 7)
            cksum = journal_checksum(self.nonce, data)
            chunk += (pgno.to_bytes(4, "big"), data, cksum.to_bytes(4, "big"))
            self.records += 1
        if chunk:
            record = b"".join(chunk)
            self._pwrite(self.jfd, record, self.journal_end)
            self.journal_end += len(record)

    def _spill(self) -> None:
        """Move the held pages to the staging file (unnamed, next to the database)."""
        if self.stage is None:
            folder = os.path.dirname(self.db.path) or "."
            self.stage = tempfile.TemporaryFile(dir=folder)  # noqa: SIM115 (closed by _release)
        for pgno, data in self.held:
            self.stage.write(data)
            self.staged_pgnos.append(pgno)
        self.held, self.held_bytes = [], 0

    def _staged(self) -> Iterator[tuple[int, Page]]:
        assert self.stage is not None
        self.stage.seek(0)
        ps = self.db.page_size
        for i in range(0, len(self.staged_pgnos), 256):
            pgnos = self.staged_pgnos[i : i + 256]
            run = memoryview(self.stage.read(len(pgnos) * ps))
            yield from ((pgno, run[k * ps : (k + 1) * ps]) for k, pgno in enumerate(pgnos))

    def commit(self, db_size: int, counter: int) -> int:
        """Sync the journal, write the pages under EXCLUSIVE, delete the journal; the new
        change counter is returned once the batch is visible."""
        db, ps = self.db, self.db.page_size
        page1 = bytearray(self.new_page1 if self.new_page1 is not None else self.page1)
        page1[FORMAT_VERSIONS] = ROLLBACK_MODE
        page1[CHANGE_COUNTER] = page1[VALID_FOR] = counter.to_bytes(4, "big")
        page1[SIZE_IN_HEADER] = db_size.to_bytes(4, "big")
        try:
            os.fsync(self.jfd)
            _fsync_dir(db.journal)
            self._pwrite(self.jfd, JOURNAL_MAGIC + self.records.to_bytes(4, "big"), 0)
            os.fsync(self.jfd)
            db.lock_exclusive()
            self.writing = True
            if self.stage is not None:
                write_pages(db.fd, ps, self._staged())
            write_pages(db.fd, ps, [(1, memoryview(page1)), *self.held])
            os.ftruncate(db.fd, db_size * ps)
            os.fsync(db.fd)
            self._close_journal()
            os.unlink(db.journal)
        except BaseException:
            self.abandon()
            raise
        self._release()
        db.unlock()
        return counter

    def abandon(self) -> None:
        """Before the first database write: delete the journal.  After it: leave the journal
        hot and have SQLite roll it back, as it would after a crash."""
        self._release()
        created = self.jfd >= 0
        self._close_journal()
        if created and not self.writing:
            os.unlink(self.db.journal)
        self.db.unlock()
        if self.writing:
            roll_back(self.db.path)

    def _close_journal(self) -> None:
        if self.jfd >= 0:
            os.close(self.jfd)
            self.jfd = -1

    def _release(self) -> None:
        if self.stage is not None:
            self.stage.close()
            self.stage = None

    @staticmethod
    def _pwrite(fd: int, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            done = os.pwrite(fd, view, offset)
            view, offset = view[done:], offset + done


def _fsync_dir(path: str) -> None:
    """fsync the directory holding ``path``: a new file's name must be durable too."""
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
