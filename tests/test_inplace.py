"""``inplace.LiveDatabase`` against SQLite itself: what it writes, readers in other processes
read whole, and a batch they block is dropped cleanly."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import apsw
import pytest

from walsync_vfs import inplace

PAGE = 4096
# A reader in another process holding a read transaction (SHARED) until its stdin closes.
HOLDER = """
import sys, apsw
con = apsw.Connection(sys.argv[1], flags=apsw.SQLITE_OPEN_READONLY)
con.execute("BEGIN")
print(con.execute("SELECT count(*) FROM t").fetchone()[0], flush=True)
sys.stdin.read()
"""


def numbers(n: int) -> str:
    return f"WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {n}) "


def rows(path: Path) -> list[tuple]:
    con = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return con.execute("SELECT id, v FROM t ORDER BY id").fetchall()
    finally:
        con.close()


def pages(path: Path) -> list[bytes]:
    data = path.read_bytes()
    return [data[i : i + PAGE] for i in range(0, len(data), PAGE)]


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """A rollback-mode database and a copy of it, then the original changed by one big
    transaction: the copy is what a follower holds, the original what it must become."""
    src, dst = tmp_path / "src.db", tmp_path / "dst.db"
    con = apsw.Connection(str(src))
    con.execute("PRAGMA page_size=4096; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    con.execute(numbers(400) + "INSERT INTO t(v) SELECT randomblob(500) FROM s")
    con.close()
    shutil.copyfile(src, dst)
    con = apsw.Connection(str(src))
    with con:
        con.execute("UPDATE t SET v = randomblob(300) WHERE id % 3 = 0")
        con.execute(numbers(300) + "INSERT INTO t(v) SELECT randomblob(900) FROM s")
    con.close()
    return src, dst


def changed(src: Path, dst: Path) -> list[tuple[int, bytes]]:
    old = pages(dst)
    return [
        (pgno, page)
        for pgno, page in enumerate(pages(src), 1)
        if pgno > len(old) or old[pgno - 1] != page
    ]


def test_a_batch_bigger_than_what_is_held_in_memory_goes_through_a_staging_file(pair, monkeypatch):
    src, dst = pair
    monkeypatch.setattr(inplace, "HELD_BYTES", 16 * PAGE)
    new = changed(src, dst)
    assert len(new) > 100
    live = inplace.LiveDatabase(str(dst), PAGE)
    third = len(new) // 3
    for part in (new[:third], new[third : 2 * third], new[2 * third :]):  # like a commit's parts
        live.write(part, len(pages(src)))
    assert live._batch is not None and live._batch.stage is not None
    live.commit(len(pages(src)))
    live.close()
    assert rows(dst) == rows(src)
    assert not Path(f"{dst}-journal").exists()
    header = dst.read_bytes()[:100]
    assert header[18:20] == b"\x01\x01" and header[24:28] == header[92:96]
    assert int.from_bytes(header[28:32], "big") == len(pages(src))


def test_a_batch_readers_block_too_long_is_dropped_and_retried(pair, monkeypatch):
    src, dst = pair
    before = rows(dst)
    monkeypatch.setattr(inplace, "LOCK_TIMEOUT", 0.3)
    live = inplace.LiveDatabase(str(dst), PAGE)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(dst)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"400"
        live.write(changed(src, dst), len(pages(src)))
        with pytest.raises(inplace.LiveDatabaseError, match="waiting for readers to finish"):
            live.commit(len(pages(src)))
    finally:
        holder.communicate(b"", timeout=30)
    assert rows(dst) == before and not Path(f"{dst}-journal").exists()
    live.write(changed(src, dst), len(pages(src)))  # the same batch again, readers gone
    live.commit(len(pages(src)))
    live.close()
    assert rows(dst) == rows(src)
