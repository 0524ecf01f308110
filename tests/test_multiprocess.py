"""Many processes, one database: one lineage whoever writes it.

Worker processes (tests/mp_worker.py, each with its own engine, as gunicorn workers have)
write one database at once; one of them leads and replicates every commit in the WAL.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import apsw
import pytest
from foreign import wait_until_forgotten

from walsync_vfs import capture, catalog, storage
from walsync_vfs.restore import restore

WORKER = str(Path(__file__).with_name("mp_worker.py"))


def create(path: Path) -> None:
    con = apsw.Connection(str(path))
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE t(w INTEGER, k INTEGER, r INTEGER, v BLOB)")
    con.close()


def start(path: Path, url: str, wid: int, commits: int, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, WORKER, str(path), url, str(wid), str(commits), *flags],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def until_done(proc: subprocess.Popen) -> list[dict]:
    """A worker's lines up to its ``done``."""
    assert proc.stdout is not None
    out: list[dict] = []
    while not out or "done" not in out[-1]:
        line = proc.stdout.readline()
        assert line, f"worker exited early ({proc.wait()})"
        out.append(json.loads(line))
    return out


def rest_of(proc: subprocess.Popen) -> str:
    """What a worker prints from here to its exit, read through the buffered pipe its first
    lines came through: ``communicate()`` reads the descriptor itself when stdin is a pipe
    too, and would miss (or cut in two) what that buffer already holds."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    proc.wait(timeout=180)  # a few lines: they fit in the pipe meanwhile
    return proc.stdout.read()


def release(proc: subprocess.Popen) -> None:
    """Let a ``--hold`` worker close its database and exit."""
    proc.communicate("\n", timeout=180)
    assert proc.returncode == 0


def groups(db: Path) -> dict[tuple[int, int], int]:
    """(worker, transaction) -> rows, as the database holds them."""
    con = apsw.Connection(str(db), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        rows = con.execute("SELECT w, k, count(*) FROM t GROUP BY w, k").fetchall()
        return {(w, k): n for w, k, n in rows}
    finally:
        con.close()


def opened(tmp: Path) -> tuple[Path, apsw.Connection]:
    """A new database (see create) and this process's connection to it through the VFS."""
    db = tmp / "app.db"
    create(db)
    return db, apsw.Connection(str(db), vfs="walsync")


def content(db: Path) -> list[tuple]:
    con = apsw.Connection(str(db), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return con.execute("SELECT w, k, r, v FROM t ORDER BY w, k, r").fetchall()
    finally:
        con.close()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "walsync_vfs", *args], capture_output=True, text=True, timeout=120
    )


def leader_pid(path: Path) -> int:
    """The pid the shared page names as leader (see WsShared in csrc/walsync.c)."""
    with open(f"{path}-walsync", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        return struct.unpack_from("=i", m, 8)[0]


def check_one_lineage(url: str, db: Path, tmp: Path) -> None:
    """One generation, one snapshot; every commit after the snapshot is one restore point
    holding exactly one more whole transaction; the latest restore equals the database."""
    client = storage.open_replica(url)
    gens = catalog.generations(client, db.name)
    assert len(gens) == 1, [g.id for g in gens]
    (gen,) = gens
    assert len(gen.snapshots) == 1
    first = gen.snapshots[0].last_txid
    restore(f"{url}/{db.name}", str(tmp / "at-snapshot.db"), txid=first)
    base = groups(tmp / "at-snapshot.db")
    final = groups(db)
    assert gen.last_txid - first == len(final) - len(base)  # one txid per transaction
    step = max(1, (gen.last_txid - first) // 8)
    for t in range(first + 1, gen.last_txid + 1, step):
        restore(f"{url}/{db.name}", str(tmp / "a.db"), txid=t - 1, force=True)
        restore(f"{url}/{db.name}", str(tmp / "b.db"), txid=t, force=True)
        a, b = groups(tmp / "a.db"), groups(tmp / "b.db")
        added = {g: n for g, n in b.items() if g not in a}
        assert len(added) == 1 and set(a) <= set(b), (t, added)
        assert added == {g: final[g] for g in added}  # the whole transaction
    restore(f"{url}/{db.name}", str(tmp / "latest.db"))
    assert content(tmp / "latest.db") == content(db)
    proc = cli("verify", f"{url}/{db.name}")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_workers_a_foreign_writer_and_a_truncate_make_one_lineage(replica_url, tmp_path):
    db = tmp_path / "app.db"
    create(db)
    # Every worker holds the database open until all are done: one leader throughout (the
    # leader-kill test below covers a change of leader).
    workers = [start(db, replica_url, w, 40, "--truncate", "--hold") for w in range(4)]
    foreign = start(db, replica_url, 99, 15, "--foreign")
    outs = [until_done(p) for p in [*workers, foreign]]
    for p in [*workers, foreign]:
        release(p)
    roles = [o[0]["role"] for o in outs[:4]]
    assert roles.count("leader") == 1, roles
    assert any(line.get("truncated") for o in outs[:4] for line in o)
    check_one_lineage(replica_url, db, tmp_path)


def test_leader_killed_another_takes_over_and_nothing_acknowledged_is_lost(replica_url, tmp_path):
    db = tmp_path / "app.db"
    create(db)
    workers = [start(db, replica_url, w, 150) for w in range(3)]
    first = [json.loads(p.stdout.readline()) for p in workers]  # type: ignore[union-attr]
    (victim,) = [p for p, line in zip(workers, first, strict=True) if line["role"] == "leader"]
    for _ in range(3):  # a few acknowledged flushes under this leader first
        assert "ack" in json.loads(victim.stdout.readline())  # type: ignore[union-attr]
    victim.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    victim.wait()
    while leader_pid(db) in (victim.pid, 0) or not os.path.exists(f"/proc/{leader_pid(db)}"):
        assert time.monotonic() - killed_at < 2.0, "no takeover within 2 s"
        time.sleep(0.01)
    acked = {}
    for p, line in zip(workers, first, strict=True):
        rest = [json.loads(x) for x in rest_of(p).splitlines()]
        acked[line["pid"]] = max([x["ack"] for x in rest if "ack" in x], default=-1)
    survivors = [p for p in workers if p is not victim]
    assert all(p.returncode == 0 for p in survivors)
    restore(f"{replica_url}/{db.name}", str(tmp_path / "latest.db"))
    assert content(tmp_path / "latest.db") == content(db)
    got = groups(tmp_path / "latest.db")
    for wid, p in enumerate(workers):
        assert all((wid, k) in got for k in range(acked[p.pid] + 1))
    gens = catalog.generations(storage.open_replica(replica_url), db.name)
    assert len(gens) == 1  # the WAL still held what the dead leader had not shipped
    assert cli("verify", f"{replica_url}/{db.name}").returncode == 0


PREFORK_MASTER = textwrap.dedent(
    """
    import os, sys
    import apsw, walsync_vfs
    path, url = sys.argv[1], sys.argv[2]
    walsync_vfs.configure(replica=url)
    con = apsw.Connection(path, vfs="walsync")  # opened before the fork, kept open
    con.execute("INSERT INTO t(w, k, r, v) VALUES (-1, 0, 0, 'master')")
    children = []
    for wid in range(3):
        pid = os.fork()
        if pid == 0:
            c = apsw.Connection(path, vfs="walsync")
            c.set_busy_timeout(20000)
            for k in range(20):
                c.execute("INSERT INTO t(w, k, r, v) VALUES (?, ?, 0, randomblob(50))", (wid, k))
            walsync_vfs.flush(timeout=60)
            c.close()
            os._exit(0)
        children.append(pid)
    for pid in children:
        assert os.waitpid(pid, 0)[1] == 0
    walsync_vfs.flush(timeout=60)
    con.close()
    """
)


def test_prefork_master_that_opened_the_database_first(replica_url, tmp_path):
    db = tmp_path / "app.db"
    create(db)
    proc = subprocess.run(
        [sys.executable, "-c", PREFORK_MASTER, str(db), replica_url],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(groups(db)) == 61
    check_one_lineage(replica_url, db, tmp_path)


FORKED_LEADER = textwrap.dedent(
    """
    import os, sys
    import apsw, walsync_vfs
    path, url = sys.argv[1], sys.argv[2]
    walsync_vfs.configure(replica=url)
    walsync_vfs.flush()  # the engine runs in the parent, which never opens the database
    pid = os.fork()
    if pid == 0:
        con = apsw.Connection(path, vfs="walsync")  # the child leads it
        for k in range(10):
            con.execute("INSERT INTO t(w, k, r, v) VALUES (1, ?, 0, 'child')", (k,))
        walsync_vfs.flush(timeout=60)
        con.close()
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    """
)


def test_a_forked_child_replicates_where_its_parent_configured(replica_url, tmp_path):
    """A pre-fork server configures replication in the master, which never opens the
    database; a worker that does leads it, with the master's settings, not the defaults."""
    db = tmp_path / "app.db"
    create(db)
    proc = subprocess.run(
        [sys.executable, "-c", FORKED_LEADER, str(db), replica_url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    restore(f"{replica_url}/{db.name}", str(tmp_path / "latest.db"))
    assert content(tmp_path / "latest.db") == content(db) and len(content(db)) == 10


FORK_AFTER_FLUSH = textwrap.dedent(
    """
    import contextlib, os, sys, time
    import apsw, walsync_vfs
    path, url, rows, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    walsync_vfs.configure(replica=url, upload_interval=3600)  # only flush() uploads
    con = apsw.Connection(path, vfs="walsync")
    for child in range(1, 4):
        with con if size > 1000 else contextlib.nullcontext():  # big: one transaction
            for k in range(rows):
                con.execute("INSERT INTO t(w, k, r, v) VALUES (0, ?, ?, randomblob(?))",
                            (k, child, size))
        walsync_vfs.flush(timeout=60)  # compressed on every core: a flush waits on it
        pid = os.fork()
        if pid == 0:
            c = apsw.Connection(path, vfs="walsync")
            c.set_busy_timeout(10_000)
            c.execute("INSERT INTO t(w, k, r, v) VALUES (?, 0, 0, 'child')", (child,))
            walsync_vfs.flush(timeout=60)
            os._exit(0)
        deadline = time.monotonic() + 30
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                sys.exit(f"child {child}, forked after a flush, hung")
            time.sleep(0.05)
    walsync_vfs.flush(timeout=60)
    con.close()
    """
)


@pytest.mark.parametrize(("rows", "size"), [(200, 100), (2_000, 4_000)])
def test_a_child_forked_after_a_flush_runs(file_replica, tmp_path, rows, size):
    """A pre-fork server's master that wrote and flushed, then forks (a worker, a graceful
    reload): the child must run.  A flush compresses on zstd worker threads, which a child
    does not have; a compressor that used them must not be freed there."""
    db = tmp_path / "app.db"
    create(db)
    proc = subprocess.run(
        [sys.executable, "-c", FORK_AFTER_FLUSH, str(db), file_replica, str(rows), str(size)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    restore(f"{file_replica}/{db.name}", str(tmp_path / "latest.db"))
    assert content(tmp_path / "latest.db") == content(db) and len(content(db)) == 3 * (rows + 1)


def test_a_child_forked_while_other_threads_use_sqlite_can_use_it(tmp_path):
    """The engine's threads use SQLite and the shim while a pre-fork server forks its
    workers.  A child forked while another thread held one of SQLite's own mutexes (its
    allocator's, say) or the shim's spool-directory lock would wait forever at its first
    use of it: the shim holds them across fork()."""
    stop = threading.Event()
    spool = str(tmp_path).encode()

    def churn() -> None:
        con = apsw.Connection(":memory:")
        while not stop.is_set():
            con.execute("SELECT randomblob(2000), randomblob(3000)").fetchall()

    def configure() -> None:  # as the engine does for each database it opens
        while not stop.is_set():
            capture.lib.ws_spool_big(0, 1 << 20, spool)

    threads = [threading.Thread(target=churn) for _ in range(2)]
    threads.append(threading.Thread(target=configure))
    for t in threads:
        t.start()
    hung = 0
    try:
        for _ in range(40):
            pid = os.fork()
            if pid == 0:
                child = apsw.Connection(str(tmp_path / "child.db"), vfs="walsync")
                child.execute("SELECT randomblob(100)").fetchall()
                capture.lib.ws_spool_big(0, 1 << 20, spool)
                os._exit(0)
            waiter = threading.Thread(target=os.waitpid, args=(pid, 0))
            waiter.start()
            waiter.join(10)
            if waiter.is_alive():
                hung += 1
                os.kill(pid, signal.SIGKILL)
                waiter.join()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert hung == 0


def test_a_worker_forked_while_a_sync_of_the_master_s_is_open_keeps_its_commits(
    file_replica, tmp_path
):
    """A pre-fork master that opened the database and closed it before forking, as SQLite
    asks: a sync of walsync's may still have its own connection open at the fork.  The
    child inherits SQLite's record of that connection's locks, so its own connections took
    none; when the master's last connection then closed, it checkpointed and deleted the
    WAL under the workers, whose every later commit was lost.  The child forgets what it
    inherited of walsync's connections: its locks are real."""
    import walsync_vfs

    path = tmp_path / "app.db"
    con = apsw.Connection(str(path), vfs="walsync")
    con.execute("CREATE TABLE t(x)")
    walsync_vfs.flush(timeout=30)
    con.close()
    sync = capture.SyncPoint(str(path))  # what a sync holds open while it reads the state
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a worker, on plain SQLite: the inherited locks are SQLite's own
        try:
            worker = apsw.Connection(str(path))
            worker.set_busy_timeout(20_000)
            worker.execute("INSERT INTO t VALUES (0)")
            os.write(ready_w, b"x")
            os.read(go_r, 1)  # the master's last connection is closed
            for k in range(1, 100):
                worker.execute("INSERT INTO t VALUES (?)", (k,))
            worker.close()
        finally:
            os._exit(0)
    assert os.read(ready_r, 1) == b"x"
    sync.close()  # the master's last connection to the database
    os.write(go_w, b"x")
    assert os.waitpid(pid, 0)[1] == 0
    for fd in (ready_r, ready_w, go_r, go_w):
        os.close(fd)
    check = apsw.Connection(str(path))
    assert check.execute("SELECT count(*) FROM t").fetchone()[0] == 100
    check.close()


def test_exclusive_locking_is_refused_and_replication_goes_on(replica_url, tmp_path):
    import walsync_vfs

    walsync_vfs.configure(replica=replica_url)
    try:
        db = tmp_path / "excl.db"
        con = apsw.Connection(str(db), vfs="walsync")
        con.execute("CREATE TABLE t(w INTEGER, k INTEGER, r INTEGER, v BLOB)")
        con.execute("INSERT INTO t VALUES (1, 1, 0, 'before')")
        with pytest.raises(apsw.SQLError) as exc:
            con.execute("PRAGMA locking_mode=EXCLUSIVE")
        assert str(exc.value) == (
            "walsync: locking_mode=EXCLUSIVE would stop replication (the replicator reads "
            "through connections of its own); keep locking_mode=NORMAL"
        )
        con.execute("INSERT INTO t VALUES (1, 2, 0, 'after')")
        walsync_vfs.flush(timeout=30)
        restore(f"{replica_url}/{db.name}", str(tmp_path / "r.db"))
        assert content(tmp_path / "r.db") == content(db)
        con.close()
    finally:
        walsync_vfs.flush(timeout=30)
        walsync_vfs.configure(replica="")


FOREIGN_COMMITS = """
import apsw, sys
con = apsw.Connection(sys.argv[1])  # the default VFS: not replicated by this process
con.set_busy_timeout(20_000)
for k in range(3):
    con.execute("INSERT INTO t VALUES (99, ?, 0, 'foreign')", (k,))
"""


def test_flush_in_the_leader_covers_commits_another_process_just_made(replica_url, tmp_path):
    """What flush() promises holds in the leader's process too: commits another process
    made before it (here without the VFS, as the sqlite3 shell would) are in the replica
    when it returns, not only after the leader's next look at the WAL."""
    import walsync_vfs

    walsync_vfs.configure(replica=replica_url)
    db, con = opened(tmp_path)
    try:
        con.execute("INSERT INTO t VALUES (1, 1, 0, 'leader')")
        walsync_vfs.flush(timeout=30)
        for _ in range(5):
            proc = subprocess.run([sys.executable, "-c", FOREIGN_COMMITS, str(db)], timeout=60)
            assert proc.returncode == 0
            walsync_vfs.flush(timeout=30)  # at once: well before the WAL poll's next look
            restore(f"{replica_url}/{db.name}", str(tmp_path / "r.db"), force=True)
            assert content(tmp_path / "r.db") == content(db)
    finally:
        con.close()
        walsync_vfs.flush(timeout=30)
        walsync_vfs.configure(replica="")


FOLLOWER = """
import apsw, sys, walsync_vfs
walsync_vfs.configure(replica=sys.argv[2])
con = apsw.Connection(sys.argv[1], vfs="walsync")
con.set_busy_timeout(20_000)
assert not any(s["leader"] for s in walsync_vfs.stats())
print(con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0])
for sql in sys.argv[3:]:
    con.execute(sql)
con.close()
"""


def follower(db: Path, url: str, *statements: str) -> int:
    """From a second process running the VFS: ``wal_checkpoint(TRUNCATE)``, then each of
    ``statements``; the checkpoint's busy flag."""
    out = subprocess.run(
        [sys.executable, "-c", FOLLOWER, str(db), url, *statements],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
        timeout=60,
    ).stdout
    return int(out)


OTHER_ROOT = """
import logging, sys, apsw, walsync_vfs
logging.basicConfig(level=logging.WARNING, format="%(message)s")
walsync_vfs.configure(replica=sys.argv[2])
con = apsw.Connection(sys.argv[1], vfs="walsync")
con.set_busy_timeout(10_000)
con.execute("INSERT INTO t(w, k, r, v) VALUES (9, 0, 0, x'00')")
try:
    walsync_vfs.flush(timeout=30)
    print("flushed")
except walsync_vfs.ReplicationError as exc:
    print(exc)
con.close()
"""


FOLLOWER_FLUSH = """
import json, sys, apsw, walsync_vfs
walsync_vfs.configure(replica=sys.argv[2], upload_interval=0.1)
con = apsw.Connection(sys.argv[1], vfs="walsync")
con.set_busy_timeout(5000)
print("ready", flush=True)
sys.stdin.readline()  # the leader's replica fails from now on
con.execute("INSERT INTO t VALUES(2)")
try:
    walsync_vfs.flush(timeout=30)
except walsync_vfs.ReplicationError as exc:
    print(exc)
print(json.dumps(walsync_vfs.stats()))
"""


def test_a_follower_s_flush_and_stats_while_the_leader_s_replica_fails(tmp_path):
    """Another process's flush() while the leader's replica fails: the leader's one line,
    not that line prefixed again; its stats() are the leader's, failing."""
    import walsync_vfs

    replica, path = tmp_path / "replica", tmp_path / "a.db"
    walsync_vfs.configure(replica=replica.as_uri(), upload_interval=0.1)
    try:
        con = apsw.Connection(str(path), vfs="walsync")  # this process leads
        con.execute("CREATE TABLE t(x)")
        walsync_vfs.flush(timeout=30)
        child = subprocess.Popen(
            [sys.executable, "-c", FOLLOWER_FLUSH, str(path), replica.as_uri()],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        replica.rename(tmp_path / "away")
        replica.write_text("not a directory")
        con.execute("INSERT INTO t VALUES(1)")
        with pytest.raises(walsync_vfs.ReplicationError) as leader:
            walsync_vfs.flush(timeout=30)
        said, errors = child.communicate("go\n", timeout=120)
        error, stats = said.splitlines()
        assert error == str(leader.value), errors
        # Its stats are the leader's, asked of it: they show the replica failing.
        (state,) = json.loads(stats)
        assert state["leader"] is False
        assert state["path"] == str(path) and state["name"] == "a.db"
        assert state["replicated_txid"] < state["last_txid"] == 4  # + this process's INSERT
        assert state["failures"] >= 1 and "Not a directory" in state["last_error"]
        assert str(leader.value).count("is failing") == 1
        replica.unlink()
        (tmp_path / "away").rename(replica)
        walsync_vfs.flush(timeout=30)
        con.close()
    finally:
        walsync_vfs.configure(replica="", upload_interval=1.0)


LEADER_CHILD = """
import sys, apsw, walsync_vfs
walsync_vfs.configure(replica=sys.argv[2])
con = apsw.Connection(sys.argv[1], vfs="walsync")
con.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
walsync_vfs.flush(timeout=30)
print("ready", flush=True)
sys.stdin.readline()
"""


def test_a_follower_s_stats_while_the_leader_does_not_answer(file_replica, tmp_path):
    """A leader that does not answer (stopped, here) leaves a follower's stats() without
    figures, every field but the path and name None, after a short wait; it answers again
    once it runs."""
    import walsync_vfs

    path = tmp_path / "a.db"
    leader = subprocess.Popen(
        [sys.executable, "-c", LEADER_CHILD, str(path), file_replica],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert leader.stdout is not None and leader.stdout.readline() == "ready\n"
        con = apsw.Connection(str(path), vfs="walsync")
        (state,) = walsync_vfs.stats()
        assert (state["leader"], state["replicated_txid"]) == (False, 3)
        leader.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        (state,) = walsync_vfs.stats()
        assert time.monotonic() - started < 5
        assert state.pop("leader") is False
        assert state.pop("path") == str(path) and state.pop("name") == "a.db"
        assert set(state.values()) == {None}
        leader.send_signal(signal.SIGCONT)
        (state,) = walsync_vfs.stats()
        assert state["replicated_txid"] == 3
        con.close()
    finally:
        leader.send_signal(signal.SIGCONT)
        leader.communicate("", timeout=60)


def test_a_process_configured_with_another_replica_is_told_where_its_commits_go(
    file_replica, tmp_path
):
    """The leader's replica is the one used: a follower configured with another one is told
    so, in a warning when it starts following and by flush(), which would otherwise report
    its commits stored where they are not."""
    import walsync_vfs

    db, con = opened(tmp_path)
    walsync_vfs.flush(timeout=30)  # this process leads
    other = (tmp_path / "elsewhere").as_uri()
    out = subprocess.run(
        [sys.executable, "-c", OTHER_ROOT, str(db), other],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    problem = (
        f"{db} is replicated by another process to {file_replica}/app.db, not to "
        f"{other}/app.db as configured here; configure the same replica in every process "
        "that opens it"
    )
    assert out.stdout == problem + "\n"
    assert f"walsync: {problem}\n" in out.stderr
    same = subprocess.run(
        [sys.executable, "-c", OTHER_ROOT, str(db), file_replica],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert same.stdout == "flushed\n" and "configure the same replica" not in same.stderr
    con.close()


@pytest.mark.parametrize("how", ["mode=ro", "immutable=1"])
def test_a_database_only_read_never_leads_its_replication(file_replica, tmp_path, how):
    """A process that only reads a database never leads it: reading an old copy (restored
    for inspection, under the same name) must not make it the replica's newest state, and
    a process writing the live database meanwhile replicates it as usual."""
    import walsync_vfs

    db, con = opened(tmp_path)
    for k in range(20):
        con.execute("INSERT INTO t(w, k, r, v) VALUES (0, ?, 0, 'live')", (k,))
    walsync_vfs.flush(timeout=30)
    con.close()
    wait_until_forgotten(str(db))
    old = tmp_path / "inspect" / "app.db"
    old.parent.mkdir()
    restore(f"{file_replica}/app.db", str(old), txid=5)
    flags = apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI
    if how == "immutable=1":
        flags = apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_URI
    reader = apsw.Connection(f"file:{old}?{how}", flags=flags, vfs="walsync")
    assert reader.execute("SELECT count(*) FROM t").fetchone()[0] < 20  # an old state
    live = apsw.Connection(f"file:{db}?{how}", flags=flags, vfs="walsync")
    out = subprocess.run(
        [sys.executable, "-c", OTHER_ROOT, str(db), file_replica],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert out.stdout == "flushed\n", out.stderr
    walsync_vfs.flush(timeout=30)
    reader.close()
    live.close()
    gens = catalog.generations(storage.open_replica(file_replica), "app.db")
    assert len(gens) == 1
    restore(f"{file_replica}/app.db", str(tmp_path / "latest.db"))
    assert content(tmp_path / "latest.db") == content(db) and len(content(db)) == 21


class Gate:
    """A sink in front of the engine that can keep the capture consumer in one batch, as a
    busy engine would: the commits published meanwhile stay queued, their frames unread."""

    def __init__(self, sink: Callable[[capture.Batch], None]) -> None:
        self.sink = sink
        self.holding = False
        self.entered = threading.Event()
        self.opened = threading.Event()

    def __call__(self, batch: capture.Batch) -> None:
        if self.holding:
            self.holding = False
            self.entered.set()
            assert self.opened.wait(60)
        self.sink(batch)


@contextlib.contextmanager
def gated(tmp: Path) -> Iterator[tuple[Path, Gate, apsw.Connection]]:
    """A new database (see create) opened through the VFS, its records passing a Gate."""
    import walsync_vfs

    db = tmp / "app.db"
    create(db)
    gate = Gate(walsync_vfs._engine_instance().on_records)
    capture.dispatcher().route_path(str(db), gate)
    con = apsw.Connection(str(db), vfs="walsync")
    try:
        yield db, gate, con
    finally:
        gate.opened.set()
        con.close()
        capture.dispatcher().route_path(str(db), None)


def tables_and_values(path: Path) -> dict[str, list[str]]:
    """Each table of the database at ``path`` with its column ``v``, in rowid order."""
    con = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        names = [n for (n,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {n: [v for (v,) in con.execute(f"SELECT v FROM {n} ORDER BY rowid")] for n in names}
    finally:
        con.close()


def test_a_sync_starting_keeps_unread_frames_from_a_restart(file_replica, tmp_path):
    """A sync starts while the leader's consumer is busy in a batch and the leader commits T;
    another process truncates the WAL and commits N.  The restart waits until T's frames
    are read (or SQLite appends instead), so one lineage holds T then N.  Had the restart
    taken T's frames, N must still never be replicated on top of a state without T (see
    Lineage.lost): every restore point is a state the source had, and the latest equals
    it."""
    import walsync_vfs

    with gated(tmp_path) as (db, gate, con):
        states = [tables_and_values(db)]
        con.execute("INSERT INTO t VALUES (1, 1, 0, 'first')")
        walsync_vfs.flush(timeout=30)
        states.append(tables_and_values(db))
        gate.holding = True
        con.execute("INSERT INTO t VALUES (1, 2, 0, 'its batch waits')")
        assert gate.entered.wait(10)
        states.append(tables_and_values(db))
        capture.read_any(capture.db_id_of(con))  # as a sync starting now does
        con.execute("CREATE TABLE u(v TEXT)")  # T
        states.append(tables_and_values(db))
        follower(db, file_replica, "INSERT INTO u VALUES ('after the restart')")
        states.append(tables_and_values(db))
        gate.opened.set()
        con.execute("INSERT INTO t VALUES (1, 3, 0, 'last')")
        walsync_vfs.flush(timeout=30)
        states.append(tables_and_values(db))
        # A new generation's snapshot makes flush() return; what the old one still had
        # pending may land after it, and is checked too.
        deadline = time.monotonic() + 30
        while any(s["pending_commits"] for s in walsync_vfs.stats()):
            assert time.monotonic() < deadline, walsync_vfs.stats()
            time.sleep(0.01)
    client = storage.open_replica(file_replica)
    gens = catalog.generations(client, db.name)
    assert len(gens) == 1, [g.id for g in gens]  # no snapshot needed to go on
    for gen in gens:
        for txid in range(gen.snapshots[0].last_txid, gen.last_txid + 1):
            out = tmp_path / f"at-{txid}.db"
            restore(f"{file_replica}/{db.name}", str(out), txid=txid)
            assert tables_and_values(out) in states, txid
    restore(f"{file_replica}/{db.name}", str(tmp_path / "latest.db"))
    assert tables_and_values(tmp_path / "latest.db") == states[-1]


FOREIGN_TRUNCATE = """
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=0.2)  # the sqlite3 shell's way
if "write" in sys.argv[2:]:
    c.execute("INSERT INTO t VALUES (99, 0, 0, 'foreign')")
if "--no-checkpoint" not in sys.argv[2:]:
    if "write" in sys.argv[2:]:
        print(*c.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone())
    print(*c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone())
if "again" in sys.argv[2:]:  # a page the first write did not touch
    c.execute("INSERT INTO u VALUES ('foreign, after its truncate')")
"""


def foreign(db: Path, *args: str) -> list[list[str]]:
    """Run FOREIGN_TRUNCATE: each checkpoint's (busy, log, checkpointed) as printed."""
    out = subprocess.run(
        [sys.executable, "-c", FOREIGN_TRUNCATE, str(db), *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return [line.split() for line in out.splitlines()]


def test_a_foreign_truncate_waits_for_unread_commits(file_replica, tmp_path, monkeypatch):
    """A process without the VFS commits and runs ``wal_checkpoint(TRUNCATE)`` while the
    leader's consumer is busy and the leader's last commit T is still unread.  SQLite's own
    read locks keep T's frames: the checkpoint reports busy instead of truncating, and one
    lineage holds T then the foreign commit, each restorable by txid and by time.  The lock
    stops nothing else: a checkpoint copies every frame, and once T is read the same
    truncate goes through.

    The leader's once-a-second look at the WAL for writers without the VFS would read T
    itself (and rightly let the truncate go) if it fell in the foreign process's run: it is
    held back meanwhile, so T stays unread."""
    import walsync_vfs
    from walsync_vfs import leader

    monkeypatch.setattr(leader.Host, "_poll_wal", lambda self: None)
    with gated(tmp_path) as (db, gate, con):
        con.execute("INSERT INTO t VALUES (1, 1, 0, 'first')")
        walsync_vfs.flush(timeout=30)
        gate.holding = True
        con.execute("INSERT INTO t VALUES (1, 2, 0, 'its batch waits')")
        assert gate.entered.wait(10)
        con.execute("INSERT INTO t VALUES (1, 3, 0, 'T')")
        after_t, t_time = content(db), time.time_ns()
        passive, truncate = foreign(db, "write")
        assert passive[0] == "0" and passive[1] == passive[2], passive
        assert truncate[0] == "1", f"the WAL was truncated over unread commits: {truncate}"
        after_foreign = content(db)
        monkeypatch.undo()
        gate.opened.set()
        walsync_vfs.flush(timeout=30)
        assert foreign(db) == [["0", "0", "0"]]
    client = storage.open_replica(file_replica)
    assert len(catalog.generations(client, db.name)) == 1
    url = f"{file_replica}/{db.name}"
    restore(url, str(tmp_path / "at-t.db"), timestamp_ns=t_time)
    assert content(tmp_path / "at-t.db") == after_t
    restore(url, str(tmp_path / "latest.db"))
    assert content(tmp_path / "latest.db") == after_foreign


def test_a_foreign_first_header_after_a_restart_continues_the_stream(
    file_replica, tmp_path, caplog
):
    """A process running the VFS truncates the WAL, and a process without it writes the new
    WAL's first frame: SQLite gives that header fresh random salts, which no shim recorded.
    The wal-index's change counter, which every commit steps and no restart resets, shows
    that the new WAL holds every commit since the leader's place: the leader reads on
    without a resync.  Another truncate before the leader's engine gets to those commits
    then costs nothing either: one generation, every restore point a state the source
    had."""
    import walsync_vfs

    caplog.set_level(logging.INFO, logger="walsync_vfs")
    with gated(tmp_path) as (db, gate, con):
        con.execute("INSERT INTO t VALUES (1, 1, 0, 'first')")
        walsync_vfs.flush(timeout=30)
        states = [content(db)]
        assert follower(db, file_replica) == 0
        foreign(db, "write", "--no-checkpoint")
        states.append(content(db))
        gate.holding = True
        con.execute("INSERT INTO t VALUES (1, 2, 0, 'after the foreign header')")
        assert gate.entered.wait(10)
        states.append(content(db))
        assert follower(db, file_replica, "INSERT INTO t VALUES (2, 1, 0, 'follower')") == 0
        states.append(content(db))
        gate.opened.set()
        con.execute("INSERT INTO t VALUES (1, 3, 0, 'last')")
        walsync_vfs.flush(timeout=30)
        states.append(content(db))
    assert "changed outside the stream" not in caplog.text
    client = storage.open_replica(file_replica)
    (gen,) = catalog.generations(client, db.name)
    url = f"{file_replica}/{db.name}"
    seen = []
    for txid in range(gen.snapshots[0].last_txid, gen.last_txid + 1):
        restore(url, str(tmp_path / f"at-{txid}.db"), txid=txid)
        seen.append(content(tmp_path / f"at-{txid}.db"))
    assert seen[-len(states) :] == states


def test_a_foreign_truncate_after_every_commit_was_read_continues_the_stream(
    file_replica, tmp_path, caplog
):
    """A process without the VFS truncates the WAL once the leader has read every commit:
    nothing to lose, and the change counter proves it, so the leader's next commit goes on
    in the same generation without a resync."""
    import walsync_vfs

    caplog.set_level(logging.INFO, logger="walsync_vfs")
    db, con = opened(tmp_path)
    try:
        con.execute("INSERT INTO t VALUES (1, 1, 0, 'first')")
        walsync_vfs.flush(timeout=30)
        assert foreign(db) == [["0", "0", "0"]]
        con.execute("INSERT INTO t VALUES (1, 2, 0, 'after the truncate')")
        walsync_vfs.flush(timeout=30)
    finally:
        con.close()
    assert "changed outside the stream" not in caplog.text
    client = storage.open_replica(file_replica)
    assert len(catalog.generations(client, db.name)) == 1
    restore(f"{file_replica}/{db.name}", str(tmp_path / "latest.db"))
    assert content(tmp_path / "latest.db") == content(db)


def test_a_foreign_restart_over_a_commit_the_leader_never_read_is_a_gap(
    file_replica, tmp_path, caplog
):
    """A process without the VFS commits, truncates the WAL and commits again, all before
    the leader looks: its first commit is gone from the WAL, and the new WAL holds only the
    second, which wrote other pages.  The commit counter counts two commits where the leader
    can read one, so the stream has a gap: the leader resyncs, and no restore point is ever
    the second commit without the first.  The lineage goes on in its generation through one
    commit of the pages the two changed, not a new snapshot."""
    import walsync_vfs

    caplog.set_level(logging.INFO, logger="walsync_vfs")
    db, con = opened(tmp_path)
    try:
        states = [tables_and_values(db)]
        con.execute("CREATE TABLE u(v TEXT)")
        states.append(tables_and_values(db))
        con.execute("INSERT INTO t VALUES (1, 1, 0, 'first')")
        walsync_vfs.flush(timeout=30)
        states.append(tables_and_values(db))
        assert foreign(db, "write", "again")[-1] == ["0", "0", "0"]
        states.append(tables_and_values(db))
        con.execute("INSERT INTO t VALUES (1, 2, 0, 'last')")
        walsync_vfs.flush(timeout=30)
        states.append(tables_and_values(db))
    finally:
        con.close()
    client = storage.open_replica(file_replica)
    url = f"{file_replica}/{db.name}"
    (gen,) = catalog.generations(client, db.name)
    assert len(gen.snapshots) == 1
    restored = []
    for txid in range(gen.snapshots[0].last_txid, gen.last_txid + 1):
        restore(url, str(tmp_path / "at.db"), txid=txid, force=True)
        restored.append(tables_and_values(tmp_path / "at.db"))
    # The foreign commits restore as one with the leader's commit that revealed the gap.
    assert restored == [states[0], states[1], states[2], states[4]]
    restore(url, str(tmp_path / "latest.db"))
    assert tables_and_values(tmp_path / "latest.db") == states[-1]
    assert "changed outside the stream" in caplog.text
    assert "pages changed outside the stream, as one commit)" in caplog.text


def test_a_foreign_commit_truncated_away_resyncs_from_an_empty_wal(file_replica, tmp_path, caplog):
    """A process without the VFS commits and truncates the WAL before the leader looks, and
    nobody commits after it: the leader's resync pins the database with no WAL frames.  Its
    one commit of the changed pages has no WAL position (the format's "unknown"), and ships."""
    import walsync_vfs

    caplog.set_level(logging.INFO, logger="walsync_vfs")
    db, con = opened(tmp_path)
    try:
        con.execute("INSERT INTO t VALUES (1, 1, 0, 'first')")
        walsync_vfs.flush(timeout=30)
        assert foreign(db, "write")[-1] == ["0", "0", "0"]
        walsync_vfs.flush(timeout=30)
        assert "pages changed outside the stream, as one commit)" in caplog.text
        (state,) = [s for s in walsync_vfs.stats() if s["name"] == db.name]
        assert state["errors"] == 0, state["last_error"]
    finally:
        con.close()
    restore(f"{file_replica}/{db.name}", str(tmp_path / "latest.db"))
    assert content(tmp_path / "latest.db") == content(db)


def test_the_last_close_still_removes_the_wal_and_its_index(file_replica, tmp_path):
    """The read lock for unread frames is held through a handle of the shim's own, which
    goes before the last connection's wal-index: SQLite still removes ``-wal`` and ``-shm``
    at the last close, as without the VFS."""
    import walsync_vfs

    db, con = opened(tmp_path)
    for k in range(20):
        con.execute("INSERT INTO t VALUES (1, ?, 0, 'x')", (k,))
    con.close()
    walsync_vfs.flush(timeout=30)
    wait_until_forgotten(str(db))
    assert not os.path.exists(f"{db}-wal") and not os.path.exists(f"{db}-shm")


def test_an_engine_connection_closing_after_the_application_removes_the_wal(file_replica, tmp_path):
    """A sync point's connection that outlives the application's last connection (a short
    script closing while its first sync runs) is then the last connection: its close
    checkpoints and removes ``-wal`` and ``-shm``, as the application's own close would have
    had it been the last."""
    import walsync_vfs

    db, con = opened(tmp_path)
    for k in range(20):
        con.execute("INSERT INTO t VALUES (1, ?, 0, 'x')", (k,))
    walsync_vfs.flush(timeout=30)  # the engine's own first sync is over: no other connection
    engine_side = capture.InternalConnection(str(db), 1000)  # as a sync point's reader
    assert engine_side.query("SELECT count(*) FROM t") == "20"
    rows = content(db)
    con.close()
    assert os.path.exists(f"{db}-wal")  # the application's close was not the last
    engine_side.close()
    assert not os.path.exists(f"{db}-wal") and not os.path.exists(f"{db}-shm")
    assert content(db) == rows


LINKS_SEQ = 264  # WsShared.links.seq in <db>-walsync (csrc/walsync.c)


def test_restarts_are_followed_after_a_process_died_writing_a_link(file_replica, tmp_path, caplog):
    """A process killed half-way through recording a WAL restart in the shared page leaves
    that record's sequence odd.  The next restart still records its link, so the leader
    follows another process's restart without a gap, as before."""
    import walsync_vfs

    caplog.set_level(logging.INFO, logger="walsync_vfs")
    db, con = opened(tmp_path)
    try:
        con.execute("CREATE TABLE u(v TEXT)")
        walsync_vfs.flush(timeout=30)
        with open(f"{db}-walsync", "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
            (seq,) = struct.unpack_from("=I", m, LINKS_SEQ)
            struct.pack_into("=I", m, LINKS_SEQ, seq | 1)
        follower(db, file_replica, "INSERT INTO u VALUES ('after the restart')")
        con.execute("INSERT INTO u VALUES ('after')")
        walsync_vfs.flush(timeout=30)
    finally:
        con.close()
    assert "changed outside the stream" not in caplog.text
    restore(f"{file_replica}/{db.name}", str(tmp_path / "latest.db"))
    assert tables_and_values(tmp_path / "latest.db") == tables_and_values(db)
