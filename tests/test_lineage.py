"""The lineage decision at a sync point, and the lineage's own bookkeeping (no I/O)."""

from __future__ import annotations

from walsync_vfs import format
from walsync_vfs.capture import Kind, Record
from walsync_vfs.lineage import Head, Lineage, decide, holds

PAGE = 512


def pages(*fills: int) -> list[bytes]:
    return [bytes([f]) * PAGE for f in fills]


def checksum(*fills: int) -> format.DbChecksum:
    return format.DbChecksum.from_pages(pages(*fills))


def head_of(ck: format.DbChecksum, txid: int = 7, page_size: int = PAGE) -> Head:
    return Head("gen-a", txid, page_size, ck.db_size, ck.value, 1000)


def new_id(txid: int) -> str:
    return f"new-{txid}"


def survivor(txid: int) -> format.Commit:
    return format.Commit(txid, 0, 2, 0, ((1, pages(9)[0]),))


def test_matching_bytes_continue_the_lineage() -> None:
    ck = checksum(1, 2)
    decision = decide(head_of(ck), ck, PAGE, [], new_generation=new_id)
    assert (decision.generation, decision.txid, decision.continues) == ("gen-a", 7, True)
    assert not decision.snapshot and decision.how == "continued"


def test_different_bytes_start_a_new_generation_after_the_head() -> None:
    decision = decide(head_of(checksum(1, 2)), checksum(1, 3), PAGE, [], new_generation=new_id)
    assert (decision.generation, decision.txid, decision.continues) == ("new-8", 8, False)
    assert decision.snapshot and decision.how == "new generation"


def test_a_grown_database_is_not_the_replicas_state() -> None:
    """Same pages, one more: the whole-db size is part of the state."""
    assert not holds(head_of(checksum(1, 2)), checksum(1, 2, 0), PAGE)


def test_survivors_from_the_wal_continue_the_lineage_past_the_head() -> None:
    """The database is ahead of its replica; commits recovered from the WAL lead there."""
    recovered = [survivor(8), survivor(9)]
    head = head_of(checksum(1, 2))
    decision = decide(head, checksum(4, 4), PAGE, recovered, new_generation=new_id)
    assert (decision.generation, decision.txid, decision.continues) == ("gen-a", 9, True)
    assert decision.survivors == recovered and not decision.snapshot
    assert decision.how == "continued; 2 commits recovered from the WAL"


def test_a_page_size_change_starts_a_new_generation() -> None:
    ck = checksum(1, 2)
    decision = decide(head_of(ck, page_size=1024), ck, PAGE, [], new_generation=new_id)
    assert (decision.generation, decision.continues, decision.snapshot) == ("new-8", False, True)


def test_an_empty_replica_starts_the_first_generation_at_txid_1() -> None:
    decision = decide(Head(), checksum(1), PAGE, [], new_generation=new_id)
    assert (decision.generation, decision.txid, decision.continues) == ("new-1", 1, False)
    assert not holds(Head(), checksum(1), PAGE)


def test_a_due_periodic_snapshot_needs_commits_since_the_last() -> None:
    ck = checksum(1, 2)
    taken = decide(head_of(ck), ck, PAGE, [], snapshot_due=True, snapshot_txid=5)
    assert taken.continues and taken.snapshot and taken.how == "snapshot"
    skipped = decide(head_of(ck), ck, PAGE, [], snapshot_due=True, snapshot_txid=7)
    assert skipped.continues and not skipped.snapshot


def commit_record(seq: int, *fills: int, page_size: int = PAGE, time_ns: int = 123) -> Record:
    data = tuple((pgno, bytes([f]) * page_size) for pgno, f in enumerate(fills, 1))
    return Record(Kind.COMMIT, 1, seq, time_ns, page_size, len(fills), data, (5, 6), (0, seq))


def test_a_lineage_extends_commit_by_commit_from_its_sync_point() -> None:
    lineage = Lineage()
    assert lineage.head(None) is None  # a first sync needs the replica's head
    stored = Head("gen-s", 3)
    assert lineage.head(stored) is stored
    decision = decide(Head(), checksum(1, 2), PAGE, [], new_generation=new_id)
    lineage.restart(decision, PAGE, checksum(1, 2), 10, format.WalPos(1, 2, 3), 0)
    assert not lineage.follows(commit_record(10, 1, 2))  # inside the snapshot
    rec = commit_record(11, 3, 2)
    assert lineage.follows(rec)
    commit = lineage.extend(rec)
    assert (commit.txid, commit.checksum, commit.wal) == (
        2,
        checksum(3, 2).value,
        format.WalPos(5, 6, 11),
    )
    assert lineage.head(None) == Head(
        "new-1", 2, PAGE, 2, checksum(3, 2).value, 123, format.WalPos(5, 6, 11)
    )


def test_commit_times_never_go_backwards_when_the_clock_is_stepped_back() -> None:
    lineage = Lineage()
    decision = decide(Head(), checksum(1), PAGE, [], new_generation=new_id)
    lineage.restart(decision, PAGE, checksum(1), 1, format.WalPos(1, 2, 3), time_ns=1_000)
    times = [
        lineage.extend(commit_record(seq, seq, time_ns=t)).time_ns
        for seq, t in [(2, 5_000), (3, 2_000), (4, 6_000)]
    ]  # the clock stepped back once
    assert times == [5_000, 5_000, 6_000]
    early = lineage.extend(commit_record(5, 5, time_ns=500))  # before the sync point's time
    assert early.time_ns == 6_000


def test_a_broken_lineage_takes_no_commit_and_compares_with_nothing() -> None:
    lineage = Lineage()
    decision = decide(Head(), checksum(1), PAGE, [], new_generation=new_id)
    lineage.restart(decision, PAGE, checksum(1), 1, format.WalPos(1, 2, 3), 0)
    lineage.break_at(5)  # e.g. VACUUM changed the page size at seq 5
    assert not lineage.follows(commit_record(6, 1))
    assert lineage.head(Head("gen-s", 3)) == Head(None, 1)  # a new generation follows
    assert lineage.sync_seq == 5


def test_after_a_lost_commit_the_lineage_ends_before_it_until_a_sync_point_past_it() -> None:
    lineage = Lineage()
    decision = decide(Head(), checksum(1), PAGE, [], new_generation=new_id)
    lineage.restart(decision, PAGE, checksum(1), 1, format.WalPos(1, 2, 3), 0)
    lineage.extend(commit_record(2, 2))
    held = commit_record(3, 3)  # published before the commit the stream lost
    lineage.lost(4)
    assert lineage.follows(held)
    lineage.extend(held)
    assert not lineage.follows(commit_record(5, 5))  # built on a state without seq 4
    head = lineage.head(None)
    assert head is not None and (head.txid, head.checksum) == (3, checksum(3).value)
    # A sync point taken before the loss does not end it; one after it does.
    continued = decide(head, checksum(3), PAGE, [])
    lineage.restart(continued, PAGE, checksum(3), 3, format.WalPos(1, 2, 4), 0)
    assert not lineage.follows(commit_record(5, 5))
    lineage.restart(
        decide(head, checksum(5), PAGE, [], new_generation=new_id),
        PAGE,
        checksum(5),
        6,
        format.WalPos(1, 2, 6),
        0,
    )
    assert lineage.follows(commit_record(7, 7))
