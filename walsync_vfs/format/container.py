"""What segments (§4) and snapshots (§5) share: the checks of their magic, version, flags
and page size, the proof that a body is exactly one zstd frame, and bounded decompression.
"""

from __future__ import annotations

from collections.abc import Callable

import zstandard

from walsync_vfs.format.errors import CorruptObject
from walsync_vfs.format.fields import U64_MAX, valid_page_size

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


def check_frame(
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
    if params.content_size != raw_length or params.content_size == U64_MAX:
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
