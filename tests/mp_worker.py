"""A gunicorn-style worker for the multi-process tests: its own engine, one shared database.

Usage: mp_worker.py DB REPLICA WORKER_ID COMMITS [--truncate] [--foreign] [--hold]

Each transaction inserts 1-3 rows tagged (worker, transaction number, row); every fifth is
followed by ``flush()``, and the transactions acknowledged so far are printed as JSON lines
``{"ack": k}``, so a test can check that nothing acknowledged was lost.  ``--truncate``: a
``wal_checkpoint(TRUNCATE)`` half-way, while following.  ``--foreign``: write without the VFS
(plain apsw, no replication of its own), as the sqlite3 shell would.  Prints ``{"role": ...}``
when it starts and ``{"done": n}`` at the end; with ``--hold`` it then keeps the database
open until a line arrives on stdin (so the leader stays the same while the others write).
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time

import apsw

import walsync_vfs


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def main() -> None:
    path, replica, wid, commits = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    foreign = "--foreign" in sys.argv
    logging.basicConfig(level=os.environ.get("WALSYNC_TEST_LOG", "WARNING"))
    walsync_vfs.configure(replica=replica)
    con = apsw.Connection(path) if foreign else apsw.Connection(path, vfs="walsync")
    con.set_busy_timeout(20_000)
    stats = [] if foreign else walsync_vfs.stats()
    assert all(s["name"] == os.path.basename(path) for s in stats), stats
    leads = any(s["leader"] for s in stats)
    say(role="leader" if leads else "follower", pid=os.getpid())
    rng = random.Random(wid)
    for k in range(commits):
        con.execute("BEGIN IMMEDIATE")  # as WAL apps with several writers must
        for r in range(rng.randint(1, 3)):
            con.execute(
                "INSERT INTO t(w, k, r, v) VALUES (?, ?, ?, randomblob(?))",
                (wid, k, r, rng.randint(10, 300)),
            )
        con.execute("COMMIT")
        if "--truncate" in sys.argv and k == commits // 2:
            t0 = time.monotonic()
            busy = con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            say(truncated=busy == 0, seconds=round(time.monotonic() - t0, 3))
        if not foreign and k % 5 == 4:
            walsync_vfs.flush(timeout=60)
            say(ack=k)
        time.sleep(rng.random() * 0.004)
    if not foreign:
        walsync_vfs.flush(timeout=60)
    say(done=commits)
    if "--hold" in sys.argv:
        sys.stdin.readline()
    con.close()


if __name__ == "__main__":
    main()
