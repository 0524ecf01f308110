"""Big databases (issue 14): snapshot and restore of one large database on SeaweedFS, walsync
against Litestream in the same run, with the memory each takes.

1. **Build**: a database of ``--mb`` 10^6 bytes (default 500; ``--mb 5000`` is the full 5 GB
   run) written by plain apsw as a stream of 8 MB transactions (rows of hex text: zstd finds
   about half to squeeze), checkpointed, then copied once per tool.
2. **Snapshot**: walsync: a child process opens its copy through ``vfs="walsync"``, commits
   one row and flushes: its first sync point snapshots the whole database to S3.  Litestream:
   ``litestream replicate`` on its copy until its replica holds its local TXID (its first
   sync is a snapshot too).  MB/s = database size / wall time of that child.
3. **Restore** from S3 as child processes, both checked: ``integrity_check`` and a SHA-256 over
   all rows equal to the source's.

Memory is each child's peak RSS (VmHWM, sampled from /proc every 20 ms until it exits).  The
walsync application's *extra* peak is its replicate child's minus the same child's write
through plain apsw (``tests/big_worker.py plain``).  Verdicts are ratios within the run:
walsync MB/s / Litestream MB/s (goal >= 1.5), the app's extra peak and the restore's peak
(goals <= 64 MiB).

Not covered here: the 1 GB transaction (giant transactions) and ``restore --follow`` of the
database under load, which the issue's benchmark also asks for.

Usage: ``python benchmarks/bigdata.py [--mb N] [--dir DIR] [--keep]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import apsw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import seaweedfs  # the SeaweedFS launcher the tests use
from restore import litestream_ltx, local_litestream_txid, machine_line, wait_litestream
from seaweedfs import tool_path

WORKER = str(Path(__file__).resolve().parent.parent / "tests" / "big_worker.py")
TXN_BYTES = 8_000_000
ROW_HEX = 1000  # bytes of random data per row, stored as twice as many hex characters
MIB = 1 << 20
GOAL_RATIO = 1.5
GOAL_EXTRA = 64 * MIB
SAMPLE = 0.02


def build(path: Path, target: int) -> int:
    """Stream 8 MB transactions into a fresh WAL database until it holds ``target`` bytes."""
    con = apsw.Connection(str(path))
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE t(v)")
    rows = TXN_BYTES // (2 * ROW_HEX)
    while True:
        with con:
            con.execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
                "INSERT INTO t SELECT hex(randomblob(?)) FROM n",
                (rows, ROW_HEX),
            )
        size = con.execute("PRAGMA page_count").fetchone()[0] * 4096
        if size >= target:
            break
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return size


def digest(path: Path) -> tuple[int, str]:
    con = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    problems = con.execute("PRAGMA integrity_check").fetchall()
    if problems != [("ok",)]:
        raise SystemExit(f"{path}: integrity_check: {problems[:3]}")
    sha, n = hashlib.sha256(), 0
    for rowid, v in con.execute("SELECT rowid, v FROM t WHERE typeof(v) = 'text' ORDER BY rowid"):
        sha.update(rowid.to_bytes(8, "big") + v.encode())
        n += 1
    con.close()
    return n, sha.hexdigest()


def vm_hwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) << 10
    except OSError:
        pass
    return None


def measured(
    cmd: list[str], env: dict[str, str], until: Callable[[], bool] | None = None
) -> tuple[float, int]:
    """Run ``cmd`` (until it exits, or until ``until()`` is true, then stop it): wall
    seconds and peak RSS."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, vm_hwm(proc.pid) or 0)
        if until is not None and until():
            seconds = time.perf_counter() - t0
            seaweedfs.stop_process(proc, 30.0)
            return seconds, peak
        time.sleep(SAMPLE)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        assert proc.stderr is not None
        raise SystemExit(f"{cmd[:3]} failed: {proc.stderr.read().decode()[-2000:]}")
    return seconds, peak


def litestream_config(db: Path, bucket: str, endpoint: str) -> str:
    replica = {
        "type": "s3", "bucket": bucket, "path": f"litestream/{db.name}", "endpoint": endpoint,
        "region": "us-east-1", "force-path-style": True,
        "access-key-id": seaweedfs.ACCESS_KEY, "secret-access-key": seaweedfs.SECRET_KEY,
    }  # fmt: skip
    return json.dumps({"dbs": [{"path": str(db), "replica": replica}]})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--mb", type=float, default=500.0, help="database size in 10^6 bytes")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the work dir goes")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="walsync-bigdata-", dir=args.dir))
    print(machine_line(work))
    try:
        with seaweedfs.running(work / "seaweedfs") as server:
            env = server.env()  # without AWS_CA_BUNDLE: both tools talk plain http to it
            bucket = server.new_bucket()
            base = work / "base.db"
            t0 = time.perf_counter()
            size = build(base, int(args.mb * 1e6))
            print(f"built {size / 1e6:.0f} MB in {time.perf_counter() - t0:.0f} s")
            copies = {}
            for tool in ("plain", "walsync", "litestream"):
                copies[tool] = work / f"{tool}.db"
                shutil.copyfile(base, copies[tool])
            _, plain_peak = measured([sys.executable, WORKER, "plain", str(copies["plain"])], env)
            root = f"s3://{bucket}/walsync"
            snap_s, app_peak = measured(
                [sys.executable, WORKER, "replicate", str(copies["walsync"]), root], env
            )
            expected = digest(copies["walsync"])

            config = work / "litestream.yml"
            config.write_text(litestream_config(copies["litestream"], bucket, server.endpoint))

            def caught_up() -> bool:
                local = local_litestream_txid(copies["litestream"])
                files = litestream_ltx(config, str(copies["litestream"]), env) if local else []
                remote = max((int(f["max_txid"], 16) for f in files), default=0)
                return bool(local) and remote >= local

            ls_snap_s, ls_peak = measured(
                [tool_path("litestream"), "replicate", "-config", str(config)], env, caught_up
            )
            wait_litestream(config, [copies["litestream"]], env, 60)
            restore_config = work / "litestream-restore.yml"
            placeholder = work / "nowhere" / "litestream.db"  # no local state to read from
            restore_config.write_text(litestream_config(placeholder, bucket, server.endpoint))

            out = work / "restored-walsync.db"
            restore_s, restore_peak = measured(
                [sys.executable, WORKER, "restore", f"{root}/walsync.db", str(out)], env
            )
            if digest(out)[1] != expected[1]:
                raise SystemExit("walsync restore differs from the source")
            out.unlink()
            ls_out = work / "restored-litestream.db"
            ls_restore_s, ls_restore_peak = measured(
                [tool_path("litestream"), "restore", "-config", str(restore_config), "-o",
                 str(ls_out), str(placeholder)], env,
            )  # fmt: skip
            if digest(ls_out)[1] != expected[1]:
                raise SystemExit("litestream restore differs from the source")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    mb = size / 1e6
    extra = app_peak - plain_peak
    rows = [
        ("snapshot", snap_s, ls_snap_s, app_peak, ls_peak),
        ("restore", restore_s, ls_restore_s, restore_peak, ls_restore_peak),
    ]
    print(f"database {mb:.0f} MB, {expected[0]:,} rows; plain apsw app {plain_peak / MIB:.0f} MiB")
    ok = True
    for what, ws, ls, wpeak, lpeak in rows:
        ratio = (mb / ws) / (mb / ls)
        ok &= ratio >= GOAL_RATIO
        print(
            f"{what:8}: walsync {mb / ws:6.1f} MB/s (peak {wpeak / MIB:4.0f} MiB), "
            f"litestream {mb / ls:6.1f} MB/s (peak {lpeak / MIB:4.0f} MiB): "
            f"{ratio:.2f}x (goal >= {GOAL_RATIO}x)"
        )
    print(f"walsync app extra peak RSS over plain apsw: {extra / MIB:.1f} MiB (goal <= 64 MiB)")
    print(f"walsync restore peak RSS: {restore_peak / MIB:.1f} MiB (goal <= 64 MiB)")
    ok &= extra <= GOAL_EXTRA and restore_peak <= GOAL_EXTRA
    print(f"verdict: {'goals met' if ok else 'goals missed'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
