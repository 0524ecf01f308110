"""Child process for tests/test_giant.py and benchmarks/bigdata.py: one giant transaction, then
its peak RSS.

    python giant_writer.py DB MIB [REPLICA MAX_SEGMENT_BYTES MEMORY_CAP [SPOOL_CAP]]

Without REPLICA the database is written with plain apsw (the baseline); with it, through
``vfs="walsync"`` and replicated there.  Prints one JSON line: ``maxrss`` (peak RSS in KiB,
taken before anything is read back), ``digest`` (SHA-256 of every row) and ``rows``, and when
replicated ``lost`` (the restore points replication gave up).
"""

from __future__ import annotations

import hashlib
import json
import sys

import apsw

ROW = 4000  # bytes of random data per row: a little under a 4 KiB page, not compressible


def digest(con: apsw.Connection) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    for row in con.execute("SELECT id, v FROM t ORDER BY id"):
        h.update(repr(row).encode())
        n += 1
    return h.hexdigest(), n


def peak_rss_kib() -> int:
    """This process's peak RSS (VmHWM): unlike ru_maxrss, which a child inherits from the
    parent it was forked from, it starts afresh at exec."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def main() -> None:
    path, mib = sys.argv[1], int(sys.argv[2])
    vfs = None
    if len(sys.argv) > 3:
        import walsync_vfs

        knobs = {"spool_cap": int(sys.argv[6])} if len(sys.argv) > 6 else {}
        walsync_vfs.configure(
            replica=sys.argv[3],
            max_segment_bytes=int(sys.argv[4]),
            memory_cap=int(sys.argv[5]),
            **knobs,
        )
        vfs = "walsync"
    con = apsw.Connection(path, vfs=vfs) if vfs else apsw.Connection(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB)")
    con.execute("INSERT INTO t(v) VALUES (randomblob(100))")
    n = mib * (1 << 20) // ROW
    with con:  # the giant transaction
        con.execute(
            "WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < ?) "
            f"INSERT INTO t(v) SELECT randomblob({ROW}) FROM k",
            (n,),
        )
    con.execute("INSERT INTO t(v) VALUES (randomblob(100))")
    if vfs:
        import walsync_vfs

        walsync_vfs.flush(timeout=600)
    maxrss = peak_rss_kib()
    rows_digest, rows = digest(con)
    out = {"maxrss": maxrss, "digest": rows_digest, "rows": rows}
    if vfs:
        import walsync_vfs

        out["lost"] = sum(s["lost_restore_points"] for s in walsync_vfs.stats())
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
