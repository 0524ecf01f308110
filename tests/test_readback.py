"""Issue 14: restore and ``restore --follow`` check the whole-database checksum after every
commit without a hash per page: the share of a page a commit rewrites or cuts off is hashed
again from the old page, read back from the segment's pending pages or from the output.

Histories are built by hand (pages rewritten several times in one segment and across
segments, shrinks, growth, commits in parts), checksummed by the engine's ``DbChecksum``
(a hash per page), encoded, and applied to an ``Image`` writing a plain file (restore) or a
live rollback-mode database (follow); the output must equal the model page for page.
"""

from __future__ import annotations

import os
import random
import tempfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from walsync_vfs import format, inplace
from walsync_vfs.format import Commit, DbChecksum, Part, ReadBackChecksum
from walsync_vfs.restore import Image, RestoreError

PS = 512
GEN = "0000000000000001-deadbeef"
T0 = 1_700_000_000_000_000_000
# Page 1's header fields a rollback-mode batch sets in the follower's output (inplace.py).
BATCH_FIELDS = [inplace.FORMAT_VERSIONS, inplace.CHANGE_COUNTER, inplace.SIZE_IN_HEADER,
                inplace.VALID_FOR]  # fmt: skip


def fresh(pgno: int, seed: int) -> bytes:
    return random.Random(seed * 1_000_003 + pgno).randbytes(PS)


class Model:
    """The database a history describes, page by page, and its commits with checksums
    from the engine's DbChecksum."""

    def __init__(self, db_size: int) -> None:
        self.pages = [fresh(p, 0) for p in range(1, db_size + 1)]
        self.reference = DbChecksum.from_pages(self.pages)
        self.txid = 1

    def commit(self, db_size: int, written: list[int], seed: int | None = None) -> Commit:
        """A commit writing ``written`` and every page it adds; fresh content each time."""
        seed = self.txid + 1 if seed is None else seed
        pgnos = sorted(set(written) | set(range(len(self.pages) + 1, db_size + 1)))
        pages = tuple((p, fresh(p, seed)) for p in pgnos)
        self.reference.apply(db_size, pages)
        self.pages = (self.pages + [b""] * db_size)[:db_size]
        for p, data in pages:
            self.pages[p - 1] = data
        self.txid += 1
        return Commit(self.txid, T0 + self.txid, db_size, self.reference.value, pages)


def segment_key(first: int, last: int, part: tuple[int, int] | None = None) -> str:
    return format.segment_key("db", GEN, first, last, part=part)


def apply(image: Image, commits: list[Commit]) -> str:
    """Encode ``commits`` as one segment and apply it as a restore does; returns its key."""
    key = segment_key(commits[0].txid, commits[-1].txid)
    header, decoded = format.decode_segment(format.encode_segment(PS, commits).data, key)
    assert image.apply_segment(key, header, decoded)
    return key


def apply_parts(image: Image, commit: Commit, cuts: list[int], upto: int | None = None) -> str:
    """Apply ``commit`` as parts cut before the page indexes ``cuts`` (only the first
    ``upto`` of them if given); returns the last key."""
    bounds = [0, *cuts, len(commit.pages)]
    count = len(bounds) - 1
    for i in range(count if upto is None else upto):
        pages = commit.pages[bounds[i] : bounds[i + 1]]
        part = Part(i, count, len(commit.pages))
        obj = format.encode_part(
            PS, commit, part, [p for p, _ in pages], [d for _, d in pages]
        ).data
        key = segment_key(commit.txid, commit.txid, (i, count))
        header, decoded = format.decode_segment(bytes(obj), key)
        assert image.apply_segment(key, header, decoded)
    return key


def start(sink: str, path: Path, model: Model) -> Image:
    """The model's current state as a snapshot, streamed into ``path``; for ``live``, the
    file then becomes a follower's output, written in place (restore.Follower._rebuild)."""
    data = b"".join(format.encode_snapshot(model.pages, PS, model.txid, T0, len(model.pages)))
    f = open(path, "w+b")  # noqa: SIM115 (closed below, or with the image)
    image = Image.from_snapshot(f, GEN, format.read_snapshot(data, "db/snap"))
    if sink == "live":
        page1 = image.sink.read(1, 1)
        inplace.set_rollback_mode(f)
        f.close()
        image.sink = inplace.LiveDatabase(str(path), PS, page1)
    return image


def close(image: Image) -> None:
    if isinstance(image.sink, inplace.LiveDatabase):
        image.sink.close()
    else:
        image.sink.file.close()


def stored(path: Path, sink: str) -> list[bytes]:
    data = path.read_bytes()
    pages = [bytearray(data[i : i + PS]) for i in range(0, len(data), PS)]
    if sink == "live" and pages:
        for field in BATCH_FIELDS:
            pages[0][field] = bytes(field.stop - field.start)
    return [bytes(p) for p in pages]


def assert_equal(image: Image, model: Model, path: Path, sink: str) -> None:
    expected = [bytearray(p) for p in model.pages]
    if sink == "live" and expected:
        for field in BATCH_FIELDS:
            expected[0][field] = bytes(field.stop - field.start)
    assert stored(path, sink) == [bytes(p) for p in expected]
    assert (image.checksum.value, image.checksum.db_size) == (
        model.reference.value,
        len(model.pages),
    )
    assert image.result.txid == model.txid


@pytest.fixture(params=["file", "live"])
def sink(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def restored(sink: str, tmp_path: Path) -> Iterator[tuple[Model, Image, Path]]:
    model = Model(20)
    path = tmp_path / "out.db"
    image = start(sink, path, model)
    yield model, image, path
    close(image)


def test_pages_rewritten_within_and_across_segments(restored, sink):
    """The old version of a page rewritten twice in one segment is the earlier commit's,
    still pending; in the next segment it is the output's."""
    model, image, path = restored
    apply(image, [model.commit(20, [2, 3]), model.commit(20, [2, 5]), model.commit(20, [2, 3, 4])])
    assert_equal(image, model, path, sink)
    apply(image, [model.commit(20, [1, 2, 3]), model.commit(20, [3, 19, 20])])
    assert_equal(image, model, path, sink)


def test_shrink_and_growth_within_and_across_segments(restored, sink):
    """A VACUUM-like shrink cuts pages some of which are pending, then growth adds them back."""
    model, image, path = restored
    apply(image, [model.commit(20, [12, 15]), model.commit(8, [1, 2]), model.commit(12, [10])])
    assert_equal(image, model, path, sink)
    apply(image, [model.commit(12, [11]), model.commit(5, [1]), model.commit(30, [3])])
    assert_equal(image, model, path, sink)
    apply(image, [model.commit(2, [2])])
    assert_equal(image, model, path, sink)


def test_commits_in_parts_that_rewrite_grow_and_shrink(restored, sink):
    """Each part is written before the next arrives; the pages before the commit are read back
    from the output, whichever parts came before."""
    model, image, path = restored
    apply(image, [model.commit(20, [4, 9])])
    apply_parts(image, model.commit(26, [1, 4, 5, 9, 17]), [3, 7])  # rewrites and growth
    assert_equal(image, model, path, sink)
    apply_parts(image, model.commit(10, [1, 2, 3, 9, 10]), [1, 4])  # a shrink
    assert_equal(image, model, path, sink)
    apply(image, [model.commit(10, [9, 10]), model.commit(10, [9])])
    assert_equal(image, model, path, sink)


@pytest.mark.parametrize(
    ("size", "written", "cuts", "upto"),
    [
        (26, [1, 4, 5, 9, 17], [3, 5, 6, 8], 4),  # rewrites, and growth written already
        (10, [1, 2, 3, 9, 10], [1, 4], 2),  # a shrink
    ],
)
def test_a_commit_in_parts_abandoned_half_way_leaves_the_last_commit(
    restored, sink, size, written, cuts, upto
):
    """A restore carrying on after a part vanished, as a follower does: the parts applied so
    far are dropped (the plain file gets back the pages they overwrote, and its size), and
    the commit, fetched again, applies from its first part."""
    model, image, path = restored
    apply(image, [model.commit(20, [4, 9])])
    saved, before = image.checksum.copy(), stored(path, sink)
    commit = model.commit(size, written)
    apply_parts(image, commit, cuts, upto)
    if sink == "file":  # its earlier parts are in the file already
        assert stored(path, sink) != before
    image.abandon(saved)
    assert stored(path, sink) == before
    apply_parts(image, commit, cuts)
    assert_equal(image, model, path, sink)


def corrupt(path: Path, pgno: int) -> None:
    with open(path, "r+b") as f:
        f.seek((pgno - 1) * PS + 200)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))


@pytest.mark.parametrize(
    "history, damaged",
    [
        ([(20, [3])], 3),  # a page rewritten
        ([(20, [1]), (20, [1, 7])], 7),  # rewritten by the second commit of a segment
        ([(9, [1])], 15),  # a page cut off
    ],
)
def test_a_corrupted_old_page_in_the_output_is_detected(restored, sink, history, damaged):
    model, image, path = restored
    apply(image, [model.commit(20, [2, 3])])
    corrupt(path, damaged)
    commits = [model.commit(size, written) for size, written in history]
    with pytest.raises(RestoreError) as raised:
        apply(image, commits)
    key = segment_key(commits[0].txid, commits[-1].txid)
    assert str(raised.value) == (
        f"{key}: whole-database checksum mismatch after txid {commits[-1].txid}"
    )


def test_a_corrupted_old_page_under_a_commit_in_parts_is_detected(restored, sink):
    model, image, path = restored
    corrupt(path, 6)
    commit = model.commit(20, [2, 6, 11])
    with pytest.raises(RestoreError) as raised:
        apply_parts(image, commit, [2])
    last = segment_key(commit.txid, commit.txid, (1, 2))
    assert str(raised.value) == f"{last}: whole-database checksum mismatch after txid {commit.txid}"


def test_a_wrong_checksum_in_a_segment_is_detected(restored):
    model, image, _ = restored
    good = model.commit(20, [4])
    bad = Commit(good.txid, good.time_ns, good.db_size, good.checksum ^ 1, good.pages)
    with pytest.raises(RestoreError, match=f"mismatch after txid {good.txid}$"):
        apply(image, [bad])


def test_a_failed_commit_in_parts_is_abandoned_and_applied_again(tmp_path):
    """As a follower does: its first part goes into the open transaction, its last one fails
    the checksum, the transaction is dropped and the checksum restored with two ints; the
    same commit, fetched again intact, then applies."""
    model = Model(20)
    path = tmp_path / "out.db"
    image = start("live", path, model)
    try:
        apply(image, [model.commit(20, [1, 5])])
        saved = image.checksum.copy()
        before = path.read_bytes()
        good = model.commit(24, [1, 5, 8, 13])
        bad = Commit(good.txid, good.time_ns, good.db_size, good.checksum ^ 1, good.pages)
        with pytest.raises(RestoreError, match="checksum mismatch"):
            apply_parts(image, bad, [2])
        image.abandon(saved)
        assert path.read_bytes() == before
        assert not os.path.exists(f"{path}-journal")
        apply_parts(image, good, [2])
        assert_equal(image, model, path, "live")
    finally:
        close(image)


def test_a_foreign_write_to_the_followers_output_is_named_before_any_read_back(tmp_path):
    """Old pages are read outside a transaction: a file another process wrote since the last
    one is reported as such (the follower then rebuilds it), not as a checksum mismatch."""
    model = Model(20)
    path = tmp_path / "out.db"
    image = start("live", path, model)
    try:
        apply(image, [model.commit(20, [1, 5])])
        corrupt(path, 5)  # as another writer would: a page changed, and the counter
        with open(path, "r+b") as f:
            f.seek(inplace.CHANGE_COUNTER.start)
            f.write(b"\xff\xff\xff\xff")
        with pytest.raises(inplace.ForeignWriter, match="written by another process"):
            apply(image, [model.commit(20, [5])])
    finally:
        close(image)


@st.composite
def histories(draw: st.DrawFn) -> list[list[tuple[int, list[int], bool]]]:
    """Segments of (db_size, pages written, in parts) commits; a commit in parts is alone
    in its segment, as the format has it."""
    segments = []
    for _ in range(draw(st.integers(1, 5))):
        if draw(st.booleans()):
            size = draw(st.integers(2, 24))
            written = draw(st.lists(st.integers(1, size), min_size=2, max_size=8))
            segments.append([(size, written, True)])
        else:
            commits = []
            for _ in range(draw(st.integers(1, 4))):
                size = draw(st.integers(1, 24))
                commits.append((size, draw(st.lists(st.integers(1, size), max_size=6)), False))
            segments.append(commits)
    return segments


@pytest.mark.parametrize("sink", ["file", "live"])
@settings(max_examples=40, deadline=None)
@given(initial=st.integers(1, 24), history=histories(), data=st.data())
def test_any_history_restores_equal(sink, initial, history, data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "out.db"
        model = Model(initial)
        image = start(sink, path, model)
        try:
            for segment in history:
                commits = [model.commit(size, written) for size, written, _ in segment]
                if segment[0][2] and len(commits[0].pages) >= 2:
                    n = len(commits[0].pages)
                    cuts = data.draw(st.lists(st.integers(1, n - 1), min_size=1, unique=True))
                    apply_parts(image, commits[0], sorted(cuts))
                else:
                    apply(image, commits)
                assert_equal(image, model, path, sink)
        finally:
            close(image)


def test_read_back_checksum_equals_the_per_page_one_across_the_lock_page():
    """The page holding SQLite's pending byte counts as zeros unless given, whole or in
    parts; the old pages come from a dictionary here, so no 1 GiB file is needed."""
    size = 65536
    lock = format.lock_page(size)
    one = bytes(range(256)) * 256
    stored_pages = dict.fromkeys(range(1, lock - 1), one)

    def old(first: int, count: int) -> int:
        value = 0
        for pgno in range(first, first + count):
            value ^= format.page_hash(pgno, stored_pages.get(pgno, bytes(size)))
        return value

    reference = DbChecksum.from_pages([one] * (lock - 2))
    start_value = reference.value
    grown = [(p, one) for p in range(lock - 1, lock + 3) if p != lock]
    reference.apply(lock + 2, grown)
    whole = ReadBackChecksum(start_value, lock - 2)
    whole.apply(lock + 2, grown, size, old)
    assert (whole.value, whole.db_size) == (reference.value, reference.db_size)

    in_parts = ReadBackChecksum(start_value, lock - 2)
    old_size = in_parts.resize(lock + 2, size, old)
    in_parts.update(grown[:1], old_size, size, old)
    in_parts.update(grown[1:], old_size, size, old)
    assert in_parts.value == reference.value

    given = [(lock, one)]  # a writer that did write it: its bytes count, not zeros
    reference.apply(lock + 2, given)
    stored_pages.update({p: d for p, d in grown})
    whole.apply(lock + 2, given, size, old)
    assert whole.value == reference.value

    with pytest.raises(ValueError, match=f"page {lock + 1} was not given"):
        ReadBackChecksum(start_value, lock - 2).apply(lock + 2, grown[:1], size, old)
    with pytest.raises(ValueError, match=f"page {lock + 3} outside a database"):
        whole.apply(lock + 2, [(lock + 3, one)], size, old)
    assert whole.value == reference.value


def restore_peak(pages: int) -> tuple[int, ReadBackChecksum]:
    """Peak traced memory of rebuilding a database of ``pages`` pages from its snapshot and
    then cutting it to 10 pages in one commit (every cut page read back)."""
    model = Model(0)
    model.pages = [bytes([p % 251]) * PS for p in range(1, pages + 1)]
    model.reference = DbChecksum.from_pages(model.pages)
    data = b"".join(format.encode_snapshot(model.pages, PS, 1, T0, pages))
    shrink = model.commit(10, [1])
    key = segment_key(shrink.txid, shrink.txid)
    segment = format.decode_segment(format.encode_segment(PS, [shrink]).data, key)
    with tempfile.TemporaryFile() as f:
        tracemalloc.start()
        try:
            image = Image.from_snapshot(f, GEN, format.read_snapshot(data, "db/snap"))
            image.apply_segment(key, *segment)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert image.checksum.value == model.reference.value
    return peak, image.checksum


def test_restore_memory_does_not_grow_with_the_database():
    """No state per page: eight times the pages, the same peak (a hash per page would add
    8 bytes a page, 448 KiB here, and as much again to cut them off)."""
    small, _ = restore_peak(8 << 10)
    large, checksum = restore_peak(64 << 10)
    assert large - small < 128 << 10, f"{small >> 10} KiB, then {large >> 10} KiB"
    assert not hasattr(checksum, "__dict__")


@pytest.mark.parametrize("count", [0, 1, format.checksum.RUN_IN_SHIM - 1, 40])
@pytest.mark.parametrize("page_size", [512, 4096, 65536])
def test_a_run_hashes_as_its_pages_do(count, page_size):
    """Short runs are hashed here, long ones by the shim: the same sum either way."""
    run = random.Random(count).randbytes(count * page_size)
    pages = [run[i * page_size : (i + 1) * page_size] for i in range(count)]
    expected = 0
    for i, page in enumerate(pages):
        expected ^= format.page_hash(1000 + i, page)
    assert format.run_hash(1000, run, page_size) == expected
    assert format.run_hash(1000, memoryview(run), page_size) == expected
