"""The maintenance planner: when retention, compaction and periodic snapshots fall due, and
which objects retention may delete -- with an injected clock, no threads, no store."""

from __future__ import annotations

import dataclasses
import threading
from array import array
from collections.abc import Callable
from typing import Any

from walsync_vfs import catalog, format, storage
from walsync_vfs.compactor import (
    MAINTENANCE_TICK,
    Compactor,
    MaintenanceState,
    compaction_due,
    expired,
    retention_due,
    small_keys,
    snapshot_due,
)
from walsync_vfs.config import DbConfig, Settings
from walsync_vfs.database import Database
from walsync_vfs.lineage import Decision
from walsync_vfs.recent import RecentCopies
from walsync_vfs.spool import Spool

GEN = format.new_generation_id(1)


def test_retention_is_due_only_after_uploads_and_a_tenth_of_the_window() -> None:
    cfg = DbConfig(retention=100.0)
    state = MaintenanceState(retained_at=50.0)
    assert not retention_due(state, cfg, now=1000.0)  # nothing uploaded since the last pass
    state.uploaded_since_retention = True
    assert not retention_due(state, cfg, now=59.9)
    assert retention_due(state, cfg, now=60.0)
    assert not retention_due(state, dataclasses.replace(cfg, retention=0.0), now=1000.0)
    short = dataclasses.replace(cfg, retention=1.0)  # never more often than the tick
    assert not retention_due(state, short, now=50.0 + MAINTENANCE_TICK / 2)
    assert retention_due(state, short, now=50.0 + MAINTENANCE_TICK)


def test_compaction_is_due_at_compact_segments_small_segments() -> None:
    cfg = DbConfig(compact_segments=3)
    state = MaintenanceState(small_segments=array("Q", [2, 2, 3, 4]))
    assert not compaction_due(state, cfg)
    state.small_segments.extend((5, 5))
    assert compaction_due(state, cfg)
    assert [(k.first_txid, k.last_txid) for k in small_keys("a.db", GEN, state)] == [
        (2, 2),
        (3, 4),
        (5, 5),
    ]


def test_a_periodic_snapshot_is_due_after_the_interval_with_new_commits() -> None:
    cfg = DbConfig(snapshot_interval=60.0)
    state = MaintenanceState(snapshot_txid=10, snapshot_at=100.0)
    assert not snapshot_due(state, cfg, now=159.0, last_txid=11)
    assert snapshot_due(state, cfg, now=160.0, last_txid=11)
    assert not snapshot_due(state, cfg, now=1000.0, last_txid=10)  # nothing new to snapshot
    assert not snapshot_due(state, dataclasses.replace(cfg, snapshot_interval=0.0), 1e9, 11)


def objects(*entries: tuple[str, int, int, float]) -> list[storage.ObjectInfo]:
    """(kind, first txid, last txid, modified) -> object infos."""
    infos = []
    for kind, first, last, modified in entries:
        if kind == "snapshot":
            key = format.snapshot_key("a.db", GEN, last)
        else:
            key = format.segment_key("a.db", GEN, first, last)
        infos.append(storage.ObjectInfo(key, 1, modified))
    return infos


def test_expired_keeps_everything_from_the_newest_snapshot_before_the_window() -> None:
    listing = objects(
        ("snapshot", 1, 1, 100.0),
        ("segment", 2, 5, 150.0),
        ("snapshot", 5, 5, 200.0),  # the anchor: newest snapshot written before the cutoff
        ("segment", 6, 9, 250.0),
        ("snapshot", 9, 9, 950.0),  # inside the window: not an anchor
        ("segment", 10, 12, 960.0),
    )
    doomed = expired(listing, retention=700.0, now=1000.0)
    assert doomed == [listing[0].key, listing[1].key]


def test_expired_deletes_nothing_without_an_anchor() -> None:
    listing = objects(("snapshot", 1, 1, 500.0), ("segment", 2, 5, 600.0))
    assert expired(listing, retention=700.0, now=1000.0) == []


def test_a_snapshot_listed_less_than_a_second_before_the_window_is_no_anchor() -> None:
    """S3 lists LastModified to the second: listed at 299.6, written up to 300.6, which is
    inside a window starting at 300.  The snapshot before it anchors instead."""
    listing = objects(
        ("snapshot", 1, 1, 100.0),
        ("segment", 2, 5, 150.0),
        ("snapshot", 5, 5, 299.6),
        ("segment", 6, 9, 320.0),
    )
    assert expired(listing, retention=700.0, now=1000.0) == []
    assert expired(listing, retention=700.0, now=1000.6) == [listing[0].key, listing[1].key]


class Recorder:
    """Stands in for the maintenance thread: records the passes it is given."""

    def __init__(self) -> None:
        self.spawned: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        self.spawned.append((fn, args))


def compactor(tmp_path: Any) -> tuple[Compactor, Recorder]:
    lock = threading.Lock()
    recent = RecentCopies(Spool(Settings(spool_dir=str(tmp_path))))
    comp = Compactor(lock, threading.Condition(lock), recent, lambda db: None)
    comp.pool = Recorder()  # type: ignore[assignment]
    return comp, comp.pool  # type: ignore[return-value]


def synced_database(**knobs: Any) -> Database:
    db = Database(1, "/a.db", name="a.db", cfg=DbConfig(**knobs))
    db.lineage.restart(
        Decision(GEN, 1, False, [], False), 512, format.DbChecksum(), 1, format.WalPos(1, 2, 0), 0
    )
    return db


def test_schedule_hands_due_work_to_one_pass_and_asks_for_snapshots(tmp_path: Any) -> None:
    comp, pool = compactor(tmp_path)
    db = synced_database(compact_segments=2, retention=0.0, snapshot_interval=60.0)
    comp.synced(db, Decision(GEN, 1, False, [], False), now=100.0)
    assert (db.upkeep.snapshot_txid, db.upkeep.snapshot_at) == (1, 100.0)
    db.upkeep.small_segments.extend((2, 2, 3, 3))
    db.lineage.next_txid = 4
    asked: list[Database] = []
    comp.schedule([db], now=160.0, request_sync=asked.append)
    ((_, (jobs,)),) = pool.spawned
    ((job_db, retain, segs, _),) = jobs
    assert job_db is db and not retain and [k.last_txid for k in segs] == [2, 3]
    assert db.upkeep.maintaining and len(db.upkeep.small_segments) == 0
    assert asked == [db] and db.upkeep.force_snapshot
    comp.schedule([db], now=161.0, request_sync=asked.append)
    assert len(pool.spawned) == 1  # one pass at a time per database
    comp.recent.close()


def test_a_broken_lineage_gets_no_maintenance(tmp_path: Any) -> None:
    comp, pool = compactor(tmp_path)
    db = synced_database(compact_segments=1)
    db.upkeep.small_segments.extend((2, 2))
    db.lineage.break_at(5)
    comp.schedule([db], now=1e6, request_sync=lambda d: None)
    assert pool.spawned == [] and not db.upkeep.maintaining
    comp.recent.close()


def test_restorable_ranges_start_at_snapshots_and_stop_at_holes() -> None:
    """A segment kept across the oldest snapshot restores nothing before it; commits whose
    segments never arrived are a hole up to the next snapshot."""
    listing = objects(
        ("segment", 105, 110, 0.0),  # straddles the snapshot at 108
        ("snapshot", 108, 108, 0.0),
        ("segment", 111, 115, 0.0),
        ("snapshot", 122, 122, 0.0),  # 116..121 never arrived
        ("segment", 123, 125, 0.0),
    )
    (gen,) = catalog.scan(listing, "a.db")[0]
    assert gen.restorable() == [(108, 115), (122, 125)]
    assert catalog.spell_ranges(gen.restorable()) == "txids 108..115, 122..125"
    assert catalog.spell_ranges([(1, 5), (6, 9), (12, 12)]) == "txids 1..9, 12"


def test_verify_goes_on_from_a_snapshot_after_a_hole_and_reports_one_without() -> None:
    from walsync_vfs import report

    listing = objects(
        ("snapshot", 1, 1, 0.0),
        ("segment", 2, 3, 0.0),
        ("segment", 6, 7, 0.0),  # 4..5 missing, nothing to go on from
        ("snapshot", 12, 12, 0.0),
        ("segment", 13, 14, 0.0),  # 8..12 missing, the snapshot at 12 goes on
    )
    (gen,) = catalog.scan(listing, "a.db")[0]
    holes = report._holes(gen)
    lines = {
        key.rsplit("/", 1)[1][:33]: (line.split(": ", 1)[1], at)
        for key, (line, at) in holes.items()
    }
    assert lines == {
        "0000000000000006-0000000000000007": ("txids 4..5 missing before it", None),
        "000000000000000d-000000000000000e": ("txids 8..12 missing before it", gen.snapshots[1]),
    }
