"""Issue 6: crash torture, the short CI variant of benchmarks/crash_torture.py, and commits
a crash left in the WAL before they were uploaded.

A writer replicating through the VFS is SIGKILLed at random moments; after every kill the
replica must restore to a sound state that holds every acknowledged commit.  The checker is
tested first on states it must reject, so a passing torture run means something.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import apsw
import pytest

import walsync_vfs
from walsync_vfs import capture, catalog, format, recovery, storage, sync
from walsync_vfs import engine as engine_module
from walsync_vfs.lineage import read_head

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPT = BENCHMARKS / "crash_torture.py"


@pytest.fixture(scope="module")
def torture() -> ModuleType:
    """The benchmark module (it lives outside the package, in benchmarks/)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module("crash_torture")
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture
def workload_db(torture: ModuleType, tmp_path: Path) -> str:
    """A database after 80 random workload steps (plain SQLite: the checker is what's tested)."""
    path = str(tmp_path / "w.db")
    con = apsw.Connection(path)
    con.execute("PRAGMA journal_mode=WAL")
    w = torture.Writer(con, random.Random(6))
    for _ in range(80):
        w.step(w.next_kind())
    w.step("insert")  # the last step touches kv, so dropping its log row must be noticed
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return path


def _damaged(src: str, dst: Path, sql: str) -> str:
    shutil.copyfile(src, dst)
    con = apsw.Connection(str(dst))
    con.execute(sql)
    con.close()
    return str(dst)


def test_checker_accepts_workload_states_and_rejects_impossible_ones(
    torture: ModuleType, workload_db: str, tmp_path: Path
) -> None:
    state = torture.read_state(workload_db)
    assert state["k"] > 80  # mixed steps log several rows
    assert state["rows"]["bulk"], "the workload never ran a big transaction"
    impossible = {
        "hole in seqs": "DELETE FROM log WHERE seq = 10",
        "effect without its log row": "DELETE FROM log WHERE seq = (SELECT max(seq) FROM log)",
        "rolled-back rows": f"INSERT INTO bulk(tag, v) VALUES({torture.ROLLBACK_TAG}, x'00')",
        "torn bulk batch": "DELETE FROM bulk WHERE id = (SELECT max(id) FROM bulk)",
        "changed value": "UPDATE kv SET v = v || '!' WHERE k = (SELECT min(k) FROM kv)",
    }
    for i, (what, sql) in enumerate(impossible.items()):
        bad = _damaged(workload_db, tmp_path / f"bad{i}.db", sql)
        with pytest.raises(torture.Unsound):
            torture.read_state(bad)
            pytest.fail(f"the checker accepted a state with a {what}")


def run_torture(tmp_path: Path, *args: str, timeout: float) -> dict:
    """Run the crash torture with ``args``; its summary, once it reported no failure."""
    out = tmp_path / "summary.json"
    proc = subprocess.run(
        [
            *(sys.executable, str(SCRIPT), *args, "--final-txns", "30"),
            *("--json", str(out), "--dir", str(tmp_path / "work")),  # kept by pytest on failure
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["failures"] == 0, proc.stdout[-5000:]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert summary["verify_exit"] == 0
    return summary


def test_short_crash_torture_loses_nothing(tmp_path: Path) -> None:
    summary = run_torture(tmp_path, "--cycles", "8", timeout=120)
    assert summary["cycles"] == summary["kills"] == 8
    assert summary["restores"] >= 1  # after each kill once a replica exists, and at the end
    assert summary["acked_txns"] > 0
    assert summary["final_rows"]["log"] == summary["acked_seq"]  # the final flush acked all
    assert summary["generations"] >= 1


# ------------------------------------------------------------- commits that survived a crash

# The writer: commits what the scenario says, flushes (the replica now holds everything so far),
# commits more with uploads held back for an hour, prints each commit's digest, and waits for
# its SIGKILL.  Protocol: "ACK <digest>", then "C <digest>" per later commit, then "READY".
WRITER = r"""
import hashlib, sys, time
import apsw, walsync_vfs

db, replica, scenario = sys.argv[1:]
walsync_vfs.configure(replica=replica, upload_interval=3600.0)
if scenario == "snapshot":  # one upload at once after a quiet spell, snapshots soon after
    walsync_vfs.configure(upload_burst=1, snapshot_interval=0.2)
if scenario == "padded":  # synchronous=FULL pads each commit with copies of its last frame
    flags = apsw.SQLITE_OPEN_URI | apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
    con = apsw.Connection(f"file:{db}?psow=0", flags=flags, vfs="walsync")
    con.execute("PRAGMA synchronous=FULL")
else:
    con = apsw.Connection(db, vfs="walsync")

def digest():
    rows = [con.execute(f"SELECT * FROM {t} ORDER BY k").fetchall() for t in ("t", "other")]
    return hashlib.sha256(repr(rows).encode()).hexdigest()

def rows(n, size, first=1):  # n rows of random blobs (apsw's SQLite has no generate_series)
    return (
        f"WITH RECURSIVE s(i) AS (SELECT {first} UNION ALL SELECT i + 1 FROM s "
        f"WHERE i < {first + n - 1}) SELECT i, randomblob({size}) FROM s"
    )

def commit(sql, *args):
    con.execute(sql, args)
    print("C", digest(), flush=True)

con.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB)")
con.execute("CREATE TABLE other(k INTEGER PRIMARY KEY, v BLOB)")
con.execute("INSERT INTO other " + rows(40, 300))
if scenario == "checkpointed":  # `other`'s pages leave the WAL: only the db file has them
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
con.execute("INSERT INTO t VALUES(1, randomblob(100))")
walsync_vfs.flush(timeout=30)
if scenario == "snapshot":  # the replica ends with a periodic snapshot, past its last segment
    from walsync_vfs import capture, catalog, storage
    for k in (3, 4, 5):  # the first ships at once, the others wait for the upload clock
        con.execute(f"INSERT INTO t VALUES({k}, randomblob(100))")
    capture.dispatcher().barrier(30)  # the engine has seen them: stats() has the last txid
    last = walsync_vfs.stats()[0]["last_txid"]
    client = storage.open_replica(replica)
    while not any(s.last_txid == last for g in catalog.generations(client, "left.db")
                  for s in g.snapshots):
        time.sleep(0.05)
    import dataclasses  # and no snapshot after it, of the commits the crash leaves behind
    replicated = walsync_vfs._engine_instance().database(db)
    replicated.cfg = dataclasses.replace(replicated.cfg, snapshot_interval=0.0)
print("ACK", digest(), flush=True)
if scenario == "restarted":  # the WAL is emptied: what follows lands in a new one, new salts
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
commit("INSERT INTO t VALUES(2, randomblob(100))")
commit("UPDATE other SET v = randomblob(300) WHERE k % 3 = 0")
commit("INSERT INTO t " + rows(30, 3000, first=101))  # grows the database
if scenario == "wal":
    commit("DELETE FROM t WHERE k > 100")
    con.execute("VACUUM")  # shrinks the file: a commit whose db size is below earlier frames'
    print("C", digest(), flush=True)
if scenario == "checkpointed":  # the db file now holds pages newer than the replica's state
    con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
print("READY", flush=True)
time.sleep(3600)
"""


def digest_of(con: apsw.Connection) -> str:
    rows = [con.execute(f"SELECT * FROM {t} ORDER BY k").fetchall() for t in ("t", "other")]
    return hashlib.sha256(repr(rows).encode()).hexdigest()


def crash_writer(db: Path, replica: str, scenario: str) -> tuple[str, list[str]]:
    """Run the writer until READY, SIGKILL it; (acked digest, digests of later commits)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db), replica, scenario],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.split())
            if line.startswith("READY"):
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        err = proc.communicate(timeout=30)[1]
    assert lines and lines[-1] == ["READY"], err[-3000:]
    assert proc.returncode == -signal.SIGKILL
    acked = next(words[1] for words in lines if words[0] == "ACK")
    return acked, [words[1] for words in lines if words[0] == "C"]


def listing(url: str) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "walsync_vfs", "list", url, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["generations"]


def restored_digest(url: str, out: Path, *args: str) -> str:
    """Restore with the CLI; the copy must pass integrity_check."""
    proc = subprocess.run(
        [sys.executable, "-m", "walsync_vfs", "restore", url, "-o", str(out), "--force", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    con = apsw.Connection(str(out), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return digest_of(con)
    finally:
        con.close()


@pytest.fixture
def page_segments() -> Iterator[None]:
    """Segments split after every page, so commits recovered together ship in several."""
    walsync_vfs.configure(max_segment_bytes=4096)
    yield
    walsync_vfs.configure(max_segment_bytes=16 << 20)


def check_recovery(root: str, scenario: str, tmp_path: Path) -> None:
    """Crash a writer with commits left in its WAL, reopen the database in this process and
    check they shipped as the same generation's next commits, each its own restore point."""
    db = tmp_path / "left.db"
    url = f"{root}/left.db"
    acked, survivors = crash_writer(db, root, scenario)
    (g,) = listing(url)
    gen, acked_txid, snapshots = g["generation"], g["last_txid"], len(g["snapshots"])
    assert restored_digest(url, tmp_path / "acked.db") == acked  # and nothing after it
    before = time.time_ns()

    con = apsw.Connection(str(db), vfs="walsync")
    walsync_vfs.flush(timeout=60)
    assert digest_of(con) == survivors[-1]
    (g,) = listing(url)
    assert (g["generation"], g["last_txid"]) == (gen, acked_txid + len(survivors))
    assert len(g["snapshots"]) == snapshots  # no new snapshot either
    for n, want in enumerate(survivors, 1):
        got = restored_digest(url, tmp_path / f"r{n}.db", "--txid", str(acked_txid + n))
        assert got == want, f"restore point {acked_txid + n} (survivor {n})"
    assert restored_digest(url, tmp_path / "latest.db") == digest_of(con)

    # One segment each (split at max_segment_bytes: a commit of several pages in parts);
    # their commit time is when the WAL was last written: after the acked commit, before
    # the reopen.
    client = storage.open_replica(root)
    segments = catalog.generations(client, "left.db")[0].segments
    shipped = catalog.units([k for k in segments if k.first_txid > acked_txid])
    assert len(shipped) == len(survivors)
    assert any(len(unit) > 1 for unit in shipped)  # recovered commits go in parts too
    times = {}
    for k in segments:
        key = catalog.object_key(k)
        times.update(
            (e.txid, e.time_ns) for e in format.read_segment_header(client.get(key), key).index
        )
    for k in catalog.generations(client, "left.db")[0].snapshots:  # the head may be one
        key = catalog.object_key(k)
        times.setdefault(k.last_txid, format.read_snapshot(client.get(key), key)[0].time_ns)
    stamps = {times[acked_txid + n] for n in range(1, len(survivors) + 1)}
    assert len(stamps) == 1 and times[acked_txid] <= stamps.pop() <= before
    con.execute("INSERT INTO t VALUES(-1, 'after')")  # and the lineage goes on from there
    walsync_vfs.flush(timeout=60)
    assert listing(url)[0]["last_txid"] == acked_txid + len(survivors) + 1
    assert restored_digest(url, tmp_path / "next.db") == digest_of(con)
    con.close()
    # Commits a crash kept from the store before a snapshot leave a hole restore skips.
    checked = subprocess.run(
        [sys.executable, "-m", "walsync_vfs", "verify", url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr


@pytest.mark.parametrize("scenario", ["wal", "restarted", "padded", "snapshot"])
def test_commits_left_in_the_wal_continue_the_generation(
    scenario: str, file_replica: str, page_segments: None, tmp_path: Path
) -> None:
    """Commits that never reached the store but are still in the WAL (or in a WAL restarted
    after a full checkpoint, or padded to sector boundaries, or after a periodic snapshot,
    which records no WAL position) ship as ordinary commits of the same generation on
    reopen."""
    check_recovery(file_replica, scenario, tmp_path)


def test_commits_left_in_the_wal_are_found_when_the_head_comes_late(
    s3_url: str,
    page_segments: None,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A store slower than HEAD_WAIT: the sync point is released without waiting for the
    replica's head, and the commits are looked for under a second one."""
    monkeypatch.setattr(sync, "HEAD_WAIT", 0.0)
    # The head arrives only once the first sync point is released: the store is slower
    # than the copy of the pages, whatever the machine's load.
    released = threading.Event()
    close = capture.SyncPoint.close

    def close_and_say(self: capture.SyncPoint) -> None:
        close(self)
        released.set()

    def late_head(*args: object) -> object:
        released.wait(30)
        return read_head(*args)

    monkeypatch.setattr(capture.SyncPoint, "close", close_and_say)
    monkeypatch.setattr(engine_module, "read_head", late_head)
    caplog.set_level(logging.DEBUG, logger="walsync_vfs")
    walsync_vfs.configure(replica=s3_url)
    try:
        check_recovery(s3_url, "wal", tmp_path)
    finally:
        walsync_vfs.configure(replica="")
    assert "is ahead of its replica; looking in the WAL" in caplog.text


def test_commits_a_checkpoint_moved_into_the_db_file_start_a_new_generation(
    file_replica: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """When a checkpoint already copied unshipped commits into the db file, the replica's last
    state cannot be rebuilt from the WAL: a new generation from a snapshot, nothing lost."""
    db = tmp_path / "moved.db"
    url = f"{file_replica}/moved.db"
    acked, survivors = crash_writer(db, file_replica, "checkpointed")
    (old,) = listing(url)

    caplog.set_level(logging.INFO, logger="walsync_vfs")
    con = apsw.Connection(str(db), vfs="walsync")
    walsync_vfs.flush(timeout=30)
    # The frames are still in the same WAL: the whole-db checksum is what refused them.
    assert "(same WAL) is not the replica's last state" in caplog.text
    assert digest_of(con) == survivors[-1]
    first, new = listing(url)
    assert first == old
    assert new["first_txid"] == old["last_txid"] + 1 == new["snapshots"][0]["txid"]
    assert restored_digest(url, tmp_path / "latest.db") == digest_of(con)
    assert restored_digest(url, tmp_path / "acked.db", "--txid", str(old["last_txid"])) == acked
    con.close()


def test_short_multiprocess_crash_torture_loses_nothing(tmp_path: Path) -> None:
    """Three writers at once; leaders and followers SIGKILLed at random (the long run is
    ``benchmarks/crash_torture.py --processes 4``)."""
    args = ("--processes", "3", "--cycles", "8", "--seed", "7")
    summary = run_torture(tmp_path, *args, timeout=180)
    assert summary["kills"] == 8 and summary["restores"] == 9  # after each kill, and at the end
    assert summary["acked_seq"] > 0
    assert summary["final_rows"]["log"] >= summary["acked_seq"]


def test_a_recovered_commit_takes_each_page_from_its_last_frame() -> None:
    """A transaction whose cache spilled wrote some pages more than once, out of order: each
    page's last frame is its version; pages past the commit's database size are dropped."""
    pgnos, frames = recovery._newest(array("I", [5, 2, 9, 2, 7, 5, 12]), 10, 9)
    assert (list(pgnos), list(frames)) == ([2, 5, 7, 9], [13, 15, 14, 12])
    pgnos, frames = recovery._newest(array("I", [1, 2, 3]), 4, 3)
    assert (list(pgnos), list(frames)) == ([1, 2, 3], [4, 5, 6])
