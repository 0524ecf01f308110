"""Snapshots (§5): a database's full image at one txid, written and read in one sequential
pass.

Every object is untrusted: any defect raises `CorruptObject` and nothing else, and no
declared length is trusted for an allocation before the object's real size vouches for it.
"""

from __future__ import annotations

import hashlib
import io
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, cast

import zstandard

from walsync_vfs.format import container
from walsync_vfs.format.checksum import Page, page_hash
from walsync_vfs.format.container import CHUNK, SHA_LEN
from walsync_vfs.format.errors import CorruptObject
from walsync_vfs.format.fields import I64_MAX, I64_MIN, U32_MAX, U64_MAX, valid_page_size

SNAPSHOT_VERSION = 1
SNAPSHOT_MAGIC = b"\x89WSSNP\r\n"
_SNAP_HEADER = struct.Struct(">8sHHIQqI")  # magic version flags page_size txid time_ns db_size
_SNAP_FOOTER = struct.Struct(">QQ32s")  # checksum body_length sha256


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
        level: int = 3,
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
        while self.read(CHUNK):
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
    container.check_magic_version(head, SNAPSHOT_MAGIC, "snapshot", SNAPSHOT_VERSION, key)
    if len(head) < _SNAP_HEADER.size or size < _SNAP_HEADER.size + _SNAP_FOOTER.size:
        raise CorruptObject(key, f"truncated: {size} bytes")
    _, _, flags, page_size, txid, time_ns, db_size = _SNAP_HEADER.unpack(head)
    container.check_flags_page_size(flags, page_size, key)
    footer = read_at(size - _SNAP_FOOTER.size, _SNAP_FOOTER.size)
    checksum, body_length, sha = _SNAP_FOOTER.unpack(footer)
    expected = _SNAP_HEADER.size + body_length + _SNAP_FOOTER.size
    if size != expected:
        raise CorruptObject(key, f"object is {size} bytes, footer implies {expected}")
    start = _SNAP_HEADER.size
    if isinstance(src, bytes | bytearray | memoryview):
        if hashlib.sha256(view[:-SHA_LEN]).digest() != sha:
            raise CorruptObject(key, "sha256 mismatch")
        body: memoryview | _HashingBody = view[start : start + body_length]
    else:
        body = _HashingBody(src, base + start, body_length, hashlib.sha256(head))
    container.check_frame(
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
    # zstandard only calls read() on a file-like source, and _HashingBody provides it.
    source = body if isinstance(body, memoryview) else cast(BinaryIO, body)
    reader = zstandard.ZstdDecompressor().stream_reader(source)
    size = header.page_size
    checksum = 0
    held: Page | None = None  # the latest page, released only once everything checks out
    for start in range(0, header.db_size, CHUNK // size):  # 1 MiB of pages per read
        count = min(CHUNK // size, header.db_size - start)
        chunk = memoryview(container.read_exact(reader, count * size, key))
        for i in range(count):
            page = chunk[i * size : (i + 1) * size]
            checksum ^= page_hash(start + i + 1, page)
            if held is not None:
                yield held
            held = page
    container.expect_end(reader, key)
    if isinstance(body, _HashingBody) and body.digest(footer[:-SHA_LEN]) != footer[-SHA_LEN:]:
        raise CorruptObject(key, "sha256 mismatch")
    if checksum != header.checksum:
        raise CorruptObject(
            key, f"database checksum {checksum:#018x}, footer says {header.checksum:#018x}"
        )
    if held is not None:
        yield held
