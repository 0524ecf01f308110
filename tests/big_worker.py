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
logging "rowid unix-time" after each commit.  Each prints ``{"peak_rss": bytes}``; a fresh
process per run, so the peak is that run's alone.

``stream DB URL COUNT RATE``: after a first flush, COUNT commits of 1 MiB of random rows at
RATE a second through the VFS; prints the RSS before them, the median RSS sampled while they
stream, and the largest size the malloc arenas reached meanwhile (glibc).
"""

from __future__ import annotations

import ctypes
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
    elif mode == "stream":  # COUNT commits of 1 MiB, RATE a second, after a first flush
        import threading
        import time

        import apsw

        import walsync_vfs

        path, url, count, rate = args
        walsync_vfs.configure(replica=url)
        con = apsw.Connection(path, vfs="walsync")
        con.execute("CREATE TABLE IF NOT EXISTS s(v)")
        walsync_vfs.flush(timeout=300)  # the first sync is done: what the stream costs follows
        before, rss_seen, heap_seen = rss(), [], []
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                rss_seen.append(rss())
                heap_seen.append(heap_bytes())

        sampler = threading.Thread(target=sample)
        sampler.start()
        start = time.monotonic()
        for i in range(int(count)):
            time.sleep(max(0.0, start + i / float(rate) - time.monotonic()))
            with con:
                con.execute("DELETE FROM s")
                con.execute(
                    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 256)"
                    " INSERT INTO s SELECT randomblob(4000) FROM n"
                )
        walsync_vfs.flush(timeout=300)
        done.set()
        sampler.join()
        con.close()
        rss_seen.sort()
        median = rss_seen[len(rss_seen) // 2]
        print(json.dumps({"rss_before": before, "rss_median": median, "heap_max": max(heap_seen)}))
        return
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


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost",
    )]  # fmt: skip


def heap_bytes() -> int:
    """Bytes of glibc's malloc arenas, in use or free (mallinfo2's ``arena``): memory the
    allocator holds apart from the chunks it maps one by one."""
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = _MallInfo2
    return int(mallinfo2().arena)


def rss() -> int:
    """This process's resident memory now, in bytes."""
    return _status("VmRSS")


def peak_rss() -> int:
    """This process's peak RSS in bytes: VmHWM, which belongs to the program image (not
    ru_maxrss, which Linux carries over exec from the parent that forked this process)."""
    return _status("VmHWM")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) << 10
    raise SystemExit(f"no {field} in /proc/self/status")


if __name__ == "__main__":
    main()
