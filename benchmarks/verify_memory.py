"""Peak memory of ``python -m walsync_vfs verify`` on a replica much larger than its database.

``verify`` used to download every object into memory before checking it, so its RSS grew with
the replica.  This builds one replica whose history is several times the database size (a
~``--mb`` MB database of incompressible rows, then ``--rewrites`` passes that rewrite every
row), then runs ``verify`` as a child process once per ``--tree`` (a checkout whose
``walsync_vfs`` package is put first on ``PYTHONPATH``; default: this one) and reports its
wall time and peak RSS (``ru_maxrss`` from ``wait4``).  Every run must exit 0.

Usage: ``python benchmarks/verify_memory.py [--mb N] [--rewrites N] [--tree DIR ...]
[--runs N] [--dir DIR] [--keep]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import apsw

HERE = Path(__file__).resolve().parent.parent
ROW = 4000  # bytes of random blob per row: about one row per 4 KiB page
ROWS_PER_TXN = 250  # ~1 MB per commit


def build(workdir: Path, mb: float, rewrites: int) -> tuple[str, int, int]:
    """Write the database through the walsync VFS; return (url, database bytes, replica bytes)."""
    sys.path.insert(0, str(HERE))
    import walsync_vfs

    replica = (workdir / "replica").as_uri()
    walsync_vfs.configure(replica=replica, upload_interval=0.2)
    db = workdir / "big.db"
    con = apsw.Connection(str(db), vfs="walsync")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    rows = int(mb * 1e6 / ROW)
    for start in range(0, rows, ROWS_PER_TXN):
        n = min(ROWS_PER_TXN, rows - start)
        with con:
            con.execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
                " INSERT INTO t(v) SELECT randomblob(?) FROM n",
                (n, ROW),
            )
    for _ in range(rewrites):
        for start in range(1, rows + 1, ROWS_PER_TXN):
            with con:
                con.execute(
                    "UPDATE t SET v = randomblob(?) WHERE id BETWEEN ? AND ?",
                    (ROW, start, start + ROWS_PER_TXN - 1),
                )
    walsync_vfs.flush(timeout=600)
    con.close()
    size = db.stat().st_size
    stored = sum(p.stat().st_size for p in (workdir / "replica").rglob("*") if p.is_file())
    return f"{replica}/big.db", size, stored


def verify_run(tree: str, url: str, workdir: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one ``verify`` child process run from ``tree``."""
    env = dict(os.environ, PYTHONPATH=tree)
    log = workdir / "verify.log"
    t0 = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "walsync_vfs", "verify", url],
            env=env,
            cwd=workdir,  # not the caller's: "-m" puts the working directory first on sys.path
            stdout=out,
            stderr=out,
        )
        _, status, usage = os.wait4(proc.pid, 0)  # reaps it: rusage of this child alone
    wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"verify from {tree} failed ({proc.returncode}): {log.read_text()}")
    return wall, usage.ru_maxrss / 1024  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--mb", type=float, default=100.0, help="database size in 10^6 bytes")
    ap.add_argument("--rewrites", type=int, default=4, help="passes rewriting every row")
    ap.add_argument("--tree", action="append", help="checkout to run verify from (repeatable)")
    ap.add_argument("--runs", type=int, default=3, help="runs per tree, alternating")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the work dir goes")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    trees = args.tree or [str(HERE)]
    workdir = Path(tempfile.mkdtemp(prefix="walsync-verify-mem-", dir=args.dir))
    try:
        t0 = time.monotonic()
        url, size, stored = build(workdir, args.mb, args.rewrites)
        print(
            f"database {size / 1e6:.1f} MB, replica {stored / 1e6:.1f} MB "
            f"(built in {time.monotonic() - t0:.0f} s)"
        )
        results: dict[str, list[tuple[float, float]]] = {t: [] for t in trees}
        for _ in range(args.runs):
            for tree in trees:
                results[tree].append(verify_run(tree, url, workdir))
        for tree, runs in results.items():
            walls = " ".join(f"{w:.2f}" for w, _ in runs)
            peaks = " ".join(f"{p:.0f}" for _, p in runs)
            print(
                f"{tree}: wall {walls} s (median {statistics.median(w for w, _ in runs):.2f}), "
                f"peak RSS {peaks} MB (max {max(p for _, p in runs):.0f})"
            )
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
