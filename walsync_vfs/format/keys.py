"""Object keys (§2): database names, generation ids, and the keys of snapshots and segments.

A database name ends up as one path component of every key, and of a local replica's file
paths, so :func:`check_name` is the one rule for names wherever they come from.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Literal

from walsync_vfs.format.errors import CorruptObject
from walsync_vfs.format.fields import U64_MAX

_BAD_NAME_CHAR = re.compile(r"[/\\\x00-\x1f\x7f]")
_HEX16 = r"[0-9a-f]{16}"
_GENERATION = _HEX16 + r"-[0-9a-f]{8}"
_GENERATION_RE = re.compile(_GENERATION)
_EPOCH = r"(?:\.e([0-9a-f]{8}))?"  # the writer's lease epoch; absent = 0 (unfenced writers)
# The name is any first component here; _valid_name() then decides, so names have one rule.
_PART = r"(?:\.p([0-9a-f]{8})of([0-9a-f]{8}))?"  # part <index> of <count> of one commit (§4.5)
_KEY_RE = re.compile(
    rf"([^/]+)/({_GENERATION})/"
    rf"(?:snapshot/({_HEX16}){_EPOCH}\.wsnap|seg/({_HEX16})-({_HEX16}){_PART}{_EPOCH}\.wseg)"
)
EPOCH_MAX = 0xFFFFFFFF
# The writer leases (lease.py) live outside the databases' prefixes, so a database's listing
# holds its data objects only; not a key of the grammar, so never taken for data.
LEASES = ".walsync-lease"


def _valid_name(name: object) -> bool:
    """One path component: never empty, ``.``, ``..`` or the leases' folder, no ``/``, ``\\``
    or control chars."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..", LEASES)
        and _BAD_NAME_CHAR.search(name) is None
    )


def check_name(name: str) -> str:
    """``name`` if it is a valid database name: names must never reach outside the replica root
    (nor into its folder of leases)."""
    if name == LEASES:
        raise ValueError(f"invalid database name {name!r}: the replica root keeps its leases there")
    if not _valid_name(name):
        raise ValueError(
            f"invalid database name {name!r}: use one path component without '/', '\\' or "
            "control characters"
        )
    return name


@dataclass(frozen=True, slots=True)
class ParsedKey:
    """A key of ours, decomposed; a snapshot has first_txid == last_txid == its txid."""

    name: str
    generation: str
    kind: Literal["snapshot", "segment"]
    first_txid: int
    last_txid: int
    epoch: int = 0  # the lease epoch of the writer that wrote it (0: written unfenced)
    part: int = 0  # a part of one commit (§4.5): its index ...
    parts: int = 0  # ... and the commit's number of parts; 0: the segment holds whole commits


def _checked_prefix(name: str, generation: str) -> str:
    check_name(name)
    if _GENERATION_RE.fullmatch(generation) is None:
        raise ValueError(f"invalid generation id {generation!r}")
    return f"{name}/{generation}"


def _hex_txid(txid: int) -> str:
    if not 0 <= txid <= U64_MAX:
        raise ValueError(f"txid {txid} out of u64 range")
    return f"{txid:016x}"


def new_generation_id(txid: int) -> str:
    """Id for a generation starting at `txid`: sorts by start, random tail avoids collisions."""
    return f"{_hex_txid(txid)}-{secrets.token_hex(4)}"


def _epoch_tag(epoch: int) -> str:
    """The key's epoch part: none for 0, so unfenced writers keep the original key names."""
    if not 0 <= epoch <= EPOCH_MAX:
        raise ValueError(f"epoch {epoch} out of u32 range")
    return f".e{epoch:08x}" if epoch else ""


def snapshot_key(name: str, generation: str, txid: int, epoch: int = 0) -> str:
    prefix = _checked_prefix(name, generation)
    return f"{prefix}/snapshot/{_hex_txid(txid)}{_epoch_tag(epoch)}.wsnap"


def segment_key(
    name: str,
    generation: str,
    first_txid: int,
    last_txid: int,
    epoch: int = 0,
    part: tuple[int, int] | None = None,
) -> str:
    """A segment's key; ``part`` = (index, count) for one part of the commit ``first_txid``."""
    if first_txid > last_txid:
        raise ValueError(f"segment range {first_txid}..{last_txid} is empty")
    prefix = _checked_prefix(name, generation)
    tag = ""
    if part is not None:
        index, count = part
        if first_txid != last_txid or not 0 <= index < count or not 2 <= count <= EPOCH_MAX:
            raise ValueError(f"invalid part {index} of {count} of txids {first_txid}..{last_txid}")
        tag = f".p{index:08x}of{count:08x}"
    txids = f"{_hex_txid(first_txid)}-{_hex_txid(last_txid)}"
    return f"{prefix}/seg/{txids}{tag}{_epoch_tag(epoch)}.wseg"


def lease_key(name: str) -> str:
    return f"{LEASES}/{check_name(name)}"


def parse_key(key: str) -> ParsedKey | None:
    """Decompose one of our keys; None for anything else, since foreign files are ignored."""
    m = _KEY_RE.fullmatch(key)
    if m is None or not _valid_name(m[1]) or "00000000" in (m[4], m[9]):
        return None  # epoch 0 is written without its part: one object, one key
    if m[3] is not None:
        txid = int(m[3], 16)
        return ParsedKey(m[1], m[2], "snapshot", txid, txid, _epoch(m[4]))
    first, last = int(m[5], 16), int(m[6], 16)
    if first > last:
        return None
    if m[7] is None:
        return ParsedKey(m[1], m[2], "segment", first, last, _epoch(m[9]))
    part, parts = int(m[7], 16), int(m[8], 16)
    if first != last or not part < parts or parts < 2:
        return None
    return ParsedKey(m[1], m[2], "segment", first, last, _epoch(m[9]), part, parts)


def _epoch(tag: str | None) -> int:
    return int(tag, 16) if tag else 0


def check_named(key: str, first: int, last: int) -> None:
    """CorruptObject if ``key`` is one of ours and names other txids than its object holds:
    a misnamed object (copied or renamed in the store) would restore another state."""
    named = parse_key(key)
    if named is not None and (named.first_txid, named.last_txid) != (first, last):
        held, said = (first, last), (named.first_txid, named.last_txid)
        raise CorruptObject(key, f"holds {_txids(*held)}, its name says {_txids(*said)}")


def _txids(first: int, last: int) -> str:
    return f"txid {first}" if first == last else f"txids {first}..{last}"
