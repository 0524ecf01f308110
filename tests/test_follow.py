"""Issue 4: ``restore --follow`` keeps a read replica up to date while the source writes;
issue 14: it does so in place, as SQLite transactions readers in other processes wait for."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import apsw
import pytest
from foreign import write_while_closed

import walsync_vfs
from walsync_vfs import catalog, format, storage

CATCH_UP = 20.0  # seconds a follower polling every 0.1 s may take to show a flushed commit
BUSY_MS = 20_000  # readers wait this long for an update in progress, as SQLite readers do
READER = str(Path(__file__).resolve().parent / "follow_reader.py")


@pytest.fixture
def replica(replica_url):
    walsync_vfs.configure(replica=replica_url, upload_interval=0.0)
    yield replica_url
    walsync_vfs.flush(timeout=30)
    walsync_vfs.configure(replica="", upload_interval=1.0)


class FollowProcess:
    """``restore --follow`` in a child process, its output in files the test can poll."""

    def __init__(self, url: str, out: Path, force: bool = False) -> None:
        self.out = out
        self.stdout, self.stderr = out.with_suffix(".stdout"), out.with_suffix(".stderr")
        with self.stdout.open("w") as so, self.stderr.open("w") as se:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "walsync_vfs", "restore", url, "-o", str(out)]
                + ["--follow", "--interval", "0.1"]
                + (["--force"] if force else []),
                stdout=so,
                stderr=se,
            )

    def errors(self) -> list[str]:
        return self.stderr.read_text().splitlines()

    def wait_for(self, done, what: str) -> None:
        deadline = time.monotonic() + CATCH_UP
        while not done():
            assert self.proc.poll() is None, f"follower exited: {self.errors()}"
            assert time.monotonic() < deadline, f"follower never got {what}: {self.errors()}"
            time.sleep(0.05)

    def wait_started(self) -> None:
        """Until it has installed its first file as OUT."""
        self.wait_for(lambda: "following" in self.stdout.read_text(), "OUT installed")

    def wait_same(self, con: apsw.Connection) -> None:
        """Until OUT holds what the source holds (every read of OUT must be consistent)."""
        want = digest(con)
        self.wait_for(lambda: self.out.exists() and read(self.out)[1] == want, "the source state")

    def stop(self, sig: int = signal.SIGINT) -> list[str]:
        """Stop it as Ctrl-C (or a service manager) would: exit 0, stdout lines returned."""
        self.proc.send_signal(sig)
        assert self.proc.wait(timeout=30) == 0, self.errors()
        return self.stdout.read_text().splitlines()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def followers():
    started: list[FollowProcess] = []

    def start(url: str, out: Path, force: bool = False) -> FollowProcess:
        started.append(FollowProcess(url, out, force))
        return started[-1]

    yield start
    for f in started:  # only after a failed assertion: tests stop theirs
        f.kill()


def digest(con: apsw.Connection) -> str:
    """Rows and page count: equal digests are the same rows in as many pages."""
    h = hashlib.sha256(repr(con.execute("PRAGMA page_count").fetchone()).encode())
    for row in con.execute("SELECT id, v FROM t ORDER BY id"):
        h.update(repr(row).encode())
    return h.hexdigest()


def read(path: Path) -> tuple[int, str]:
    """(row count, digest) through a fresh connection, after checking the whole file."""
    con = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    con.setbusytimeout(BUSY_MS)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return con.execute("SELECT count(*) FROM t").fetchone()[0], digest(con)
    finally:
        con.close()


def source(path: Path) -> apsw.Connection:
    con = apsw.Connection(str(path), vfs="walsync")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    con.execute("INSERT INTO t(v) VALUES(randomblob(100))")
    walsync_vfs.flush(timeout=30)
    return con


def head(url: str, name: str) -> tuple[int, str]:
    """(last txid, generation id) of the newest generation in the replica."""
    g = catalog.generations(storage.open_replica(url), name)[-1]
    return g.last_txid, g.id


class Reader(threading.Thread):
    """Reads OUT over and over while the follower updates it.  Every fresh open must see a
    whole database whose row count never goes back; so must a connection held open all
    along, whose page cache must notice each update."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out
        self.halt = threading.Event()
        self.counts: list[int] = []
        self.failure: BaseException | None = None

    def run(self) -> None:
        held = apsw.Connection(str(self.out), flags=apsw.SQLITE_OPEN_READONLY)
        held.setbusytimeout(BUSY_MS)
        try:
            while not self.halt.is_set():
                count, _ = read(self.out)
                assert count >= (self.counts[-1] if self.counts else 0)
                self.counts.append(count)
                assert held.execute("SELECT count(*) FROM t").fetchone()[0] >= count
                assert held.execute("PRAGMA quick_check").fetchall() == [("ok",)]
        except BaseException as exc:  # reported by the test thread
            self.failure = exc
        finally:
            held.close()


def test_follow_applies_batches_while_readers_see_whole_databases(replica, tmp_path, followers):
    con = source(tmp_path / "src.db")
    url = f"{replica}/src.db"
    out = tmp_path / "replica.db"
    start, generation = head(replica, "src.db")
    follower = followers(url, out)
    follower.wait_same(con)
    inode = out.stat().st_ino
    reader = Reader(out)
    reader.start()
    try:
        for batch in range(6):
            for i in range(4):  # several commits per batch, so segments hold several
                with con:
                    con.execute("INSERT INTO t(v) VALUES(randomblob(?))", (200 + 3000 * i,))
                    con.execute("UPDATE t SET v = randomblob(60) WHERE id % 5 = ?", (batch % 5,))
            if batch == 3:  # one big commit: hundreds of new pages, a long pwritev run
                con.execute(
                    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)"
                    " INSERT INTO t(v) SELECT randomblob(700) FROM n"
                )
            walsync_vfs.flush(timeout=30)
            follower.wait_same(con)
    finally:
        reader.halt.set()
        reader.join()
    if reader.failure is not None:
        raise reader.failure
    assert len(set(reader.counts)) >= 3, "the reader should have seen several versions"

    with con:  # shrink: OUT must be cut to the source's size, not keep stale pages
        con.execute("DELETE FROM t WHERE id % 4 != 0")
    con.execute("VACUUM")
    walsync_vfs.flush(timeout=30)
    follower.wait_same(con)
    page_size = con.execute("PRAGMA page_size").fetchone()[0]
    assert out.stat().st_size == page_size * con.execute("PRAGMA page_count").fetchone()[0]
    assert out.stat().st_ino == inode  # updated in place, never copied and renamed

    txid, same = head(replica, "src.db")
    assert same == generation
    follower.proc.send_signal(signal.SIGUSR1)
    checked = f"integrity_check of {out} at txid {txid}: ok"
    follower.wait_for(lambda: checked in follower.stdout.read_text(), "an integrity_check line")
    lines = follower.stop()
    assert lines[0] == f"following {url}: {out} is at txid {start} (generation {generation})"
    stopped = f"stopped following {url}: {out} is at txid {txid}"
    assert lines[1:] == [checked, f"{stopped} (generation {generation})"]
    assert follower.errors() == []
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith("replica.db")]
    assert leftovers == ["replica.db"]  # no journal, no temporary file
    con.close()


def ledger(path: Path) -> apsw.Connection:
    """A source whose every transaction keeps ``head.n`` equal to ``max(rowid)`` of ``t``
    (the invariant tests/follow_reader.py checks)."""
    con = apsw.Connection(str(path), vfs="walsync")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB); CREATE TABLE head(n)")
    con.execute("INSERT INTO t(v) VALUES(randomblob(100)); INSERT INTO head VALUES(1)")
    walsync_vfs.flush(timeout=30)
    return con


def hot_journal(journal: Path) -> bool:
    """As pager.c's hasHotJournal judges it once its writer is gone: the first byte is not
    zero.  An empty journal (just created, its header not written yet) is not hot."""
    return journal.exists() and journal.read_bytes()[:1] not in (b"", b"\0")


def add_rows(con: apsw.Connection, rows: int, size: int) -> None:
    with con:
        con.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
            " INSERT INTO t(v) SELECT randomblob(?) FROM n",
            (rows, size),
        )
        con.execute("UPDATE t SET v = randomblob(50) WHERE id % 7 = ?", (rows % 7,))
        con.execute("UPDATE head SET n = (SELECT max(id) FROM t)")


class ReaderProcess:
    """tests/follow_reader.py on OUT until ``stop``, which returns its figures."""

    def __init__(self, out: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, READER, str(out)], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == "ready\n"

    def stop(self) -> dict:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0
        return json.loads(out)


def test_readers_in_another_process_see_every_update_whole(replica, tmp_path, followers):
    walsync_vfs.configure(max_segment_bytes=64 << 10)  # big commits go in parts
    try:
        con = ledger(tmp_path / "ledger.db")
        out = tmp_path / "replica.db"
        follower = followers(f"{replica}/ledger.db", out)
        follower.wait_same(con)
        inode = out.stat().st_ino
        reader = ReaderProcess(out)
        try:
            for batch in range(8):
                for i in range(3):
                    add_rows(con, 1 + i, 300)
                if batch % 2:
                    add_rows(con, 1500, 900)  # ~1.4 MB: a commit in parts, many pages
                walsync_vfs.flush(timeout=30)
                follower.wait_same(con)
        finally:
            figures = reader.stop()
        assert out.stat().st_ino == inode
        assert follower.errors() == []
        follower.stop()
    finally:
        walsync_vfs.configure(max_segment_bytes=16 << 20)
    (g,) = catalog.generations(storage.open_replica(replica), "ledger.db")
    assert sum(1 for s in g.segments if s.parts) >= 8, "the big commits should be in parts"
    assert figures["violations"] == 0, figures["first_violations"]
    assert figures["values"] >= 8, figures  # it saw many versions ...
    assert figures["during_apply"] > 0, figures  # ... and read while updates were open
    con.close()


def test_a_follower_killed_mid_update_leaves_the_last_commit(file_url, tmp_path, followers):
    walsync_vfs.configure(replica=file_url, upload_interval=0.0)
    try:
        con = ledger(tmp_path / "ledger.db")
        url = f"{file_url}/ledger.db"
        out = tmp_path / "replica.db"
        journal = Path(f"{out}-journal")
        follower = followers(url, out)
        follower.wait_same(con)
        states = {digest(con)}
        hot = torn = 0
        for round_ in range(6):
            before = out.read_bytes()  # (read before this process holds a lock on it)
            written = out.stat().st_mtime_ns
            stall = apsw.Connection(str(out), flags=apsw.SQLITE_OPEN_READONLY)
            stall.execute("BEGIN")  # a read transaction the follower's update must wait for
            stall.execute("SELECT count(*) FROM t").fetchall()
            add_rows(con, 1500, 900)  # hundreds of pages
            walsync_vfs.flush(timeout=30)
            states.add(digest(con))
            deadline = time.monotonic() + CATCH_UP
            while not hot_journal(journal):
                assert time.monotonic() < deadline, follower.errors()  # journal not synced yet
                time.sleep(0.001)
            if round_ % 2:  # let it go on, and kill it as it starts writing the database
                stall.execute("COMMIT")
                while out.stat().st_mtime_ns == written:
                    assert time.monotonic() < deadline, follower.errors()
            follower.kill()
            if stall.in_transaction:
                stall.execute("COMMIT")
            stall.close()
            if hot_journal(journal):
                hot += 1  # read-only readers must refuse a hot journal, not read a torn file
                torn += out.read_bytes() != before
                with pytest.raises(apsw.ReadOnlyError):
                    read(out)
            if round_ % 4 < 2:  # a read-write opener rolls it back, as after a crashed writer
                rw = apsw.Connection(str(out))
                rw.setbusytimeout(BUSY_MS)
                assert rw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
                assert digest(rw) in states
                rw.close()
                assert not hot_journal(journal)
            follower = followers(url, out, force=True)  # or the next follower does
            follower.wait_started()
            assert not journal.exists()
            follower.wait_same(con)
        follower.stop()
        assert hot >= 3 and torn >= 1, f"{hot} hot journals, {torn} with pages written"
        con.close()
    finally:
        walsync_vfs.flush(timeout=30)
        walsync_vfs.configure(replica="", upload_interval=1.0)


def test_a_stop_during_an_uninterrupted_block_lands_after_it():
    """A follower's stop never falls between writing OUTPUT and recording what it holds, on
    whichever thread the kernel delivers the signal."""
    from walsync_vfs.cli import Stopped, StopRequest
    from walsync_vfs.restore import uninterrupted

    threading.Thread(target=time.sleep, args=(2,), daemon=True).start()  # may take the signal
    finished = []
    with StopRequest() as stop, stop.polling(), pytest.raises(Stopped), uninterrupted():
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 0.3  # Python runs on: the handler has had its turn
        while time.monotonic() < deadline:
            pass
        finished.append(True)
    assert finished == [True] and stop.requested


def test_follow_starts_over_from_a_new_generation(replica, tmp_path, followers):
    path = tmp_path / "shared.db"
    con = source(path)
    url = f"{replica}/shared.db"
    out = tmp_path / "replica.db"
    start, first = head(replica, "shared.db")
    follower = followers(url, out)
    follower.wait_same(con)
    con.close()
    write_while_closed(path, "DELETE FROM t")
    con = apsw.Connection(str(path), vfs="walsync")
    con.execute("INSERT INTO t(v) VALUES(x'01')")
    walsync_vfs.flush(timeout=30)
    txid, second = head(replica, "shared.db")
    assert second != first
    follower.wait_same(con)
    assert read(out)[0] == 1

    lines = follower.stop(signal.SIGTERM)
    # The new generation's snapshot may be followed before the commit after it is stored.
    assert lines[1] in (
        f"following {url}: {out} is at txid {t} (generation {second})" for t in (txid - 1, txid)
    )
    assert lines[::2] == [
        f"following {url}: {out} is at txid {start} (generation {first})",
        f"stopped following {url}: {out} is at txid {txid} (generation {second})",
    ]
    con.close()


def test_connections_to_a_replaced_output_are_fenced_off(replica, tmp_path, followers):
    """A restarted follower installs a new file.  A connection opened on the old one goes on
    reading it, but must not take the new file's journal for a hot journal of its own and
    roll it back (deleting it under the follower's update), nor write the old file."""
    con = ledger(tmp_path / "src.db")
    url = f"{replica}/src.db"
    out = tmp_path / "replica.db"
    follower = followers(url, out)
    follower.wait_same(con)
    stale = apsw.Connection(str(out))  # read-write, as sqlite3.connect() opens it
    assert stale.execute("SELECT count(*) FROM t").fetchone() == (1,)
    follower.stop()
    follower = followers(url, out, force=True)
    follower.wait_started()
    for _ in range(5):
        add_rows(con, 200, 300)
        walsync_vfs.flush(timeout=30)
        want = digest(con)

        def caught_up(want: str = want) -> bool:  # the old file read all along
            assert stale.execute("SELECT count(*) FROM t").fetchone() == (1,)
            return read(out)[1] == want

        follower.wait_for(caught_up, "the source state")
    with pytest.raises(apsw.BusyError):
        stale.execute("INSERT INTO t(v) VALUES(x'00')")
    assert read(out)[0] == 1001
    assert follower.errors() == []
    stale.close()
    follower.stop()
    con.close()


def test_a_follower_keeps_only_the_file_it_replaced_last(replica, tmp_path, followers):
    """Each new generation installs a new file and fences the one before: that one only, so
    the disk space of older files is given back."""
    path = tmp_path / "src.db"
    con = source(path)
    url = f"{replica}/src.db"
    out = tmp_path / "replica.db"
    follower = followers(url, out)
    follower.wait_same(con)
    for n in range(3):
        con.close()
        write_while_closed(path, f"INSERT INTO t(v) VALUES(x'{n:02x}')")
        con = apsw.Connection(str(path), vfs="walsync")
        con.execute("INSERT INTO t(v) VALUES(x'ff')")
        walsync_vfs.flush(timeout=30)
        follower.wait_same(con)
    fds = Path(f"/proc/{follower.proc.pid}/fd")
    replaced = [os.readlink(fd) for fd in fds.iterdir() if "(deleted)" in os.readlink(fd)]
    assert replaced == [f"{out} (deleted)"]
    follower.stop()
    con.close()


def test_a_second_follower_of_one_output_is_refused(replica, tmp_path, followers):
    """Two followers of one OUTPUT would each write a file the other replaced: the second
    (and a restore --force over it) is refused while the first runs."""
    con = source(tmp_path / "src.db")
    url = f"{replica}/src.db"
    out = tmp_path / "replica.db"
    follower = followers(url, out)
    follower.wait_same(con)
    for extra in (["--follow"], []):
        proc = subprocess.run(
            [sys.executable, "-m", "walsync_vfs", "restore", url, "-o", str(out), "--force"]
            + extra,
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert (proc.returncode, proc.stderr) == (
            1,
            f"walsync: error: {out} is kept up to date by another follower; stop it first\n",
        )
    con.execute("INSERT INTO t(v) VALUES(x'02')")
    walsync_vfs.flush(timeout=30)
    follower.wait_same(con)
    assert follower.errors() == []
    follower.stop()
    second = followers(url, out, force=True)  # once it has stopped, it may be replaced
    second.wait_started()
    second.wait_same(con)
    second.stop()
    con.close()


def test_a_bad_object_is_reported_once_and_what_precedes_it_goes_out(replica, tmp_path, followers):
    con = source(tmp_path / "bad.db")
    url = f"{replica}/bad.db"
    out = tmp_path / "replica.db"
    follower = followers(url, out)
    follower.wait_same(con)
    txid, generation = head(replica, "bad.db")
    writer = walsync_vfs._engine_instance().database(str(tmp_path / "bad.db"))
    assert writer is not None
    bogus = format.segment_key("bad.db", generation, txid + 2, txid + 2, writer.epoch())
    storage.open_replica(replica).put(bogus, b"not a segment")
    con.execute("INSERT INTO t(v) VALUES(x'02')")  # txid + 1: one good segment before it
    walsync_vfs.flush(timeout=30)
    follower.wait_same(con)
    bad = f"walsync: error: {bogus}: bad magic: not a walsync_vfs segment"
    follower.wait_for(lambda: bad in follower.errors(), "an error line")
    time.sleep(0.5)  # five more polls meet the same object: still one line
    assert follower.errors()[-1] == bad and follower.errors().count(bad) == 1
    assert read(out)[0] == 2

    con.execute("INSERT INTO t(v) VALUES(x'03')")  # the engine's upload replaces the bad one
    walsync_vfs.flush(timeout=30)
    follower.wait_same(con)
    assert follower.stop()[-1].endswith(f"is at txid {txid + 2} (generation {generation})")
    con.close()


def test_follow_refuses_what_it_cannot_do(replica, tmp_path):
    def cli(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "walsync_vfs", "restore", f"{replica}/x.db", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    out = str(tmp_path / "out.db")
    for pinned in (["--txid", "3"], ["--timestamp", "2030-01-01T00:00:00Z"]):
        proc = cli("-o", out, "--follow", *pinned)
        assert proc.returncode == 2
        assert "--follow tracks the newest commit: it cannot take --txid or --timestamp" in (
            proc.stderr
        )
    proc = cli("-o", out, "--interval", "2")
    assert proc.returncode == 2 and "--interval only applies with --follow" in proc.stderr
    proc = cli("-o", out, "--follow")  # nothing replicated under that name: fail at once
    assert proc.returncode == 1
    assert proc.stderr == f"walsync: error: no replica of 'x.db' found at {replica}\n"
    (tmp_path / "out.db").write_bytes(b"precious")
    proc = cli("-o", out, "--follow")
    assert proc.returncode == 1 and "already exists; pass --force" in proc.stderr
    assert (tmp_path / "out.db").read_bytes() == b"precious"
