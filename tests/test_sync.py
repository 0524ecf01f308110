"""Sync points: the moment a sync point states is the one its pinned state had."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path

import apsw

import walsync_vfs
from walsync_vfs import capture, format, sync
from walsync_vfs.capture import Kind, Record
from walsync_vfs.lineage import Head, Lineage, decide


def test_a_commit_right_after_a_sync_point_keeps_its_own_time(tmp_path: Path) -> None:
    """A commit made as soon as a sync point lets writers go on is stamped after the sync
    point's time, and a commit in the pinned state before it.  Otherwise the lineage, which
    never lets a commit's time go below the state it continues, records the commit later than
    it was made, and a restore to the moment the application saw it commit leaves it out."""
    path = tmp_path / "db"
    records: list[Record] = []
    capture.dispatcher().route_path(str(path), lambda batch: records.extend(batch))
    con = apsw.Connection(str(path), vfs="walsync")
    try:
        con.execute("PRAGMA journal_mode=WAL").fetchall()
        con.execute("CREATE TABLE t(x)")
        with capture.SyncPoint(str(path)):
            pass  # the shim publishes commits once a sync point has found its WAL position
        con.execute("INSERT INTO t VALUES(1)")
        returned: list[int] = []

        def commit_meanwhile() -> Future[Head]:
            # Called once the sync point is taken and its write lock released, before the
            # pages are read: a writer's commit can land right here.
            con.execute("INSERT INTO t VALUES(2)")
            returned.append(time.time_ns())
            head: Future[Head] = Future()
            head.set_result(Head())
            return head

        with tempfile.TemporaryFile() as raw:
            pinned = sync.pin(
                str(path), raw, None, commit_meanwhile, lambda seq: None, lambda s, h: h
            )
        capture.dispatcher().barrier()
    finally:
        con.close()
        capture.dispatcher().route_path(str(path), None)
    commits = [r for r in records if r.kind is Kind.COMMIT]
    before = [r for r in commits if r.seq <= pinned.seq]
    after = [r for r in commits if r.seq > pinned.seq]
    assert before and len(after) == 1
    assert all(r.time_ns <= pinned.taken_ns for r in before)

    lineage = Lineage()
    decision = decide(Head(), pinned.checksum, pinned.page_size, [])
    lineage.restart(
        decision, pinned.page_size, pinned.checksum, pinned.seq, pinned.wal, pinned.taken_ns
    )
    commit = lineage.extend(after[0])
    assert commit.time_ns == after[0].time_ns <= returned[0]


def test_commits_recovered_from_the_wal_are_not_dated_after_the_sync_point(
    tmp_path: Path,
) -> None:
    """Commits a crash left in the WAL get its modification time, but no later than the sync
    point that pinned them: the application goes on writing while the pages are read, and a
    later write must not date them -- and through them every commit after the sync point --
    after commits made meanwhile."""
    path = tmp_path / "db"
    capture.dispatcher().route_path(str(path), lambda batch: None)
    con = apsw.Connection(str(path), vfs="walsync")
    try:
        con.execute("PRAGMA journal_mode=WAL").fetchall()
        con.execute("CREATE TABLE t(x); INSERT INTO t VALUES(1)")
        with capture.SyncPoint(str(path)) as sp:  # the replica's last state
            page_size, _, pages = sp.pages()
            stored = format.DbChecksum.from_pages(pages)
            wal = format.WalPos(*sp.salts, sp.nframe)
        head = Head("g", 2, page_size, stored.db_size, stored.value, 1, wal)
        con.execute("INSERT INTO t VALUES(2)")  # never shipped: left in the WAL
        con.execute("INSERT INTO t VALUES(3)")
        wrote_after: list[int] = []

        def head_at(seq: int, _: Head | None) -> Head:
            # The WAL is written after the sync point, past the file system's timestamp
            # granularity, before the recovered commits are dated.
            time.sleep(0.02)
            wrote_after.append(time.time_ns())
            con.execute("INSERT INTO t VALUES(4)")
            return head

        with tempfile.TemporaryFile() as raw:
            pinned = sync.pin(str(path), raw, None, None, lambda seq: None, head_at)
    finally:
        con.close()
        capture.dispatcher().route_path(str(path), None)
    assert [c.txid for c in pinned.survivors] == [3, 4]
    assert all(c.time_ns <= pinned.taken_ns < wrote_after[0] for c in pinned.survivors)


def test_a_writer_flat_out_after_a_gap_keeps_its_restore_points(file_replica, tmp_path):
    """A process without the shim truncates the WAL, so this process's next commit reveals a
    gap and a resync.  Its sync point needs the WAL write lock for a moment; a writer
    committing flat out (no busy timeout) lets it in at once instead of holding it off through
    the whole burst, whose commits would all end up inside the sync point's snapshot."""
    from foreign import write_foreign

    path = tmp_path / "db"
    con = apsw.Connection(str(path), vfs="walsync")
    con.execute("CREATE TABLE t(x)")
    walsync_vfs.flush(timeout=30)
    write_foreign(path, "INSERT INTO t VALUES(0)")
    commits = 3000
    for i in range(commits):  # no busy timeout: the sync point must never make one fail
        con.execute("INSERT INTO t VALUES(?)", (i,))
    walsync_vfs.flush(timeout=30)
    (state,) = [s for s in walsync_vfs.stats() if s["path"] == str(path)]
    # the schema, the foreign commit (in the sync point's snapshot), and the burst
    assert state["replicated_txid"] >= 1 + commits - 10
    con.close()


FOREIGN_COMMITS = """
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
for i in range(int(sys.argv[2])):
    c.execute("INSERT INTO t VALUES(?)", (i,))
c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
"""


def test_commits_a_foreign_truncate_erased_unread_are_counted_lost(file_replica, tmp_path):
    """A process without the shim commits and truncates the WAL before the leader reads its
    commits (or after it read some): each of them keeps its own restore point or is counted
    in lost_restore_points, by SQLite's commit counter, never silently gone."""
    path = tmp_path / "db"
    con = apsw.Connection(str(path), vfs="walsync")
    con.execute("CREATE TABLE t(x)")
    walsync_vfs.flush(timeout=30)
    foreign = 20
    subprocess.run([sys.executable, "-c", FOREIGN_COMMITS, str(path), str(foreign)], check=True)
    con.execute("INSERT INTO t VALUES(-1)")  # reveals what happened to the WAL
    walsync_vfs.flush(timeout=30)
    (state,) = [s for s in walsync_vfs.stats() if s["path"] == str(path)]
    lost = state["lost_restore_points"]
    # txids: the schema, the foreign commits read, the resync's one commit if any were lost,
    # then this process's commit
    kept = state["replicated_txid"] - 1 - (1 if lost else 0) - 1
    assert kept + lost == foreign
    con.close()
