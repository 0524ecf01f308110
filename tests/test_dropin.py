"""Drop-in semantics: every database a walsync connection writes is replicated, the rest
(in-memory and temporary databases) passes through, and nothing of walsync's own shows."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import apsw
import pytest

import walsync_vfs
from walsync_vfs import capture, catalog, storage


@pytest.fixture
def replica(replica_url: str) -> Iterator[str]:
    walsync_vfs.configure(replica=replica_url, upload_interval=0.0)
    yield replica_url
    walsync_vfs.flush(timeout=60)
    walsync_vfs.configure(replica="", upload_interval=1.0)


def dump(con: apsw.Connection, schema: str = "main") -> list[tuple]:
    tables = [
        r[0]
        for r in con.execute(
            f"SELECT name FROM {schema}.sqlite_schema WHERE type='table' ORDER BY name"
        )
    ]
    rows = "SELECT * FROM {}.{} ORDER BY rowid"
    return [(t, con.execute(rows.format(schema, t)).fetchall()) for t in tables]


def python(*args: str) -> subprocess.CompletedProcess[str]:
    """This Python in a fresh process; it must succeed."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return proc


def restore(url: str, out: Path, txid: int | None = None) -> apsw.Connection:
    at = ["--txid", str(txid)] if txid is not None else []
    python("-m", "walsync_vfs", "restore", url, "-o", str(out), "--force", *at)
    con = apsw.Connection(str(out))
    assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    return con


def assert_restores(replica: str, path: Path, tmp_path: Path) -> None:
    walsync_vfs.flush(timeout=60)
    source = apsw.Connection(str(path))
    try:
        expected = dump(source)
    finally:
        source.close()
    out = restore(f"{replica}/{path.name}", tmp_path / f"restored-{path.name}")
    assert dump(out) == expected
    out.close()


def test_attached_database_is_replicated_under_its_own_name(replica, tmp_path):
    main, other = tmp_path / "main.db", tmp_path / "other.db"
    con = apsw.Connection(str(main), vfs="walsync")
    con.execute(f"ATTACH '{other}' AS o")
    con.execute("CREATE TABLE t(x); CREATE TABLE o.t(x)")
    for i in range(5):  # spans both: each restores to its own last commit
        con.execute(f"BEGIN; INSERT INTO t VALUES({i}); INSERT INTO o.t VALUES({i}); COMMIT")
    assert_restores(replica, other, tmp_path)
    assert {s["name"] for s in walsync_vfs.stats()} >= {"main.db", "other.db"}
    assert_restores(replica, main, tmp_path)
    con.execute("DETACH o")
    con.close()


def test_an_attached_database_flushed_before_its_detach_is_replicated(replica, tmp_path):
    """A new database attached for one commit and detached at once looks like a VACUUM INTO
    output; a flush() before the DETACH waits for the engine to take it up."""
    main, other = tmp_path / "main.db", tmp_path / "brief.db"
    con = apsw.Connection(str(main), vfs="walsync")
    con.execute(f"ATTACH '{other}' AS o")
    con.execute("CREATE TABLE o.t(x); INSERT INTO o.t VALUES(1)")
    walsync_vfs.flush(timeout=30)
    con.execute("DETACH o")
    assert_restores(replica, other, tmp_path)
    con.close()


LOCKED_EXCLUSIVE = (
    "a connection of this process keeps it locked in locking_mode=EXCLUSIVE (an ATTACH takes "
    "that mode from its connection's main database), so it cannot be replicated until that "
    "connection lets go of it; use locking_mode=NORMAL there"
)


def assert_flush_fails(path: Path, reason: str) -> None:
    """flush() fails at once: the replica of ``path`` is failing for ``reason``."""
    with pytest.raises(walsync_vfs.ReplicationError) as failed:
        walsync_vfs.flush(timeout=30)
    assert str(failed.value) == f"replica of {path} is failing: {path}: {reason}"


@pytest.mark.parametrize("replicated_before", [False, True])
def test_an_attached_database_locked_exclusive_fails_flush_until_released(
    replica, tmp_path, replicated_before
):
    """An ATTACH takes locking_mode=EXCLUSIVE from its connection's main database, where
    the VFS cannot refuse it: its commits are not lost without a word.  flush() fails at
    once saying why, and once that connection lets go they are replicated."""
    path = tmp_path / "attached.db"
    if replicated_before:
        con = apsw.Connection(str(path), vfs="walsync")
        con.execute("CREATE TABLE t(x); INSERT INTO t VALUES('before')")
        walsync_vfs.flush(timeout=30)
        con.close()
    uri = apsw.SQLITE_OPEN_URI | apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
    main = apsw.Connection(str(tmp_path / "plain.db"), flags=uri)  # not through walsync
    main.execute("PRAGMA locking_mode=EXCLUSIVE")
    main.execute(f"ATTACH 'file:{path}?vfs=walsync' AS b")
    main.execute("CREATE TABLE IF NOT EXISTS b.t(x)")
    for i in range(5):
        main.execute("INSERT INTO b.t VALUES(?)", (i,))
    assert_flush_fails(path, LOCKED_EXCLUSIVE)
    expected = dump(main, "b")
    main.close()
    con = apsw.Connection(str(path), vfs="walsync")  # the application's next run
    walsync_vfs.flush(timeout=30)
    con.close()
    out = restore(f"{replica}/{path.name}", tmp_path / "restored.db")
    assert dump(out) == expected
    out.close()


def read_attached_exclusive(path: Path, tmp_path: Path) -> apsw.Connection:
    """A connection in locking_mode=EXCLUSIVE, not through walsync, that has attached
    ``path`` through walsync and read it."""
    uri = apsw.SQLITE_OPEN_URI | apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
    main = apsw.Connection(str(tmp_path / "plain.db"), flags=uri)
    main.execute("PRAGMA locking_mode=EXCLUSIVE")
    main.execute(f"ATTACH 'file:{path}?vfs=walsync' AS b")
    assert main.execute("SELECT x FROM b.t").fetchall() == [(1,)]
    return main


def test_a_replicated_database_attached_exclusive_and_only_read_fails_flush(replica, tmp_path):
    """In WAL mode an EXCLUSIVE attach locks the file at its first read, commit or not."""
    path = tmp_path / "read.db"
    con = apsw.Connection(str(path), vfs="walsync")
    con.execute("CREATE TABLE t(x); INSERT INTO t VALUES(1)")
    walsync_vfs.flush(timeout=30)
    con.close()
    main = read_attached_exclusive(path, tmp_path)
    assert_flush_fails(path, LOCKED_EXCLUSIVE)
    main.close()
    walsync_vfs.flush(timeout=30)


def test_a_rollback_database_attached_exclusive_and_only_read_fails_flush(replica, tmp_path):
    """In rollback mode an EXCLUSIVE attach keeps even a read's lock: the switch to WAL
    cannot get in.  flush() fails soon saying why, not after a minute as "database is
    locked"; once that connection lets go the database is switched and replicated."""
    path = tmp_path / "rollback.db"
    plain = apsw.Connection(str(path))
    plain.execute("CREATE TABLE t(x); INSERT INTO t VALUES(1)")
    plain.close()
    main = read_attached_exclusive(path, tmp_path)
    started = time.monotonic()
    assert_flush_fails(
        path,
        "a connection of this process keeps it locked, so it cannot be switched to WAL and "
        "replicated until that connection lets go of it: in locking_mode=EXCLUSIVE (an ATTACH "
        "takes that mode from its connection's main database) even a read keeps its lock; use "
        "locking_mode=NORMAL there, or finish that connection's read",
    )
    assert time.monotonic() - started < 20
    main.close()
    assert_restores(replica, path, tmp_path)


def test_a_wal_another_sqlite_library_deleted_fails_flush_until_reopened(replica, tmp_path):
    """Stdlib sqlite3 beside apsw in one process: its last close checkpoints and deletes the
    WAL under apsw's connection (POSIX locks do not keep two copies of SQLite apart), whose
    commits then go to a file nobody else reads.  flush() says so at once instead of
    returning with the replica stuck; reopened, the connection's commits are replicated."""
    import sqlite3

    path = tmp_path / "two-libraries.db"
    con = apsw.Connection(str(path), vfs="walsync")
    con.execute("CREATE TABLE t(x); INSERT INTO t VALUES(1)")
    walsync_vfs.flush(timeout=30)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("INSERT INTO t VALUES(2)")
    other.close()
    con.execute("INSERT INTO t VALUES(3)")
    assert_flush_fails(
        path,
        "its WAL was deleted under this process's connections (by another SQLite library in "
        "the process, stdlib sqlite3 beside apsw; by the process this one was forked from "
        "while it had the database open, whose close checkpointed it; or with the database's "
        "files): their commits reach no file a replicator reads; close and reopen them, open a "
        "database with one library per process, and close it before fork()",
    )
    con.close()
    con = apsw.Connection(str(path), vfs="walsync")
    con.execute("INSERT INTO t VALUES(4)")
    walsync_vfs.flush(timeout=30)
    out = restore(f"{replica}/{path.name}", tmp_path / "restored.db")
    assert dump(out) == dump(con) == [("t", [(1,), (2,), (3,), (4,)])]
    out.close()
    con.close()


def vacuum_replicated_into(path: Path, copy: Path, vfs: str) -> None:
    """Make a replicated database, VACUUM INTO ``copy`` through ``vfs`` as soon as it is
    replicated, and read the output right after with a plain reader that meets any lock."""
    con = apsw.Connection(str(path), vfs="walsync")
    con.execute("CREATE TABLE t(v); INSERT INTO t VALUES('first'), ('second')")
    walsync_vfs.flush(timeout=30)
    vacuuming = apsw.Connection(str(path), vfs=vfs)
    vacuuming.execute(f"VACUUM INTO '{copy}'")
    vacuuming.close()
    out = apsw.Connection(str(copy))  # no busy timeout: any lock fails it
    assert out.execute("SELECT v FROM t").fetchall() == [("first",), ("second",)]
    out.close()
    con.close()


def test_vacuum_into_outputs_are_left_as_they_are(replica, tmp_path):
    """A VACUUM INTO output opens through walsync like an attached database, but is written
    in one transaction and closed: the engine leaves it in its journal mode, unreplicated,
    and never holds a lock on it that a plain reader right after would meet.  Twenty
    databases each vacuumed into an output as soon as it is replicated, so that the engine's
    look at an output falls before, during and after its write."""
    for i in range(20):
        vacuum_replicated_into(tmp_path / f"src{i}.db", tmp_path / f"copy{i}.db", "walsync")
    walsync_vfs.flush(timeout=30)
    for i in range(20):
        out = apsw.Connection(str(tmp_path / f"copy{i}.db"))
        out.setbusytimeout(5000)
        assert out.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        out.close()
    names = catalog.databases(storage.open_replica(replica))
    assert list(names) == [f"src{i}.db" for i in sorted(range(20), key=str)]


def test_a_vacuum_into_output_still_open_after_its_write_is_left_as_it_is(
    replica, tmp_path, monkeypatch
):
    """SQLite closes a VACUUM INTO output right after committing it, but a thread preempted
    in between leaves it open when the engine first looks.  A VFS over walsync holds the
    output's close until that look is done: the output must still come out as written."""
    looked = threading.Event()
    check = capture.SyncPoint._check_in_use

    def check_and_tell(self: capture.SyncPoint, *args: object) -> None:
        try:
            check(self, *args)
        finally:
            looked.set()

    monkeypatch.setattr(capture.SyncPoint, "_check_in_use", check_and_tell)
    copy = tmp_path / "copy.db"

    class HeldClose(apsw.VFSFile):
        def __init__(self, name: apsw.URIFilename | str | None, flags: list[int]) -> None:
            self.output = isinstance(name, apsw.URIFilename) and name.filename() == str(copy)
            super().__init__("walsync", name, flags)

        def xClose(self) -> None:
            if self.output:
                assert looked.wait(30), "the engine never looked at the output"
            super().xClose()

    class HoldingVFS(apsw.VFS):
        def __init__(self) -> None:
            super().__init__("held-close", "walsync")

        def xOpen(self, name: apsw.URIFilename | str | None, flags: list[int]) -> HeldClose:
            return HeldClose(name, flags)

    vfs = HoldingVFS()
    vacuum_replicated_into(tmp_path / "src.db", copy, "held-close")
    walsync_vfs.flush(timeout=30)
    with apsw.Connection(str(copy)) as out:
        assert out.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    assert list(catalog.databases(storage.open_replica(replica))) == ["src.db"]
    assert not Path(f"{copy}-wal").exists()
    vfs.unregister()


def test_memory_and_temporary_databases_pass_through(replica, tmp_path):
    for name in (":memory:", ""):
        con = apsw.Connection(name, vfs="walsync")
        con.execute("CREATE TABLE t(x); INSERT INTO t VALUES(1)")
        assert con.execute("SELECT x FROM t").fetchall() == [(1,)]
        con.close()
    con = apsw.Connection(str(tmp_path / "temps.db"), vfs="walsync")
    con.execute("CREATE TEMP TABLE tt(x); INSERT INTO tt VALUES(1); CREATE TABLE t(x)")
    con.execute("INSERT INTO t SELECT x FROM tt")
    names = {s["name"] or s["path"] for s in walsync_vfs.stats()}
    assert "" not in names and ":memory:" not in names
    assert [s["path"] for s in walsync_vfs.stats() if not s["path"]] == []
    assert_restores(replica, tmp_path / "temps.db", tmp_path)
    con.close()


@pytest.mark.parametrize("mode", ["DELETE", "MEMORY"])
def test_leaving_wal_stops_replication_loudly_and_wal_resumes_it(replica, tmp_path, caplog, mode):
    """Whatever the mode left for: the file only says "not WAL" to the engine's connections,
    so the error names no mode the application did not set."""
    path = tmp_path / "mode.db"
    con = apsw.Connection(str(path), vfs="walsync")
    con.execute("CREATE TABLE t(x); INSERT INTO t VALUES(1)")
    walsync_vfs.flush(timeout=30)
    with caplog.at_level(logging.ERROR, logger="walsync_vfs"):
        assert con.execute(f"PRAGMA journal_mode={mode}").fetchone() == (mode.lower(),)
        con.execute("INSERT INTO t VALUES(2)")
        with pytest.raises(walsync_vfs.ReplicationError) as info:
            walsync_vfs.flush(timeout=30)
    text = (
        f"{path}: no longer in WAL mode (a connection set another journal_mode): replication "
        "of it has stopped; run PRAGMA journal_mode=WAL on it to resume"
    )
    assert str(info.value) == f"replica of {path} is failing: {text}"
    (state,) = [s for s in walsync_vfs.stats() if s["name"] == "mode.db"]
    assert state["stopped"] and state["last_error"] == text
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        f"walsync: {text}"
    ]
    assert con.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
    con.execute("INSERT INTO t VALUES(3)")
    assert_restores(replica, path, tmp_path)  # flush() looks again at once and waits
    (state,) = [s for s in walsync_vfs.stats() if s["name"] == "mode.db"]
    assert not state["stopped"] and state["last_error"] == ""
    con.close()


def leave_wal(con: apsw.Connection) -> None:
    """PRAGMA journal_mode=DELETE, retried while walsync reads the database (README)."""
    for _ in range(500):
        try:
            assert con.execute("PRAGMA journal_mode=DELETE").fetchone() == ("delete",)
            return
        except apsw.BusyError:
            time.sleep(0.01)
    raise AssertionError("journal_mode=DELETE stayed busy")


@pytest.mark.parametrize("then", ["flush", "close"])
def test_commits_made_in_wal_ship_though_the_database_then_leaves_it(replica, tmp_path, then):
    """Commits made in WAL and still waiting for their upload when the application switches
    the database out of WAL are commits like any other: they reach the replica, whether it
    then flushes (which raises for the stop once they are in) or closes the database first
    (flush() then returns once they are in, or raises for the stop if walsync's own
    connection, the one that found it out of WAL, still had it open)."""
    walsync_vfs.configure(upload_interval=30.0)  # nothing ships on its own meanwhile
    path = tmp_path / "left.db"
    con = apsw.Connection(str(path), vfs="walsync")
    con.execute("CREATE TABLE t(x)")
    walsync_vfs.flush(timeout=30)
    for i in range(50):
        con.execute("INSERT INTO t VALUES(?)", (i,))
    leave_wal(con)
    if then == "flush":
        with pytest.raises(walsync_vfs.ReplicationError, match="no longer in WAL mode"):
            walsync_vfs.flush(timeout=30)
        con.close()
    else:
        con.close()
        try:
            walsync_vfs.flush(timeout=30)
        except walsync_vfs.ReplicationError as exc:
            assert "no longer in WAL mode" in str(exc)
    out = restore(f"{replica}/left.db", tmp_path / "out.db")
    assert out.execute("SELECT x FROM t ORDER BY rowid").fetchall() == [(i,) for i in range(50)]


def test_a_database_attached_with_nolock_is_left_alone_and_flush_says_why(replica, tmp_path):
    """SQLite refuses WAL to a connection that opened the file with nolock=1: switching it
    to WAL underneath would fail that connection's next statement.  It stays in its mode,
    its application goes on, and flush() says why it is not replicated."""
    flags = apsw.SQLITE_OPEN_URI | apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
    side = tmp_path / "nolock.db"
    con = apsw.Connection(str(tmp_path / "main.db"), vfs="walsync", flags=flags)
    con.execute(f"ATTACH 'file:{side}?nolock=1' AS n")
    con.execute("CREATE TABLE n.t(x)")
    with pytest.raises(walsync_vfs.ReplicationError) as info:
        walsync_vfs.flush(timeout=30)
    assert str(info.value) == (
        f"replica of {side} is failing: {side}: a connection of this process opened it with "
        "nolock=1, to which SQLite refuses WAL, so it cannot be replicated; open it without "
        "nolock (it is left in its journal mode)"
    )
    for i in range(5):
        con.execute("INSERT INTO n.t VALUES(?)", (i,))
    assert con.execute("SELECT count(*) FROM n.t").fetchone() == (5,)
    assert con.execute("PRAGMA n.journal_mode").fetchone() == ("delete",)
    con.execute("DETACH n")
    con.close()


def test_a_database_back_in_wal_resumes_within_half_a_second(replica, tmp_path):
    """While a database is out of WAL it is looked at again within half a second, however
    long it stays out: commits made back in WAL before the next look go into the resuming
    sync point's state, without restore points of their own."""
    path = tmp_path / "back.db"
    con = apsw.Connection(str(path), vfs="walsync")
    con.execute("CREATE TABLE t(x); INSERT INTO t VALUES(1)")
    walsync_vfs.flush(timeout=30)
    leave_wal(con)
    for _ in range(8):  # each flush looks again, and each look fails: the backoff grows
        with pytest.raises(walsync_vfs.ReplicationError):
            walsync_vfs.flush(timeout=30)
    db = walsync_vfs._engine_instance().database(str(path))
    assert db is not None and db.stopped
    assert con.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
    con.execute("INSERT INTO t VALUES(2)")
    began = time.monotonic()
    while db.stopped:
        assert time.monotonic() - began < 2.0, "resumed only after a long backoff"
        time.sleep(0.01)
    con.close()


class StackedVFS(apsw.VFS):
    """The usual way to add logging or encryption in apsw: a Python VFS over another."""

    def __init__(self, name: str, base: str) -> None:
        super().__init__(name, base)


def workload(con: apsw.Connection) -> None:
    con.execute("CREATE TABLE IF NOT EXISTS t(x)")
    for i in range(20):
        con.execute("INSERT INTO t VALUES(?)", (i,))
    for name in (":memory:", ""):
        side = apsw.Connection(name)
        side.execute("CREATE TABLE s(x); INSERT INTO s VALUES(1)")
        side.close()
    con.execute("CREATE TEMP TABLE tt(x); INSERT INTO t SELECT 99")


def test_python_vfs_stacked_on_walsync(replica, tmp_path):
    vfs = StackedVFS("stacked", "walsync")
    path = tmp_path / "stacked.db"
    con = apsw.Connection(str(path), vfs="stacked")
    assert con.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
    workload(con)
    assert_restores(replica, path, tmp_path)
    con.close()
    vfs.unregister()


def test_walsync_as_default_vfs_under_a_python_vfs(replica, tmp_path):
    apsw.set_default_vfs("walsync")
    try:
        vfs = StackedVFS("libvfs", "")  # a library's own VFS, over the default
        path, other = tmp_path / "default.db", tmp_path / "lib.db"
        con = apsw.Connection(str(path))
        workload(con)
        lib = apsw.Connection(str(other), vfs="libvfs")
        lib.execute("PRAGMA journal_mode=WAL")
        workload(lib)
        assert_restores(replica, path, tmp_path)
        assert_restores(replica, other, tmp_path)
        lib.close()
        con.close()
        vfs.unregister()
    finally:
        apsw.set_default_vfs("unix")


def test_internal_connections_are_invisible(replica, tmp_path):
    before = set(map(id, apsw.connections()))
    con = apsw.Connection(str(tmp_path / "mine.db"), vfs="walsync")
    con.execute("CREATE TABLE t(x); INSERT INTO t VALUES(1)")
    walsync_vfs.flush(timeout=30)
    assert [c for c in apsw.connections() if id(c) not in before] == [con]
    con.close()


def test_replication_without_the_connection_hook(replica, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(apsw, "connection_hooks", [])  # the application's own choice
    path = tmp_path / "hookless.db"
    with caplog.at_level(logging.WARNING, logger="walsync_vfs"):
        con = apsw.Connection(str(path), vfs="walsync")
        con.set_busy_timeout(10_000)  # the engine switches it to WAL under it
        workload(con)
        assert_restores(replica, path, tmp_path)
        con.execute("INSERT INTO t VALUES('after')")
        assert_restores(replica, path, tmp_path)
    assert [r.getMessage() for r in caplog.records] == []
    assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    con.close()


# ---------------------------------------------------------------- connection options sweep


def _uri(path: Path, _open: apsw.Connection) -> None:
    con = apsw.Connection(f"file:{path}?cache=private", flags=_URI_RW, vfs="walsync")
    con.execute("INSERT INTO t VALUES('uri')")
    con.close()


_URI_RW = apsw.SQLITE_OPEN_URI | apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE


def _read_only(path: Path, _open: apsw.Connection) -> None:
    for name, flags in (
        (str(path), apsw.SQLITE_OPEN_READONLY),
        (f"file:{path}?mode=ro", apsw.SQLITE_OPEN_URI | apsw.SQLITE_OPEN_READONLY),
    ):
        ro = apsw.Connection(name, flags=flags, vfs="walsync")
        assert ro.execute("SELECT count(*) FROM t").fetchone()[0] >= 1
        with pytest.raises(apsw.ReadOnlyError):
            ro.execute("INSERT INTO t VALUES('no')")
        ro.close()
    with apsw.Connection(str(path), vfs="walsync") as con:
        con.execute("INSERT INTO t VALUES('after ro')")


def _shared_cache(path: Path, _open: apsw.Connection) -> None:
    flags = _URI_RW | apsw.SQLITE_OPEN_SHAREDCACHE
    a = apsw.Connection(str(path), flags=flags, vfs="walsync")
    b = apsw.Connection(str(path), flags=flags, vfs="walsync")
    a.execute("INSERT INTO t VALUES('shared a')")
    b.execute("INSERT INTO t VALUES('shared b')")
    b.close()
    a.close()


def _attach_detach(path: Path, _open: apsw.Connection) -> None:
    con = apsw.Connection(str(path), vfs="walsync")
    con.execute(f"ATTACH '{path.with_name('side.db')}' AS s; CREATE TABLE s.x(v)")
    con.execute("INSERT INTO s.x VALUES(1); INSERT INTO t VALUES('attached')")
    con.execute("DETACH s")
    con.close()


def _temp_tables(path: Path, _open: apsw.Connection) -> None:
    con = apsw.Connection(str(path), vfs="walsync")
    con.execute("CREATE TEMP TABLE tt(v); INSERT INTO tt VALUES('temp')")
    con.execute("INSERT INTO t SELECT v FROM tt")
    con.close()


def _vacuum(path: Path, _open: apsw.Connection) -> None:
    con = apsw.Connection(str(path), vfs="walsync")
    con.execute("DELETE FROM t WHERE rowid % 2; VACUUM")
    con.execute("INSERT INTO t VALUES('after vacuum')")
    con.close()


def _immutable(path: Path, con: apsw.Connection) -> None:
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # immutable=1 reads the file, not the WAL
    flags = apsw.SQLITE_OPEN_URI | apsw.SQLITE_OPEN_READONLY
    ro = apsw.Connection(f"file:{path}?immutable=1", flags=flags, vfs="walsync")
    assert ro.execute("SELECT count(*) FROM sqlite_schema").fetchone() == (1,)
    ro.close()


def _page_size_vacuum(path: Path, con: apsw.Connection) -> None:
    """SQLite changes a WAL database's page size only out of WAL, on its only connection:
    replication stops meanwhile and resumes in a new generation."""
    assert con.execute("PRAGMA journal_mode=DELETE").fetchone() == ("delete",)
    con.execute("PRAGMA page_size=8192")
    con.execute("VACUUM")
    assert con.execute("PRAGMA page_size").fetchone() == (8192,)
    assert con.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)


def _vacuum_into(path: Path, _open: apsw.Connection) -> None:
    con = apsw.Connection(str(path), vfs="walsync")
    copy = path.with_name("copy.db")
    con.execute(f"VACUUM INTO '{copy}'")
    con.close()
    with apsw.Connection(str(copy)) as out, apsw.Connection(str(path)) as source:
        assert dump(out) == dump(source)


def _backup(path: Path, _open: apsw.Connection) -> None:
    source = apsw.Connection(":memory:")
    source.execute("CREATE TABLE t(v); INSERT INTO t VALUES('from backup')")
    con = apsw.Connection(str(path), vfs="walsync")
    with con.backup("main", source, "main") as b:  # into the walsync database
        b.step()
    out = apsw.Connection(str(path.with_name("backup-out.db")))
    with out.backup("main", con, "main") as b:  # and out of it
        b.step()
    assert dump(out) == dump(con)
    con.execute("INSERT INTO t VALUES('after backup')")
    for c in (out, con, source):
        c.close()


def _checkpoints(path: Path, _open: apsw.Connection) -> None:
    con = apsw.Connection(str(path), vfs="walsync")
    for mode in ("PASSIVE", "FULL", "RESTART", "TRUNCATE"):
        con.execute(f"INSERT INTO t VALUES('{mode}')")
        con.execute(f"PRAGMA wal_checkpoint({mode})")
        con.execute(f"INSERT INTO t VALUES('after {mode}')")
    con.close()


def _incremental_vacuum(path: Path, _open: apsw.Connection) -> None:
    con = apsw.Connection(str(path), vfs="walsync")
    con.execute("PRAGMA auto_vacuum=INCREMENTAL; VACUUM")
    con.execute("INSERT INTO t SELECT randomblob(5000) FROM t; DELETE FROM t WHERE rowid > 2")
    con.execute("PRAGMA incremental_vacuum")
    con.execute("INSERT INTO t VALUES('after incremental vacuum')")
    con.close()


SWEEP: dict[str, Callable[[Path, apsw.Connection], None]] = {
    f.__name__.lstrip("_"): f
    for f in (
        _uri, _read_only, _immutable, _shared_cache, _attach_detach, _temp_tables, _vacuum,
        _page_size_vacuum, _vacuum_into, _backup, _checkpoints, _incremental_vacuum,
    )
}  # fmt: skip


@pytest.mark.parametrize("op", sorted(SWEEP))
def test_connection_option_sweep_restores_equal(op, replica, tmp_path):
    path = tmp_path / f"{op}.db"
    con = apsw.Connection(str(path), vfs="walsync")
    con.execute("CREATE TABLE t(v); INSERT INTO t VALUES('first'), ('second'), ('third')")
    walsync_vfs.flush(timeout=30)
    SWEEP[op](path, con)
    con.execute("INSERT INTO t VALUES('last')")
    assert_restores(replica, path, tmp_path)
    con.close()


# ---------------------------------------------------------------- errors a user can hit


@pytest.mark.parametrize(
    ("options", "kind", "text"),
    [
        (
            {"upload_intervall": 1.0},
            walsync_vfs.config.UnknownKeyError,
            "configure(): unknown key 'upload_intervall'; known: client_options, "
            "compact_segments, config, fencing, lease_time, max_segment_bytes, memory_cap, "
            "metrics_port, name, replica, retention, snapshot_interval, spool_cap, spool_dir, "
            "upload_burst, upload_interval, upload_workers",
        ),
        (
            {"replica": 123},
            walsync_vfs.ConfigError,
            "configure(): replica must be a URL or a path, got 123",
        ),
        (
            {"upload_interval": "fast"},
            walsync_vfs.ConfigError,
            "configure(): upload_interval must be a number, got 'fast'",
        ),
        (
            {"memory_cap": "big"},
            walsync_vfs.ConfigError,
            "configure(): memory_cap must be a positive integer, got 'big'",
        ),
        (
            {"spool_dir": 3},
            walsync_vfs.ConfigError,
            "configure(): spool_dir must be a directory path, got 3",
        ),
        (
            {"spool_dir": "/nonexistent/walsync-spool"},
            walsync_vfs.ConfigError,
            "configure(): spool_dir /nonexistent/walsync-spool is not a directory; create it or "
            "name one",
        ),
        (
            {"client_options": {"endpoint": "http://127.0.0.1:9000"}},
            walsync_vfs.config.UnknownKeyError,
            "configure(): client_options: unknown key 'endpoint'; known: endpoint_url, "
            "multipart_threshold, part_size, path_style, region, transfer_workers",
        ),
        (
            {"replica": "ftp://host/x"},
            walsync_vfs.StorageError,
            "invalid replica URL 'ftp://host/x': unsupported scheme 'ftp'; use "
            "file:///absolute/dir, a directory path, or s3://bucket/optional/prefix",
        ),
    ],
)
def test_configure_errors_are_walsync_errors_saying_what_to_do(replica, options, kind, text):
    with pytest.raises(kind) as info:
        walsync_vfs.configure(**options)
    assert type(info.value) is kind and str(info.value) == text
    walsync_vfs.flush(timeout=30)  # the settings before the call still apply


def test_s3_client_options_leave_a_file_replica_alone(file_replica, tmp_path):
    """One set of client_options serves every root a process replicates to: a file root
    takes none, and ignores those of S3 (it used to fail with a TypeError)."""
    walsync_vfs.configure(client_options={"endpoint_url": "http://127.0.0.1:1"})
    try:
        con = apsw.Connection(str(tmp_path / "f.db"), vfs="walsync")
        con.execute("CREATE TABLE t(x); INSERT INTO t VALUES(1)")
        walsync_vfs.flush(timeout=30)
        got = restore(f"{file_replica}/f.db", tmp_path / "out.db")
        assert got.execute("SELECT x FROM t").fetchall() == [(1,)]
        con.close()
    finally:
        walsync_vfs.configure(client_options={})


def test_a_flush_out_of_time_is_a_walsync_timeout_saying_what_to_do(replica, tmp_path):
    path = tmp_path / "late.db"
    con = apsw.Connection(str(path), vfs="walsync")
    con.execute("CREATE TABLE t(x)")
    with pytest.raises(walsync_vfs.FlushTimeoutError) as info:
        walsync_vfs.flush(timeout=-1)
    assert str(info.value) in (  # out of time before or after the commit reached the engine
        "flush timed out before the capture thread handed over every commit; give "
        "flush() more time",
        f"flush timed out; not yet replicated: {path}; see walsync_vfs.stats() for their "
        "lag and last_error, or give flush() more time",
    )
    assert isinstance(info.value, TimeoutError)
    con.close()


LAST_CLOSE = """
import sys, threading
import apsw, walsync_vfs
walsync_vfs.configure(replica=sys.argv[2], upload_interval=0.0)
for round in range(2):  # the second open starts what the first close ended
    con = apsw.Connection(sys.argv[1], vfs="walsync")
    con.execute("CREATE TABLE IF NOT EXISTS t(x); INSERT INTO t VALUES(1)")
    walsync_vfs.flush(timeout=60)
    con.close()
    walsync_vfs.flush(timeout=60)
    for t in threading.enumerate():
        if t.name.startswith("walsync"):
            t.join(timeout=30)
    print(sorted(t.name for t in threading.enumerate() if t is not threading.main_thread()))
print(walsync_vfs.stats())
"""


def test_no_thread_outlives_the_last_close(replica_url, tmp_path):
    path = tmp_path / "last.db"
    proc = python("-c", LAST_CLOSE, str(path), replica_url)
    assert proc.stdout.splitlines() == ["[]", "[]", "[]"]
    out = restore(f"{replica_url}/last.db", tmp_path / "restored.db")
    assert dump(out) == [("t", [(1,), (1,)])]
    out.close()


# ---------------------------------------------------------------- commits held during a sync


class GatedStore:
    """The replica's client, each call waiting for ``gate``: a sync started while it is shut
    cannot finish, so every commit made meanwhile is held."""

    def __init__(self, client: object) -> None:
        self._client = client
        self.gate = threading.Event()
        self.gate.set()

    def __getattr__(self, name: str) -> object:
        call = getattr(self._client, name)
        if not callable(call):
            return call  # an attribute (url, create_only): nothing to wait for

        def gated(*args: object, **kwargs: object) -> object:
            self.gate.wait(60)
            return call(*args, **kwargs)

        return gated


@pytest.fixture
def gated(replica_url: str) -> Iterator[GatedStore]:
    walsync_vfs.configure(replica=replica_url, upload_interval=0.0, memory_cap=64 << 10)
    engine = walsync_vfs._engine_instance()
    store = GatedStore(storage.open_replica(replica_url))
    engine._clients[replica_url] = store  # the engine's client for that root from now on
    yield store
    store.gate.set()
    walsync_vfs.flush(timeout=60)
    engine._clients.pop(replica_url)
    walsync_vfs.configure(replica="", upload_interval=1.0, memory_cap=64 << 20, spool_cap=1 << 30)


def reopen_behind_a_shut_gate(path: Path, store: GatedStore) -> apsw.Connection:
    """A reopened database syncs again; behind the shut gate that sync cannot finish."""
    con = apsw.Connection(str(path), vfs="walsync")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    walsync_vfs.flush(timeout=30)
    con.close()
    store.gate.clear()
    return apsw.Connection(str(path), vfs="walsync")


def state_of(name: str) -> dict:
    (state,) = [s for s in walsync_vfs.stats() if s["name"] == name]
    return state


def test_commits_held_during_a_sync_keep_their_restore_points_in_the_spool(gated, tmp_path):
    con = reopen_behind_a_shut_gate(tmp_path / "held.db", gated)
    for _ in range(40):  # 40 x 3000 bytes: past a quarter of the 64 KiB memory cap
        con.execute("INSERT INTO t(v) VALUES(randomblob(3000))")
    capture.dispatcher().barrier(10)  # the engine has seen every commit
    engine = walsync_vfs._engine_instance()
    assert state_of("held.db")["syncing"] and engine._spool.used > 0
    gated.gate.set()
    walsync_vfs.flush(timeout=120)
    assert engine._spool.used == 0 and state_of("held.db")["lost_restore_points"] == 0
    url = walsync_vfs._settings.defaults.replica
    (gen,) = catalog.generations(storage.open_replica(url), "held.db")
    for back in (0, 1, 20):  # every held commit is a restore point of its own
        out = restore(f"{url}/held.db", tmp_path / f"r{back}.db", gen.last_txid - back)
        assert dump(out) == [("t", dump(con)[0][1][: 40 - back])]
        out.close()
    con.close()


def test_commits_held_during_a_sync_come_back_a_share_of_the_memory_cap_at_a_time(
    gated, tmp_path, monkeypatch
):
    """Held commits read back from the spool all at once would take all their bytes in
    memory (a fast writer held behind a slow first sync: hundreds of MiB).  They are
    appended a quarter of the memory cap at a time, waiting for the uploader to spill or
    ship past the cap; every one keeps its restore point."""
    con = reopen_behind_a_shut_gate(tmp_path / "many.db", gated)
    for _ in range(200):  # 200 x 3000 bytes: about 9 times the 64 KiB memory cap
        con.execute("INSERT INTO t(v) VALUES(randomblob(3000))")
    capture.dispatcher().barrier(10)
    engine = walsync_vfs._engine_instance()
    (db,) = [d for d in engine._dbs.values() if d.name == "many.db"]
    peak = 0
    append = engine._append

    def noted(db_: object, rec: object) -> None:
        nonlocal peak
        append(db_, rec)
        peak = max(peak, db.upload.memory)

    monkeypatch.setattr(engine, "_append", noted)
    gated.gate.set()
    walsync_vfs.flush(timeout=120)
    cap = walsync_vfs._settings.memory_cap
    assert 0 < peak <= cap + cap // 4 + 2 * 4096  # a quarter more, and a commit's pages
    assert state_of("many.db")["lost_restore_points"] == 0
    url = walsync_vfs._settings.defaults.replica
    (gen,) = catalog.generations(storage.open_replica(url), "many.db")
    for back in (0, 1, 150):
        out = restore(f"{url}/many.db", tmp_path / f"r{back}.db", gen.last_txid - back)
        assert dump(out) == [("t", dump(con)[0][1][: 200 - back])]
        out.close()
    con.close()


def test_held_commits_past_the_spool_cap_are_counted_as_lost_restore_points(gated, tmp_path):
    walsync_vfs.configure(spool_cap=40_000)  # room for a few held commits, not for 40
    con = reopen_behind_a_shut_gate(tmp_path / "lost.db", gated)
    for _ in range(40):
        con.execute("INSERT INTO t(v) VALUES(randomblob(3000))")
    capture.dispatcher().barrier(10)
    state = state_of("lost.db")
    assert state["lost_restore_points"] > 0
    assert state["last_error"] == "spool: spool cap of 40000 bytes reached"
    gated.gate.set()
    walsync_vfs.flush(timeout=120)
    assert state_of("lost.db")["lost_restore_points"] == state["lost_restore_points"]
    url = walsync_vfs._settings.defaults.replica
    out = restore(f"{url}/lost.db", tmp_path / "r.db")
    assert dump(out) == dump(con)
    assert len(catalog.generations(storage.open_replica(url), "lost.db")) == 2
    out.close()
    con.close()
