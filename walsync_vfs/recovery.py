"""Commits a crash left in the WAL: taken back into the lineage when they provably continue it.

After a crash, commits that never reached the store may still be in the database's WAL.  If
they lead from the replica's last state to the database's current bytes, they are shipped as
commits of the same generation; when not, they are folded into a new snapshot: nothing is
lost, only their individual restore points.

Their frames are copied, while the sync point pins the WAL, into a nameless temporary file,
and their pages are read back from it when they are hashed and encoded
(:class:`capture.SpooledPages`, as the shim does for a giant commit), so memory does not grow
with them: what is kept per page is its number and frame, in arrays.  The copy outlives the
sync point, which must not be held while they upload.
"""

from __future__ import annotations

import logging
import os
import tempfile
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from walsync_vfs import capture, format
from walsync_vfs.lineage import Head, holds

log = logging.getLogger("walsync_vfs")

COPY_BUFFER = 1 << 20  # bytes of frames written to the copy at a time
FRAME_HEADER = 24


class Unrecoverable(Exception):
    """Why commits after the replica's last one cannot be taken from the WAL."""


def survivors(
    path: str,
    sp: capture.SyncPoint,
    head: Head,
    now: format.DbChecksum,
    page_size: int,
    taken_ns: int,
) -> list[format.Commit]:
    """After a restart, the commits the replica never got that are still in the WAL (see
    :func:`wal_survivors`); [] when the database matches the replica or they cannot be
    proven to continue it.  Their commit time is the WAL file's modification time (the last
    write to it, so not before any of them), or the sync point's time ``taken_ns`` if that is
    earlier (they are in the state it pinned; writers went on meanwhile), or the replica's
    last commit time if that is later: a point-in-time restore never includes a commit made
    after its time, and the lineage never dates commits made after the sync point later."""
    if head.generation is None or holds(head, now, page_size):
        return []
    try:
        written = os.stat(path + "-wal").st_mtime_ns  # stat opens no descriptor
        time_ns = max(head.time_ns, min(written, taken_ns))
        return wal_survivors(sp, head, now, time_ns)
    except (Unrecoverable, OSError) as exc:
        log.info(
            "walsync: %s: commits after txid %d are not recoverable from the WAL: %s",
            path,
            head.txid,
            exc,
        )
        return []


@dataclass
class _Extent:
    """One commit's frames in the copy: their page numbers in WAL order, from ``first`` on."""

    first: int
    pgnos: array[int]
    db_size: int
    wal: format.WalPos


def wal_survivors(
    sp: capture.SyncPoint, head: Head, now: format.DbChecksum, time_ns: int
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
    later commit's exact state; the last must be the pinned state.  A head with no WAL
    position (a snapshot's) is looked for at every commit frame from the db file on: the
    last state equal to it is where the replica ends.
    """
    if head.checksum is None or head.page_size != sp.wal_page_size:
        raise Unrecoverable("the WAL is empty or has another page size")
    pos = head.wal
    same_wal = pos is not None and (pos.salt1, pos.salt2) == sp.salts
    start = pos.end if pos is not None and same_wal else 0
    how = "same WAL" if same_wal else "from the start" if pos is not None else "searched"
    where = f"WAL frames {start}..{sp.nframe} ({how})"
    if not start < sp.nframe:
        raise Unrecoverable(f"no {where}")
    try:
        size = head.db_size if same_wal else _db_file_size(sp)
        with tempfile.TemporaryFile(buffering=COPY_BUFFER) as copy:
            extents, touched = _copy_frames(sp, start, size, copy)
            copy.flush()
            fd = os.dup(copy.fileno())
        # Owns the copy's descriptor, closed once every commit's pages are gone.
        owner = capture.SpooledPages(fd, head.page_size, array("I"), array("I"))
        cut_off = max(0, size - now.db_size)  # pages cut off since: all needed
        touched[len(touched) - cut_off :] = b"\x01" * cut_off
        state = now.copy()
        state.apply(size, sp.pages_as_of(start, _marked(touched)))
        ends = [(state.value, state.db_size)]  # the state at start, then after each commit
        replayed = []
        for extent in extents:
            pgnos, frames = _newest(extent.pgnos, extent.first, extent.db_size)
            pages = capture.SpooledPages(fd, head.page_size, pgnos, frames, owner)
            state.apply(extent.db_size, pages)
            replayed.append((extent, pages, state.value))
            ends.append((state.value, state.db_size))
    except (capture.CaptureError, ValueError) as exc:  # e.g. the db file no longer has a page
        raise Unrecoverable(f"{where}: {exc}") from exc
    found = [i for i, end in enumerate(ends) if end == (head.checksum, head.db_size)]
    if pos is not None:
        found = found[:1] if found and found[0] == 0 else []
    if not found:
        raise Unrecoverable(f"what precedes {where} is not the replica's last state")
    if ends[-1] != (now.value, now.db_size):
        raise Unrecoverable(f"replaying {where} does not give the database's state")
    return [
        format.Commit(txid, time_ns, extent.db_size, value, pages, extent.wal)
        for txid, (extent, pages, value) in enumerate(replayed[found[-1] :], head.txid + 1)
    ]


def _db_file_size(sp: capture.SyncPoint) -> int:
    """Pages of the database in its file alone, before WAL frame 0 (its header's count)."""
    try:
        ((_, page1),) = sp.pages_as_of(0, [1])
    except capture.CaptureError:
        return 0  # an empty file: every page is in the WAL
    return int.from_bytes(page1[28:32], "big") if page1[92:96] == page1[24:28] else 0


def _copy_frames(
    sp: capture.SyncPoint, start: int, db_size: int, copy: IO[bytes]
) -> tuple[list[_Extent], bytearray]:
    """Write WAL frames ``[start, sp.nframe)`` to ``copy`` in the WAL's frame layout (their
    headers zeroed: nothing reads them); the commits they make up, and a map of the pages
    up to ``db_size`` they touch (byte ``pgno`` set)."""
    header = bytes(FRAME_HEADER)
    touched = bytearray(db_size + 1)
    extents: list[_Extent] = []
    pgnos: array[int] = array("I")
    first = written = 0
    last = None  # the latest commit frame
    for i, frame in enumerate(sp.frames(start), start + 1):
        pgno, commit_size, page = frame
        if not pgnos and frame == last:
            # Without powersafe overwrite, synchronous=FULL pads a commit to a sector
            # boundary with copies of its commit frame: part of that commit, as the shim
            # publishes it (a real transaction like this would change nothing anyway).
            extents[-1].wal = format.WalPos(*sp.salts, i)
            continue
        copy.write(header)
        copy.write(page)
        written += 1
        pgnos.append(pgno)
        if pgno <= db_size:
            touched[pgno] = 1
        if commit_size:  # a commit frame: the transaction's pages are complete
            extents.append(_Extent(first, pgnos, commit_size, format.WalPos(*sp.salts, i)))
            pgnos, first, last = array("I"), written, frame
    return extents, touched


def _marked(touched: bytearray) -> Iterator[int]:
    """The page numbers set in a map of pages, in order."""
    pgno = touched.find(1)
    while pgno >= 0:
        yield pgno
        pgno = touched.find(1, pgno + 1)


def _newest(pgnos: array[int], first: int, db_size: int) -> tuple[array[int], array[int]]:
    """A commit's pages, from the page numbers of its frames in WAL order (the first in copy
    frame ``first``): its page numbers up to ``db_size``, ascending, and the copy frame of
    each one's last version."""
    frames = array("I", range(first, first + len(pgnos)))
    # SQLite writes a commit's pages in order, each once, unless its cache spilled meanwhile.
    if all(a < b for a, b in zip(pgnos, pgnos[1:], strict=False)) and (
        not pgnos or pgnos[-1] <= db_size
    ):
        return pgnos, frames
    # Page number and frame in one integer: sorted, the last of each page number is newest.
    ordered = sorted((pgno << 32) | frame for pgno, frame in zip(pgnos, frames, strict=True))
    kept_pgnos, kept_frames = array("I"), array("I")
    for n, key in enumerate(ordered):
        pgno = key >> 32
        if pgno <= db_size and (n + 1 == len(ordered) or ordered[n + 1] >> 32 != pgno):
            kept_pgnos.append(pgno)
            kept_frames.append(key & 0xFFFFFFFF)
    return kept_pgnos, kept_frames
