"""On-store object formats: key names, whole-database checksums, segments and snapshots.

docs/FORMAT.md is the specification; section numbers in these modules refer to it.  The rest
of walsync_vfs uses the names below as ``format.X``; each lives in the module of its concept.
"""

from walsync_vfs.format.checksum import DbChecksum, Page, page_hash
from walsync_vfs.format.errors import CorruptObject
from walsync_vfs.format.keys import (
    ParsedKey,
    check_name,
    lease_key,
    new_generation_id,
    parse_key,
    segment_key,
    snapshot_key,
)
from walsync_vfs.format.segment import (
    SEGMENT_LEVEL,
    SEGMENT_MAGIC,
    SEGMENT_VERSION,
    SMALL_SEGMENT_LEVEL,
    Commit,
    IndexEntry,
    Part,
    RawSegment,
    SegmentHeader,
    WalPos,
    decode_segment,
    encode_part,
    encode_segment,
    merge_segments,
    read_segment_header,
    read_segment_raw,
)
from walsync_vfs.format.snapshot import (
    SNAPSHOT_MAGIC,
    SNAPSHOT_VERSION,
    SnapshotHeader,
    SnapshotWriter,
    read_snapshot,
)

__all__ = [
    "SEGMENT_LEVEL",
    "SEGMENT_MAGIC",
    "SEGMENT_VERSION",
    "SMALL_SEGMENT_LEVEL",
    "SNAPSHOT_MAGIC",
    "SNAPSHOT_VERSION",
    "Commit",
    "CorruptObject",
    "DbChecksum",
    "IndexEntry",
    "Page",
    "ParsedKey",
    "Part",
    "RawSegment",
    "SegmentHeader",
    "SnapshotHeader",
    "SnapshotWriter",
    "WalPos",
    "check_name",
    "lease_key",
    "decode_segment",
    "encode_part",
    "encode_segment",
    "merge_segments",
    "new_generation_id",
    "page_hash",
    "parse_key",
    "read_segment_header",
    "read_segment_raw",
    "read_snapshot",
    "segment_key",
    "snapshot_key",
]
