"""Issue: the replication pipeline.  Write through the VFS, flush, restore with the CLI, compare."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import apsw
import pytest
from foreign import write_while_closed

import walsync_vfs
from walsync_vfs import format, storage


@pytest.fixture
def replica(replica_url):
    """Replicate databases opened in the test to a fresh root on the parametrized backend."""
    walsync_vfs.configure(replica=replica_url)
    yield replica_url
    walsync_vfs.flush(timeout=30)  # leave no upload running into the next test's settings
    walsync_vfs.configure(replica="")


def open_db(path: Path) -> apsw.Connection:
    con = apsw.Connection(str(path), vfs="walsync")
    con.set_busy_timeout(10_000)
    return con


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "walsync_vfs", *args], capture_output=True, text=True, timeout=120
    )


def restore(url: str, out: Path, *extra: str) -> apsw.Connection:
    proc = cli("restore", url, "-o", str(out), *extra)
    assert proc.returncode == 0, proc.stderr
    con = apsw.Connection(str(out))
    assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    return con


def replicate_keep(tmp_path: Path) -> None:
    """keep.db, one row in t, replicated and closed: something to restore."""
    con = open_db(tmp_path / "keep.db")
    con.execute("CREATE TABLE t(x); INSERT INTO t VALUES(1)")
    walsync_vfs.flush(timeout=30)
    con.close()


def rows(con: apsw.Connection, table: str = "t") -> list[tuple]:
    return con.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()


def test_round_trip_small_big_checkpoints_reopen(replica, tmp_path):
    path = tmp_path / "app.db"
    con = open_db(path)
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    for i in range(300):
        con.execute("INSERT INTO t(v) VALUES(?)", (f"row {i}",))
    con.execute("PRAGMA cache_size=5")
    with con:  # big transaction that spills
        con.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000) "
            "INSERT INTO t(v) SELECT randomblob(300) FROM n"
        )
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.execute("UPDATE t SET v = randomblob(50) WHERE id % 7 = 0")
    con.execute("DELETE FROM t WHERE id % 11 = 0")
    con.close()  # clean close: checkpoint and WAL deleted

    con = open_db(path)  # reopen: the lineage continues
    con.execute("INSERT INTO t(v) VALUES('after reopen')")
    walsync_vfs.flush(timeout=30)

    out = restore(f"{replica}/app.db", tmp_path / "restored.db")
    assert rows(out) == rows(con)
    client = storage.open_replica(replica)
    gens = {k.generation for o in client.list("app.db/") if (k := format.parse_key(o.key))}
    assert len(gens) == 1
    con.close()


def test_several_databases_at_once(replica, tmp_path):
    cons = {}
    for i in range(6):
        cons[i] = open_db(tmp_path / f"tenant{i}.db")
        cons[i].execute("CREATE TABLE t(k, v)")
    for round_ in range(25):
        for i, con in cons.items():
            con.execute("INSERT INTO t VALUES(?, randomblob(?))", (round_, 50 * (i + 1)))
    walsync_vfs.flush(timeout=30)
    for i, con in cons.items():
        out = restore(f"{replica}/tenant{i}.db", tmp_path / f"r{i}.db")
        assert rows(out) == rows(con)
        assert len(rows(out)) == 25
        con.close()


def test_txids_are_consecutive_and_restore_by_txid(replica, tmp_path):
    con = open_db(tmp_path / "tx.db")
    con.execute("CREATE TABLE t(x)")
    for i in range(20):
        con.execute("INSERT INTO t VALUES(?)", (i,))
    walsync_vfs.flush(timeout=30)
    client = storage.open_replica(replica)
    keys = sorted(
        (k for o in client.list("tx.db/") if (k := format.parse_key(o.key))),
        key=lambda k: k.first_txid,
    )
    snap = keys[0]
    assert snap.kind == "snapshot"
    expected = snap.last_txid + 1
    for k in keys[1:]:
        assert k.first_txid == expected
        expected = k.last_txid + 1
    last = expected - 1
    out = restore(f"{replica}/tx.db", tmp_path / "at.db", "--txid", str(last - 5))
    assert len(rows(out)) == 15
    con.close()


def test_flipped_byte_is_caught_naming_the_object(replica, tmp_path):
    con = open_db(tmp_path / "flip.db")
    con.execute("CREATE TABLE t(x)")
    for i in range(5):
        con.execute("INSERT INTO t VALUES(?)", (i,))
    walsync_vfs.flush(timeout=30)
    con.close()
    client = storage.open_replica(replica)
    for obj in client.list("flip.db/"):
        data = bytearray(client.get(obj.key))
        data[len(data) // 2] ^= 0x40
        client.put(obj.key, bytes(data))
        proc = cli("restore", f"{replica}/flip.db", "-o", str(tmp_path / "x.db"))
        assert proc.returncode == 1
        assert proc.stderr.startswith(f"walsync: error: {obj.key}: ")
        assert proc.stderr.count("\n") == 1
        assert not (tmp_path / "x.db").exists()
        data[len(data) // 2] ^= 0x40
        client.put(obj.key, bytes(data))
    restore(f"{replica}/flip.db", tmp_path / "ok.db")


def test_restore_refuses_to_overwrite_without_force(replica, tmp_path):
    con = open_db(tmp_path / "keep.db")
    con.execute("CREATE TABLE t(x); INSERT INTO t VALUES(1)")
    walsync_vfs.flush(timeout=30)
    out = tmp_path / "exists.db"
    out.write_bytes(b"precious")
    proc = cli("restore", f"{replica}/keep.db", "-o", str(out))
    assert proc.returncode == 1
    assert proc.stderr == f"walsync: error: {out} already exists; pass --force to overwrite it\n"
    assert out.read_bytes() == b"precious"
    assert rows(restore(f"{replica}/keep.db", out, "--force")) == [(1,)]
    con.close()


def test_restore_installs_only_where_a_database_file_can_go(replica, tmp_path):
    """A pipe or a directory at the output path is never replaced, --force or not; a
    missing directory or an empty path is named as such, not as a temporary file."""
    replicate_keep(tmp_path)
    pipe, folder = tmp_path / "pipe", tmp_path / "folder"
    os.mkfifo(pipe)
    folder.mkdir()
    for out in (pipe, folder):
        proc = cli("restore", f"{replica}/keep.db", "-o", str(out), "--force")
        assert proc.returncode == 1
        assert proc.stderr == (
            f"walsync: error: {out} exists and is not a regular file; restore to a file path\n"
        )
    assert stat.S_ISFIFO(os.stat(pipe).st_mode) and folder.is_dir()
    missing = tmp_path / "nodir"
    proc = cli("restore", f"{replica}/keep.db", "-o", str(missing / "x.db"))
    assert proc.returncode == 1
    assert proc.stderr == f"walsync: error: {missing}: no such directory to restore x.db in\n"
    proc = cli("restore", f"{replica}/keep.db", "-o", str(tmp_path / "no\ndir" / "x.db"))
    assert proc.returncode == 1  # a control character is escaped: still one line
    assert proc.stderr == (
        f"walsync: error: {tmp_path}/no\\ndir: no such directory to restore x.db in\n"
    )
    proc = cli("restore", f"{replica}/keep.db", "-o", "")
    assert proc.returncode == 1
    assert proc.stderr == (
        "walsync: error: the output path is empty; name the database file to write\n"
    )


def test_restore_force_refuses_a_database_that_is_open(replica, tmp_path):
    """--force replaces a file, not a live database: while a connection has it open in WAL
    mode, a restore over it would leave the writer writing to a replaced file."""
    con = open_db(tmp_path / "keep.db")
    con.execute("CREATE TABLE t(x); INSERT INTO t VALUES(1)")
    walsync_vfs.flush(timeout=30)
    live = tmp_path / "live.db"
    app = apsw.Connection(str(live))
    assert app.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
    app.execute("CREATE TABLE mine(y); INSERT INTO mine VALUES(7)")
    proc = cli("restore", f"{replica}/keep.db", "-o", str(live), "--force")
    assert proc.returncode == 1
    assert proc.stderr == (
        f"walsync: error: {live} is open (its wal-index is in use); close it first, or "
        "restore to another path\n"
    )
    assert app.execute("SELECT y FROM mine").fetchall() == [(7,)]
    app.close()
    assert rows(restore(f"{replica}/keep.db", live, "--force")) == [(1,)]
    con.close()


def test_restore_names_a_directory_path_and_standard_output_as_no_file(replica, tmp_path):
    """``-o dir/`` and ``-o -`` are not file names a user means: refused, nothing written."""
    replicate_keep(tmp_path)
    slash = f"{tmp_path / 'restored'}/"
    proc = cli("restore", f"{replica}/keep.db", "-o", slash)
    assert (proc.returncode, proc.stderr) == (
        1,
        f"walsync: error: {slash} names a directory; name the database file to write\n",
    )
    proc = cli("restore", f"{replica}/keep.db", "-o", "-")
    assert (proc.returncode, proc.stderr) == (
        1,
        "walsync: error: restore writes a database file, not standard output; name the file\n",
    )
    assert not (tmp_path / "restored").exists() and not (Path.cwd() / "-").exists()


def test_restore_force_refuses_a_rollback_database_inside_a_transaction(replica, tmp_path):
    """In a rollback journal mode only a transaction holds a lock: a reader inside one is
    seen (an idle connection is not, and goes on reading the file it opened)."""
    con = open_db(tmp_path / "keep.db")
    con.execute("CREATE TABLE t(x); INSERT INTO t VALUES(1)")
    walsync_vfs.flush(timeout=30)
    live = tmp_path / "live.db"
    app = apsw.Connection(str(live))
    app.execute("CREATE TABLE mine(y); INSERT INTO mine VALUES(7)")
    app.execute("BEGIN")
    assert app.execute("SELECT y FROM mine").fetchall() == [(7,)]  # SHARED held
    proc = cli("restore", f"{replica}/keep.db", "-o", str(live), "--force")
    assert (proc.returncode, proc.stderr) == (
        1,
        f"walsync: error: {live} is open (a connection is inside a transaction on it); close "
        "it first, or restore to another path\n",
    )
    app.execute("COMMIT")
    assert rows(restore(f"{replica}/keep.db", live, "--force")) == [(1,)]
    app.close()
    con.close()


def test_restore_through_a_symlink_writes_and_guards_its_target(replica, tmp_path):
    """A database reached through a symlink (an app path onto a volume) is restored where
    the link points, the link kept; an open target is refused through the link too."""
    replicate_keep(tmp_path)
    (tmp_path / "vol").mkdir()
    target, link = tmp_path / "vol" / "app.db", tmp_path / "app.db"
    link.symlink_to(target)
    app = apsw.Connection(str(link))
    assert app.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
    app.execute("CREATE TABLE mine(y); INSERT INTO mine VALUES(7)")
    proc = cli("restore", f"{replica}/keep.db", "-o", str(link), "--force")
    assert (proc.returncode, proc.stderr) == (
        1,
        f"walsync: error: {target} is open (its wal-index is in use); close it first, or "
        "restore to another path\n",
    )
    app.close()
    assert rows(restore(f"{replica}/keep.db", link, "--force")) == [(1,)]
    assert link.is_symlink() and rows(apsw.Connection(str(target))) == [(1,)]


def test_restore_of_unknown_database_fails_clearly(replica, tmp_path):
    proc = cli("restore", f"{replica}/nothing.db", "-o", str(tmp_path / "n.db"))
    assert proc.returncode == 1
    assert proc.stderr.startswith("walsync: error: no replica of 'nothing.db' found at ")


def test_a_foreign_restart_of_the_wal_goes_on_with_the_pages_it_changed(replica, tmp_path):
    """A process without the shim that commits, then checkpoints and truncates the WAL, erases
    frames the engine has not read: a gap.  The engine knows each page's hash at the
    lineage's end, so the lineage goes on in its generation with one commit of the pages
    that differ; a restart while the database is closed starts a new generation, its txids
    continuing the old ones."""
    path = tmp_path / "shared.db"
    con = open_db(path)
    con.execute("CREATE TABLE t(x)")
    for i in range(5):
        con.execute("INSERT INTO t VALUES(?)", (i,))
    walsync_vfs.flush(timeout=30)
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1], isolation_level=None); "
            "c.execute('INSERT INTO t VALUES(100)'); c.execute('PRAGMA wal_checkpoint(TRUNCATE)')",
            str(path),
        ],
        check=True,
    )
    con.execute("INSERT INTO t VALUES(6)")
    walsync_vfs.flush(timeout=30)
    out = restore(f"{replica}/shared.db", tmp_path / "r.db")
    assert sorted(rows(out)) == sorted(rows(con))
    assert (100,) in rows(out)
    client = storage.open_replica(replica)

    def generations() -> list[list[format.ParsedKey]]:
        keys = [k for o in client.list("shared.db/") if (k := format.parse_key(o.key))]
        names = sorted({k.generation for k in keys})
        return [[k for k in keys if k.generation == g] for g in names]

    (gen,) = generations()
    end = 0
    for first, last in sorted((k.first_txid, k.last_txid) for k in gen):
        assert first <= end + 1, "a txid is missing"
        end = max(end, last)
    con.close()
    write_while_closed(path, "INSERT INTO t VALUES(200)")
    con = open_db(path)
    con.execute("INSERT INTO t VALUES(7)")
    walsync_vfs.flush(timeout=30)
    old, new = generations()
    assert min(k.first_txid for k in new) == max(k.last_txid for k in old) + 1
    out = restore(f"{replica}/shared.db", tmp_path / "r2.db")
    assert sorted(rows(out)) == sorted(rows(con))
    con.close()
    con.close()


def test_names_cannot_escape_the_root(tmp_path):
    with pytest.raises(ValueError, match="invalid database name '../x'"):
        walsync_vfs.config.check_name("../x")
    proc = cli("restore", "file:///tmp/../etc", "-o", str(tmp_path / "x.db"))
    assert proc.returncode == 1


def test_configure_rejects_unknown_options_and_bad_urls():
    with pytest.raises(TypeError, match="configure\\(\\): unknown key 'upload_intervall'"):
        walsync_vfs.configure(upload_intervall=1)
    with pytest.raises(storage.StorageError):
        walsync_vfs.configure(replica="ftp://example/x")


def test_two_open_databases_cannot_share_a_name_on_one_root(replica, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = tmp_path / "a" / "app.db", tmp_path / "b" / "app.db"
    a = open_db(first)
    a.execute("CREATE TABLE t(x); INSERT INTO t VALUES('a')")
    walsync_vfs.flush(timeout=30)
    b = open_db(second)
    b.execute("CREATE TABLE t(x); INSERT INTO t VALUES('b')")
    with pytest.raises(walsync_vfs.ReplicationError) as refused:
        walsync_vfs.flush(timeout=30)  # at once: a setting to fix, not an outage to wait out
    assert str(refused.value) == (
        f"replica of {second} is failing: {second}: replica name 'app.db' is already used by "
        f"{first}; give one of them another name"
    )
    # Nothing of it is replicated: its lag runs from its open, not zero (an alert on it fires).
    (state,) = [s for s in walsync_vfs.stats() if s["path"] == str(second)]
    assert state["syncing"] and state["lag_seconds"] > 0
    b.close()  # gives up: its name was never its own
    assert rows(restore(f"{replica}/app.db", tmp_path / "r.db")) == [("a",)]
    a.close()


def test_one_name_on_two_roots(replica, tmp_path):
    """A name is claimed within its replica root: the same base name under another root is
    another replica."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = open_db(tmp_path / "a" / "app.db")
    a.execute("CREATE TABLE t(x); INSERT INTO t VALUES('a')")
    walsync_vfs.flush(timeout=30)
    other = (tmp_path / "other").as_uri()
    walsync_vfs.configure(replica=other)  # for databases opened from now on
    b = open_db(tmp_path / "b" / "app.db")
    b.execute("CREATE TABLE t(x); INSERT INTO t VALUES('b')")
    walsync_vfs.flush(timeout=30)
    assert rows(restore(f"{replica}/app.db", tmp_path / "ra.db")) == [("a",)]
    assert rows(restore(f"{other}/app.db", tmp_path / "rb.db")) == [("b",)]
    a.close()
    b.close()


def test_restore_refuses_a_symlink_loop(replica, tmp_path):
    replicate_keep(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    proc = cli("restore", f"{replica}/keep.db", "-o", str(a))
    assert (proc.returncode, proc.stderr) == (
        1,
        f"walsync: error: {a} is a symlink that leads to no file (a loop); fix the link\n",
    )
    assert a.is_symlink() and b.is_symlink()
