"""Segments (§4): consecutive commits of one generation in one object.

Encoding, reading (header only, commits, or taken apart for compaction) and merging.  Every
object is untrusted: any defect raises `CorruptObject` and nothing else, and no declared
length is trusted for an allocation before the object's real size vouches for it (but a
body's, up to ONE_CALL_BYTES, for its decompression in one call: only what really
decompresses is ever written to, so only that becomes memory).
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import struct
import sys
import threading
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, NamedTuple, cast, overload

import zstandard

from walsync_vfs.format.checksum import Page
from walsync_vfs.format.container import (
    CHUNK,
    SHA_LEN,
    Sequential,
    StreamedBody,
    check_flags_page_size,
    check_frame,
    check_magic_version,
    expect_end,
    read_exact,
)
from walsync_vfs.format.errors import CorruptObject
from walsync_vfs.format.fields import I64_MAX, I64_MIN, U32_MAX, U64_MAX, valid_page_size

if TYPE_CHECKING:
    from hashlib import _Hash

# Whole segments are written as version 2 (index entries carry the commit's WAL position),
# so replicas without giant commits stay readable by version 2 readers; parts of a commit
# spread over several objects are version 3 (§4.5).  Every version is read.
SEGMENT_VERSION = 3
WHOLE_SEGMENT_VERSION = 2
PART_FLAG = 1  # header flags bit 0 (version 3): the object is one part of a commit (§4.5)
SEGMENT_MAGIC = b"\x89WSSEG\r\n"
# Segments are small and short-lived (compacted, then expired), so compression speed matters
# more than the last few percent of size; merged segments use the same level, so a merge is
# byte for byte the segment encode_segment makes of the same commits.
SEGMENT_LEVEL = 1
# Small segments are merged, so recompressed, within about a minute: they get zstd's fastest
# standard level, half the CPU of level 1 at about the same size on page data.
SMALL_SEGMENT_LEVEL = -1
# zstd's effort does not pay on every stream: pages it can barely shrink (random or
# compressed blobs in their cells, encrypted columns) and pages made of long repeats (the
# same page rewritten commit after commit) come out within a few percent of level 1's size
# at this level, for a half to a quarter of the CPU.  The uploader measures which case a
# stream is (see uploader.Uploader._encode).
FAST_SEGMENT_LEVEL = -7


def segment_level(small: bool, fast: bool) -> int:
    """The zstd level of a new segment: see the levels above."""
    if fast:
        return FAST_SEGMENT_LEVEL
    return SMALL_SEGMENT_LEVEL if small else SEGMENT_LEVEL


# magic version flags page_size first_txid last_txid commit_count body_length body_raw_length
_SEG_HEADER = struct.Struct(">8sHHIQQIQQ")
_SEG_ENTRY_V1 = struct.Struct(">QqIIQ")  # txid time_ns db_size page_count checksum
SEGMENT_ENTRY = struct.Struct(">QqIIQIII")  # ... wal_salt1 wal_salt2 wal_end (version 2)
_PART_BLOCK = struct.Struct(">IIQ")  # part_index part_count commit_pages (version 3 parts)
# The bytes before the index: the header, and a part's part block (§4.5).
SEGMENT_HEAD_SIZE = _SEG_HEADER.size + _PART_BLOCK.size


# Below this, zstd's worker threads have no second job to run: one thread compresses it.
THREADED_MIN_BYTES = 4 << 20
# The compressor is handed its input in reads of at most this much.  It releases the GIL for
# each, and every time this thread takes it back an application thread that wants it waits
# for a wake-up: few big reads, not one per page.
STREAM_CHUNK = 4 << 20
# Smaller pieces are copied together before compressing, which holds the GIL for a copy of
# about this much: far shorter than the wake-ups one take of it per page costs.
GATHER_BYTES = 1 << 20
# Segment bodies of up to this many raw bytes are decompressed in one call (see
# _decompressed); writers cut segments at max_segment_bytes, far below it by default.
ONE_CALL_BYTES = 64 << 20
# Segments of fewer record bytes are made in the heap, whose small buffers are reused; a
# mapping of their own costs more than encoding them (see _encoded).
MAPPED_OBJECT = 256 << 10


class _ThreadCodecs(threading.local):
    """This thread's zstd contexts, made on first use and reused: a new context per segment
    allocated (and page-faulted in) its tables every time, which cost more CPU than
    compressing or decompressing a small segment."""

    def __init__(self) -> None:
        self.compressors: dict[int, zstandard.ZstdCompressor] = {}  # by level, no workers
        self.threads = 0  # zstd worker threads for this thread's compressions (0: none)
        self.decompressor: zstandard.ZstdDecompressor | None = None
        self.gather: mmap.mmap | None = None  # _Pieces' buffer, when none is using it


_codecs = _ThreadCodecs()


@contextlib.contextmanager
def compression_threads(threads: int) -> Iterator[None]:
    """Within the block, this thread's segment compressions run on ``threads`` zstd workers
    (0: on this thread alone), for an encode someone is waiting on: the output is the same
    format, made sooner, with the CPU of cores the waiting application leaves idle."""
    before, _codecs.threads = _codecs.threads, threads
    try:
        yield
    finally:
        _codecs.threads = before


def _compressor(level: int, raw_length: int) -> zstandard.ZstdCompressor:
    """This thread's compressor for ``raw_length`` bytes at ``level``.  One on zstd worker
    threads is made for the call and never kept: a forked child frees what a dead thread
    kept, and freeing one that used workers waits for them, which stayed in the parent."""
    if _codecs.threads and raw_length >= THREADED_MIN_BYTES:
        return zstandard.ZstdCompressor(level=level, threads=_codecs.threads)
    compressor = _codecs.compressors.get(level)
    if compressor is None:
        compressor = _codecs.compressors[level] = zstandard.ZstdCompressor(level=level)
    return compressor


class _Pieces:
    """``pieces`` as a file for zstd's stream reader: each ``read`` hands out a big piece
    where it is, at most ``n`` bytes of it at a time, or consecutive small ones copied
    together into one buffer of GATHER_BYTES (a record of the general path comes page by
    page).  zstd takes in what it is handed before it reads again, so the buffer is reused,
    and a piece is asked for only once the ones before it are taken in or copied: a producer
    may reuse a piece's memory for the next one.

    The buffer is a mapping (see :func:`_encoded`) that the thread keeps for its next
    stream: a fresh one would be faulted in page by page for every segment."""

    def __init__(self, pieces: Iterable[bytes | memoryview]) -> None:
        self._pieces = iter(pieces)
        self._ahead: bytes | memoryview | None = None  # taken from pieces, not handed out
        self._rest = memoryview(b"")  # what is left of a big piece
        self._buffer, _codecs.gather = _codecs.gather, None  # none other uses it meanwhile

    def _next(self) -> bytes | memoryview | None:
        piece, self._ahead = self._ahead, None
        return piece if piece is not None else next(self._pieces, None)

    def read(self, n: int) -> bytes | memoryview:
        if not self._rest:
            piece = self._next()
            while piece is not None and not len(piece):  # b"" would read as the end
                piece = self._next()
            if piece is None:
                _codecs.gather = self._buffer  # the stream is read: the next one's
                return b""
            if len(piece) < GATHER_BYTES:
                return self._gather(piece)
            self._rest = memoryview(piece)
        out, self._rest = self._rest[:n], self._rest[n:]
        return out

    def _gather(self, first: bytes | memoryview) -> memoryview:
        if self._buffer is None:
            self._buffer = mmap.mmap(-1, GATHER_BYTES, flags=mmap.MAP_PRIVATE)
        view, size = memoryview(self._buffer), 0
        piece: bytes | memoryview | None = first
        while piece is not None and size + len(piece) <= GATHER_BYTES:
            view[size : size + len(piece)] = piece
            size += len(piece)
            piece = self._next()
        self._ahead = piece
        return view[:size]

    def stream(self) -> BinaryIO:
        """As the file zstd's stream reader takes (it only calls ``read``)."""
        return cast(BinaryIO, self)


class Encoded(NamedTuple):
    """A new object, and the SHA-256 (hex) of all its bytes, trailer included: what an S3
    PUT signs.  Had from the trailer's hash state, so the object is hashed once, not twice."""

    data: bytes | memoryview
    sha256: str


def _sealed(digest: _Hash) -> tuple[bytes, str]:
    """The trailer (§4) of the bytes ``digest`` has taken, and the SHA-256 of them and it."""
    trailer = digest.digest()
    whole = digest.copy()
    whole.update(trailer)
    return trailer, whole.hexdigest()


def _encoded(
    fixed: int,
    pieces: Iterable[bytes | memoryview],
    raw_length: int,
    compressor: zstandard.ZstdCompressor,
    head: Callable[[int], Iterable[bytes | memoryview]],
) -> Encoded:
    """An object made in a private mapping of its own: ``head(body_length)`` (``fixed``
    bytes: header, part block, index), ``pieces`` (``raw_length`` bytes in all) compressed
    into it by ``compressor`` as one frame that declares their length, and the SHA-256
    trailer (§4).
    Its data is a read-only view of it.

    The compressor writes straight into the mapping, with the GIL released, so the object
    is never copied, and its memory goes back to the system as soon as the last view of it
    is dropped: glibc raises its mmap threshold to the size of every mapped chunk freed,
    after which such buffers would come from the malloc arenas of the threads freeing them
    and stay there (a process replicating MiB-sized commits held hundreds of MiB that way).
    Pages of the mapping never written to are never part of the process's memory.
    """
    bound = raw_length + raw_length // 256 + (64 << 10)  # above zstd's worst case
    out = mmap.mmap(-1, fixed + bound + SHA_LEN, flags=mmap.MAP_PRIVATE)
    view = memoryview(out)
    source = _Pieces(pieces).stream()
    reader = compressor.stream_reader(source, size=raw_length, read_size=STREAM_CHUNK)
    end = fixed
    while n := reader.readinto(view[end : fixed + bound]):
        end += n
    if end == fixed + bound:
        raise ValueError(f"compressed body outgrew its {bound}-byte bound")
    out.seek(0)
    for piece in head(end - fixed):
        out.write(piece)
    if out.tell() != fixed:
        raise ValueError(f"head of {out.tell()} bytes where {fixed} were laid out")
    trailer, sha256 = _sealed(hashlib.sha256(view[:end]))
    view[end : end + SHA_LEN] = trailer
    return Encoded(view[: end + SHA_LEN].toreadonly(), sha256)


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's decompressor."""
    decompressor = _codecs.decompressor
    if decompressor is None:
        decompressor = _codecs.decompressor = zstandard.ZstdDecompressor()
    return decompressor


def _decompressed(body: memoryview, raw_length: int, key: str) -> bytes:
    """A checked segment body (§4.3: one frame declaring ``raw_length``) decompressed.

    Up to ONE_CALL_BYTES in one call, straight into the buffer it is returned in: a stream
    would keep a buffer as big as the frame's window beside it (the whole body, for a frame
    whose window covers it) and join its reads into one more copy.  A longer body, which
    only a writer configured for segments that big makes, is read in CHUNK steps, so memory
    follows what really decompresses rather than what its length fields claim."""
    try:
        if raw_length <= ONE_CALL_BYTES:
            raw = _decompressor().decompress(body)
            if len(raw) != raw_length:
                raise CorruptObject(key, f"body decompresses to {len(raw)} bytes, not {raw_length}")
            return raw
    except zstandard.ZstdError as e:
        raise CorruptObject(key, f"zstd: {e}") from None
    reader = _decompressor().stream_reader(body)
    raw = read_exact(reader, raw_length, key)
    expect_end(reader, key)
    return raw


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
    # (pgno, page bytes), sorted by pgno, unique; a commit too big for memory reads them from
    # a file on demand (capture.SpooledPages)
    pages: Sequence[tuple[int, Page]]
    wal: WalPos | None = None  # None: unknown (version 1 segments)

    # A commit is a run of one: what the uploader asks of a PackedRun as well.
    @property
    def last_txid(self) -> int:
        return self.txid

    @property
    def commit_count(self) -> int:
        return 1

    @property
    def page_count(self) -> int:
        return len(self.pages)


class PackedRun:
    """Consecutive commits whose index entries (§4.2) and record bytes (§4.3) are already
    made and checked (csrc/commits.c, capture.OpenRun): what the capture hands the
    uploader, one object for many commits, so the encoder copies them without a Python step
    per commit.  The records come in parts as the capture wrote them, each holding whole
    records of consecutive commits."""

    __slots__ = ("page_size", "index", "records", "page_count")

    def __init__(self, page_size: int, index: memoryview, records: Sequence[memoryview]) -> None:
        self.page_size = page_size
        self.index = index  # the commits' index entries, back to back
        self.records = records
        self.page_count = sum(len(part) for part in records) // (4 + page_size)

    def _entry(self, i: int) -> memoryview:
        return self.index[i * SEGMENT_ENTRY.size : (i + 1) * SEGMENT_ENTRY.size]

    @property
    def commit_count(self) -> int:
        return len(self.index) // SEGMENT_ENTRY.size

    @property
    def txid(self) -> int:
        return int.from_bytes(self._entry(0)[:8], "big")

    @property
    def last_txid(self) -> int:
        return int.from_bytes(self._entry(self.commit_count - 1)[:8], "big")

    @property
    def time_ns(self) -> int:
        """The first commit's time."""
        return int.from_bytes(self._entry(0)[8:16], "big", signed=True)

    @property
    def wal(self) -> WalPos:
        """Where the last commit ended in the source's WAL."""
        *_, salt1, salt2, end = SEGMENT_ENTRY.unpack(self._entry(self.commit_count - 1))
        return WalPos(salt1, salt2, end)

    def commits(self) -> list[Commit]:
        """The commits one by one (the general path: an encoder given unpacked commits too)."""
        out = []
        parts = iter(self.records)
        part: bytes | memoryview = b""
        at = 0
        for txid, t, db_size, count, checksum, salt1, salt2, end in SEGMENT_ENTRY.iter_unpack(
            self.index
        ):
            size = count * (4 + self.page_size)
            while size and at == len(part):  # a record is never split between parts
                part, at = next(parts), 0
            record = memoryview(part)[at : at + size]
            out.append(
                Commit(
                    txid, t, db_size, checksum, PackedPages(record, count, self.page_size),
                    WalPos(salt1, salt2, end),
                )
            )  # fmt: skip
            at += size
        return out


class PackedPages(Sequence[tuple[int, Page]]):
    """A commit's pages as (pgno, page), read from its record bytes (§4.3: the page numbers,
    big-endian, then the pages), without a Python object per page until one is asked for."""

    __slots__ = ("_record", "_count", "_page_size")

    def __init__(self, record: memoryview, count: int, page_size: int) -> None:
        self._record = record
        self._count = count
        self._page_size = page_size

    def __len__(self) -> int:
        return self._count

    def _page(self, i: int) -> tuple[int, Page]:
        pgno = int.from_bytes(self._record[4 * i : 4 * i + 4], "big")
        at = 4 * self._count + i * self._page_size
        return pgno, self._record[at : at + self._page_size]

    @overload
    def __getitem__(self, i: int) -> tuple[int, Page]: ...
    @overload
    def __getitem__(self, i: slice) -> list[tuple[int, Page]]: ...
    def __getitem__(self, i: int | slice) -> tuple[int, Page] | list[tuple[int, Page]]:
        if isinstance(i, slice):
            return [self._page(k) for k in range(self._count)[i]]
        return self._page(range(self._count)[i])


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
class Part:
    """Which part of its commit a part object is (§4.5)."""

    index: int  # 0-based
    count: int  # parts the commit has, >= 2
    commit_pages: int  # pages of the whole commit (the parts' page counts add up to it)

    @property
    def last(self) -> bool:
        return self.index + 1 == self.count


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    page_size: int
    first_txid: int
    last_txid: int
    index: tuple[IndexEntry, ...]
    part: Part | None = None  # None: the object holds its commits whole

    @property
    def raw_length(self) -> int:
        """Bytes the body decompresses to: each commit's record, page numbers and pages."""
        return sum(e.page_count for e in self.index) * (4 + self.page_size)


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


def encode_segment(
    page_size: int, commits: Sequence[Commit | PackedRun], level: int = SEGMENT_LEVEL
) -> Encoded:
    """Encode consecutive commits (or runs of them) as one segment object.

    Raises ValueError for input the format cannot represent, so nothing is uploaded
    that a reader would later reject.
    """
    if not valid_page_size(page_size):
        raise ValueError(f"invalid page size {page_size}")
    if not commits:
        raise ValueError("a segment needs at least one commit")
    if all(isinstance(c, PackedRun) for c in commits):
        return _encode_runs(page_size, commits, level)  # type: ignore[arg-type]
    if any(isinstance(c, PackedRun) for c in commits):
        commits = [
            one for c in commits for one in (c.commits() if isinstance(c, PackedRun) else [c])
        ]
    return _encode_commits(page_size, commits, level)  # type: ignore[arg-type]


def _encode_runs(page_size: int, runs: Sequence[PackedRun], level: int) -> Encoded:
    """Runs of packed commits: their entries and records as they are, checked already."""
    for a, b in zip(runs, runs[1:], strict=False):
        if b.txid != a.last_txid + 1:
            raise ValueError(f"txid {b.txid} follows {a.last_txid}: not consecutive")
    if any(r.page_size != page_size for r in runs):
        raise ValueError(f"a run's page size differs from page size {page_size}")
    index = [r.index for r in runs]
    records = [part for r in runs for part in r.records]
    return _seal_segment(page_size, runs[0].txid, runs[-1].last_txid, index, records, level)


def _encode_commits(page_size: int, commits: Sequence[Commit], level: int) -> Encoded:
    """Commits one by one, each checked."""
    first = commits[0].txid
    index: list[bytes | memoryview] = []
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
        raw += _record(pgnos, pages)
    return _seal_segment(page_size, first, commits[-1].txid, index, raw, level)


def _record(pgnos: Sequence[int], pages: Iterable[Page]) -> Iterator[bytes | memoryview]:
    """A commit's record (§4.3) in pieces: its page numbers, then its pages as they come
    (pages in a spool file are read one at a time, never all held)."""
    yield struct.pack(f">{len(pgnos)}I", *pgnos)
    yield from pages


def encoded_body_length(segment: bytes | memoryview) -> int:
    """The compressed body's length in a segment this process has just encoded (read off
    its header, unchecked)."""
    return int(_SEG_HEADER.unpack_from(segment)[7])


def compressed_size(commits: Sequence[Commit | PackedRun], level: int) -> int:
    """The size the commits' records come to compressed at ``level``, each piece of output
    dropped as it comes: what a segment body of them would take, measured without the
    memory of holding one."""
    pieces = (
        piece
        for c in commits
        for piece in (
            c.records
            if isinstance(c, PackedRun)
            else _record([pgno for pgno, _ in c.pages], (data for _, data in c.pages))
        )
    )
    reader = _compressor(level, 0).stream_reader(_Pieces(pieces).stream(), read_size=STREAM_CHUNK)
    scratch = memoryview(mmap.mmap(-1, STREAM_CHUNK, flags=mmap.MAP_PRIVATE))
    size = 0
    while n := reader.readinto(scratch):
        size += n
    return size


def encode_part(
    page_size: int,
    commit: Commit,
    part: Part,
    pgnos: Sequence[int],
    pages: Iterable[Page],
    level: int = SEGMENT_LEVEL,
) -> Encoded:
    """Encode one part of a commit bigger than a segment (§4.5): ``commit`` gives the
    commit's fields (not its pages), ``pgnos`` the part's page numbers and ``pages`` their
    bytes in that order, in chunks of whole pages (a chunk may be reused once the next is
    asked for).

    The pages go through the compressor as they come, straight into the one buffer the
    object is made in (:func:`_encoded`): a part costs about its compressed size in memory,
    however it is read.

    Raises ValueError for input the format cannot represent, as :func:`encode_segment`.
    """
    if not valid_page_size(page_size):
        raise ValueError(f"invalid page size {page_size}")
    if not (0 <= part.index < part.count and part.count >= 2) or not (
        len(pgnos) <= part.commit_pages <= commit.db_size
    ):
        raise ValueError(f"invalid part {part} of a commit of {len(pgnos)} pages")
    wal = commit.wal or _NO_WAL
    problem = _pgno_problem(pgnos, commit.db_size) if commit.db_size >= 1 else "db_size 0"
    if problem or not (wal.end > 0 or wal == _NO_WAL):
        raise ValueError(f"txid {commit.txid}: {problem or f'invalid WAL position {wal}'}")
    try:
        entry = _pack_entry(
            commit.txid, commit.time_ns, commit.db_size, len(pgnos), commit.checksum, wal
        )
    except struct.error:
        raise ValueError(f"txid {commit.txid}: a field is out of range") from None
    raw_length = len(pgnos) * (4 + page_size)
    numbers = array("I", pgnos)
    if sys.byteorder == "little":
        numbers.byteswap()

    def record() -> Iterator[bytes | memoryview]:
        yield memoryview(numbers).cast("B")
        left = len(pgnos) * page_size
        for chunk in pages:
            if len(chunk) % page_size or len(chunk) > left:
                raise ValueError(
                    f"txid {commit.txid}: {len(chunk)} bytes of pages where {left} of whole"
                    f" {page_size}-byte pages remain"
                )
            yield chunk
            left -= len(chunk)
        if left:
            raise ValueError(f"txid {commit.txid}: {left} bytes of pages missing")

    def head(body_length: int) -> tuple[bytes, bytes]:
        txid = commit.txid
        return _segment_head(page_size, txid, txid, body_length, raw_length, part), entry

    # A context of its own, freed with the part: kept by the thread, it would hold a giant
    # commit's window between giant commits.
    compressor = zstandard.ZstdCompressor(level=level)
    fixed = _SEG_HEADER.size + _PART_BLOCK.size + len(entry)
    return _encoded(fixed, record(), raw_length, compressor, head)


def _pack_entry(
    txid: int, time_ns: int, db_size: int, page_count: int, checksum: int, wal: WalPos | None
) -> bytes:
    """One version 2 index entry (§4.2); an unknown WAL position is stored as zeros."""
    wal = wal or _NO_WAL
    return SEGMENT_ENTRY.pack(
        txid, time_ns, db_size, page_count, checksum, wal.salt1, wal.salt2, wal.end
    )


def _segment_head(
    page_size: int, first: int, last: int, body_length: int, raw_length: int, part: Part | None
) -> bytes:
    """The header, and the part block of a part (§4, §4.5)."""
    version, flags, block = WHOLE_SEGMENT_VERSION, 0, b""
    if part is not None:
        version, flags = SEGMENT_VERSION, PART_FLAG
        block = _PART_BLOCK.pack(part.index, part.count, part.commit_pages)
    header = _SEG_HEADER.pack(
        SEGMENT_MAGIC, version, flags, page_size, first, last,
        last - first + 1, body_length, raw_length,
    )  # fmt: skip
    return header + block


def _seal_segment(
    page_size: int,
    first: int,
    last: int,
    index: Sequence[bytes | memoryview],
    records: Sequence[bytes | memoryview],
    level: int,
) -> Encoded:
    """Header, index, the records compressed as one frame, and the SHA-256 trailer (§4), in
    a mapping of its own (:func:`_encoded`) unless small.  Shared by encoding commits and
    merging segments, so both produce the same bytes."""
    raw_length = sum(len(r) for r in records)
    if raw_length < MAPPED_OBJECT:
        body = _compressor(level, raw_length).compress(b"".join(records))
        header = _segment_head(page_size, first, last, len(body), raw_length, None)
        digest = hashlib.sha256(header)
        for piece in (*index, body):
            digest.update(piece)
        trailer, sha256 = _sealed(digest)
        return Encoded(b"".join((header, *index, body, trailer)), sha256)

    def head(body_length: int) -> list[bytes | memoryview]:
        return [_segment_head(page_size, first, last, body_length, raw_length, None), *index]

    fixed = _SEG_HEADER.size + sum(len(e) for e in index)
    return _encoded(fixed, records, raw_length, _compressor(level, raw_length), head)


_Row = tuple[int, int, int, int, int, int, int, int]  # one index entry, version 2 fields


@dataclass(frozen=True, slots=True)
class _Checked:
    """A segment that passed reading rules 1-6 of §4.4."""

    version: int
    page_size: int
    first: int
    rows: list[_Row]  # index entries as version 2 fields (version 1: WAL position unknown)
    body: memoryview  # the validated compressed body
    raw_length: int
    index_at: int  # offset of the index in the object
    part: Part | None


def _check_part(view: memoryview, flags: int, count: int, key: str) -> Part | None:
    """The part block of a version 3 part (§4.5), checked on its own; None for a whole one."""
    if not flags & PART_FLAG:
        return None
    if len(view) < _SEG_HEADER.size + _PART_BLOCK.size:
        raise CorruptObject(key, f"truncated: {len(view)} bytes")
    part = Part(*_PART_BLOCK.unpack_from(view, _SEG_HEADER.size))
    if count != 1 or part.count < 2 or part.index >= part.count:
        raise CorruptObject(key, f"part {part.index} of {part.count} parts of {count} commits")
    return part


def _check_segment(data: bytes, key: str) -> _Checked:
    """Reading rules 1-6 of §4.4 (and §4.5 for a part)."""
    view = memoryview(data)
    head = _check_head(view, len(view), key)
    if hashlib.sha256(view[:-SHA_LEN]).digest() != view[-SHA_LEN:]:
        raise CorruptObject(key, "sha256 mismatch")
    rows = _check_index(view[head.index_at : head.index_end], head, key)
    body = view[head.index_end : head.index_end + head.body_length]
    check_frame(body, head.raw_length, key)
    return _Checked(
        head.version, head.page_size, head.first, rows, body, head.raw_length, head.index_at,
        head.part,
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Head:
    """What the bytes before a segment's index say (reading rules 1-3 of §4.4)."""

    version: int
    page_size: int
    first: int
    last: int
    body_length: int
    raw_length: int
    index_at: int
    index_end: int
    part: Part | None


def _check_head(head: memoryview, size: int, key: str) -> _Head:
    """Reading rules 1-3 of §4.4 (and the part block of §4.5) on the object's first bytes
    and its ``size``."""
    version = check_magic_version(head, SEGMENT_MAGIC, "segment", SEGMENT_VERSION, key)
    entry_format = _SEG_ENTRY_V1 if version == 1 else SEGMENT_ENTRY
    if len(head) < _SEG_HEADER.size:
        raise CorruptObject(key, f"truncated: {len(head)} bytes")
    _, _, flags, page_size, first, last, count, body_length, raw_length = _SEG_HEADER.unpack_from(
        head
    )
    part_flag = flags & PART_FLAG if version >= 3 else 0
    check_flags_page_size(flags & ~part_flag, page_size, key)
    if last < first:
        raise CorruptObject(key, f"last_txid {last} < first_txid {first}")
    if count != last - first + 1:
        raise CorruptObject(key, f"commit_count {count} does not match txids {first}..{last}")
    part = _check_part(head, part_flag, count, key)
    index_at = _SEG_HEADER.size + (_PART_BLOCK.size if part else 0)
    index_end = index_at + count * entry_format.size
    expected = index_end + body_length + SHA_LEN
    if size != expected:
        raise CorruptObject(key, f"object is {size} bytes, header implies {expected}")
    return _Head(
        version, page_size, first, last, body_length, raw_length, index_at, index_end, part
    )


def _check_index(index: memoryview, head: _Head, key: str) -> list[_Row]:
    """Reading rule 5 of §4.4 (and a part's page count, §4.5): the index entries, as rows
    of version 2 fields."""
    first, page_size = head.first, head.page_size
    entry_format = _SEG_ENTRY_V1 if head.version == 1 else SEGMENT_ENTRY
    rows = list(entry_format.iter_unpack(index))
    if head.version == 1:
        rows = [row + (0, 0, 0) for row in rows]
    # Runs for every segment restored or compacted: the entries' rules checked column by
    # column in C; _index_problem words the first one broken (or clears a valid mix of
    # known and unknown WAL positions, which this fast check leaves to it).
    txids, _, db_sizes, page_counts, _, salts1, salts2, wal_ends = zip(*rows, strict=True)
    if not (
        txids == tuple(range(first, head.last + 1))
        and min(db_sizes) >= 1
        and all(map(int.__le__, page_counts, db_sizes))
        and (0 not in wal_ends or not (any(salts1) or any(salts2)))
        and sum(page_counts) * (4 + page_size) == head.raw_length
    ):
        problem = _index_problem(rows, first, page_size, head.raw_length)
        if problem:
            raise CorruptObject(key, problem)
    part = head.part
    if part and not rows[0][3] <= part.commit_pages <= rows[0][2]:
        raise CorruptObject(
            key,
            f"part of {rows[0][3]} pages of a {part.commit_pages}-page commit"
            f" in a {rows[0][2]}-page db",
        )
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
    checked = _check_segment(data, key)
    return _header(checked.page_size, checked.first, checked.rows, checked.part), checked.body


def _header(page_size: int, first: int, rows: list[_Row], part: Part | None) -> SegmentHeader:
    index = tuple(
        IndexEntry(
            txid, time_ns, db_size, page_count, checksum, WalPos(s1, s2, end) if end else None
        )
        for txid, time_ns, db_size, page_count, checksum, s1, s2, end in rows
    )
    return SegmentHeader(page_size, first, first + len(rows) - 1, index, part)


def read_segment_header(data: bytes, key: str) -> SegmentHeader:
    """Validate a whole segment (SHA-256 included) and return its header and index."""
    return _parse_segment(data, key)[0]


def read_segment_index(read_at: Callable[[int, int], bytes], size: int, key: str) -> SegmentHeader:
    """The header and index of a segment of ``size`` bytes read through ``read_at(offset,
    length)``: only the bytes before its body, which listing and restore planning need.
    Reading rules 1-3 and 5 of §4.4; the body and the SHA-256 are not read, so the object is
    only vouched for by whoever reads it whole."""
    head = _check_head(memoryview(read_at(0, min(SEGMENT_HEAD_SIZE, size))), size, key)
    index = read_at(head.index_at, head.index_end - head.index_at)
    if len(index) != head.index_end - head.index_at:
        raise CorruptObject(key, f"index truncated: {len(index)} bytes")
    rows = _check_index(memoryview(index), head, key)
    return _header(head.page_size, head.first, rows, head.part)


def decode_segment(
    data: bytes, key: str, upto_txid: int | None = None
) -> tuple[SegmentHeader, list[Commit]]:
    """Validate a segment and decode its commits (up to `upto_txid`) in one call.

    For restore's prefetch threads: the SHA-256, the frame walk and zstd all release the GIL,
    so a whole segment is ready, and every check made, before the applying thread sees it.
    """
    header, body = _parse_segment(data, key)
    return header, list(_segment_commits(header, body, key, upto_txid))


class StreamedPages(Sequence[tuple[int, Page]]):
    """The pages of a part (§4.5) as its object downloads, in batches of about a MiB, read
    once: a giant commit is restored in bounded memory.  The object's SHA-256 and frame are
    checked before the last batch is handed out, so a damaged part raises before it ends."""

    def __init__(self, count: int, batches: Iterator[list[tuple[int, Page]]]) -> None:
        self._count = count
        self._batches = batches

    def __len__(self) -> int:
        return self._count

    def batches(self) -> Iterator[list[tuple[int, Page]]]:
        return self._batches

    def __iter__(self) -> Iterator[tuple[int, Page]]:
        for batch in self._batches:
            yield from batch

    @overload
    def __getitem__(self, i: int) -> tuple[int, Page]: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[tuple[int, Page]]: ...
    def __getitem__(self, i: int | slice) -> tuple[int, Page] | Sequence[tuple[int, Page]]:
        raise TypeError("streamed pages are read in order, once")


def stream_part(
    chunks: Iterable[bytes], size: int, key: str, upto_txid: int | None = None
) -> tuple[SegmentHeader, list[Commit]]:
    """A part of ``size`` bytes read in one pass over ``chunks`` (the object's bytes in
    order): its header and index at once (reading rules 1-3 and 5 of §4.4), its one commit
    with :class:`StreamedPages` (none past ``upto_txid``).  Memory is a chunk or two."""
    src = Sequential(chunks)
    prefix = src.read(min(SEGMENT_HEAD_SIZE, size))
    head = _check_head(memoryview(prefix), size, key)
    if head.part is None:
        raise CorruptObject(key, "a whole segment where a part was listed")
    prefix += src.read(head.index_end - len(prefix))
    rows = _check_index(memoryview(prefix)[head.index_at : head.index_end], head, key)
    header = _header(head.page_size, head.first, rows, head.part)
    entry = header.index[0]
    if upto_txid is not None and entry.txid > upto_txid:
        return header, []
    src.hash(prefix)
    body = StreamedBody(src, head.body_length, head.raw_length, size, key)
    pages = StreamedPages(entry.page_count, body.checked(_part_batches(header, body, key)))
    commit = Commit(entry.txid, entry.time_ns, entry.db_size, entry.checksum, pages, entry.wal)
    return header, [commit]


def _part_batches(
    header: SegmentHeader, body: StreamedBody, key: str
) -> Iterator[list[tuple[int, Page]]]:
    """A part's (pgno, page) pairs a MiB at a time, then ``body.finish()``."""
    entry, page_size = header.index[0], header.page_size
    # zstandard only calls read() on a file-like source, and StreamedBody provides it.
    reader = zstandard.ZstdDecompressor().stream_reader(cast(BinaryIO, body))
    n = entry.page_count
    pgnos = _record_pgnos(read_exact(reader, 4 * n, key), 0, entry, key)
    per = CHUNK // page_size
    for start in range(0, n, per):
        count = min(per, n - start)
        chunk = memoryview(read_exact(reader, count * page_size, key))
        yield [(pgnos[start + i], chunk[i * page_size : (i + 1) * page_size]) for i in range(count)]
    expect_end(reader, key)
    body.finish()


def _record_pgnos(
    record: bytes | memoryview, at: int, entry: IndexEntry, key: str
) -> tuple[int, ...]:
    """The page numbers that open ``entry``'s commit record at ``at`` (§4.3), checked."""
    pgnos = struct.unpack_from(f">{entry.page_count}I", record, at)
    problem = _pgno_problem(pgnos, entry.db_size)
    if problem:
        raise CorruptObject(key, f"txid {entry.txid}: {problem}")
    return pgnos


def _segment_commits(
    header: SegmentHeader, body: memoryview, key: str, upto_txid: int | None
) -> Iterator[Commit]:
    """Decompress the body, then cut the pages of the records wanted out of that one buffer."""
    entries = [e for e in header.index if upto_txid is None or e.txid <= upto_txid]
    record_size = [e.page_count * (4 + header.page_size) for e in entries]
    raw = memoryview(_decompressed(body, header.raw_length, key))
    pos = 0
    for entry, size in zip(entries, record_size, strict=True):
        pgnos = _record_pgnos(raw, pos, entry, key)
        first = pos + 4 * entry.page_count
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
    checked = _check_segment(data, key)
    if checked.part is not None:  # merging would make the part a commit of its own
        raise CorruptObject(key, "a part of a commit cannot be merged")
    version, page_size, first = checked.version, checked.page_size, checked.first
    rows = checked.rows
    body, raw_length = checked.body, checked.raw_length
    raw = _decompressed(body, raw_length, key)
    pos, width = 0, 4 + page_size
    for txid, _, db_size, page_count, *_ in rows:
        problem = _pgno_problem(struct.unpack_from(f">{page_count}I", raw, pos), db_size)
        if problem:
            raise CorruptObject(key, f"txid {txid}: {problem}")
        pos += page_count * width
    if version >= 2:
        index = data[checked.index_at : checked.index_at + len(rows) * SEGMENT_ENTRY.size]
    else:
        index = b"".join(SEGMENT_ENTRY.pack(*row) for row in rows)
    counts = tuple(row[3] for row in rows)
    return RawSegment(key, data, page_size, first, first + len(rows) - 1, counts, index, raw)


def merge_segments(
    segments: Sequence[RawSegment], max_bytes: int, level: int = SEGMENT_LEVEL
) -> Iterator[tuple[int, int, bytes | memoryview]]:
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
    width = SEGMENT_ENTRY.size
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
    whole: dict[tuple[int, int], bytes | memoryview] = {
        (s.first_txid, s.last_txid): s.data for s in segments
    }
    lasts = [f - 1 for f in firsts[1:]] + [expected - 1]
    for first, last, index_runs, body_runs in zip(firsts, lasts, indexes, bodies, strict=True):
        data = whole.get((first, last))
        if data is None:
            data = _seal_segment(page_size, first, last, index_runs, body_runs, level).data
        yield first, last, data
