"""Snapshots (§5): a database's full image at one txid, written and read in one sequential
pass.

Every object is untrusted: any defect raises `CorruptObject` and nothing else, and no
declared length is trusted for an allocation before the object's real size vouches for it.
"""

from __future__ import annotations

import hashlib
import io
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, cast

import zstandard

from walsync_vfs.format import container
from walsync_vfs.format.checksum import Page, page_hash, run_hash
from walsync_vfs.format.container import CHUNK, SHA_LEN
from walsync_vfs.format.errors import CorruptObject
from walsync_vfs.format.fields import I64_MAX, I64_MIN, U32_MAX, U64_MAX, valid_page_size

SNAPSHOT_VERSION = 1
SNAPSHOT_MAGIC = b"\x89WSSNP\r\n"
_SNAP_HEADER = struct.Struct(">8sHHIQqI")  # magic version flags page_size txid time_ns db_size
_SNAP_FOOTER = struct.Struct(">QQ32s")  # checksum body_length sha256
SNAPSHOT_HEADER_SIZE = _SNAP_HEADER.size
SNAPSHOT_FOOTER_SIZE = _SNAP_FOOTER.size
# A snapshot compresses a whole database while it is read: zstd level 2 comes near level 3's
# size on table and index pages at level 1's speed (level 3 is several times slower on
# high-entropy text).
SNAPSHOT_LEVEL = 2


@dataclass(frozen=True, slots=True)
class SnapshotHeader:
    page_size: int
    txid: int
    time_ns: int
    db_size: int
    checksum: int  # whole-db checksum of the image


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
        level: int = SNAPSHOT_LEVEL,
    ) -> None:
        if not valid_page_size(page_size):
            raise ValueError(f"invalid page size {page_size}")
        if not (0 <= txid <= U64_MAX and I64_MIN <= time_ns <= I64_MAX):
            raise ValueError("txid or time_ns out of range")
        if not 0 <= db_size <= U32_MAX:
            raise ValueError(f"db_size {db_size} out of range")
        self._out = fileobj
        self._sha = hashlib.sha256()
        self._written = 0
        # Output in whole CHUNK buffers: one allocation a MiB, without small ones between
        # them that keep the allocator from reusing what a streamed upload frees.
        self._compressor = zstandard.ZstdCompressor(level=level).chunker(
            size=db_size * page_size, chunk_size=CHUNK
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

    def add_page(self, data: Page) -> None:
        if self._pgno == self._header.db_size:
            raise ValueError(f"more than db_size={self._header.db_size} pages added")
        if len(data) != self._header.page_size:
            raise ValueError(f"page of {len(data)} bytes, page size is {self._header.page_size}")
        self._pgno += 1
        self._checksum ^= page_hash(self._pgno, data)
        for chunk in self._compressor.compress(data):
            self._write(chunk)

    def finish(self) -> SnapshotHeader:
        """Write the footer; returns the header as a reader will see it (checksum filled in)."""
        if self._finished:
            raise ValueError("snapshot already finished")
        if self._pgno != self._header.db_size:
            raise ValueError(f"{self._pgno} pages added, db_size is {self._header.db_size}")
        self._finished = True
        for chunk in self._compressor.finish():  # type: ignore[no-untyped-call]  # stub
            self._write(chunk)
        body_length = self._written - _SNAP_HEADER.size
        self._write(struct.pack(">QQ", self._checksum, body_length))
        self._out.write(self._sha.digest())
        h = self._header
        return SnapshotHeader(h.page_size, h.txid, h.time_ns, h.db_size, self._checksum)


def encode_snapshot(
    pages: Iterable[Page], page_size: int, txid: int, time_ns: int, db_size: int
) -> Iterator[bytes]:
    """The snapshot of ``pages`` (1..db_size, in order) as the object's bytes in chunks of
    about a MiB, encoded as they are asked for: a streaming upload holds a chunk or two, not
    the object.  The last chunk ends with the whole footer."""
    out = _Chunks()
    writer = SnapshotWriter(cast(BinaryIO, out), page_size, txid, time_ns, db_size)
    for page in pages:
        writer.add_page(page)
        if out.size >= CHUNK:
            yield out.take()
    writer.finish()
    yield out.take()


class _Chunks:
    """What a SnapshotWriter wrote since the last take()."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.size = 0

    def write(self, data: bytes) -> None:
        self._parts.append(data)
        self.size += len(data)

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts, self.size = [], 0
        return data


def snapshot_header(head: bytes, footer: bytes, size: int, key: str) -> SnapshotHeader:
    """The header of a snapshot of ``size`` bytes from its first SNAPSHOT_HEADER_SIZE and last
    SNAPSHOT_FOOTER_SIZE bytes, checked as far as they go (§5.4: magic, version, fields,
    object size); the body and the SHA-256 are not read, so the object is only vouched for
    by whoever reads it whole."""
    container.check_magic_version(head, SNAPSHOT_MAGIC, "snapshot", SNAPSHOT_VERSION, key)
    if len(head) < _SNAP_HEADER.size or size < _SNAP_HEADER.size + _SNAP_FOOTER.size:
        raise CorruptObject(key, f"truncated: {size} bytes")
    _, _, flags, page_size, txid, time_ns, db_size = _SNAP_HEADER.unpack(head)
    container.check_flags_page_size(flags, page_size, key)
    if len(footer) != _SNAP_FOOTER.size:
        raise CorruptObject(key, f"truncated: {size} bytes")
    checksum, body_length, _ = _SNAP_FOOTER.unpack(footer)
    expected = _SNAP_HEADER.size + body_length + _SNAP_FOOTER.size
    if size != expected:
        raise CorruptObject(key, f"object is {size} bytes, footer implies {expected}")
    return SnapshotHeader(page_size, txid, time_ns, db_size, checksum)


def read_snapshot(src: bytes | BinaryIO, key: str) -> tuple[SnapshotHeader, Iterator[Page]]:
    """Validate a snapshot's structure and return its header and an iterator of its pages.

    `src` is the whole object as bytes, or a seekable file holding the object from its
    current position to its end. For bytes the SHA-256 is checked before any page is
    returned; for files it is checked while streaming (see :func:`stream_snapshot`).
    Either way the iterator raises before yielding the last page if the SHA-256 or the
    database checksum is wrong, so the image is good only once the iterator is exhausted
    without error.
    """
    if not isinstance(src, bytes | bytearray | memoryview):
        f = src
        base = f.tell()
        size = f.seek(0, io.SEEK_END) - base
        f.seek(max(base, base + size - _SNAP_FOOTER.size))
        footer = f.read(_SNAP_FOOTER.size)
        f.seek(base)
        return stream_snapshot(iter(lambda: f.read(CHUNK), b""), size, footer, key)
    view = memoryview(src)
    size = len(view)
    header = snapshot_header(
        view[: _SNAP_HEADER.size].tobytes(), view[-_SNAP_FOOTER.size :].tobytes(), size, key
    )
    if hashlib.sha256(view[:-SHA_LEN]).digest() != view[-SHA_LEN:]:
        raise CorruptObject(key, "sha256 mismatch")
    body = view[_SNAP_HEADER.size : -_SNAP_FOOTER.size]
    container.check_frame(body, header.db_size * header.page_size, key)
    return header, container.held_back(_snapshot_pages(header, body, lambda: None, key))


def stream_snapshot(
    chunks: Iterable[bytes], size: int, footer: bytes, key: str
) -> tuple[SnapshotHeader, Iterator[Page]]:
    """Read a snapshot of ``size`` bytes in one pass over ``chunks`` (the object's bytes in
    order, in pieces of any size: a download, a file), given its ``footer`` (its last
    SNAPSHOT_FOOTER_SIZE bytes, read beforehand so the header carries the checksum).

    The header is read at once; the frame structure, the SHA-256, that the footer read
    beforehand is the object's, and the database checksum are checked as the pages stream,
    and the iterator raises before yielding the last page if any is wrong.  Memory is a
    chunk or two, whatever the size."""
    src = container.Sequential(chunks)
    head = src.read(_SNAP_HEADER.size)
    header = snapshot_header(head, footer, size, key)
    src.hash(head)
    body_length = size - _SNAP_HEADER.size - _SNAP_FOOTER.size
    raw_length = header.db_size * header.page_size
    body = container.StreamedBody(
        src, body_length, raw_length, size, key, footer_length=_SNAP_FOOTER.size, footer=footer
    )
    # zstandard only calls read() on a file-like source, and StreamedBody provides it.
    return header, body.checked(_snapshot_pages(header, cast(BinaryIO, body), body.finish, key))


def _snapshot_pages(
    header: SnapshotHeader, body: memoryview | BinaryIO, finish: Callable[[], None], key: str
) -> Iterator[Page]:
    """The pages decompressed from ``body``, then ``finish()`` (what a streaming reader checks
    at the end) and the database checksum: held back (:func:`container.held_back`), the last
    page comes only once everything checks out."""
    reader = zstandard.ZstdDecompressor().stream_reader(body)
    size = header.page_size
    checksum = 0
    for start in range(0, header.db_size, CHUNK // size):  # 1 MiB of pages per read
        count = min(CHUNK // size, header.db_size - start)
        chunk = memoryview(container.read_exact(reader, count * size, key))
        checksum ^= run_hash(start + 1, chunk, size)
        for i in range(count):
            yield chunk[i * size : (i + 1) * size]
    container.expect_end(reader, key)
    finish()
    if checksum != header.checksum:
        raise CorruptObject(
            key, f"database checksum {checksum:#018x}, footer says {header.checksum:#018x}"
        )
