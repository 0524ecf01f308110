"""Segments on their way to the store: in memory, or spilled to a local spool directory.

While the store is unreachable, commits keep arriving.  Up to a memory cap they wait as
encoded segments in memory; past it they are written to the spool directory, up to its own
cap.  If the spool is full or cannot be written (disk full), the engine drops the unsent
segments of that database and starts a new generation from a snapshot once the store is
back: the database file still holds every commit, only their individual restore points are
lost.  Nothing is ever silently missing from a generation.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import mmap
import os
import shutil
import tempfile
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from walsync_vfs.config import Settings


def completes(part: tuple[int, int] | None) -> bool:
    """Whether storing a segment, whole (None) or part (index, count) of a commit, completes
    its last commit (FORMAT.md §4.5)."""
    return part is None or part[0] + 1 == part[1]


PRIVATE_PREFIX = "walsync-spool-"  # then the process id: see Spool.directory
OWNER = ".owner"  # in a private spool directory, locked by its process while it runs


class SpoolFull(OSError):
    """The spool would exceed its cap."""


@dataclass(eq=False)
class Outgoing:
    """One encoded segment waiting for its PUT."""

    key: str
    generation: str
    last_seq: int
    first_txid: int
    last_txid: int
    raw_bytes: int  # page bytes it carries (compaction only merges small segments)
    data: bytes | memoryview | None  # None once spilled or uploaded
    sha256: str | None = None  # of its bytes, if known: kept when spilled, checked by an S3 PUT
    path: str | None = None
    discarded: bool = False  # shipped or dropped: a spill still under way must not keep it
    part: tuple[int, int] | None = None  # (index, count): one part of a commit (FORMAT.md §4.5)
    time_ns: int = 0  # its first commit's time: how long the oldest unsent commit has waited

    @property
    def commits(self) -> int:
        """The commits it holds (a part: its commit's, counted at the last part)."""
        return 1 if self.part else self.last_txid - self.first_txid + 1

    @property
    def complete(self) -> bool:
        """Whether storing it completes its last commit (not an earlier part of it)."""
        return completes(self.part)

    def payload(self) -> bytes | memoryview:
        """Its bytes; a spilled segment's as a read-only mapping of its file: read into the
        heap, a multi-MiB buffer would stay in the malloc arenas once freed (see
        format.segment._encoded)."""
        if self.data is not None:
            return self.data
        with open(self.path, "rb") as f:  # type: ignore[arg-type]
            return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))

    @property
    def memory(self) -> int:
        return len(self.data) if self.data is not None else 0


class Spool:
    """A directory of spilled segments with a byte cap (shared by all databases).

    Reads ``settings.spool_dir`` and ``settings.spool_cap`` at each spill, so configure()
    applies to the next one.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.used = 0
        self._private_dir: str | None = None
        self._owner: int | None = None  # the descriptor whose lock says the directory is used
        self._lock = threading.Lock()

    def spill(self, item: Outgoing) -> None:
        """Move ``item``'s bytes to disk; raises :class:`SpoolFull` or the OSError of the write."""
        data = item.data  # once: a put thread may let go of it meanwhile
        if data is None:
            return
        path = self.store(data, ".wseg")
        del data
        with self._lock:
            if not item.discarded:
                item.path, item.data = path, None
                return
        self.remove(path)  # it shipped from memory while being written

    def store(self, data: bytes | memoryview, suffix: str) -> str:
        """Write ``data`` to a new spool file, counted against the cap until :meth:`remove`;
        raises :class:`SpoolFull` or the OSError of the write."""
        size = len(data)
        directory = self.directory()
        self._charge(size)
        path = None
        try:
            fd, path = tempfile.mkstemp(dir=directory, suffix=suffix)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except OSError:
            # A write that fails (ENOSPC) leaves a half-written file: never keep it, or it
            # would hold the very space the next spill needs.
            self._remove(path, size)
            raise
        return path

    def count(self, size: int, owner: object) -> None:
        """Count ``size`` bytes of a file the spool directory holds for ``owner`` (a giant
        commit's frames, copied there by the shim) against the cap until ``owner`` is gone;
        raises :class:`SpoolFull`, and then the caller lets go of ``owner`` and its file."""
        self._charge(size)
        weakref.finalize(owner, self._credit, size)

    def _charge(self, size: int) -> None:
        """Count ``size`` more bytes against the cap, or raise :class:`SpoolFull`."""
        with self._lock:
            cap = self.settings.spool_cap
            if self.used + size > cap:
                raise SpoolFull(f"spool cap of {cap} bytes reached")
            self.used += size

    def _credit(self, size: int) -> None:
        with self._lock:
            self.used -= size

    def remove(self, path: str) -> None:
        """Delete a file of :meth:`store` and give its bytes back to the cap."""
        try:
            size = os.path.getsize(path)
        except OSError:
            return  # removed already: nothing of it is counted any more
        self._remove(path, size)

    def directory(self) -> str:
        """``settings.spool_dir``, or a private temporary directory made on first use."""
        if self.settings.spool_dir is not None:
            return self.settings.spool_dir
        with self._lock:
            if self._private_dir is None:
                _remove_dead_ones()
                self._private_dir, self._owner = _private_directory()
                # Made by every process now (local copies live in it), and useless to any other.
                atexit.register(_remove_own, self._private_dir, os.getpid())
            return self._private_dir

    def discard(self, item: Outgoing) -> None:
        """Forget a shipped or dropped segment's spool file (or the one being written)."""
        with self._lock:
            item.discarded = True
            path, item.path = item.path, None
        if path is not None:
            self.remove(path)

    def _remove(self, path: str | None, size: int) -> None:
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        self._credit(size)


def _private_directory() -> tuple[str, int]:
    """A new private spool directory, and the descriptor whose lock on its owner file lasts
    as long as this process (see _remove_dead_ones).  Made and locked under a name the sweep
    passes over, then renamed: no sweep ever finds it unlocked."""
    staging = tempfile.mkdtemp(prefix=f".{PRIVATE_PREFIX}")
    fd = os.open(os.path.join(staging, OWNER), os.O_CREAT | os.O_RDONLY | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    where, name = os.path.split(staging)
    unique = name.removeprefix("." + PRIVATE_PREFIX)
    path = os.path.join(where, f"{PRIVATE_PREFIX}{os.getpid()}-{unique}")
    os.rename(staging, path)
    return path, fd


def _remove_own(path: str, pid: int) -> None:
    """At exit: the process's own directory only (a forked child runs its parent's atexit
    functions too, and must not remove the directory its parent still uses)."""
    if os.getpid() == pid:
        shutil.rmtree(path, ignore_errors=True)


def _remove_dead_ones() -> None:
    """Remove the private spool directories of processes that have ended: one killed never
    ran its atexit, and nothing else would ever remove its directory.  Its owner file's lock
    went with it (a process id could be another's, or in another pid namespace)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(tempfile.gettempdir()):
            if entry.name.startswith(PRIVATE_PREFIX) and _ended(entry.path):
                shutil.rmtree(entry.path, ignore_errors=True)


def _ended(path: str) -> bool:
    try:
        fd = os.open(os.path.join(path, OWNER), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False  # another user's, or just being made
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True
