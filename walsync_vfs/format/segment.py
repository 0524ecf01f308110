"""Segments (§4): consecutive commits of one generation in one object.

Encoding, reading (header only, commits, or taken apart for compaction) and merging.  Every
object is untrusted: any defect raises `CorruptObject` and nothing else, and no declared
length is trusted for an allocation before the object's real size vouches for it.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import zstandard

from walsync_vfs.format.checksum import Page
from walsync_vfs.format.container import (
    SHA_LEN,
    check_flags_page_size,
    check_frame,
    check_magic_version,
    expect_end,
    read_exact,
)
from walsync_vfs.format.errors import CorruptObject
from walsync_vfs.format.fields import I64_MAX, I64_MIN, U32_MAX, U64_MAX, valid_page_size

# Segments are version 2 (index entries carry the commit's WAL position); version 1 segments
# are still read.
SEGMENT_VERSION = 2
SEGMENT_MAGIC = b"\x89WSSEG\r\n"
# Segments are small and short-lived (compacted, then expired), so compression speed matters
# more than the last few percent of size; merged segments use the same level, so a merge is
# byte for byte the segment encode_segment makes of the same commits.
SEGMENT_LEVEL = 1
# Small segments are merged, so recompressed, within about a minute: they get zstd's fastest
# standard level, half the CPU of level 1 at about the same size on page data.
SMALL_SEGMENT_LEVEL = -1

# magic version flags page_size first_txid last_txid commit_count body_length body_raw_length
_SEG_HEADER = struct.Struct(">8sHHIQQIQQ")
_SEG_ENTRY_V1 = struct.Struct(">QqIIQ")  # txid time_ns db_size page_count checksum
_SEG_ENTRY = struct.Struct(">QqIIQIII")  # ... wal_salt1 wal_salt2 wal_end (version 2)
SEGMENT_HEAD_SIZE = _SEG_HEADER.size  # the index follows


class _ThreadCodecs(threading.local):
    """This thread's zstd contexts, made on first use and reused: a new context per segment
    allocated (and page-faulted in) its tables every time, which cost more CPU than
    compressing or decompressing a small segment."""

    def __init__(self) -> None:
        self.compressors: dict[int, zstandard.ZstdCompressor] = {}  # by level
        self.decompressor: zstandard.ZstdDecompressor | None = None


_codecs = _ThreadCodecs()


def _compress(data: bytes, level: int) -> bytes:
    compressors = _codecs.compressors
    compressor = compressors.get(level)
    if compressor is None:
        compressor = compressors[level] = zstandard.ZstdCompressor(level=level)
    return compressor.compress(data)


def _segment_reader(body: memoryview) -> zstandard.ZstdDecompressionReader:
    """A reader over a segment body, on this thread's decompressor.  Only for bodies read to
    the end at once: a second reader on the same thread resets the first."""
    decompressor = _codecs.decompressor
    if decompressor is None:
        decompressor = _codecs.decompressor = zstandard.ZstdDecompressor()
    return decompressor.stream_reader(body)


# --- data model ---------------------------------------------------------------------------
# WalPos, Commit and IndexEntry are made once per commit replicated, compacted or restored:
# they are read-only by convention, not frozen, because a frozen dataclass is slower to create
# (its __init__ goes through object.__setattr__ per field).


@dataclass(slots=True)
class WalPos:
    """Where a commit ended in the source's WAL (§4.2): after a crash, frames past it that are
    still in that WAL are the commits the replica never got."""

    salt1: int
    salt2: int
    end: int  # frames [0, end) of the WAL with these salts hold the database as of the commit


@dataclass(slots=True)
class Commit:
    """One committed write transaction: every page it changed, and the database after it."""

    txid: int
    time_ns: int  # commit time, unix epoch nanoseconds
    db_size: int  # database size in pages after the commit
    checksum: int  # whole-db checksum after the commit (u64)
    pages: tuple[tuple[int, Page], ...]  # (pgno, page bytes), sorted by pgno, unique
    wal: WalPos | None = None  # None: unknown (version 1 segments)


@dataclass(slots=True)
class IndexEntry:
    """A commit as described by a segment's uncompressed index (§4.2)."""

    txid: int
    time_ns: int
    db_size: int
    page_count: int
    checksum: int
    wal: WalPos | None = None


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    page_size: int
    first_txid: int
    last_txid: int
    index: tuple[IndexEntry, ...]


_NO_WAL = WalPos(0, 0, 0)  # how an unknown WAL position is stored


def _pgno_problem(pgnos: Sequence[int], db_size: int) -> str | None:
    """Why a commit's page list breaks §4.3, or None; shared so encoder and decoders agree."""
    # Strictly increasing within 1..db_size, checked in C (it runs per commit of every segment
    # encoded, compacted or restored); the slow path below words what is wrong.
    if not pgnos or (
        pgnos[0] > 0 and pgnos[-1] <= db_size and all(map(int.__lt__, pgnos, pgnos[1:]))
    ):
        return None
    prev = 0
    for pgno in pgnos:
        if not prev < pgno <= db_size:
            return f"pgno {pgno} after {prev}: must strictly increase within 1..{db_size}"
        prev = pgno
    return None


def _commit_problem(c: Commit, txid: int, page_size: int) -> str:
    """Why ``c`` cannot be the commit ``txid`` of a segment (the encoder's slow path)."""
    if c.txid != txid:
        return f"txid {c.txid} follows {txid - 1}: not consecutive"
    if not (
        0 <= c.txid <= U64_MAX
        and I64_MIN <= c.time_ns <= I64_MAX
        and 1 <= c.db_size <= U32_MAX
        and 0 <= c.checksum <= U64_MAX
    ):
        return f"txid {c.txid}: a field is out of range"
    problem = _pgno_problem([pgno for pgno, _ in c.pages], c.db_size)
    if problem:
        return f"txid {c.txid}: {problem}"
    if any(len(data) != page_size for _, data in c.pages):
        return f"txid {c.txid}: page length differs from page size {page_size}"
    return f"txid {c.txid}: invalid WAL position {c.wal or _NO_WAL}"


def encode_segment(page_size: int, commits: Sequence[Commit], level: int = SEGMENT_LEVEL) -> bytes:
    """Encode consecutive commits as one segment object.

    Raises ValueError for input the format cannot represent, so nothing is uploaded
    that a reader would later reject.
    """
    if not valid_page_size(page_size):
        raise ValueError(f"invalid page size {page_size}")
    if not commits:
        raise ValueError("a segment needs at least one commit")
    first = commits[0].txid
    index: list[bytes] = []
    raw: list[bytes | memoryview] = []
    sizes = {page_size}
    # Runs once per replicated commit: cheap checks (range checks by struct, in C) first; any
    # failure goes to _commit_problem, which words the first rule broken.
    for txid, c in enumerate(commits, first):
        pgnos = [pgno for pgno, _ in c.pages]
        pages = [data for _, data in c.pages]
        wal = c.wal or _NO_WAL
        try:
            if not (
                c.txid == txid and c.db_size >= 1 and (wal.end > 0 or wal == _NO_WAL)
                and _pgno_problem(pgnos, c.db_size) is None
                and (not pages or set(map(len, pages)) == sizes)
            ):  # fmt: skip
                raise struct.error
            index.append(_pack_entry(c.txid, c.time_ns, c.db_size, len(pgnos), c.checksum, wal))
        except struct.error:
            raise ValueError(_commit_problem(c, txid, page_size)) from None
        raw.append(struct.pack(f">{len(pgnos)}I", *pgnos))
        raw += pages
    return _seal_segment(page_size, first, commits[-1].txid, index, raw, level)


def _pack_entry(
    txid: int, time_ns: int, db_size: int, page_count: int, checksum: int, wal: WalPos | None
) -> bytes:
    """One version 2 index entry (§4.2); an unknown WAL position is stored as zeros."""
    wal = wal or _NO_WAL
    return _SEG_ENTRY.pack(
        txid, time_ns, db_size, page_count, checksum, wal.salt1, wal.salt2, wal.end
    )


def _seal_segment(
    page_size: int,
    first: int,
    last: int,
    index: Sequence[bytes | memoryview],
    records: Sequence[bytes | memoryview],
    level: int,
) -> bytes:
    """Header, index, the records compressed as one frame, and the SHA-256 trailer (§4).

    Shared by encoding commits and merging segments, so both produce the same bytes.  One
    shot over the joined records: streaming them into the compressor would keep zstd's
    streaming window buffer resident.
    """
    raw_body = b"".join(records)
    body = _compress(raw_body, level)
    header = _SEG_HEADER.pack(
        SEGMENT_MAGIC, SEGMENT_VERSION, 0, page_size, first, last,
        last - first + 1, len(body), len(raw_body),
    )  # fmt: skip
    obj = b"".join((header, *index, body))
    return obj + hashlib.sha256(obj).digest()


_Row = tuple[int, int, int, int, int, int, int, int]  # one index entry, version 2 fields


def _check_segment(data: bytes, key: str) -> tuple[int, int, int, list[_Row], memoryview, int]:
    """Reading rules 1-6 of §4.4.  Returns the version, page size, first txid, the index
    entries as rows of version 2 fields (version 1 rows get an unknown WAL position), the
    validated compressed body and its raw length."""
    view = memoryview(data)
    version, page_size, first, last, body_length, raw_length, index_end = _check_head(
        view, len(view), key
    )
    if hashlib.sha256(view[:-SHA_LEN]).digest() != view[-SHA_LEN:]:
        raise CorruptObject(key, "sha256 mismatch")
    index = view[_SEG_HEADER.size : index_end]
    rows = _check_index(index, version, first, last, page_size, raw_length, key)
    body = view[index_end : index_end + body_length]
    check_frame(body, raw_length, key)
    return version, page_size, first, rows, body, raw_length


def _check_head(
    head: memoryview, size: int, key: str
) -> tuple[int, int, int, int, int, int, int]:
    """Reading rules 1-3 of §4.4 on the object's first bytes and its ``size``.  Returns the
    version, page size, first and last txid, body length, raw body length and where the
    index ends."""
    version = check_magic_version(head, SEGMENT_MAGIC, "segment", SEGMENT_VERSION, key)
    entry_format = _SEG_ENTRY_V1 if version == 1 else _SEG_ENTRY
    if len(head) < _SEG_HEADER.size:
        raise CorruptObject(key, f"truncated: {len(head)} bytes")
    _, _, flags, page_size, first, last, count, body_length, raw_length = _SEG_HEADER.unpack_from(
        head
    )
    check_flags_page_size(flags, page_size, key)
    if last < first:
        raise CorruptObject(key, f"last_txid {last} < first_txid {first}")
    if count != last - first + 1:
        raise CorruptObject(key, f"commit_count {count} does not match txids {first}..{last}")
    index_end = _SEG_HEADER.size + count * entry_format.size
    expected = index_end + body_length + SHA_LEN
    if size != expected:
        raise CorruptObject(key, f"object is {size} bytes, header implies {expected}")
    return version, page_size, first, last, body_length, raw_length, index_end


def _check_index(
    index: memoryview, version: int, first: int, last: int, page_size: int, raw_length: int,
    key: str,
) -> list[_Row]:  # fmt: skip
    """Reading rule 5 of §4.4: the index entries, as rows of version 2 fields."""
    entry_format = _SEG_ENTRY_V1 if version == 1 else _SEG_ENTRY
    rows = list(entry_format.iter_unpack(index))
    if version == 1:
        rows = [row + (0, 0, 0) for row in rows]
    # Runs for every segment restored or compacted: the entries' rules checked column by
    # column in C; _index_problem words the first one broken (or clears a valid mix of
    # known and unknown WAL positions, which this fast check leaves to it).
    txids, _, db_sizes, page_counts, _, salts1, salts2, wal_ends = zip(*rows, strict=True)
    if not (
        txids == tuple(range(first, last + 1))
        and min(db_sizes) >= 1
        and all(map(int.__le__, page_counts, db_sizes))
        and (0 not in wal_ends or not (any(salts1) or any(salts2)))
        and sum(page_counts) * (4 + page_size) == raw_length
    ):
        problem = _index_problem(rows, first, page_size, raw_length)
        if problem:
            raise CorruptObject(key, problem)
    return rows


def _index_problem(rows: list[_Row], first: int, page_size: int, raw_length: int) -> str | None:
    """The first rule of §4.2 the index entries break, or None."""
    total = 0
    for i, (txid, _, db_size, page_count, _, salt1, salt2, wal_end) in enumerate(rows):
        if not wal_end and (salt1 or salt2):
            return f"txid {txid}: WAL salts without a WAL position"
        if txid != first + i:
            return f"index entry {i} has txid {txid}, not {first + i}"
        if db_size < 1:
            return f"txid {txid}: db_size 0"
        if page_count > db_size:
            return f"txid {txid}: {page_count} pages in {db_size}-page db"
        total += page_count * (4 + page_size)
    if total != raw_length:
        return f"body_raw_length {raw_length}, index implies {total}"
    return None


def _parse_segment(data: bytes, key: str) -> tuple[SegmentHeader, memoryview]:
    """Reading rules 1-6 of §4.4; returns the header and the (validated) compressed body."""
    _, page_size, first, rows, body, _ = _check_segment(data, key)
    return _header(page_size, first, rows), body


def _header(page_size: int, first: int, rows: list[_Row]) -> SegmentHeader:
    index = tuple(
        IndexEntry(
            txid, time_ns, db_size, page_count, checksum, WalPos(s1, s2, end) if end else None
        )
        for txid, time_ns, db_size, page_count, checksum, s1, s2, end in rows
    )
    return SegmentHeader(page_size, first, first + len(rows) - 1, index)


def read_segment_header(data: bytes, key: str) -> SegmentHeader:
    """Validate a whole segment (SHA-256 included) and return its header and index."""
    return _parse_segment(data, key)[0]


def read_segment_index(read_at: Callable[[int, int], bytes], size: int, key: str) -> SegmentHeader:
    """The header and index of a segment of ``size`` bytes read through ``read_at(offset,
    length)``: only the bytes before its body, which listing and restore planning need.
    Reading rules 1-3 and 5 of §4.4; the body and the SHA-256 are not read, so the object is
    only vouched for by whoever reads it whole."""
    head = read_at(0, SEGMENT_HEAD_SIZE)
    version, page_size, first, last, _, raw_length, index_end = _check_head(
        memoryview(head), size, key
    )
    index = read_at(SEGMENT_HEAD_SIZE, index_end - SEGMENT_HEAD_SIZE)
    if len(index) != index_end - SEGMENT_HEAD_SIZE:
        raise CorruptObject(key, f"index truncated: {len(index)} bytes")
    rows = _check_index(memoryview(index), version, first, last, page_size, raw_length, key)
    return _header(page_size, first, rows)


def decode_segment(
    data: bytes, key: str, upto_txid: int | None = None
) -> tuple[SegmentHeader, list[Commit]]:
    """Validate a segment and decode its commits (up to `upto_txid`) in one call.

    For restore's prefetch threads: the SHA-256, the frame walk and zstd all release the GIL,
    so a whole segment is ready, and every check made, before the applying thread sees it.
    """
    header, body = _parse_segment(data, key)
    return header, list(_segment_commits(header, body, key, upto_txid))


def _segment_commits(
    header: SegmentHeader, body: memoryview, key: str, upto_txid: int | None
) -> Iterator[Commit]:
    """Decompress the records wanted in 1 MiB steps, then cut pages out of that one buffer."""
    entries = [e for e in header.index if upto_txid is None or e.txid <= upto_txid]
    record_size = [e.page_count * (4 + header.page_size) for e in entries]
    reader = _segment_reader(body)
    raw = memoryview(read_exact(reader, sum(record_size), key))  # the rest is never decompressed
    if len(entries) == len(header.index):
        expect_end(reader, key)
    pos = 0
    for entry, size in zip(entries, record_size, strict=True):
        n = entry.page_count
        pgnos = struct.unpack_from(f">{n}I", raw, pos)
        problem = _pgno_problem(pgnos, entry.db_size)
        if problem:
            raise CorruptObject(key, f"txid {entry.txid}: {problem}")
        first = pos + 4 * n
        pages = tuple(
            (pgno, raw[first + i * header.page_size : first + (i + 1) * header.page_size])
            for i, pgno in enumerate(pgnos)
        )
        pos += size
        yield Commit(entry.txid, entry.time_ns, entry.db_size, entry.checksum, pages, entry.wal)


@dataclass(frozen=True, slots=True)
class RawSegment:
    """A fully validated segment taken apart for :func:`merge_segments`."""

    key: str
    data: bytes  # the object itself
    page_size: int
    first_txid: int
    last_txid: int
    page_counts: tuple[int, ...]  # per commit
    index: bytes  # every entry in version 2 layout (a version 1 entry's WAL position unknown)
    raw: bytes  # the decompressed body: the commit records back to back


def read_segment_raw(data: bytes, key: str) -> RawSegment:
    """Validate a whole segment (every rule of §4.4) and return it taken apart, without an
    object per page or commit: compaction merges segments at this level."""
    version, page_size, first, rows, body, raw_length = _check_segment(data, key)
    reader = _segment_reader(body)
    raw = read_exact(reader, raw_length, key)
    expect_end(reader, key)
    pos, width = 0, 4 + page_size
    for txid, _, db_size, page_count, *_ in rows:
        problem = _pgno_problem(struct.unpack_from(f">{page_count}I", raw, pos), db_size)
        if problem:
            raise CorruptObject(key, f"txid {txid}: {problem}")
        pos += page_count * width
    if version == SEGMENT_VERSION:
        index = data[_SEG_HEADER.size : _SEG_HEADER.size + len(rows) * _SEG_ENTRY.size]
    else:
        index = b"".join(_SEG_ENTRY.pack(*row) for row in rows)
    counts = tuple(row[3] for row in rows)
    return RawSegment(key, data, page_size, first, first + len(rows) - 1, counts, index, raw)


def merge_segments(
    segments: Sequence[RawSegment], max_bytes: int, level: int = SEGMENT_LEVEL
) -> Iterator[tuple[int, int, bytes]]:
    """Merge consecutive segments into as few as fit ``max_bytes`` of page data each (a
    single commit over it gets a segment of its own); yields ``(first_txid, last_txid,
    object)`` for each.

    Each object is byte for byte what :func:`encode_segment` makes of the same commits, but
    built by joining index entries and decompressed bodies and compressing once: no object
    per commit, which made compaction cost as much CPU as the replication it compacts.  A
    group that is exactly one input comes back as that input's own object, unchanged.
    Raises ValueError unless the inputs continue each other's txids with one page size.
    """
    if not segments:
        raise ValueError("nothing to merge")
    page_size = segments[0].page_size
    width = _SEG_ENTRY.size
    # Per group: its first txid, and runs of index entries and of records cut from the inputs.
    firsts: list[int] = []
    indexes: list[list[memoryview]] = []
    bodies: list[list[memoryview]] = []
    size = 0
    expected = segments[0].first_txid
    for seg in segments:
        if seg.page_size != page_size or seg.first_txid != expected:
            raise ValueError(
                f"{seg.key} does not continue txid {expected - 1} at page size {page_size}"
            )
        expected = seg.last_txid + 1
        index, raw = memoryview(seg.index), memoryview(seg.raw)
        pages = sum(seg.page_counts) * page_size
        if firsts and size + pages <= max_bytes:  # the usual case: it joins the group whole
            indexes[-1].append(index)
            bodies[-1].append(raw)
            size += pages
            continue
        start = pos = run_pos = 0  # the current run: entries from `start`, records from `run_pos`
        for i, page_count in enumerate(seg.page_counts):
            pages = page_count * page_size
            if not firsts or size + pages > max_bytes:
                if i > start:
                    indexes[-1].append(index[start * width : i * width])
                    bodies[-1].append(raw[run_pos:pos])
                firsts.append(seg.first_txid + i)
                indexes.append([])
                bodies.append([])
                start, run_pos, size = i, pos, 0
            size += pages
            pos += pages + 4 * page_count
        indexes[-1].append(index[start * width :])
        bodies[-1].append(raw[run_pos:])
    whole = {(s.first_txid, s.last_txid): s.data for s in segments}
    lasts = [f - 1 for f in firsts[1:]] + [expected - 1]
    for first, last, index_runs, body_runs in zip(firsts, lasts, indexes, bodies, strict=True):
        data = whole.get((first, last))
        if data is None:
            data = _seal_segment(page_size, first, last, index_runs, body_runs, level)
        yield first, last, data
