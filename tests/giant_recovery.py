"""Child processes for tests/test_giant.py: a giant transaction a killed writer left in the WAL,
and the process that recovers it.

    python giant_recovery.py write DB REPLICA MIB
    python giant_recovery.py recover DB REPLICA MAX_SEGMENT_BYTES MEMORY_CAP

``write`` replicates DB, stores one small commit, then commits MIB MiB in one transaction
that it never uploads, prints ``READY <digest> <rows>`` and waits to be killed.  ``recover``
opens DB through walsync with the given settings and flushes, which ships the transaction
from the WAL; it prints one JSON line: ``base`` (VmRSS in KiB once the package is imported),
``maxrss`` (peak RSS in KiB after the flush, before anything is read back), ``digest`` and
``rows``.
"""

from __future__ import annotations

import json
import sys
import time

import apsw
from giant_writer import ROW, digest, peak_rss_kib

import walsync_vfs

HOUR = 3600.0


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def write(path: str, replica: str, mib: int) -> None:
    # Nothing ships before the kill: no upload interval ends, and the transaction stays under
    # max_segment_bytes, past which it would ship at once.
    walsync_vfs.configure(
        replica=replica,
        upload_interval=HOUR,
        max_segment_bytes=2 * mib << 20,
        memory_cap=4 * mib << 20,
    )
    con = apsw.Connection(path, vfs="walsync")
    # Killed before a checkpoint: one that copied the transaction into the database file
    # would leave nothing to recover (a new generation holds it).
    con.execute("PRAGMA wal_autocheckpoint=0").fetchall()
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    con.execute("INSERT INTO t(v) VALUES (randomblob(100))")
    walsync_vfs.flush(timeout=60)
    with con:
        con.execute(
            "WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < ?) "
            f"INSERT INTO t(v) SELECT randomblob({ROW}) FROM k",
            (mib * (1 << 20) // ROW,),
        )
    print("READY", *digest(con), flush=True)
    time.sleep(HOUR)


def recover(path: str, replica: str, max_segment_bytes: int, memory_cap: int) -> None:
    walsync_vfs.configure(
        replica=replica, max_segment_bytes=max_segment_bytes, memory_cap=memory_cap
    )
    base = rss_kib()
    con = apsw.Connection(path, vfs="walsync")
    walsync_vfs.flush(timeout=300)
    maxrss = peak_rss_kib()
    rows_digest, rows = digest(con)
    print(json.dumps({"base": base, "maxrss": maxrss, "digest": rows_digest, "rows": rows}))
    con.close()


if __name__ == "__main__":
    mode, db, url, *numbers = sys.argv[1:]
    if mode == "write":
        write(db, url, int(numbers[0]))
    else:
        recover(db, url, int(numbers[0]), int(numbers[1]))
