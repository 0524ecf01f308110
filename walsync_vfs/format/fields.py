"""Ranges of the fixed-width integers that keys and objects store, and the page sizes SQLite
allows: checked before encoding, so nothing is written that a reader would reject."""

from __future__ import annotations

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
I64_MIN, I64_MAX = -(2**63), 2**63 - 1


def valid_page_size(page_size: int) -> bool:
    return 512 <= page_size <= 65536 and page_size & (page_size - 1) == 0
