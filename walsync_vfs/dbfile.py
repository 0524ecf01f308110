"""Writing pages into a plain database file, and reading them back: the primitives replay and
restore share."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO, TypeVar

from walsync_vfs.format import Page

# Pages per pwritev call: IOV_MAX is 1024 on Linux and the BSDs (POSIX guarantees only 16,
# but every platform the shim builds on allows 1024).
_MAX_RUN = 1024

T = TypeVar("T")


def apply_pages(
    f: BinaryIO, page_size: int, db_size: int, pages: Iterable[tuple[int, Page]]
) -> None:
    """Write each (pgno, page) in place, then cut the file to ``db_size`` pages.

    Consecutive page numbers go out in one ``pwritev``: a commit's pages are sorted, so
    appended pages cost one system call instead of a seek and a write each.  Truncating last
    is what makes a shrinking commit (VACUUM, auto-vacuum) come out right.
    """
    f.flush()  # whatever f still buffers must land before the writes that bypass it
    write_pages(f.fileno(), page_size, pages)
    os.ftruncate(f.fileno(), db_size * page_size)


def page_runs(pages: Iterable[tuple[int, T]], longest: int) -> Iterator[tuple[int, list[T]]]:
    """(first page number, items) of each run of consecutive page numbers among the
    (pgno, item) pairs, in order, cut into runs of at most ``longest`` items."""
    run: list[T] = []
    start = 0
    for pgno, item in pages:
        if run and (pgno != start + len(run) or len(run) == longest):
            yield start, run
            run = []
        if not run:
            start = pgno
        run.append(item)
    if run:
        yield start, run


def write_pages(fd: int, page_size: int, pages: Iterable[tuple[int, Page]]) -> None:
    """Write each (pgno, page) in place, consecutive page numbers in one ``pwritev``."""
    for start, run in page_runs(pages, _MAX_RUN):
        _write_run(fd, run, (start - 1) * page_size)


def _write_run(fd: int, run: list[Page], offset: int) -> None:
    """One pwritev; a short write (a signal, a nearly full disk) is finished with pwrite."""
    done = os.pwritev(fd, run, offset)
    total = sum(map(len, run))
    if done < total:
        rest = memoryview(b"".join(run))
        while done < total:
            done += os.pwrite(fd, rest[done:], offset + done)


def read_pages(fd: int, page_size: int, first: int, count: int) -> bytes:
    """Pages ``first`` .. ``first + count - 1`` of the file ``fd``, zeros past its end (as
    SQLite reads a short file)."""
    data = os.pread(fd, count * page_size, (first - 1) * page_size)
    return data.ljust(count * page_size, b"\0")


def tee(pages: Iterable[Page], sink: Callable[[Page], object]) -> Iterator[Page]:
    """Pass pages through while handing each to ``sink``: one read feeds two consumers."""
    for page in pages:
        sink(page)
        yield page
