"""When uploads are due and how commits are batched: the token bucket on the shared upload
clock, the agenda, ship slots and batching, driven by an injected clock (no threads)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from walsync_vfs import format
from walsync_vfs.config import DbConfig
from walsync_vfs.database import Database
from walsync_vfs.spool import Outgoing
from walsync_vfs.uploader import ShipSlots, UploadClock, batches, encode, take_batch

PAGE = 512
PHASE = 0.25  # this process's ticks fall a quarter into each interval


def commit(txid: int, n_pages: int = 1) -> format.Commit:
    page = bytes([txid % 251]) * PAGE
    return format.Commit(txid, 0, n_pages, 0, tuple((p, page) for p in range(1, n_pages + 1)))


def database(**knobs: float) -> Database:
    db = Database(-1, "/not/opened.db", name="t.db")
    db.cfg = dataclasses.replace(DbConfig(), **knobs)  # type: ignore[arg-type]
    db.lineage.page_size = PAGE
    return db


def add(clock: UploadClock, db: Database, txid: int, now: float, gen: str = "g") -> None:
    """A commit reaches the engine, as Engine._append queues it."""
    up = db.upload
    grown = up.pending_bytes + PAGE
    due = up.queue([(txid, gen, commit(txid))], grown, now, db.cfg)
    up.pending_bytes = grown
    if due:
        clock.schedule(db, now)


def outgoing(n: int) -> list[Outgoing]:
    return [Outgoing(f"k{i}", "g", i, i, i, PAGE, b"x") for i in range(n)]


def test_first_commit_after_idle_ships_at_once() -> None:
    clock, db = UploadClock(PHASE), database()
    add(clock, db, 1, now=100.0)
    assert clock.next_due() == 0.0  # no backoff, a burst token: due already
    assert clock.due(100.0, room=8) == [db]
    assert db.upload.quiet is False and db.upload.tokens == pytest.approx(3.0)


def test_steady_stream_ships_once_per_interval_on_the_clock_ticks() -> None:
    """A commit every tenth of an interval: the first (after idle) ships at once; then the
    database drifts onto the ticks, never two uploads within an interval, no commit waiting
    more than 1.1 intervals."""
    clock, db = UploadClock(PHASE), database(upload_interval=1.0)
    ships: list[float] = []
    waits: list[float] = []
    arrived: dict[int, float] = {}
    k, now = 0, 100.0
    while k < 100:
        at_commit = 100.0 + k / 10
        now = max(now, min(at_commit, clock.next_due()))  # the uploader wakes when due
        if now == at_commit:
            k += 1
            arrived[k] = now
            add(clock, db, k, now)
            continue
        for due in clock.due(now, room=8):
            batch, _ = take_batch(due.upload, PAGE, due.cfg.max_segment_bytes)
            waits += [now - arrived[txid] for txid, _, _ in batch]
            ships.append(now)
            clock.schedule(due, now)  # the upload's end: nothing pending, nothing scheduled
    assert ships[0] == 100.0
    gaps = [b - a for a, b in zip(ships, ships[1:], strict=False)]
    assert gaps[:3] == pytest.approx([1.1, 1.1, 1.05])
    assert all(g == pytest.approx(1.0) for g in gaps[3:]), gaps
    assert all(((t - PHASE) % 1.0) == pytest.approx(0.0, abs=1e-6) for t in ships[3:])
    assert max(waits) <= 1.1 + 1e-9


def test_paced_uploads_drift_onto_the_clock_a_tenth_of_an_interval_at_a_time() -> None:
    """Started 0.45 intervals off the clock: 1.1 intervals per upload until within a tenth,
    then on the ticks for good."""
    clock, db = UploadClock(PHASE), database(upload_interval=2.0)
    db.upload.pending = [(1, "g", commit(1))]
    db.upload.quiet = False  # pacing applies: no burst token
    interval = db.cfg.upload_interval
    phase = PHASE * interval
    shipped = 1000 * interval + phase + 0.45 * interval
    gaps = []
    for _ in range(10):
        db.upload.shipped_at = shipped
        due = clock.ship_time(db, shipped)
        gaps.append(round((due - shipped) / interval, 6))
        shipped = due
    assert gaps == [1.1] * 5 + [1.05] + [1.0] * 4
    assert abs((shipped - phase) / interval - round((shipped - phase) / interval)) < 1e-6


def paced(**knobs: float) -> tuple[UploadClock, Database]:
    """A database with a commit pending that would wait for its tick."""
    clock, db = UploadClock(PHASE), database(**knobs)
    db.upload.pending = [(1, "g", commit(1))]
    db.upload.pending_bytes = PAGE
    db.upload.quiet = False
    db.upload.shipped_at = 10.0
    return clock, db


def test_paced_commits_wait_for_the_tick() -> None:
    clock, db = paced()
    assert clock.ship_time(db, 10.2) == pytest.approx(11.1)


def test_a_full_segment_is_urgent() -> None:
    clock, db = paced(max_segment_bytes=PAGE)
    assert clock.ship_time(db, 10.2) == 0.0


def test_a_segment_compaction_leaves_alone_ships_before_the_tick_not_before_a_tenth() -> None:
    """A quarter of max_segment_bytes pending: no wait for the tick, but a tenth of an
    interval after the last upload at the earliest; a commit that brings a database there
    makes the uploader look at it."""
    clock, db = paced(max_segment_bytes=8 * PAGE)
    assert clock.ship_time(db, 10.05) == pytest.approx(11.1)  # one page: small, waits
    db.upload.pending_bytes = 2 * PAGE
    assert clock.ship_time(db, 10.05) == pytest.approx(10.1)
    assert clock.ship_time(db, 10.5) == pytest.approx(10.1)  # due already
    assert db.upload.queue([], 3 * PAGE, 10.5, db.cfg) is False  # past the mark before
    db.upload.pending_bytes = PAGE
    assert db.upload.queue([], 2 * PAGE, 10.5, db.cfg) is True  # reaches it


def test_a_waiting_flush_makes_every_upload_urgent() -> None:
    clock, db = paced()
    clock.flushers = 1
    assert clock.ship_time(db, 10.2) == 0.0


def test_a_backlog_of_encoded_segments_is_urgent_but_backoff_holds() -> None:
    clock, db = paced()
    db.upload.outbox = outgoing(2)
    assert clock.ship_time(db, 10.2) == 0.0
    db.upload.next_attempt = 10.8  # after a failed upload
    assert clock.ship_time(db, 10.2) == 10.8


def test_without_an_upload_interval_nothing_is_paced() -> None:
    clock, db = paced(upload_interval=0.0)
    assert clock.ship_time(db, 10.0) == 0.0


def test_nothing_is_due_while_idle_uploading_or_syncing() -> None:
    clock, db = paced()
    db.upload.uploading = True
    assert clock.ship_time(db, 10.2) == math.inf
    db.upload.uploading, db.sync.syncing = False, True
    assert clock.ship_time(db, 10.2) == math.inf
    assert clock.ship_time(database(), 10.2) == math.inf


def test_the_agenda_keeps_the_earliest_time_and_gives_out_at_most_room() -> None:
    clock = UploadClock(PHASE)
    dbs = [paced()[1] for _ in range(3)]
    assert clock.schedule(dbs[0], 10.2) == pytest.approx(11.1)
    assert clock.schedule(dbs[0], 10.3) is None  # not earlier: no new entry, no wake-up
    clock.flushers = 1
    assert [clock.schedule(db, 10.3) for db in dbs] == [0.0, 0.0, 0.0]
    assert clock.due(10.3, room=2) == dbs[:2]
    assert clock.due(10.3, room=2) == dbs[2:]  # the superseded 11.1 entry is skipped
    assert clock.next_due() == pytest.approx(11.1) and clock.due(11.2, room=2) == []


def test_ship_slots_wake_a_throttled_uploader_once_half_are_free() -> None:
    slots = ShipSlots(4)
    slots.in_use = 4
    assert slots.check_full() and slots.free == 0
    assert not slots.give_back(1)
    assert slots.give_back(1)  # 2 of 4 in use
    assert not slots.give_back(1)  # woken already
    slots.in_use = 1
    assert not slots.check_full() and not slots.give_back(1)


def test_a_batch_stops_at_max_segment_bytes_and_at_a_generation_change() -> None:
    db = database()
    up = db.upload
    g1, g2 = format.new_generation_id(1), format.new_generation_id(6)
    up.pending = [(i, g1 if i <= 5 else g2, commit(i)) for i in range(1, 8)]
    up.pending_bytes = 7 * PAGE
    first, _ = take_batch(up, PAGE, 3 * PAGE)
    assert [seq for seq, _, _ in first] == [1, 2, 3]
    second = take_batch(up, PAGE, 3 * PAGE)
    assert [seq for seq, _, _ in second[0]] == [4, 5]  # g2 starts a batch of its own
    assert [seq for seq, _, _ in take_batch(up, PAGE, 3 * PAGE)[0]] == [6, 7]
    assert (up.pending, up.pending_bytes) == ([], 0)
    segment = encode("t.db", PAGE, 3 * PAGE, second)
    assert (segment.key, segment.generation, segment.last_seq) == (
        format.segment_key("t.db", g1, 4, 5),
        g1,
        5,
    )


def test_batches_split_at_max_bytes_with_at_least_one_commit_each() -> None:
    commits = [commit(1, 3), commit(2), commit(3), commit(4, 5)]
    split = list(batches(commits, PAGE, 2 * PAGE))
    assert [[c.txid for c in b] for b in split] == [[1], [2, 3], [4]]
