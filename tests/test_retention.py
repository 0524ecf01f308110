"""Issue: periodic snapshots, compaction and retention never break a restore in the window."""

from __future__ import annotations

import hashlib
import time

import apsw
import pytest
from foreign import wait_until_forgotten, write_while_closed

import walsync_vfs
from walsync_vfs import catalog, compactor, format, report, storage
from walsync_vfs.restore import RestoreError, restore, restore_from
from walsync_vfs.storage.file import FileReplicaClient

RETENTION = 2.0


@pytest.fixture
def replica(file_url):
    walsync_vfs.configure(
        replica=file_url,
        upload_interval=0.0,
        snapshot_interval=0.7,
        retention=RETENTION,
        compact_segments=4,
    )
    yield file_url
    walsync_vfs.flush(timeout=30)
    walsync_vfs.configure(
        replica="",
        upload_interval=1.0,
        snapshot_interval=86400.0,
        retention=86400.0,
        compact_segments=32,
    )


def digest(con: apsw.Connection) -> str:
    return hashlib.sha256(
        repr(con.execute("SELECT * FROM t ORDER BY rowid").fetchall()).encode()
    ).hexdigest()


def test_restore_points_inside_the_window_survive_maintenance(replica, tmp_path):
    """Writes for 6 s, a foreign writer restarting the WAL while the database is closed (a new
    generation at its reopen) 1 s before the end, so the last retention passes (one a second)
    run with a window reaching back into the old generation: what they keep must restore every
    point of the window on both sides of the boundary (compare Litestream #1084, PITR failing
    once retention was enforced)."""
    path = tmp_path / "kept.db"
    con = apsw.Connection(str(path), vfs="walsync")
    con.execute("CREATE TABLE t(x)")
    log: list[tuple[float, int, str | None]] = []  # (time, generation 0/1, digest)
    end = time.time() + 6.0
    generation = 0
    while time.time() < end:
        con.execute("INSERT INTO t VALUES(randomblob(200))")
        log.append((time.time(), generation, digest(con)))
        if not generation and time.time() > end - 1.0:
            con.close()
            write_while_closed(path, "INSERT INTO t VALUES(0)")
            generation = 1
            log.append((time.time(), generation, None))  # not one of our commits
            con = apsw.Connection(str(path), vfs="walsync")
        time.sleep(0.03)
    walsync_vfs.flush(timeout=30)  # maintenance ran meanwhile, once a second
    con.close()
    # Once closed and forgotten, the database gets no more retention passes: what is checked
    # below is what the last one left, and the window is measured from after it.
    wait_until_forgotten(str(path))
    now = time.time()

    client = storage.open_replica(replica)
    gens = catalog.generations(client, "kept.db")
    assert len(gens) == 2, "the old generation is still inside the window: it must be kept"
    assert gens[0].first_txid > 1, "retention removed nothing"
    assert any(s.last_txid - s.first_txid >= 3 for g in gens for s in g.segments), "no compaction"
    assert sum(len(g.snapshots) for g in gens) >= 2, "no periodic snapshot"

    # The new generation's points start at its snapshot, taken at the reopen (FORMAT.md §1).
    snap = catalog.object_key(gens[1].snapshots[0])
    started = format.read_snapshot(client.get(snap), snap)[0].time_ns / 1e9
    in_window = [
        (t, gen, h)
        for t, gen, h in log
        if t >= now - RETENTION + 0.3 and h is not None and (gen == 0 or t >= started)
    ]
    for gen in (0, 1):
        points = [(t, h) for t, g, h in in_window if g == gen]
        assert len(points) >= 5, f"too few restore points in generation {gen}: timing too tight"
        for n, (t, want) in enumerate(points[:: max(1, len(points) // 5)]):
            out = tmp_path / f"g{gen}-{n}.db"
            restore(f"{replica}/kept.db", str(out), timestamp_ns=int((t + 0.001) * 1e9))
            got = apsw.Connection(str(out))
            assert got.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            assert digest(got) == want
            got.close()
    # Nothing outside the window is promised; what is gone is refused by name.
    first = gens[0].snapshots[0].last_txid
    last = gens[-1].last_txid
    with pytest.raises(RestoreError) as err:
        restore(f"{replica}/kept.db", str(tmp_path / "old.db"), txid=2)
    assert str(err.value) == (
        f"kept.db: txid 2 is not in the retained history (available: txids {first}..{last})"
    )


class CompactedAfterListing(FileReplicaClient):
    """The real file store, where a real compaction of a database's segments runs right after
    the first listing that shows them: the race of a restore with a live replica's engine,
    made certain instead of rare."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.compacted = False

    def list(self, prefix: str) -> list[storage.ObjectInfo]:
        listing = super().list(prefix)
        segments = [k for o in listing if (k := format.parse_key(o.key)) and k.kind == "segment"]
        if not self.compacted and len(segments) > 1:
            self.compacted = True
            ordered = sorted(segments, key=lambda k: k.first_txid)
            puts, doomed = compactor.merge_plan(self, ordered, 1 << 30)
            for key, data in puts:  # the merged segments first, as the engine does
                self.put(key, data)
            self.delete(doomed)
        return listing


def test_restore_plans_again_when_listed_segments_are_compacted_away(replica, tmp_path):
    """A segment listed and then deleted by compaction before its GET makes restore plan
    again from a fresh listing (which has the merged segment), not fail."""
    path = tmp_path / "live.db"
    con = apsw.Connection(str(path), vfs="walsync")
    con.execute("CREATE TABLE t(x)")
    for _ in range(3):  # three segments: each flush ships what is pending
        con.execute("INSERT INTO t VALUES(randomblob(200))")
        walsync_vfs.flush(timeout=30)
    client = CompactedAfterListing(replica.removeprefix("file://"))
    out = tmp_path / "r.db"
    restore_from(client, "live.db", str(out))
    assert client.compacted
    check = apsw.Connection(str(out))
    assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert digest(check) == digest(con)
    check.close()
    con.close()


def test_verify_reads_again_when_listed_segments_are_compacted_away(replica, tmp_path):
    """verify of a live replica: segments compaction replaced after the listing are not
    reported missing (a scheduled verify would fail at random); the merged ones are
    verified from a fresh listing."""
    path = tmp_path / "live.db"
    con = apsw.Connection(str(path), vfs="walsync")
    con.execute("CREATE TABLE t(x)")
    for _ in range(3):
        con.execute("INSERT INTO t VALUES(randomblob(200))")
        walsync_vfs.flush(timeout=30)
    client = CompactedAfterListing(replica.removeprefix("file://"))
    assert report.verify(client, "live.db").problems == []
    assert client.compacted
    con.close()


def test_flush_waits_for_the_segments_a_periodic_snapshot_came_after(file_url, tmp_path):
    """Snapshots more often than uploads: a snapshot holds the state, not the restore points
    of the commits queued before it, so flush() waits for their segments."""
    walsync_vfs.configure(replica=file_url, upload_interval=5.0, snapshot_interval=0.3)
    try:
        con = apsw.Connection(str(tmp_path / "often.db"), vfs="walsync")
        con.execute("CREATE TABLE t(x)")
        walsync_vfs.flush(timeout=30)
        txid = next(s for s in walsync_vfs.stats() if s["name"] == "often.db")["last_txid"]
        states = {}
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            con.execute("INSERT INTO t VALUES(randomblob(100))")
            txid += 1
            states[txid] = digest(con)
            time.sleep(0.02)
        deadline = time.monotonic() + 30
        while not any(  # a periodic snapshot of the last state: nothing comes after it
            s.last_txid == txid
            for s in catalog.generations(storage.open_replica(file_url), "often.db")[0].snapshots
        ):
            assert time.monotonic() < deadline, "no periodic snapshot of the last commit"
            time.sleep(0.05)
        walsync_vfs.flush(timeout=30)
        (state,) = [s for s in walsync_vfs.stats() if s["name"] == "often.db"]
        assert state["pending_commits"] == 0, state
        con.close()
    finally:
        walsync_vfs.flush(timeout=30)
        walsync_vfs.configure(replica="", upload_interval=1.0, snapshot_interval=86400.0)
    (gen,) = catalog.generations(storage.open_replica(file_url), "often.db")
    assert len(gen.snapshots) >= 2 and gen.restorable() == [(1, max(states))]
    for txid in sorted(states)[:: max(1, len(states) // 5)]:
        out = tmp_path / f"at{txid}.db"
        restore(f"{file_url}/often.db", str(out), txid=txid)
        assert digest(apsw.Connection(str(out))) == states[txid]
