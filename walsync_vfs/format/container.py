"""What segments (§4) and snapshots (§5) share: the checks of their magic, version, flags
and page size, the proof that a body is exactly one zstd frame, bounded decompression, and
reading an object in one pass as it downloads.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import zstandard

from walsync_vfs.format.errors import CorruptObject
from walsync_vfs.format.fields import U64_MAX, valid_page_size

T = TypeVar("T")

SHA_LEN = 32  # both kinds of object end with the SHA-256 of all that comes before it
_VERSION_END = 10  # magic + version: all a reader needs to refuse an object it cannot parse
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ZSTD_MAX_FRAME_HEADER = 18
# Decompressed data is read at most this much at a time, so memory follows what really
# decompresses rather than what a (possibly forged) length field claims.  A multiple of every
# page size, so snapshot pages never straddle two reads.
CHUNK = 1 << 20


def check_magic_version(
    head: bytes | memoryview, magic: bytes, kind: str, newest: int, key: str
) -> int:
    """Check magic and version (1..newest are readable) of a `kind` object; return the version."""
    if len(head) < _VERSION_END:
        raise CorruptObject(key, f"truncated: {len(head)} bytes")
    if head[:8] != magic:
        raise CorruptObject(key, f"bad magic: not a walsync_vfs {kind}")
    version = int.from_bytes(head[8:_VERSION_END], "big")
    if version > newest:
        raise CorruptObject(
            key, f"written by a newer format version {version}; upgrade walsync_vfs"
        )
    if version == 0:
        raise CorruptObject(key, f"invalid format version {version}")
    return version


def check_flags_page_size(flags: int, page_size: int, key: str) -> None:
    if flags:
        raise CorruptObject(key, f"unknown flags {flags:#06x}")
    if not valid_page_size(page_size):
        raise CorruptObject(key, f"invalid page size {page_size}")


def check_frame(body: bytes | memoryview, raw_length: int, key: str) -> None:
    """Prove the whole ``body`` is exactly one zstd frame of ``raw_length`` content (§4.3)."""
    walker = FrameWalker(len(body), raw_length, key)
    walker.feed(body)
    walker.end()


class FrameWalker:
    """Proves a body of ``length`` bytes is exactly one zstd frame of ``raw_length`` content
    (§4.3) as its bytes go by, in order, in pieces of any size: block headers are read and
    block contents skipped, so trailing bytes or a short frame are caught without
    decompressing, and the frame header before a decompressor sees any of it."""

    def __init__(self, length: int, raw_length: int, key: str) -> None:
        self._length = length
        self._raw_length = raw_length
        self._key = key
        self._gathered = bytearray()  # the frame header or a block header, being collected
        self._in_header = True
        self._frame_pos = 0  # where the structure being collected starts in the frame
        self._skip = 0  # block content (and checksum) bytes still to pass over
        self._ended = False  # the last block has been seen
        self._has_checksum = False

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            if self._skip:
                n = min(self._skip, len(view))
                self._skip -= n
                view = view[n:]
                continue
            if self._ended:  # unreachable when the frame ends where the body does
                raise CorruptObject(self._key, "bytes after the zstd frame")
            need = min(_ZSTD_MAX_FRAME_HEADER, self._length) if self._in_header else 3
            n = need - len(self._gathered)
            self._gathered += view[:n]
            view = view[n:]
            if len(self._gathered) == need:
                rest = self._parse()
                if rest:
                    self.feed(rest)

    def end(self) -> None:
        """The body is over: the frame must have ended exactly there."""
        if self._in_header:
            self._parse()  # a body shorter than a frame header: says what is wrong with it
        if not self._ended or self._skip:
            raise CorruptObject(self._key, "zstd frame truncated")

    def _parse(self) -> bytes:
        """Parse what was gathered; returns the bytes gathered past it (after a frame header
        shorter than the longest one)."""
        data, self._gathered = bytes(self._gathered), bytearray()
        if self._in_header:
            self._in_header = False
            return data[self._frame_header(data) :]
        bits = int.from_bytes(data, "little")
        last, block_type, block_size = bits & 1, bits >> 1 & 3, bits >> 3
        if block_type == 3:
            raise CorruptObject(self._key, "zstd frame has a reserved block type")
        self._skip = 1 if block_type == 1 else block_size  # RLE blocks store one byte
        if last:
            self._ended = True
            self._skip += 4 if self._has_checksum else 0
            end = self._frame_pos + 3 + self._skip
            if end != self._length:
                raise CorruptObject(
                    self._key, f"zstd frame is {end} bytes, body_length is {self._length}"
                )
        self._frame_pos += 3 + self._skip
        return b""

    def _frame_header(self, head: bytes) -> int:
        """Check the frame header at the start of ``head``; returns its size."""
        key = self._key
        if head[:4] != _ZSTD_MAGIC:
            raise CorruptObject(key, "body is not a zstd frame")
        try:
            params = zstandard.get_frame_parameters(head)
            size = int(zstandard.frame_header_size(head))
        except zstandard.ZstdError as e:
            raise CorruptObject(key, f"bad zstd frame header: {e}") from None
        if params.content_size != self._raw_length or params.content_size == U64_MAX:
            raise CorruptObject(
                key, f"zstd frame content size {params.content_size}, expected {self._raw_length}"
            )
        if params.dict_id:
            raise CorruptObject(key, "zstd frame needs a dictionary")
        self._has_checksum = bool(params.has_checksum)
        self._frame_pos = size
        return size


def read_exact(reader: zstandard.ZstdDecompressionReader, n: int, key: str) -> bytes:
    parts = []
    while n:
        try:
            chunk = reader.read(min(n, CHUNK))
        except zstandard.ZstdError as e:
            raise CorruptObject(key, f"zstd: {e}") from None
        if not chunk:
            raise CorruptObject(key, "decompressed body ends early")
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def expect_end(reader: zstandard.ZstdDecompressionReader, key: str) -> None:
    try:
        extra = reader.read(1)
    except zstandard.ZstdError as e:
        raise CorruptObject(key, f"zstd: {e}") from None
    if extra:
        raise CorruptObject(key, "decompressed body longer than declared")


class Sequential:
    """An object's bytes from an iterator of chunks, read in order; hashed on request, on a
    thread of its own (SHA-256 releases the GIL, so it runs beside decompression)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._left = memoryview(b"")
        self._sha = hashlib.sha256()
        self._hasher = ThreadPoolExecutor(1, "walsync-sha")
        self._hashed: Future[None] | None = None

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; fewer only at the end."""
        parts = []
        while n > 0:
            if not self._left:
                chunk = next(self._chunks, None)
                if chunk is None:
                    break
                self._left = memoryview(chunk).cast("B")
            part = self._left[:n]
            self._left = self._left[n:]
            n -= len(part)
            parts.append(part)
        return b"".join(parts)

    def hash(self, data: bytes) -> None:
        self._hashed = self._hasher.submit(self._sha.update, data)

    def digest(self) -> bytes:
        """The SHA-256 of what was hashed so far."""
        if self._hashed is not None:
            self._hashed.result()
        return self._sha.digest()

    def __del__(self) -> None:
        self._hasher.shutdown(wait=False)


def held_back(items: Iterable[T]) -> Iterator[T]:
    """``items``, each handed out once the next is made and the last once ``items`` has
    ended: the checks an iterator makes after its last item come before that item is."""
    held: T | None = None
    for item in items:
        if held is not None:
            yield held
        held = item
    if held is not None:
        yield held


class StreamedBody:
    """An object's body as a file for the decompressor: each byte hashed and walked
    (:class:`FrameWalker`) before the decompressor sees it.  The object ends with a footer of
    ``footer_length`` bytes: fields hashed with the rest, then the SHA-256 of all before it;
    ``footer``, when given, is that footer as read beforehand."""

    def __init__(
        self,
        src: Sequential,
        length: int,
        raw_length: int,
        size: int,
        key: str,
        *,
        footer_length: int = SHA_LEN,
        footer: bytes | None = None,
    ) -> None:
        self._src = src
        self._left = length
        self._walker = FrameWalker(length, raw_length, key)
        self._size = size
        self._key = key
        self._footer_length = footer_length
        self._footer = footer
        self._hashed = False  # the whole object (but its SHA-256) went through the hash

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        data = self._src.read(n)
        if len(data) < n:
            raise CorruptObject(self._key, "object ended early")
        self._left -= n
        self._src.hash(data)
        self._walker.feed(data)
        return data

    def finish(self) -> None:
        """The decompressor is done: check the frame ends with the body, the object's size,
        the footer read beforehand, and the SHA-256."""
        while self.read(CHUNK):  # what the decompressor left unread (a frame checksum)
            pass
        self._walker.end()
        fields = self._hash_fields()
        digest = self._src.digest()
        stored = fields + self._src.read(SHA_LEN + 1)
        if len(stored) != self._footer_length:
            raise CorruptObject(self._key, f"object is not {self._size} bytes")
        if self._footer is not None and stored != self._footer:
            raise CorruptObject(self._key, "footer changed while the object was read")
        if digest != stored[-SHA_LEN:]:
            raise CorruptObject(self._key, "sha256 mismatch")

    def checked(self, items: Iterable[T]) -> Iterator[T]:
        """``items`` decoded from this body (an iterator that calls :meth:`finish` after its
        last item), the last held back until they have ended.  A damaged object is named as
        such (sha256 mismatch), not by the first symptom the stream met."""
        try:
            yield from held_back(items)
        except CorruptObject:
            if self._hashed:  # finish() read the SHA-256: its verdict stands
                raise
            self._skip()
            self._hash_fields()
            known = self._footer  # read beforehand: the object whose header was checked
            stored = known[-SHA_LEN:] if known is not None else self._src.read(SHA_LEN)
            if self._src.digest() != stored:
                raise CorruptObject(self._key, "sha256 mismatch") from None
            raise

    def _hash_fields(self) -> bytes:
        """Read and hash the footer's fields before its SHA-256."""
        fields = self._src.read(self._footer_length - SHA_LEN)
        self._src.hash(fields)
        self._hashed = True
        return fields

    def _skip(self) -> None:
        """Hash the rest of the body without walking it (a defect was found already)."""
        while self._left:
            data = self._src.read(min(CHUNK, self._left))
            if not data:
                return
            self._left -= len(data)
            self._src.hash(data)
