"""On-store object formats: segments, snapshots, key names and whole-database checksums.

docs/FORMAT.md is the specification; section numbers below refer to it. Decoders treat
every object as untrusted: any defect raises `CorruptObject` and nothing else, and no
declared length is trusted for an allocation before the object's real size vouches for it.
"""

from __future__ import annotations

import hashlib
import io
import re
import secrets
import struct
import threading
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Literal, cast

import xxhash
import zstandard

# Segments are version 2 (index entries carry the commit's WAL position); version 1 segments
# are still read.  Snapshots did not change and are still written as version 1.
SEGMENT_VERSION = 2
SNAPSHOT_VERSION = 1
SEGMENT_MAGIC = b"\x89WSSEG\r\n"
# Segments are small and short-lived (compacted, then expired), so compression speed matters
# more than the last few percent of size; merged segments use the same level, so a merge is
# byte for byte the segment encode_segment makes of the same commits.
SEGMENT_LEVEL = 1
# Small segments are merged, so recompressed, within about a minute: they get zstd's fastest
# standard level, half the CPU of level 1 at about the same size on page data.
SMALL_SEGMENT_LEVEL = -1
SNAPSHOT_MAGIC = b"\x89WSSNP\r\n"

# magic version flags page_size first_txid last_txid commit_count body_length body_raw_length
_SEG_HEADER = struct.Struct(">8sHHIQQIQQ")
_SEG_ENTRY_V1 = struct.Struct(">QqIIQ")  # txid time_ns db_size page_count checksum
_SEG_ENTRY = struct.Struct(">QqIIQIII")  # ... wal_salt1 wal_salt2 wal_end (version 2)
_SNAP_HEADER = struct.Struct(">8sHHIQqI")  # magic version flags page_size txid time_ns db_size
_SNAP_FOOTER = struct.Struct(">QQ32s")  # checksum body_length sha256
_SHA_LEN = 32
_VERSION_END = 10  # magic + version: all a reader needs to refuse an object it cannot parse
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ZSTD_MAX_FRAME_HEADER = 18
# Decompressed data is read at most this much at a time, so memory follows what really
# decompresses rather than what a (possibly forged) length field claims.  A multiple of every
# page size, so snapshot pages never straddle two reads.
_CHUNK = 1 << 20
_U32_MAX = 2**32 - 1
_U64_MAX = 2**64 - 1
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


# One compressor per thread and level, reused: a new zstd context per segment allocated (and
# page-faulted in) its tables every time, which cost more CPU than compressing a small segment.
_compressors = threading.local()
_decompressors = threading.local()


def _compress(data: bytes, level: int) -> bytes:
    per_level = cast(dict[int, zstandard.ZstdCompressor], _compressors.__dict__)
    compressor = per_level.get(level)
    if compressor is None:
        compressor = per_level[level] = zstandard.ZstdCompressor(level=level)
    return compressor.compress(data)


def _segment_reader(body: memoryview) -> zstandard.ZstdDecompressionReader:
    """A reader over a segment body, on this thread's decompressor (a new one per segment
    cost more than decompressing a small segment).  Only for bodies read to the end at once:
    a second reader on the same thread resets the first."""
    decompressor = getattr(_decompressors, "one", None)
    if decompressor is None:
        decompressor = _decompressors.one = zstandard.ZstdDecompressor()
    return decompressor.stream_reader(body)


# A page as decoders hand it out: a slice of one decompressed buffer, not a copy per page.
Page = bytes | memoryview


class CorruptObject(ValueError):
    """An object is not a valid object of this format; str() is one line, `<key>: <reason>`."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


# --- keys (§2) -------------------------------------------------------------------------

_NAME = r"[^/\x00-\x1f\x7f]+"
_HEX16 = r"[0-9a-f]{16}"
_GENERATION = _HEX16 + r"-[0-9a-f]{8}"
_NAME_RE = re.compile(_NAME)
_GENERATION_RE = re.compile(_GENERATION)
_KEY_RE = re.compile(
    rf"({_NAME})/({_GENERATION})/"
    rf"(?:snapshot/({_HEX16})\.wsnap|seg/({_HEX16})-({_HEX16})\.wseg)"
)


@dataclass(frozen=True, slots=True)
class ParsedKey:
    """A key of ours, decomposed; a snapshot has first_txid == last_txid == its txid."""

    name: str
    generation: str
    kind: Literal["snapshot", "segment"]
    first_txid: int
    last_txid: int


def _valid_name(name: str) -> bool:
    return _NAME_RE.fullmatch(name) is not None and name not in (".", "..")


def _checked_prefix(name: str, generation: str) -> str:
    if not _valid_name(name):
        raise ValueError(f"invalid database name {name!r}")
    if _GENERATION_RE.fullmatch(generation) is None:
        raise ValueError(f"invalid generation id {generation!r}")
    return f"{name}/{generation}"


def _hex_txid(txid: int) -> str:
    if not 0 <= txid <= _U64_MAX:
        raise ValueError(f"txid {txid} out of u64 range")
    return f"{txid:016x}"


def new_generation_id(txid: int) -> str:
    """Id for a generation starting at `txid`: sorts by start, random tail avoids collisions."""
    return f"{_hex_txid(txid)}-{secrets.token_hex(4)}"


def snapshot_key(name: str, generation: str, txid: int) -> str:
    return f"{_checked_prefix(name, generation)}/snapshot/{_hex_txid(txid)}.wsnap"


def segment_key(name: str, generation: str, first_txid: int, last_txid: int) -> str:
    if first_txid > last_txid:
        raise ValueError(f"segment range {first_txid}..{last_txid} is empty")
    prefix = _checked_prefix(name, generation)
    return f"{prefix}/seg/{_hex_txid(first_txid)}-{_hex_txid(last_txid)}.wseg"


def parse_key(key: str) -> ParsedKey | None:
    """Decompose one of our keys; None for anything else, since foreign files are ignored."""
    m = _KEY_RE.fullmatch(key)
    if m is None or m[1] in (".", ".."):
        return None
    if m[3] is not None:
        txid = int(m[3], 16)
        return ParsedKey(m[1], m[2], "snapshot", txid, txid)
    first, last = int(m[4], 16), int(m[5], 16)
    if first > last:
        return None
    return ParsedKey(m[1], m[2], "segment", first, last)


# --- whole-database checksum (§3) ------------------------------------------------------


_xxh3 = xxhash.xxh3_64_intdigest


def page_hash(pgno: int, data: Page) -> int:
    """Hash of one page, seeded with its number so a page at the wrong place changes the sum."""
    return _xxh3(data, seed=pgno)


class DbChecksum:
    """Whole-database checksum kept up to date commit by commit.

    Per-page hashes are remembered so a rewritten page's old contribution can be XORed
    out without re-reading the old page.
    """

    __slots__ = ("_hashes", "_value")

    def __init__(self) -> None:
        self._hashes = array("Q")
        self._value = 0

    @classmethod
    def from_pages(cls, pages: Iterable[Page]) -> DbChecksum:
        """Checksum of a full image: pages 1, 2, ... in order."""
        ck = cls()
        for pgno, data in enumerate(pages, 1):
            h = page_hash(pgno, data)
            ck._hashes.append(h)
            ck._value ^= h
        return ck

    @property
    def value(self) -> int:
        return self._value

    @property
    def db_size(self) -> int:
        return len(self._hashes)

    def copy(self) -> DbChecksum:
        """An independent copy: verify a batch on it, keep it only if the whole batch checks out."""
        ck = DbChecksum()
        ck._hashes = self._hashes[:]
        ck._value = self._value
        return ck

    def apply(self, db_size: int, pages: Iterable[tuple[int, Page]]) -> None:
        """Apply one commit; on error (ValueError) the checksum is left unchanged.

        Pages past the old end must all be supplied: SQLite writes every page it
        allocates, so a missing one means the caller lost a page.
        """
        hashes = self._hashes
        if db_size == len(hashes):  # the usual commit: no page added or cut off
            same = [(pgno, _xxh3(data, seed=pgno)) for pgno, data in pages]
            for pgno, _ in same:  # all checked before anything changes
                if not 1 <= pgno <= db_size:
                    raise ValueError(f"page {pgno} outside a database of {db_size} pages")
            value = self._value
            for pgno, h in same:  # a page given twice: the XORs leave the last one's hash
                value ^= hashes[pgno - 1] ^ h
                hashes[pgno - 1] = h
            self._value = value
            return
        if not 0 <= db_size <= _U32_MAX:
            raise ValueError(f"db_size {db_size} out of range")
        # Runs once per replicated commit: page_hash inlined, range checks done in C.
        new = {pgno: _xxh3(data, seed=pgno) for pgno, data in pages}
        if new and (min(new) < 1 or max(new) > db_size):
            outside = next(p for p in new if not 1 <= p <= db_size)
            raise ValueError(f"page {outside} outside a database of {db_size} pages")
        value = self._value
        old_size = len(hashes)
        if db_size > old_size:
            missing = next((p for p in range(old_size + 1, db_size + 1) if p not in new), None)
            if missing is not None:
                raise ValueError(
                    f"database grew to {db_size} pages but page {missing} was not given"
                )
            hashes.frombytes(bytes(8 * (db_size - old_size)))  # all overwritten below
        elif db_size < old_size:
            for h in hashes[db_size:]:
                value ^= h
            del hashes[db_size:]
        for pgno, h in new.items():
            value ^= hashes[pgno - 1] ^ h
            hashes[pgno - 1] = h
        self._value = value


# --- data model -------------------------------------------------------------------------
# WalPos, Commit and IndexEntry are made once per commit replicated, compacted or restored:
# they are read-only by convention, not frozen, because a frozen dataclass costs about 1 us
# more to create (its __init__ goes through object.__setattr__ per field).


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


@dataclass(frozen=True, slots=True)
class SnapshotHeader:
    page_size: int
    txid: int
    time_ns: int
    db_size: int
    checksum: int  # whole-db checksum of the image


# --- shared validation -------------------------------------------------------------------


def _valid_page_size(page_size: int) -> bool:
    return 512 <= page_size <= 65536 and page_size & (page_size - 1) == 0


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
        0 <= c.txid <= _U64_MAX
        and _I64_MIN <= c.time_ns <= _I64_MAX
        and 1 <= c.db_size <= _U32_MAX
        and 0 <= c.checksum <= _U64_MAX
    ):
        return f"txid {c.txid}: a field is out of range"
    problem = _pgno_problem([pgno for pgno, _ in c.pages], c.db_size)
    if problem:
        return f"txid {c.txid}: {problem}"
    if any(len(data) != page_size for _, data in c.pages):
        return f"txid {c.txid}: page length differs from page size {page_size}"
    return f"txid {c.txid}: invalid WAL position {c.wal or _NO_WAL}"


def _check_magic_version(head: bytes | memoryview, magic: bytes, newest: int, key: str) -> int:
    """Check magic and version (1..newest are readable); return the version."""
    if len(head) < _VERSION_END:
        raise CorruptObject(key, f"truncated: {len(head)} bytes")
    if head[:8] != magic:
        kind = "segment" if magic == SEGMENT_MAGIC else "snapshot"
        raise CorruptObject(key, f"bad magic: not a walsync_vfs {kind}")
    (version,) = struct.unpack_from(">H", head, 8)
    if version > newest:
        raise CorruptObject(
            key, f"written by a newer format version {version}; upgrade walsync_vfs"
        )
    if version == 0:
        raise CorruptObject(key, f"invalid format version {version}")
    return version


_NO_WAL = WalPos(0, 0, 0)  # how an unknown WAL position is stored


def _check_flags_page_size(flags: int, page_size: int, key: str) -> None:
    if flags:
        raise CorruptObject(key, f"unknown flags {flags:#06x}")
    if not _valid_page_size(page_size):
        raise CorruptObject(key, f"invalid page size {page_size}")


def _check_frame(
    body_at: Callable[[int, int], bytes], length: int, raw_length: int, key: str
) -> None:
    """Prove the body is exactly one zstd frame of `raw_length` content (§4.3).

    Walks block headers only, so trailing bytes or a short frame are caught without
    decompressing. `body_at(pos, n)` returns at most n bytes, none past the body's end.
    """
    head = body_at(0, _ZSTD_MAX_FRAME_HEADER)
    if head[:4] != _ZSTD_MAGIC:
        raise CorruptObject(key, "body is not a zstd frame")
    try:
        params = zstandard.get_frame_parameters(head)
        pos = zstandard.frame_header_size(head)
    except zstandard.ZstdError as e:
        raise CorruptObject(key, f"bad zstd frame header: {e}") from None
    if params.content_size != raw_length or params.content_size == _U64_MAX:
        raise CorruptObject(
            key, f"zstd frame content size {params.content_size}, expected {raw_length}"
        )
    if params.dict_id:
        raise CorruptObject(key, "zstd frame needs a dictionary")
    last = 0
    while not last:
        block = body_at(pos, 3)
        if len(block) < 3:
            raise CorruptObject(key, "zstd frame truncated")
        bits = int.from_bytes(block, "little")
        last, block_type, block_size = bits & 1, bits >> 1 & 3, bits >> 3
        if block_type == 3:
            raise CorruptObject(key, "zstd frame has a reserved block type")
        pos += 3 + (1 if block_type == 1 else block_size)  # RLE blocks store one byte
    if params.has_checksum:
        pos += 4
    if pos != length:
        raise CorruptObject(key, f"zstd frame is {pos} bytes, body_length is {length}")


def _read_exact(reader: zstandard.ZstdDecompressionReader, n: int, key: str) -> bytes:
    parts = []
    while n:
        try:
            chunk = reader.read(min(n, _CHUNK))
        except zstandard.ZstdError as e:
            raise CorruptObject(key, f"zstd: {e}") from None
        if not chunk:
            raise CorruptObject(key, "decompressed body ends early")
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def _expect_end(reader: zstandard.ZstdDecompressionReader, key: str) -> None:
    try:
        extra = reader.read(1)
    except zstandard.ZstdError as e:
        raise CorruptObject(key, f"zstd: {e}") from None
    if extra:
        raise CorruptObject(key, "decompressed body longer than declared")


# --- segments (§4) -----------------------------------------------------------------------


def encode_segment(page_size: int, commits: Sequence[Commit], level: int = SEGMENT_LEVEL) -> bytes:
    """Encode consecutive commits as one segment object.

    Raises ValueError for input the format cannot represent, so nothing is uploaded
    that a reader would later reject.
    """
    if not _valid_page_size(page_size):
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
    shot over the joined records: streaming them into the compressor saved a merge ~1.4 ms
    but kept ~4 MiB more resident (zstd's streaming window buffer).
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
    version = _check_magic_version(view, SEGMENT_MAGIC, SEGMENT_VERSION, key)
    entry_format = _SEG_ENTRY_V1 if version == 1 else _SEG_ENTRY
    if len(view) < _SEG_HEADER.size:
        raise CorruptObject(key, f"truncated: {len(view)} bytes")
    _, _, flags, page_size, first, last, count, body_length, raw_length = _SEG_HEADER.unpack_from(
        view
    )
    _check_flags_page_size(flags, page_size, key)
    if last < first:
        raise CorruptObject(key, f"last_txid {last} < first_txid {first}")
    if count != last - first + 1:
        raise CorruptObject(key, f"commit_count {count} does not match txids {first}..{last}")
    index_end = _SEG_HEADER.size + count * entry_format.size
    expected = index_end + body_length + _SHA_LEN
    if len(view) != expected:
        raise CorruptObject(key, f"object is {len(view)} bytes, header implies {expected}")
    if hashlib.sha256(view[:-_SHA_LEN]).digest() != view[-_SHA_LEN:]:
        raise CorruptObject(key, "sha256 mismatch")
    rows = list(entry_format.iter_unpack(view[_SEG_HEADER.size : index_end]))
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
    body = view[index_end : index_end + body_length]
    _check_frame(lambda pos, n: body[pos : pos + n].tobytes(), body_length, raw_length, key)
    return version, page_size, first, rows, body, raw_length


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
    index = tuple(
        IndexEntry(
            txid, time_ns, db_size, page_count, checksum, WalPos(s1, s2, end) if end else None
        )
        for txid, time_ns, db_size, page_count, checksum, s1, s2, end in rows
    )
    return SegmentHeader(page_size, first, first + len(rows) - 1, index), body


def read_segment_header(data: bytes, key: str) -> SegmentHeader:
    """Validate a whole segment (SHA-256 included) and return its header and index."""
    return _parse_segment(data, key)[0]


def iter_segment_commits(data: bytes, key: str, upto_txid: int | None = None) -> Iterator[Commit]:
    """Validate a segment, then stream its commits, stopping after `upto_txid` if given.

    Structural checks raise here, at call time; per-record checks raise from the iterator,
    so only an exhausted iterator proves the whole segment good.
    """
    header, body = _parse_segment(data, key)
    return _segment_commits(header, body, key, upto_txid)


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
    raw = memoryview(_read_exact(reader, sum(record_size), key))  # the rest is never decompressed
    if len(entries) == len(header.index):
        _expect_end(reader, key)
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
    raw = _read_exact(reader, raw_length, key)
    _expect_end(reader, key)
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


# --- snapshots (§5) ----------------------------------------------------------------------


class SnapshotWriter:
    """Writes a snapshot to `fileobj` in one sequential pass (no seeking, no spooling).

    Call add_page() exactly db_size times with pages 1..db_size in order, then finish().
    """

    def __init__(
        self,
        fileobj: BinaryIO,
        page_size: int,
        txid: int,
        time_ns: int,
        db_size: int,
        level: int = 3,
    ) -> None:
        if not _valid_page_size(page_size):
            raise ValueError(f"invalid page size {page_size}")
        if not (0 <= txid <= _U64_MAX and _I64_MIN <= time_ns <= _I64_MAX):
            raise ValueError("txid or time_ns out of range")
        if not 0 <= db_size <= _U32_MAX:
            raise ValueError(f"db_size {db_size} out of range")
        self._out = fileobj
        self._sha = hashlib.sha256()
        self._written = 0
        self._compressor = zstandard.ZstdCompressor(level=level).compressobj(
            size=db_size * page_size
        )
        self._header = SnapshotHeader(page_size, txid, time_ns, db_size, 0)
        self._pgno = 0
        self._checksum = 0
        self._finished = False
        self._write(
            _SNAP_HEADER.pack(
                SNAPSHOT_MAGIC, SNAPSHOT_VERSION, 0, page_size, txid, time_ns, db_size
            )
        )

    def _write(self, data: bytes) -> None:
        self._sha.update(data)
        self._written += len(data)
        self._out.write(data)

    def add_page(self, data: bytes) -> None:
        if self._pgno == self._header.db_size:
            raise ValueError(f"more than db_size={self._header.db_size} pages added")
        if len(data) != self._header.page_size:
            raise ValueError(f"page of {len(data)} bytes, page size is {self._header.page_size}")
        self._pgno += 1
        self._checksum ^= page_hash(self._pgno, data)
        self._write(self._compressor.compress(data))

    def finish(self) -> SnapshotHeader:
        """Write the footer; returns the header as a reader will see it (checksum filled in)."""
        if self._finished:
            raise ValueError("snapshot already finished")
        if self._pgno != self._header.db_size:
            raise ValueError(f"{self._pgno} pages added, db_size is {self._header.db_size}")
        self._finished = True
        self._write(self._compressor.flush())
        body_length = self._written - _SNAP_HEADER.size
        self._write(struct.pack(">QQ", self._checksum, body_length))
        self._out.write(self._sha.digest())
        h = self._header
        return SnapshotHeader(h.page_size, h.txid, h.time_ns, h.db_size, self._checksum)


class _HashingBody:
    """The body of a snapshot in a file, hashing whatever the decompressor reads from it.

    One pass over the file then both decompresses and verifies the SHA-256.
    """

    def __init__(self, f: BinaryIO, start: int, length: int, sha: hashlib._Hash) -> None:
        self._f = f
        self._pos = start
        self._left = length
        self._sha = sha

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        self._f.seek(self._pos)
        data = self._f.read(n)
        self._pos += len(data)
        self._left -= len(data)
        self._sha.update(data)
        return data

    def digest(self, tail: bytes) -> bytes:
        """SHA-256 of the object once the unread rest of the body and `tail` are included."""
        while self.read(_CHUNK):
            pass
        self._sha.update(tail)
        return self._sha.digest()


def read_snapshot(src: bytes | BinaryIO, key: str) -> tuple[SnapshotHeader, Iterator[Page]]:
    """Validate a snapshot's structure and return its header and an iterator of its pages.

    `src` is the whole object as bytes, or a seekable file holding the object from its
    current position to its end. For bytes the SHA-256 is checked before any page is
    returned; for files it is checked while streaming. Either way the iterator raises
    before yielding the last page if the SHA-256 or the database checksum is wrong, so
    the image is good only once the iterator is exhausted without error.
    """
    if isinstance(src, bytes | bytearray | memoryview):
        view = memoryview(src)
        size = len(view)

        def read_at(pos: int, n: int) -> bytes:
            return view[pos : pos + n].tobytes()

    else:
        f = src
        base = f.tell()
        size = f.seek(0, io.SEEK_END) - base

        def read_at(pos: int, n: int) -> bytes:
            f.seek(base + pos)
            return f.read(n)

    head = read_at(0, _SNAP_HEADER.size)
    _check_magic_version(head, SNAPSHOT_MAGIC, SNAPSHOT_VERSION, key)
    if len(head) < _SNAP_HEADER.size or size < _SNAP_HEADER.size + _SNAP_FOOTER.size:
        raise CorruptObject(key, f"truncated: {size} bytes")
    _, _, flags, page_size, txid, time_ns, db_size = _SNAP_HEADER.unpack(head)
    _check_flags_page_size(flags, page_size, key)
    footer = read_at(size - _SNAP_FOOTER.size, _SNAP_FOOTER.size)
    checksum, body_length, sha = _SNAP_FOOTER.unpack(footer)
    expected = _SNAP_HEADER.size + body_length + _SNAP_FOOTER.size
    if size != expected:
        raise CorruptObject(key, f"object is {size} bytes, footer implies {expected}")
    start = _SNAP_HEADER.size
    if isinstance(src, bytes | bytearray | memoryview):
        if hashlib.sha256(view[:-_SHA_LEN]).digest() != sha:
            raise CorruptObject(key, "sha256 mismatch")
        body: memoryview | _HashingBody = view[start : start + body_length]
    else:
        body = _HashingBody(src, base + start, body_length, hashlib.sha256(head))
    _check_frame(
        lambda pos, n: read_at(start + pos, max(0, min(n, body_length - pos))),
        body_length,
        db_size * page_size,
        key,
    )
    header = SnapshotHeader(page_size, txid, time_ns, db_size, checksum)
    return header, _snapshot_pages(header, body, footer, key)


def _snapshot_pages(
    header: SnapshotHeader, body: memoryview | _HashingBody, footer: bytes, key: str
) -> Iterator[Page]:
    # zstandard reads any object with read(); its stub asks for IO[bytes]
    reader = zstandard.ZstdDecompressor().stream_reader(body)  # type: ignore[arg-type]
    size = header.page_size
    checksum = 0
    held: Page | None = None  # the latest page, released only once everything checks out
    for start in range(0, header.db_size, _CHUNK // size):  # 1 MiB of pages per read
        count = min(_CHUNK // size, header.db_size - start)
        chunk = memoryview(_read_exact(reader, count * size, key))
        for i in range(count):
            page = chunk[i * size : (i + 1) * size]
            checksum ^= page_hash(start + i + 1, page)
            if held is not None:
                yield held
            held = page
    _expect_end(reader, key)
    if isinstance(body, _HashingBody) and body.digest(footer[:-_SHA_LEN]) != footer[-_SHA_LEN:]:
        raise CorruptObject(key, "sha256 mismatch")
    if checksum != header.checksum:
        raise CorruptObject(
            key, f"database checksum {checksum:#018x}, footer says {header.checksum:#018x}"
        )
    if held is not None:
        yield held
