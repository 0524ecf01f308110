"""Many processes writing one database: walsync_vfs against Litestream on one SeaweedFS.

For 1, 4 and 8 writer processes on one database, each of three arms runs the same workload in
turn on a fresh database, in three modes: *sparse* (one commit at a time, gaps of 0.3 to 2.3 s
as in lag.py, the writers taking turns: the latency of one process, now through a follower),
*paced* (``--rate`` tx/s per writer, exponential gaps) and *flat* out.  The arms:

* walsync: every writer opens the database with ``vfs="walsync"`` (its own engine; one of
  them leads and replicates every commit in the WAL);
* Litestream: plain apsw writers in WAL mode, ``litestream replicate`` beside them;
* plain: plain apsw writers, no replication: the baseline for CPU and throughput.

The arms' order rotates from one configuration to the next (sparse runs have no plain arm).
Each transaction inserts one row.  After each commit a writer records where it ends in the
``-wal`` file (salts, byte offset), which is how the benchmark finds the object that makes it
durable:

* walsync: the first listed segment whose per-commit index (``WalPos``) reaches that frame;
* Litestream: the first L0 file whose WAL range reaches it (as in lag.py).

Reported per run:

* commit -> durable latency (median, p99): COMMIT returning in the writer to the first LIST
  (every ``--poll`` s, an independent client) showing such an object;
* bytes PUT and bytes stored at the end, each divided by the WAL bytes committed;
* CPU of the writers (``getrusage``, from the start of the window to after walsync's final
  ``flush()``) and of Litestream's process; replication CPU is an arm's total minus the plain
  arm's, per commit (flat out commits differ between arms);
* throughput: commits per second against the plain arm.

Usage: ``python benchmarks/multiproc.py [--quick] [--procs 1,4,8] [--paced S] [--flat S]
[--rate R] [--poll S] [--json FILE] [--keep]``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import apsw

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import lag  # noqa: E402  (the poller, WAL tail, Litestream mapping and percentiles of lag.py)
import seaweedfs  # noqa: E402  (the SeaweedFS launcher the tests use)

from walsync_vfs import format as wformat  # noqa: E402

SCHEMA = "CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, w INTEGER, payload BLOB)"
PAGE = 4096
FRAME = 24 + PAGE
TARGET_MEDIAN_MS = 30.0
TARGET_P99_MS = 150.0
TARGET_BYTES_RATIO = 2.0
SETTLE = 60.0  # s for the last commit of a run to become durable


# ------------------------------------------------------------------------------ writer child


def writer_main(tool: str, db: str, replica: str, wid: int) -> None:
    """Child: opens ``db``, then on ``run`` writes for the window; JSON lines on stdout."""

    def send(obj: object) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    if tool == "walsync":
        import walsync_vfs

        walsync_vfs.configure(replica=replica)
        con = apsw.Connection(db, vfs="walsync")
    else:
        con = apsw.Connection(db)
        con.execute("PRAGMA journal_mode=WAL")
    con.set_busy_timeout(30_000)
    wal = lag.WalTail(db)
    send({"ready": True})
    cmd = json.loads(sys.stdin.readline())
    rng = random.Random(cmd["seed"] * 100 + wid)
    cpu0 = cpu_self()
    commits = []

    def commit() -> None:
        con.execute("BEGIN IMMEDIATE")
        con.execute("INSERT INTO t(w, payload) VALUES (?, ?)", (wid, os.urandom(100)))
        con.execute("COMMIT")
        commits.append((time.monotonic(), *wal.read(), wid))

    if "times" in cmd:  # sparse: this writer's turns
        for at in cmd["times"]:
            time.sleep(max(0.0, at - time.monotonic()))
            commit()
    else:
        end = cmd["start"] + cmd["seconds"]
        time.sleep(max(0.0, cmd["start"] - time.monotonic()))
        while time.monotonic() < end:
            commit()
            if cmd["rate"]:
                time.sleep(rng.expovariate(cmd["rate"]))
    if tool == "walsync":
        walsync_vfs.flush(SETTLE)
    send({"commits": commits, "cpu": cpu_self() - cpu0})
    sys.stdin.readline()  # stop: every writer closes only once all are done
    con.close()


def cpu_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# ------------------------------------------------------------------------ watching the store


class SizedPoller(lag.Poller):
    """lag.Poller that also remembers each key's size (for bytes PUT)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sizes: dict[str, int] = {}

    def _list(self) -> list[str]:
        args: dict[str, Any] = {"Bucket": lag.BUCKET, "Prefix": self.prefix}
        keys: list[str] = []
        while True:
            page = self.client.list_objects_v2(**args)
            for o in page.get("Contents", ()):
                keys.append(o["Key"])
                self.sizes[o["Key"]] = max(self.sizes.get(o["Key"], 0), o["Size"])
            if not page.get("IsTruncated"):
                return keys
            args["ContinuationToken"] = page["NextContinuationToken"]


class SegmentIndex(threading.Thread):
    """Reads the per-commit index of every new walsync segment: (salt1, salt2) -> [(end
    frame, key)], so a commit's WAL position finds the first object that holds it."""

    def __init__(self, client: Any) -> None:
        super().__init__(name="segment index", daemon=True)
        self.client = client
        self.ends: dict[tuple[int, int], list[tuple[int, str]]] = {}
        self.errors: list[str] = []
        self._keys: list[str | None] = []
        self._ready = threading.Condition()

    def submit(self, key: str) -> None:
        parsed = wformat.parse_key(key.split("/", 1)[1])
        if parsed is not None and parsed.kind == "segment":
            with self._ready:
                self._keys.append(key)
                self._ready.notify()

    def stop(self) -> None:
        with self._ready:
            self._keys.append(None)
            self._ready.notify()
        self.join()

    def drained(self) -> bool:
        with self._ready:
            return not self._keys

    def run(self) -> None:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: bool(self._keys))
                key = self._keys.pop(0)
            if key is None:
                return
            try:
                body = self.client.get_object(Bucket=lag.BUCKET, Key=key)["Body"].read()
                header = wformat.read_segment_header(body, key)
            except Exception as exc:  # noqa: BLE001 - reported as commits never durable
                self.errors.append(f"{key}: {exc}")
                continue
            for entry in header.index:
                if entry.wal is not None:
                    pos = (entry.wal.salt1, entry.wal.salt2)
                    self.ends.setdefault(pos, []).append((entry.wal.end, key))


def durable_walsync(commit: list[float], index: SegmentIndex, seen: dict[str, float]) -> float:
    _, s1, s2, end, _ = commit
    frame = (int(end) - 32) // FRAME
    times = [seen[k] for e, k in index.ends.get((int(s1), int(s2)), []) if e >= frame and k in seen]
    return min(times, default=float("nan"))


def durable_litestream(
    commit: list[float], seen: dict[str, float], headers: dict[str, lag.LtxHeader]
) -> float:
    c = lag.Commit(commit[0], 0, (int(commit[1]), int(commit[2]), int(commit[3])))
    t = lag.litestream_restorable(c, seen, headers)
    return float("nan") if t is None else t


def wal_bytes(commits: list[list[float]]) -> int:
    """Bytes of WAL the commits filled: per WAL (salts), its last commit's end offset."""
    ends: dict[tuple[float, float], float] = {}
    for _, s1, s2, end, _ in commits:
        ends[s1, s2] = max(ends.get((s1, s2), 0.0), end)
    return int(sum(end - 32 for end in ends.values()))


# ------------------------------------------------------------------------------- one run


def proc_cpu(pid: int) -> float:
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_arm(
    tool: str,
    procs: int,
    mode: str,
    seconds: float,
    seed: int,
    server: seaweedfs.SeaweedFS,
    env: dict[str, str],
    workdir: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    name = f"{tool}-{procs}-{mode}-{seed}.db"
    rate = args.rate if mode == "paced" else 0.0
    db = workdir / name
    con = apsw.Connection(str(db))
    con.execute("PRAGMA journal_mode=WAL")
    con.execute(SCHEMA)
    con.close()
    prefix = f"{tool}/{name}/"
    client = seaweedfs.client(server.endpoint)
    with ExitStack() as stack:
        index = headers = None
        if tool == "walsync":
            index = SegmentIndex(client)
            index.start()
            stack.callback(index.stop)
        elif tool == "litestream":
            headers = lag.LtxHeaders(client)
            headers.start()
            stack.callback(headers.stop)
        on_new = index.submit if index else headers.submit if headers else None
        poller = SizedPoller(client, prefix, args.poll, on_new)
        poller.start()
        stack.callback(poller.stop)
        litestream = None
        if tool == "litestream":
            config = workdir / f"{name}.yml"
            config.write_text(lag.litestream_config({f"litestream/{name}": db}, server.endpoint))
            log = (workdir / f"{name}.log").open("wb")
            stack.callback(log.close)
            litestream = subprocess.Popen(
                [args.litestream, "replicate", "-config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
            stack.callback(seaweedfs.stop_process, litestream)
        replica = f"s3://{lag.BUCKET}/walsync"
        writers = [
            lag.Child(__file__, ["--writer", tool, str(db), replica, str(w)], env,
                      workdir / f"{name}-{w}.log")
            for w in range(procs)
        ]  # fmt: skip
        for w in writers:
            stack.callback(seaweedfs.stop_process, w.proc)
        for w in writers:
            w.reply()
        if tool != "plain":
            # Both tools' start-up uploads (snapshot, schema; SeaweedFS allocates a bucket's
            # volumes on its first write) land before the window, not in it.
            poller.active.set()
            deadline = time.monotonic() + lag.START_TIMEOUT
            while not poller.snapshot():
                if time.monotonic() > deadline:
                    raise SystemExit(f"{tool}: no initial objects under {prefix}")
                time.sleep(0.05)
            time.sleep(1.0)
        ls_cpu0 = proc_cpu(litestream.pid) if litestream else 0.0
        start = time.monotonic() + 0.3
        if mode == "sparse":
            rng = random.Random(seed)
            times = [start + rng.uniform(*lag.GAP_RANGE)]
            while len(times) < args.sparse:
                times.append(times[-1] + rng.uniform(*lag.GAP_RANGE))
            for i, w in enumerate(writers):
                w.send({"times": times[i::procs], "seed": seed})
            seconds = times[-1] - start
        else:
            for w in writers:
                w.send({"start": start, "seconds": seconds, "rate": rate, "seed": seed})
        replies = [w.reply() for w in writers]
        commits = sorted((c for r in replies for c in r["commits"]), key=lambda c: c[0])
        cpu = sum(r["cpu"] for r in replies)
        if tool != "plain":
            deadline = time.monotonic() + SETTLE
            while time.monotonic() < deadline:
                poller.poll_once()
                last = durable_of(tool, commits[-1], poller, index, headers)
                if last == last and (index is None or index.drained()):  # not NaN
                    break
                time.sleep(0.05)
        ls_cpu = proc_cpu(litestream.pid) - ls_cpu0 if litestream else 0.0
        for w in writers:
            w.send({"op": "stop"})
        for w in writers:
            w.proc.wait(30)
        poller.poll_once()
        seen = poller.snapshot()
        stored = sum(poller.sizes[k] for k in poller._list())
        put = sum(poller.sizes.values())
        lags = []
        if tool != "plain":
            lags = [durable_of(tool, c, poller, index, headers, seen) - c[0] for c in commits]
        errors = (index.errors if index else []) + (headers.errors if headers else [])
    walb = wal_bytes(commits)
    missing = sum(1 for x in lags if x != x)
    found = [x for x in lags if x == x]
    result = {
        "tool": tool,
        "procs": procs,
        "mode": mode,
        "commits": len(commits),
        "commits_per_s": len(commits) / seconds,
        "writer_cpu_s": cpu,
        "litestream_cpu_s": ls_cpu,
        "wal_bytes": walb,
        "put_bytes": put,
        "stored_bytes": stored,
        "lag_ms": {k: v * 1000 for k, v in lag.summary(found).items()} if found else None,
        "never_durable": missing,
        "slowest": sorted(
            (
                (round(x * 1000, 1), int(c[4]), round(c[0] - commits[0][0], 2))
                for x, c in zip(lags, commits[: len(lags)], strict=True)
                if x == x
            ),
            reverse=True,
        )[:3],  # (ms, writer, s into the run)
        "errors": errors[:3],
    }
    if tool == "walsync":
        result["restore_equal"] = restores_equal(db, f"s3://{lag.BUCKET}/walsync/{name}", env)
    return result


def durable_of(
    tool: str,
    commit: list[float],
    poller: SizedPoller,
    index: SegmentIndex | None,
    headers: lag.LtxHeaders | None,
    seen: dict[str, float] | None = None,
) -> float:
    seen = poller.snapshot() if seen is None else seen
    if tool == "walsync":
        assert index is not None
        return durable_walsync(commit, index, seen)
    assert headers is not None
    return durable_litestream(commit, seen, headers.snapshot(poller.prefix))


def restores_equal(db: Path, url: str, env: dict[str, str]) -> bool:
    """The latest restore of the walsync arm's replica holds exactly the database's rows."""
    out = db.with_suffix(".restored")
    proc = subprocess.run(
        [sys.executable, "-m", "walsync_vfs", "restore", url, "-o", str(out), "--force"],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        print(f"  ! restore failed: {proc.stderr.strip()}", flush=True)
        return False
    rows = []
    for path in (db, out):
        con = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
        rows.append(con.execute("SELECT id, w, payload FROM t ORDER BY id").fetchall())
        con.close()
    return rows[0] == rows[1]


# ------------------------------------------------------------------------------- the bench


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    for name in seaweedfs.FOREIGN_ENV:
        os.environ.pop(name, None)
    workdir = Path(tempfile.mkdtemp(prefix="walsync-multiproc-"))
    results = []
    arms = ["walsync", "litestream", "plain"]
    with ExitStack() as stack:
        if not args.keep:
            stack.callback(shutil.rmtree, workdir, True)
        server = stack.enter_context(seaweedfs.running(workdir / "seaweedfs"))
        server.new_bucket(lag.BUCKET)
        env = server.env()
        print(f"SeaweedFS at {server.endpoint}; work dir {workdir}", flush=True)
        k = 0
        for procs in args.procs:
            for mode, seconds in (("sparse", 0.0), ("paced", args.paced), ("flat", args.flat)):
                if mode not in args.modes:
                    continue
                order = arms[k % 3 :] + arms[: k % 3]
                k += 1
                for tool in order:
                    if mode == "sparse" and tool == "plain":
                        continue
                    r = run_arm(tool, procs, mode, seconds, k, server, env, workdir, args)
                    results.append(r)
                    print(line(r), flush=True)
    return results


def line(r: dict[str, Any]) -> str:
    text = f"{r['tool']:10} {r['procs']} procs {r['mode']:5} {r['commits']:6} commits"
    text += f" {r['commits_per_s']:8.1f}/s cpu {r['writer_cpu_s'] + r['litestream_cpu_s']:6.2f} s"
    if r["lag_ms"]:
        lm = r["lag_ms"]
        text += f"  lag median {lm['median']:7.1f} p99 {lm['p99']:7.1f} ms"
        text += f"  put/wal {r['put_bytes'] / max(r['wal_bytes'], 1):5.2f}"
        text += f" stored/wal {r['stored_bytes'] / max(r['wal_bytes'], 1):5.2f}"
    if r["never_durable"]:
        text += f"  never durable: {r['never_durable']}"
    if "restore_equal" in r:
        text += f"  restore {'equal' if r['restore_equal'] else 'DIFFERS'}"
    return text


def summarize(results: list[dict[str, Any]]) -> bool:
    """Replication cost against the plain arm of the same configuration, and the targets."""
    ok = True
    print("\nreplication cost against plain apsw in the same configuration:")
    for r in results:
        if r["tool"] == "plain" or r["mode"] == "sparse":
            continue
        base = next(
            b for b in results
            if b["tool"] == "plain" and (b["procs"], b["mode"]) == (r["procs"], r["mode"])
        )  # fmt: skip
        per = (r["writer_cpu_s"] + r["litestream_cpu_s"]) / max(r["commits"], 1)
        base_per = base["writer_cpu_s"] / max(base["commits"], 1)
        print(
            f"  {r['tool']:10} {r['procs']} procs {r['mode']:5}: replication CPU "
            f"{(per - base_per) * 1e6:7.1f} us/commit, throughput "
            f"{r['commits_per_s'] / base['commits_per_s']:5.2f}x plain"
        )
        if r["tool"] == "walsync":
            lm = r["lag_ms"] or {"median": float("inf"), "p99": float("inf")}
            stored = r["stored_bytes"] / max(r["wal_bytes"], 1)
            good = stored <= TARGET_BYTES_RATIO and r["restore_equal"] and not r["never_durable"]
            ok &= good
    for r in results:
        if r["tool"] == "walsync" and r["mode"] == "sparse":
            lm = r["lag_ms"] or {"median": float("inf"), "p99": float("inf")}
            ok &= lm["median"] <= TARGET_MEDIAN_MS and lm["p99"] <= TARGET_P99_MS
    print(
        f"\nwalsync targets (sparse: median <= {TARGET_MEDIAN_MS} ms, p99 <= {TARGET_P99_MS} ms; "
        f"stored/WAL <= {TARGET_BYTES_RATIO}; restores equal): {'met' if ok else 'MISSED'}"
    )
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="1 and 4 writers, 16 sparse commits, 8 s paced, 4 s flat",
    )
    p.add_argument("--sparse", type=int, help="sparse commits per run (default 40)")
    p.add_argument("--modes", default="sparse,paced,flat", help="which modes to run")
    p.add_argument("--procs", help="writer process counts (default 1,4,8)")
    p.add_argument("--paced", type=float, help="paced window, s (default 20)")
    p.add_argument("--flat", type=float, help="flat-out window, s (default 10)")
    p.add_argument("--rate", type=float, default=10.0, help="paced commits per s per writer")
    p.add_argument("--poll", type=float, default=0.005, help="LIST poll period, s")
    p.add_argument("--litestream", default=None, help="litestream binary")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--json", help="write the numbers to this file")
    p.add_argument("--writer", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.writer:
        tool, db, replica, wid = args.writer
        writer_main(tool, db, replica, int(wid))
        return
    args.procs = [int(x) for x in (args.procs or ("1,4" if args.quick else "1,4,8")).split(",")]
    args.sparse = args.sparse or (16 if args.quick else 40)
    args.modes = args.modes.split(",")
    args.paced = args.paced or (8.0 if args.quick else 20.0)
    args.flat = args.flat or (4.0 if args.quick else 10.0)
    args.litestream = args.litestream or seaweedfs.tool_path("litestream")
    results = run(args)
    ok = summarize(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
