"""The uploader's schedule: first commit after idle ships at once, steady writes coalesce.

These are the two promises of the token bucket (README, ``upload_interval``), kept now that
the uploader works from an agenda of due times instead of scanning every database.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import apsw

import walsync_vfs
from walsync_vfs import catalog, format, storage, uploader


def segments(url: str, name: str) -> list[str]:
    client = storage.open_replica(url)
    return [key for gen in catalog.generations(client, name) for key in gen.segments]


def replicated_txid(url: str, name: str) -> int:
    return max(g.last_txid for g in catalog.generations(storage.open_replica(url), name))


def test_first_commit_after_idle_ships_without_a_flush(file_replica, tmp_path):
    walsync_vfs.configure(upload_interval=5.0)
    try:
        con = apsw.Connection(str(tmp_path / "idle.db"), vfs="walsync")
        con.execute("CREATE TABLE t(x)")
        walsync_vfs.flush(timeout=30)
        before = len(segments(file_replica, "idle.db"))
        time.sleep(1.5)  # a quiet spell (> interval/4 would be 1.25 s)
        con.execute("INSERT INTO t VALUES(1)")
        wait_until(  # within far less than the 5 s interval
            lambda: len(segments(file_replica, "idle.db")) > before,
            "the first commit after idle waited",
            seconds=1.0,
        )
        con.close()
    finally:
        walsync_vfs.configure(upload_interval=1.0)


def test_a_segments_worth_ships_at_once_under_steady_writes(file_replica, tmp_path):
    """Commits that reach max_segment_bytes while the stream waits for its tick ship at
    once, not at the tick: a bulk load is uploaded while it runs, not all at flush()."""
    walsync_vfs.configure(upload_interval=60.0, max_segment_bytes=1 << 20)
    try:
        con, before = replicated_table(file_replica, tmp_path / "bulk.db")
        for _ in range(64):  # a segment's worth (26 of them) and more, well before the tick
            con.execute("INSERT INTO t VALUES(randomblob(40000))")
        wait_for_txid(file_replica, "bulk.db", before + 26, "a segment's worth waited")
        con.close()
    finally:
        walsync_vfs.configure(upload_interval=1.0, max_segment_bytes=16 << 20)


def test_a_segments_worth_ships_at_once_after_a_quarter_shipped(file_replica, tmp_path):
    """A quarter segment ships at most once a tenth of an interval; a whole segment's worth
    reached meanwhile does not wait for that: a writer of page data faster than a segment
    per tenth of an interval keeps its backlog, and the flush that ends it, to a segment."""
    walsync_vfs.configure(upload_interval=60.0, max_segment_bytes=1 << 20)
    try:
        con, before = replicated_table(file_replica, tmp_path / "fast.db")
        for _ in range(8):  # a quarter, within a tenth of an interval (6 s) of that upload
            con.execute("INSERT INTO t VALUES(randomblob(40000))")
        wait_until(  # the quarter is seen, to ship in 6 s
            lambda: pending_bytes("fast.db") >= 8 * 40000, "the commits did not reach the uploader"
        )
        for _ in range(22):  # then a segment's worth
            con.execute("INSERT INTO t VALUES(randomblob(40000))")
        wait_until(  # well before the quarter's 6 s are up
            lambda: replicated_txid(file_replica, "fast.db") >= before + 26,
            "a segment's worth waited",
            seconds=5.0,
        )
        con.close()
    finally:
        walsync_vfs.configure(upload_interval=1.0, max_segment_bytes=16 << 20)


def replicated_table(url: str, path: Path) -> tuple[apsw.Connection, int]:
    """A connection to a new database with a table t(x), replicated so far; and its txid."""
    con = apsw.Connection(str(path), vfs="walsync")
    con.execute("CREATE TABLE t(x)")
    walsync_vfs.flush(timeout=30)
    return con, replicated_txid(url, path.name)


def pending_bytes(name: str) -> int:
    (state,) = [s for s in walsync_vfs.stats() if s["name"] == name]
    return int(state["pending_bytes"])


def wait_for_txid(url: str, name: str, txid: int, problem: str) -> None:
    """Poll the replica until it holds ``txid``, failing with ``problem`` after 3 s (far
    less than the upload interval, and than the uploader's own next look, in these tests)."""
    wait_until(lambda: replicated_txid(url, name) >= txid, problem)


def wait_until(done: Callable[[], bool], problem: str, seconds: float = 3.0) -> None:
    """Poll ``done`` until it holds, failing with ``problem`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, problem
        time.sleep(0.01)


def test_steady_writes_ship_about_once_per_interval(file_replica, tmp_path):
    walsync_vfs.configure(upload_interval=0.5)
    try:
        cons = [apsw.Connection(str(tmp_path / f"s{i}.db"), vfs="walsync") for i in range(3)]
        for con in cons:
            con.execute("CREATE TABLE t(x)")
        walsync_vfs.flush(timeout=30)
        before = [len(segments(file_replica, f"s{i}.db")) for i in range(3)]
        end = time.monotonic() + 3.0
        n = 0
        while time.monotonic() < end:  # 3 databases x ~50 commits/s for 3 s
            for con in cons:
                con.execute("INSERT INTO t VALUES(?)", (n,))
            n += 1
            time.sleep(0.02)
        walsync_vfs.flush(timeout=30)
        for i, con in enumerate(cons):
            shipped = len(segments(file_replica, f"s{i}.db")) - before[i]
            # 3 s / 0.5 s = 6 intervals; the first commit and the flush may each add one.
            assert 4 <= shipped <= 9, f"s{i}.db: {shipped} segments for {n} commits"
            (state,) = [s for s in walsync_vfs.stats() if s["name"] == f"s{i}.db"]
            assert state["replicated_txid"] == state["last_txid"]
            con.close()
    finally:
        walsync_vfs.configure(upload_interval=1.0)


def test_upload_threads_start_only_as_latency_needs_them() -> None:
    """One at a time, calls run on one thread; calls that wait on the store (here, on an
    event) start more threads, up to the cap, and every call runs."""
    import threading

    from walsync_vfs.workers import Workers

    pool = Workers(3, "test-put")
    for i in range(20):
        assert pool.submit(lambda i=i: i * 2).result(timeout=5) == i * 2
    assert pool.started == 1
    release = threading.Event()
    slow = [pool.submit(release.wait, 5) for _ in range(6)]
    time.sleep(0.2)
    assert pool.started == 3  # capped: the other three wait in the queue
    release.set()
    assert [f.result(timeout=5) for f in slow] == [True] * 6
    pool.shutdown()


def test_a_slow_store_keeps_waiting_commits_pending(file_replica, tmp_path):
    """Behind a slow store, at most PUT_BATCH ships per put thread are handed over at once; the
    other due databases keep their commits pending, where memory_cap counts them (and their
    next batch takes them all), instead of each parking a batch in the put queue."""
    engine = walsync_vfs._engine_instance()
    client = storage.open_replica(file_replica)
    handed_over: list[int] = []  # ships queued or running, seen from inside each PUT

    class SlowStore:
        def put(self, key: str, data: bytes) -> None:
            handed_over.append(engine.uploads.slots.in_use)
            time.sleep(0.05)
            client.put(key, data)

        def __getattr__(self, name: str) -> object:
            return getattr(client, name)

    cons = [apsw.Connection(str(tmp_path / f"q{i}.db"), vfs="walsync") for i in range(100)]
    for con in cons:
        con.execute("CREATE TABLE t(x)")
    walsync_vfs.flush(timeout=30)
    engine._clients[file_replica] = SlowStore()
    for i in range(len(cons)):
        db = engine.database(str(tmp_path / f"q{i}.db"))
        assert db is not None
        db.client = engine._clients[file_replica]
    try:
        for con in cons:  # 100 databases due at once, more than the 64 slots
            con.execute("INSERT INTO t VALUES(1)")
        walsync_vfs.flush(timeout=30)
    finally:
        engine._clients[file_replica] = client
    assert len(handed_over) >= 100
    slots = engine.uploads.slots.capacity
    assert max(handed_over) <= slots == uploader.PUT_BATCH * 4, handed_over
    for i, con in enumerate(cons):
        assert len(segments(file_replica, f"q{i}.db")) >= 2  # the CREATE's and the INSERT's
        con.close()


def test_segments_take_the_fast_level_where_zstd_effort_does_not_pay(
    file_replica, tmp_path, monkeypatch
):
    """Measured every second segment here, for the segments after it: random blobs take the
    fast level (level 1 would spend four times the CPU to save little more); varied text
    takes level 1 (it saves over half); one row rewritten commit after commit (the same
    page over and over, which either level shrinks to a few percent) the fast level again.
    Between measurements the level holds.

    Each segment's level is read off its bytes: they equal what encode_segment makes of its
    records, as the capture hands them over, at that level and only at it."""
    monkeypatch.setattr(uploader, "LEVEL_PROBE_EVERY", 2)
    walsync_vfs.configure(upload_interval=60.0, max_segment_bytes=1 << 20)
    try:
        con, _ = replicated_table(file_replica, tmp_path / "mixed.db")
        before = len(segments(file_replica, "mixed.db"))
        rows = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {})"
        random_rows = [rows.format(400) + " INSERT INTO t SELECT randomblob(1000) FROM n"]
        text_rows = [
            rows.format(8000) + " INSERT INTO t SELECT printf('user %d signed up from %s', "
            "i, hex(randomblob(4))) FROM n"
        ]
        rewrites = ["UPDATE t SET x = x || '.' WHERE rowid = 1"] * 100
        for commits in (random_rows, text_rows, text_rows, rewrites, rewrites, rewrites):
            for sql in commits:
                con.execute(sql)
            walsync_vfs.flush(timeout=30)  # one segment each, none under a quarter segment
        con.close()
        client = storage.open_replica(file_replica)
        fast = format.FAST_SEGMENT_LEVEL
        levels = [
            encoded_at(format.read_segment_raw(client.get(catalog.object_key(key)), key.name))
            for key in segments(file_replica, "mixed.db")[before:]
        ]
        assert levels == [[1], [fast], [fast], [1], [1], [fast]]
    finally:
        walsync_vfs.configure(upload_interval=1.0, max_segment_bytes=16 << 20)


def encoded_at(seg: format.RawSegment) -> list[int]:
    """Which of the fast level and level 1 made the segment.  The capture hands a lone
    commit's records over in one block (compressed in one call) and a run's in several
    (compressed as a stream, whatever the cut): try both."""
    raw = memoryview(seg.raw)
    forms = ([raw], [raw[:1], raw[1:]])
    return [
        level
        for level in (format.FAST_SEGMENT_LEVEL, 1)
        if any(
            format.encode_segment(
                seg.page_size, [format.PackedRun(seg.page_size, memoryview(seg.index), parts)],
                level,
            ).data == seg.data
            for parts in forms
        )
    ]  # fmt: skip
