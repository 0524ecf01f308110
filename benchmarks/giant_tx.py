"""One giant transaction (issue 14): the application's extra peak RSS with walsync.

Each round writes the same transaction twice, each time in a child process of its own
(tests/giant_writer.py): once with plain apsw (the baseline) and once through
``vfs="walsync"`` replicating to one SeaweedFS (default settings: ``max_segment_bytes``
16 MiB, ``memory_cap`` 64 MiB), the order alternating from round to round.  The figure is
walsync's peak RSS (VmHWM, taken after ``flush()``) minus the baseline's of the same round:
median and spread over the rounds, against issue 14's goal of 64 MiB at any transaction size.
Every round restores the replica and checks its rows' digest against the writer's.

    python benchmarks/giant_tx.py            # 10^9 bytes of rows, 3 rounds
    python benchmarks/giant_tx.py --quick    # 256 MiB, 2 rounds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import apsw

from walsync_vfs import storage
from walsync_vfs.restore import restore_from, split_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import seaweedfs  # the SeaweedFS launcher the tests use
from giant_writer import digest  # the writer child's own digest of the rows

TESTS = Path(seaweedfs.__file__).parent
MIB = 1 << 20
GOAL_MIB = 64.0
MAX_SEGMENT_BYTES = 16 * MIB  # the defaults of walsync_vfs.configure
MEMORY_CAP = 64 * MIB


def write(db: Path, mib: int, env: dict[str, str], *replica: str) -> dict[str, Any]:
    """Run one writer child; its JSON line (maxrss KiB, digest, rows) and wall time."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(TESTS / "giant_writer.py"), str(db), str(mib), *replica],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    if proc.returncode != 0:
        raise SystemExit(f"writer failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    result["seconds"] = time.monotonic() - started
    return result


def remove_db(db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


def restored_digest(url: str, out: Path) -> tuple[str, int]:
    root, name = split_url(url)
    restore_from(storage.open_replica(root), name, str(out))
    con = apsw.Connection(str(out))
    try:
        if con.execute("PRAGMA integrity_check").fetchall() != [("ok",)]:
            raise SystemExit(f"restored {out} fails integrity_check")
        return digest(con)
    finally:
        con.close()
        remove_db(out)


def one_round(
    server: seaweedfs.SeaweedFS, work: Path, mib: int, walsync_first: bool
) -> dict[str, Any]:
    env = server.env()
    replica = f"s3://{server.new_bucket()}/giant"
    runs: dict[str, dict[str, Any]] = {}
    for kind in ("walsync", "plain") if walsync_first else ("plain", "walsync"):
        db = work / f"{kind}.db"
        if kind == "plain":
            runs[kind] = write(db, mib, env)
        else:
            runs[kind] = write(db, mib, env, replica, str(MAX_SEGMENT_BYTES), str(MEMORY_CAP))
        remove_db(db)
    plain, replicated = runs["plain"], runs["walsync"]
    if plain["rows"] != replicated["rows"]:
        raise SystemExit(f"rows differ: plain {plain['rows']}, walsync {replicated['rows']}")
    os.environ.update(env)  # the restore below uses the package's own S3 client
    restored = restored_digest(f"{replica}/walsync.db", work / "restored.db")
    equal = restored == (replicated["digest"], replicated["rows"])
    return {
        "plain_mib": plain["maxrss"] / 1024,
        "walsync_mib": replicated["maxrss"] / 1024,
        "extra_mib": (replicated["maxrss"] - plain["maxrss"]) / 1024,
        "time_ratio": replicated["seconds"] / plain["seconds"],
        "restore_equal": equal,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, help="MiB of rows in the transaction (default 953: 10^9 B)")
    p.add_argument("--rounds", type=int, help="rounds (default 3, --quick 2)")
    p.add_argument("--quick", action="store_true", help="256 MiB, 2 rounds")
    p.add_argument("--dir", help="work directory (default: a temporary one, removed)")
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args()
    mib = args.mib or (256 if args.quick else 953)
    rounds = args.rounds or (2 if args.quick else 3)
    for name in seaweedfs.FOREIGN_ENV:
        os.environ.pop(name, None)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="giant-tx-") as d:
        work = Path(d)
        with seaweedfs.running(work / "seaweedfs") as server:
            print(f"{mib} MiB in one transaction, {rounds} rounds; SeaweedFS {server.endpoint}")
            results = []
            for i in range(rounds):
                r = one_round(server, work, mib, walsync_first=i % 2 == 1)
                results.append(r)
                print(
                    f"round {i + 1}: plain {r['plain_mib']:.1f} MiB, walsync "
                    f"{r['walsync_mib']:.1f} MiB, extra {r['extra_mib']:+.1f} MiB; "
                    f"time {r['time_ratio']:.2f}x plain; restore equal: {r['restore_equal']}",
                    flush=True,
                )
    extras = [r["extra_mib"] for r in results]
    median = statistics.median(extras)
    all_equal = all(r["restore_equal"] for r in results)
    met = max(extras) <= GOAL_MIB and all_equal
    print(
        f"extra peak RSS: median {median:.1f} MiB, spread {min(extras):.1f}..{max(extras):.1f} "
        f"MiB (goal <= {GOAL_MIB:.0f}); every restore equal: {all_equal}; "
        f"{'met' if met else 'NOT met'}"
    )
    if args.json:
        summary = {"mib": mib, "rounds": results, "median_extra_mib": median, "met": met}
        Path(args.json).write_text(json.dumps(summary, indent=2))
    if not met:
        sys.exit(1)


if __name__ == "__main__":
    main()
