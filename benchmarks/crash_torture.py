"""Crash torture (issue 6): SIGKILL a replicating writer at random moments, restore after each
kill and check that the replica never lost an acknowledged commit and never shows a state the
database was not in.

A writer child process runs random transactions through ``vfs="walsync"`` into a ``file://``
replica and prints an acknowledgement after every successful ``walsync_vfs.flush()``.  The
parent SIGKILLs it 0.05-0.6 s after spawning it (so kills land in the import, the open and its
sync point, a commit, an upload, a snapshot, a checkpoint or a VACUUM), restores the replica,
checks it, and starts the next child on the same database.  A reopen after a kill that left the
replica behind must either ship the missing commits from the WAL in the same generation (one
of them restoring to exactly what the kill left) or start a new generation.  A final
child runs without a kill; its restore must equal the source row for row and ``verify`` must
pass.

The workload makes "a state the database was in" checkable from the restored file alone:
every transaction appends rows with consecutive ``seq`` numbers to ``log``, and each log row
says what the transaction did to ``kv`` and ``bulk``.  A restore is sound when ``log`` holds
exactly seqs 1..k and replaying the log reproduces ``kv`` and ``bulk`` exactly.

With ``--processes N`` (N >= 2), N writers work on the database at once, as gunicorn workers
would: one of them leads and replicates every commit in the WAL (docs/MULTIPROCESS.md).  Each
cycle SIGKILLs one of them at random, leader or follower, restores while the others go on
writing, checks that the restore is a sound state holding every commit any writer had
acknowledged, and starts a replacement.  Each transaction reads the state it builds on inside
its write transaction.  A final unkilled writer's restore must equal the source row for row.

    python benchmarks/crash_torture.py                  # 100 cycles
    python benchmarks/crash_torture.py --cycles 8 --json summary.json
    python benchmarks/crash_torture.py --processes 4 --cycles 40

Exit status 0 only if every check of every cycle passed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import apsw

import walsync_vfs
from walsync_vfs import catalog, storage

if TYPE_CHECKING:
    from walsync_vfs.restore import Result

NAME = "torture.db"
KILL_MIN, KILL_MAX = 0.05, 0.6  # seconds after spawn
FLUSH_TIMEOUT = 60.0  # a flush slower than this is reported as a hang
FINAL_TIMEOUT = 300.0  # the unkilled final run must finish within this
MAX_BULK_TAGS = 3  # live bulk batches; keeps the database (and each snapshot) a few MB
IDLE_CHANCE = 0.15  # after an acknowledgement, pause 5-50 ms like an application between bursts
LIVE_RESTORE_TRIES = 5  # --processes: restores of a replica that is being compacted meanwhile
KEPT_FAILURES = 3  # post-mortem copies of the replica and source kept for the first failures

SCHEMA = """
BEGIN;
CREATE TABLE IF NOT EXISTS log(
    seq INTEGER PRIMARY KEY, op TEXT NOT NULL, k INTEGER, v TEXT, n INTEGER, m INTEGER);
CREATE TABLE IF NOT EXISTS kv(k INTEGER PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS bulk(id INTEGER PRIMARY KEY, tag INTEGER NOT NULL, v BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS bulk_tag ON bulk(tag);
COMMIT;
"""
TABLES = ("log", "kv", "bulk")
ROLLBACK_TAG = -1  # rows of a rolled-back (spilled) transaction; never in a sound state
# The engine's log line for a reopen that shipped commits a crash left in the WAL.
RECOVERED = re.compile(r"at txid (\d+) \(continued; (\d+) commits recovered from the WAL\)")

# Transaction kinds and weights; "checkpoint" and "vacuum" change no rows.
KINDS = {
    "insert": 30,
    "update": 20,
    "delete": 14,
    "mixed": 10,
    "bulk": 5,
    "bulkupd": 3,
    "bulkdel": 4,
    "rollback": 3,
    "checkpoint": 6,
    "vacuum": 1.5,
}
CHECKPOINT_MODES = ("PASSIVE", "RESTART", "TRUNCATE")


# ---------------------------------------------------------------------------- child: writer


class Writer:
    """One writer process's connection and what it knows of the database's state."""

    def __init__(self, con: apsw.Connection, rng: random.Random, shared: bool = False) -> None:
        self.con = con
        self.rng = rng
        self.shared = shared  # other processes write too: read the state in each transaction
        con.execute(SCHEMA)
        self.refresh()
        self.txns = 0  # transactions this process committed

    def refresh(self) -> None:
        con = self.con
        self.seq = con.execute("SELECT coalesce(max(seq), 0) FROM log").fetchone()[0]
        self.keys = [k for (k,) in con.execute("SELECT k FROM kv ORDER BY k")]
        self.tags = [t for (t,) in con.execute("SELECT DISTINCT tag FROM bulk ORDER BY tag")]

    def _log(
        self, op: str, k: int, v: str | None = None, n: int | None = None, m: int | None = None
    ) -> int:
        self.seq += 1
        self.con.execute("INSERT INTO log VALUES(?,?,?,?,?,?)", (self.seq, op, k, v, n, m))
        return self.seq

    def _value(self) -> str:
        return f"v{self.rng.getrandbits(64):x}-" + "x" * self.rng.randint(0, 200)

    def _small_op(self, kind: str) -> None:
        if kind == "update" and self.keys:
            k, v = self.rng.choice(self.keys), self._value()
            self.con.execute("UPDATE kv SET v = ? WHERE k = ?", (v, k))
            self._log("upd", k, v)
        elif kind == "delete" and self.keys:
            k = self.keys.pop(self.rng.randrange(len(self.keys)))
            self.con.execute("DELETE FROM kv WHERE k = ?", (k,))
            self._log("del", k)
        else:  # insert, or nothing to update/delete yet; the key is the row's own seq
            k, v = self.seq + 1, self._value()
            self._log("ins", k, v)
            self.con.execute("INSERT INTO kv VALUES(?, ?)", (k, v))
            self.keys.append(k)

    def _bulk_fill(self, tag: int, rows: int) -> None:
        self.con.execute(
            "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < ?) "
            "INSERT INTO bulk(tag, v) SELECT ?, randomblob(100 + abs(random()) % 300) FROM c",
            (rows, tag),
        )

    def _bulk_total(self, tag: int) -> tuple[int, int]:
        return self.con.execute(
            "SELECT count(*), coalesce(sum(length(v)), 0) FROM bulk WHERE tag = ?", (tag,)
        ).fetchone()

    def step(self, kind: str) -> bool:
        """Run one transaction (or checkpoint/VACUUM); True if it committed rows."""
        con, rng = self.con, self.rng
        if kind.startswith("checkpoint-"):
            con.execute(f"PRAGMA wal_checkpoint({kind.removeprefix('checkpoint-')})").fetchall()
            return False
        if kind == "vacuum":
            con.execute("VACUUM")
            return False
        big = kind in ("bulk", "bulkupd", "rollback")
        if big:
            con.execute("PRAGMA cache_size=5")  # the transaction spills dirty pages to the WAL
        try:
            con.execute("BEGIN IMMEDIATE")
            if self.shared:
                self.refresh()
                kind = self.feasible(kind)
            if kind == "rollback":
                self._bulk_fill(ROLLBACK_TAG, rng.randint(2000, 5000))
                con.execute("UPDATE kv SET v = 'rolled back' WHERE k % 7 = 0")
                con.execute("ROLLBACK")
                return False
            if kind == "bulk":
                tag = self.seq + 1
                self._bulk_fill(tag, rng.randint(2000, 5000))
                self._log("bulk", tag, None, *self._bulk_total(tag))
                self.tags.append(tag)
            elif kind == "bulkupd":
                tag = rng.choice(self.tags)
                con.execute(
                    "UPDATE bulk SET v = randomblob(100 + abs(random()) % 300) WHERE tag = ?",
                    (tag,),
                )
                self._log("bulkupd", tag, None, *self._bulk_total(tag))
            elif kind == "bulkdel":
                tag = self.tags.pop(0)
                con.execute("DELETE FROM bulk WHERE tag = ?", (tag,))
                self._log("bulkdel", tag)
            elif kind == "mixed":
                for _ in range(rng.randint(2, 6)):
                    self._small_op(rng.choice(("insert", "update", "delete")))
            else:
                self._small_op(kind)
            con.execute("COMMIT")
        finally:
            if big:
                con.execute("PRAGMA cache_size=-2000")
        self.txns += 1
        return True

    def next_kind(self) -> str:
        """A random step kind, resolved (e.g. ``checkpoint-RESTART``) so the parent's phase
        log names exactly what a kill interrupted."""
        kind = self.rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        if kind == "checkpoint":
            return f"checkpoint-{self.rng.choice(CHECKPOINT_MODES)}"
        return self.feasible(kind)

    def feasible(self, kind: str) -> str:
        """``kind``, or the bulk step the live tags allow instead."""
        if kind == "bulk" and len(self.tags) >= MAX_BULK_TAGS:
            return "bulkdel"
        if kind in ("bulkupd", "bulkdel") and not self.tags:
            return "bulk"
        return kind


def emit(line: str) -> None:
    """One protocol line to the parent; flushed, so it is in the pipe before the next step."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def generation() -> str:
    """The generation this process's commits are going to ("-" in a follower: the leader
    knows)."""
    return next((s["generation"] for s in walsync_vfs.stats() if s["name"] == NAME), "-")


def child_main(db: str, replica: str, seed: int, txns: int | None, shared: bool = False) -> int:
    """The writer: random transactions until killed, or ``txns`` of them, then a clean exit.

    Protocol lines: READY (imported), START <max seq> (opened), B <kind> (a step begins),
    C <seq> (committed), F (flush begins), ACK <seq> <txns> <generation> (everything up to
    seq, and this process's first txns transactions, is in the replica, whose lineage is now
    generation), I (an idle pause), DONE <seq>.  The engine's log goes to stderr.
    """
    logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(message)s")
    rng = random.Random(seed)
    spool = os.path.join(os.path.dirname(db), "spool")
    os.makedirs(spool, exist_ok=True)
    walsync_vfs.configure(replica=replica, upload_interval=0.0, spool_dir=spool)
    emit("READY")
    con = apsw.Connection(db, vfs="walsync")
    con.execute(f"PRAGMA synchronous={rng.choice(('NORMAL', 'FULL'))}")
    con.set_busy_timeout(60_000)
    w = Writer(con, rng, shared)
    emit(f"START {w.seq}")
    until_flush = rng.randint(1, 6)
    steps = 0
    while txns is None or steps < txns:
        kind = w.next_kind()
        emit(f"B {kind}")
        if w.step(kind):
            emit(f"C {w.seq}")
        steps += 1
        until_flush -= 1
        if until_flush <= 0:
            acked, n = w.seq, w.txns
            emit("F")
            walsync_vfs.flush(timeout=FLUSH_TIMEOUT)
            emit(f"ACK {acked} {n} {generation()}")
            until_flush = rng.randint(1, 6)
            if rng.random() < IDLE_CHANCE:  # everything is replicated: a kill now loses nothing
                emit("I")
                time.sleep(rng.uniform(0.005, 0.05))
    emit("F")
    walsync_vfs.flush(timeout=FLUSH_TIMEOUT)
    emit(f"ACK {w.seq} {w.txns} {generation()}")
    con.close()
    emit(f"DONE {w.seq}")
    return 0


# ------------------------------------------------------------------------- parent: checks


class Unsound(Exception):
    """A restored (or source) database is not a state the workload could have produced."""


def read_state(path: str) -> dict:
    """Check that the database at ``path`` is a sound workload state; return its summary.

    Sound: integrity_check ok, ``log`` holds exactly seqs 1..k, and replaying the log gives
    exactly the rows of ``kv`` and the per-tag counts and byte totals of ``bulk``.
    """
    con = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY, vfs="unix")
    try:
        problems = [r[0] for r in con.execute("PRAGMA integrity_check")]
        if problems != ["ok"]:
            raise Unsound(f"integrity_check: {problems[:3]}")
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_schema WHERE type='table'")}
        if not tables & set(TABLES):
            return {"k": 0, "rows": {}}
        if tables & set(TABLES) != set(TABLES):
            raise Unsound(f"only some tables exist: {sorted(tables)}")
        log = con.execute("SELECT seq, op, k, v, n, m FROM log ORDER BY seq").fetchall()
        for i, row in enumerate(log, 1):
            if row[0] != i:
                raise Unsound(f"log seqs are not 1..{len(log)}: position {i} holds seq {row[0]}")
        kv: dict[int, str] = {}
        bulk: dict[int, tuple[int, int]] = {}
        for seq, op, k, v, n, m in log:
            if op in ("ins", "upd") and (k in kv) == (op == "upd"):
                kv[k] = v
            elif op == "del" and k in kv:
                del kv[k]
            elif op in ("bulk", "bulkupd") and (op == "bulk") == (k not in bulk):
                bulk[k] = (n, m)
            elif op == "bulkdel" and k in bulk:
                del bulk[k]
            else:
                raise Unsound(f"log seq {seq} ({op} {k}) does not apply to the state before it")
        got_kv = dict(con.execute("SELECT k, v FROM kv"))
        if got_kv != kv:
            diff = sorted(set(got_kv.items()) ^ set(kv.items()))[:3]
            raise Unsound(f"kv differs from the log replay (k={len(log)}): e.g. {diff}")
        got_bulk = {
            t: (c, s)
            for t, c, s in con.execute(
                "SELECT tag, count(*), sum(length(v)) FROM bulk GROUP BY tag"
            )
        }
        if got_bulk != bulk:
            raise Unsound(f"bulk differs from the log replay (k={len(log)}): {got_bulk} != {bulk}")
        rows = {t: con.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in TABLES}
        return {"k": len(log), "rows": rows}
    finally:
        con.close()


def copy_source(db: str, out: str) -> str | None:
    """Copy the (closed) source database and its WAL, recover and checkpoint the copy; None if
    the first writer died before creating it.

    The source itself is never opened by the parent: a foreign connection closing it would
    checkpoint and drop its WAL, which the next writer's capture would see as an outside change.
    """
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(out + suffix):
            os.remove(out + suffix)
    if not os.path.exists(db):
        return None
    shutil.copyfile(db, out)
    if os.path.exists(db + "-wal"):
        shutil.copyfile(db + "-wal", out + "-wal")
    con = apsw.Connection(out, vfs="unix")
    try:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    finally:
        con.close()
    return out


def page_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def interrupted_puts(replica_dir: Path, seen: set[str]) -> Counter:
    """New temp files left by PUTs a kill interrupted, by object kind (snapshot or seg)."""
    found: Counter = Counter()
    for root, _dirs, files in os.walk(replica_dir):
        for f in files:
            path = os.path.join(root, f)
            if f.endswith(".walsync-tmp") and path not in seen:
                seen.add(path)
                found[os.path.basename(root)] += 1
    return found


@dataclass
class Run:
    """What the parent learned from one child's stdout."""

    lines: list[str] = field(default_factory=list)
    start_seq: int | None = None
    committed_seq: int = 0  # highest seq the child reported committed
    acked_seq: int = 0
    acked_txns: int = 0
    ack_generations: list[str] = field(default_factory=list)
    done: bool = False
    # From the engine's log: the reopen shipped this many commits it recovered from the WAL,
    # the last of them as this txid.
    recovered: int = 0
    recovered_txid: int = 0

    def parse(self) -> None:
        for line in self.lines:
            word, *rest = line.split() or [""]
            if word == "START":
                self.start_seq = int(rest[0])
                self.committed_seq = max(self.committed_seq, self.start_seq)
            elif word == "C":
                self.committed_seq = int(rest[0])
            elif word == "ACK":
                self.acked_seq, self.acked_txns = int(rest[0]), int(rest[1])
                if not self.ack_generations or self.ack_generations[-1] != rest[2]:
                    self.ack_generations.append(rest[2])
            elif word == "DONE":
                self.done = True

    @property
    def phase(self) -> str:
        """Where the kill landed, from the last line the child wrote."""
        if not self.lines:
            return "import"
        word, *rest = self.lines[-1].split()
        return {
            "READY": "open+sync point",
            "START": "between steps",
            "C": "between steps",
            "ACK": "between steps",
            "F": "flush (upload)",
            "I": "idle (all acked)",
            "B": f"step: {rest[0] if rest else '?'}",
        }.get(word, word)


@dataclass
class Summary:
    seed: int
    cycles: int = 0
    kills: int = 0
    generations: int = 0
    reopen_same_generation: int = 0
    reopen_recovered: int = 0  # of those, by shipping the commits the kill left in the WAL
    recovered_commits: int = 0
    recovered_unshipped: int = 0  # of those, killed before the recovered commits were uploaded
    reopen_new_generation: int = 0
    reopen_undecided: int = 0  # killed before the reopen's lineage decision was visible
    new_generation_while_nothing_lost: int = 0
    nothing_lost_cycles: list = field(default_factory=list)
    new_generations_mid_run: int = 0
    mid_run_cycles: list = field(default_factory=list)
    acked_txns: int = 0
    acked_seq: int = 0
    committed_seq: int = 0
    kills_mid_snapshot: int = 0
    kills_with_unreplicated_commits: int = 0
    restores: int = 0
    pitr_restores: int = 0
    failures: int = 0
    failure_details: list[dict] = field(default_factory=list)
    kill_phases: dict[str, int] = field(default_factory=dict)
    interrupted_puts: dict[str, int] = field(default_factory=dict)
    child_warnings: dict[str, int] = field(default_factory=dict)
    final_rows: dict[str, int] = field(default_factory=dict)
    final_byte_identical: bool | None = None
    verify_exit: int | None = None
    wall_seconds: float = 0.0
    work_dir: str = ""


class Torture:
    """The parent: spawn, kill, restore, check, repeat."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.dir = Path(args.dir or tempfile.mkdtemp(prefix="walsync-torture-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db = str(self.dir / NAME)
        self.replica_dir = self.dir / "replica"
        self.replica = self.replica_dir.as_uri()
        self.url = f"{self.replica}/{NAME}"
        self.summary = Summary(seed=args.seed, work_dir=str(self.dir))
        self.phases: Counter = Counter()
        self.puts: Counter = Counter()
        self.warnings: Counter = Counter()
        self.tmp_seen: set[str] = set()
        self.n_gens = 0
        self.last_gen: str | None = None
        self.last_k = 0  # highest seq a restore has held: restores never go back
        # The source as the last kill left it, and whether the replica was behind it then.
        self.left: dict | None = None
        self.behind: bool | None = None

    # ---------------------------------------------------------------- helpers

    def fail(self, cycle: int | str, what: str, child_seed: int | None = None) -> None:
        s = self.summary
        s.failures += 1
        detail = {"cycle": cycle, "seed": s.seed, "child_seed": child_seed, "error": what}
        s.failure_details.append(detail)
        print(f"FAILURE cycle {cycle} (--seed {s.seed}, child seed {child_seed}): {what}")
        if s.failures <= KEPT_FAILURES:
            keep = self.dir / f"failure-{cycle}"
            shutil.rmtree(keep, ignore_errors=True)
            # The replica may still change (other writers): keep what can be copied.
            with contextlib.suppress(shutil.Error):
                shutil.copytree(self.replica_dir, keep / "replica", dirs_exist_ok=True)
            for suffix in ("", "-wal"):
                if os.path.exists(self.db + suffix):
                    shutil.copyfile(self.db + suffix, keep / (NAME + suffix))
            print(f"  kept the replica and source as they were in {keep}")

    child_flags: tuple[str, ...] = ()  # ManyWriters: the writers share the database

    def spawn(self, child_seed: int, txns: int | None, err_path: Path) -> tuple:
        cmd = [sys.executable, __file__, "--child", self.db, self.replica, str(child_seed)]
        cmd += self.child_flags
        if txns is not None:
            cmd += ["--txns", str(txns)]
        err = err_path.open("w")
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True
        )
        run = Run()
        reader = threading.Thread(target=lambda: run.lines.extend(proc.stdout), daemon=True)
        reader.start()
        return proc, run, reader, err

    def restore(self, out: str, txid: int | None = None) -> Result:
        # Imported here: it costs the writer children 25 ms of startup (tqdm) they never use.
        from walsync_vfs.restore import restore

        return restore(self.url, out, txid=txid, force=True)

    def generations(self) -> list[catalog.Generation]:
        return catalog.generations(storage.open_replica(self.replica), NAME)

    def classify_reopen(self, cycle: int | str, run: Run, child_seed: int) -> None:
        """Did this run's reopen continue the lineage or start a new generation, and was that
        what the state left by the previous kill called for?  Also counts generations that
        began later in the run, which nothing in this workload should cause.

        A replica behind the source may continue only by shipping the missing commits from
        the WAL; one of them must then restore to exactly what the kill left."""
        before_n, before_id = self.n_gens, self.last_gen
        gens = self.generations()
        self.n_gens, self.last_gen = len(gens), (gens[-1].id if gens else None)
        grown = self.n_gens - before_n
        new = run.ack_generations[0] != before_id if run.ack_generations else grown > 0
        later = max(grown - new, len(run.ack_generations) - 1)
        s = self.summary
        if later > 0:
            s.new_generations_mid_run += later
            s.mid_run_cycles.append(cycle)
        if before_n == 0 or self.behind is None:
            return  # the first generation, or no kill checked yet: nothing to continue
        if new:
            s.reopen_new_generation += 1
            if not self.behind:
                s.new_generation_while_nothing_lost += 1
                s.nothing_lost_cycles.append(cycle)
        elif run.acked_seq or run.done or run.recovered:  # the reopen's sync had finished
            s.reopen_same_generation += 1
            if run.recovered and not self.behind:
                self.check_only_new_recovered(cycle, run, child_seed)
            elif run.recovered:
                s.reopen_recovered += 1
                s.recovered_commits += run.recovered
                # Recovered commits ship through the uploader after the sync: a kill before an
                # acknowledged flush may leave them in the WAL for the next reopen instead.
                if run.acked_seq or run.done or gens[-1].last_txid >= run.recovered_txid:
                    self.check_recovered(cycle, run, child_seed)
                else:
                    s.recovered_unshipped += 1
            elif self.behind:
                self.fail(cycle, "the reopen continued the lineage although commits were lost")
        else:
            s.reopen_undecided += 1

    def check_only_new_recovered(self, cycle: int | str, run: Run, child_seed: int) -> None:
        """The kill lost nothing, yet the reopen shipped commits from the WAL: they can only
        be the new writer's first ones (see check_recovered), so the txid before them must
        restore to exactly what the kill left."""
        if self.left is None:
            return
        out = str(self.dir / "recovered.db")
        before = run.recovered_txid - run.recovered
        try:
            self.restore(out, before)
            state = read_state(out)
        except Exception as exc:  # noqa: BLE001 - any failure to restore is a finding
            self.fail(cycle, f"restore --txid {before}: {type(exc).__name__}: {exc}", child_seed)
            return
        if state["rows"] != self.left["rows"]:
            self.fail(cycle, "the reopen recovered commits the replica already had", child_seed)

    def check_recovered(self, cycle: int | str, run: Run, child_seed: int) -> None:
        """One of the commits recovered from the WAL must restore to exactly the source the
        kill left (the last ones may be the new writer's first commits: the engine looks in
        the WAL under a second sync point, after the writer was let go)."""
        if self.left is None:
            return
        out = str(self.dir / "recovered.db")
        first = run.recovered_txid - run.recovered + 1
        for txid in range(run.recovered_txid, first - 1, -1):
            try:
                self.restore(out, txid)
                state = read_state(out)
            except Exception as exc:  # noqa: BLE001 - any failure to restore is a finding
                what = f"restore --txid {txid} (recovered): {type(exc).__name__}: {exc}"
                self.fail(cycle, what, child_seed)
                return
            if state["k"] <= self.left["k"]:
                break
        if state["rows"] != self.left["rows"]:
            self.fail(
                cycle,
                f"no recovered txid ({first}..{run.recovered_txid}) restores to the seq "
                f"{self.left['k']} the kill left (txid {txid} holds seq {state['k']})",
                child_seed,
            )

    def note_log(self, cycle: int | str, err_path: Path, run: Run, how: str) -> None:
        """Append the child's engine log and last protocol lines to children.log, for
        post-mortems; count its warnings and errors."""
        text = err_path.read_text(errors="replace")
        tail = " | ".join(line.strip() for line in run.lines[-4:])
        with open(self.dir / "children.log", "a") as log:
            log.write(f"=== cycle {cycle}: {how}; last lines: {tail}\n{text}")
        recovered = RECOVERED.search(text)
        if recovered:
            run.recovered_txid, run.recovered = int(recovered[1]), int(recovered[2])
        if text.rfind("differs from its replica") > text.rfind("(new generation)"):
            self.summary.kills_mid_snapshot += 1  # decided on a new generation, not yet stored
        for line in text.splitlines():
            if line.startswith(("DEBUG", "INFO")) or not line.strip():
                continue
            # Group by message shape: drop paths and numbers that differ per cycle.
            key = " ".join(w for w in line.split() if not any(c.isdigit() for c in w))
            self.warnings[key[:120]] += 1

    # ---------------------------------------------------------------- one cycle

    def check_after(self, cycle: int | str, run: Run, child_seed: int) -> dict | None:
        """Restore the replica as it is now and check it against acks and the source."""
        s = self.summary
        src = copy_source(self.db, str(self.dir / "source-copy.db"))
        try:
            source = read_state(src) if src else {"k": 0, "rows": {}}
        except Unsound as exc:
            self.fail(cycle, f"the source database itself is unsound: {exc}", child_seed)
            return None
        self.left = source
        if source["k"] < s.committed_seq:
            self.fail(
                cycle,
                f"the source lost commits: max seq {source['k']} < {s.committed_seq} reported "
                "committed",
                child_seed,
            )
        out = str(self.dir / "restored.db")
        try:
            result = self.restore(out)
        except Exception as exc:  # noqa: BLE001 - any failure to restore is a finding
            if s.acked_seq == 0 and "no replica" in str(exc):
                return {"k": 0, "identical": False, "source_k": source["k"]}
            self.fail(cycle, f"restore failed: {type(exc).__name__}: {exc}", child_seed)
            return None
        s.restores += 1
        try:
            restored = read_state(out)
        except Unsound as exc:
            self.fail(cycle, f"restore at txid {result.txid} is unsound: {exc}", child_seed)
            return None
        k = restored["k"]
        if k < s.acked_seq:
            self.fail(
                cycle,
                f"restore at txid {result.txid} holds seqs 1..{k}, but 1..{s.acked_seq} were "
                "acknowledged",
                child_seed,
            )
        if k < self.last_k:
            self.fail(cycle, f"restore went back from seq {self.last_k} to {k}", child_seed)
        self.last_k = max(self.last_k, k)
        # At seq 0 a replica without the tables is the sound state before the schema commit,
        # which a kill may leave unshipped (nothing was acknowledged).
        before_schema = k == 0 and not restored["rows"]
        if k > source["k"]:
            self.fail(cycle, f"restore holds seq {k}, the source only {source['k']}", child_seed)
        elif k == source["k"] and restored["rows"] != source["rows"] and not before_schema:
            self.fail(cycle, f"restore and source both end at seq {k} but rows differ", child_seed)
        self.check_pitr(cycle, k, child_seed)
        identical = src is not None and page_bytes(out) == page_bytes(src)
        s.kills_with_unreplicated_commits += not identical
        return {"k": k, "source_k": source["k"], "identical": identical}

    def check_pitr(self, cycle: int | str, latest_k: int, child_seed: int) -> None:
        """Restore one random earlier restore point: it must be sound and not ahead."""
        gens = [g for g in self.generations() if g.snapshots]
        if not gens:
            return
        g = self.rng.choice(gens)
        txid = self.rng.randint(g.snapshots[0].last_txid, g.last_txid)
        out = str(self.dir / "pitr.db")
        try:
            self.restore(out, txid)
            k = read_state(out)["k"]
        except Exception as exc:  # noqa: BLE001 - any failure to restore is a finding
            self.fail(cycle, f"restore --txid {txid}: {type(exc).__name__}: {exc}", child_seed)
            return
        self.summary.pitr_restores += 1
        if k > latest_k:
            self.fail(cycle, f"restore --txid {txid} holds seq {k} > latest {latest_k}", child_seed)

    def absorb(self, cycle: int | str, run: Run, child_seed: int) -> None:
        """Fold one run's acknowledgements into the totals, checking them against the past."""
        s = self.summary
        if run.start_seq is not None and run.start_seq < s.committed_seq:
            self.fail(
                cycle,
                f"the writer reopened at seq {run.start_seq} < {s.committed_seq} committed before",
                child_seed,
            )
        s.committed_seq = max(s.committed_seq, run.committed_seq)
        s.acked_seq = max(s.acked_seq, run.acked_seq)
        s.acked_txns += run.acked_txns

    def cycle(self, i: int) -> None:
        s = self.summary
        child_seed = self.rng.getrandbits(32)
        delay = self.rng.uniform(self.args.kill_min, self.args.kill_max)
        err_path = self.dir / "child.err"
        proc, run, reader, err = self.spawn(child_seed, None, err_path)
        t0 = time.monotonic()
        time.sleep(max(0.0, t0 + delay - time.monotonic()))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            s.kills += 1
        proc.wait()
        reader.join()
        err.close()
        run.parse()
        self.note_log(i, err_path, run, f"killed after {delay:.3f}s in {run.phase}")
        s.cycles += 1
        if proc.returncode != -signal.SIGKILL:
            tail = err_path.read_text(errors="replace").strip().splitlines()[-3:]
            self.fail(i, f"writer exited by itself ({proc.returncode}): {tail}", child_seed)
        self.phases[run.phase] += 1
        self.absorb(i, run, child_seed)
        self.puts.update(interrupted_puts(self.replica_dir, self.tmp_seen))
        self.classify_reopen(i, run, child_seed)
        state = self.check_after(i, run, child_seed)
        self.behind = None if state is None else not state["identical"]
        if self.args.verbose or i % 10 == 0:
            print(
                f"cycle {i}: kill after {delay:.3f}s in {run.phase}; acked seq {s.acked_seq}, "
                f"restored seq {state and state['k']} of {state and state['source_k']}, "
                f"generations {self.n_gens}, failures {s.failures}",
                flush=True,
            )

    def final(self) -> None:
        """One writer without a kill; its restore must equal the source row for row."""
        s = self.summary
        child_seed = self.rng.getrandbits(32)
        err_path = self.dir / "child.err"
        proc, run, reader, err = self.spawn(child_seed, self.args.final_txns, err_path)
        try:
            proc.wait(FINAL_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            self.fail("final", f"the unkilled writer did not finish in {FINAL_TIMEOUT}s (hang)")
        reader.join()
        err.close()
        run.parse()
        self.note_log("final", err_path, run, f"exit {proc.returncode}")
        if proc.returncode != 0 or not run.done:
            tail = err_path.read_text(errors="replace").strip().splitlines()[-3:]
            self.fail("final", f"the final writer failed ({proc.returncode}): {tail}", child_seed)
        self.absorb("final", run, child_seed)
        self.classify_reopen("final", run, child_seed)
        state = self.check_after("final", run, child_seed)
        if state is not None:
            src = str(self.dir / "source-copy.db")
            source = read_state(src)
            restored = read_state(str(self.dir / "restored.db"))
            if restored["rows"] != source["rows"]:
                self.fail("final", "the final restore differs from the source")
            s.final_rows = {t: len(r) for t, r in source["rows"].items()}
            s.final_byte_identical = state["identical"]
        verify = subprocess.run(
            [sys.executable, "-m", "walsync_vfs", "verify", self.url],
            capture_output=True,
            text=True,
            timeout=FINAL_TIMEOUT,
        )
        s.verify_exit = verify.returncode
        if verify.returncode != 0:
            self.fail("final", f"verify exited {verify.returncode}: {verify.stderr.strip()}")
        listing = subprocess.run(
            [sys.executable, "-m", "walsync_vfs", "list", self.url, "--json"],
            capture_output=True,
            text=True,
            timeout=FINAL_TIMEOUT,
        )
        if listing.returncode != 0:
            self.fail("final", f"list exited {listing.returncode}: {listing.stderr.strip()}")
        else:
            s.generations = len(json.loads(listing.stdout)["generations"])

    def run(self) -> Summary:
        t0 = time.monotonic()
        for i in range(1, self.args.cycles + 1):
            self.cycle(i)
        self.final()
        s = self.summary
        s.wall_seconds = round(time.monotonic() - t0, 1)
        s.kill_phases = dict(self.phases.most_common())
        s.interrupted_puts = dict(self.puts)
        s.child_warnings = dict(self.warnings.most_common(10))
        return s


def leader_pid(db: str) -> int:
    """The pid the shim's shared page names as the database's leader (csrc/walsync.c,
    WsShared: magic, seqlock, pid)."""
    try:
        with open(db + "-walsync", "rb") as f:
            return int.from_bytes(f.read(12)[8:12], sys.byteorder, signed=True)
    except OSError:
        return 0


class ManyWriters(Torture):
    """``--processes N``: N writers at once; each cycle kills one, leader or follower."""

    live_restore_races = 0
    child_flags = ("--shared",)

    def restore_live(self, out: str) -> None:
        """Restore while the other writers go on: a restore that keeps losing the race with
        compaction (every plan's objects merged away before it read them) is counted and
        tried again, not a finding about the replica's contents."""
        from walsync_vfs.restore import Vanished

        for _ in range(LIVE_RESTORE_TRIES - 1):
            try:
                self.restore(out)
                return
            except Vanished:
                self.live_restore_races += 1
        self.restore(out)

    def acked(self, runs: list[Run]) -> int:
        """The highest seq any writer acknowledged: every commit up to it is in the store
        (a writer's flush covers everything in the WAL before its own commits)."""
        for run in runs:
            run.parse()
        return max((run.acked_seq for run in runs), default=0)

    def run(self) -> Summary:
        t0 = time.monotonic()
        s, n = self.summary, self.args.processes
        live: dict[int, tuple] = {}
        finished: list[Run] = []
        kinds: Counter = Counter()

        def start(slot: int) -> None:
            seed = self.rng.randrange(1 << 31)
            live[slot] = (*self.spawn(seed, None, self.dir / f"writer-{slot}-{seed}.err"), seed)

        for slot in range(n):
            start(slot)
        # Every kill is followed by a restore of the live replica: the first waits for one.
        deadline = time.monotonic() + 60
        while not os.path.exists(self.replica_dir / NAME) and time.monotonic() < deadline:
            time.sleep(0.05)
        for cycle in range(1, self.args.cycles + 1):
            time.sleep(self.rng.uniform(self.args.kill_min, self.args.kill_max))
            slot = self.rng.randrange(n)
            proc, run, reader, err, seed = live.pop(slot)
            role = "leader" if leader_pid(self.db) == proc.pid else "follower"
            kinds[role] += 1
            proc.kill()
            proc.wait()
            reader.join()
            err.close()
            finished.append(run)
            acked = self.acked(finished + [r for _, r, *_ in live.values()])
            s.cycles = s.kills = cycle
            if os.path.exists(self.replica_dir / NAME):
                out = str(self.dir / "restored.db")
                try:
                    self.restore_live(out)
                    k = read_state(out)["k"]
                    s.restores += 1
                    if k < acked:
                        self.fail(cycle, f"restore holds seqs 1..{k}, {acked} acknowledged", seed)
                except Unsound as exc:
                    self.fail(cycle, f"restore is not a state the database was in: {exc}", seed)
                except Exception as exc:  # noqa: BLE001 - any failure to restore is a finding
                    self.fail(cycle, f"restore failed: {type(exc).__name__}: {exc}", seed)
            if self.args.verbose:
                print(f"cycle {cycle}: killed a {role}; acked {acked}")
            start(slot)
        for proc, run, reader, err, _ in live.values():
            proc.kill()
            proc.wait()
            reader.join()
            err.close()
            finished.append(run)
        s.acked_seq = self.acked(finished)
        self.final()
        s.kill_phases = dict(kinds)
        s.child_warnings = {"restores that lost the race with compaction": self.live_restore_races}
        s.wall_seconds = round(time.monotonic() - t0, 1)
        return s


def print_summary(s: Summary) -> None:
    reopened = s.reopen_same_generation + s.reopen_new_generation
    print("\ncrash torture summary")
    print(f"  seed                 {s.seed}")
    print(f"  cycles               {s.cycles}")
    print(f"  kills                {s.kills}")
    print(f"  generations          {s.generations}")
    print(
        f"  reopens after a kill {reopened} decided: {s.reopen_same_generation} continued the "
        f"same generation ({s.reopen_recovered} of them by shipping {s.recovered_commits} "
        f"commits recovered from the WAL, {s.recovered_unshipped} killed before uploading "
        f"them), {s.reopen_new_generation} started a new one "
        f"({s.new_generation_while_nothing_lost} of them with nothing lost "
        f"{s.nothing_lost_cycles}); {s.reopen_undecided} killed before deciding"
    )
    print(f"  new gens mid-run     {s.new_generations_mid_run} {s.mid_run_cycles}")
    print(f"  acked txns           {s.acked_txns} (highest acked seq {s.acked_seq})")
    print(f"  restores checked     {s.restores} latest + {s.pitr_restores} point-in-time")
    print(f"  kill landed in       {s.kill_phases}")
    print(
        f"  kills that left      {s.kills_with_unreplicated_commits} with commits not yet in the "
        f"replica, {s.kills_mid_snapshot} during a new generation's snapshot"
    )
    print(f"  interrupted PUTs     {s.interrupted_puts}")
    print(f"  final rows           {s.final_rows}, byte-identical: {s.final_byte_identical}")
    print(f"  verify exit          {s.verify_exit}")
    if s.child_warnings:
        print(f"  child warnings       {s.child_warnings}")
    print(f"  wall time            {s.wall_seconds} s")
    print(f"  failures             {s.failures}")
    for f in s.failure_details:
        print(f"    cycle {f['cycle']} (child seed {f['child_seed']}): {f['error']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=100, help="kill/restart cycles")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--final-txns", type=int, default=60, help="steps of the unkilled run")
    parser.add_argument("--kill-min", type=float, default=KILL_MIN, help="seconds after spawn")
    parser.add_argument("--kill-max", type=float, default=KILL_MAX, help="seconds after spawn")
    parser.add_argument("--dir", help="work directory (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir even if sound")
    parser.add_argument("--json", help="also write the summary as JSON to this file")
    parser.add_argument("--verbose", action="store_true", help="one line per cycle")
    parser.add_argument(
        "--child", nargs=3, metavar=("DB", "REPLICA", "SEED"), help=argparse.SUPPRESS
    )
    parser.add_argument("--processes", type=int, default=1, help="writers at once (see above)")
    parser.add_argument("--txns", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shared", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        db, replica, seed = args.child
        return child_main(db, replica, int(seed), args.txns, args.shared)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 31)
    torture = ManyWriters(args) if args.processes > 1 else Torture(args)
    print(f"crash torture: {args.cycles} cycles, seed {args.seed}, work dir {torture.dir}")
    summary = torture.run()
    print_summary(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(summary), indent=2))
    if summary.failures == 0 and not args.keep and not args.dir:
        shutil.rmtree(torture.dir, ignore_errors=True)
    elif summary.failures:
        print(f"work dir kept for inspection: {torture.dir}")
    return 1 if summary.failures else 0


if __name__ == "__main__":
    sys.exit(main())
