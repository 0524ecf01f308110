"""Commits a crash left in the WAL: taken back into the lineage when they provably continue it.

After a crash, commits that never reached the store may still be in the database's WAL.  If
they lead from the replica's last state to the database's current bytes, they are shipped as
commits of the same generation; when not, they are folded into a new snapshot: nothing is
lost, only their individual restore points.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from walsync_vfs import capture, format
from walsync_vfs.lineage import Head, holds

log = logging.getLogger("walsync_vfs")


class Unrecoverable(Exception):
    """Why commits after the replica's last one cannot be taken from the WAL."""


def survivors(
    path: str,
    sp: capture.SyncPoint,
    head: Head,
    now: format.DbChecksum,
    page_size: int,
    cap: int,
) -> list[format.Commit]:
    """After a restart, the commits the replica never got that are still in the WAL (see
    :func:`wal_survivors`); [] when the database matches the replica or they cannot be
    proven to continue it.  Their commit time is the WAL file's modification time (the last
    write to it, so not before any of them), or the replica's last commit time if that is
    later: a point-in-time restore never includes a commit made after its time."""
    if head.generation is None or holds(head, now, page_size):
        return []
    try:
        written = os.stat(path + "-wal").st_mtime_ns  # stat opens no descriptor
        time_ns = max(head.time_ns, written)
        return wal_survivors(sp, head, now, time_ns, cap)
    except (Unrecoverable, OSError) as exc:
        log.info(
            "walsync: %s: commits after txid %d are not recoverable from the WAL: %s",
            path,
            head.txid,
            exc,
        )
        return []


def wal_survivors(
    sp: capture.SyncPoint, head: Head, now: format.DbChecksum, time_ns: int, cap: int
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
    later commit's exact state; the last must be the pinned state.  At most ``cap`` bytes of
    frames are read: beyond that a new generation is cheaper than holding them.
    """
    if head.checksum is None or head.page_size != sp.wal_page_size:
        raise Unrecoverable("the WAL is empty or has another page size")
    pos = head.wal
    same_wal = pos is not None and (pos.salt1, pos.salt2) == sp.salts
    start = pos.end if pos is not None and same_wal else 0
    where = f"WAL frames {start}..{sp.nframe} ({'same WAL' if same_wal else 'from the start'})"
    if not start < sp.nframe:
        raise Unrecoverable(f"no {where}")
    if (sp.nframe - start) * head.page_size > cap:
        raise Unrecoverable(f"{where} exceed memory_cap")
    commits: list[format.Commit] = []
    try:
        frames = list(sp.frames(start))
        touched = {pgno for pgno, _, _ in frames if pgno <= head.db_size}
        touched.update(range(now.db_size + 1, head.db_size + 1))  # cut off since: all needed
        state = now.copy()
        state.apply(head.db_size, sp.pages_as_of(start, sorted(touched)))
        if state.value != head.checksum:
            raise Unrecoverable(f"what precedes {where} is not the replica's last state")
        pages: dict[int, bytes] = {}
        last = None  # the latest commit frame
        for i, frame in enumerate(frames, start + 1):
            pgno, commit_size, page = frame
            wal = format.WalPos(*sp.salts, i)
            if not pages and frame == last:
                # Without powersafe overwrite, synchronous=FULL pads a commit to a sector
                # boundary with copies of its commit frame: part of that commit, as the shim
                # publishes it (a real transaction like this would change nothing anyway).
                commits[-1] = dataclasses.replace(commits[-1], wal=wal)
                continue
            pages[pgno] = page
            if commit_size:  # a commit frame: the transaction's pages are complete
                kept = tuple(sorted((p, d) for p, d in pages.items() if p <= commit_size))
                state.apply(commit_size, kept)
                txid = head.txid + len(commits) + 1
                commits.append(format.Commit(txid, time_ns, commit_size, state.value, kept, wal))
                pages, last = {}, frame
    except (capture.CaptureError, ValueError) as exc:  # e.g. the db file no longer has a page
        raise Unrecoverable(f"{where}: {exc}") from exc
    if state.value != now.value or state.db_size != now.db_size:
        raise Unrecoverable(f"replaying {where} does not give the database's state")
    return commits
