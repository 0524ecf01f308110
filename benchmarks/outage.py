"""Object-store outage (issue 6): an app keeps writing while SeaweedFS is frozen with SIGSTOP.

One app child process writes through ``vfs="walsync"`` at a steady rate (``--rate`` commits/s,
one ``--row-bytes`` random blob each, ``synchronous=NORMAL``) to an S3 replica on a SeaweedFS
server started for the run (tests/seaweedfs.py).  The run has three phases:

* **before** (``--baseline`` s): replication works; this is the baseline of every ratio;
* **during** (``--seconds`` s): SeaweedFS is frozen with SIGSTOP.  Half-way through, the app
  calls ``walsync_vfs.flush(--flush-timeout)`` from a side thread, which must raise, not hang;
* **after** (``--after`` s): SIGCONT, the app goes on writing; *catch-up* is the time from
  SIGCONT until every commit made up to SIGCONT is in the replica (``stats()``).

Measured: commit latency p50/p99/max per phase (ratios during/before and after/before),
commits that failed (must be 0), commits more than 100 ms behind schedule, the app's RSS
(``/proc/PID/status`` VmRSS, sampled by this process every 0.2 s, and VmHWM) against its
level before the outage, unsent bytes in memory (``stats()`` pending) against ``memory_cap``,
bytes in the spool directory (summed on disk by this process) against ``spool_cap``.  At the
end the app flushes and closes; the replica is restored with ``python -m walsync_vfs
restore`` and must pass ``PRAGMA integrity_check`` and hold the same rows as the source
(count and SHA-256 over all rows).

Usage: ``python benchmarks/outage.py [--quick] [--seconds S] [--baseline S] [--after S]
[--rate R] [--row-bytes B] [--memory-cap MiB] [--spool-cap MiB] [--json FILE] [--keep]``
``--quick`` is the short variant: 8 s outage, 5 s before and after, a 4 MiB memory cap so the
spool is used.  Exits 1 if a verdict fails.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

import apsw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import seaweedfs  # the SeaweedFS launcher the tests use
from lag import Child, pct

PHASES = ("before", "during", "after")
LATE = 0.1  # s behind schedule that counts a commit as late
SLOW = 0.005  # s: commits slower than this are counted (autocheckpoints take about this long)
SAMPLE = 0.2  # s between RSS / spool samples
MIB = 1 << 20
BLOCKED_RATIO = 5.0  # verdict: slowest commit during the outage / slowest before
CATCH_UP_LIMIT = 300.0  # s after SIGCONT before catch-up counts as failed


# ---------------------------------------------------------------------------- the app child


class App:
    """The child: a writer thread at a steady rate, phases switched by the parent."""

    def __init__(self, db: str, replica: str, args: argparse.Namespace) -> None:
        import walsync_vfs

        self.ws = walsync_vfs
        self.args = args
        options: dict[str, Any] = {"spool_dir": args.spool_dir}
        if args.memory_cap:
            options["memory_cap"] = int(args.memory_cap * MIB)
        if args.spool_cap:
            options["spool_cap"] = int(args.spool_cap * MIB)
        walsync_vfs.configure(replica=replica, **options)
        self.con = apsw.Connection(db, vfs="walsync")
        self.con.execute("PRAGMA synchronous=NORMAL")
        self.con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
        walsync_vfs.flush(timeout=60)
        self.phase = "before"
        self.commits: dict[str, list[tuple[float, float, float]]] = {p: [] for p in PHASES}
        self.failed: dict[str, list[str]] = {p: [] for p in PHASES}
        self.pending_max = dict.fromkeys(PHASES, 0)
        self.flush_result: dict[str, Any] = {}
        self.catch_up: dict[str, Any] = {}
        self._halt = threading.Event()
        self._writer = threading.Thread(target=self._write, name="writer")
        self._sampler = threading.Thread(target=self._sample, name="sampler", daemon=True)
        self._watcher = threading.Thread(target=self._watch_catch_up, name="catch-up")

    def _write(self) -> None:
        """One commit every 1/rate s on a fixed schedule: (scheduled, start, duration)."""
        t0, k = time.monotonic(), 0
        while not self._halt.is_set():
            due = t0 + k / self.args.rate
            time.sleep(max(0.0, due - time.monotonic()))
            phase, start = self.phase, time.monotonic()
            try:
                self.con.execute("INSERT INTO t(v) VALUES(randomblob(?))", (self.args.row_bytes,))
                self.commits[phase].append((due, start, time.monotonic() - start))
            except apsw.Error as exc:
                self.failed[phase].append(f"{type(exc).__name__}: {exc}")
            k += 1

    def _sample(self) -> None:
        while not self._halt.wait(0.5):
            pending = sum(s["pending_bytes"] for s in self.ws.stats())
            self.pending_max[self.phase] = max(self.pending_max[self.phase], pending)

    def _flush_during(self) -> None:
        t0 = time.monotonic()
        try:
            self.ws.flush(timeout=self.args.flush_timeout)
            self.flush_result = {"raised": None, "seconds": time.monotonic() - t0}
        except Exception as exc:  # noqa: BLE001 - what it raises is the result
            self.flush_result = {
                "raised": f"{type(exc).__name__}: {exc}",
                "seconds": time.monotonic() - t0,
            }

    def _watch_catch_up(self) -> None:
        """From SIGCONT until every commit made up to then is replicated."""
        t0 = time.monotonic()
        (state,) = self.ws.stats()
        target, behind = state["last_txid"], state["last_txid"] - state["replicated_txid"]
        while (state := self.ws.stats()[0])["replicated_txid"] < target:
            if time.monotonic() - t0 > CATCH_UP_LIMIT:
                return
            time.sleep(0.05)
        self.catch_up = {
            "seconds": time.monotonic() - t0,
            "txids": behind,
            "errors": state["errors"],
        }

    def serve(self, inp: IO[str]) -> None:
        settings = self.ws._settings
        say(memory_cap=settings.memory_cap, spool_cap=settings.spool_cap)
        for line in inp:
            cmd = json.loads(line)
            if cmd == "start":
                self._writer.start()
                self._sampler.start()
            elif cmd == "during":
                self.phase = "during"
            elif cmd == "flush":
                threading.Thread(target=self._flush_during, name="flush", daemon=True).start()
            elif cmd == "after":
                self.phase = "after"
                self._watcher.start()
            elif cmd == "stop":
                break
            say(ok=cmd)
        self._halt.set()
        self._writer.join()
        self._watcher.join()  # before the final flush, which would hurry the uploads
        t0 = time.monotonic()
        self.ws.flush(timeout=600)
        final_flush = time.monotonic() - t0
        (state,) = self.ws.stats()
        self.con.close()
        say(
            commits=self.commits,
            failed=self.failed,
            pending_max=self.pending_max,
            flush=self.flush_result,
            catch_up=self.catch_up,
            final_flush=final_flush,
            stats=state,
            rss_hwm_kib=proc_status(os.getpid())["VmHWM"],
        )


def say(**obj: object) -> None:
    print(json.dumps(obj), flush=True)


# ------------------------------------------------------------------------------- the parent


def proc_status(pid: int) -> dict[str, int]:
    """The kB fields of /proc/PID/status (VmRSS, VmHWM, ...)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                out[key] = int(rest.split()[0])
    return out


def dir_bytes(path: Path) -> int:
    total = 0
    for entry in os.scandir(path):
        with contextlib.suppress(FileNotFoundError):  # shipped and removed meanwhile
            total += entry.stat().st_size
    return total


class Sampler(threading.Thread):
    """The app's RSS and the spool directory's size, from outside the app, per phase."""

    def __init__(self, pid: int, spool: Path) -> None:
        super().__init__(name="sampler", daemon=True)
        self.pid, self.spool = pid, spool
        self.phase = "before"
        self.rss: dict[str, list[int]] = {p: [] for p in PHASES}
        self.spool_max = dict.fromkeys(PHASES, 0)
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(SAMPLE):
            try:
                self.rss[self.phase].append(proc_status(self.pid)["VmRSS"])
            except (OSError, KeyError):
                return  # the app has exited (a zombie has no VmRSS)
            self.spool_max[self.phase] = max(self.spool_max[self.phase], dir_bytes(self.spool))

    def stop(self) -> None:
        self._halt.set()
        self.join()


def command(app: Child, cmd: str) -> dict[str, Any]:
    app.send(cmd)
    return app.reply()


def rows_digest(path: Path) -> tuple[int, str, str]:
    """(rows, SHA-256 over all rows, integrity_check) of a database no process has open."""
    con = apsw.Connection(str(path))
    h, n = hashlib.sha256(), 0
    for rid, v in con.execute("SELECT id, v FROM t ORDER BY id"):
        h.update(rid.to_bytes(8, "big") + v)
        n += 1
    check = con.execute("PRAGMA integrity_check").fetchone()[0]
    con.close()
    return n, h.hexdigest(), check


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="walsync-outage-"))
    result: dict[str, Any] = {"args": vars(args), "workdir": str(workdir)}
    with ExitStack() as stack:
        if not args.keep:
            stack.callback(shutil.rmtree, workdir, True)
        server = stack.enter_context(seaweedfs.running(workdir / "seaweedfs"))
        replica = f"s3://{server.new_bucket()}/outage"
        db, spool = workdir / "app.db", workdir / "spool"
        spool.mkdir()
        argv = [
            "--child",
            str(db),
            "--replica",
            replica,
            "--spool-dir",
            str(spool),
            "--rate",
            str(args.rate),
            "--row-bytes",
            str(args.row_bytes),
            "--flush-timeout",
            str(args.flush_timeout),
        ]
        for knob in ("memory_cap", "spool_cap"):
            if getattr(args, knob):
                argv += [f"--{knob.replace('_', '-')}", str(getattr(args, knob))]
        app = Child(__file__, argv, server.env(), workdir / "app.log")
        stack.callback(seaweedfs.stop_process, app.proc)
        result["caps"] = app.reply()
        print(f"SeaweedFS pid {server.pid}, app pid {app.proc.pid}; work dir {workdir}", flush=True)
        sampler = Sampler(app.proc.pid, spool)
        sampler.start()
        command(app, "start")
        time.sleep(args.baseline)

        sampler.phase = "during"
        command(app, "during")
        os.kill(server.pid, signal.SIGSTOP)
        stack.callback(os.kill, server.pid, signal.SIGCONT)  # never leave it frozen
        print(f"SeaweedFS stopped for {args.seconds:g} s", flush=True)
        time.sleep(args.seconds / 2)
        command(app, "flush")
        time.sleep(args.seconds / 2)
        os.kill(server.pid, signal.SIGCONT)
        sampler.phase = "after"
        command(app, "after")
        print("SeaweedFS resumed", flush=True)
        time.sleep(args.after)

        report = command(app, "stop")
        app.proc.wait(60)
        sampler.stop()
        server.check_alive()
        out = workdir / "restored.db"
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "walsync_vfs", "restore", f"{replica}/app.db", "-o", str(out)],
            capture_output=True,
            text=True,
            env=server.env(),
        )
        restore_s = time.monotonic() - t0
        if proc.returncode:
            raise SystemExit(f"restore failed: {proc.stderr}")
        result.update(
            report=report,
            rss_kib=sampler.rss,
            spool_max=sampler.spool_max,
            source=rows_digest(db),
            restored=rows_digest(out),
            restore_s=restore_s,
            db_bytes=db.stat().st_size,
            app_log=[ln for ln in app.log_path.read_text().splitlines() if "walsync" in ln],
        )
    return result


def summarize(result: dict[str, Any], args: argparse.Namespace) -> bool:
    """Print the tables and verdicts; True when every verdict passes."""
    rep = result["report"]
    lat = {p: [d for _, _, d in rep["commits"][p]] for p in PHASES}
    late = {p: sum(s - due > LATE for due, s, _ in rep["commits"][p]) for p in PHASES}
    stat = {p: {q: pct(lat[p], q) for q in (50, 90, 99, 100)} for p in PHASES}
    base = stat["before"]
    print(f"\ncommit latency (ms), {args.rate:g} commits/s of {args.row_bytes} random bytes:")
    print(
        f"{'phase':8}{'commits':>8}{'failed':>7}{'late':>5}{'p50':>7}{'p90':>7}{'p99':>7}"
        f"{'max':>7}{'>5ms':>6}{'p50 x':>7}{'p90 x':>7}{'p99 x':>7}{'max x':>7}"
    )
    for p in PHASES:
        s, slow = stat[p], sum(d > SLOW for d in lat[p])
        print(
            f"{p:8}{len(lat[p]):>8}{len(rep['failed'][p]):>7}{late[p]:>5}"
            + "".join(f"{s[q] * 1e3:>7.2f}" for q in s)
            + f"{slow:>6}"
            + "".join(f"{s[q] / base[q]:>7.2f}" for q in s)
        )

    memory_cap, spool_cap = result["caps"]["memory_cap"], result["caps"]["spool_cap"]
    rss = result["rss_kib"]
    rss_before = max(rss["before"]) / 1024
    rss_peak = max(rss["during"] + rss["after"]) / 1024
    print(f"\nmemory: memory_cap {memory_cap / MIB:.0f} MiB, spool_cap {spool_cap / MIB:.0f} MiB")
    print(
        f"  app RSS before the outage (max) {rss_before:.1f} MiB; peak during/after "
        f"{rss_peak:.1f} MiB (+{rss_peak - rss_before:.1f} MiB = "
        f"{(rss_peak - rss_before) * MIB / memory_cap:.2f} x memory_cap); "
        f"VmHWM {rep['rss_hwm_kib'] / 1024:.1f} MiB"
    )
    for p in PHASES:
        print(
            f"  {p:7} unsent in memory max {rep['pending_max'][p] / MIB:7.1f} MiB; "
            f"spool on disk max {result['spool_max'][p] / MIB:7.1f} MiB"
        )
    fl, cu = rep["flush"], rep["catch_up"]
    print(
        f"\nflush(timeout={args.flush_timeout:g}) mid-outage: "
        f"{fl.get('raised') or 'returned'} after {fl.get('seconds', float('nan')):.2f} s"
    )
    print(
        f"catch-up after SIGCONT: {cu.get('seconds', float('nan')):.1f} s for "
        f"{cu.get('txids', 0)} commits; errors counted by stats() {cu.get('errors')}"
    )
    print(
        f"final flush {rep['final_flush']:.2f} s; generation {rep['stats']['generation']}; "
        f"last txid {rep['stats']['last_txid']}; db {result['db_bytes'] / 1e6:.1f} MB, "
        f"restored in {result['restore_s']:.1f} s"
    )
    reasons = Counter(
        re.sub(r"\(attempt \d+\)|retrying in [\d.]+s", "", ln) for ln in result["app_log"]
    )
    print(
        f"app log: {len(result['app_log'])} walsync lines" + (", most frequent:" if reasons else "")
    )
    for text, n in reasons.most_common(6):
        print(f"  {n:4} x {text[:150]}")
    src, got = result["source"], result["restored"]
    print(
        f"source {src[0]} rows sha256 {src[1][:16]}; restored {got[0]} rows "
        f"sha256 {got[1][:16]}, integrity_check {got[2]}"
    )

    failed = sum(len(v) for v in rep["failed"].values())
    spooled = max(result["spool_max"].values())
    verdicts = [
        (f"commits failed = 0 ({failed})", failed == 0),
        (
            f"no commit blocked: max during / max before <= {BLOCKED_RATIO:g} "
            f"({stat['during'][100] / base[100]:.2f})",
            stat["during"][100] / base[100] <= BLOCKED_RATIO,
        ),
        (
            f"unsent bytes in memory <= memory_cap ({rep['pending_max']['during'] / MIB:.1f} MiB)",
            rep["pending_max"]["during"] <= memory_cap,
        ),
        (f"spool bytes <= spool_cap ({spooled / MIB:.1f} MiB)", spooled <= spool_cap),
        (
            "flush(timeout) raised within timeout + 1 s",
            bool(fl.get("raised")) and fl["seconds"] <= args.flush_timeout + 1,
        ),
        ("caught up after SIGCONT", bool(cu)),
        ("restore equals the source, integrity_check ok", got == src and got[2] == "ok"),
    ]
    print()
    for text, ok in verdicts:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    return all(ok for _, ok in verdicts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="8 s outage, 5 s before/after, 4 MiB cap")
    p.add_argument("--seconds", type=float, help="outage length, s (default 60)")
    p.add_argument("--baseline", type=float, help="writes before the outage, s (default 20)")
    p.add_argument("--after", type=float, help="writes after SIGCONT, s (default 20)")
    p.add_argument("--rate", type=float, default=40.0, help="commits per second")
    p.add_argument("--row-bytes", type=int, default=40_000, help="random bytes per commit")
    p.add_argument("--memory-cap", type=float, help="MiB (default: the package's, 64)")
    p.add_argument("--spool-cap", type=float, help="MiB (default: the package's, 1024)")
    p.add_argument("--flush-timeout", type=float, default=2.0, help="s, the mid-outage flush")
    p.add_argument("--json", help="write the raw numbers to this file")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--replica", help=argparse.SUPPRESS)
    p.add_argument("--spool-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        App(args.child, args.replica, args).serve(sys.stdin)
        return
    quick = args.quick
    args.seconds = args.seconds or (8.0 if quick else 60.0)
    args.baseline = args.baseline or (5.0 if quick else 20.0)
    args.after = args.after or (5.0 if quick else 20.0)
    if quick and args.memory_cap is None:
        args.memory_cap = 4.0
    print(
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f}",
        flush=True,
    )
    result = run(args)
    ok = summarize(result, args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
