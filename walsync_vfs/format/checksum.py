"""Page hashes and the whole-database checksum (§3), kept up to date commit by commit."""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable, Sequence

import xxhash

from walsync_vfs._shim import ffi as _ffi
from walsync_vfs._shim import lib as _lib
from walsync_vfs.format.fields import U32_MAX

# A page as decoders hand it out: a slice of one decompressed buffer, not a copy per page.
Page = bytes | memoryview


_xxh3 = xxhash.xxh3_64_intdigest
# Pages from which a run is hashed by the shim: for fewer, the call and the GIL handed to
# another thread and back cost more than the hashing it takes off this one.
RUN_IN_SHIM = 16
PENDING_BYTE = 1 << 30  # SQLite's lock byte: the page holding it is never written


def lock_page(page_size: int) -> int:
    """The page holding SQLite's pending byte (offset 2^30).  SQLite never writes it, so a
    commit that grows the database past it does not give it: it is a page of zeros."""
    return PENDING_BYTE // page_size + 1


def new_pages(old_size: int, db_size: int, page_size: int) -> int:
    """How many pages a commit growing the database from ``old_size`` to ``db_size`` must
    give: every new one but the lock page."""
    grown = max(0, db_size - old_size)
    return grown - (old_size < lock_page(page_size) <= db_size)


def page_hash(pgno: int, data: Page) -> int:
    """Hash of one page, seeded with its number so a page at the wrong place changes the sum."""
    return _xxh3(data, seed=pgno)


def run_hash(first_pgno: int, run: Page, page_size: int) -> int:
    """The XOR of :func:`page_hash` over the consecutive pages ``run`` holds, the first
    numbered ``first_pgno``: a long run in one call into the shim, made without the GIL."""
    count = len(run) // page_size
    if count < RUN_IN_SHIM:
        view = memoryview(run)
        return _hash_pages(
            (first_pgno + i, view[i * page_size : (i + 1) * page_size]) for i in range(count)
        )
    with _ffi.from_buffer("unsigned char[]", run) as pages:
        return int(_lib.ws_run_hash(pages, page_size, count, first_pgno))


class DbChecksum:
    """Whole-database checksum kept up to date commit by commit.

    Per-page hashes are remembered so a rewritten page's old contribution can be XORed
    out without re-reading the old page.
    """

    __slots__ = ("_hashes", "_value")

    def __init__(self) -> None:
        self._hashes = array("Q")
        self._value = 0

    @classmethod
    def from_pages(cls, pages: Iterable[Page]) -> DbChecksum:
        """Checksum of a full image: pages 1, 2, ... in order."""
        ck = cls()
        for pgno, data in enumerate(pages, 1):
            h = page_hash(pgno, data)
            ck._hashes.append(h)
            ck._value ^= h
        return ck

    @property
    def value(self) -> int:
        return self._value

    @property
    def db_size(self) -> int:
        return len(self._hashes)

    def reserve(self, capacity: int) -> array[int]:
        """The per-page hashes, grown to at least ``capacity`` entries, for code that applies
        commits itself (capture.extend_run); it must :meth:`settle` before anything else
        uses this checksum."""
        if capacity > len(self._hashes):
            self._hashes.frombytes(bytes(8 * (capacity - len(self._hashes))))
        return self._hashes

    def settle(self, db_size: int, value: int) -> None:
        """End what :meth:`reserve` began: the database has ``db_size`` pages, sum ``value``."""
        del self._hashes[db_size:]
        self._value = value

    def changed_since(self, base: DbChecksum, most: int) -> list[int] | None:
        """The numbers of the pages whose hash differs from ``base``'s, or that ``base``
        does not have; None as soon as there are more than ``most``."""
        old, new = base._hashes, self._hashes
        if len(new) - len(old) > most:
            return None
        changed: list[int] = []
        for i in range(min(len(old), len(new))):
            if old[i] != new[i]:
                if len(changed) == most:
                    return None
                changed.append(i + 1)
        changed += range(len(old) + 1, len(new) + 1)
        return changed if len(changed) <= most else None

    def copy(self) -> DbChecksum:
        """An independent copy: verify a batch on it, keep it only if the whole batch checks out."""
        ck = DbChecksum()
        ck._hashes = self._hashes[:]
        ck._value = self._value
        return ck

    def apply(self, db_size: int, pages: Iterable[tuple[int, Page]]) -> None:
        """Apply one commit; on error (ValueError) the checksum is left unchanged.

        Pages past the old end must all be supplied: SQLite writes every page it
        allocates, so a missing one means the caller lost a page.
        """
        hashes = self._hashes
        if db_size == len(hashes) and isinstance(pages, tuple):
            # The usual commit: its pages in memory, no page added or cut off.
            same = [(pgno, _xxh3(data, seed=pgno)) for pgno, data in pages]
            for pgno, _ in same:  # all checked before anything changes
                if not 1 <= pgno <= db_size:
                    raise ValueError(f"page {pgno} outside a database of {db_size} pages")
            value = self._value
            for pgno, h in same:  # a page given twice: the XORs leave the last one's hash
                value ^= hashes[pgno - 1] ^ h
                hashes[pgno - 1] = h
            self._value = value
            return
        if not 0 <= db_size <= U32_MAX:
            raise ValueError(f"db_size {db_size} out of range")
        # Page numbers and hashes in arrays, 16 bytes a page: a giant commit's pages are
        # read from a file one at a time, and an object per page would cost over a hundred
        # bytes each.  All hashed before anything changes.
        pgnos, new = array("Q"), array("Q")
        page_size = 0
        try:
            for pgno, data in pages:
                pgnos.append(pgno)
                new.append(_xxh3(data, seed=pgno))
                page_size = len(data)
        except OverflowError:  # a negative page number
            raise ValueError(f"page {pgno} outside a database of {db_size} pages") from None
        if pgnos and (min(pgnos) < 1 or max(pgnos) > db_size):
            outside = next(p for p in pgnos if not 1 <= p <= db_size)
            raise ValueError(f"page {outside} outside a database of {db_size} pages")
        value = self._value
        old_size = len(hashes)
        if db_size > old_size:
            given = bytearray(db_size - old_size)
            for pgno in pgnos:
                if pgno > old_size:
                    given[pgno - old_size - 1] = 1
            lock = lock_page(page_size) if page_size else 0
            if old_size < lock <= db_size and not given[lock - old_size - 1]:
                given[lock - old_size - 1] = 1
                pgnos.append(lock)
                new.append(_xxh3(bytes(page_size), seed=lock))
            missing = given.find(0)
            if missing >= 0:
                raise ValueError(
                    f"database grew to {db_size} pages but page {old_size + missing + 1} "
                    "was not given"
                )
            hashes.frombytes(bytes(8 * (db_size - old_size)))  # all overwritten below
        elif db_size < old_size:
            for h in hashes[db_size:]:
                value ^= h
            del hashes[db_size:]
        for pgno, h in zip(pgnos, new, strict=True):
            value ^= hashes[pgno - 1] ^ h
            hashes[pgno - 1] = h
        self._value = value

    def resize(self, db_size: int, page_size: int) -> int:
        """Start a commit applied in parts (§4.5): cut the database to ``db_size`` pages, or
        grow it with pages that count for nothing until :meth:`update` gives them (but the
        lock page, zeros).  Returns the old size, so the caller can check that every new
        page was given (:func:`new_pages`)."""
        if not 0 <= db_size <= U32_MAX:
            raise ValueError(f"db_size {db_size} out of range")
        hashes = self._hashes
        old_size = len(hashes)
        if db_size > old_size:
            hashes.frombytes(bytes(8 * (db_size - old_size)))
            lock = lock_page(page_size)
            if old_size < lock <= db_size:
                self.update([(lock, bytes(page_size))])
        else:
            for h in hashes[db_size:]:
                self._value ^= h
            del hashes[db_size:]
        return old_size

    def update(self, pages: Iterable[tuple[int, Page]]) -> None:
        """Set pages inside the current size (a part of a commit after :meth:`resize`)."""
        hashes, value, size = self._hashes, self._value, len(self._hashes)
        for pgno, data in pages:
            if not 1 <= pgno <= size:
                raise ValueError(f"page {pgno} outside a database of {size} pages")
            h = _xxh3(data, seed=pgno)
            value ^= hashes[pgno - 1] ^ h
            hashes[pgno - 1] = h
        self._value = value


# ``old(first, count)``: the XOR of the page hashes of pages first .. first + count - 1 as the
# database holds them before the commit being applied.
OldHashes = Callable[[int, int], int]


class ReadBackChecksum:
    """Whole-database checksum of a database whose pages can be read back, kept as its value
    and size alone: memory does not grow with the database.

    A page a commit rewrites or cuts off had a share in the sum; instead of remembering each
    page's hash (:class:`DbChecksum`), that share is hashed again from the old page's bytes,
    which the caller reads back from wherever it keeps them (``old``).  Commits come as
    decoded (pages sorted by number, each once); on error (ValueError) nothing changes.
    """

    __slots__ = ("value", "db_size")

    def __init__(self, value: int = 0, db_size: int = 0) -> None:
        self.value = value
        self.db_size = db_size

    def copy(self) -> ReadBackChecksum:
        return ReadBackChecksum(self.value, self.db_size)

    def apply(
        self, db_size: int, pages: Sequence[tuple[int, Page]], page_size: int, old: OldHashes
    ) -> None:
        """Apply one whole commit.  Pages past the old end must all be given (but the lock
        page, zeros unless given): SQLite writes every page it allocates."""
        if not 0 <= db_size <= U32_MAX:
            raise ValueError(f"db_size {db_size} out of range")
        _check_pgnos(pages, db_size)
        old_size = self.db_size
        lock = lock_page(page_size)
        if db_size > old_size:
            _check_grown(pages, old_size, db_size, lock)
        value = self.value ^ _hash_pages(pages)
        if db_size < old_size:
            value ^= old(db_size + 1, old_size - db_size)
        elif old_size < lock <= db_size and not _gives(pages, lock):
            value ^= page_hash(lock, bytes(page_size))
        self.value = value ^ _old_runs(pages, old_size, old)
        self.db_size = db_size

    def resize(self, db_size: int, page_size: int, old: OldHashes) -> int:
        """Start a commit applied in parts (§4.5): cut the database to ``db_size`` pages, or
        grow it with pages that count for nothing until :meth:`update` gives them (but the
        lock page, zeros).  Returns the old size, which :meth:`update` takes and with which
        the caller checks that every new page was given (:func:`new_pages`)."""
        if not 0 <= db_size <= U32_MAX:
            raise ValueError(f"db_size {db_size} out of range")
        old_size, lock = self.db_size, lock_page(page_size)
        if db_size < old_size:
            self.value ^= old(db_size + 1, old_size - db_size)
        elif old_size < lock <= db_size:
            self.value ^= page_hash(lock, bytes(page_size))
        self.db_size = db_size
        return old_size

    def update(
        self, pages: Sequence[tuple[int, Page]], old_size: int, page_size: int, old: OldHashes
    ) -> None:
        """Set pages inside the current size: a part of a commit after :meth:`resize`, which
        returned ``old_size``; ``old`` reads pages as they were before the commit."""
        _check_pgnos(pages, self.db_size)
        value = self.value ^ _hash_pages(pages) ^ _old_runs(pages, old_size, old)
        lock = lock_page(page_size)
        if old_size < lock and _gives(pages, lock):  # in place of the zeros resize counted
            value ^= page_hash(lock, bytes(page_size))
        self.value = value


def _check_pgnos(pages: Sequence[tuple[int, Page]], db_size: int) -> None:
    prev = 0
    for pgno, _ in pages:
        if not 1 <= pgno <= db_size:
            raise ValueError(f"page {pgno} outside a database of {db_size} pages")
        if pgno <= prev:
            raise ValueError(f"page {pgno} after page {prev}")
        prev = pgno


def _check_grown(pages: Sequence[tuple[int, Page]], old_size: int, db_size: int, lock: int) -> None:
    """That sorted ``pages`` give every page from ``old_size`` + 1 to ``db_size`` but the
    lock page."""
    expected = old_size + 1
    for pgno, _ in pages:
        if pgno < expected:
            continue
        if expected == lock and pgno != lock:
            expected += 1
        if pgno != expected:
            break
        expected += 1
    if expected == lock:
        expected += 1
    if expected <= db_size:
        raise ValueError(f"database grew to {db_size} pages but page {expected} was not given")


def _gives(pages: Sequence[tuple[int, Page]], pgno: int) -> bool:
    return any(p == pgno for p, _ in pages)


def _hash_pages(pages: Iterable[tuple[int, Page]]) -> int:
    value = 0
    for pgno, data in pages:
        value ^= _xxh3(data, seed=pgno)
    return value


def _old_runs(pages: Sequence[tuple[int, Page]], old_size: int, old: OldHashes) -> int:
    """What the pages (sorted) up to ``old_size`` held before, read back a run at a time."""
    value, first, count = 0, 0, 0
    for pgno, _ in pages:
        if pgno > old_size:
            break
        if pgno != first + count:
            if count:
                value ^= old(first, count)
            first, count = pgno, 0
        count += 1
    return value ^ old(first, count) if count else value
