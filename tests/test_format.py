"""Tests for walsync_vfs.format against docs/FORMAT.md.

Forged objects are built here straight from the spec's tables (not through the encoder),
so the tests also check that the code and FORMAT.md agree.
"""

import dataclasses
import hashlib
import io
import mmap
import random
import struct
from functools import reduce
from operator import xor

import pytest
import xxhash
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from walsync_vfs.config import check_name
from walsync_vfs.format import (
    SEGMENT_MAGIC,
    SNAPSHOT_MAGIC,
    Commit,
    CorruptObject,
    DbChecksum,
    IndexEntry,
    ParsedKey,
    Part,
    SnapshotHeader,
    SnapshotWriter,
    WalPos,
    compression_threads,
    decode_segment,
    encode_part,
    encode_segment,
    lock_page,
    merge_segments,
    new_generation_id,
    new_pages,
    page_hash,
    parse_key,
    read_segment_header,
    read_segment_raw,
    read_snapshot,
    segment,
    segment_key,
    snapshot_key,
    stream_part,
    stream_snapshot,
)

GEN = "0000000000000001-deadbeef"
SEG_KEY = f"db/{GEN}/seg/0000000000000005-0000000000000007.wseg"
SNAP_KEY = f"db/{GEN}/snapshot/0000000000000001.wsnap"
FUZZ = settings(max_examples=150, deadline=None)


def page(size: int, seed: int) -> bytes:
    """Half compressible, half random, so bodies mix compressed and raw zstd blocks."""
    return bytes([seed % 251]) * (size // 2) + random.Random(seed).randbytes(size - size // 2)


def make_commits(page_size: int, first: int, sizes: list[tuple[int, list[int]]]) -> list[Commit]:
    """Commits from (db_size, pgnos) pairs, each with a correct running checksum."""
    ck = DbChecksum()
    commits = []
    for i, (db_size, pgnos) in enumerate(sizes):
        pages = tuple((p, page(page_size, 1000 * i + p)) for p in pgnos)
        ck.apply(db_size, pages)
        commits.append(Commit(first + i, 1_700_000_000_000_000_000 + i, db_size, ck.value, pages))
    return commits


SMALL = make_commits(512, 5, [(2, [1, 2]), (3, [1, 3]), (1, [1])])


def reseal(obj: bytes) -> bytes:
    """Recompute the trailing SHA-256 (the last 32 bytes of both object kinds)."""
    return obj[:-32] + hashlib.sha256(obj[:-32]).digest()


def forge_segment(
    page_size: int,
    entries: list[tuple[int, ...]],
    raw: bytes,
    *,
    first: int | None = None,
    version: int = 1,
    body: bytes | None = None,
    raw_length: int | None = None,
) -> bytes:
    """A segment from §4; entries of 5 fields are packed as version 1's (32 B), of 8 fields
    as version 2's (44 B)."""
    body = zstandard.ZstdCompressor().compress(raw) if body is None else body
    first = entries[0][0] if first is None else first
    header = struct.pack(
        ">8sHHIQQIQQ", SEGMENT_MAGIC, version, 0, page_size, first, first + len(entries) - 1,
        len(entries), len(body), len(raw) if raw_length is None else raw_length,
    )  # fmt: skip
    index = b"".join(struct.pack(">QqIIQ" if len(e) == 5 else ">QqIIQIII", *e) for e in entries)
    return reseal(header + index + body + bytes(32))


def forge_snapshot(page_size: int, db_size: int, body: bytes, checksum: int = 0) -> bytes:
    header = struct.pack(">8sHHIQqI", SNAPSHOT_MAGIC, 1, 0, page_size, 1, 0, db_size)
    return reseal(header + body + struct.pack(">QQ", checksum, len(body)) + bytes(32))


def write_snapshot(page_size: int, pages: list[bytes], txid: int = 1) -> bytes:
    out = io.BytesIO()
    w = SnapshotWriter(out, page_size, txid, 123, len(pages))
    for p in pages:
        w.add_page(p)
    w.finish()
    return out.getvalue()


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
RAW_516 = struct.pack(">I", 1) + bytes(512)
BLOCK_516 = (516 << 3).to_bytes(3, "little") + RAW_516  # raw block, not the last


def frame_516(fhd: int, dict_id: bytes, blocks: bytes) -> bytes:
    """A single-segment zstd frame declaring 516 bytes (2-byte content size field)."""
    return ZSTD_MAGIC + bytes([fhd]) + dict_id + (516 - 256).to_bytes(2, "little") + blocks


def huge_frame(content_size: int) -> bytes:
    """A zstd frame declaring `content_size` bytes but holding one 8-byte raw block."""
    fhd, window = 0xC0, 0x00  # 8-byte content size field, not single-segment; 1 KiB window
    block = ((8 << 3) | 1).to_bytes(3, "little") + b"12345678"  # last block, raw, 8 bytes
    return ZSTD_MAGIC + bytes([fhd, window]) + content_size.to_bytes(8, "little") + block


def assert_corrupt(key: str, fn, *args) -> CorruptObject:
    with pytest.raises(CorruptObject) as info:
        fn(*args)
    msg = str(info.value)
    assert msg.startswith(f"{key}: ") and "\n" not in msg
    return info.value


def decode_segment_fully(data: bytes) -> list[Commit]:
    """Decode every commit; compaction's reader must accept exactly the same objects."""
    try:
        read_segment_raw(data, SEG_KEY)
        merge_ok = True
    except CorruptObject:
        merge_ok = False
    try:
        read_segment_header(data, SEG_KEY)
        _, commits = decode_segment(data, SEG_KEY)
    except CorruptObject:
        assert not merge_ok, "read_segment_raw accepted what decoding rejects"
        raise
    assert merge_ok, "read_segment_raw rejected what decoding accepts"
    return commits


def decode_snapshot_fully(src) -> tuple[SnapshotHeader, list[bytes]]:
    header, pages = read_snapshot(src, SNAP_KEY)
    return header, list(pages)


def only_corrupt(fn, *args) -> None:
    """Decoding untrusted bytes either succeeds or raises CorruptObject: nothing else."""
    try:
        fn(*args)
    except CorruptObject as e:
        assert "\n" not in str(e)


# --- keys ----------------------------------------------------------------------------


def test_key_round_trip():
    gen = new_generation_id(0x1234)
    assert gen.startswith("0000000000001234-") and len(gen) == 25
    skey = snapshot_key("app.db", gen, 0x1234)
    assert skey == f"app.db/{gen}/snapshot/0000000000001234.wsnap"
    assert parse_key(skey) == ParsedKey("app.db", gen, "snapshot", 0x1234, 0x1234)
    gkey = segment_key("app.db", gen, 0x1235, 2**64 - 1)
    assert gkey == f"app.db/{gen}/seg/0000000000001235-ffffffffffffffff.wseg"
    assert parse_key(gkey) == ParsedKey("app.db", gen, "segment", 0x1235, 2**64 - 1)
    assert parse_key(segment_key("a b", gen, 7, 7)) == ParsedKey("a b", gen, "segment", 7, 7)


def test_keys_sort_by_txid():
    gens = [new_generation_id(t) for t in (2, 10, 255, 256, 2**40)]
    assert sorted(gens) == gens
    segs = [segment_key("d", gens[0], a, a + 1) for a in (3, 9, 16, 4096)]
    assert sorted(segs) == segs


@pytest.mark.parametrize(
    "key",
    [
        "",
        f"db/{GEN}/snapshot/0000000000000001.wsnap.tmp",
        f"db/{GEN}/snapshot/000000000000001.wsnap",
        f"db/{GEN}/snapshot/000000000000000A.wsnap",
        f"db/{GEN}/seg/0000000000000002-0000000000000001.wseg",
        f"db/{GEN}/seg/0000000000000001.wseg",
        f"db/{GEN}/seg/0000000000000001-0000000000000002.wsnap",
        f"db/{GEN}/snap/0000000000000001.wsnap",
        "db/0000000000000001-deadbee/snapshot/0000000000000001.wsnap",
        "db/0000000000000001_deadbeef/snapshot/0000000000000001.wsnap",
        f"a/db/{GEN}/snapshot/0000000000000001.wsnap",
        f"/db/{GEN}/snapshot/0000000000000001.wsnap",
        f"../{GEN}/snapshot/0000000000000001.wsnap",
        f"db/{GEN}/snapshot/0000000000000001.wsnap\n",
        f"d\x00b/{GEN}/snapshot/0000000000000001.wsnap",
        f"db/{GEN}/snapshot/0000000000000001.wsnap/x",
        "db/README.md",
    ],
)
def test_parse_key_rejects_foreign(key):
    assert parse_key(key) is None


@pytest.mark.parametrize(
    "name", ["", ".", "..", "a/b", "a\\b", "x\ny", "d\x00b", "d\x7fb", ".walsync-lease"]
)
def test_one_name_rule_for_config_and_keys(name):
    """A name the configuration refuses is never put in a key, and no key parses to one."""
    for refuse in (
        lambda: check_name(name),
        lambda: snapshot_key(name, GEN, 1),
        lambda: segment_key(name, GEN, 1, 2),
    ):
        with pytest.raises(ValueError, match="invalid database name"):
            refuse()
    assert parse_key(f"{name}/{GEN}/snapshot/0000000000000001.wsnap") is None


@pytest.mark.parametrize("name", ["a b", "tenant-1.db", "données.db", "..."])
def test_valid_names_round_trip_through_keys(name):
    assert check_name(name) == name
    assert parse_key(snapshot_key(name, GEN, 1)) == ParsedKey(name, GEN, "snapshot", 1, 1)


def test_key_builders_reject_bad_parts():
    for gen in ("1-deadbeef", GEN.upper(), GEN + "0"):
        with pytest.raises(ValueError):
            segment_key("db", gen, 1, 2)
    with pytest.raises(ValueError):
        segment_key("db", GEN, 3, 2)
    with pytest.raises(ValueError):
        snapshot_key("db", GEN, 2**64)
    with pytest.raises(ValueError):
        new_generation_id(-1)


# --- checksum ------------------------------------------------------------------------


def test_page_hash_definition():
    data = page(4096, 7)
    assert page_hash(3, data) == xxhash.xxh3_64_intdigest(data, seed=3)
    assert page_hash(3, data) != page_hash(4, data)


def test_checksum_from_pages():
    pages = [page(512, i) for i in range(5)]
    ck = DbChecksum.from_pages(pages)
    assert ck.db_size == 5
    assert ck.value == reduce(xor, (page_hash(i, p) for i, p in enumerate(pages, 1)))
    assert DbChecksum.from_pages([]).value == 0


def test_checksum_apply_rejects_and_stays_unchanged():
    ck = DbChecksum.from_pages([page(512, i) for i in range(3)])
    before = (ck.value, ck.db_size)
    with pytest.raises(ValueError, match="page 5 was not given"):
        ck.apply(5, [(1, b"x"), (4, b"y")])
    with pytest.raises(ValueError, match="outside"):
        ck.apply(2, [(3, b"x")])
    with pytest.raises(ValueError, match="outside"):
        ck.apply(3, [(0, b"x")])
    with pytest.raises(ValueError):
        ck.apply(-1, [])
    assert (ck.value, ck.db_size) == before


def test_a_database_growing_past_the_lock_page_has_zeros_there():
    """SQLite never writes the page holding its pending byte (offset 2^30): a commit that
    grows the database past it does not give it, and it counts as zeros, as the file reads."""
    size = 65536
    lock = lock_page(size)
    assert lock == 16385
    one = bytes(range(256)) * 256
    grown = [(p, one) for p in range(lock - 1, lock + 3) if p != lock]
    model = [one] * (lock + 2)
    model[lock - 1] = bytes(size)
    whole = DbChecksum.from_pages([one] * (lock - 2))
    whole.apply(lock + 2, grown)
    assert whole.value == DbChecksum.from_pages(model).value
    in_parts = DbChecksum.from_pages([one] * (lock - 2))
    old = in_parts.resize(lock + 2, size)
    assert new_pages(old, lock + 2, size) == len(grown) == 3
    in_parts.update(grown)
    assert in_parts.value == whole.value


@FUZZ
@given(st.data())
def test_checksum_incremental_matches_scratch(data):
    model: list[bytes] = []
    ck = DbChecksum()
    for _ in range(data.draw(st.integers(1, 12))):
        db_size = data.draw(st.integers(0, 10))
        grown = set(range(len(model) + 1, db_size + 1))
        written = data.draw(st.sets(st.integers(1, max(db_size, 1)))) if db_size else set()
        pages = [(p, data.draw(st.binary(min_size=1, max_size=8))) for p in written | grown]
        ck.apply(db_size, pages)
        model = (model + [b""] * db_size)[:db_size]
        for p, d in pages:
            model[p - 1] = d
        assert ck.db_size == db_size
        assert ck.value == DbChecksum.from_pages(model).value


# --- segments ------------------------------------------------------------------------


def test_segment_round_trip_single():
    commit = make_commits(4096, 1, [(1, [1])])
    data = encode_segment(4096, commit).data
    assert decode_segment(data, SEG_KEY)[1] == commit
    header = read_segment_header(data, SEG_KEY)
    assert (header.page_size, header.first_txid, header.last_txid) == (4096, 1, 1)
    c = commit[0]
    assert header.index == (IndexEntry(1, c.time_ns, 1, 1, c.checksum),)


def test_part_round_trip_from_chunks_of_pages():
    """A part made from chunks of several pages decodes to the part's own pages, with the
    part descriptor and the whole commit's fields."""
    (whole,) = make_commits(1024, 9, [(40, list(range(1, 41)))])
    first, second = whole.pages[:25], whole.pages[25:]
    parts = []
    for i, pages in enumerate((first, second)):
        joined = b"".join(data for _, data in pages)
        chunks = [joined[k : k + 3 * 1024] for k in range(0, len(joined), 3 * 1024)]
        part = Part(i, 2, 40)
        obj = encode_part(1024, whole, part, [pgno for pgno, _ in pages], chunks).data
        assert obj.readonly
        header, (commit,) = decode_segment(bytes(obj), SEG_KEY)
        assert header.part == part and (header.first_txid, header.last_txid) == (9, 9)
        assert (commit.txid, commit.db_size, commit.checksum) == (9, 40, whole.checksum)
        assert commit.pages == pages
        parts.append(obj)
    # Page by page, as an in-memory commit gives them: the same object.
    by_page = [data for _, data in second]
    assert (
        encode_part(1024, whole, Part(1, 2, 40), [p for p, _ in second], by_page).data == parts[1]
    )


def test_part_streamed_in_pieces_of_any_size():
    """A part read as it downloads (restore of a giant commit): the same commit and pages in
    batches whatever the pieces, none past ``upto_txid``, and every byte flipped in its body
    caught as the damage it is, before the last batch is handed out."""
    (whole,) = make_commits(1024, 9, [(2100, list(range(1, 2101)))])  # three 1 MiB batches
    obj = bytes(encode_part(1024, whole, Part(0, 2, 2100), list(range(1, 2101)),
                            [data for _, data in whole.pages]).data)  # fmt: skip
    expected = decode_segment(obj, SEG_KEY)

    def stream(data: bytes, n: int, upto: int | None = None):
        pieces = (data[i : i + n] for i in range(0, len(data), n))
        return stream_part(pieces, len(obj), SEG_KEY, upto)

    for n in (1000, 4096 * 3 + 7, len(obj)):
        header, (commit,) = stream(obj, n)
        assert header == expected[0]
        batches = list(commit.pages.batches())
        assert len(batches) == 3 and len(commit.pages) == 2100
        assert [(p, bytes(d)) for b in batches for p, d in b] == list(whole.pages)
    assert stream(obj, 4096, upto=8) == (expected[0], [])

    def read_all(data: bytes) -> list:
        (commit,) = stream(data, 50_000)[1]
        return [(p, bytes(d)) for p, d in commit.pages]

    for pos in range(0, len(obj), 997):
        bad = bytearray(obj)
        bad[pos] ^= 0x01
        assert_corrupt(SEG_KEY, read_all, bytes(bad))
    body = bytearray(obj)
    body[len(obj) // 2] ^= 0x01
    (commit,) = stream(bytes(body), 4096)[1]
    got = []
    with pytest.raises(CorruptObject, match="sha256 mismatch"):
        got.extend(commit.pages.batches())
    assert len(got) < 3  # the last batch waits for the SHA-256
    assert_corrupt(SEG_KEY, read_all, obj[:-1])
    seg = encode_segment(512, SMALL).data
    with pytest.raises(CorruptObject, match="a whole segment where a part was listed"):
        stream_part([seg], len(seg), SEG_KEY)


@pytest.mark.parametrize(
    "pgnos, chunks, match",
    [
        ([1, 2], [bytes(1024), bytes(1000)], "whole 1024-byte pages"),
        ([1, 2], [bytes(3 * 1024)], "whole 1024-byte pages"),
        ([1, 2], [bytes(1024)], "1024 bytes of pages missing"),
        ([2, 1], [bytes(2048)], "must strictly increase"),
        ([1, 41], [bytes(2048)], "must strictly increase within 1..40"),
    ],
)
def test_encode_part_rejects(pgnos, chunks, match):
    (whole,) = make_commits(1024, 9, [(40, list(range(1, 41)))])
    with pytest.raises(ValueError, match=match):
        encode_part(1024, whole, Part(0, 2, 40), pgnos, chunks)
    with pytest.raises(ValueError, match="invalid part"):
        encode_part(1024, whole, Part(2, 2, 40), [1], [bytes(1024)])


@pytest.mark.parametrize("page_size", [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536])
def test_segment_round_trip_page_sizes(page_size):
    sizes = [(4, [1, 2, 3, 4]), (4, [2]), (2, []), (3, [1, 3]), (3, [3])]
    commits = make_commits(page_size, 2**64 - 5, sizes)
    data = encode_segment(page_size, commits).data
    assert decode_segment_fully(data) == commits
    header = read_segment_header(data, SEG_KEY)
    assert [e.page_count for e in header.index] == [4, 1, 0, 2, 1]
    assert header.last_txid == 2**64 - 1


def test_segment_round_trip_many_and_big():
    many = make_commits(1024, 100, [(i // 3 + 1, [i // 3 + 1]) for i in range(300)])
    assert decode_segment_fully(encode_segment(1024, many).data) == many
    big = make_commits(65536, 7, [(40, list(range(1, 41))), (40, list(range(1, 41, 2)))])
    data = encode_segment(65536, big, level=1).data
    assert decode_segment_fully(data) == big


def test_an_encoded_object_carries_the_sha256_of_its_bytes():
    """What an S3 PUT of it signs, had from the trailer's hash state: right for an object
    made in the heap, one made in a mapping, and a part."""
    small = encode_segment(512, SMALL)
    mapped = encode_segment(4096, make_commits(4096, 1, [(80, list(range(1, 81)))]))
    (whole,) = make_commits(1024, 9, [(40, list(range(1, 41)))])
    part = encode_part(1024, whole, Part(0, 2, 40), list(range(1, 21)),
                       [data for _, data in whole.pages[:20]])  # fmt: skip
    assert isinstance(small.data, bytes) and isinstance(mapped.data, memoryview)
    for obj in (small, mapped, part):
        assert obj.sha256 == hashlib.sha256(obj.data).hexdigest()


def test_a_segment_compressed_on_worker_threads_reads_the_same():
    commits = make_commits(4096, 1, [(i + 1, [i + 1]) for i in range(2000)])  # 8 MiB of pages
    alone = encode_segment(4096, commits).data
    with compression_threads(2):
        threaded = encode_segment(4096, commits).data
    assert encode_segment(4096, commits).data == alone  # the threads end with the block
    assert threaded != alone  # zstd cut the frame into jobs: the workers did compress it
    assert decode_segment_fully(threaded) == commits


def test_a_segment_reads_the_same_in_one_call_and_streamed(monkeypatch):
    """Decoded in one call (the usual) or in steps (a body longer than ONE_CALL_BYTES), a
    segment of 3.5 MiB of pages, several times level 1's window, gives the same commits."""
    rng = random.Random(7)
    pages = [rng.randbytes(2048) + bytes(2048) for _ in range(300)]
    commits = [
        Commit(k + 1, 1_700_000_000_000_000_000 + k, 300, k, ((k % 300 + 1, pages[k % 300]),))
        for k in range(900)
    ]
    data = encode_segment(4096, commits, 1).data
    assert decode_segment_fully(data) == commits
    monkeypatch.setattr(segment, "ONE_CALL_BYTES", 0)
    assert decode_segment_fully(data) == commits


def test_a_forged_length_under_the_one_call_bound_is_corrupt():
    """A body that declares far more than it holds: decompressed in one call, it is refused
    like any other short body."""
    raw_length = 8 << 20
    n = raw_length // (4 + 65536)
    data = forge_segment(
        65536, [(5, 0, n, n, 0)], b"", body=huge_frame(n * (4 + 65536)), raw_length=n * (4 + 65536)
    )
    assert "zstd" in assert_corrupt(SEG_KEY, decode_segment_fully, data).reason


def with_wal(commits: list[Commit]) -> list[Commit]:
    """The commits as the engine ships them: each with its WAL position."""
    return [
        Commit(c.txid, c.time_ns, c.db_size, c.checksum, c.pages, WalPos(0xFFFFFFFF, 7, 3 + i))
        for i, c in enumerate(commits)
    ]


def test_segment_is_self_consistent_with_spec():
    commits = with_wal(SMALL)
    data = encode_segment(512, commits).data
    magic, version, flags, psize, first, last, count, blen, rawlen = struct.unpack_from(
        ">8sHHIQQIQQ", data
    )
    assert (magic, version, flags, psize, first, last, count) == (SEGMENT_MAGIC, 2, 0, 512, 5, 7, 3)
    assert len(data) == 52 + 44 * count + blen + 32
    assert rawlen == sum(len(c.pages) * (4 + 512) for c in SMALL)
    for i, c in enumerate(commits):
        entry = struct.unpack_from(">QqIIQIII", data, 52 + 44 * i)
        fields = (c.txid, c.time_ns, c.db_size, len(c.pages), c.checksum)
        assert entry == (*fields, 0xFFFFFFFF, 7, 3 + i)
    body = data[52 + 44 * count : -32]
    assert zstandard.get_frame_parameters(body).content_size == rawlen
    assert hashlib.sha256(data[:-32]).digest() == data[-32:]


def test_wal_positions_round_trip_and_unknown_ones_read_as_none():
    commits = with_wal(SMALL[:2]) + SMALL[2:]  # compaction may merge old commits without one
    data = encode_segment(512, commits).data
    assert decode_segment_fully(data) == commits
    assert [e.wal for e in read_segment_header(data, SEG_KEY).index] == [
        WalPos(0xFFFFFFFF, 7, 3),
        WalPos(0xFFFFFFFF, 7, 4),
        None,
    ]


def test_version_1_segments_still_read():
    raw = struct.pack(">I", 1) + page(512, 1)
    data = forge_segment(512, [(5, 42, 1, 1, page_hash(1, page(512, 1)))], raw, version=1)
    _, (commit,) = decode_segment(data, SEG_KEY)
    assert (commit.txid, commit.time_ns, commit.wal) == (5, 42, None)
    assert read_segment_header(data, SEG_KEY).index[0].wal is None


def test_wal_salts_without_a_position_are_corrupt():
    raw = struct.pack(">I", 1) + bytes(512)
    data = forge_segment(512, [(5, 0, 1, 1, 0, 9, 9, 0)], raw, version=2)
    err = assert_corrupt(SEG_KEY, read_segment_header, data, SEG_KEY)
    assert err.reason == "txid 5: WAL salts without a WAL position"
    good = forge_segment(512, [(5, 0, 1, 1, 0, 9, 9, 1)], raw, version=2)
    assert read_segment_header(good, SEG_KEY).index[0].wal == WalPos(9, 9, 1)


@pytest.mark.parametrize(
    ("page_size", "commits", "match"),
    [
        (512, [Commit(1, 0, 1, 0, (), WalPos(1, 2, 0))], "invalid WAL position"),
        (512, [Commit(1, 0, 1, 0, (), WalPos(2**32, 2, 1))], "invalid WAL position"),
        (512, [], "at least one commit"),
        (500, SMALL, "page size"),
        (131072, SMALL, "page size"),
        (512, [SMALL[0], SMALL[2]], "not consecutive"),
        (512, [Commit(1, 0, 2, 0, ((2, bytes(512)), (1, bytes(512))))], "strictly increase"),
        (512, [Commit(1, 0, 2, 0, ((1, bytes(512)), (1, bytes(512))))], "strictly increase"),
        (512, [Commit(1, 0, 2, 0, ((0, bytes(512)),))], "strictly increase"),
        (512, [Commit(1, 0, 2, 0, ((3, bytes(512)),))], "strictly increase"),
        (512, [Commit(1, 0, 1, 0, ((1, bytes(511)),))], "page length"),
        (512, [Commit(1, 0, 0, 0, ())], "out of range"),
        (512, [Commit(1, 0, 1, 2**64, ())], "out of range"),
        (512, [Commit(-1, 0, 1, 0, ())], "out of range"),
    ],
)
def test_encode_segment_rejects(page_size, commits, match):
    with pytest.raises(ValueError, match=match):
        encode_segment(page_size, commits)


def test_upto_txid_yields_prefix():
    data = encode_segment(512, SMALL).data
    for upto in range(3, 10):
        _, got = decode_segment(data, SEG_KEY, upto_txid=upto)
        assert got == [c for c in SMALL if c.txid <= upto]


def test_upto_txid_does_not_decode_the_rest():
    # Third record is broken (pgnos out of order) but sealed with a valid SHA-256:
    # only decoding it can notice, so stopping before it must not raise.
    raw = struct.pack(">I", 1) + bytes(512) + struct.pack(">I", 1) + bytes(512)
    raw += struct.pack(">II", 2, 1) + bytes(1024)
    entries = [(5, 0, 2, 1, 0), (6, 0, 2, 1, 0), (7, 0, 2, 2, 0)]
    data = forge_segment(512, entries, raw)
    assert [c.txid for c in decode_segment(data, SEG_KEY, upto_txid=6)[1]] == [5, 6]
    err = assert_corrupt(SEG_KEY, decode_segment_fully, data)
    assert "txid 7" in err.reason


def test_segment_every_byte_flip_detected():
    data = encode_segment(512, SMALL).data
    for pos in range(len(data)):
        bad = bytearray(data)
        bad[pos] ^= 0x10
        assert_corrupt(SEG_KEY, decode_segment_fully, bytes(bad))


def test_segment_truncation_and_extension_detected():
    data = bytes(encode_segment(512, SMALL).data)
    for n in range(len(data)):
        assert_corrupt(SEG_KEY, decode_segment_fully, data[:n])
    assert_corrupt(SEG_KEY, decode_segment_fully, data + b"\0")
    assert_corrupt(SEG_KEY, decode_segment_fully, reseal(data + bytes(32)))


def test_newer_version_message():
    data = forge_segment(512, [(1, 0, 1, 0, 0)], b"", version=4)
    err = assert_corrupt(SEG_KEY, read_segment_header, data, SEG_KEY)
    assert str(err) == f"{SEG_KEY}: written by a newer format version 4; upgrade walsync_vfs"
    # Snapshots are still version 1: a version 2 snapshot is from the future too.
    err = assert_corrupt(SNAP_KEY, read_snapshot, SNAPSHOT_MAGIC + b"\x00\x02", SNAP_KEY)
    assert err.reason == "written by a newer format version 2; upgrade walsync_vfs"
    # A newer version may change everything after the version field.
    err = assert_corrupt(SEG_KEY, read_segment_header, SEGMENT_MAGIC + b"\x00\x07", SEG_KEY)
    assert err.reason == "written by a newer format version 7; upgrade walsync_vfs"
    snap = SNAPSHOT_MAGIC + b"\x01\x00"
    err = assert_corrupt(SNAP_KEY, read_snapshot, snap, SNAP_KEY)
    assert err.reason == "written by a newer format version 256; upgrade walsync_vfs"
    assert_corrupt(SEG_KEY, read_segment_header, SEGMENT_MAGIC + b"\x00\x00", SEG_KEY)


@pytest.mark.parametrize(
    ("entries", "raw", "kwargs", "match"),
    [
        ([(5, 0, 2, 1, 0), (7, 0, 2, 0, 0)], struct.pack(">I", 1) + bytes(512), {}, "txid 7"),
        ([(5, 0, 0, 0, 0)], b"", {}, "db_size 0"),
        ([(5, 0, 1, 2, 0)], b"", {"raw_length": 1032}, "2 pages in 1-page db"),
        ([(5, 0, 3, 1, 0)], struct.pack(">I", 1) + bytes(512), {"raw_length": 1}, "implies"),
        ([(5, 0, 3, 1, 0)], struct.pack(">I", 4) + bytes(512), {}, "pgno 4"),
        ([(5, 0, 3, 1, 0)], struct.pack(">I", 0) + bytes(512), {}, "pgno 0"),
        ([(5, 0, 1, 1, 0)], struct.pack(">I", 1) + bytes(512), {"first": 6}, "txid 5"),
        (
            [(5, 0, 1, 1, 0)],
            struct.pack(">I", 1) + bytes(512),
            {"body": zstandard.ZstdCompressor().compress(bytes(516)) + b"\0"},
            "body_length",
        ),
        (
            [(5, 0, 1, 1, 0)],
            struct.pack(">I", 1) + bytes(512),
            {"body": zstandard.ZstdCompressor(write_content_size=False).compress(bytes(516))},
            "content size",
        ),
        ([(5, 0, 1, 1, 0)], struct.pack(">I", 1) + bytes(512), {"body": b"junk"}, "zstd"),
        (
            [(5, 0, 1, 1, 0)],
            struct.pack(">I", 1) + bytes(512),
            {"body": ZSTD_MAGIC + b"\xff" + bytes(20)},
            "bad zstd frame header",
        ),
        (
            [(5, 0, 1, 1, 0)],
            struct.pack(">I", 1) + bytes(512),
            {"body": frame_516(0x61, b"\x05", ((516 << 3) | 1).to_bytes(3, "little") + RAW_516)},
            "dictionary",
        ),
        (
            [(5, 0, 1, 1, 0)],
            struct.pack(">I", 1) + bytes(512),
            {"body": frame_516(0x60, b"", b"\x07\x00\x00" + RAW_516)},
            "reserved block type",
        ),
        (
            [(5, 0, 1, 1, 0)],
            struct.pack(">I", 1) + bytes(512),
            {"body": frame_516(0x60, b"", BLOCK_516)},
            "zstd frame truncated",
        ),
        (
            [(5, 0, 1, 1, 0)],
            struct.pack(">I", 1) + bytes(512),
            {"body": frame_516(0x60, b"", BLOCK_516 + ((1 << 3) | 1).to_bytes(3, "little") + b"x")},
            "zstd",
        ),
    ],
)
def test_segment_deep_validation(entries, raw, kwargs, match):
    """Sealed with a correct SHA-256, so only the deeper checks can catch these."""
    err = assert_corrupt(SEG_KEY, decode_segment_fully, forge_segment(512, entries, raw, **kwargs))
    assert match in err.reason


def test_segment_forged_huge_lengths_do_not_allocate():
    n = 2**32 - 1
    raw_length = n * (4 + 65536)
    data = forge_segment(
        65536, [(5, 0, n, n, 0)], b"", body=huge_frame(raw_length), raw_length=raw_length
    )
    assert read_segment_header(data, SEG_KEY).index[0].page_count == n
    assert_corrupt(SEG_KEY, decode_segment_fully, data)
    header = struct.pack(">8sHHIQQIQQ", SEGMENT_MAGIC, 1, 0, 512, 0, n - 1, n, 2**64 - 1, 0)
    assert "header implies" in assert_corrupt(SEG_KEY, decode_segment_fully, header).reason


def test_segment_zstd_checksum_accepted():
    raw = struct.pack(">I", 1) + bytes(512)
    body = zstandard.ZstdCompressor(write_checksum=True).compress(raw)
    data = forge_segment(512, [(5, 0, 1, 1, 0)], raw, body=body)
    assert decode_segment_fully(data)[0].pages == ((1, bytes(512)),)
    bad_checksum = body[:-4] + bytes(4)
    data = forge_segment(512, [(5, 0, 1, 1, 0)], raw, body=bad_checksum)
    assert "zstd" in assert_corrupt(SEG_KEY, decode_segment_fully, data).reason


@FUZZ
@given(st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(SEGMENT_MAGIC.__add__)))
def test_fuzz_segment_random_bytes(data):
    only_corrupt(decode_segment_fully, data)


VALID_SEGMENT = encode_segment(512, SMALL).data


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID_SEGMENT) - 33), st.binary(max_size=4))))
def test_fuzz_segment_mutations_resealed(edits):
    data = bytearray(VALID_SEGMENT)
    for pos, new in edits:
        data[pos : pos + len(new)] = new
    only_corrupt(decode_segment_fully, reseal(bytes(data)))


@FUZZ
@given(
    st.lists(
        st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 4), st.integers(0, 4)),
        min_size=1,
        max_size=4,
    ),
    st.lists(st.integers(0, 5), max_size=12),
    st.integers(0, 3),
)
def test_fuzz_segment_forged_structure(entries, pgnos, extra_pages):
    """Plausible-looking segments with random index/pgno combinations, correctly sealed."""
    raw = struct.pack(f">{len(pgnos)}I", *pgnos) + bytes(512 * (len(pgnos) + extra_pages))
    forged = [(5 + i, t, db, n, 0) for i, (t, db, n) in enumerate(entries)]
    only_corrupt(decode_segment_fully, forge_segment(512, forged, raw))


# --- merging (compaction) ----------------------------------------------------------


def merge_by_decoding(blobs: list[bytes], max_bytes: int) -> list[tuple[int, int, bytes]]:
    """What compaction did before merging raw bytes: decode every commit, group, encode; a
    group that is exactly one input stays as it is."""
    groups: list[list[Commit]] = []
    size = 0
    whole = {}
    for blob in blobs:
        header, commits = decode_segment(blob, SEG_KEY)
        whole[header.first_txid, header.last_txid] = blob
        for c in commits:
            pages = len(c.pages) * header.page_size
            if not groups or size + pages > max_bytes:
                groups.append([])
                size = 0
            groups[-1].append(c)
            size += pages
    return [
        (
            g[0].txid,
            g[-1].txid,
            whole.get((g[0].txid, g[-1].txid)) or encode_segment(header.page_size, g).data,
        )
        for g in groups
    ]


def merge_raw(blobs: list[bytes], max_bytes: int) -> list[tuple[int, int, bytes]]:
    return list(merge_segments([read_segment_raw(b, SEG_KEY) for b in blobs], max_bytes))


def v1_segment(commits: list[Commit], page_size: int) -> bytes:
    """Commits as a version 1 writer stored them (no WAL positions)."""
    entries = [(c.txid, c.time_ns, c.db_size, len(c.pages), c.checksum) for c in commits]
    raw = b"".join(
        struct.pack(f">{len(c.pages)}I", *(p for p, _ in c.pages)) + b"".join(d for _, d in c.pages)
        for c in commits
    )
    return forge_segment(page_size, entries, raw, version=1)


MERGE_INPUT = make_commits(
    1024, 5, [(3, [1, 2, 3]), (3, [2]), (4, [1, 4]), (4, []), (4, [3]), (5, [1, 5]), (5, [2, 3])]
)


@pytest.mark.parametrize("max_bytes", [1 << 30, 3 * 1024, 2 * 1024, 1024, 0])
def test_merge_segments_is_byte_for_byte_encode_segment(max_bytes):
    """Version 2 segments with and without WAL positions, and a version 1 one, merged by raw
    bytes into exactly what decoding them and encoding the commits makes, group for group."""
    c = with_wal(MERGE_INPUT[:3]) + MERGE_INPUT[3:]
    blobs = [
        encode_segment(1024, c[:2]).data,
        v1_segment(c[2:4], 1024),
        encode_segment(1024, c[4:]).data,
    ]
    merged = merge_raw(blobs, max_bytes)
    assert merged == merge_by_decoding(blobs, max_bytes)
    v1_read = [dataclasses.replace(x, wal=None) for x in c[2:4]]  # version 1 lost them
    assert [x for *_, data in merged for x in decode_segment_fully(data)] == c[:2] + v1_read + c[4:]


def test_merge_segments_keeps_a_lone_segment_as_it_is():
    """A group that is exactly one input (here: too big to merge with its neighbours) is that
    input's own object, not a re-encoding of it (a version 1 segment stays version 1)."""
    blobs = [encode_segment(1024, MERGE_INPUT[:1]).data, v1_segment(MERGE_INPUT[1:2], 1024)]
    assert merge_raw(blobs, 0) == [(5, 5, blobs[0]), (6, 6, blobs[1])]


@pytest.mark.parametrize(
    "blobs",
    [
        [
            encode_segment(1024, MERGE_INPUT[:2]).data,
            encode_segment(1024, MERGE_INPUT[3:]).data,
        ],  # a gap
        [
            encode_segment(1024, MERGE_INPUT[2:]).data,
            encode_segment(1024, MERGE_INPUT[:2]).data,
        ],  # order
        [
            encode_segment(512, SMALL).data,
            encode_segment(1024, make_commits(1024, 8, [(1, [1])])).data,
        ],
    ],
)
def test_merge_segments_refuses_inputs_that_do_not_continue_each_other(blobs):
    with pytest.raises(ValueError, match="does not continue"):
        merge_raw(blobs, 1 << 30)


# --- snapshots -----------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [512, 4096, 65536])
def test_snapshot_round_trip(page_size, tmp_path):
    pages = [page(page_size, i) for i in range(9)]
    out = io.BytesIO()
    w = SnapshotWriter(out, page_size, 42, -5, len(pages))
    for p in pages:
        w.add_page(p)
    header = w.finish()
    expected = SnapshotHeader(page_size, 42, -5, 9, DbChecksum.from_pages(pages).value)
    assert header == expected
    data = out.getvalue()
    assert decode_snapshot_fully(data) == (expected, pages)
    assert decode_snapshot_fully(io.BytesIO(data)) == (expected, pages)
    path = tmp_path / "s.wsnap"
    path.write_bytes(b"prefix" + data)
    with open(path, "rb") as f:
        f.seek(6)
        assert decode_snapshot_fully(f) == (expected, pages)


def test_snapshot_layout_matches_spec():
    pages = [page(512, i) for i in range(3)]
    data = write_snapshot(512, pages, txid=9)
    assert struct.unpack_from(">8sHHIQqI", data) == (SNAPSHOT_MAGIC, 1, 0, 512, 9, 123, 3)
    checksum, body_length = struct.unpack_from(">QQ", data, len(data) - 48)
    assert checksum == DbChecksum.from_pages(pages).value
    assert len(data) == 36 + body_length + 48
    assert zstandard.ZstdDecompressor().decompress(data[36 : 36 + body_length]) == b"".join(pages)
    assert hashlib.sha256(data[:-32]).digest() == data[-32:]


def test_snapshot_empty_database():
    data = write_snapshot(4096, [])
    assert decode_snapshot_fully(data) == (SnapshotHeader(4096, 1, 123, 0, 0), [])
    assert decode_snapshot_fully(io.BytesIO(data)) == (SnapshotHeader(4096, 1, 123, 0, 0), [])


def test_snapshot_writer_misuse():
    with pytest.raises(ValueError):
        SnapshotWriter(io.BytesIO(), 1000, 1, 0, 1)
    with pytest.raises(ValueError):
        SnapshotWriter(io.BytesIO(), 512, 1, 0, 2**32)
    with pytest.raises(ValueError):
        SnapshotWriter(io.BytesIO(), 512, 1, 2**63, 1)
    w = SnapshotWriter(io.BytesIO(), 512, 1, 0, 1)
    with pytest.raises(ValueError, match="page size"):
        w.add_page(bytes(511))
    with pytest.raises(ValueError, match="0 pages added"):
        w.finish()
    w.add_page(bytes(512))
    with pytest.raises(ValueError, match="more than"):
        w.add_page(bytes(512))
    w.finish()
    with pytest.raises(ValueError, match="already finished"):
        w.finish()


SNAP_PAGES = [page(512, i) for i in range(4)]
VALID_SNAPSHOT = write_snapshot(512, SNAP_PAGES)


def test_snapshot_every_byte_flip_detected():
    for pos in range(len(VALID_SNAPSHOT)):
        bad = bytearray(VALID_SNAPSHOT)
        bad[pos] ^= 0x01
        assert_corrupt(SNAP_KEY, decode_snapshot_fully, bytes(bad))
        assert_corrupt(SNAP_KEY, decode_snapshot_fully, io.BytesIO(bad))


def test_snapshot_streamed_in_pieces_of_any_size():
    """A download hands the reader pieces that cut headers, frame blocks and pages anywhere:
    the same pages, and every flipped byte caught (as the damage it is: sha256 mismatch)."""
    size, footer = len(VALID_SNAPSHOT), VALID_SNAPSHOT[-48:]

    def stream(data: bytes, n: int):
        pieces = (data[i : i + n] for i in range(0, len(data), n))
        return stream_snapshot(pieces, size, footer, SNAP_KEY)

    def read_all(data: bytes) -> list:
        return list(stream(data, 7)[1])

    for n in (1, 3, 37, len(VALID_SNAPSHOT)):
        header, pages = stream(VALID_SNAPSHOT, n)
        assert (header, [bytes(p) for p in pages]) == decode_snapshot_fully(VALID_SNAPSHOT)
    for pos in range(36, len(VALID_SNAPSHOT) - 48):  # the body: its checks meet it first
        bad = bytearray(VALID_SNAPSHOT)
        bad[pos] ^= 0x01
        assert assert_corrupt(SNAP_KEY, read_all, bytes(bad)).reason == "sha256 mismatch"
    with pytest.raises(CorruptObject, match="footer changed"):
        list(stream_snapshot([VALID_SNAPSHOT], size, footer[:-1] + b"x", SNAP_KEY)[1])


def test_snapshot_truncation_detected():
    for n in range(len(VALID_SNAPSHOT)):
        assert_corrupt(SNAP_KEY, decode_snapshot_fully, VALID_SNAPSHOT[:n])
        assert_corrupt(SNAP_KEY, decode_snapshot_fully, io.BytesIO(VALID_SNAPSHOT[:n]))
    assert_corrupt(SNAP_KEY, decode_snapshot_fully, VALID_SNAPSHOT + b"\0")


def test_snapshot_sha_mismatch_bytes_before_any_page_file_before_last_page():
    bad = bytearray(VALID_SNAPSHOT)
    bad[24] ^= 1  # time_ns: parses fine, only the SHA-256 can tell
    assert_corrupt(SNAP_KEY, read_snapshot, bytes(bad), SNAP_KEY)
    _, pages = read_snapshot(io.BytesIO(bad), SNAP_KEY)
    got = []
    with pytest.raises(CorruptObject, match="sha256 mismatch"):
        got.extend(pages)
    assert got == SNAP_PAGES[:-1]


def test_snapshot_checksum_mismatch_before_last_page():
    data = bytearray(VALID_SNAPSHOT)
    data[-48] ^= 0x80  # footer checksum, resealed: only the page checksum can tell
    data = reseal(bytes(data))
    for src in (data, io.BytesIO(data)):
        _, pages = read_snapshot(src, SNAP_KEY)
        got = []
        with pytest.raises(CorruptObject, match="database checksum"):
            got.extend(pages)
        assert got == SNAP_PAGES[:-1]


def test_snapshot_deep_validation():
    short = zstandard.ZstdCompressor().compress(bytes(1024))
    assert (
        "content size"
        in assert_corrupt(SNAP_KEY, decode_snapshot_fully, forge_snapshot(512, 3, short)).reason
    )
    n = 2**32 - 1
    assert_corrupt(SNAP_KEY, decode_snapshot_fully, forge_snapshot(65536, n, huge_frame(n << 16)))
    flags = bytearray(forge_snapshot(512, 2, short))
    flags[11] = 1
    assert "flags" in assert_corrupt(SNAP_KEY, decode_snapshot_fully, reseal(bytes(flags))).reason
    assert "magic" in assert_corrupt(SNAP_KEY, decode_snapshot_fully, VALID_SEGMENT).reason


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.binary(max_size=200).map(SNAPSHOT_MAGIC.__add__)))
def test_fuzz_snapshot_random_bytes(data):
    only_corrupt(decode_snapshot_fully, data)
    only_corrupt(decode_snapshot_fully, io.BytesIO(data))


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID_SNAPSHOT) - 33), st.binary(max_size=4))))
def test_fuzz_snapshot_mutations_resealed(edits):
    data = bytearray(VALID_SNAPSHOT)
    for pos, new in edits:
        data[pos : pos + len(new)] = new
    data = reseal(bytes(data))
    only_corrupt(decode_snapshot_fully, data)
    only_corrupt(decode_snapshot_fully, io.BytesIO(data))


def test_corrupt_object_is_value_error():
    err = CorruptObject("k", "why")
    assert isinstance(err, ValueError)
    assert (str(err), err.key, err.reason) == ("k: why", "k", "why")


def test_changed_since_names_the_pages_that_differ_up_to_a_bound():
    page = [bytes([i]) * 512 for i in range(8)]
    base = DbChecksum.from_pages(page[:5])
    assert DbChecksum.from_pages(page[:5]).changed_since(base, 8) == []
    edited = page[:5]
    edited[1], edited[3] = b"x" * 512, b"y" * 512
    assert DbChecksum.from_pages(edited).changed_since(base, 8) == [2, 4]
    grown = [*edited, page[5], page[6]]
    assert DbChecksum.from_pages(grown).changed_since(base, 4) == [2, 4, 6, 7]
    assert DbChecksum.from_pages(grown).changed_since(base, 3) is None
    assert DbChecksum.from_pages(page[:7]).changed_since(base, 1) is None  # two new pages
    assert DbChecksum.from_pages(edited[:3]).changed_since(base, 8) == [2]  # cut short


def test_small_pieces_are_compressed_in_groups_and_big_ones_where_they_are() -> None:
    """The compressor reads a page-by-page record as a few pieces of about GATHER_BYTES (one
    GIL take each, not one per page), the same bytes in the same order; a big piece is
    handed over where it is, not copied, in reads of at most the size asked for."""
    from walsync_vfs.format.segment import GATHER_BYTES, _Pieces

    pages = [bytes([i % 251]) * 4096 for i in range(600)]
    big = bytes(range(256)) * (GATHER_BYTES // 256)
    reader = _Pieces([b"\x00\x01", *pages, big, *pages[:3]])
    out = []
    while piece := reader.read(GATHER_BYTES // 2):
        out.append(bytes(piece))
        if len(out) == 4:
            assert piece.obj is big  # the big piece's own memory
    assert b"".join(out) == b"".join([b"\x00\x01", *pages, big, *pages[:3]])
    assert [len(p) for p in out] == [
        2 + 255 * 4096,  # the 256th page would not fit with the first 2 bytes
        256 * 4096,
        (600 - 511) * 4096,  # the pages left before the big piece
        GATHER_BYTES // 2,
        GATHER_BYTES // 2,
        3 * 4096,
    ]
    empty_first = _Pieces([b"", b"", big, b"", b"z"])  # an empty read would end the stream
    assert bytes(empty_first.read(GATHER_BYTES)) == big
    assert bytes(empty_first.read(GATHER_BYTES)) == b"z" and empty_first.read(1) == b""


def test_a_big_segment_is_made_in_a_mapping_of_its_own() -> None:
    """A segment of MAPPED_OBJECT record bytes or more comes back as a read-only view of the
    private mapping the compressor wrote it into (its memory goes back to the system with
    the view, never to malloc's arenas); a small one is bytes.  Both decode to what went
    in."""
    from walsync_vfs.format.segment import MAPPED_OBJECT

    rng = random.Random(1)  # incompressible pages: the object is as big as the pages
    for count, mapped in ((1, False), (MAPPED_OBJECT // 4096 + 1, True)):
        pages = [(pgno, rng.randbytes(4096)) for pgno in range(1, count + 1)]
        commit = Commit(txid=7, time_ns=1, db_size=count, checksum=0, pages=pages)
        segment = encode_segment(4096, [commit]).data
        if mapped:
            assert isinstance(segment, memoryview) and segment.readonly
            assert isinstance(segment.obj, mmap.mmap)
        else:
            assert isinstance(segment, bytes)
        assert len(segment) > count * 4096
        header, commits = decode_segment(bytes(segment), "k")
        assert header.first_txid == 7 and list(commits[0].pages) == pages
