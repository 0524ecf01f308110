"""Replication lag and PUT rate (issue 3): walsync_vfs against Litestream on one SeaweedFS.

*Lag* is the time from a COMMIT returning in the application to the transaction being
restorable from the object store, i.e. to the first LIST, made by an independent boto3 client,
that shows an object containing it.  *PUT rate* is how many objects each tool writes per
minute while an application commits at a constant rate.

Setup (one run, one SeaweedFS S3 server on free loopback ports, one bucket):

* walsync: a writer child process opens its database with ``vfs="walsync"`` and default knobs
  (``upload_interval=1``, ``upload_burst=4``).  The benchmark's own process only polls; with
  the writer in-process, the poller's boto3 work would hold the GIL that walsync's capture and
  upload threads need, and inflate the very latency being measured.
* Litestream: a writer child process with a plain apsw connection in WAL mode, and
  ``litestream replicate -config`` (default sync and monitor intervals, 1 s each) as another
  child.  Both tools' children get ``AWS_CA_BUNDLE`` removed from their environment.

Mapping a commit to the object that makes it restorable:

* walsync: commit ``k`` of a writer has txid ``base + k`` (``base`` read from
  ``walsync_vfs.stats()`` after setup, checked against ``last_txid`` at the end); it is
  restorable once a key ``.../seg/<first>-<last>.wseg`` with ``last >= txid`` is listed.
* Litestream numbers its own transactions: one TXID per L0 LTX file, and one L0 file holds
  every SQLite commit its 1 s sync found in the WAL, so counting commits goes wrong as soon as
  two commits fall into one sync.  Instead, after each commit the writer records where that
  commit ends in the ``-wal`` file (WAL salts, byte offset past its commit frame), and the
  benchmark reads the 100-byte header of every new L0 file (``WALOffset``, ``WALSize``,
  ``WALSalt1/2``): the commit is in the first L0 file of its WAL generation whose byte range
  reaches its end offset.  A few samples are printed next to the naive count-based guess.

"First seen" is the time the LIST reply arrived (an upper bound on when the object became
visible); its resolution is the poll period (5 ms) plus one LIST round trip, both printed.

Scheduling: sparse writes, where milliseconds matter, run the tools *alternately* in blocks
of ``--block`` commits (order ABBA), each block starting after the other tool's last commit
is restorable, and only the active tool's prefix is polled.  Each tool thus has the machine
to itself while its latency is measured, yet slow drifts (other tenants, page cache) hit both
alike, and both replay the same seeded gap sequence.  Constant writes, where the output is an
object count, run both tools *at the same time* for one window.  PUTs are counted as new keys
in the tool's prefix whose first sighting falls in the window (LIST diff, polled every 5 ms,
union of keys ever seen, so objects later deleted by compaction still count); Litestream's
L1+ compaction outputs count too.  The LIST counts are cross-checked against the PUTs each
tool actually issued: walsync's traced ``put`` calls, Litestream's debug log.

For walsync the writer also traces, without changing the package, when the capture
dispatcher delivered each commit, when its segment was encoded, and when its PUT started and
returned, which splits the lag into capture / upload scheduling / encode / PUT / detection.

Usage: ``python benchmarks/lag.py [--quick] [--commits N] [--rate R] [--duration S]
[--block B] [--seed S] [--poll S] [--json FILE] [--keep]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import apsw
from botocore.client import BaseClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import seaweedfs  # the SeaweedFS launcher the tests use

BUCKET = "lag"
GAP_RANGE = (0.3, 2.3)
START_TIMEOUT = 30.0  # s for the first objects of each tool to show
SETTLE_TIMEOUT = 30.0
SCHEMA = "CREATE TABLE IF NOT EXISTS events(id INTEGER PRIMARY KEY, ts REAL, payload BLOB)"
INSERT = "INSERT INTO events(ts, payload) VALUES (?, ?)"
TARGET_MEDIAN_MS = 30.0
TARGET_P99_MS = 150.0
STEADY_AFTER = 5.0  # s into the constant window before the steady-state PUT rate

WSEG_KEY = re.compile(r"/seg/([0-9a-f]{16})-([0-9a-f]{16})(?:\.e[0-9a-f]+)?\.wseg$")
WSNAP_KEY = re.compile(r"/snapshot/([0-9a-f]{16})(?:\.e[0-9a-f]+)?\.wsnap$")
WALSYNC_KEY = re.compile(r"\.ws(?:eg|nap)$")
LTX_KEY = re.compile(r"/([0-9a-f]{4})/([0-9a-f]{16})-([0-9a-f]{16})\.ltx$")
LS_PUT_LOG = re.compile(r'^time=(\S+) .*s3\.method=PUT s3\.url="[^"]*?/' + BUCKET + r'/([^"?]+)')


# ---------------------------------------------------------------------- watching the bucket


class Poller(threading.Thread):
    """LISTs one prefix every ``interval`` while active; remembers when each key first showed.

    Keys are never forgotten, so objects a tool deletes later (compaction) still count.
    """

    def __init__(
        self,
        client: BaseClient,
        prefix: str,
        interval: float,
        on_new: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(name=f"poll {prefix}", daemon=True)
        self.client = client
        self.prefix = prefix
        self.interval = interval
        self.on_new = on_new
        self.seen: dict[str, float] = {}  # key -> monotonic time the first LIST showing it returned
        self.rtts: list[float] = []
        self.errors = 0
        self.active = threading.Event()
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self.seen)

    def stop(self) -> None:
        self._halt.set()
        self.active.set()
        self.join()

    def poll_once(self) -> None:
        t0 = time.monotonic()
        try:
            keys = self._list()
        except Exception:  # noqa: BLE001 - a failed poll only costs resolution; counted
            self.errors += 1
            return
        t1 = time.monotonic()
        self.rtts.append(t1 - t0)
        with self._lock:
            new = [k for k in keys if k not in self.seen]
            for k in new:
                self.seen[k] = t1
        if self.on_new:
            for k in new:
                self.on_new(k)

    def _list(self) -> list[str]:
        args: dict[str, Any] = {"Bucket": BUCKET, "Prefix": self.prefix}
        keys: list[str] = []
        while True:
            page = self.client.list_objects_v2(**args)
            keys.extend(o["Key"] for o in page.get("Contents", ()))
            if not page.get("IsTruncated"):
                return keys
            args["ContinuationToken"] = page["NextContinuationToken"]

    def run(self) -> None:
        while not self._halt.is_set():
            if not self.active.is_set():
                self.active.wait(0.05)
                continue
            t0 = time.monotonic()
            self.poll_once()
            time.sleep(max(0.0, t0 + self.interval - time.monotonic()))


@dataclass(frozen=True)
class LtxHeader:
    """The fields of an LTX header (superfly/ltx ``Header.MarshalBinary``) we map with."""

    level: int
    min_txid: int
    max_txid: int
    wal_offset: int
    wal_size: int
    salts: tuple[int, int]


class LtxHeaders(threading.Thread):
    """Reads the header of every new Litestream L0 file soon after it appears.

    At once rather than at the end: Litestream deletes L0 files after compaction and
    ``l0-retention``, and the block scheduler needs the mapping live.
    """

    def __init__(self, client: BaseClient) -> None:
        super().__init__(name="ltx headers", daemon=True)
        self.client = client
        self.headers: dict[str, LtxHeader] = {}
        self.errors: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._lock = threading.Lock()

    def submit(self, key: str) -> None:
        m = LTX_KEY.search(key)
        if m and int(m.group(1), 16) == 0:
            self._queue.put(key)

    def snapshot(self, prefix: str = "") -> dict[str, LtxHeader]:
        """Headers of the L0 files under ``prefix`` (one database's replica)."""
        with self._lock:
            return {k: h for k, h in self.headers.items() if k.startswith(prefix)}

    def stop(self) -> None:
        self._queue.put(None)
        self.join()

    def run(self) -> None:
        while (key := self._queue.get()) is not None:
            try:
                body = self.client.get_object(Bucket=BUCKET, Key=key, Range="bytes=0-99")
                raw = body["Body"].read()
            except Exception as exc:  # noqa: BLE001 - reported as unmatched commits
                self.errors.append(f"{key}: {exc}")
                continue
            if raw[:4] != b"LTX1" or len(raw) < 72:
                self.errors.append(f"{key}: not an LTX header")
                continue
            mn, mx, _ts, _pre, off, size, s1, s2 = struct.unpack(">QQqQqqII", raw[16:72])
            m = LTX_KEY.search(key)
            assert m is not None
            with self._lock:
                self.headers[key] = LtxHeader(int(m.group(1), 16), mn, mx, off, size, (s1, s2))


# ------------------------------------------------------------------------- writer children


class WalTail:
    """Where the last committed transaction ends in a ``-wal`` file: (salt1, salt2, offset).

    Frames belong to the current WAL generation while their salts match the header's; after
    a WAL restart, stale frames of the old generation follow with other salts.
    """

    def __init__(self, db_path: str) -> None:
        self.path = db_path + "-wal"
        self.salts: tuple[int, int] | None = None
        self.scanned = 32
        self.end = 32

    def read(self) -> tuple[int, int, int]:
        with open(self.path, "rb") as f:
            hdr = f.read(32)
            _magic, _ver, page_size, _ckpt, s1, s2 = struct.unpack(">6I", hdr[:24])
            if (s1, s2) != self.salts:
                self.salts, self.scanned, self.end = (s1, s2), 32, 32
            frame = 24 + page_size
            size = os.fstat(f.fileno()).st_size
            while self.scanned + frame <= size:
                f.seek(self.scanned)
                _pgno, commit, fs1, fs2 = struct.unpack(">4I", f.read(16))
                if (fs1, fs2) != self.salts:
                    break
                self.scanned += frame
                if commit:
                    self.end = self.scanned
        return s1, s2, self.end


class WalsyncTrace:
    """Timestamps inside the walsync writer, taken by wrapping (not changing) the package."""

    def __init__(self) -> None:
        self.dispatch: list[float] = []  # capture dispatcher handed a COMMIT to the engine
        self.encodes: list[tuple[float, float, int, int]] = []  # start, end, first, last txid
        self.puts: list[tuple[str, float, float, bool]] = []  # key, start, end, succeeded

    def install(self) -> None:
        """Wrap the dispatcher's sink, the segment encoder and the S3 puts; call before open."""
        from walsync_vfs import capture
        from walsync_vfs import format as wformat
        from walsync_vfs.storage.s3 import S3ReplicaClient

        disp = capture.dispatcher()
        engine_sink = disp.default
        assert engine_sink is not None

        def sink(records: Iterable[capture.Record]) -> None:
            now = time.monotonic()
            self.dispatch.extend(now for r in records if r.kind is capture.Kind.COMMIT)
            engine_sink(records)

        disp.default = sink
        encode = wformat.encode_segment

        def traced_encode(*args: Any, **kwargs: Any) -> wformat.Encoded:
            t0 = time.monotonic()
            data = encode(*args, **kwargs)
            commits = kwargs.get("commits", args[1] if len(args) > 1 else None)
            self.encodes.append((t0, time.monotonic(), commits[0].txid, commits[-1].txid))
            return data

        wformat.encode_segment = traced_encode
        put = S3ReplicaClient.put

        def traced_put(client: S3ReplicaClient, key: str, data: bytes) -> None:
            t0, ok = time.monotonic(), False
            try:
                put(client, key, data)
                ok = True
            finally:
                self.puts.append((key, t0, time.monotonic(), ok))

        S3ReplicaClient.put = traced_put  # type: ignore[method-assign]
        put_many = S3ReplicaClient.put_many

        def traced_put_many(
            client: S3ReplicaClient,
            objects: Sequence[tuple[str, bytes]],
            sha256: Sequence[str | None] | None = None,
        ) -> list[Exception | None]:
            t0 = time.monotonic()
            results = put_many(client, objects, sha256)
            t1 = time.monotonic()
            done = zip(objects, results, strict=True)
            self.puts.extend((k, t0, t1, r is None) for (k, _), r in done)
            return results

        S3ReplicaClient.put_many = traced_put_many  # type: ignore[method-assign]

    def reset(self) -> None:
        self.dispatch.clear()
        self.encodes.clear()
        self.puts.clear()

    def dump(self) -> dict[str, Any]:
        return {"dispatch": self.dispatch, "encodes": self.encodes, "puts": self.puts}


def writer_main(tool: str, db: str, replica: str) -> None:
    """Child process: one database, commands on stdin, JSON replies on stdout.

    Times are ``time.monotonic()``: CLOCK_MONOTONIC, shared by all processes on Linux.
    """
    out = sys.stdout

    def send(obj: object) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    trace: WalsyncTrace | None = None
    wal: WalTail | None = None
    if tool == "walsync":
        import walsync_vfs

        walsync_vfs.configure(replica=replica)  # default upload_interval / upload_burst
        trace = WalsyncTrace()
        trace.install()
        con = apsw.Connection(db, vfs="walsync")
    else:
        con = apsw.Connection(db)
        con.set_busy_timeout(5000)  # the same as walsync sets; Litestream takes locks too
        con.execute("PRAGMA journal_mode=WAL")
    con.execute(SCHEMA)
    base = 0
    if trace is not None:
        walsync_vfs.flush(30)
        base = walsync_vfs.stats()[0]["last_txid"]
        trace.reset()
    else:
        wal = WalTail(db)
    send({"ready": True, "base_txid": base})

    count = 0

    def commit() -> dict[str, Any]:
        nonlocal count
        con.execute(INSERT, (time.time(), os.urandom(32)))
        t = time.monotonic()
        count += 1
        rec: dict[str, Any] = {"t": t, "txid": base + count}
        if wal is not None:
            rec["wal"] = wal.read()
        return rec

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "sparse":
            commits = []
            for gap in cmd["gaps"]:
                time.sleep(gap)
                commits.append(commit())
            send({"commits": commits})
        elif cmd["op"] == "constant":
            t0, n = cmd["start"], int(cmd["rate"] * cmd["duration"])
            commits = []
            for i in range(n):
                time.sleep(max(0.0, t0 + i / cmd["rate"] - time.monotonic()))
                commits.append(commit())
            send({"commits": commits})
        elif cmd["op"] == "stop":
            reply: dict[str, Any] = {"commits": count}
            if trace is not None:
                walsync_vfs.flush(60)
                st = walsync_vfs.stats()[0]
                reply.update(
                    trace=trace.dump(),
                    last_txid=st["last_txid"],
                    replicated_txid=st["replicated_txid"],
                    base_txid=base,
                )
            con.close()
            send(reply)
            return


class Child:
    """Parent-side handle of a child running ``script``: one JSON object a line each way,
    its stderr in ``log`` (shown when it dies)."""

    def __init__(self, script: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        with log.open("wb") as err:
            self.proc: subprocess.Popen[str] = subprocess.Popen(
                [sys.executable, script, *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
                text=True,
                bufsize=1,
            )

    def _io(self) -> tuple[IO[str], IO[str]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        return self.proc.stdin, self.proc.stdout

    def send(self, obj: object) -> None:
        self._io()[0].write(json.dumps(obj) + "\n")
        self._io()[0].flush()

    def reply(self) -> dict[str, Any]:
        line = self._io()[1].readline()
        if not line:
            self.proc.wait(5)
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise SystemExit(f"{self.log_path.stem} child died:\n{tail}")
        return json.loads(line)


class Writer(Child):
    """Parent-side handle of a writer child."""

    def __init__(self, tool: str, db: Path, replica: str, env: dict[str, str], log: Path) -> None:
        super().__init__(
            __file__, ["--writer", tool, "--db", str(db), "--replica", replica], env, log
        )
        self.tool = tool
        self.db = db
        self.base_txid = 0

    def ready(self) -> None:
        self.base_txid = self.reply()["base_txid"]

    def close(self) -> None:
        seaweedfs.stop_process(self.proc)


# -------------------------------------------------------------------------------- analysis


@dataclass
class Commit:
    t: float
    txid: int
    wal: tuple[int, int, int] | None = None
    restorable: float | None = None  # monotonic time first seen in the bucket
    ltx_txid: int | None = None  # Litestream's TXID holding this commit

    @property
    def lag(self) -> float | None:
        return None if self.restorable is None else self.restorable - self.t


def walsync_restorable(commit: Commit, seen: dict[str, float]) -> float | None:
    """Segments upload in order, one at a time: any segment reaching the txid means it is in."""
    times = [
        t
        for key, t in seen.items()
        if (m := WSEG_KEY.search(key)) and int(m.group(2), 16) >= commit.txid
    ]
    return min(times, default=None)


def ltx_txid_of(commit: Commit, headers: Iterable[LtxHeader]) -> int | None:
    """Litestream's TXID for a commit: the first L0 file of its WAL generation whose WAL byte
    range reaches the commit's end (see module docstring)."""
    assert commit.wal is not None
    s1, s2, end = commit.wal
    for h in sorted(headers, key=lambda h: h.max_txid):
        if h.salts == (s1, s2) and h.wal_offset < end <= h.wal_offset + h.wal_size:
            return h.max_txid
    return None


def litestream_restorable(
    commit: Commit, seen: dict[str, float], headers: dict[str, LtxHeader]
) -> float | None:
    if commit.ltx_txid is None:
        commit.ltx_txid = ltx_txid_of(commit, headers.values())
        if commit.ltx_txid is None:
            return None
    times = [
        t
        for key, t in seen.items()
        if (m := LTX_KEY.search(key)) and int(m.group(3), 16) >= commit.ltx_txid
    ]
    return min(times, default=None)


def pct(values: list[float], q: float) -> float:
    """Percentile with linear interpolation between order statistics (numpy's default)."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": pct(values, 50),
        "p90": pct(values, 90),
        "p99": pct(values, 99),
        "max": max(values, default=float("nan")),
    }


def ms(x: float) -> str:
    return f"{x * 1000:8.1f}"


# ------------------------------------------------------------------------------ the run


@dataclass
class Side:
    """One tool on one workload: its writer, its prefix poller and the commits made."""

    tool: str
    writer: Writer
    poller: Poller
    commits: list[Commit] = field(default_factory=list)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.headers: LtxHeaders | None = None

    def restorable(self, side: Side, commit: Commit) -> float | None:
        if commit.restorable is None:
            seen = side.poller.snapshot()
            if side.tool == "walsync":
                commit.restorable = walsync_restorable(commit, seen)
            else:
                assert self.headers is not None
                commit.restorable = litestream_restorable(
                    commit, seen, self.headers.snapshot(side.poller.prefix)
                )
        return commit.restorable

    def settle(self, side: Side, commit: Commit) -> bool:
        """Wait until ``commit`` is restorable (or give up after SETTLE_TIMEOUT)."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while self.restorable(side, commit) is None:
            if time.monotonic() > deadline:
                print(
                    f"  ! {side.tool}: txid {commit.txid} not restorable after "
                    f"{SETTLE_TIMEOUT:.0f}s",
                    flush=True,
                )
                return False
            time.sleep(0.02)
        return True

    def wait_for_keys(self, side: Side, pattern: re.Pattern[str]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not any(pattern.search(k) for k in side.poller.snapshot()):
            if time.monotonic() > deadline:
                raise SystemExit(f"{side.tool}: no initial objects under {side.poller.prefix}")
            time.sleep(0.05)


def commits_of(reply: dict[str, Any]) -> list[Commit]:
    return [Commit(c["t"], c["txid"], tuple(c["wal"]) if "wal" in c else None)
            for c in reply["commits"]]  # fmt: skip


def litestream_config(dbs: dict[str, Path], endpoint: str) -> str:
    """Default sync-interval and monitor-interval (1 s each); only what S3 needs is set."""
    lines = ["logging:", "  level: debug", "  stderr: true", "dbs:"]
    for prefix, db in dbs.items():
        lines += [
            f"  - path: {db}",
            "    replicas:",
            "      - type: s3",
            f"        bucket: {BUCKET}",
            f"        path: {prefix}",
            f"        endpoint: {endpoint}",
            f"        region: {seaweedfs.REGION}",
            "        force-path-style: true",
        ]
    return "\n".join(lines) + "\n"


def litestream_puts(log: Path, wall_offset: float) -> list[tuple[str, float]]:
    """(key, monotonic time) of every PUT Litestream's debug log shows."""
    puts = []
    for line in log.read_text(errors="replace").splitlines():
        m = LS_PUT_LOG.match(line)
        if m:
            wall = datetime.fromisoformat(m.group(1)).timestamp()
            puts.append((m.group(2), wall - wall_offset))
    return puts


def run(args: argparse.Namespace) -> dict[str, Any]:
    for name in seaweedfs.FOREIGN_ENV:
        os.environ.pop(name, None)
    rng = random.Random(args.seed)
    gaps = [rng.uniform(*GAP_RANGE) for _ in range(args.commits)]
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="walsync-lag-"))
    workdir.mkdir(parents=True, exist_ok=True)
    bench = Bench(args)
    result: dict[str, Any] = {"args": vars(args), "workdir": str(workdir)}
    wall_offset = time.time() - time.monotonic()

    with ExitStack() as stack:
        if not args.keep and not args.dir:
            stack.callback(shutil.rmtree, workdir, True)
        server = stack.enter_context(seaweedfs.running(workdir / "seaweedfs"))
        print(f"SeaweedFS pid {server.pid} at {server.endpoint}; work dir {workdir}", flush=True)
        server.new_bucket(BUCKET)
        env = server.env()
        dbdir = workdir / "db"
        dbdir.mkdir()
        bench.headers = LtxHeaders(seaweedfs.client(server.endpoint))
        bench.headers.start()
        stack.callback(bench.headers.stop)

        sides: dict[tuple[str, str], Side] = {}
        for tool in ("walsync", "litestream"):
            for load in ("sparse", "constant"):
                db = dbdir / f"{tool}-{load}.db"
                replica = f"s3://{BUCKET}/walsync" if tool == "walsync" else ""
                writer = Writer(tool, db, replica, env, workdir / f"{tool}-{load}.log")
                stack.callback(writer.close)
                prefix = f"{tool}/{db.name}/"
                on_new = bench.headers.submit if tool == "litestream" else None
                poller = Poller(seaweedfs.client(server.endpoint), prefix, args.poll, on_new)
                poller.start()
                stack.callback(poller.stop)
                sides[tool, load] = Side(tool, writer, poller)
        for side in sides.values():
            side.writer.ready()

        ls_dbs = {f"litestream/{s.writer.db.name}": s.writer.db
                  for (tool, _), s in sides.items() if tool == "litestream"}  # fmt: skip
        config = workdir / "litestream.yml"
        config.write_text(litestream_config(ls_dbs, server.endpoint))
        ls_env = dict(env)  # AWS_CA_BUNDLE already gone from os.environ, hence from here
        ls_log = workdir / "litestream.log"
        with ls_log.open("wb") as log:
            litestream = subprocess.Popen(
                [args.litestream, "replicate", "-config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=ls_env,
            )
        stack.callback(seaweedfs.stop_process, litestream)
        print(f"litestream pid {litestream.pid}; writers ready", flush=True)
        for side in sides.values():
            side.poller.active.set()
        for side in sides.values():
            pattern = LTX_KEY if side.tool == "litestream" else WALSYNC_KEY
            bench.wait_for_keys(side, pattern)
        time.sleep(1.5)  # let Litestream's start-up uploads (snapshot, L0 of the schema) land
        for side in sides.values():
            side.poller.active.clear()

        # Sparse writes: alternating blocks, ABBA, only the writing tool's prefix polled.
        print(
            f"sparse: {args.commits} commits per tool, gaps U{GAP_RANGE} s, blocks of {args.block}",
            flush=True,
        )
        order = ("walsync", "litestream")
        for j, start in enumerate(range(0, args.commits, args.block)):
            for tool in order if j % 2 == 0 else order[::-1]:
                side = sides[tool, "sparse"]
                side.poller.active.set()
                side.writer.send({"op": "sparse", "gaps": gaps[start : start + args.block]})
                block = commits_of(side.writer.reply())
                side.commits.extend(block)
                bench.settle(side, block[-1])
                side.poller.active.clear()
            done = min(start + args.block, args.commits)
            print(f"  {done}/{args.commits} commits per tool", flush=True)

        # Constant writes: both tools at once, both prefixes polled.
        ws, ls = sides["walsync", "constant"], sides["litestream", "constant"]
        print(f"constant: {args.rate} tx/s for {args.duration} s, both tools at once", flush=True)
        for side in (ws, ls):
            side.poller.active.set()
        time.sleep(0.5)
        t0 = time.monotonic() + 0.5
        for side in (ws, ls):
            side.writer.send(
                {"op": "constant", "start": t0, "rate": args.rate, "duration": args.duration}
            )
        for side in (ws, ls):
            side.commits = commits_of(side.writer.reply())
        t1 = time.monotonic()
        for side in (ws, ls):
            bench.settle(side, side.commits[-1])
        time.sleep(1.5)  # objects after the window must not be counted; this only lets them show
        result["window"] = (t0, t1)

        stops = {}
        for key, side in sides.items():
            side.writer.send({"op": "stop"})
            stops[key] = side.writer.reply()
        for side in sides.values():
            side.poller.stop()
        seaweedfs.stop_process(litestream)
        for side in sides.values():  # a last look, after everything stopped
            side.poller.poll_once()
        seen = {key: side.poller.snapshot() for key, side in sides.items()}
        headers = bench.headers.snapshot(sides["litestream", "sparse"].poller.prefix)
        ls_puts = litestream_puts(ls_log, wall_offset)
        rtts = [r for s in sides.values() for r in s.poller.rtts]
        poll_errors = sum(s.poller.errors for s in sides.values())
        header_errors = list(bench.headers.errors)
        commits = {key: side.commits for key, side in sides.items()}
        for side in sides.values():  # final pass over every commit with all keys known
            for c in side.commits:
                bench.restorable(side, c)

    result.update(report(args, commits, seen, headers, stops, ls_puts, rtts, result["window"]))
    result["poll_errors"] = poll_errors
    result["header_errors"] = header_errors
    if poll_errors or header_errors:
        print(f"poll errors: {poll_errors}; LTX header errors: {header_errors[:3]}")
    return result


def report(
    args: argparse.Namespace,
    commits: dict[tuple[str, str], list[Commit]],
    seen: dict[tuple[str, str], dict[str, float]],
    headers: dict[str, LtxHeader],
    stops: dict[tuple[str, str], dict[str, Any]],
    ls_puts: list[tuple[str, float]],
    rtts: list[float],
    window: tuple[float, float],
) -> dict[str, Any]:
    """Print the tables and verdicts; return the numbers for --json."""
    out: dict[str, Any] = {}
    print()
    print(
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"litestream {litestream_version(args.litestream)}, load average at start / end "
        f"{args.load_start:.2f} / {os.getloadavg()[0]:.2f}"
    )
    out["lags"] = {f"{tool}-{load}": [c.lag for c in cs] for (tool, load), cs in commits.items()}
    print(
        f"LIST round trip (resolution of 'first seen', plus the {args.poll * 1000:.0f} ms "
        f"poll period): median {pct(rtts, 50) * 1000:.1f} ms, p99 {pct(rtts, 99) * 1000:.1f} "
        f"ms over {len(rtts)} polls"
    )

    # walsync bookkeeping check: commits counted == txids the engine assigned
    for load in ("sparse", "constant"):
        st = stops["walsync", load]
        expect = st["base_txid"] + st["commits"]
        if st["last_txid"] != expect or st["replicated_txid"] != expect:
            print(
                f"! walsync {load}: expected last txid {expect}, engine says "
                f"{st['last_txid']} (replicated {st['replicated_txid']})"
            )

    # ---- sparse lag
    print()
    print(
        f"Sparse writes: {args.commits} commits per tool, gaps uniform "
        f"{GAP_RANGE[0]}-{GAP_RANGE[1]} s, lag COMMIT -> restorable (ms)"
    )
    print(f"{'tool':<12}{'n':>4}{'median':>9}{'p90':>9}{'p99':>9}{'max':>9}  unmatched")
    sparse: dict[str, dict[str, float]] = {}
    for tool in ("walsync", "litestream"):
        cs = commits[tool, "sparse"]
        lags = [c.lag for c in cs if c.lag is not None]
        sparse[tool] = s = summary(lags)
        print(
            f"{tool:<12}{len(lags):>4}{ms(s['median'])}{ms(s['p90'])}{ms(s['p99'])}"
            f"{ms(s['max'])}  {len(cs) - len(lags)}"
        )
    ratio = {k: sparse["walsync"][k] / sparse["litestream"][k] for k in sparse["walsync"]}
    print(f"{'ratio w/l':<16}" + "".join(f"{ratio[k]:9.3f}" for k in ratio))
    out["sparse"] = sparse
    out["sparse_ratio"] = ratio

    breakdown = walsync_breakdown(commits["walsync", "sparse"], stops["walsync", "sparse"],
                                  seen["walsync", "sparse"])  # fmt: skip
    print()
    print("walsync sparse lag, split by component (ms):")
    print(f"{'component':<44}{'median':>9}{'p90':>9}{'p99':>9}{'max':>9}")
    for name, values in breakdown.items():
        s = summary(values)
        print(f"{name:<44}{ms(s['median'])}{ms(s['p90'])}{ms(s['p99'])}{ms(s['max'])}")
    out["walsync_breakdown"] = {k: summary(v) for k, v in breakdown.items()}

    out["litestream_mapping"] = mapping_samples(
        commits["litestream", "sparse"], headers, seen["litestream", "sparse"], args.samples
    )

    # ---- constant writes: PUTs
    t0, t1 = window
    minutes = (t1 - t0) / 60
    print()
    print(
        f"Constant writes: {args.rate} tx/s for {args.duration} s, both tools at once; "
        f"window {t1 - t0:.1f} s"
    )
    print(
        f"{'tool':<12}{'commits':>8}{'PUTs':>6}{'PUTs/min':>10}{'steady':>8}  "
        f"{'by kind (LIST diff)':<22}issued in window / total / unseen by LIST"
    )
    puts: dict[str, float] = {}
    steady: dict[str, float] = {}
    for tool in ("walsync", "litestream"):
        keys = seen[tool, "constant"]
        in_window = [k for k, t in keys.items() if t0 <= t <= t1]
        kinds: dict[str, int] = {}
        kind_of = put_kinds(keys)
        for k in in_window:
            kinds[kind_of[k]] = kinds.get(kind_of[k], 0) + 1
        prefix = f"{tool}/{tool}-constant.db/"
        if tool == "walsync":
            issued = [("walsync/" + k, end) for k, _, end, ok in
                      stops["walsync", "constant"]["trace"]["puts"] if ok]  # fmt: skip
        else:
            issued = [(k, t) for k, t in ls_puts if k.startswith(prefix)]
        issued_window = sum(1 for _, t in issued if t0 <= t <= t1)
        unseen = len({k for k, _ in issued} - set(keys))
        puts[tool] = len(in_window) / minutes
        late = sum(1 for t in keys.values() if t0 + STEADY_AFTER <= t <= t1)
        steady[tool] = late / ((t1 - t0 - STEADY_AFTER) / 60)
        kind_text = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
        print(
            f"{tool:<12}{len(commits[tool, 'constant']):>8}{len(in_window):>6}"
            f"{puts[tool]:>10.1f}{steady[tool]:>8.1f}  {kind_text:<22}"
            f"{issued_window} / {len(issued)} / {unseen}"
        )
    print(
        f"(steady = PUTs/min from {STEADY_AFTER:.0f} s into the window on, i.e. without the "
        "start of the busy spell)"
    )
    out["steady_puts_per_min"] = steady
    out["puts_per_min"] = puts
    print("lag under constant writes (ms):")
    for tool in ("walsync", "litestream"):
        lags = [c.lag for c in commits[tool, "constant"] if c.lag is not None]
        s = summary(lags)
        out[f"constant_lag_{tool}"] = s
        print(f"  {tool:<12} median {ms(s['median'])}  p99 {ms(s['p99'])}  max {ms(s['max'])}")

    # ---- verdicts
    w = sparse["walsync"]
    verdicts = [
        (f"walsync sparse median <= {TARGET_MEDIAN_MS:.0f} ms", w["median"] * 1000,
         w["median"] * 1000 <= TARGET_MEDIAN_MS),
        (f"walsync sparse p99 <= {TARGET_P99_MS:.0f} ms", w["p99"] * 1000,
         w["p99"] * 1000 <= TARGET_P99_MS),
        (f"walsync PUTs/min <= Litestream's ({puts['litestream']:.1f}), whole window",
         puts["walsync"], puts["walsync"] <= puts["litestream"]),
    ]  # fmt: skip
    print()
    for name, value, ok in verdicts:
        print(f"{'PASS' if ok else 'FAIL'}  {name}  ({value:.1f})")
    print(
        f"info  steady-state PUTs/min: walsync {steady['walsync']:.1f}, "
        f"Litestream {steady['litestream']:.1f}"
    )
    out["verdicts"] = {name: ok for name, _, ok in verdicts}
    return out


def put_kinds(keys: dict[str, float]) -> dict[str, str]:
    """Kind of each key: walsync segment, merged segment (compaction output: its range starts
    at or before the end of one seen earlier), snapshot; Litestream LTX level."""
    kinds, top = {}, 0
    for key, _ in sorted(keys.items(), key=lambda kv: kv[1]):
        if m := WSEG_KEY.search(key):
            first, last = int(m.group(1), 16), int(m.group(2), 16)
            kinds[key] = "merged seg" if first <= top else "seg"
            top = max(top, last)
        elif WSNAP_KEY.search(key):
            kinds[key] = "snapshot"
        else:
            m = LTX_KEY.search(key)
            kinds[key] = f"L{int(m.group(1), 16)}" if m else "other"
    return kinds


def walsync_breakdown(
    cs: list[Commit], stop: dict[str, Any], seen: dict[str, float]
) -> dict[str, list[float]]:
    """Per commit: where the time between COMMIT and 'first seen in a LIST' went."""
    trace = stop["trace"]
    base = stop["base_txid"]
    dispatch = trace["dispatch"]
    by_seg: dict[tuple[int, int], tuple[float, float]] = {}
    for key, p0, p1, ok in trace["puts"]:
        m = WSEG_KEY.search("/" + key)
        if m and ok:
            by_seg[int(m.group(1), 16), int(m.group(2), 16)] = (p0, p1)
    seen_seg = {}
    for key, t in seen.items():
        m = WSEG_KEY.search(key)
        if m:
            seen_seg[int(m.group(1), 16), int(m.group(2), 16)] = t
    parts: dict[str, list[float]] = {
        "capture: COMMIT -> dispatcher hands it over": [],
        "schedule: -> upload worker starts encoding": [],
        "encode: segment encode (zstd, sha256)": [],
        "put: encode end -> S3 PUT returned": [],
        "detect: PUT returned -> LIST shows it": [],
        "total": [],
    }
    names = list(parts)
    for c in cs:
        k = c.txid - base
        enc = next(((e0, e1, a, b) for e0, e1, a, b in trace["encodes"] if a <= c.txid <= b),
                   None)  # fmt: skip
        if k < 1 or k > len(dispatch) or enc is None or c.lag is None:
            continue
        seg = (enc[2], enc[3])
        if seg not in by_seg or seg not in seen_seg:
            continue
        d, (e0, e1), (_, p1) = dispatch[k - 1], enc[:2], by_seg[seg]
        for name, value in zip(
            names,
            (d - c.t, e0 - d, e1 - e0, p1 - e1, seen_seg[seg] - p1, c.lag),
            strict=True,
        ):
            parts[name].append(value)
    return parts


def mapping_samples(
    cs: list[Commit], headers: dict[str, LtxHeader], seen: dict[str, float], n: int
) -> dict[str, Any]:
    """Show how commits map to Litestream TXIDs, next to the naive 'one TXID per commit'."""
    l0 = sorted(headers.values(), key=lambda h: h.max_txid)
    first = cs[0].ltx_txid if cs and cs[0].ltx_txid is not None else 0
    naive_wrong = sum(
        1 for i, c in enumerate(cs) if c.ltx_txid is not None and c.ltx_txid != first + i
    )
    shared: dict[int, int] = {}
    for c in cs:
        if c.ltx_txid is not None:
            shared[c.ltx_txid] = shared.get(c.ltx_txid, 0) + 1
    multi = sum(v for v in shared.values() if v > 1)
    generations = len({c.wal[:2] for c in cs if c.wal})
    print()
    print(
        f"Litestream mapping: {len(cs)} commits -> {len(shared)} TXIDs; {multi} commits "
        f"shared an L0 file with another; naive 'TXID = first + i' wrong for {naive_wrong}; "
        f"{generations} WAL generation(s); {len(l0)} L0 headers read"
    )
    show = list(range(min(n, len(cs))))
    show += [i for i, c in enumerate(cs) if shared.get(c.ltx_txid or -1, 0) > 1][:4]
    print(
        f"{'#':>4}{'salt1':>12}{'wal end':>9}{'naive':>7}{'TXID':>6}  L0 file WAL range"
        f"{'':>12}lag ms"
    )
    for i in sorted(set(show)):
        c = cs[i]
        assert c.wal is not None
        h = next((h for h in l0 if h.max_txid == c.ltx_txid), None)
        rng = f"{h.wal_offset}+{h.wal_size}" if h else "-"
        lag = f"{c.lag * 1000:.1f}" if c.lag is not None else "-"
        print(
            f"{i:>4}{c.wal[0]:>12x}{c.wal[2]:>9}{first + i:>7}{c.ltx_txid or '-':>6}  "
            f"{rng:<28}{lag}"
        )
    return {"commits": len(cs), "txids": len(shared), "shared": multi, "naive_wrong": naive_wrong}


def litestream_version(binary: str) -> str:
    try:
        return subprocess.run([binary, "version"], capture_output=True, text=True,
                              timeout=10).stdout.strip()  # fmt: skip
    except OSError:
        return "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="15 sparse commits, 15 s constant")
    p.add_argument("--commits", type=int, help="sparse commits per tool (default 60)")
    p.add_argument("--duration", type=float, help="constant-writes window, s (default 60)")
    p.add_argument("--rate", type=float, default=20.0, help="constant writes, tx/s")
    p.add_argument("--block", type=int, default=5, help="sparse commits per alternation block")
    p.add_argument("--seed", type=int, default=3, help="seed of the gap sequence")
    p.add_argument("--poll", type=float, default=0.005, help="LIST poll period, s")
    p.add_argument("--samples", type=int, default=6, help="Litestream mapping samples shown")
    p.add_argument("--litestream", default=None, help="litestream binary")
    p.add_argument("--dir", help="work directory (kept); default a temporary one")
    p.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    p.add_argument("--json", help="write the numbers to this file")
    p.add_argument("--writer", help=argparse.SUPPRESS)
    p.add_argument("--db", help=argparse.SUPPRESS)
    p.add_argument("--replica", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.writer:
        writer_main(args.writer, args.db, args.replica)
        return
    args.commits = args.commits or (15 if args.quick else 60)
    args.duration = args.duration or (15.0 if args.quick else 60.0)
    args.litestream = args.litestream or seaweedfs.tool_path("litestream")
    args.load_start = os.getloadavg()[0]
    result = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
