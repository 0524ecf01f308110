"""Issue: capture at the source.  Replaying the shim's stream onto a copy taken at a sync point
must reproduce the source database byte for byte, under every write pattern SQLite has."""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from pathlib import Path

import apsw
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import walsync_vfs  # noqa: F401  (registers the VFS and the WAL hook)
from walsync_vfs import capture
from walsync_vfs.capture import Kind, Record, SyncPoint
from walsync_vfs.dbfile import apply_pages


class Follower:
    """Replays one database's captured stream onto a copy taken at a sync point."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.copy = path.with_name(path.name + ".copy")
        self.records: list[Record] = []
        self.seq = 0
        self.stall = 0.0  # seconds the next batch keeps the (process-wide) consumer busy
        self.stalling = threading.Event()
        capture.dispatcher().route_path(str(path), self.sink)

    def sink(self, batch: capture.Batch) -> None:
        if self.stall:
            self.stalling.set()
            time.sleep(self.stall)
            self.stall = 0.0
        self.records.extend(batch)

    def start(self) -> None:
        """Copy the database at a sync point; records after it are deltas on that copy."""
        with SyncPoint(str(self.path)) as sp, open(self.copy, "wb") as out:
            _, _, pages = sp.pages()
            for page in pages:
                out.write(page)
            self.seq = sp.seq

    def catch_up(self) -> list[Record]:
        """Apply every record received so far; returns the COMMITs applied."""
        capture.dispatcher().barrier()
        todo = [r for r in self.records if r.seq > self.seq]
        self.records.clear()
        assert [r.seq for r in todo] == list(range(self.seq + 1, self.seq + 1 + len(todo)))
        assert [r for r in todo if r.kind is Kind.GAP] == []
        commits = [r for r in todo if r.kind is Kind.COMMIT]
        with open(self.copy, "r+b") as f:
            for r in commits:
                apply_pages(f, r.page_size, r.db_size, r.pages)
        if todo:
            self.seq = todo[-1].seq
        return commits

    def assert_identical(self, con: apsw.Connection) -> None:
        """Catch up, checkpoint the source fully, and compare the files byte for byte."""
        self.catch_up()
        busy, _, _ = con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0
        assert self.path.read_bytes() == self.copy.read_bytes()
        check = apsw.Connection(str(self.copy), flags=apsw.SQLITE_OPEN_READONLY)
        assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        check.close()

    def stop(self) -> None:
        capture.dispatcher().route_path(str(self.path), None)


def open_db(path: Path, **pragmas: object) -> apsw.Connection:
    con = apsw.Connection(str(path), vfs="walsync")
    con.set_busy_timeout(10_000)
    for k, v in pragmas.items():
        con.execute(f"PRAGMA {k}={v}")
    return con


@pytest.fixture
def db(tmp_path: Path):
    """A captured database with a table, and its follower already started."""
    path = tmp_path / "src.db"
    follower = Follower(path)
    con = open_db(path)
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    follower.start()
    yield con, follower
    con.close()
    follower.stop()


def fill(con: apsw.Connection, n: int, size: int = 100) -> None:
    con.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
        "INSERT INTO t(v) SELECT randomblob(?) FROM n",
        (n, size),
    )


def wal_checksum(data: bytes, big_end: int, s1: int = 0, s2: int = 0) -> tuple[int, int]:
    """SQLite's WAL checksum, word by word as wal.c defines it: the reference for the shim's."""
    words = struct.unpack(f"{'>' if big_end else '<'}{len(data) // 4}I", data)
    for x0, x1 in zip(words[0::2], words[1::2], strict=True):
        s1 = (s1 + x0 + s2) & 0xFFFFFFFF
        s2 = (s2 + x1 + s1) & 0xFFFFFFFF
    return s1, s2


@pytest.mark.parametrize("big_end", [0, 1])
def test_wal_checksum_equals_sqlites_definition(big_end):
    rng = random.Random(big_end)
    for n in [8, 24, 256, 512, 1024, 4096, 8192, 65536]:
        data = rng.randbytes(n)
        start = rng.getrandbits(32), rng.getrandbits(32)
        ck = capture.ffi.new("uint32_t[2]", start)
        capture.lib.ws_wal_checksum(big_end, data, n, ck)
        assert tuple(ck) == wal_checksum(data, big_end, *start), n


def test_wal_checksum_verifies_a_wal_sqlite_wrote(tmp_path):
    con = apsw.Connection(str(tmp_path / "plain.db"))
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA wal_autocheckpoint=0")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    for _ in range(5):
        fill(con, 50, 300)
    wal = (tmp_path / "plain.db-wal").read_bytes()
    con.close()
    big_end, page_size = struct.unpack(">I", wal[:4])[0] & 1, struct.unpack(">I", wal[8:12])[0]
    ck = capture.ffi.new("uint32_t[2]", (0, 0))
    capture.lib.ws_wal_checksum(big_end, wal[:24], 24, ck)
    assert tuple(ck) == struct.unpack(">II", wal[24:32])
    frames = range(32, len(wal), 24 + page_size)
    assert len(frames) > 20
    for at in frames:
        capture.lib.ws_wal_checksum(big_end, wal[at : at + 8], 8, ck)
        capture.lib.ws_wal_checksum(big_end, wal[at + 24 : at + 24 + page_size], page_size, ck)
        assert tuple(ck) == struct.unpack(">II", wal[at + 16 : at + 24]), at


def test_one_record_per_commit_and_none_for_rollbacks(db):
    con, f = db
    for i in range(20):
        con.execute("INSERT INTO t(v) VALUES(?)", (i,))
    with pytest.raises(apsw.ConstraintError), con:
        con.execute("INSERT INTO t(id, v) VALUES(1000, 1)")
        con.execute("INSERT INTO t(id, v) VALUES(1000, 2)")
    con.execute("BEGIN")
    fill(con, 50)
    con.execute("ROLLBACK")
    con.execute("SELECT count(*) FROM t").fetchall()  # read-only: no record
    commits = f.catch_up()
    assert len(commits) == 20
    frames = [c.wal_frames for c in commits]
    assert all(a[1] == b[0] for a, b in zip(frames, frames[1:], strict=False))
    f.assert_identical(con)


def test_cache_spill_and_pages_overwritten_in_place(db):
    con, f = db
    con.execute("PRAGMA cache_size=5")
    with con:
        fill(con, 3000, 300)
        for _ in range(3):  # rewrite the same spilled pages inside one transaction
            con.execute("UPDATE t SET v = randomblob(300) WHERE id % 3 = 0")
    commits = f.catch_up()
    assert len(commits) == 1
    pgnos = [p for p, _ in commits[0].pages]
    assert pgnos == sorted(set(pgnos))
    f.assert_identical(con)


def test_spilled_transaction_rolled_back_then_smaller_commit(db):
    con, f = db
    con.execute("PRAGMA cache_size=5")
    con.execute("BEGIN")
    fill(con, 2000, 300)
    con.execute("ROLLBACK")
    fill(con, 3, 300)
    assert len(f.catch_up()) == 1
    f.assert_identical(con)


@pytest.mark.parametrize("mode", ["PASSIVE", "FULL", "RESTART", "TRUNCATE"])
def test_checkpoints_and_wal_restart(db, mode):
    con, f = db
    salts = set()
    for _ in range(5):
        fill(con, 200, 500)
        con.execute(f"PRAGMA wal_checkpoint({mode})")
        fill(con, 10)
        salts.update(c.wal_salts for c in f.catch_up())
    if mode != "PASSIVE":
        assert len(salts) >= 5  # the WAL restarted with new salts and capture followed
    f.assert_identical(con)


@pytest.mark.parametrize("sync", ["OFF", "NORMAL", "FULL"])
def test_synchronous_modes(db, sync):
    con, f = db
    con.execute(f"PRAGMA synchronous={sync}")
    for i in range(30):
        fill(con, i % 7 + 1, 3000)
    assert len(f.catch_up()) == 30
    f.assert_identical(con)


def test_mmap_stays_on(db):
    con, f = db
    assert con.execute("PRAGMA mmap_size=268435456").fetchone()[0] == 268435456
    fill(con, 2000, 200)
    con.execute("PRAGMA wal_checkpoint(PASSIVE)")
    assert con.execute("SELECT sum(length(v)) FROM t").fetchone()[0] == 400_000
    fill(con, 100, 200)
    f.assert_identical(con)


EXCLUSIVE_REFUSED = (
    "walsync: locking_mode=EXCLUSIVE would stop replication (the replicator reads through "
    "connections of its own); keep locking_mode=NORMAL"
)


@pytest.mark.parametrize("pragma", ["locking_mode=EXCLUSIVE", "main.locking_mode = 'exclusive'"])
def test_locking_mode_exclusive_is_refused_and_capture_goes_on(db, pragma):
    con, f = db
    with pytest.raises(apsw.SQLError) as exc:
        con.execute(f"PRAGMA {pragma}")
    assert str(exc.value) == EXCLUSIVE_REFUSED
    assert con.execute("PRAGMA locking_mode").fetchone() == ("normal",)
    for i in range(10):
        fill(con, i + 1, 700)
    assert len(f.catch_up()) == 10
    f.assert_identical(con)


def test_several_connections_and_threads(db):
    con, f = db
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            c = open_db(f.path)
            for i in range(50):
                with c:
                    c.execute("INSERT INTO t(v) VALUES(?)", (f"{k}-{i}" * (k + 1),))
                if i % 17 == 0:
                    c.execute("PRAGMA wal_checkpoint(PASSIVE)")
            c.close()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(f.catch_up()) == 200
    f.assert_identical(con)


def stall_consumer(con: apsw.Connection, f: Follower, seconds: float) -> None:
    """Make the consumer sleep in the sink for ``seconds``, then queue 5 commits it has not
    read yet."""
    capture.dispatcher().barrier()
    f.stall = seconds
    con.execute("INSERT INTO t(v) VALUES(0)")
    assert f.stalling.wait(5)
    for i in range(5):
        con.execute("INSERT INTO t(v) VALUES(?)", (i,))


def test_wal_truncate_with_queued_commits(db):
    """Queued commits are read back from the WAL by the consumer.  A TRUNCATE checkpoint
    while the consumer is busy elsewhere reads their frames first, without waiting for it,
    and the stream stays exact."""
    con, f = db
    fill(con, 200)
    stall_consumer(con, f, 1.5)
    t0 = time.monotonic()
    assert con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    assert time.monotonic() - t0 < 0.5
    fill(con, 50)  # new frames where the queued commits' frames were
    f.assert_identical(con)



def test_small_commits_queued_across_wal_restarts(db):
    """Hundreds of small commits queued while the consumer is busy: each WAL restart reads
    the frames of those still unread in runs, one read per run, and every commit replays
    exactly, through restarts that reuse the frames they were read from."""
    con, f = db
    con.execute("PRAGMA wal_autocheckpoint=50")
    stall_consumer(con, f, 1.5)
    for i in range(400):
        con.execute("INSERT INTO t(v) VALUES(randomblob(?))", (100 + i % 700,))
        if i % 97 == 0:
            con.execute("UPDATE t SET v = randomblob(3000) WHERE id % 7 = ?", (i % 7,))
    assert len(f.catch_up()) == 400 + 5 + 5 + 1  # stall_consumer's 6 commits, the UPDATEs
    f.assert_identical(con)


def test_commits_read_ahead_while_the_consumer_lingers(db):
    """A busy writer: after each drain the consumer lingers, reading ahead the frames of the
    commits queued meanwhile (a few hundred KiB at a time) while the WAL restarts under it;
    every commit replays exactly."""
    con, f = db
    con.execute("PRAGMA wal_autocheckpoint=100")
    for i in range(3000):
        con.execute("INSERT INTO t(v) VALUES(randomblob(?))", (200 + i % 3000,))
    assert len(f.catch_up()) == 3000
    f.assert_identical(con)

def test_last_close_with_queued_commits(db):
    """Closing the last connection checkpoints and deletes the WAL: queued commits are read
    before that, and replay onto the copy gives the closed database."""
    con, f = db
    fill(con, 200)
    stall_consumer(con, f, 1.0)
    con.close()
    assert not os.path.exists(str(f.path) + "-wal")
    f.catch_up()
    assert f.path.read_bytes() == f.copy.read_bytes()


def test_several_databases(tmp_path):
    pairs = []
    for i in range(5):
        path = tmp_path / f"db{i}.db"
        f = Follower(path)
        con = open_db(path)
        con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
        f.start()
        pairs.append((con, f))
    for round_ in range(20):
        for i, (con, _) in enumerate(pairs):
            fill(con, i + round_ % 3 + 1, 100 * (i + 1))
    for con, f in pairs:
        f.assert_identical(con)
        con.close()
        f.stop()


def test_non_wal_database_is_switched_to_wal(tmp_path):
    path = tmp_path / "rollback.db"
    plain = apsw.Connection(str(path))
    assert plain.execute("PRAGMA journal_mode=DELETE").fetchone() == ("delete",)
    plain.execute("CREATE TABLE t(x); INSERT INTO t VALUES(1)")
    plain.close()
    con = apsw.Connection(str(path), vfs="walsync")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("SELECT x FROM t").fetchall() == [(1,)]
    con.close()


FOREIGN_WRITER = """
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("INSERT INTO t(v) VALUES('foreign')")
c.close()
"""


def test_another_process_commits_are_published_in_order(db):
    con, f = db
    fill(con, 5)
    f.catch_up()
    subprocess.run([sys.executable, "-c", FOREIGN_WRITER, str(f.path)], check=True)
    fill(con, 1)  # the next own commit publishes the one before it first
    commits = f.catch_up()
    assert len(commits) == 2
    assert any(b"foreign" in page for _, page in commits[0].pages)
    f.assert_identical(con)
    assert con.execute("SELECT count(*) FROM t WHERE v = 'foreign'").fetchone()[0] == 1


def test_tail_publishes_commits_of_other_processes(db):
    con, f = db
    f.catch_up()
    for _ in range(3):
        subprocess.run([sys.executable, "-c", FOREIGN_WRITER, str(f.path)], check=True)
    assert capture.lib.ws_tail(capture.db_id_of(con)) == 1
    assert len(f.catch_up()) == 3
    assert capture.lib.ws_tail(capture.db_id_of(con)) == 0  # nothing new: nothing published
    assert f.catch_up() == []
    f.assert_identical(con)


def test_a_tail_racing_the_writers_own_commits_breaks_nothing(db):
    """The leader tails the WAL (for writers without the shim) while its own process
    commits: a commit the tail read before the writer published it is published once, and
    the stream goes on without a gap, across WAL restarts too."""
    con, f = db
    con.execute("PRAGMA wal_autocheckpoint=20")
    db_id = capture.db_id_of(con)
    stop = threading.Event()
    tails = 0

    def tail() -> None:
        nonlocal tails
        while not stop.is_set():
            capture.lib.ws_tail(db_id)
            tails += 1

    tailer = threading.Thread(target=tail)
    tailer.start()
    try:
        for _ in range(3000):
            con.execute("INSERT INTO t(v) VALUES(randomblob(100))")
    finally:
        stop.set()
        tailer.join()
    assert tails > 100
    commits = f.catch_up()  # asserts consecutive records and no GAP
    assert len(commits) == 3000
    f.assert_identical(con)


FOREIGN_TRUNCATE = """
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("INSERT INTO t(v) VALUES('foreign')")
assert c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
c.execute("INSERT INTO t(v) VALUES('after')")
c.close()
"""


def test_restart_by_a_process_without_the_shim_is_a_gap(db):
    con, f = db
    fill(con, 5)
    f.catch_up()
    subprocess.run([sys.executable, "-c", FOREIGN_TRUNCATE, str(f.path)], check=True)
    capture.lib.ws_tail(capture.db_id_of(con))
    capture.dispatcher().barrier()
    assert [r.kind for r in f.records] == [Kind.GAP]
    # After a new sync point the stream is trustworthy again.
    f.records.clear()
    f.start()
    fill(con, 3)
    f.assert_identical(con)



def test_a_commit_frame_past_the_wal_index_is_not_in_a_sync_point(db):
    """A writer killed after writing its commit's frames but before the wal-index names
    them leaves a valid commit SQLite has not made: the next writer overwrites it.  A sync
    point is SQLite's state (up to the wal-index's last frame), so that commit is neither in
    its pages nor in its chain, and the commit that overwrites it goes on the stream."""
    con, f = db
    assert con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    fill(con, 20)
    f.catch_up()
    wal_path = f.path.with_name(f.path.name + "-wal")
    wal = wal_path.read_bytes()
    big_end = struct.unpack(">I", wal[:4])[0] & 1
    page_size = struct.unpack(">I", wal[8:12])[0]
    frame = 24 + page_size
    frames = (len(wal) - 32) // frame
    last = wal[32 + (frames - 1) * frame : 32 + frames * frame]
    page = last[24:-1] + bytes([last[-1] ^ 0xFF])  # a commit nobody made
    head = last[:8]  # the same page, and the same database size
    ck = capture.ffi.new("uint32_t[2]", struct.unpack(">II", last[16:24]))
    capture.lib.ws_wal_checksum(big_end, head, 8, ck)
    capture.lib.ws_wal_checksum(big_end, page, page_size, ck)
    with open(wal_path, "ab") as out:
        out.write(head + wal[16:24] + struct.pack(">II", *ck) + page)
    f.start()
    fill(con, 3)  # overwrites it
    f.assert_identical(con)

def test_write_without_wal_is_reported_as_gap(db):
    con, f = db
    con.execute("PRAGMA journal_mode=DELETE")
    fill(con, 1)
    capture.dispatcher().barrier()
    assert Kind.GAP in [r.kind for r in f.records]


# ---------------------------------------------------------------- random workloads

OPS = st.one_of(
    st.tuples(st.just("insert"), st.integers(1, 40), st.integers(1, 2000)),
    st.tuples(st.just("blob"), st.integers(4097, 30000)),
    st.tuples(st.just("update"), st.integers(2, 5)),
    st.tuples(st.just("delete"), st.integers(2, 5)),
    st.tuples(st.just("schema"), st.integers(0, 3)),
    st.tuples(st.just("vacuum")),
    st.tuples(st.just("checkpoint"), st.sampled_from(["PASSIVE", "FULL", "RESTART", "TRUNCATE"])),
    st.tuples(st.just("cache_size"), st.integers(2, 3000)),
    st.tuples(st.just("rollback"), st.integers(1, 500)),
    st.tuples(st.just("savepoint"), st.integers(1, 300)),
    st.tuples(st.just("big"), st.integers(500, 3000)),
)


def run_op(con: apsw.Connection, op: tuple) -> None:
    kind = op[0]
    if kind == "insert":
        fill(con, op[1], op[2])
    elif kind == "blob":
        con.execute("INSERT INTO t(v) VALUES(randomblob(?))", (op[1],))
    elif kind == "update":
        con.execute("UPDATE t SET v = randomblob(length(v)) WHERE id % ? = 0", (op[1],))
    elif kind == "delete":
        con.execute("DELETE FROM t WHERE id % ? = 1", (op[1],))
    elif kind == "schema":
        sql = [
            "CREATE INDEX IF NOT EXISTS ti ON t(v)",
            "DROP INDEX IF EXISTS ti",
            "CREATE TABLE IF NOT EXISTS u(a, b); INSERT INTO u SELECT id, v FROM t",
            "DROP TABLE IF EXISTS u",
        ][op[1]]
        con.execute(sql)
    elif kind == "vacuum":
        con.execute("VACUUM")
    elif kind == "checkpoint":
        con.execute(f"PRAGMA wal_checkpoint({op[1]})")
    elif kind == "cache_size":
        con.execute(f"PRAGMA cache_size={op[1]}")
    elif kind == "rollback":
        con.execute("BEGIN")
        fill(con, op[1], 300)
        con.execute("ROLLBACK")
    elif kind == "savepoint":
        with con:
            fill(con, 3)
            con.execute("SAVEPOINT s")
            fill(con, op[1], 400)
            con.execute("ROLLBACK TO s")
            fill(con, 2)
    elif kind == "big":
        with con:
            fill(con, op[1], 250)
            con.execute("UPDATE t SET v = randomblob(250) WHERE id % 4 = 0")


@settings(
    max_examples=int(os.environ.get("WALSYNC_HYPOTHESIS_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(ops=st.lists(OPS, min_size=1, max_size=25))
def test_random_workloads_replay_identically(ops):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rand.db"
        f = Follower(path)
        con = open_db(path)
        try:
            con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
            f.start()
            for op in ops:
                run_op(con, op)
            f.assert_identical(con)
        finally:
            con.close()
            f.stop()


CRASH_IN_FIRST_TXN = """
import os, signal, sys, apsw
from walsync_vfs import capture
capture.load()
con = apsw.Connection(sys.argv[1], vfs="walsync")
con.execute("PRAGMA journal_mode=WAL").fetchall()
con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
con.execute("PRAGMA cache_size=5")
con.execute("BEGIN IMMEDIATE")
con.execute("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000) "
            "INSERT INTO t(v) SELECT randomblob(300) FROM n")
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_header_rewritten_after_a_crashed_first_transaction_is_no_gap(tmp_path):
    path = tmp_path / "crashed.db"
    proc = subprocess.run([sys.executable, "-c", CRASH_IN_FIRST_TXN, str(path)])
    assert proc.returncode == -9
    f = Follower(path)
    con = open_db(path)
    f.start()
    fill(con, 3)
    f.assert_identical(con)  # catch_up asserts that no GAP was reported
    con.close()
    f.stop()


def test_spooled_pages_read_in_runs_and_slices(tmp_path):
    """SpooledPages over a file of frames in WAL order: pages come back in pgno order,
    page by page or in chunks (a run of consecutive frames is one read, other frames'
    bytes never leak in), and a slice reads from the same file, open until both are gone."""
    ps = 512
    order = [7, 3, 9, 4, 5, 1, 8, 2, 6]  # pgno of each frame, in the file
    with open(tmp_path / "frames", "wb") as f:
        for frame, pgno in enumerate(order):
            f.write(bytes([0xEE]) * 24 + bytes([pgno]) * (ps - 1) + bytes([frame]))
    frames = array("I", sorted(range(len(order)), key=lambda frame: order[frame]))
    pages = capture.SpooledPages(
        os.open(tmp_path / "frames", os.O_RDONLY), ps, array("I", range(1, 10)), frames
    )
    expected = [bytes([pgno]) * (ps - 1) + bytes([order.index(pgno)]) for pgno in range(1, 10)]
    assert list(pages) == list(enumerate(expected, 1))
    for size in (ps, 2 * ps, 4 * ps, 1 << 20):
        chunks = [bytes(c) for c in pages.chunks(size)]
        assert all(len(c) <= max(size, ps) for c in chunks)
        assert b"".join(chunks) == b"".join(expected)
    part = pages[3:7]
    assert isinstance(part, capture.SpooledPages) and list(part.pgnos) == [4, 5, 6, 7]
    del pages
    assert b"".join(bytes(c) for c in part.chunks(3 * ps)) == b"".join(expected[3:7])
    assert part[-1] == (7, expected[6])
