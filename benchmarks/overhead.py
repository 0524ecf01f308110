"""What replication costs a writer: commits/s through the walsync VFS relative to plain apsw.

A = ``vfs="walsync"`` with replication on (the headline), or with the capture stream handed
to a null sink (diagnostics); B = plain apsw (default VFS) in WAL mode.  Both run in one
process, on fresh files in one directory, with the same pragmas, alternating A/B (order
swapped every round) so that machine noise (other tenants, page cache, disk) lands on both
sides.  The verdict is the
per-round ratio rate(A) / rate(B): median, min and max over the rounds.  Absolute commits/s
are printed for context only; they say more about the machine than about the shim.

Each slice runs a fixed number of commits (calibrated in a discarded warm-up round so a
plain apsw slice lasts about ``--slice`` seconds): both databases then grow by the same amount
every round.  Plain apsw's warm-up rate sets it because walsync's warm-up also pays one-time
costs (the generation's first snapshot and lease), which would shrink every slice after.  A
walsync slice ends only once its commits are in the replica (``replicated``) or the
dispatcher has handed every record of the slice to the sink (``barrier``), so the backlog is
paid inside the slice that produced it.

``--capture`` selects what A does with the stream, to split the cost when a target is missed:

* ``replicated`` (default, what a user pays): ``import walsync_vfs`` and ``configure()`` a
  replica root as an application would (``--store file``: a local directory beside the
  databases; ``--store s3``: a SeaweedFS started for the run); a walsync slice ends with
  ``walsync_vfs.flush()``, so the slice pays for uploading everything it committed;
* ``consumed``: the engine is bypassed; the dispatcher's thread drains the queue (checksum
  verification and page index in C) and hands each batch to the null sink, which reads
  only the batch's commit count;
* ``converted``: the same, but the sink turns every record into a Python ``Record`` (what a
  sink that iterates records pays; the engine takes runs of commits in C instead);
* ``queued``: records pile up in the C queue, freed between slices (untimed): shim cost only;
* ``off``: the walsync VFS without a sync point, so nothing is parsed or published (the pass-
  through and the WAL mirror copy remain);
* ``plain``: A is plain apsw too: an A/A run that shows the harness's own bias and noise.

The modes without a consumer import ``walsync_vfs.capture`` without running the package's
``__init__``: its connection hook would start the replication engine and its dispatcher at
the first ``vfs="walsync"`` open, a second consumer of the queue.

Usage: ``python benchmarks/overhead.py [--quick] [--rounds N] [--slice S] [--dir DIR]
[--capture MODE] [--store file|s3] [--case SUBSTRING] [--check]``
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import apsw

MODES = ("replicated", "consumed", "converted", "queued", "off", "plain")
capture: types.ModuleType  # walsync_vfs.capture, bound by load_capture()


def load_capture(mode: str) -> None:
    """Import the capture layer: the whole package for ``consumed``, the bare module otherwise.

    The package's connection hook starts the replication engine and the capture dispatcher at
    the first ``vfs="walsync"`` open; in the modes without a consumer (``queued``, ``off``,
    ``plain``) that thread would steal the records the benchmark leaves queued, so there the
    package is stubbed and only the shim is loaded.
    """
    global capture
    if mode in ("replicated", "consumed", "converted"):
        importlib.import_module("walsync_vfs")
    else:
        spec = importlib.util.find_spec("walsync_vfs")
        if spec is None or spec.submodule_search_locations is None:
            raise SystemExit("walsync_vfs is not importable")
        stub = types.ModuleType("walsync_vfs")
        stub.__path__ = list(spec.submodule_search_locations)
        sys.modules["walsync_vfs"] = stub
    capture = importlib.import_module("walsync_vfs.capture")
    capture.load()


ONE_ROW = "INSERT INTO t(v) VALUES(randomblob(100))"
BULK = (
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000) "
    "INSERT INTO t(v) SELECT randomblob(100) FROM n"
)  # one statement in autocommit = one transaction of 1,000 rows


@dataclass(frozen=True)
class Case:
    """One workload: rows per commit at one synchronous level, and the ratio it must reach."""

    rows: int
    synchronous: str
    target: float

    @property
    def name(self) -> str:
        return f"{'1-row' if self.rows == 1 else f'{self.rows:,}-row'} {self.synchronous}"


CASES = (
    Case(1, "NORMAL", 0.95),
    Case(1, "FULL", 0.95),
    Case(1000, "NORMAL", 0.95),
    Case(1000, "FULL", 0.95),
)


class NullSink:
    """Discards batches, counting their commits so the run can prove capture happened;
    with ``convert``, first turns every record into a Python ``Record``."""

    def __init__(self, convert: bool) -> None:
        self.convert = convert
        self.commits = 0
        self.gaps = 0

    def __call__(self, batch: capture.Batch) -> None:
        if self.convert:
            for _ in batch:
                pass
        self.commits += batch.commits
        self.gaps += batch.gaps


def count_queued() -> tuple[int, int]:
    """Take and free whatever sits in the C queue; (commits, gaps) among it."""
    groups = capture.drain()
    return sum(b.ncommit for b in groups), sum(b.ngap for b in groups)


@dataclass
class Side:
    """One database under test and the commits/s of each of its slices."""

    con: apsw.Connection
    stmt: str
    settle: Callable[[], None] = lambda: None  # run inside the timed section, after the commits
    rates: list[float] = field(default_factory=list)
    settled: list[float] = field(default_factory=list)  # seconds each slice's settle took
    commits: int = 0

    def run(self, n: int) -> float:
        """n commits (plus settle) with GC off; returns commits/s."""
        execute, stmt = self.con.execute, self.stmt
        gc.collect()
        gc.disable()
        try:
            t0 = time.perf_counter()
            for _ in range(n):
                execute(stmt)
            t1 = time.perf_counter()
            self.settle()
            dt = time.perf_counter() - t0
        finally:
            gc.enable()
        self.settled.append(t0 + dt - t1)
        self.commits += n
        return n / dt

    def run_for(self, seconds: float) -> float:
        """Warm-up: commit for about ``seconds``; returns commits/s."""
        execute, stmt = self.con.execute, self.stmt
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            execute(stmt)
            n += 1
        self.settle()
        self.commits += n
        return n / (time.perf_counter() - t0)


def user_seconds() -> tuple[float, float] | None:
    """(user CPU-seconds of the whole machine, of this process) so far; Linux only.

    User time only: the kernel's share includes the writeback of our own files by kworkers,
    which is part of the workload, while other processes (tests, builds) show up as user time.
    """
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:3]]  # user, nice
    except (OSError, ValueError):
        return None
    return sum(ticks) / os.sysconf("SC_CLK_TCK"), os.times().user


def process_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU-seconds process ``pid`` has used so far; Linux only."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def open_db(path: str, synchronous: str, vfs: str | None) -> apsw.Connection:
    """Open with the pragmas both sides share (autocheckpoint stays at SQLite's default)."""
    con = apsw.Connection(path, vfs=vfs) if vfs else apsw.Connection(path)
    if con.execute("PRAGMA journal_mode=WAL").fetchone()[0] != "wal":
        raise SystemExit(f"{path}: could not switch to WAL")
    con.execute(f"PRAGMA synchronous={synchronous}")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    return con


@dataclass
class Result:
    """Per-round ratios and rates of one case."""

    case: Case
    ratios: list[float]
    rate_a: list[float]
    rate_b: list[float]
    settled: list[float]  # seconds each walsync slice waited at its end (flush, barrier)
    per_slice: int
    captured: int
    others: float | None  # share of the CPUs other processes used (user time) during the case
    store: float | None  # cores the store's server (SeaweedFS, on this machine) kept busy

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    @property
    def met(self) -> bool:
        return self.median >= self.case.target


def run_case(
    case: Case, workdir: str, mode: str, rounds: int, slice_s: float, store_pid: int | None
) -> Result:
    """Warm up, calibrate the slice length, then alternate A/B for ``rounds`` rounds.
    ``store_pid``: the store's server, whose CPU is reported apart from other processes'."""
    d = tempfile.mkdtemp(prefix=f"overhead-{case.rows}-{case.synchronous}-", dir=workdir)
    path_a, path_b = os.path.join(d, "walsync.db"), os.path.join(d, "plain.db")
    stmt = ONE_ROW if case.rows == 1 else BULK
    sink = NullSink(convert=mode == "converted")
    settle: Callable[[], None] = lambda: None  # noqa: E731
    routed = mode in ("consumed", "converted")
    if mode == "replicated":
        settle = replicated_settle
    if routed:
        disp = capture.dispatcher()
        disp.route_path(path_a, sink)  # before the open: OPEN picks the sink
        settle = disp.barrier
    con_a = open_db(path_a, case.synchronous, None if mode == "plain" else "walsync")
    if mode not in ("replicated", "off", "plain"):
        capture.SyncPoint(path_a).close()  # the shim publishes nothing for a db before a sync
    con_b = open_db(path_b, case.synchronous, None)
    a = Side(con_a, stmt, settle)
    b = Side(con_b, stmt)
    queued = [0, 0]
    cpu0, t0 = user_seconds(), time.monotonic()
    store0 = process_seconds(store_pid) if store_pid else (0.0, 0.0)

    def between() -> None:
        """Untimed, after each slice: empty the C queue when no consumer thread runs."""
        if mode in ("queued", "off", "plain"):
            c, g = count_queued()
            queued[0] += c
            queued[1] += g

    try:
        a.run_for(slice_s)
        warm = b.run_for(slice_s)
        between()
        per_slice = max(3, round(warm * slice_s))
        ratios: list[float] = []
        for r in range(rounds):
            order = (a, b) if r % 2 == 0 else (b, a)
            for side in order:
                side.rates.append(side.run(per_slice))
                between()
            ratios.append(a.rates[-1] / b.rates[-1])
        if mode == "replicated":
            captured, gaps = replicated_txids(path_a), 0
        elif routed:
            settle()
            captured, gaps = sink.commits, sink.gaps
        else:
            captured, gaps = queued
        cpu1, elapsed = user_seconds(), time.monotonic() - t0
        store1 = process_seconds(store_pid) if store_pid else (0.0, 0.0)
        store_user = store1[0] - store0[0]
        store = (store_user + store1[1] - store0[1]) / elapsed if store_pid else None
        others = None
        if cpu0 and cpu1:
            foreign = (cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1]) - store_user
            others = max(0.0, foreign / (elapsed * (os.cpu_count() or 1)))
        if gaps:
            raise SystemExit(f"{case.name}: the capture stream reported {gaps} gap(s)")
        # replicated: the schema's commits come before the counted ones
        if mode not in ("off", "plain") and captured < a.commits:
            raise SystemExit(f"{case.name}: {a.commits} commits but {captured} captured")
    finally:
        con_a.close()
        con_b.close()
        if routed:
            capture.dispatcher().route_path(path_a, None)
        for name in os.listdir(d):
            os.unlink(os.path.join(d, name))
        os.rmdir(d)
    return Result(
        case, ratios, a.rates, b.rates, a.settled, per_slice, captured, others, store
    )


def replicated_settle() -> None:
    """End a replicated slice: everything it committed is in the replica."""
    import walsync_vfs

    walsync_vfs.flush(timeout=120)


def replicated_txids(path: str) -> int:
    """The last txid the replica holds for the database at ``path`` (its commits so far)."""
    import walsync_vfs

    (row,) = [s for s in walsync_vfs.stats() if s["path"] == path]
    return int(row["replicated_txid"])


@contextlib.contextmanager
def replica_root(store: str, workdir: str) -> Iterator[tuple[str, int | None]]:
    """Configure replication to a fresh root: a local directory, or a SeaweedFS of its own;
    yields the root and the store server's pid (None for a directory)."""
    import walsync_vfs

    with tempfile.TemporaryDirectory(
        prefix="overhead-replica-", dir=workdir, ignore_cleanup_errors=True  # a lease let go late
    ) as d:
        if store == "file":
            root = Path(d).as_uri()
            walsync_vfs.configure(replica=root)
            yield root, None
            return
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        import seaweedfs  # the SeaweedFS launcher the tests use

        # 1 GiB volumes: the 1,000-row cases write ~100 MB/s, which would fill the tests'
        # 64 MiB ones every second, each time pausing a PUT for a volume to grow.
        with seaweedfs.running(Path(d), volume_mb=1024) as server:
            os.environ.update(server.env())
            root = f"s3://{server.new_bucket()}/overhead"
            walsync_vfs.configure(replica=root)
            yield root, server.pid


def print_machine(workdir: str) -> str:
    """Print the software and machine the numbers were measured on; returns a description of
    ``workdir`` for the caller's own settings line."""
    print(f"python {platform.python_version()} ({sys.implementation.name}), "
          f"apsw {apsw.apsw_version()}, SQLite {apsw.sqlite_lib_version()}")  # fmt: skip
    print(f"{platform.platform()}; cpus: {os.cpu_count()} "
          f"(usable: {len(os.sched_getaffinity(0))})")  # fmt: skip
    return f"dir: {workdir} (block size {os.statvfs(workdir).f_bsize})"


def print_environment(workdir: str, mode: str, rounds: int, slice_s: float) -> None:
    """What the numbers were measured on: the ratio is only comparable with this context."""
    where = print_machine(workdir)
    print(f"{where}; capture: {mode}; rounds: {rounds}; slice ~{slice_s:.2f} s")


def main(argv: list[str] | None = None) -> int:
    """Run every case and print the ratio table (exit 1 on a missed target with --check)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="short run for CI (~10 s)")
    ap.add_argument("--rounds", type=int, help="timed A/B rounds per case (default 15, quick 6)")
    ap.add_argument("--slice", type=float, help="seconds per slice (default 0.4, quick 0.2)")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the databases go")
    ap.add_argument(
        "--capture",
        choices=MODES,
        default="replicated",
        help="what A does with the captured stream (see the module docstring)",
    )
    ap.add_argument(
        "--store",
        choices=("file", "s3"),
        default="file",
        help="replicated: a local directory, or a SeaweedFS started for the run",
    )
    ap.add_argument("--case", action="append", help="run only cases whose name contains this")
    ap.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = ap.parse_args(argv)
    rounds = args.rounds or (6 if args.quick else 15)
    slice_s = args.slice or (0.2 if args.quick else 0.4)
    cases = [c for c in CASES if not args.case or any(s in c.name for s in args.case)]
    load_capture(args.capture)
    with contextlib.ExitStack() as stack:
        store_pid = None
        if args.capture == "replicated":
            root, store_pid = stack.enter_context(replica_root(args.store, args.dir))
            print(f"replica: {root}")
        return report(args, cases, rounds, slice_s, store_pid)


def report(
    args: argparse.Namespace, cases: list[Case], rounds: int, slice_s: float, store_pid: int | None
) -> int:
    """Run the cases and print the table."""
    print_environment(args.dir, args.capture, rounds, slice_s)
    print()
    head = (
        f"{'case':<16} {'ratio med':>9} {'min':>6} {'max':>6}  {'target':>7}  {'met':<4}"
        f" {'walsync c/s':>12} {'plain c/s':>10} {'commits/slice':>13} {'end ms':>6}"
        f" {'others':>6} {'store':>5}"
    )
    print(head)
    print("-" * len(head))
    results = []
    for case in cases:
        res = run_case(case, args.dir, args.capture, rounds, slice_s, store_pid)
        results.append(res)
        others = "?" if res.others is None else f"{res.others:.0%}"
        store = "-" if res.store is None else f"{res.store:.2f}"
        print(
            f"{case.name:<16} {res.median:>9.3f} {min(res.ratios):>6.3f} {max(res.ratios):>6.3f}"
            f"  >={case.target:<5.2f}  {'yes' if res.met else 'NO':<4}"
            f" {statistics.median(res.rate_a):>12,.0f} {statistics.median(res.rate_b):>10,.0f}"
            f" {res.per_slice:>13,} {statistics.median(res.settled) * 1e3:>6.1f}"
            f" {others:>6} {store:>5}",
            flush=True,
        )
    print()
    print("ratio = walsync commits/s / plain commits/s per round (median over rounds);")
    print("absolute commits/s are medians, for context only; end ms = median wait at the end")
    print("of a walsync slice, inside its time, for its last commits to reach the replica")
    print("(flush) or the sink (barrier): the durability wait of an app that flushes once a")
    print("slice, which a longer slice spreads thinner; others = user CPU share taken by")
    print("other processes during the case (high: the machine was busy, the ratio is noisier);")
    print("store = cores the store's server (SeaweedFS) kept busy on this machine during the")
    print("case: CPU a remote store would not take from the writer.")
    return 1 if args.check and not all(r.met for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
