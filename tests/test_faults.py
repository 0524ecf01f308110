"""Issue: fault tolerance — store outages, a full spool, foreign writers, bad input."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from fractions import Fraction
from pathlib import Path

import apsw
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from loopback import LoopbackProxy
from replicas import replicate

import walsync_vfs
from walsync_vfs import catalog, format, storage
from walsync_vfs.config import Settings
from walsync_vfs.restore import RestoreError, plan, restore_from
from walsync_vfs.spool import Outgoing, Spool


def rows(con: apsw.Connection) -> list[tuple]:
    return con.execute("SELECT * FROM t ORDER BY rowid").fetchall()


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "walsync_vfs", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def restored(url: str, out: Path, txid: int | None = None) -> apsw.Connection:
    at = [] if txid is None else ["--txid", str(txid)]
    proc = cli("restore", url, "-o", str(out), "--force", *at)
    assert proc.returncode == 0, proc.stderr
    con = apsw.Connection(str(out))
    assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    return con


@pytest.fixture
def stopped_store(s3_server):
    """SIGSTOP/SIGCONT the S3 server; always resumed at the end."""

    class Control:
        def stop(self) -> None:
            os.kill(s3_server.pid, signal.SIGSTOP)

        def resume(self) -> None:
            os.kill(s3_server.pid, signal.SIGCONT)

    control = Control()
    yield control
    control.resume()


@pytest.fixture
def s3_replica(s3_url):
    walsync_vfs.configure(replica=s3_url, upload_interval=0.0, memory_cap=64 << 10)
    yield s3_url
    walsync_vfs.configure(replica="", upload_interval=1.0, memory_cap=64 << 20, spool_cap=1 << 30)


def test_outage_commits_never_block_spill_and_catch_up(s3_replica, stopped_store, tmp_path):
    con = apsw.Connection(str(tmp_path / "outage.db"), vfs="walsync")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    walsync_vfs.flush(timeout=30)
    stopped_store.stop()
    slowest = 0.0
    end = time.monotonic() + 6.0
    while time.monotonic() < end:
        t0 = time.monotonic()
        con.execute("INSERT INTO t(v) VALUES(randomblob(3000))")
        slowest = max(slowest, time.monotonic() - t0)
        time.sleep(0.005)
    assert slowest < 0.5, f"a commit took {slowest:.3f}s during the outage"
    engine = walsync_vfs._engine_instance()
    assert engine._spool.used > 0, "nothing was spooled past the memory cap"
    with pytest.raises((TimeoutError, walsync_vfs.ReplicationError)):
        walsync_vfs.flush(timeout=1)
    stopped_store.resume()
    walsync_vfs.flush(timeout=120)
    assert engine._spool.used == 0
    out = restored(f"{s3_replica}/outage.db", tmp_path / "r.db")
    assert rows(out) == rows(con)
    con.close()


def test_full_spool_drops_to_a_new_generation_and_loses_nothing(
    s3_replica, stopped_store, tmp_path
):
    walsync_vfs.configure(spool_cap=1)  # every spill fails: the spool is "full"
    con = apsw.Connection(str(tmp_path / "full.db"), vfs="walsync")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    walsync_vfs.flush(timeout=30)
    stopped_store.stop()
    for _ in range(60):
        con.execute("INSERT INTO t(v) VALUES(randomblob(3000))")
    time.sleep(1.0)
    (state,) = [s for s in walsync_vfs.stats() if s["name"] == "full.db"]
    assert state["last_error"].startswith("spool: spool cap of 1 bytes reached")
    stopped_store.resume()
    walsync_vfs.flush(timeout=120)
    out = restored(f"{s3_replica}/full.db", tmp_path / "r.db")
    assert rows(out) == rows(con)
    client = storage.open_replica(s3_replica)
    assert len(catalog.generations(client, "full.db")) >= 2  # dropped commits: new lineage
    con.close()


DISK_FULL_WRITER = Path(__file__).with_name("disk_full_writer.py")


class DiskFullApp:
    """tests/disk_full_writer.py in a mount namespace of its own, driven line by line."""

    def __init__(self, db: Path, replica: str, spool: Path) -> None:
        userns = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
        args = [str(db), replica, str(spool)]
        try:
            self.proc = subprocess.Popen(
                ["unshare", *userns, "--mount", sys.executable, str(DISK_FULL_WRITER), *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        except FileNotFoundError:
            pytest.skip("no unshare(1) to mount a private tmpfs as the spool disk")

    def reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            err = self.stderr()
            if err.startswith("unshare: "):  # no mount namespace allowed here
                pytest.skip(f"cannot mount a private tmpfs: {err.strip()}")
            pytest.fail(f"disk-full app died ({self.proc.returncode}):\n{err}")
        obj = json.loads(line)
        if "skip" in obj:
            pytest.skip(obj["skip"])
        return obj

    def send(self, word: str) -> None:
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def stderr(self) -> str:
        self.proc.stdin.close()
        self.proc.wait(60)
        return self.proc.stderr.read()


def test_disk_full_spool_drops_to_a_new_generation_and_loses_nothing(
    s3_url, stopped_store, tmp_path
):
    """The spool directory is a nearly full tmpfs: the first spill fails with ENOSPC halfway
    through its file.  Commits go on, the error is reported, no partial spool file is left
    (so none can ever ship), and once the store is back the database continues in a new
    generation from a snapshot and restores equal to the source."""
    (tmp_path / "spool").mkdir()
    db = tmp_path / "enospc.db"
    app = DiskFullApp(db, s3_url, tmp_path / "spool")
    ready = app.reply()["ready"]
    assert ready["files"] == ["filler"] and ready["free"] < 64 << 10
    stopped_store.stop()
    app.send("go")
    outage = app.reply()["outage"]
    assert outage["stats"] is not None, f"no spool error after {outage['commits']} commits"
    assert outage["stats"]["last_error"].startswith("spool: [Errno 28] No space left on device"), (
        outage["stats"]
    )
    assert outage["stats"]["errors"] >= 1
    assert outage["slowest"] < 0.5, f"a commit took {outage['slowest']:.3f}s on a full disk"
    assert outage["files"] == ["filler"], "a half-written spool file was left behind"
    assert outage["free"] == ready["free"]
    stopped_store.resume()
    app.send("resume")
    done = app.reply()["done"]
    assert done["spool_used"] == 0 and done["files"] == ["filler"]
    log = app.stderr()
    assert app.proc.returncode == 0, log
    assert (
        "walsync: cannot spool enospc.db ([Errno 28] No space left on device" in log
        and "its unsent commits will be in a new snapshot once the store is back" in log
    ), log
    gens = catalog.generations(storage.open_replica(s3_url), "enospc.db")
    # Dropped commits break the lineage: it goes on in a new generation (a second one when
    # commits held during the resync also passed their cap), each starting from a snapshot.
    assert len(gens) >= 2, [g.id for g in gens]
    for old, new in itertools.pairwise(gens):
        assert new.snapshots and new.snapshots[0].last_txid == new.first_txid > old.last_txid
    assert done["stats"]["generation"] == gens[-1].id
    out = restored(f"{s3_url}/enospc.db", tmp_path / "r.db")
    with apsw.Connection(str(db)) as src:
        assert rows(out) == rows(src)
        assert len(rows(src)) == 1 + outage["commits"] + 20


def test_spool_keeps_no_file_of_a_segment_shipped_while_it_was_spilled(tmp_path):
    """The uploader may ship a segment from memory (and discard it) while the spiller is
    still writing its file: the file must go, not linger uncounted until the process exits."""
    spool = Spool(Settings(spool_dir=str(tmp_path)))
    item = Outgoing("k", "g", 1, 1, 1, 4096, b"x" * 4096)
    spool.discard(item)  # shipped first; the spill below is the write that was under way
    spool.spill(item)
    assert list(tmp_path.iterdir()) == [] and spool.used == 0
    assert item.data == b"x" * 4096 and item.path is None


def test_in_process_writer_without_the_vfs_is_replicated_in_the_same_generation(
    file_url, tmp_path
):
    walsync_vfs.configure(replica=file_url)
    path = tmp_path / "mixed.db"
    con = apsw.Connection(str(path), vfs="walsync")
    con.execute("CREATE TABLE t(x)")
    con.execute("INSERT INTO t VALUES(1)")
    walsync_vfs.flush(timeout=30)
    plain = apsw.Connection(str(path))  # default VFS: the shim never sees this commit
    plain.execute("INSERT INTO t VALUES(2)")
    con.execute("INSERT INTO t VALUES(3)")
    walsync_vfs.flush(timeout=30)
    out = restored(f"{file_url}/mixed.db", tmp_path / "r.db")
    assert rows(out) == [(1,), (2,), (3,)]
    gens = catalog.generations(storage.open_replica(file_url), "mixed.db")
    assert len(gens) == 1 and len(gens[0].snapshots) == 1
    # The foreign commit is a restore point of its own.
    before = restored(f"{file_url}/mixed.db", tmp_path / "r2.db", txid=gens[0].last_txid - 1)
    assert rows(before) == [(1,), (2,)]
    plain.close()
    con.close()
    walsync_vfs.configure(replica="")


# ------------------------------------------------------------------------------ bad input


@pytest.fixture
def s3_db(s3_url, tmp_path):
    """A replicated S3 database, and the restore URL for it."""
    walsync_vfs.configure(replica=s3_url)
    con = apsw.Connection(str(tmp_path / "bad.db"), vfs="walsync")
    con.execute("CREATE TABLE t(x)")
    con.execute("INSERT INTO t VALUES(1)")
    walsync_vfs.flush(timeout=30)
    yield f"{s3_url}/bad.db"
    con.close()
    walsync_vfs.configure(replica="")


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("walsync: error: ")
    return proc.stderr


def test_wrong_credentials(s3_db, tmp_path):
    env = dict(os.environ, AWS_SECRET_ACCESS_KEY="not-the-secret")
    err = one_error_line(cli("restore", s3_db, "-o", str(tmp_path / "x.db"), env=env))
    assert "access denied" in err and "not-the-secret" not in err


def test_missing_bucket(s3_server, tmp_path):
    err = one_error_line(
        cli("restore", "s3://no-such-bucket-here/p/x.db", "-o", str(tmp_path / "x"))
    )
    assert "bucket 'no-such-bucket-here' does not exist" in err


def store_env(endpoint: str) -> dict[str, str]:
    """This environment pointed at ``endpoint`` with throwaway credentials, one attempt each."""
    return dict(
        os.environ,
        AWS_ENDPOINT_URL_S3=endpoint,
        AWS_MAX_ATTEMPTS="1",
        AWS_ACCESS_KEY_ID="a",
        AWS_SECRET_ACCESS_KEY="b",
        AWS_REGION="us-east-1",
    )


def test_a_missing_ca_bundle_is_named(tmp_path):
    env = dict(store_env("https://127.0.0.1:9"), AWS_CA_BUNDLE=str(tmp_path / "ca.pem"))
    err = one_error_line(cli("restore", "s3://bucket/p/x.db", "-o", str(tmp_path / "x"), env=env))
    assert err == (
        f"walsync: error: cannot use the CA bundle {tmp_path / 'ca.pem'} (AWS_CA_BUNDLE or "
        "ca_bundle in the AWS config): No such file or directory; point it at a PEM file of "
        "CA certificates\n"
    )


def test_unreachable_endpoint(tmp_path):
    env = store_env("http://127.0.0.1:9")
    err = one_error_line(cli("restore", "s3://bucket/p/x.db", "-o", str(tmp_path / "x"), env=env))
    assert "cannot reach http://127.0.0.1:9" in err


APP_THAT_EXITS = """
import sys, time, apsw, walsync_vfs
walsync_vfs.configure(replica="s3://bucket/p")
con = apsw.Connection(sys.argv[1], vfs="walsync")
con.execute("CREATE TABLE t(x)")
if sys.argv[2] == "failure":  # until the first sync has failed
    while not walsync_vfs.stats()[0]["failures"]:
        time.sleep(0.01)
else:  # long enough for the first request to be under way
    time.sleep(float(sys.argv[2]))
print(walsync_vfs.stats()[0]["last_error"], flush=True)
"""  # and exits with the database still open and its replication still failing


def app_exit(tmp_path, endpoint: str, wait: str) -> subprocess.CompletedProcess:
    """Run APP_THAT_EXITS against ``endpoint``: it must exit cleanly within 10 s."""
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", APP_THAT_EXITS, str(tmp_path / "a.db"), wait],
        capture_output=True, text=True, timeout=60, env=store_env(endpoint),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - started < 10
    return out


def test_an_application_exits_while_its_store_is_down(tmp_path):
    """Failed syncs are retried from the uploader's schedule, never by a thread retrying
    forever: one that did kept the application from exiting."""
    out = app_exit(tmp_path, "http://127.0.0.1:9", "failure")
    assert out.stdout.startswith("cannot reach http://127.0.0.1:9: connection refused")


def test_an_application_exits_while_its_store_hangs(tmp_path):
    """A store that accepts connections and never answers: uploads and syncs wait for their
    15 s read timeout, but on daemon threads, so the application still exits at once."""
    silent = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.extend(iter(lambda: silent.accept()[0], None)),
                     daemon=True).start()  # fmt: skip
    app_exit(tmp_path, f"http://127.0.0.1:{silent.getsockname()[1]}", "1")
    assert held, "the app never reached the store"
    silent.close()


def test_a_follower_stops_at_once_while_its_store_hangs(
    s3_server, s3_replica, stopped_store, tmp_path
):
    """SIGTERM to ``restore --follow`` whose poll waits on a frozen store: it exits 0 at once,
    its last line naming the commit OUTPUT holds, not after the request's timeouts."""
    con = apsw.Connection(str(tmp_path / "src.db"), vfs="walsync")
    con.execute("CREATE TABLE t(x); INSERT INTO t VALUES(1)")
    walsync_vfs.flush(timeout=30)
    relay = LoopbackProxy(upstream=s3_server.endpoint.removeprefix("http://"))
    out, url = tmp_path / "follower.db", f"{s3_replica}/src.db"
    env = {**s3_server.env(), "AWS_ENDPOINT_URL_S3": relay.url}
    follower = subprocess.Popen(
        [sys.executable, "-m", "walsync_vfs", "restore", url, "-o", str(out), "--follow",
         "--interval", "0.05"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert follower.stdout is not None
        first = follower.stdout.readline()
        assert first.startswith(f"following {url}: {out} is at txid"), follower.stderr.read()
        stopped_store.stop()
        sent = relay.sent
        deadline = time.monotonic() + 30
        while relay.sent == sent and time.monotonic() < deadline:
            time.sleep(0.01)
        assert relay.sent > sent, "the follower never asked the frozen store"
        started = time.monotonic()
        follower.send_signal(signal.SIGTERM)
        rest, errors = follower.communicate(timeout=60)
        took = time.monotonic() - started
    finally:
        stopped_store.resume()
        follower.kill()
        relay.stop()
        con.close()
    assert follower.returncode == 0, errors
    assert took < 3.0, f"exited {took:.1f} s after SIGTERM"
    assert rest.splitlines()[-1] == f"stopped following {url}: {first.split(': ', 1)[1].strip()}"
    assert apsw.Connection(str(out)).execute("SELECT x FROM t").fetchall() == [(1,)]


def test_flush_after_an_outage_waits_for_a_fresh_try_not_the_old_failures(tmp_path):
    """The store failed for a while and is back: flush() does not report the replica as
    failing from the attempts made during the outage, it tries again and succeeds; while
    the store is still down it fails as soon as that new try fails, in one line whatever
    the paths in it hold."""
    replica = tmp_path / "replica"
    walsync_vfs.configure(replica=replica.as_uri(), upload_interval=0.1)
    try:
        (tmp_path / "new\nline").mkdir()
        con = apsw.Connection(str(tmp_path / "new\nline" / "a.db"), vfs="walsync")
        con.execute("CREATE TABLE t(x)")
        walsync_vfs.flush(timeout=30)
        replica.rename(tmp_path / "away")
        replica.write_text("the replica root is not a directory now")
        con.execute("INSERT INTO t VALUES(1)")
        with pytest.raises(walsync_vfs.ReplicationError) as failing:
            walsync_vfs.flush(timeout=30)  # a failing replica, said at once
        assert str(failing.value).startswith(f"replica of {tmp_path}/new\\nline/a.db is failing: ")
        (state,) = walsync_vfs.stats()
        assert state["failures"] >= 3
        replica.unlink()
        (tmp_path / "away").rename(replica)
        walsync_vfs.flush(timeout=30)
        (state,) = walsync_vfs.stats()
        assert state["replicated_txid"] == state["last_txid"] and state["failures"] == 0
        con.close()
    finally:
        walsync_vfs.configure(replica="", upload_interval=1.0)


def test_flush_timeouts_mean_what_they_say(tmp_path):
    """No time at all still succeeds when everything is replicated; infinity and huge
    values mean no limit; NaN is an error, not a spin."""
    walsync_vfs.configure(replica=(tmp_path / "replica").as_uri(), upload_interval=0.0)
    try:
        con = apsw.Connection(str(tmp_path / "a.db"), vfs="walsync")
        con.execute("CREATE TABLE t(x); INSERT INTO t VALUES(1)")
        for timeout in (float("inf"), 1e10, 30):
            walsync_vfs.flush(timeout=timeout)
        walsync_vfs.flush(timeout=0)
        walsync_vfs.flush(timeout=-1)  # out of time already, and nothing to wait for
        walsync_vfs.flush(timeout=Fraction(1, 2))
        for bad in (float("nan"), "10", True):
            with pytest.raises(ValueError) as info:
                walsync_vfs.flush(timeout=bad)  # type: ignore[arg-type]
            assert str(info.value) == (
                f"flush timeout must be a number of seconds or None, got {bad!r}"
            )
        con.close()
    finally:
        walsync_vfs.configure(replica="", upload_interval=1.0)


def test_a_restore_stopped_by_sigterm_removes_its_temp_file(tmp_path):
    """SIGTERM (a container stop, systemd) ends a restore as Ctrl-C does: one line, and no
    partial database left beside OUTPUT."""
    walsync_vfs.configure(replica=(tmp_path / "replica").as_uri())
    try:
        con = apsw.Connection(str(tmp_path / "big.db"), vfs="walsync")
        con.execute("CREATE TABLE b(x)")
        con.executemany("INSERT INTO b VALUES(randomblob(4000))", [()] * 8000)
        walsync_vfs.flush(timeout=120)
        con.close()
    finally:
        walsync_vfs.configure(replica="")
    out = tmp_path / "out.db"
    part = Path(f"{out}.walsync-tmp")
    url = f"{(tmp_path / 'replica').as_uri()}/big.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "walsync_vfs", "restore", url, "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not (part.exists() and part.stat().st_size) and proc.poll() is None:
        assert time.monotonic() < deadline, "the restore never began writing"
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, errors = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the restore finished before the signal")
    assert (proc.returncode, errors) == (143, "walsync: error: terminated\n")
    assert not part.exists() and not out.exists()


def test_a_second_restore_to_the_same_output_is_refused_while_the_first_runs(tmp_path):
    """Two restores (or a restore and a follower) of one OUTPUT at once would build it in one
    temporary file: the second is refused, leaving the first's work alone.  A temporary file
    no restore holds (one was killed) is taken over."""
    replica = (tmp_path / "replica").as_uri()
    replicate(replica, tmp_path / "a.db", "CREATE TABLE t(x); INSERT INTO t VALUES(1)")
    out = tmp_path / "out.db"
    part = Path(f"{out}.walsync-tmp")
    first = os.open(part, os.O_RDWR | os.O_CREAT)  # a restore under way
    os.write(first, b"the first restore's pages")
    fcntl.flock(first, fcntl.LOCK_EX)
    cmd = [sys.executable, "-m", "walsync_vfs", "restore", f"{replica}/a.db", "-o", str(out)]
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert (second.returncode, second.stderr) == (
        1,
        f"walsync: error: {out} is being restored by another process ({part} is in use); "
        "wait for it to finish, or restore to another path\n",
    )
    assert part.read_bytes() == b"the first restore's pages" and not out.exists()
    os.close(first)  # killed: its file stays behind, unlocked
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert not part.exists()
    assert apsw.Connection(str(out)).execute("SELECT x FROM t").fetchall() == [(1,)]
    # One made by another restore after this one checked the path is not overwritten.
    client = storage.open_replica(replica)
    with pytest.raises(RestoreError) as made:
        restore_from(client, "a.db", str(out), force=False)
    assert str(made.value) == (
        f"{out} was made by another restore meanwhile; pass --force to overwrite it"
    )
    assert not part.exists()


KILLED_WRITER = """
import sys, time, apsw, walsync_vfs
walsync_vfs.configure(replica=sys.argv[2], upload_interval=3600)  # only flush() uploads
con = apsw.Connection(sys.argv[1], vfs="walsync")
con.execute("CREATE TABLE t(x)")
walsync_vfs.flush(timeout=30)
for i in range(200):
    con.execute("INSERT INTO t VALUES(randomblob(500))")
print("written", flush=True)
time.sleep(60)
"""


def test_commits_a_killed_process_left_count_in_the_reopener_s_bytes_uploaded(tmp_path):
    """The next opener ships them from the WAL, as a segment of the same generation: its
    stats() count that segment like any upload."""
    path, replica = tmp_path / "a.db", (tmp_path / "replica").as_uri()
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(path), replica], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None and writer.stdout.readline() == "written\n"
    writer.kill()
    writer.wait()
    walsync_vfs.configure(replica=replica)
    try:
        con = apsw.Connection(str(path), vfs="walsync")
        walsync_vfs.flush(timeout=30)
        (state,) = walsync_vfs.stats()
        segments = sum(p.stat().st_size for p in (tmp_path / "replica").rglob("*.wseg"))
        assert state["replicated_txid"] == state["last_txid"] == 202  # the same generation
        assert 0 < state["bytes_uploaded"] < segments
        con.close()
    finally:
        walsync_vfs.configure(replica="")


APP_THAT_REOPENS = """
import sys, time, apsw, walsync_vfs
walsync_vfs.configure(replica="s3://bucket/p")
for i in range(3):  # a connection per request
    started = time.monotonic()
    con = apsw.Connection(sys.argv[1], vfs="walsync")
    print(round(time.monotonic() - started, 3), flush=True)
    con.execute("CREATE TABLE IF NOT EXISTS t(x)")
    con.execute("INSERT INTO t VALUES(?)", (i,))
    time.sleep(0.5)
    con.close()
"""


def test_a_reopen_never_waits_for_a_store_that_hangs(tmp_path):
    """The first open's sync takes its sync point, then waits for the store; a reopen's
    sync point comes after it, and its opener does not wait that long."""
    silent = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.extend(iter(lambda: silent.accept()[0], None)),
                     daemon=True).start()  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", APP_THAT_REOPENS, str(tmp_path / "a.db")],
        capture_output=True, text=True, timeout=120,
        env=store_env(f"http://127.0.0.1:{silent.getsockname()[1]}"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    opens = [float(line) for line in out.stdout.split()]
    assert len(opens) == 3 and max(opens) < 1.0, opens
    assert held, "the app never reached the store"
    silent.close()


APP_WITH_TWO_STORES = """
import json, sys, time, apsw, walsync_vfs
d = sys.argv[1]
hung = [apsw.Connection(f"{d}/hung-{i}.db", vfs="walsync") for i in range(3)]
fine = apsw.Connection(f"{d}/fine.db", vfs="walsync")
for c in hung + [fine]:
    c.execute("CREATE TABLE t(x); INSERT INTO t VALUES(1)")
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    (s,) = [s for s in walsync_vfs.stats() if s["path"].endswith("fine.db")]
    if s["replicated_txid"] and s["replicated_txid"] == s["last_txid"]:
        break
    time.sleep(0.05)
took = time.monotonic() - deadline + 60
print(json.dumps([s["replicated_txid"], s["last_txid"], took]))
"""


def test_a_store_that_hangs_never_holds_up_another_store_s_databases(tmp_path):
    """Databases replicated to a store that accepts connections and never answers keep
    their syncs waiting; a database replicated elsewhere still gets its own at once."""
    silent = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.extend(iter(lambda: silent.accept()[0], None)),
                     daemon=True).start()  # fmt: skip
    config = tmp_path / "walsync.toml"
    config.write_text(
        f'[defaults]\nreplica = "{(tmp_path / "replica").as_uri()}"\n'
        '[[databases]]\nmatch = "hung-*.db"\nreplica = "s3://bucket/p"\n'
    )
    env = store_env(f"http://127.0.0.1:{silent.getsockname()[1]}")
    env["WALSYNC_CONFIG"] = str(config)
    out = subprocess.run(
        [sys.executable, "-c", APP_WITH_TWO_STORES, str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    replicated, last, took = json.loads(out.stdout)
    assert replicated == last > 0 and took < 10, (replicated, last, took)
    assert held, "the hanging store was never asked"
    silent.close()


APP_WITHOUT_ITS_STORE = """
import json, sys, time, apsw, walsync_vfs
walsync_vfs.configure(replica="s3://bucket/p")
con = apsw.Connection(sys.argv[1], vfs="walsync")
con.execute("CREATE TABLE t(x)")
for i in range(24):
    con.execute("INSERT INTO t VALUES(?)", (i,))
    time.sleep(0.25)
    s = walsync_vfs.stats()[0]
    print(json.dumps([s["lag_seconds"], s["pending_commits"], s["errors"]]), flush=True)
"""


def test_lag_and_pending_commits_only_grow_while_the_first_sync_fails(tmp_path):
    """A store that fails each request after 1.5 s: each retry of the first sync takes a new
    sync point, past the head's wait.  The commits before it are in the snapshot it will
    store, and still owed to the replica until it does."""
    slow = socket.create_server(("127.0.0.1", 0))

    def hang_up(conn: socket.socket) -> None:
        time.sleep(1.5)
        conn.close()

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                threading.Thread(target=hang_up, args=(slow.accept()[0],), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    out = subprocess.run(
        [sys.executable, "-c", APP_WITHOUT_ITS_STORE, str(tmp_path / "a.db")],
        capture_output=True, text=True, timeout=120,
        env=store_env(f"http://127.0.0.1:{slow.getsockname()[1]}"),
    )  # fmt: skip
    slow.close()
    assert out.returncode == 0, out.stderr
    samples = [json.loads(line) for line in out.stdout.splitlines()]
    lags, pending, errors = zip(*samples, strict=True)
    assert errors[-1] >= 1, "the sync never failed"
    assert list(lags) == sorted(lags) and lags[-1] >= 5.5, lags
    assert list(pending) == sorted(pending) and pending[-1] >= 25, pending


@pytest.mark.parametrize(
    ("url", "text"),
    [
        ("ftp://host/x.db", "invalid replica URL"),
        ("s3:///x.db", "invalid replica URL"),
        ("x.db", "expected <replica root>/<database name>"),
        ("file:///tmp/..", "invalid database name '..'"),
    ],
)
def test_malformed_urls_and_escaping_names(url, text, tmp_path):
    assert text in one_error_line(cli("restore", url, "-o", str(tmp_path / "x.db")))


def test_newer_format_version_is_refused(s3_db, tmp_path):
    root, name = s3_db.rsplit("/", 1)
    client = storage.open_replica(root)
    key = next(o.key for o in client.list(name + "/") if "/seg/" in o.key)
    data = bytearray(client.get(key))
    data[8:10] = (99).to_bytes(2, "big")
    client.put(key, bytes(data))
    err = one_error_line(cli("restore", s3_db, "-o", str(tmp_path / "x.db")))
    assert f"{key}: written by a newer format version 99; upgrade walsync_vfs" in err


def test_reordered_objects_are_caught(file_url, tmp_path):
    walsync_vfs.configure(replica=file_url, upload_interval=0.0)
    con = apsw.Connection(str(tmp_path / "order.db"), vfs="walsync")
    con.execute("CREATE TABLE t(x)")
    for i in range(6):
        con.execute("INSERT INTO t VALUES(?)", (i,))
        walsync_vfs.flush(timeout=30)
    client = storage.open_replica(file_url)
    segs = [k for g in catalog.generations(client, "order.db") for k in g.segments]
    a, b = catalog.object_key(segs[-2]), catalog.object_key(segs[-1])
    da, db_ = client.get(a), client.get(b)
    client.put(a, db_)  # swap two segments' contents under their names
    client.put(b, da)
    err = one_error_line(cli("restore", f"{file_url}/order.db", "-o", str(tmp_path / "x.db")))
    assert err.startswith(f"walsync: error: {a}: ")
    con.close()
    walsync_vfs.configure(replica="", upload_interval=1.0)


def test_flush_reports_a_failing_replica(tmp_path):
    blocker = tmp_path / "not-a-dir"
    walsync_vfs.configure(replica=blocker.as_uri())
    blocker.write_text("x")  # after configure() checked it: no directory can go there now
    con = apsw.Connection(str(tmp_path / "nowhere.db"), vfs="walsync")
    con.execute("CREATE TABLE t(x)")
    with pytest.raises(walsync_vfs.ReplicationError, match="replica of .*nowhere.db is failing: "):
        walsync_vfs.flush(timeout=30)
    con.close()
    walsync_vfs.configure(replica="")


# ------------------------------------------------------------------------------- fuzzing

KEYS = st.builds(
    lambda gen, kind, a, n: (gen, kind, a, a + n),
    st.sampled_from(["0000000000000001-aaaaaaaa", "0000000000000009-bbbbbbbb"]),
    st.sampled_from(["snapshot", "segment"]),
    st.integers(1, 30),
    st.integers(0, 5),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(KEYS, max_size=12), st.one_of(st.none(), st.integers(0, 40)))
def test_planner_gives_a_chain_or_a_clean_error(entries, target):
    keys = [
        format.snapshot_key("db", g, a) if kind == "snapshot" else format.segment_key("db", g, a, b)
        for g, kind, a, b in entries
    ]
    with tempfile.TemporaryDirectory() as root:
        client = storage.open_replica(root)
        for key in keys:
            client.put(key, b"")  # the planner reads only the listing
        try:
            p = plan(client, "db", target)
        except RestoreError as exc:
            assert "\n" not in str(exc)
            return
    expected = p.snapshot.last_txid + 1
    for seg in p.segments:  # the chain is contiguous from the snapshot
        assert seg.first_txid <= expected <= seg.last_txid + 1
        expected = seg.last_txid + 1
    if target is not None:
        assert p.snapshot.last_txid <= target < expected


def test_a_closed_database_still_uploading_keeps_its_name_until_done(
    s3_replica, stopped_store, tmp_path
):
    """Another database of the same name, opened while the first (closed) still waits for
    the store, waits for it rather than failing, then continues the replica."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    second = str(tmp_path / "b" / "app.db")
    a = apsw.Connection(str(tmp_path / "a" / "app.db"), vfs="walsync")
    a.execute("CREATE TABLE t(x); INSERT INTO t VALUES('a')")
    walsync_vfs.flush(timeout=30)
    stopped_store.stop()
    a.execute("INSERT INTO t VALUES('a2')")  # its upload waits for the store
    a.close()
    opened: list[apsw.Connection] = []
    opener = threading.Thread(target=lambda: opened.append(apsw.Connection(second, vfs="walsync")))
    opener.start()  # its sync point waits for the name
    while not any(s["path"] == second for s in walsync_vfs.stats()):
        time.sleep(0.01)
    stopped_store.resume()
    opener.join()
    (b,) = opened
    b.execute("CREATE TABLE t(x); INSERT INTO t VALUES('b')")
    walsync_vfs.flush(timeout=60)
    assert rows(restored(f"{s3_replica}/app.db", tmp_path / "r.db")) == [("b",)]
    b.close()


def test_a_killed_process_s_private_spool_directory_goes_at_the_next_start(tmp_path):
    """atexit never runs in a process killed by SIGKILL: the next process to make its own
    private spool directory removes it, and never one whose process still runs."""
    program = textwrap.dedent(
        """
        import os, sys
        from walsync_vfs.config import Settings
        from walsync_vfs.spool import Spool
        spool = Spool(Settings()).directory()
        if sys.argv[1] == "die":
            print(spool, flush=True)
            os.kill(os.getpid(), 9)
        child = os.fork()
        if child == 0:
            sys.exit(0)  # a forked worker's normal exit runs its parent's atexit functions
        os.waitpid(child, 0)
        print(spool, flush=True)
        sys.stdin.read()
        """
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}

    def start(how: str) -> tuple[subprocess.Popen, str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", program, how],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        assert proc.stdout is not None
        return proc, proc.stdout.readline().strip()

    killed, dead = start("die")
    assert killed.wait(30) == -9 and os.path.isdir(dead)
    running, alive = start("live")
    later, own = start("live")
    assert not os.path.exists(dead) and os.path.isdir(alive) and os.path.isdir(own)
    for proc in (running, later):
        proc.communicate("", timeout=30)
    assert not os.path.exists(alive) and not os.path.exists(own)


def test_stats_count_encoded_segments_the_store_does_not_take(tmp_path):
    """Commits encoded into a segment whose PUT keeps failing are still unreplicated: they
    count in pending_commits and their age in lag_seconds."""
    store = tmp_path / "store"

    def outage() -> dict:
        (state,) = [s for s in walsync_vfs.stats() if s["path"] == str(tmp_path / "outage.db")]
        return state

    walsync_vfs.configure(replica=(store / "root").as_uri(), upload_interval=0.0)
    try:
        con = apsw.Connection(str(tmp_path / "outage.db"), vfs="walsync")
        con.execute("CREATE TABLE t(x)")
        walsync_vfs.flush(timeout=30)
        store.rename(tmp_path / "away")
        store.write_text("")  # every write under the root fails now
        for i in range(10):
            con.execute("INSERT INTO t VALUES(?)", (i,))
        deadline = time.monotonic() + 30
        while (state := outage())["errors"] < 2:
            assert time.monotonic() < deadline, state
            time.sleep(0.05)
        assert state["pending_commits"] == 10 and state["pending_bytes"] > 0, state
        assert state["lag_seconds"] > 0.1 and state["replicated_txid"] < state["last_txid"]
        store.unlink()
        (tmp_path / "away").rename(store)
        walsync_vfs.flush(timeout=60)
        assert outage()["pending_commits"] == 0
        con.close()
    finally:
        walsync_vfs.flush(timeout=60)
        walsync_vfs.configure(replica="", upload_interval=1.0)
