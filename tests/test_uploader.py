"""The uploader's schedule: first commit after idle ships at once, steady writes coalesce.

These are the two promises of the token bucket (README, ``upload_interval``), kept now that
the uploader works from an agenda of due times instead of scanning every database.
"""

from __future__ import annotations

import dataclasses
import time

import apsw

import walsync_vfs
from walsync_vfs import catalog, storage
from walsync_vfs import engine as engine_mod


def segments(url: str, name: str) -> list[str]:
    client = storage.open_replica(url)
    return [key for gen in catalog.generations(client, name) for key in gen.segments]


def test_first_commit_after_idle_ships_without_a_flush(file_replica, tmp_path):
    walsync_vfs.configure(upload_interval=5.0)
    try:
        con = apsw.Connection(str(tmp_path / "idle.db"), vfs="walsync")
        con.execute("CREATE TABLE t(x)")
        walsync_vfs.flush(timeout=30)
        before = len(segments(file_replica, "idle.db"))
        time.sleep(1.5)  # a quiet spell (> interval/4 would be 1.25 s)
        con.execute("INSERT INTO t VALUES(1)")
        deadline = time.monotonic() + 1.0  # far less than the 5 s interval
        while len(segments(file_replica, "idle.db")) == before:
            assert time.monotonic() < deadline, "the first commit after idle waited"
            time.sleep(0.02)
        con.close()
    finally:
        walsync_vfs.configure(upload_interval=1.0)


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
            handed_over.append(engine._ships)
            time.sleep(0.05)
            client.put(key, data)

        def __getattr__(self, name: str) -> object:
            return getattr(client, name)

    cons = [apsw.Connection(str(tmp_path / f"q{i}.db"), vfs="walsync") for i in range(100)]
    for con in cons:
        con.execute("CREATE TABLE t(x)")
    walsync_vfs.flush(timeout=30)
    engine._clients[file_replica] = SlowStore()
    for db in engine._dbs.values():
        if db.path.startswith(str(tmp_path)):
            db.client = engine._clients[file_replica]
    try:
        for con in cons:  # 100 databases due at once, more than the 64 slots
            con.execute("INSERT INTO t VALUES(1)")
        walsync_vfs.flush(timeout=30)
    finally:
        engine._clients[file_replica] = client
    assert len(handed_over) >= 100
    assert max(handed_over) <= engine._ship_slots == engine_mod.PUT_BATCH * 4, handed_over
    for i, con in enumerate(cons):
        assert len(segments(file_replica, f"q{i}.db")) >= 2  # the CREATE's and the INSERT's
        con.close()


def test_paced_uploads_drift_onto_the_upload_clock() -> None:
    """A steady stream that began off the process's upload clock (with a burst upload) joins
    it a tenth of an interval per upload: never two uploads within an interval, no commit
    waiting more than 1.1 intervals, and once on a tick it stays on the ticks."""
    engine = walsync_vfs._engine_instance()
    db = engine_mod.DbState(-1, "/not/opened.db")  # never registered with the engine
    db.pending = [(1, "gen", None)]  # type: ignore[list-item]
    db.quiet = False  # pacing applies: no burst token
    interval = db.cfg.upload_interval
    phase = engine._phase * interval
    shipped = 1000 * interval + phase + 0.45 * interval  # off the clock by 0.45 intervals
    gaps = []
    for _ in range(10):
        db.shipped_at = shipped
        due = engine._ship_time(db, shipped)
        gaps.append(round((due - shipped) / interval, 6))
        shipped = due
    assert gaps == [1.1] * 5 + [1.05] + [1.0] * 4
    assert abs((shipped - phase) / interval - round((shipped - phase) / interval)) < 1e-6


def test_without_an_upload_interval_nothing_is_paced() -> None:
    """upload_interval = 0: every commit may ship at once, with no clock to divide by."""
    engine = walsync_vfs._engine_instance()
    db = engine_mod.DbState(-1, "/not/opened.db")
    db.cfg = dataclasses.replace(db.cfg, upload_interval=0.0)
    db.pending = [(1, "gen", None)]  # type: ignore[list-item]
    db.quiet = False
    db.shipped_at = 5.0
    assert engine._ship_time(db, 5.0) == db.next_attempt == 0.0
