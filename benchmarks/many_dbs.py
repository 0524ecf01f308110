"""Many databases in one process (issue 5): memory and CPU of replication as N grows.

One application child process writes N databases at 10 tx/s each (one small row per
transaction, one writer thread, commits spread evenly over time, round-robin over the
databases) for a fixed window.  The same app is measured three ways in one run, against one
SeaweedFS S3 server (started by ``tests/seaweedfs.py``, as for the tests and ``lag.py``):

* ``walsync``: ``import walsync_vfs``, ``configure(replica="s3://...")``, every connection
  opened with ``vfs="walsync"`` (default knobs);
* ``plain``: the same app without walsync (apsw, WAL): the baseline;
* ``litestream``: the plain app plus one ``litestream replicate`` process with a generated
  config listing the N databases (S3 endpoint, force-path-style; log level ``info`` rather
  than ``lag.py``'s ``debug``, so per-request logging does not inflate its CPU).

Why this shape: walsync runs inside the app, so its cost is what the app process pays beyond
the baseline (RSS(walsync) - RSS(plain) at the end of the window; CPU seconds over the window
from /proc/PID/stat utime+stime), while Litestream's cost is its own process.  Both apps use
``synchronous=NORMAL`` (the usual WAL setting) so the writer can keep up with 10*N tx/s.

After the walsync window the child flushes, and a sample of databases (all for N <= 20, else
20 random ones) is restored from S3 and compared row for row with the source.

Usage: ``python benchmarks/many_dbs.py [--quick] [--n 1,10,100] [--window S] [--rate R]
[--json FILE] [--keep]``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

import apsw

# benchmarks/lag.py (bucket, Litestream config) and tests/seaweedfs.py (the S3 server), loaded
# in the parent only: the app children must not import boto3 with them, or the baseline would
# carry its RSS.
lag: Any = None
seaweedfs: Any = None

SCHEMA = "CREATE TABLE IF NOT EXISTS events(id INTEGER PRIMARY KEY, ts REAL, payload BLOB)"
INSERT = "INSERT INTO events(ts, payload) VALUES (?, ?)"
MODES = ("walsync", "plain", "litestream")
WARMUP = 3.0  # s between the app being ready (and Litestream started) and the window
RESTORE_SAMPLE = 20
TARGET_RSS_MIB = {100: 40.0, 1000: 120.0}
TARGET_CPU_RATIO = 1 / 3  # walsync extra CPU / Litestream CPU at N=100
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- /proc readers


def cpu_seconds(pid: int, task: int | None = None) -> float:
    """utime + stime of one process (threads included) or of one of its threads, in seconds."""
    path = f"/proc/{pid}/stat" if task is None else f"/proc/{pid}/task/{task}/stat"
    raw = Path(path).read_text()
    fields = raw[raw.rindex(")") + 2 :].split()  # comm may contain spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each live thread, by native thread id."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = cpu_seconds(pid, int(task.name))
        except OSError:  # the thread ended meanwhile
            continue
    return out


def rss_mib(pid: int) -> float:
    """VmRSS: resident memory now, not the peak."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# ------------------------------------------------------------------------------- app child


def app_main(mode: str, dbdir: str, n: int, replica: str) -> None:
    """Child: opens N databases, then on ``go`` writes for the window; JSON lines on stdout."""
    out = sys.stdout

    def send(obj: object) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    walsync: Any = None
    if mode == "walsync":
        import walsync_vfs

        walsync_vfs.configure(replica=replica)
        walsync = walsync_vfs
    cons = []
    for i in range(n):
        path = os.path.join(dbdir, f"db{i:04d}.db")
        if walsync is not None:
            con = apsw.Connection(path, vfs="walsync")
        else:
            con = apsw.Connection(path)
            con.set_busy_timeout(5000)  # Litestream takes locks too
            con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        con.execute(SCHEMA)
        cons.append(con)
    if walsync is not None:
        walsync.flush(120)
    send({"ready": True, "pid": os.getpid()})

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "go":
            t0, rate, dur = cmd["start"], cmd["rate"] * n, cmd["duration"]
            total, late = int(rate * dur), 0
            for k in range(total):
                delay = t0 + k / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                elif delay < -0.1:
                    late += 1
                cons[k % n].execute(INSERT, (time.time(), os.urandom(32)))
            # Thread names by native id, so the parent can say where the CPU went (Python
            # 3.11 does not name OS threads).  Pool threads are grouped: "walsync-put_2" ->
            # "walsync-put".
            names = {t.native_id: t.name.split("_")[0] for t in threading.enumerate()}
            send({"commits": total, "late": late, "end": time.monotonic(), "threads": names})
        elif cmd["op"] == "stop":
            reply: dict[str, Any] = {}
            if walsync is not None:
                t = time.monotonic()
                walsync.flush(300)
                reply["flush_s"] = time.monotonic() - t
                st = walsync.stats()
                reply["errors"] = sum(1 for s in st if s.get("errors"))
            for con in cons:
                con.close()
            send(reply)
            return


class App:
    """Parent-side handle of an app child."""

    def __init__(self, mode: str, dbdir: Path, n: int, replica: str, env: dict[str, str],
                 log: Path) -> None:  # fmt: skip
        self.log = log.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--dir",
                str(dbdir),
                "--n",
                str(n),
                "--replica",
                replica,
            ],  # fmt: skip
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
            text=True,
        )
        self.pid = self.proc.pid

    def send(self, obj: object) -> None:
        stdin: IO[str] = self.proc.stdin  # type: ignore[assignment]
        stdin.write(json.dumps(obj) + "\n")
        stdin.flush()

    def reply(self) -> dict[str, Any]:
        stdout: IO[str] = self.proc.stdout  # type: ignore[assignment]
        line = stdout.readline()
        if not line:
            raise SystemExit(f"app child {self.pid} died; see {self.log.name}")
        return json.loads(line)

    def close(self) -> None:
        seaweedfs.stop_process(self.proc)
        self.log.close()


# ------------------------------------------------------------------------------ one run


def count_rows(path: Path) -> tuple[int, int]:
    """(rows, max id) of one database, read with the default VFS."""
    con = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        row = con.execute("SELECT count(*), coalesce(max(id), 0) FROM events").fetchone()
        assert row is not None
        return int(row[0]), int(row[1])
    finally:
        con.close()


def verify(n: int, dbdir: Path, root: str, outdir: Path, seed: int) -> dict[str, Any]:
    """Restore a sample of databases from S3 and compare rows with the source."""
    from walsync_vfs.restore import restore

    names = [f"db{i:04d}.db" for i in range(n)]
    sample = names if n <= RESTORE_SAMPLE else random.Random(seed).sample(names, RESTORE_SAMPLE)
    outdir.mkdir(parents=True, exist_ok=True)
    bad = []
    t = time.monotonic()
    for name in sample:
        out = outdir / name
        try:
            restore(root + "/" + name, str(out), force=True)
            got, want = count_rows(out), count_rows(dbdir / name)
        except Exception as exc:  # noqa: BLE001 - reported as a failed sample
            bad.append(f"{name}: {exc}")
            continue
        if got != want:
            bad.append(f"{name}: restored {got} != source {want}")
    return {"sampled": len(sample), "bad": bad, "seconds": time.monotonic() - t}


def run_mode(mode: str, n: int, args: argparse.Namespace, workdir: Path,
             server: Any, env: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    """One app child (and Litestream for ``litestream``) for one window; /proc numbers."""
    dbdir = workdir / f"n{n}-{mode}"
    dbdir.mkdir(parents=True)
    root = f"s3://{lag.BUCKET}/walsync-n{n}"
    res: dict[str, Any] = {"mode": mode, "n": n}
    with ExitStack() as stack:
        app = App(mode, dbdir, n, root, env, workdir / f"n{n}-{mode}.log")
        stack.callback(app.close)
        t = time.monotonic()
        app.reply()
        res["setup_s"] = time.monotonic() - t
        ls: subprocess.Popen[bytes] | None = None
        if mode == "litestream":
            dbs = {f"litestream-n{n}/{p.name}": p for p in sorted(dbdir.glob("*.db"))}
            config = workdir / f"litestream-n{n}.yml"
            text = lag.litestream_config(dbs, server.endpoint)
            config.write_text(text.replace("level: debug", "level: info", 1))
            with (workdir / f"litestream-n{n}.log").open("wb") as log:
                ls = subprocess.Popen(
                    [args.litestream, "replicate", "-config", str(config)],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                )  # fmt: skip
            stack.callback(seaweedfs.stop_process, ls)
        time.sleep(WARMUP)
        start = time.monotonic() + 0.2
        app.send({"op": "go", "start": start, "rate": args.rate, "duration": args.window})
        time.sleep(max(0.0, start - time.monotonic()))
        cpu0, threads0 = cpu_seconds(app.pid), thread_cpu(app.pid)
        ls_cpu0 = cpu_seconds(ls.pid) if ls else 0.0
        time.sleep(max(0.0, start + args.window - time.monotonic()))
        res["cpu_s"] = cpu_seconds(app.pid) - cpu0
        threads1 = thread_cpu(app.pid)
        res["rss_mib"] = rss_mib(app.pid)
        if ls is not None:
            res["ls_cpu_s"] = cpu_seconds(ls.pid) - ls_cpu0
            res["ls_rss_mib"] = rss_mib(ls.pid)
            if ls.poll() is not None:
                res["ls_exited"] = ls.returncode
        done = app.reply()
        res.update(commits=done["commits"], late=done["late"],
                   overrun_s=max(0.0, done["end"] - (start + args.window)))  # fmt: skip
        by_thread: dict[str, float] = {}
        for tid, cpu in threads1.items():
            name = done["threads"].get(str(tid), "other")
            by_thread[name] = by_thread.get(name, 0.0) + cpu - threads0.get(tid, 0.0)
        # Threads that ended in the window (compaction's, between its passes) are only in the
        # process's total.
        by_thread["ended threads"] = res["cpu_s"] - sum(by_thread.values())
        res["thread_cpu_s"] = by_thread
        app.send({"op": "stop"})
        res.update(app.reply())
    if mode == "walsync":
        res["verify"] = verify(n, dbdir, root, workdir / f"n{n}-restored", args.seed)
    return res


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    workdir = Path(tempfile.mkdtemp(prefix="walsync-many-"))
    results: list[dict[str, Any]] = []
    with ExitStack() as stack:
        if not args.keep:
            stack.callback(shutil.rmtree, workdir, True)
        server = stack.enter_context(seaweedfs.running(workdir / "seaweedfs"))
        server.new_bucket(lag.BUCKET)
        env = server.env()
        os.environ.clear()  # for restore in this process
        os.environ.update(env)
        print(f"SeaweedFS pid {server.pid} at {server.endpoint}; work dir {workdir}",
              flush=True)  # fmt: skip
        for n in args.n:
            for mode in MODES:
                r = run_mode(mode, n, args, workdir, server, env)
                results.append(r)
                extra = f", litestream cpu {r['ls_cpu_s']:.2f}s rss {r['ls_rss_mib']:.1f}MiB" \
                    if "ls_cpu_s" in r else ""  # fmt: skip
                print(f"  N={n} {mode}: cpu {r['cpu_s']:.2f}s rss {r['rss_mib']:.1f}MiB "
                      f"commits {r['commits']} late {r['late']}{extra}", flush=True)  # fmt: skip
    return results


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> bool:
    """The table and verdicts; returns whether every applicable target was met."""
    by = {(r["n"], r["mode"]): r for r in results}
    print(f"\nwindow {args.window:g} s, {args.rate:g} tx/s per db; load average "
          f"{os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs (shared machine)")  # fmt: skip
    head = (f"{'N':>5} {'RSS plain':>10} {'RSS ws':>8} {'extra RSS':>10} {'CPU plain':>10} "
            f"{'CPU ws':>8} {'extra CPU':>10} {'LS CPU':>8} {'LS RSS':>8} {'ratio':>7} "
            f"{'restore':>9}")  # fmt: skip
    print(head)
    ok = True
    verdicts = []
    for n in args.n:
        ws, pl, ls = by[n, "walsync"], by[n, "plain"], by[n, "litestream"]
        extra_rss = ws["rss_mib"] - pl["rss_mib"]
        extra_cpu = ws["cpu_s"] - pl["cpu_s"]
        ratio = extra_cpu / ls["ls_cpu_s"] if ls["ls_cpu_s"] > 0 else float("inf")
        v = ws["verify"]
        restore_ok = not v["bad"] and not ws.get("errors")
        print(f"{n:>5} {pl['rss_mib']:>9.1f}M {ws['rss_mib']:>7.1f}M {extra_rss:>9.1f}M "
              f"{pl['cpu_s']:>9.2f}s {ws['cpu_s']:>7.2f}s {extra_cpu:>9.2f}s "
              f"{ls['ls_cpu_s']:>7.2f}s {ls['ls_rss_mib']:>7.1f}M {ratio:>7.2f} "
              f"{v['sampled'] - len(v['bad']):>4}/{v['sampled']:<4}")  # fmt: skip
        split = sorted(ws["thread_cpu_s"].items(), key=lambda kv: -kv[1])
        print("      walsync app CPU by thread: "
              + ", ".join(f"{name} {cpu:.2f}s" for name, cpu in split if cpu >= 0.005)
              + f" (plain app: {sum(pl['thread_cpu_s'].values()):.2f}s)")  # fmt: skip
        for m in MODES:
            r = by[n, m]
            if r["late"] or r["overrun_s"] > 0.5:
                print(f"      note: {m} writer fell behind: {r['late']} commits >100 ms late, "
                      f"window overrun {r['overrun_s']:.1f}s")  # fmt: skip
        for bad in v["bad"][:5]:
            print(f"      restore mismatch: {bad}")
        ok &= restore_ok
        verdicts.append((f"N={n}: sampled restores equal the source", restore_ok))
        if n in TARGET_RSS_MIB:
            good = extra_rss <= TARGET_RSS_MIB[n]
            ok &= good
            verdicts.append((f"N={n}: extra RSS {extra_rss:.1f} MiB <= {TARGET_RSS_MIB[n]:g} MiB",
                             good))  # fmt: skip
        if n == 100:
            good = ratio <= TARGET_CPU_RATIO
            ok &= good
            verdicts.append((f"N=100: walsync extra CPU / Litestream CPU = {ratio:.2f} <= 0.33",
                             good))  # fmt: skip
    print("\nverdicts:")
    for text, good in verdicts:
        print(f"  [{'PASS' if good else 'FAIL'}] {text}")
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="10 s window instead of 70 s")
    p.add_argument("--n", default="1,10,100", help="comma-separated database counts")
    p.add_argument("--window", type=float, default=None, help="seconds of writing per mode")
    p.add_argument("--rate", type=float, default=10.0, help="tx/s per database")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--litestream", default=None, help="litestream binary")
    p.add_argument("--json", default=None, help="write raw results here")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--replica", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        app_main(args.child, args.dir, int(args.n), args.replica)
        return
    global lag, seaweedfs
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import lag as lag_module  # puts tests/ on sys.path for the launcher

    lag, seaweedfs = lag_module, lag_module.seaweedfs
    args.n = [int(x) for x in args.n.split(",")]
    if args.window is None:
        # 70 s: compaction first runs ~32 s after a database's first upload (32 small
        # segments), Litestream's L1 compaction every 30 s; a shorter window counts neither.
        args.window = 10.0 if args.quick else 70.0
    args.litestream = args.litestream or seaweedfs.tool_path("litestream")
    results = run(args)
    ok = report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
