"""Commits made in C (csrc/commits.c, capture.extend_runs: many databases in one call, onto
runs kept open across drains) are the commits the Python lineage makes one by one: the same
txids, times, checksums and segment bytes."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from dataclasses import dataclass, field
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
    """Records made in Python, linked as the shim links a database's drained records; seqs
    go on from ``after`` (the records of an earlier drain)."""

    def __init__(self, page_size: int, db_id: int = 1, after: Chain | None = None) -> None:
        self.page_size = page_size
        self.db_id = db_id
        self.first_seq = after.first_seq + len(after.recs) if after else 1
        self.keep: list = []  # cffi memory the records point into
        self.recs: list = []

    def commit(self, db_size: int, pages: dict[int, bytes], time_ns: int = 0, **kw) -> None:
        rec = ffi.new("ws_rec *")
        rec.kind, rec.db_id = Kind.COMMIT, self.db_id
        rec.page_size = kw.get("page_size", self.page_size)
        rec.seq, rec.time_ns, rec.db_size = self.first_seq + len(self.recs), time_ns, db_size
        pgnos = kw.get("order", sorted(pages))
        rec.npages = len(pgnos)
        numbers = ffi.new("uint32_t[]", pgnos)
        data = [ffi.from_buffer(pages[p]) for p in pgnos]
        ptrs = ffi.new("unsigned char *[]", data)
        rec.pgnos, rec.pages, rec.spool_fd = numbers, ptrs, -1
        rec.salt1, rec.salt2, rec.frame_start, rec.frame_end = 5, 6, 0, int(rec.seq)
        self.keep += [rec, numbers, ptrs, data]
        if self.recs:
            self.recs[-1].next = rec
        self.recs.append(rec)

    def records(self) -> list[capture.Record]:
        return [capture.convert(rec) for rec in self.recs]


def one_by_one(
    ck: format.DbChecksum,
    records: list[capture.Record],
    first_txid: int,
    sync_seq: int = 0,
    time_ns: int = 0,
) -> list[format.Commit]:
    """What Lineage.extend makes of each record, as the engine's general path calls it."""
    from walsync_vfs.lineage import Lineage

    lineage = Lineage()
    lineage.generation, lineage.next_txid, lineage.page_size = "g", first_txid, 0
    lineage.checksum, lineage.sync_seq, lineage.time_ns = ck, sync_seq, time_ns
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
        segment = format.encode_segment(page_size, plain).data
        assert format.encode_segment(page_size, runs).data == segment
        assert format.encode_segment(page_size, [*runs[:-1], *runs[-1].commits()]).data == segment
        assert sum(r.page_count for r in runs) == sum(len(c.pages) for c in plain)
        assert (runs[0].txid, runs[-1].last_txid) == (plain[0].txid, plain[-1].txid)
        assert runs[0].time_ns == plain[0].time_ns and runs[-1].wal == plain[-1].wal


def checksum_of(size: int) -> format.DbChecksum:
    """A database of ``size`` pages whose every page hash is 0."""
    ck = format.DbChecksum()
    ck.reserve(size)
    ck.settle(size, 0)
    return ck


def random_db(rng: random.Random, page_size: int, size: int) -> format.DbChecksum:
    return format.DbChecksum.from_pages(rng.randbytes(page_size) for _ in range(size))


@dataclass
class Made:
    """What one extend_runs call made of a chain: the extension, the checksum after it, and
    the runs it began, sealed (as the uploader seals what it takes)."""

    ext: capture.Extension
    ck: format.DbChecksum
    runs: list[format.PackedRun] = field(default_factory=list)


def extend_all(
    chains: list[Chain],
    bases: list[format.DbChecksum],
    sync_seqs: list[int],
    max_bytes: int | list[int] = MAX_BYTES,
) -> list[Made]:
    """extend_runs over every chain in one call, each lineage at txid 10 from a copy of its
    base checksum, no run open, with its segment size (``max_bytes``, or one for all)."""
    cks = [base.copy() for base in bases]
    sizes = max_bytes if isinstance(max_bytes, list) else [max_bytes] * len(chains)
    starts = [
        (c.recs[0], None, max(r.db_size for r in c.recs), ck, c.page_size, 10, 0, seq, most)
        for c, ck, seq, most in zip(chains, cks, sync_seqs, sizes, strict=True)
    ]
    exts = capture.extend_runs(starts)
    return [
        Made(ext, ck, [run.seal() for run in ext.began])
        for ext, ck in zip(exts, cks, strict=True)
    ]


def check(chain: Chain, base: format.DbChecksum, sync_seq: int, made: Made) -> list[format.Commit]:
    """The records the call took, through the Python lineage from ``base``, make the commits
    and checksum it made; returns those commits."""
    ref = base.copy()
    taken = [r for r in chain.records() if r.seq <= made.ext.last_seq]
    plain = one_by_one(ref, taken, 10, sync_seq)
    same_commits(made.runs, plain, chain.page_size)
    assert (made.ck.value, made.ck.db_size) == (ref.value, ref.db_size)
    assert made.ext.made == len(plain)
    assert made.ext.pages == sum(len(c.pages) for c in plain)
    return plain


def run_all(
    chains: list[Chain],
    bases: list[format.DbChecksum],
    sync_seqs: list[int],
    max_bytes: int | list[int] = MAX_BYTES,
) -> list[Made]:
    """extend_all, each chain checked against the Python lineage."""
    made = extend_all(chains, bases, sync_seqs, max_bytes)
    for chain, base, seq, m in zip(chains, bases, sync_seqs, made, strict=True):
        check(chain, base, seq, m)
    return made


def run_both(chain: Chain, size: int, sync_seq: int = 0, max_bytes: int = MAX_BYTES) -> Made:
    """One chain from a database of ``size`` pages (every page hash 0) through extend_runs
    and through the Python lineage (see run_all)."""
    return run_all([chain], [checksum_of(size)], [sync_seq], max_bytes)[0]


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
    made = run_both(chain, 4)
    ext = made.ext
    assert [r.commit_count for r in made.runs] == [5]
    assert [c.txid for r in made.runs for c in r.commits()] == [10, 11, 12, 13, 14]
    assert [c.time_ns for r in made.runs for c in r.commits()] == [100, 200, 200, 300, 400]
    assert [run.last_seq for run in ext.began] == [5]
    assert (ext.next_txid, ext.time_ns, ext.last_seq, ext.next) == (15, 400, 5, ffi.NULL)


def test_growth_past_the_lock_page_counts_it_as_zeros():
    ps = 65536
    lock = format.lock_page(ps)
    chain = Chain(ps)
    pages = {p: os.urandom(ps) for p in (lock - 1, lock + 1, lock + 2)}
    chain.commit(lock + 2, pages)
    made = run_both(chain, lock - 2)
    assert len(made.runs) == 1 and made.ck.db_size == lock + 2


def test_records_inside_the_sync_state_are_taken_and_skipped():
    chain = Chain(512)
    for i in range(4):
        chain.commit(1, {1: bytes([i]) * 512})
    made = run_both(chain, 1, sync_seq=2)
    assert (made.ext.made, made.ext.last_seq, made.ext.began[0].last_seq) == (2, 4, 4)
    assert [c.txid for r in made.runs for c in r.commits()] == [10, 11]


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
    made = run_both(chain, 1, max_bytes=511 if bad.get("big") else MAX_BYTES)
    taken = 0 if bad.get("big") else 1
    assert made.ext.made == taken and made.ext.last_seq == taken
    assert made.ext.next == chain.recs[taken]
    assert made.ck.db_size == 1


def test_a_run_is_cut_at_about_a_segment():
    chain = Chain(1024)
    for i in range(10):
        chain.commit(3, {1: bytes([i]) * 1024, 2: bytes([i]) * 1024})
    made = run_both(chain, 3, max_bytes=3 * 2 * 1028)
    assert [r.commit_count for r in made.runs] == [3, 3, 3, 1]
    assert [run.last_seq for run in made.ext.began] == [3, 6, 9, 10]


def test_later_drains_add_to_the_open_run_until_it_is_full_or_sealed():
    """The run a database has open takes the commits of later calls (no run begins) until
    its next commit would pass a segment's size; a sealed one is never added to."""
    rng = random.Random(5)
    drains: list[Chain] = []
    for size in (2, 3, 1, 2, 2):  # commits per drain
        chain = Chain(1024, after=drains[-1] if drains else None)
        for _ in range(size):
            chain.commit(4, {rng.randrange(1, 5): rng.randbytes(1024)}, time_ns=rng.randrange(9))
        drains.append(chain)
    base = random_db(rng, 1024, 4)
    ck, txid, time_ns = base.copy(), 10, 0
    run: capture.OpenRun | None = None
    order: list[capture.OpenRun] = []  # every run begun
    sealed: dict[int, format.PackedRun] = {}
    began: list[list[int]] = []  # commits of each run begun, per call
    for i, chain in enumerate(drains):
        start = (chain.recs[0], run, 4, ck, 1024, txid, time_ns, 0, 5 * 1024)
        (ext,) = capture.extend_runs([start])
        assert ext.open is run and ext.made == len(chain.recs)
        txid, time_ns = ext.next_txid, ext.time_ns
        began.append([r.commit_count for r in ext.began])
        order += ext.began
        run = order[-1]
        if i == 2:  # the uploader takes the open run: the next commits begin another
            sealed[id(run)] = run.seal()
    # Five pages fill a run: the third drain's commit began another, which was then sealed.
    assert began == [[2], [], [1], [2], []]
    runs = [sealed[id(r)] if id(r) in sealed else r.seal() for r in order]
    assert [r.commit_count for r in runs] == [5, 1, 4]
    records = [r for chain in drains for r in chain.records()]
    same_commits(runs, one_by_one(base.copy(), records, 10), 1024)


def test_the_runs_of_a_busy_stream_are_a_few_blocks_each():
    """A run that follows a full one begins with blocks as big as that one's last, instead
    of doubling up from the smallest again: the uploader compresses and frees each block
    with a GIL hand-off the application's threads may wait for."""
    rng = random.Random(3)
    base = random_db(rng, 4096, 8)
    ck, txid, run = base.copy(), 10, None
    chains: list[Chain] = []
    runs: list[capture.OpenRun] = []
    for _ in range(60):  # drains of 20 commits: 4.7 MiB of records, runs of 1 MiB
        chain = Chain(4096, after=chains[-1] if chains else None)
        for _ in range(20):
            chain.commit(8, {rng.randrange(1, 9): rng.randbytes(4096)})
        chains.append(chain)
        start = (chain.recs[0], run, 8, ck, 4096, txid, 0, 0, 1 << 20)
        (ext,) = capture.extend_runs([start])
        txid, runs = ext.next_txid, runs + ext.began
        run = runs[-1]
    packed = [r.seal() for r in runs]
    assert [len(r.records) for r in packed] == [7, 2, 1, 1, 1]  # 16 KiB, 32 KiB, ... 1 MiB
    records = [r for chain in chains for r in chain.records()]
    same_commits(packed, one_by_one(base.copy(), records, 10), 4096)


def test_a_run_grown_over_many_calls_keeps_its_records_whole():
    """Records go in blocks that double as the run grows, a call's commits in as few as fit:
    the run reads back the same commits across the block boundaries."""
    rng = random.Random(7)
    base = random_db(rng, 4096, 8)
    ck, txid, run = base.copy(), 10, None
    chains: list[Chain] = []
    for calls in range(12):
        chain = Chain(4096, after=chains[-1] if chains else None)
        for _ in range(1 + calls % 3):
            chain.commit(8, {p: rng.randbytes(4096) for p in rng.sample(range(1, 9), 2)})
        chains.append(chain)
        (ext,) = capture.extend_runs([(chain.recs[0], run, 8, ck, 4096, txid, 0, 0, MAX_BYTES)])
        txid, run = ext.next_txid, ext.began[0] if ext.began else run
    assert run is not None
    packed = run.seal()
    assert len(packed.records) > 2 and packed.commit_count == 24
    records = [r for chain in chains for r in chain.records()]
    same_commits([packed], one_by_one(base.copy(), records, 10), 4096)


def test_captured_commits_packed_in_c_encode_to_the_same_segments(tmp_path: Path):
    """Real commits through the VFS (small, multi-page, growing, shrinking by VACUUM), drain
    after drain onto the open run, which is sealed now and then as the uploader would."""
    path = tmp_path / "db.sqlite"
    rng = random.Random(6)
    records: list[capture.Record] = []
    runs: list[format.PackedRun] = []
    state: dict = {}

    def sink(batch: capture.Batch) -> None:
        if "ck" not in state:
            return
        records.extend(r for r in batch if r.kind is Kind.COMMIT)
        for chain in batch.chains():
            s = state
            start = (chain.first, s["run"], chain.max_db_size, s["ck"], s["ps"], s["txid"],
                     s["time"], s["seq"], MAX_BYTES)  # fmt: skip
            (ext,) = capture.extend_runs([start])
            assert ext.next == ffi.NULL
            s["txid"], s["time"] = ext.next_txid, ext.time_ns
            if ext.began:
                if s["run"] is not None:
                    runs.append(s["run"].seal())
                *full, s["run"] = ext.began
                runs.extend(r.seal() for r in full)
            if s["run"] is not None and rng.random() < 0.3:
                runs.append(s["run"].seal())
                s["run"] = None

    capture.dispatcher().route_path(str(path), sink)
    try:
        con = apsw.Connection(str(path), vfs="walsync")
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
        with SyncPoint(str(path)) as sp:
            ps, _, pages = sp.pages()
            base = format.DbChecksum.from_pages(pages)
            state.update(ck=base.copy(), ps=ps, txid=1, time=0, seq=sp.seq, run=None)
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
    if state["run"] is not None:
        runs.append(state["run"].seal())
    assert sum(r.commit_count for r in runs) == 204
    same_commits(runs, one_by_one(base, records, 1, sp.seq), ps)


def test_one_call_extends_each_database_from_its_own_lineage():
    """Lone commits and runs of several databases, some not taken, in one extend_runs call."""
    rng = random.Random(3)
    lock = format.lock_page(65536)
    lone = Chain(4096, db_id=1)
    lone.commit(5, {3: rng.randbytes(4096)}, time_ns=50)
    many = Chain(512, db_id=2)
    commits = [(3, [2]), (6, [1, 4, 5, 6]), (6, [6]), (2, [1]), (4, [3, 4])]
    for i, (size, pgnos) in enumerate(commits):
        many.commit(size, {p: rng.randbytes(512) for p in pgnos}, time_ns=100 - i)
    refused = Chain(1024, db_id=3)  # its page size changed: nothing taken
    refused.commit(2, {1: rng.randbytes(512)}, page_size=512)
    refused.commit(2, {2: rng.randbytes(1024)})
    synced = Chain(512, db_id=4)  # every commit inside the sync state
    synced.commit(1, {1: rng.randbytes(512)})
    synced.commit(1, {1: rng.randbytes(512)})
    grows = Chain(65536, db_id=5)  # a lone commit past the lock page
    grows.commit(lock + 1, {lock - 1: rng.randbytes(65536), lock + 1: rng.randbytes(65536)})
    halted = Chain(1024, db_id=6)  # a lone commit, then one bigger than a segment
    halted.commit(3, {1: rng.randbytes(1024), 3: rng.randbytes(1024)})
    halted.commit(3, {p: rng.randbytes(1024) for p in (1, 2, 3)})
    chains = [lone, many, refused, synced, grows, halted]
    bases = [
        random_db(rng, 4096, 5),
        random_db(rng, 512, 3),
        random_db(rng, 1024, 2),
        random_db(rng, 512, 1),
        checksum_of(lock - 2),
        random_db(rng, 1024, 2),
    ]
    max_bytes = [MAX_BYTES] * 5 + [2 * 1024]
    made = run_all(chains, bases, [0, 0, 0, 2, 0, 0], max_bytes)
    assert [m.ext.made for m in made] == [1, 5, 0, 0, 1, 1]
    assert [len(m.runs) for m in made] == [1, 1, 0, 0, 1, 1]
    assert [m.ext.last_seq for m in made] == [1, 5, 0, 2, 1, 1]
    nexts = [ffi.NULL, ffi.NULL, refused.recs[0], ffi.NULL, ffi.NULL, halted.recs[1]]
    assert [m.ext.next for m in made] == nexts
    assert [m.ext.next_txid for m in made] == [11, 15, 10, 10, 11, 11]
    assert [m.ext.time_ns for m in made] == [50, 100, 0, 0, 0, 0]
    assert [m.ck.db_size for m in made] == [5, 4, 2, 1, lock + 1, 3]
    assert made[2].ck.value == bases[2].value and made[3].ck.value == bases[3].value


def flip_a_page_byte(made: Made) -> None:
    records = made.runs[0].records[0]
    records[4] ^= 1  # the first page's first byte, after its page number


@pytest.mark.parametrize("mutation", ["swapped lineages", "a page byte flipped"])
def test_the_check_fails_when_the_c_gets_a_commit_wrong(mutation):
    """The comparison the tests above rely on catches a database extended from another's
    lineage, and a page byte the C packed wrong."""
    rng = random.Random(4)
    a, b = Chain(512, db_id=1), Chain(512, db_id=2)
    a.commit(3, {1: rng.randbytes(512)})
    b.commit(3, {2: rng.randbytes(512)})
    bases = [random_db(rng, 512, 3), random_db(rng, 512, 3)]
    check(a, bases[0], 0, extend_all([a], [bases[0]], [0])[0])  # as it should be: passes
    if mutation == "swapped lineages":
        made, _ = extend_all([a, b], bases[::-1], [0, 0])
    else:
        made, _ = extend_all([a, b], bases, [0, 0])
        flip_a_page_byte(made)
    with pytest.raises(AssertionError):
        check(a, bases[0], 0, made)


def test_lone_commits_of_several_databases_drained_together(tmp_path: Path):
    """Real commits, one for each of several databases in one drain (the sink holds the
    dispatcher until every database has committed), made into commits in one call, each
    database's onto its open run, and one by one."""
    paths = [str(tmp_path / f"db{i}.sqlite") for i in range(5)]
    dbs: dict[int, dict] = {}  # db_id -> its lineage's end, open run, records, runs
    held, release = threading.Event(), threading.Event()
    seen: list[int] = []  # lone commits per drain

    def sink(batch: capture.Batch) -> None:
        chains = [c for c in batch.chains() if c.db_id in dbs and c.first.kind == Kind.COMMIT]
        if not chains:
            return  # the CLOSE records at the end
        for r in batch:
            if r.db_id in dbs:
                dbs[r.db_id]["records"].append(r)
        starts = []
        for c in chains:
            d = dbs[c.db_id]
            starts.append((c.first, d["run"], c.max_db_size, d["ck"], d["ps"], d["txid"],
                           d["time"], d["seq"], MAX_BYTES))  # fmt: skip
        for c, ext in zip(chains, capture.extend_runs(starts), strict=True):
            d = dbs[c.db_id]
            assert ext.next == ffi.NULL and ext.open is d["run"]
            d["txid"], d["time"] = ext.next_txid, ext.time_ns
            if ext.began:
                assert d["run"] is None  # small commits: the open run takes them all
                (d["run"],) = ext.began
        seen.append(sum(c.ncommit == 1 for c in chains))
        if not held.is_set():
            held.set()
            assert release.wait(10)

    for path in paths:
        capture.dispatcher().route_path(path, sink)
    cons = []
    try:
        for path in paths:
            con = apsw.Connection(path, vfs="walsync")
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
            cons.append(con)
            with SyncPoint(path) as sp:
                ps, _, pages = sp.pages()
                ck = format.DbChecksum.from_pages(pages)
                dbs[sp.db_id] = dict(base=ck.copy(), ck=ck, ps=ps, txid=1, time=0, seq=sp.seq,
                                     run=None, records=[])  # fmt: skip
        cons[0].execute("INSERT INTO t(v) VALUES (1)")
        assert held.wait(10)  # the dispatcher is in the sink: what follows queues up
        for i, con in enumerate(cons):
            con.execute("INSERT INTO t(v) VALUES (?)", (os.urandom(1000 * i),))
        release.set()
        capture.dispatcher().barrier()
        for i in range(40):  # drained as they come
            cons[i % len(cons)].execute("INSERT INTO t(v) VALUES (?)", (os.urandom(5000),))
        capture.dispatcher().barrier()
    finally:
        release.set()
        for con in cons:
            con.close()
        for path in paths:
            capture.dispatcher().route_path(path, None)
    assert seen[:2] == [1, len(paths)]  # the second drain: a lone commit of each database
    for d in dbs.values():
        run = d["run"].seal()
        same_commits([run], one_by_one(d["base"], d["records"], 1, d["seq"]), d["ps"])
    assert sum(len(d["records"]) for d in dbs.values()) == 1 + len(paths) + 40


STEADY_STREAM = """
import resource, sys, apsw, walsync_vfs
walsync_vfs.configure(replica=sys.argv[2])
con = apsw.Connection(sys.argv[1], vfs="walsync")
con.execute("PRAGMA synchronous=NORMAL")
con.execute("CREATE TABLE t(x)")
def commits(n):
    for i in range(n):
        con.execute("INSERT INTO t VALUES (?)", (i,))
    walsync_vfs.flush(timeout=60)
commits(20000)  # the blocks a steady stream needs are made once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
commits(40000)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 40000)
"""


def test_a_steady_stream_of_commits_reuses_the_memory_of_its_runs(
    tmp_path: Path, file_url: str
) -> None:
    """Each 1-row commit puts a 4 KiB page in a run: runs freed after upload give their
    blocks to the next runs, instead of every page of every run being faulted in (and zeroed
    by the kernel) anew, a page fault per commit on the capture thread."""
    out = subprocess.run(
        [sys.executable, "-c", STEADY_STREAM, str(tmp_path / "a.db"), file_url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 0.5
