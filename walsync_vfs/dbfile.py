"""Writing pages into a plain database file: the one primitive replay and restore share."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO


def apply_pages(
    f: BinaryIO, page_size: int, db_size: int, pages: Iterable[tuple[int, bytes]]
) -> None:
    """Write each (pgno, page) in place, then cut the file to ``db_size`` pages.

    Truncating last is what makes a shrinking commit (VACUUM, auto-vacuum) come out right.
    """
    for pgno, data in pages:
        f.seek((pgno - 1) * page_size)
        f.write(data)
    f.truncate(db_size * page_size)


def tee(pages: Iterable[bytes], sink: Callable[[bytes], object]) -> Iterator[bytes]:
    """Pass pages through while handing each to ``sink``: one read feeds two consumers."""
    for page in pages:
        sink(page)
        yield page
