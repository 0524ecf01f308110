"""Commits made in C a run at a time (csrc/commits.c, capture.extend_run) are the commits the
Python lineage makes one by one: the same txids, times, checksums and segment bytes."""

from __future__ import annotations

import os
import random
from pathlib import Path

import apsw
import pytest
import xxhash

import walsync_vfs  # noqa: F401  (registers the VFS)
from walsync_vfs import capture, format
from walsync_vfs.capture import Kind, SyncPoint, ffi, lib

MAX_BYTES = 16 << 20


@pytest.mark.parametrize("page_size", [512, 1024, 4096, 8192, 65536])
def test_page_hash_is_xxh3_seeded_with_the_page_number(page_size):
    rng = random.Random(page_size)
    for seed in [1, 2, 255, 1 << 20, (1 << 32) - 1, rng.getrandbits(32)]:
        page = rng.randbytes(page_size)
        assert lib.ws_page_hash(page, page_size, seed) == xxhash.xxh3_64_intdigest(page, seed=seed)
    assert lib.ws_page_hash(bytes(page_size), page_size, 7) == format.page_hash(7, bytes(page_size))


class Chain:
    """Records made in Python, linked as the shim links a database's drained records."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.keep: list = []  # cffi memory the records point into
        self.recs: list = []

    def commit(self, db_size: int, pages: dict[int, bytes], time_ns: int = 0, **kw) -> None:
        rec = ffi.new("ws_rec *")
        rec.kind, rec.db_id, rec.page_size = Kind.COMMIT, 1, kw.get("page_size", self.page_size)
        rec.seq, rec.time_ns, rec.db_size = len(self.recs) + 1, time_ns, db_size
        pgnos = kw.get("order", sorted(pages))
        rec.npages = len(pgnos)
        numbers = ffi.new("uint32_t[]", pgnos)
        data = [ffi.from_buffer(pages[p]) for p in pgnos]
        ptrs = ffi.new("unsigned char *[]", data)
        rec.pgnos, rec.pages, rec.spool_fd = numbers, ptrs, -1
        rec.salt1, rec.salt2, rec.frame_start, rec.frame_end = 5, 6, 0, len(self.recs) + 1
        self.keep += [rec, numbers, ptrs, data]
        if self.recs:
            self.recs[-1].next = rec
        self.recs.append(rec)

    def records(self) -> list[capture.Record]:
        return [capture.convert(rec) for rec in self.recs]


def one_by_one(
    ck: format.DbChecksum, records: list[capture.Record], first_txid: int, sync_seq: int = 0
) -> list[format.Commit]:
    """What Lineage.extend makes of each record, as the engine's general path calls it."""
    from walsync_vfs.lineage import Lineage

    lineage = Lineage()
    lineage.generation, lineage.next_txid, lineage.page_size = "g", first_txid, 0
    lineage.checksum, lineage.sync_seq = ck, sync_seq
    return [lineage.extend(r) for r in records if lineage.follows(r)]


def same_commits(runs: list[format.PackedRun], plain: list[format.Commit], page_size: int) -> None:
    """The runs hold the commits ``plain`` holds, and encode to the same segment bytes (as
    they are, or mixed with an unpacked commit)."""
    packed = [c for r in runs for c in r.commits()]
    assert [(c.txid, c.time_ns, c.db_size, c.checksum, c.wal) for c in packed] == [
        (c.txid, c.time_ns, c.db_size, c.checksum, c.wal) for c in plain
    ]
    for a, b in zip(packed, plain, strict=True):
        assert [(p, bytes(d)) for p, d in a.pages] == [(p, bytes(d)) for p, d in b.pages]
    if packed:
        segment = format.encode_segment(page_size, plain)
        assert format.encode_segment(page_size, runs) == segment
        assert format.encode_segment(page_size, [*runs[:-1], *runs[-1].commits()]) == segment
        assert sum(r.page_count for r in runs) == sum(len(c.pages) for c in plain)
        assert (runs[0].txid, runs[-1].last_txid) == (plain[0].txid, plain[-1].txid)
        assert runs[0].time_ns == plain[0].time_ns and runs[-1].wal == plain[-1].wal


def run_both(chain: Chain, size: int, sync_seq: int = 0, max_bytes: int = MAX_BYTES):
    """extend_run from a database of ``size`` pages (every page hash 0), and the same records
    through the Python lineage; returns (run, checksum after it, Python commits)."""
    ck, ref = format.DbChecksum(), format.DbChecksum()
    for c in (ck, ref):
        c.reserve(size)
        c.settle(size, 0)
    extent = max(rec.db_size for rec in chain.recs)
    run = capture.extend_run(chain.recs[0], extent, ck, chain.page_size, 10, 0, sync_seq, max_bytes)
    taken = [r for r in chain.records() if r.seq <= run.last_seq]
    plain = one_by_one(ref, taken, 10, sync_seq)
    same_commits([r for _, r in run.runs], plain, chain.page_size)
    assert (ck.value, ck.db_size) == (ref.value, ref.db_size)
    return run, ck, plain


def test_a_run_rewrites_grows_and_shrinks_as_the_lineage_does():
    rng = random.Random(1)
    chain = Chain(1024)

    def page() -> bytes:
        return rng.randbytes(1024)

    chain.commit(4, {1: page(), 3: page()}, time_ns=100)
    chain.commit(6, {2: page(), 5: page(), 6: page()}, time_ns=200)
    chain.commit(6, {6: page()}, time_ns=150)  # a clock stepped back: the time stays 200
    chain.commit(2, {1: page()}, time_ns=300)  # cut to 2 pages
    chain.commit(3, {3: page(), 2: page()}, time_ns=400)
    run, _, plain = run_both(chain, 4)
    assert len(run.runs) == 1
    assert [c.txid for c in plain] == [10, 11, 12, 13, 14]
    assert [c.time_ns for c in plain] == [100, 200, 200, 300, 400]
    assert [s for _, r in run.runs for s in r.seqs] == [1, 2, 3, 4, 5]
    assert (run.next_txid, run.time_ns, run.last_seq, run.next) == (15, 400, 5, ffi.NULL)


def test_growth_past_the_lock_page_counts_it_as_zeros():
    ps = 65536
    lock = format.lock_page(ps)
    chain = Chain(ps)
    pages = {p: os.urandom(ps) for p in (lock - 1, lock + 1, lock + 2)}
    chain.commit(lock + 2, pages)
    run, ck, _ = run_both(chain, lock - 2)
    assert len(run.runs) == 1 and ck.db_size == lock + 2


def test_records_inside_the_sync_state_are_taken_and_skipped():
    chain = Chain(512)
    for i in range(4):
        chain.commit(1, {1: bytes([i]) * 512})
    run, _, _ = run_both(chain, 1, sync_seq=2)
    assert [s for _, r in run.runs for s in r.seqs] == [3, 4]
    assert [c.txid for _, r in run.runs for c in r.commits()] == [10, 11]


@pytest.mark.parametrize(
    "bad",
    [
        dict(db_size=3, pages={1: b"x" * 512, 3: b"y" * 512}),  # page 2 of the growth missing
        dict(db_size=2, pages={1: b"x" * 512, 2: b"y" * 512}, order=[2, 1]),  # not ascending
        dict(db_size=2, pages={3: b"x" * 512}),  # outside the database
        dict(db_size=1, pages={1: b"x" * 1024}, page_size=1024),  # another page size
        dict(db_size=1, pages={1: b"x" * 512}, big=True),  # bigger than a segment
    ],
)
def test_a_record_the_run_cannot_take_ends_it_untouched(bad):
    chain = Chain(512)
    chain.commit(1, {1: b"a" * 512})
    kw = {k: bad[k] for k in ("order", "page_size") if k in bad}
    chain.commit(bad["db_size"], bad["pages"], **kw)
    chain.commit(1, {1: b"c" * 512})
    run, ck, _ = run_both(chain, 1, max_bytes=511 if bad.get("big") else MAX_BYTES)
    taken = 0 if bad.get("big") else 1
    assert sum(r.commit_count for _, r in run.runs) == taken and run.last_seq == taken
    assert run.next == chain.recs[taken]
    assert ck.db_size == 1


def test_captured_commits_packed_in_c_encode_to_the_same_segments(tmp_path: Path):
    """Real commits through the VFS (small, multi-page, growing, shrinking by VACUUM), each
    drained batch made into commits both ways."""
    path = tmp_path / "db.sqlite"
    seen: list[tuple[list[format.PackedRun], list[format.Commit]]] = []
    state: dict = {}

    def sink(batch: capture.Batch) -> None:
        records = list(batch)
        for chain in batch.chains():
            if "ck" not in state:
                continue
            ck, ref, txid, seq = state["ck"], state["ck"].copy(), state["txid"], state["seq"]
            extent = chain.max_db_size
            run = capture.extend_run(chain.first, extent, ck, state["ps"], txid, 0, seq, MAX_BYTES)
            taken = [r for r in records if r.kind is Kind.COMMIT and r.seq <= run.last_seq]
            seen.append(([r for _, r in run.runs], one_by_one(ref, taken, txid, seq)))
            state["txid"] = run.next_txid

    capture.dispatcher().route_path(str(path), sink)
    try:
        con = apsw.Connection(str(path), vfs="walsync")
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
        with SyncPoint(str(path)) as sp:
            ps, _, pages = sp.pages()
            state.update(ck=format.DbChecksum.from_pages(pages), ps=ps, txid=1, seq=sp.seq)
        for i in range(200):
            con.execute("INSERT INTO t(v) VALUES (?)", (os.urandom(i * 37),))
        with con:
            for _ in range(300):
                con.execute("INSERT INTO t(v) VALUES (randomblob(3000))")
        con.execute("DELETE FROM t WHERE id % 3 = 0")
        con.execute("VACUUM")
        con.execute("UPDATE t SET v = zeroblob(10) WHERE id < 50")
        capture.dispatcher().barrier()
        con.close()
    finally:
        capture.dispatcher().route_path(str(path), None)
    assert sum(r.commit_count for runs, _ in seen for r in runs) == 204
    for packed, plain in seen:
        same_commits(packed, plain, ps)


def test_a_run_is_cut_into_pieces_of_about_a_segment():
    chain = Chain(1024)
    for i in range(10):
        chain.commit(3, {1: bytes([i]) * 1024, 2: bytes([i]) * 1024})
    run, _, _ = run_both(chain, 3, max_bytes=3 * 2 * 1028)
    assert [r.commit_count for _, r in run.runs] == [3, 3, 3, 1]
    assert [seq for seq, _ in run.runs] == [3, 6, 9, 10]
