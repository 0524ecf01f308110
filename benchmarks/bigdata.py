"""Big databases (issue 14): snapshot and restore of one large database on SeaweedFS, walsync
against Litestream in the same run, with the memory each takes.

1. **Build**: a database of ``--mb`` minus ``--tx-mb`` 10^6 bytes written by plain apsw as a
   stream of 8 MB transactions (rows of hex text: zstd finds about half to squeeze),
   checkpointed, then copied once per tool.
2. **Snapshot**: walsync: a child process opens its copy through ``vfs="walsync"``, commits
   one row and flushes: its first sync point snapshots the whole database to S3.  Litestream:
   ``litestream replicate`` on its copy until its replica holds its local TXID (its first
   sync is a snapshot too).  MB/s = database size / wall time of that child.
3. **One giant transaction** of ``--tx-mb`` (default a fifth of ``--mb``: 1 GB in the 5 GB
   run) appends copies of the first rows (``tests/big_worker.py grow``), so every copy
   stays byte-for-byte the same: through the VFS in a child that then flushes, and with
   plain apsw while ``litestream replicate`` runs until its replica holds it.
4. **Restore** of the whole database from S3 by each tool's command line, both checked:
   ``integrity_check`` and a SHA-256 over all rows equal to the source's.  MB/s = final
   database size / wall time.
5. **Follow** (walsync only): ``restore --follow --interval 0.5`` of the replica while the
   source takes 10 commits a second for ``--follow-seconds`` (``tests/big_worker.py paced``,
   each commit one row and ``head.n`` = its rowid), and a reader process
   (``tests/follow_reader.py``, plain SQLite, read-only) checks ``max(rowid) = head.n`` on
   the output every 5 ms, logging when each commit becomes visible.  Lag = that time minus
   the commit's (end to end: the source's upload interval, the store, the follower's poll);
   follower CPU = its user + system time over the writing period / wall time.

Memory is each child's peak RSS (VmHWM, sampled from /proc every 20 ms until it exits).  The
walsync application's *extra* peak is the larger of its snapshot child's and its giant
transaction child's, each minus the same write through plain apsw (``tests/big_worker.py
plain`` and ``grow`` without a replica).  Verdicts are ratios within the run:
walsync MB/s / Litestream MB/s (goal >= 1.5), the app's extra peak and the restore's peak
(goals <= 64 MiB), follower lag p99 <= 2 s, follower CPU <= 10 % of a core, 0 violations.

Usage: ``python benchmarks/bigdata.py [--mb N] [--tx-mb N] [--follow-seconds S] [--dir DIR]
[--keep]``
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apsw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import seaweedfs  # the SeaweedFS launcher the tests use
from restore import litestream_ltx, local_litestream_txid, machine_line, wait_litestream
from seaweedfs import tool_path

WORKER = str(Path(__file__).resolve().parent.parent / "tests" / "big_worker.py")
READER = str(Path(__file__).resolve().parent.parent / "tests" / "follow_reader.py")
FOLLOW_RATE = 10.0  # commits a second the source takes while it is followed
FOLLOW_INTERVAL = "0.5"  # the follower's --interval
READ_PAUSE = "0.005"  # seconds between the reader's reads
GOAL_LAG = 2.0
GOAL_CPU = 0.10
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
    # The text rows in order, not their rowids: walsync's copy has one more (integer) row.
    sha, n = hashlib.sha256(), 0
    for (v,) in con.execute("SELECT v FROM t WHERE typeof(v) = 'text' ORDER BY rowid"):
        sha.update(len(v).to_bytes(4, "big") + v.encode())
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
    seconds and peak RSS.  Its CPU seconds are printed, to tell waiting from working.

    What earlier steps left dirty in the page cache is written out first, so that no tool
    pays for another's writes."""
    os.sync()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak, cpu = 0, 0.0
    while proc.poll() is None:
        peak = max(peak, vm_hwm(proc.pid) or 0)
        with contextlib.suppress(OSError):
            cpu = cpu_seconds(proc.pid)
        if until is not None and until():
            seconds = time.perf_counter() - t0
            seaweedfs.stop_process(proc, 30.0)
            print(f"  {Path(cmd[0]).name} {cmd[1:3]}: {seconds:.1f} s, CPU {cpu:.1f} s")
            return seconds, peak
        time.sleep(SAMPLE)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        assert proc.stderr is not None
        raise SystemExit(f"{cmd[:3]} failed: {proc.stderr.read().decode()[-2000:]}")
    print(f"  {Path(cmd[0]).name} {cmd[1:3]}: {seconds:.1f} s, CPU {cpu:.1f} s", flush=True)
    return seconds, peak


@dataclass(frozen=True)
class Followed:
    install_s: float  # from the follower's start to OUT installed
    lags: list[float]  # per commit, seconds from commit to visible in OUT
    cpu_share: float  # of one core, while the source writes
    peak: int  # the follower's peak RSS
    reader: dict  # tests/follow_reader.py's figures

    def lag(self, q: float) -> float:
        ordered = sorted(self.lags)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def has_head(path: Path) -> bool:
    """Whether the follower's output shows the paced writer's first commit yet."""
    if not path.exists():
        return False
    con = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        con.setbusytimeout(10_000)
        return bool(con.execute("SELECT 1 FROM sqlite_schema WHERE name = 'head'").fetchall())
    finally:
        con.close()


def logged(path: Path) -> list[tuple[int, float]]:
    if not path.exists():
        return []
    return [(int(n), float(t)) for n, t in (line.split() for line in path.read_text().splitlines())]


def follow(db: Path, url: str, env: dict[str, str], work: Path, seconds: float) -> Followed:
    """``restore --follow`` of ``url`` while a child writes ``db`` at FOLLOW_RATE commits a
    second and a reader process checks the output (see the module docstring)."""
    with ExitStack() as children:  # whatever goes wrong, no child outlives the run

        def start(cmd: list[str], **kwargs: Any) -> subprocess.Popen:
            proc = subprocess.Popen(cmd, **kwargs)
            children.callback(lambda: proc.poll() is None and proc.kill())
            return proc

        return _follow(db, url, env, work, seconds, start)


def _follow(
    db: Path, url: str, env: dict[str, str], work: Path, seconds: float,
    start: Callable[..., subprocess.Popen],
) -> Followed:  # fmt: skip
    out, writes, seen = work / "follow.db", work / "writes.log", work / "seen.log"
    errors = work / "follower.stderr"
    t0 = time.perf_counter()
    with errors.open("w") as stderr:
        follower = start(
            [sys.executable, "-m", "walsync_vfs", "restore", url, "-o", str(out), "--follow",
             "--interval", FOLLOW_INTERVAL],
            env=env, stdout=subprocess.PIPE, stderr=stderr, text=True,
        )  # fmt: skip
    assert follower.stdout is not None
    if not follower.stdout.readline().startswith("following"):
        raise SystemExit(f"follower failed: {errors.read_text()[-2000:]}")
    install_s = time.perf_counter() - t0
    writer = start(
        [sys.executable, WORKER, "paced", str(db), url.rpartition("/")[0], str(FOLLOW_RATE),
         str(seconds), str(writes)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not has_head(out):
        if time.monotonic() > deadline or writer.poll() is not None:
            raise SystemExit("the follower never showed the paced writer's first commit")
        time.sleep(0.1)
    reader = start(
        [sys.executable, READER, str(out), str(seen), READ_PAUSE], stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert reader.stdout is not None
    reader.stdout.readline()  # "ready"
    started, cpu0, wall0 = time.time(), cpu_seconds(follower.pid), time.perf_counter()
    peak = 0
    while writer.poll() is None:
        peak = max(peak, vm_hwm(follower.pid) or 0)
        time.sleep(0.1)
    cpu_share = (cpu_seconds(follower.pid) - cpu0) / (time.perf_counter() - wall0)
    if writer.returncode != 0:
        assert writer.stderr is not None
        raise SystemExit(f"paced writer failed: {writer.stderr.read().decode()[-2000:]}")
    last = logged(writes)[-1][0]
    deadline = time.monotonic() + 60
    while not logged(seen) or logged(seen)[-1][0] < last:
        if time.monotonic() > deadline:
            raise SystemExit(f"the follower never showed the last commit: {errors.read_text()}")
        time.sleep(0.1)
    reader.terminate()
    figures = json.loads(reader.communicate(timeout=60)[0])
    peak = max(peak, vm_hwm(follower.pid) or 0)
    follower.send_signal(signal.SIGINT)
    follower.communicate(timeout=60)
    visible = logged(seen)
    values = [n for n, _ in visible]
    lags = [
        visible[bisect.bisect_left(values, n)][1] - t for n, t in logged(writes) if t >= started
    ]
    return Followed(install_s, lags, cpu_share, peak, figures)


def litestream_config(db: Path, bucket: str, endpoint: str) -> str:
    replica = {
        "type": "s3", "bucket": bucket, "path": f"litestream/{db.name}", "endpoint": endpoint,
        "region": "us-east-1", "force-path-style": True,
        "access-key-id": seaweedfs.ACCESS_KEY, "secret-access-key": seaweedfs.SECRET_KEY,
    }  # fmt: skip
    return json.dumps({"dbs": [{"path": str(db), "replica": replica}]})


def litestream_replicate(
    config: Path, db: Path, rows: int, env: dict[str, str]
) -> tuple[float, float, int]:
    """``litestream replicate`` of ``db`` until its replica holds the snapshot, then while a
    plain-apsw child writes the giant transaction until the replica holds that too: the two
    wall times and Litestream's peak RSS."""
    marks: list[float] = []
    grower: subprocess.Popen | None = None
    before = 0

    def caught_up() -> bool:
        local = local_litestream_txid(db)
        files = litestream_ltx(config, str(db), env) if local else []
        remote = max((int(f["max_txid"], 16) for f in files), default=0)
        return bool(local) and remote >= local

    def done() -> bool:
        nonlocal grower, before
        if grower is None:
            if caught_up():
                marks.append(time.perf_counter())
                before = local_litestream_txid(db)
                grower = subprocess.Popen(
                    [sys.executable, WORKER, "grow", str(db), str(rows)], env=env,
                    stdout=subprocess.DEVNULL,
                )  # fmt: skip
            return False
        if grower.poll() is None:
            return False
        if grower.returncode != 0:
            raise SystemExit("the plain-apsw giant transaction failed")
        return local_litestream_txid(db) > before and caught_up()

    t0 = time.perf_counter()
    cmd = [tool_path("litestream"), "replicate", "-config", str(config)]
    seconds, peak = measured(cmd, env, done)
    return marks[0] - t0, t0 + seconds - marks[0], peak


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--mb", type=float, default=500.0, help="database size in 10^6 bytes")
    ap.add_argument(
        "--tx-mb", type=float, help="the giant transaction in 10^6 bytes (default: --mb / 5)"
    )
    ap.add_argument(
        "--restore-rounds", type=int, default=2, help="restores per tool, alternated"
    )
    ap.add_argument("--follow-seconds", type=float, default=60.0, help="length of the follow phase")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the work dir goes")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    args = ap.parse_args(argv)
    tx_mb = args.mb / 5 if args.tx_mb is None else args.tx_mb
    if not 0 < tx_mb < args.mb:
        ap.error(f"--tx-mb must be between 0 and --mb ({args.mb:g}), got {tx_mb:g}")
    work = Path(tempfile.mkdtemp(prefix="walsync-bigdata-", dir=args.dir))
    print(machine_line(work))
    try:
        with seaweedfs.running(work / "seaweedfs") as server:
            env = server.env()  # without AWS_CA_BUNDLE: both tools talk plain http to it
            bucket = server.new_bucket()
            base = work / "base.db"
            t0 = time.perf_counter()
            size = build(base, int((args.mb - tx_mb) * 1e6))
            print(f"built {size / 1e6:.0f} MB in {time.perf_counter() - t0:.0f} s")
            copies = {}
            for tool in ("plain", "walsync", "litestream"):
                copies[tool] = work / f"{tool}.db"
                shutil.copyfile(base, copies[tool])
            rows = int(tx_mb * 1e6) // (2 * ROW_HEX)
            _, plain_peak = measured([sys.executable, WORKER, "plain", str(copies["plain"])], env)
            _, plain_grow_peak = measured(
                [sys.executable, WORKER, "grow", str(copies["plain"]), str(rows)], env
            )
            root = f"s3://{bucket}/walsync"
            snap_s, app_peak = measured(
                [sys.executable, WORKER, "replicate", str(copies["walsync"]), root], env
            )
            grow_s, grow_peak = measured(
                [sys.executable, WORKER, "grow", str(copies["walsync"]), str(rows), root], env
            )
            expected = digest(copies["walsync"])
            total = copies["walsync"].stat().st_size

            config = work / "litestream.yml"
            config.write_text(litestream_config(copies["litestream"], bucket, server.endpoint))
            ls_snap_s, ls_grow_s, ls_peak = litestream_replicate(
                config, copies["litestream"], rows, env
            )
            wait_litestream(config, [copies["litestream"]], env, 60)
            restore_config = work / "litestream-restore.yml"
            placeholder = work / "nowhere" / "litestream.db"  # no local state to read from
            restore_config.write_text(litestream_config(placeholder, bucket, server.endpoint))

            commands = {
                "walsync": lambda out: [
                    sys.executable, "-m", "walsync_vfs", "restore", f"{root}/walsync.db", "-o",
                    str(out),
                ],
                "litestream": lambda out: [
                    tool_path("litestream"), "restore", "-config", str(restore_config), "-o",
                    str(out), str(placeholder),
                ],
            }  # fmt: skip
            restores: dict[str, list[tuple[float, int]]] = {tool: [] for tool in commands}
            for round_ in range(args.restore_rounds):  # alternated: W L, L W, ...
                for tool in sorted(commands, reverse=round_ % 2 == 0):
                    out = work / f"restored-{tool}.db"
                    restores[tool].append(measured(commands[tool](out), env))
                    if digest(out) != expected:
                        raise SystemExit(f"{tool} restore differs from the source")
                    out.unlink()
            restore_s, ls_restore_s = (
                statistics.median(s for s, _ in restores[tool]) for tool in commands
            )
            restore_peak, ls_restore_peak = (max(p for _, p in restores[tool]) for tool in commands)
            followed = follow(
                copies["walsync"], f"{root}/walsync.db", env, work, args.follow_seconds
            )
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    extra = max(app_peak - plain_peak, grow_peak - plain_grow_peak)
    phases = [
        ("snapshot", size, snap_s, ls_snap_s, app_peak, ls_peak),
        ("restore", total, restore_s, ls_restore_s, restore_peak, ls_restore_peak),
    ]
    print(
        f"database {size / 1e6:.0f} MB at the snapshot, {total / 1e6:.0f} MB after the giant "
        f"transaction; {expected[0]:,} rows; plain apsw app {plain_peak / MIB:.0f} MiB"
    )
    ok = True
    for what, nbytes, ws, ls, wpeak, lpeak in phases:
        mb, ratio = nbytes / 1e6, ls / ws
        ok &= ratio >= GOAL_RATIO
        print(
            f"{what:8}: walsync {mb / ws:6.1f} MB/s (peak {wpeak / MIB:4.0f} MiB), "
            f"litestream {mb / ls:6.1f} MB/s (peak {lpeak / MIB:4.0f} MiB): "
            f"{ratio:.2f}x (goal >= {GOAL_RATIO}x)"
        )
    for tool, runs in restores.items():
        times = ", ".join(f"{s:.1f}" for s, _ in runs)
        print(f"restore rounds, {tool}: {times} s (median above)")
    print(
        f"giant tx: {tx_mb:.0f} MB in one transaction, written and replicated: walsync "
        f"{grow_s:.1f} s (peak {grow_peak / MIB:.0f} MiB, plain apsw {plain_grow_peak / MIB:.0f} "
        f"MiB), litestream {ls_grow_s:.1f} s"
    )
    print(f"walsync app extra peak RSS over plain apsw: {extra / MIB:.1f} MiB (goal <= 64 MiB)")
    print(f"walsync restore peak RSS: {restore_peak / MIB:.1f} MiB (goal <= 64 MiB)")
    ok &= extra <= GOAL_EXTRA and restore_peak <= GOAL_EXTRA
    r = followed.reader
    print(
        f"follow   : installed in {followed.install_s:.1f} s; {len(followed.lags)} commits at "
        f"{FOLLOW_RATE:.0f}/s, lag p50 {followed.lag(0.5):.2f} s, p99 {followed.lag(0.99):.2f} s "
        f"(goal <= {GOAL_LAG} s), max {max(followed.lags):.2f} s; follower CPU "
        f"{followed.cpu_share:.1%} of a core (goal <= {GOAL_CPU:.0%}), peak RSS "
        f"{followed.peak / MIB:.0f} MiB"
    )
    print(
        f"reader   : {r['reads']:,} reads ({r['during_apply']:,} while an update was open), "
        f"{r['values']:,} versions, {r['violations']} violations (must be 0) "
        f"{r['first_violations']}"
    )
    ok &= followed.lag(0.99) <= GOAL_LAG and followed.cpu_share <= GOAL_CPU
    ok &= r["violations"] == 0
    print(f"verdict: {'goals met' if ok else 'goals missed'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
