"""Child process of test_stream and benchmarks/bigdata.py: one replication or one restore,
then its peak RSS.

``replicate DB URL``: open the existing database ``DB`` through the VFS (its first sync point
takes a snapshot of it) and flush to ``URL``; ``plain DB``: the same write without walsync.
``grow DB ROWS [URL]``: one transaction that appends copies of ``t``'s first ROWS rows (the
same bytes on every copy of a database), through the VFS replicating to URL and flushed, or
without URL through plain apsw.
``restore URL OUT [cli]``: ``restore`` it (with ``cli``, after ``heap.map_big_blocks()``,
as ``python -m walsync_vfs restore`` does).  ``paced DB URL RATE SECONDS LOG``: RATE commits a
second through the VFS for SECONDS, each one row of ``t`` and ``head.n`` set to its rowid,
logging "rowid unix-time" after each commit.  Each
prints ``{"peak_rss": bytes}``; a fresh process per run, so the peak is that run's alone.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    mode, *args = sys.argv[1:]
    if mode == "replicate":
        import apsw

        import walsync_vfs

        path, url = args
        walsync_vfs.configure(replica=url)
        con = apsw.Connection(path, vfs="walsync")
        con.execute("INSERT INTO t(v) VALUES (1)")
        walsync_vfs.flush(timeout=300)
        con.close()
    elif mode == "plain":  # the same write without walsync: the app's own footprint
        import apsw

        (path,) = args
        con = apsw.Connection(path)
        con.execute("INSERT INTO t(v) VALUES (1)")
        con.close()
    elif mode == "grow":  # one giant transaction, the same on every copy of the database
        import apsw

        path, rows, *url = args
        if url:
            import walsync_vfs

            walsync_vfs.configure(replica=url[0])
        con = apsw.Connection(path, vfs="walsync" if url else None)
        with con:
            con.execute("INSERT INTO t(v) SELECT v FROM t WHERE rowid <= ?", (int(rows),))
        if url:
            walsync_vfs.flush(timeout=3600)
        con.close()
    elif mode == "paced":  # the source of a follow run: RATE commits a second for SECONDS
        import time

        import apsw

        import walsync_vfs

        path, url, rate, seconds, log = args
        walsync_vfs.configure(replica=url)
        con = apsw.Connection(path, vfs="walsync")
        with con:  # head.n = max(rowid) of t in every commit (tests/follow_reader.py checks it)
            con.execute("CREATE TABLE IF NOT EXISTS head(n)")
            con.execute("DELETE FROM head; INSERT INTO head SELECT max(rowid) FROM t")
        with open(log, "w") as f:
            start = time.monotonic()
            for i in range(int(float(rate) * float(seconds))):
                time.sleep(max(0.0, start + i / float(rate) - time.monotonic()))
                with con:
                    con.execute("INSERT INTO t(v) VALUES (hex(randomblob(500)))")
                    con.execute("UPDATE head SET n = last_insert_rowid()")
                f.write(f"{con.last_insert_rowid()} {time.time()}\n")
        walsync_vfs.flush(timeout=300)
        con.close()
    elif mode == "restore":
        from walsync_vfs import heap
        from walsync_vfs.restore import restore

        url, out, *how = args
        if how == ["cli"]:
            heap.map_big_blocks()
        restore(url, out)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps({"peak_rss": peak_rss()}))


def peak_rss() -> int:
    """This process's peak RSS in bytes: VmHWM, which belongs to the program image (not
    ru_maxrss, which Linux carries over exec from the parent that forked this process)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) << 10
    raise SystemExit("no VmHWM in /proc/self/status")


if __name__ == "__main__":
    main()
