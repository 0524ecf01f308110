"""Local copies of the small segments each database uploaded since its last compaction.

Compaction merges every run of ``compact_segments`` small segments of a generation.  Reading
them back from the store cost a GET each -- with many databases in one process, more CPU than
the merge itself -- although this process uploaded those very bytes moments before.  So each
upload of a small segment also appends its bytes to one file per database and run, on disk
rather than in memory (each of many databases holds a run of segments), and compaction
reads them from there.

Best effort, never a reason for an upload to fail: a copy that cannot be written (disk full,
directory gone) is simply not kept, and compaction GETs that segment.  Compaction validates a
copy like any object read from the store and GETs the segment if it is damaged.

Up to ``max_open`` run files stay open between copies (least recently used closed first):
opening and closing a file per copy costs three system calls, each of which hands the GIL to
the application's threads and waits to get it back: in a busy application, far more than the
copy itself.  The cap is a small share of the descriptor limit, so many databases never hold
the descriptors the application may need.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import resource
import shutil
import tempfile
import threading
import time
from array import array
from collections import OrderedDict

from walsync_vfs import format
from walsync_vfs.spool import Spool

log = logging.getLogger("walsync_vfs")

DIR_PREFIX = "recent-"  # the copies' directory inside the spool directory: mkdtemp(prefix=...)


def _max_open() -> int:
    """Run files kept open: 1/8 of the soft descriptor limit, at most 256 (128 at the usual
    limit of 1024, enough for every run of 100 busy databases)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 256 if soft == resource.RLIM_INFINITY else max(0, min(256, soft // 8))


class Run:
    """Copies of one database's consecutive small segments of one generation and lease
    epoch: one file, written in upload order and dropped as a whole.  Small: one per
    replicating database."""

    __slots__ = ("copies", "dropped", "epoch", "file", "generation", "name", "started")

    def __init__(self, file: str, name: str, generation: str, epoch: int = 0) -> None:
        self.file = file  # name inside the copies directory
        self.name = name
        self.generation = generation
        self.epoch = epoch
        self.started = time.monotonic()  # before any of its segments could have been deleted
        self.copies = array("Q")  # first_txid, last_txid, offset, length per copy kept
        self.dropped = False


class RecentCopies:
    """The runs' files, in a private subdirectory of the spool directory made on first use."""

    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        self._dir: str | None = None
        self._names = itertools.count()
        self._lock = threading.Lock()  # file writes against drops: no file outlives its run
        self._closed = False  # after close() (exit), copies are neither kept nor read
        self._open: OrderedDict[str, int] = OrderedDict()  # run file -> descriptor, LRU first
        self.max_open = _max_open()

    def new_run(self, key: format.ParsedKey) -> Run:
        """A run for segments of ``key``'s database and generation (no file until a copy)."""
        return Run(str(next(self._names)), key.name, key.generation, key.epoch)

    def keep(self, run: Run, key: format.ParsedKey, data: bytes | memoryview) -> None:
        """Append a copy of an uploaded segment to its run's file, if the disk allows."""
        if (key.name, key.generation, key.epoch) != (run.name, run.generation, run.epoch):
            return  # read() files copies under the run's own name and generation
        with self._lock:
            if run.dropped or self._closed:
                return
            offset = run.copies[-2] + run.copies[-1] if run.copies else 0
            try:
                if self._dir is None:
                    self._dir = tempfile.mkdtemp(prefix=DIR_PREFIX, dir=self._spool.directory())
                    atexit.register(self.close)  # nothing else would remove it
                # At the run's own end, not O_APPEND: a short write (disk full) is simply
                # overwritten by the next copy.
                fd = self._descriptor(run)
                try:
                    written = os.pwrite(fd, data, offset)
                finally:
                    if run.file not in self._open:
                        os.close(fd)
            except OSError as exc:
                log.debug("walsync: no local copy of %s segment: %s", run.name, exc)
                return
            if written == len(data):
                run.copies.extend((key.first_txid, key.last_txid, offset, written))

    def read(self, run: Run | None) -> dict[str, bytes]:
        """Every copy the run kept, by object key ({} if its file cannot be read)."""
        with self._lock:
            if run is None or run.dropped or self._closed or not run.copies:
                return {}
            try:
                with open(self._path(run), "rb") as f:
                    data = f.read()
            except OSError as exc:
                log.debug("walsync: local copies of %s unreadable: %s", run.name, exc)
                return {}
            quads = run.copies[:]  # a late keep() may still append to it
        return {
            format.segment_key(run.name, run.generation, first, last, run.epoch): data[
                at : at + size
            ]
            for first, last, at, size in zip(*(quads[i::4] for i in range(4)), strict=True)
        }

    def drop(self, run: Run | None) -> None:
        """Remove a run's file: compacted, or its segments are no longer to be merged."""
        if run is None:
            return
        with self._lock:
            run.dropped = True
            self._close(run.file)
            if self._dir is not None:
                with contextlib.suppress(OSError):
                    os.remove(self._path(run))

    def close(self) -> None:
        """Remove every run's file (the engine is stopping, or the process exiting).  A
        maintenance thread still running then compacts from the store, if at all."""
        with self._lock:
            self._closed = True
            while self._open:
                os.close(self._open.popitem()[1])
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None

    def _descriptor(self, run: Run) -> int:
        """The run file's descriptor, open for writing, kept open if the cap allows (lock
        held; the caller closes one that was not kept)."""
        fd = self._open.pop(run.file, None)
        if fd is None:
            fd = os.open(self._path(run), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            if self.max_open and len(self._open) >= self.max_open:
                os.close(self._open.popitem(last=False)[1])
        if self.max_open:
            self._open[run.file] = fd
        return fd

    def _close(self, file: str) -> None:
        fd = self._open.pop(file, None)
        if fd is not None:
            os.close(fd)

    def _path(self, run: Run) -> str:
        assert self._dir is not None
        return os.path.join(self._dir, run.file)
