"""Restore speed (issue 4): MB/s of ``python -m walsync_vfs restore`` relative to Litestream's.

One write phase feeds both tools the same history: a deterministic stream of 1,000-row
transactions (rows of ~1 KB, half random hex, half words from a small vocabulary, so zstd
finds some but not much to squeeze) is applied, statement for statement, to four fresh WAL
databases until they reach the target size:

* ``walsync-local`` / ``walsync-s3``: opened with ``vfs="walsync"``, replicating to a
  ``file://`` root and to ``s3://<bucket>/walsync``;
* ``litestream-local`` / ``litestream-s3``: plain apsw, replicated by one
  ``litestream replicate`` process (its defaults: 1 s sync, L1 compaction every 30 s) to a
  ``file`` replica and to ``s3://<bucket>/litestream/...``.

Both S3 replicas live on one SeaweedFS server on loopback (tests/seaweedfs.py, the tests'
launcher).  Four files rather than one because walsync captures at the source VFS: a database it
writes is not one a second process may checkpoint under Litestream's read lock.  The stream is
identical (paced, 5 transactions/s by default), so the four databases hold the same rows
(checked); Litestream adds two tables of its own, so its copies are 2 pages larger.

Once walsync has flushed and Litestream's replica holds its newest local TXID (and Litestream
has been stopped), each restore runs as a child process, walsync and Litestream alternating
(order swapped every round), after one untimed warm-up each.  Litestream restores through a
config naming placeholder database paths, so it can only read its replica, never the source's
``.db-litestream`` directory.  Every output is checked outside the timed span:
``PRAGMA integrity_check`` = ok, row count, and a SHA-256 over all rows equal to the source's.

The verdict is, per store, the ratio of median MB/s (db size in 10^6 bytes / wall time):
walsync / Litestream, target >= 1.5.  Absolute MB/s are context: they describe this machine.
Note that walsync's restore always runs ``PRAGMA integrity_check`` and fsyncs before renaming
into place; Litestream's does neither by default (``--litestream-check`` adds its check).

Usage: ``python benchmarks/restore.py [--quick] [--mb N] [--runs N] [--pace TPS] [--index]
[--litestream-check none|quick|full] [--profile DIR] [--dir DIR] [--keep]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import pstats
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import apsw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import seaweedfs  # the SeaweedFS launcher the tests use
from seaweedfs import tool_path

NAME = "bench.db"
TOOLS = ("walsync", "litestream")
STORES = ("local", "s3")
ROWS_PER_TXN = 1000
SEED = 4
TARGET = 1.5
REF = ("walsync", "local")  # the source whose size and digest every restore is checked against
# Words for the compressible half of each row; random hex makes the other half.
VOCAB = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
    "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango",
    "uniform", "victor", "whiskey", "xray", "yankee", "zulu", "order", "invoice", "customer",
    "shipped", "pending", "refund", "warehouse", "berlin", "lisbon", "osaka", "quito", "ok",
)  # fmt: skip
SCHEMA = "CREATE TABLE t(id INTEGER PRIMARY KEY, k TEXT NOT NULL, grp INTEGER, body TEXT)"
INSERT = "INSERT INTO t(k, grp, body) VALUES(?, ?, ?)"


# --- the write phase ------------------------------------------------------------------------


def transactions(seed: int) -> Iterator[list[tuple[str, int, str]]]:
    """Endless 1,000-row transactions; the same seed gives every database the same rows."""
    rng = random.Random(seed)
    while True:
        rows = []
        for _ in range(ROWS_PER_TXN):
            words = " ".join(rng.choices(VOCAB, k=75))
            body = f"{rng.randbytes(240).hex()} {words}"[:1000]
            rows.append((rng.randbytes(8).hex(), rng.randrange(1000), body))
        yield rows


def open_source(path: Path, vfs: str | None) -> apsw.Connection:
    """A fresh WAL database with the benchmark's table; identical pragmas for both tools."""
    path.parent.mkdir(parents=True, exist_ok=True)
    con = apsw.Connection(str(path), vfs=vfs) if vfs else apsw.Connection(str(path))
    con.set_busy_timeout(5000)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    return con


def content_digest(con: apsw.Connection) -> tuple[int, str]:
    """Row count and SHA-256 over every row in id order: what "same database" means here."""
    sha = hashlib.sha256()
    n = 0
    for rowid, k, grp, body in con.execute("SELECT id, k, grp, body FROM t ORDER BY id"):
        sha.update(f"{rowid}\x1f{k}\x1f{grp}\x1f{body}\x1e".encode())
        n += 1
    return n, sha.hexdigest()


@dataclass
class Setup:
    """Where everything lives, and what a correct restore must contain."""

    work: Path
    endpoint: str
    bucket: str
    env: dict[str, str]
    weed_pid: int
    sources: dict[tuple[str, str], Path] = field(default_factory=dict)
    walsync_roots: dict[str, str] = field(default_factory=dict)
    restore_config: Path | None = None
    db_bytes: dict[str, int] = field(default_factory=dict)  # tool -> source size
    txns: int = 0
    rows: int = 0
    digest: str = ""
    write_s: float = 0.0
    replica_stats: dict[tuple[str, str], str] = field(default_factory=dict)


def litestream_config(setup: Setup, paths: dict[str, str]) -> str:
    """Config for ``litestream``, one database per store (JSON, which is also YAML)."""
    replicas = {
        "local": {"type": "file", "path": str(setup.work / "replica" / "litestream-local" / NAME)},
        "s3": {
            "type": "s3",
            "bucket": setup.bucket,
            "path": f"litestream/{NAME}",
            "endpoint": setup.endpoint,
            "region": "us-east-1",
            "force-path-style": True,
            "access-key-id": seaweedfs.ACCESS_KEY,
            "secret-access-key": seaweedfs.SECRET_KEY,
        },
    }
    return json.dumps({"dbs": [{"path": paths[s], "replica": replicas[s]} for s in STORES]})


def litestream_ltx(config: Path, db: str, env: dict[str, str]) -> list[dict]:
    """Every LTX file of a database's replica, all levels (``litestream ltx -json``)."""
    out = subprocess.run(
        [tool_path("litestream"), "ltx", "-config", str(config), "-level", "all", "-json", db],
        capture_output=True,
        env=env,
        check=True,
        text=True,
    ).stdout
    return json.loads(out) or []


def local_litestream_txid(db: Path) -> int:
    """Newest TXID Litestream has cut from the source's WAL (its local L0 directory)."""
    found = [
        int(p.name.split("-")[1].split(".")[0], 16)
        for p in (db.parent / f".{db.name}-litestream" / "ltx" / "0").glob("*.ltx")
    ]
    return max(found, default=0)


def wait_litestream(config: Path, dbs: list[Path], env: dict[str, str], timeout: float) -> None:
    """Until Litestream's local TXID has been still for 3 s and every replica holds it."""
    deadline = time.monotonic() + timeout
    last: list[int] = []
    still_since = time.monotonic()
    while True:
        local = [local_litestream_txid(db) for db in dbs]
        if local != last:
            last, still_since = local, time.monotonic()
        remote = [
            max((int(f["max_txid"], 16) for f in litestream_ltx(config, str(db), env)), default=0)
            for db in dbs
        ]
        if remote == local and time.monotonic() - still_since >= 3.0:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"litestream not caught up after {timeout}s: {local=} {remote=}")
        time.sleep(0.5)


def write_phase(setup: Setup, target_bytes: int, index: bool, pace: float) -> None:
    """Stream the same transactions into all four databases while both tools replicate.

    ``pace`` transactions per second (0: flat out): at full speed the whole database lands
    in one or two sync intervals, which is a bulk load, not the stream a replica usually sees.
    """
    import walsync_vfs  # only the write phase needs it (its first open starts the engine)

    src = setup.work / "src"
    for tool in TOOLS:
        for store in STORES:  # walsync names a replica by file name: one name per database
            setup.sources[tool, store] = src / f"{tool}-{store}.db"
    setup.walsync_roots = {
        "local": (setup.work / "replica" / "walsync-local").as_uri(),
        "s3": f"s3://{setup.bucket}/walsync",
    }
    cons: dict[tuple[str, str], apsw.Connection] = {}
    ddl = [SCHEMA] + (["CREATE INDEX t_k ON t(k)"] if index else [])
    for store in STORES:
        walsync_vfs.configure(replica=setup.walsync_roots[store])
        cons["walsync", store] = open_source(setup.sources["walsync", store], "walsync")
        cons["litestream", store] = open_source(setup.sources["litestream", store], None)
    for con in cons.values():
        for stmt in ddl:
            con.execute(stmt)
    config = setup.work / "litestream.yml"
    config.write_text(
        litestream_config(setup, {s: str(setup.sources["litestream", s]) for s in STORES})
    )
    # Restores name placeholder paths: Litestream then has no local state to read from.
    setup.restore_config = setup.work / "litestream-restore.yml"
    setup.restore_config.write_text(
        litestream_config(setup, {s: str(setup.work / "nowhere" / s / NAME) for s in STORES})
    )
    log = (setup.work / "litestream.log").open("wb")
    ls = subprocess.Popen(
        [tool_path("litestream"), "replicate", "-config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=setup.env,
    )
    try:
        time.sleep(1.0)  # let it open the databases before the first write
        ref = cons[REF]
        page_size = ref.execute("PRAGMA page_size").fetchone()[0]
        t0 = time.perf_counter()
        for rows in transactions(SEED):
            if pace:
                time.sleep(max(0.0, t0 + setup.txns / pace - time.perf_counter()))
            for con in cons.values():
                with con:
                    con.executemany(INSERT, rows)
            setup.txns += 1
            pages = ref.execute("PRAGMA page_count").fetchone()[0]
            if pages * page_size >= target_bytes:
                break
            if ls.poll() is not None:
                raise SystemExit(f"litestream exited ({ls.returncode}); see {log.name}")
        setup.write_s = time.perf_counter() - t0
        print(f"wrote {setup.txns} transactions in {setup.write_s:.1f} s; waiting for replicas")
        walsync_vfs.flush(600)
        lsdbs = [setup.sources["litestream", s] for s in STORES]
        wait_litestream(config, lsdbs, setup.env, 600)
        seaweedfs.stop_process(ls, 30.0)
        log.close()
        final = [local_litestream_txid(db) for db in lsdbs]
        remote = [
            max(int(f["max_txid"], 16) for f in litestream_ltx(config, str(db), setup.env))
            for db in lsdbs
        ]
        if final != remote:
            raise SystemExit(f"litestream replica behind after stop: {final=} {remote=}")
        digests = {key: content_digest(con) for key, con in cons.items()}
        sizes = {
            key: con.execute("PRAGMA page_count").fetchone()[0] * page_size
            for key, con in cons.items()
        }
        # Litestream adds two tables of its own (_litestream_seq, _litestream_lock) to the
        # databases it replicates: sizes agree per tool, rows everywhere.
        setup.db_bytes = {tool: sizes[tool, "local"] for tool in TOOLS}
        if len(set(digests.values())) != 1 or any(
            sizes[tool, store] != setup.db_bytes[tool] for tool in TOOLS for store in STORES
        ):
            raise SystemExit(f"source databases differ: {digests} {sizes}")
        setup.rows, setup.digest = digests[REF]
        describe_replicas(setup, config)
    finally:
        seaweedfs.stop_process(ls, 30.0)
        for con in cons.values():
            con.close()


def describe_replicas(setup: Setup, config: Path) -> None:
    """Object count and bytes per replica: the volume each restore has to read."""
    from walsync_vfs import storage

    for store in STORES:
        name = setup.sources["walsync", store].name
        objs = storage.open_replica(setup.walsync_roots[store]).list(name + "/")
        setup.replica_stats["walsync", store] = (
            f"{len(objs)} objects, {sum(o.size for o in objs) / 1e6:.1f} MB"
        )
        files = litestream_ltx(config, str(setup.sources["litestream", store]), setup.env)
        levels = sorted({f["level"] for f in files})
        setup.replica_stats["litestream", store] = (
            f"{len(files)} LTX files (levels {','.join(map(str, levels))}), "
            f"{sum(f['size'] for f in files) / 1e6:.1f} MB"
        )


# --- the restore phase ----------------------------------------------------------------------


def restore_cmd(setup: Setup, tool: str, store: str, out: Path, check: str) -> list[str]:
    if tool == "walsync":
        url = f"{setup.walsync_roots[store]}/{setup.sources[tool, store].name}"
        return [sys.executable, "-m", "walsync_vfs", "restore", url, "-o", str(out), "--force"]
    assert setup.restore_config is not None
    return [
        tool_path("litestream"), "restore", "-config", str(setup.restore_config),
        "-o", str(out), "-integrity-check", check, str(setup.work / "nowhere" / store / NAME),
    ]  # fmt: skip


def clear(out: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal", ".tmp"):
        Path(f"{out}{suffix}").unlink(missing_ok=True)


@dataclass(frozen=True)
class Run:
    seconds: float
    others: float | None  # share of all CPUs that unrelated processes used meanwhile


def cpu_sample(weed_pid: int) -> tuple[float, float] | None:
    """(user CPU-seconds of the whole machine, of us: this process, reaped children, weed).

    User time only, as in overhead.py: other tenants (tests, builds) show up there, while
    the kernel's share includes writeback of our own output.  Linux only, else None.
    """
    try:
        with open("/proc/stat") as f:
            machine = sum(int(x) for x in f.readline().split()[1:3])  # user, nice
        with open(f"/proc/{weed_pid}/stat") as f:
            weed = int(f.read().rsplit(")", 1)[1].split()[11])  # utime
    except (OSError, ValueError, IndexError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    t = os.times()
    return machine / hz, t.user + t.children_user + weed / hz


def timed_restore(setup: Setup, tool: str, store: str, check: str) -> Run:
    """Wall seconds of one restore child process; the output is verified afterwards."""
    out = setup.work / "restored" / f"{tool}-{store}.db"
    out.parent.mkdir(exist_ok=True)
    clear(out)
    cmd = restore_cmd(setup, tool, store, out, check)
    before = cpu_sample(setup.weed_pid)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, env=setup.env, cwd=setup.work)
    elapsed = time.perf_counter() - t0
    after = cpu_sample(setup.weed_pid)
    others = None
    if before and after:
        foreign = (after[0] - before[0]) - (after[1] - before[1])
        others = max(0.0, foreign / (elapsed * (os.cpu_count() or 1)))
    if proc.returncode != 0:
        raise SystemExit(
            f"{tool} restore ({store}) failed ({proc.returncode}): {' '.join(cmd)}\n"
            f"{proc.stdout.decode(errors='replace')}{proc.stderr.decode(errors='replace')}"
        )
    verify(out, setup, tool, store)
    clear(out)
    return Run(elapsed, others)


def verify(out: Path, setup: Setup, tool: str, store: str) -> None:
    """integrity_check ok, the source's size and rows: a fast wrong restore counts for 0."""
    what = f"{tool}/{store}"
    if out.stat().st_size != setup.db_bytes[tool]:
        raise SystemExit(f"{what}: {out.stat().st_size} bytes, source {setup.db_bytes[tool]}")
    con = apsw.Connection(str(out), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        problems = [r[0] for r in con.execute("PRAGMA integrity_check")]
        if problems != ["ok"]:
            raise SystemExit(f"{what}: integrity_check: {problems[:3]}")
        rows, digest = content_digest(con)
        if (rows, digest) != (setup.rows, setup.digest):
            raise SystemExit(f"{what}: {rows} rows / {digest[:12]}, source has {setup.rows}")
    finally:
        con.close()


Runs = dict[tuple[str, str], list[Run]]


def measure(setup: Setup, runs: int, warmup: int, check: str) -> Runs:
    """Alternate the tools run by run (order swapped each round) on each store, so noise from
    the machine lands on both and each round gives one paired ratio."""
    results: Runs = {(t, s): [] for t in TOOLS for s in STORES}
    for rnd in range(warmup + runs):
        order = TOOLS if rnd % 2 == 0 else TOOLS[::-1]
        for store in STORES:
            for tool in order:
                run = timed_restore(setup, tool, store, check)
                label = "warm-up" if rnd < warmup else f"run {rnd - warmup + 1}"
                others = "" if run.others is None else f"  (others {run.others:.0%} CPU)"
                print(f"  {label:8} {store:5} {tool:10} {run.seconds:6.2f} s{others}", flush=True)
                if rnd >= warmup:
                    results[tool, store].append(run)
    return results


def profile_walsync(setup: Setup, store: str, dest: Path) -> None:
    """One more, untimed, walsync restore under cProfile: where the time goes on a miss."""
    dest.mkdir(parents=True, exist_ok=True)
    out = setup.work / "restored" / f"profile-{store}.db"
    prof = dest / f"walsync-restore-{store}.prof"
    url = f"{setup.walsync_roots[store]}/{setup.sources['walsync', store].name}"
    cmd = [sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "walsync_vfs", "restore"]
    subprocess.run([*cmd, url, "-o", str(out), "--force"], capture_output=True, env=setup.env,
                   check=True)  # fmt: skip
    clear(out)
    print(f"\ncProfile of walsync restore ({store}) -> {prof}, top by own time:")
    pstats.Stats(str(prof), stream=sys.stdout).sort_stats("tottime").print_stats(12)


def startup_seconds(env: dict[str, str]) -> float:
    """Median wall time of ``python -m walsync_vfs --help``: the fixed cost in every restore."""
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "walsync_vfs", "--help"],
            capture_output=True,
            env=env,
            check=True,
        )
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def report(setup: Setup, results: Runs, check: str) -> bool:
    """Print sizes, the MB/s table and the per-store ratios; True if every store meets TARGET."""
    mb = {tool: n / 1e6 for tool, n in setup.db_bytes.items()}
    print()
    print(
        f"database: {mb['walsync']:.1f} MB ({setup.db_bytes['walsync']:,} bytes; Litestream's "
        f"copy {setup.db_bytes['litestream']:,} with its 2 tables), {setup.rows:,} rows, "
        f"{setup.txns} transactions of {ROWS_PER_TXN} rows, written in {setup.write_s:.1f} s"
    )
    for key, text in setup.replica_stats.items():
        print(f"  replica {key[0]:10} {key[1]:5}: {text}")
    print(f"python -m walsync_vfs startup: {startup_seconds(setup.env):.2f} s")
    print()
    print("| store | tool | runs (s) | median s | median MB/s | others' CPU (median) |")
    print("|---|---|---|---|---|---|")
    medians: dict[tuple[str, str], float] = {}
    for store in STORES:
        for tool in TOOLS:
            ts = [r.seconds for r in results[tool, store]]
            shares = [r.others for r in results[tool, store] if r.others is not None]
            med = statistics.median(ts)
            medians[tool, store] = mb[tool] / med
            runs = " ".join(f"{t:.2f}" for t in ts)
            others = f"{statistics.median(shares):.0%}" if shares else "?"
            print(f"| {store} | {tool} | {runs} | {med:.2f} | {mb[tool] / med:.1f} | {others} |")
    print()
    ok = True
    for store in STORES:
        ratio = medians["walsync", store] / medians["litestream", store]
        paired = [
            (mb["walsync"] / w.seconds) / (mb["litestream"] / ls.seconds)
            for w, ls in zip(results["walsync", store], results["litestream", store], strict=True)
        ]
        met = ratio >= TARGET
        ok &= met
        print(
            f"{store:5}: walsync/litestream = {ratio:.2f}x  (target >= {TARGET}x: "
            f"{'met' if met else 'MISSED'}; {medians['walsync', store]:.1f} vs "
            f"{medians['litestream', store]:.1f} MB/s; per-round ratios: median "
            f"{statistics.median(paired):.2f}, min {min(paired):.2f}, max {max(paired):.2f})"
        )
    print(
        f"verdict: {'target met' if ok else 'target missed'} (litestream -integrity-check {check})"
    )
    return ok


def main(argv: list[str] | None = None) -> int:
    """Write, replicate, restore, print the table; exit 1 if a store misses the target."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="~20 MB database, 3 runs")
    ap.add_argument("--mb", type=float, help="database size in 10^6 bytes (default 100, quick 20)")
    ap.add_argument("--runs", type=int, help="timed runs per tool and store (default 7, quick 3)")
    ap.add_argument(
        "--pace", type=float, default=5.0, help="write transactions per second (0: flat out)"
    )
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the work dir goes")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (sources, replicas)")
    ap.add_argument(
        "--index",
        action="store_true",
        help="also index the random key: every commit rewrites pages all over the index",
    )
    ap.add_argument(
        "--litestream-check",
        choices=("none", "quick", "full"),
        default="none",
        help="litestream restore -integrity-check (walsync always runs a full one)",
    )
    ap.add_argument("--profile", metavar="DIR", help="then cProfile one walsync restore per store")
    args = ap.parse_args(argv)
    mb = args.mb or (20.0 if args.quick else 100.0)
    runs = args.runs or (3 if args.quick else 7)
    if runs < 1:
        ap.error("--runs must be >= 1")
    work = Path(tempfile.mkdtemp(prefix="walsync-restore-bench-", dir=args.dir))
    print(machine_line(work))
    try:
        with seaweedfs.running(work / "seaweedfs") as server:
            env = server.env()
            os.environ.clear()  # walsync's S3 client in this process reads the same settings
            os.environ.update(env)
            setup = Setup(
                work=work,
                endpoint=server.endpoint,
                bucket=server.new_bucket(),
                env=env,
                weed_pid=server.pid,
            )
            write_phase(setup, int(mb * 1e6), args.index, args.pace)
            print(
                f"replicated: {setup.db_bytes['walsync'] / 1e6:.1f} MB, {setup.rows:,} rows; "
                f"restoring ({args.warmup} warm-up + {runs} runs per tool and store)"
            )
            results = measure(setup, runs, args.warmup, args.litestream_check)
            met = report(setup, results, args.litestream_check)
            if args.profile:
                for store in STORES:
                    profile_walsync(setup, store, Path(args.profile))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if met else 1


def machine_line(work: Path) -> str:
    """What a Litestream comparison ran on: Python, CPUs, Litestream's version, work dir."""
    return (
        f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs; "
        f"litestream {litestream_version()}; work dir {work}"
    )


def litestream_version() -> str:
    out = subprocess.run([tool_path("litestream"), "version"], capture_output=True, text=True)
    return out.stdout.strip()


if __name__ == "__main__":
    try:
        status = main()
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # After a failure walsync's sync workers may still be retrying a replica (forever, by
    # design), and interpreter exit would join them: leave without waiting.
    os._exit(status)
