"""A mixed workload as a user meets it: whole runs through walsync against plain apsw.

Each run opens a fresh database, runs the whole workload and closes it; the database is then
deleted, and the next run recreates it at the same path.  A = ``vfs="walsync"`` replicating
(``import walsync_vfs``; ``configure()`` to a fresh local directory, or with ``--store s3`` to
a SeaweedFS started for the run), its run ending with ``walsync_vfs.flush()`` so it pays for
uploading everything it committed; B = plain apsw in WAL mode with the same pragmas.  Both run
in one process, alternating A/B with the order swapped every round; the verdict is the median
over rounds of time(B) / time(A), the speed of walsync relative to plain apsw.

The workload, in the spirit of SQLite's speedtest1 mix, is generated once from a seed, so every
run does identical work (both sides' databases must end with equal contents): multi-statement
scripts inserting thousands of rows in one transaction, CREATE INDEX on populated tables, many
small bound INSERT/UPDATE/DELETE by key in autocommit, the same as unbound SQL text, SELECT-heavy
parts (nothing to replicate, but part of a real mix), bulk UPDATE/DELETE/INSERT ... SELECT
statements, one DROP TABLE and VACUUM, and a few small commits after it.  ``--scale`` sizes it.

After every walsync run (untimed) the replica is restored and compared with the source: the
same rows in every table (a digest) and ``PRAGMA integrity_check`` = ok.

Usage: ``python benchmarks/mixed.py [--quick] [--rounds N] [--scale S] [--store file|s3]
[--synchronous NORMAL|FULL] [--dir DIR] [--check]``
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import apsw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import print_machine, replica_root, user_seconds  # noqa: E402

import walsync_vfs  # noqa: E402
from walsync_vfs import storage  # noqa: E402
from walsync_vfs.restore import restore_from, split_url  # noqa: E402

TARGET = 0.95
SEED = 20261206
SELECT_ROUNDS = 60
WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
    "hundred", "thousand", "million",
)  # fmt: skip
SCHEMA = (
    "CREATE TABLE t1(a INTEGER PRIMARY KEY, b INTEGER, c TEXT);"
    "CREATE TABLE t2(a INTEGER PRIMARY KEY, b INTEGER, c TEXT);"
    "CREATE TABLE t3(a INTEGER PRIMARY KEY, b INTEGER, c TEXT);"
)

Row = tuple[int, int, str]
Phase = Callable[[apsw.Connection], None]


def words(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))


def sql_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


@dataclass(frozen=True)
class Workload:
    """Every statement and parameter of one run, generated once before any run."""

    scripts: list[str]  # each one transaction: BEGIN; thousands of INSERTs; COMMIT
    bound: list[tuple[str, tuple[int | str, ...]]]  # small writes by key, autocommit
    unbound: list[str]  # the same kind of writes as literal SQL
    selects: list[tuple[str, tuple[int | str, ...]]]
    late: list[tuple[str, tuple[int | str, ...]]]  # small commits after the VACUUM

    @classmethod
    def generate(cls, scale: float, seed: int = SEED) -> Workload:
        rng = random.Random(seed)
        rows_per_script = max(100, round(25000 * scale))
        n_scripts = 8
        n_small = max(100, round(30000 * scale))
        scripts, keys = [], 0
        for i in range(n_scripts):
            table = "t1" if i % 2 == 0 else "t2"
            inserts = []
            for _ in range(rows_per_script):
                keys += 1
                inserts.append(
                    f"INSERT INTO {table} VALUES({keys},{rng.randint(0, 10**9)},"
                    f"{sql_text(words(rng))});"
                )
            scripts.append("BEGIN;" + "".join(inserts) + "COMMIT;")
        top = keys

        def small_write() -> tuple[str, tuple[int | str, ...]]:
            nonlocal top
            kind = rng.random()
            if kind < 0.4:
                top += 1
                return "INSERT INTO t2 VALUES(?,?,?)", (top, rng.randint(0, 10**9), words(rng))
            key = rng.randint(1, top)
            if kind < 0.8:
                return "UPDATE t1 SET b=?, c=? WHERE a=?", (rng.randint(0, 10**9), words(rng), key)
            return "DELETE FROM t2 WHERE a=?", (key,)

        bound = [small_write() for _ in range(n_small)]
        unbound = [inline(*small_write()) for _ in range(n_small)]
        selects: list[tuple[str, tuple[int | str, ...]]] = []
        for _ in range(SELECT_ROUNDS):  # each scans tables that grow with scale
            lo = rng.randint(0, 10**9)
            selects.append(("SELECT count(*), avg(b) FROM t1 WHERE b BETWEEN ? AND ?",
                            (lo, lo + 10**7)))  # fmt: skip
            selects.append(("SELECT count(*) FROM t2 WHERE c LIKE ?", (f"%{rng.choice(WORDS)}%",)))
            selects.append(("SELECT c FROM t1 WHERE a=?", (rng.randint(1, top),)))
        selects.append(("SELECT t1.c, t2.c FROM t1 JOIN t2 ON t2.b=t1.a LIMIT 1000", ()))
        late = [small_write() for _ in range(max(10, round(2000 * scale)))]
        return cls(scripts, bound, unbound, selects, late)

    def phases(self, synchronous: str) -> list[tuple[str, Phase]]:
        """The run's parts in order, each a function of the open connection."""

        def setup(con: apsw.Connection) -> None:
            if con.execute("PRAGMA journal_mode=WAL").fetchall() != [("wal",)]:
                raise SystemExit("could not switch to WAL")
            con.execute(f"PRAGMA synchronous={synchronous}")
            con.execute(SCHEMA)

        def scripts(con: apsw.Connection) -> None:
            for script in self.scripts:
                con.execute(script)

        def indexes(con: apsw.Connection) -> None:
            con.execute("CREATE INDEX t1_b ON t1(b)")
            con.execute("CREATE INDEX t2_c ON t2(c)")

        def bound(con: apsw.Connection) -> None:
            for sql, params in self.bound:
                con.execute(sql, params)

        def unbound(con: apsw.Connection) -> None:
            for sql in self.unbound:
                con.execute(sql)

        def selects(con: apsw.Connection) -> None:
            for sql, params in self.selects:
                con.execute(sql, params).fetchall()

        def bulk(con: apsw.Connection) -> None:
            con.execute("UPDATE t1 SET b=b+1 WHERE a%3=0")
            con.execute("DELETE FROM t2 WHERE b%5=0")
            con.execute("INSERT INTO t3 SELECT a, b, c FROM t1 WHERE a%2=0")
            con.execute("UPDATE t3 SET c=upper(c)")

        def drop_vacuum(con: apsw.Connection) -> None:
            con.execute("DROP TABLE t3")
            con.execute("VACUUM")

        def late(con: apsw.Connection) -> None:
            for sql, params in self.late:
                con.execute(sql, params)

        return [
            ("open + schema", setup),
            ("bulk scripts", scripts),
            ("create index", indexes),
            ("bound writes", bound),
            ("unbound writes", unbound),
            ("selects", selects),
            ("bulk statements", bulk),
            ("drop + vacuum", drop_vacuum),
            ("after vacuum", late),
        ]


def inline(sql: str, params: tuple[int | str, ...]) -> str:
    """``sql`` with its parameters written in as literals: an unbound statement."""
    parts = sql.split("?")
    literals = [sql_text(p) if isinstance(p, str) else str(p) for p in params]
    return "".join(part + lit for part, lit in zip(parts, [*literals, ""], strict=True))


def digest(path: str) -> str:
    """SHA-256 over the schema and every row of every table (opened with the default VFS)."""
    con = apsw.Connection(path)
    try:
        h = hashlib.sha256()
        tables = con.execute("SELECT name, sql FROM sqlite_schema ORDER BY name").fetchall()
        for name, sql in tables:
            h.update(repr((name, sql)).encode())
            if isinstance(sql, str) and sql.startswith("CREATE TABLE"):
                for row in con.execute(f'SELECT * FROM "{name}" ORDER BY rowid'):
                    h.update(repr(row).encode())
        return h.hexdigest()
    finally:
        con.close()


def integrity_ok(path: str) -> bool:
    con = apsw.Connection(path)
    try:
        return con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        con.close()


def remove_db(path: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(path + suffix).unlink(missing_ok=True)


@dataclass
class Side:
    """One way of running the workload, and the seconds of each of its runs (and phases)."""

    name: str
    vfs: str | None
    path: str
    times: list[float] = field(default_factory=list)
    phase_times: list[list[float]] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)

    def run(self, phases: list[tuple[str, Phase]]) -> str | None:
        """One whole run on a fresh database; the replica name the run wrote to (walsync)."""
        remove_db(self.path)
        gc.collect()
        laps: list[float] = []
        name = None
        t0 = lap = time.perf_counter()
        con = apsw.Connection(self.path, vfs=self.vfs) if self.vfs else apsw.Connection(self.path)
        for _, phase in phases:
            phase(con)
            now = time.perf_counter()
            laps.append(now - lap)
            lap = now
        if self.vfs:
            walsync_vfs.flush(timeout=600)
            (name,) = [s["name"] for s in walsync_vfs.stats() if s["path"] == self.path]
        con.close()
        end = time.perf_counter()
        laps.append(end - lap)
        self.times.append(end - t0)
        self.phase_times.append(laps)
        self.digests.append(digest(self.path))
        return name


def restore_equal(root: str, name: str, source_digest: str, workdir: str) -> bool:
    """Restore the replica's newest state and compare it with the source's digest."""
    out = os.path.join(workdir, "restored.db")
    remove_db(out)
    restore_from(storage.open_replica(split_url(f"{root}/{name}")[0]), name, out)
    try:
        return integrity_ok(out) and digest(out) == source_digest
    finally:
        remove_db(out)


def main(argv: list[str] | None = None) -> int:
    """Run the rounds and print the verdict (exit 1 on a miss or unequal restore with --check)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="short run (~30 s)")
    ap.add_argument("--rounds", type=int, help="A/B rounds (default 7, quick 5)")
    ap.add_argument("--scale", type=float, help="workload size (default 1.0, quick 0.3)")
    ap.add_argument(
        "--store",
        choices=("file", "s3"),
        default="file",
        help="replica: a local directory, or a SeaweedFS started for the run",
    )
    ap.add_argument("--synchronous", choices=("NORMAL", "FULL"), default="NORMAL")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the databases go")
    ap.add_argument("--check", action="store_true", help="exit 1 if the target is missed")
    args = ap.parse_args(argv)
    rounds = args.rounds or (5 if args.quick else 7)
    scale = args.scale or (0.3 if args.quick else 1.0)
    workload = Workload.generate(scale)
    phases = workload.phases(args.synchronous)
    with replica_root(args.store, args.dir) as (root, _), tempfile.TemporaryDirectory(
        prefix="mixed-", dir=args.dir
    ) as d:
        print(f"replica: {root}")
        where = print_machine(args.dir)
        print(f"{where}; store: {args.store}; synchronous: {args.synchronous}; "
              f"rounds: {rounds}; scale: {scale}")  # fmt: skip
        print(f"workload: {len(workload.scripts)} scripts of "
              f"{workload.scripts[0].count('INSERT'):,} INSERTs, {len(workload.bound):,} bound "
              f"and {len(workload.unbound):,} unbound small writes, {len(workload.selects):,} "
              f"SELECTs, {len(workload.late):,} writes after VACUUM")  # fmt: skip
        walsync = Side("walsync", "walsync", os.path.join(d, "walsync.db"))
        plain = Side("plain", None, os.path.join(d, "plain.db"))
        walsync.run(phases)  # warm-up, discarded: imports, engine start, page cache
        plain.run(phases)
        for side in (walsync, plain):
            side.times.clear()
            side.phase_times.clear()
        print()
        print(f"{'round':>5} {'walsync s':>10} {'plain s':>8} {'ratio':>6}  restore")
        cpu0, t0 = user_seconds(), time.monotonic()
        ratios, equal = [], 0
        for r in range(rounds):
            name = None
            for side in (walsync, plain) if r % 2 == 0 else (plain, walsync):
                name = side.run(phases) or name
            assert name is not None
            ok = restore_equal(root, name, walsync.digests[-1], d)
            equal += ok
            ratios.append(plain.times[-1] / walsync.times[-1])
            print(f"{r + 1:>5} {walsync.times[-1]:>10.2f} {plain.times[-1]:>8.2f} "
                  f"{ratios[-1]:>6.3f}  {'equal' if ok else 'DIFFERS'}", flush=True)  # fmt: skip
        cpu1, elapsed = user_seconds(), time.monotonic() - t0
        remove_db(walsync.path)
        remove_db(plain.path)
    same_work = len(set(walsync.digests + plain.digests)) == 1
    others = "?"
    if cpu0 and cpu1:
        foreign = (cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1])
        others = f"{max(0.0, foreign / (elapsed * (os.cpu_count() or 1))):.0%}"
    print_phases(phases, walsync, plain)
    median = statistics.median(ratios)
    met = median >= TARGET
    print()
    print(f"mixed {args.store} {args.synchronous}: ratio median {median:.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}) target >={TARGET:.2f} "
          f"{'met' if met else 'MISSED'}; restores equal {equal}/{rounds}; both sides' "
          f"databases equal: {'yes' if same_work else 'NO'}; others {others}")  # fmt: skip
    print("ratio = plain seconds / walsync seconds per round (whole runs: open, workload, "
          "flush, close);")  # fmt: skip
    print("others = user CPU share taken by other processes during the rounds.")
    ok = met and equal == rounds and same_work
    return 1 if args.check and not ok else 0


def print_phases(phases: list[tuple[str, Phase]], walsync: Side, plain: Side) -> None:
    """Median seconds per phase on each side: where a missed target comes from."""
    print()
    print(f"{'phase':<16} {'walsync s':>10} {'plain s':>8} {'ratio':>6}")
    names = [n for n, _ in phases] + ["flush + close"]
    for i, name in enumerate(names):
        a = statistics.median(t[i] for t in walsync.phase_times)
        b = statistics.median(t[i] for t in plain.phase_times)
        print(f"{name:<16} {a:>10.3f} {b:>8.3f} {b / a if a else 0:>6.3f}")


if __name__ == "__main__":
    sys.exit(main())
