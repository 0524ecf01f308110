"""Two replicators of one replica name (a rolling deploy, two hosts): the writer lease in the
store lets one write at a time, and no object of one is ever replaced by the other's.

Each writer is a process (tests/fence_worker.py) with its own host id and database copy.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import apsw
import pytest

from walsync_vfs import catalog, format, lease, report, storage
from walsync_vfs.restore import restore

WORKER = str(Path(__file__).with_name("fence_worker.py"))
LEASE_TIME = 3.0
NAME = "app.db"


class Writer:
    """A fence_worker process, driven one command at a time."""

    def __init__(self, path: Path, url: str, host: str) -> None:
        self.path, self.host = path, host
        env = dict(os.environ, WALSYNC_HOST_ID=host)
        self.proc = subprocess.Popen(
            [sys.executable, WORKER, str(path), url, str(LEASE_TIME)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.pid = self.ask_nothing()["pid"]

    def ask_nothing(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"writer {self.host} exited ({self.proc.wait()})"
        return json.loads(line)

    def ask(self, command: str) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.ask_nothing()

    def flush(self) -> dict:
        return self.ask("flush")

    def exit(self) -> None:
        assert self.ask("exit") == {"bye": True}
        assert self.proc.wait(timeout=30) == 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def create(path: Path) -> None:
    con = apsw.Connection(str(path))
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, host TEXT, v BLOB)")
    con.close()


def rows(path: Path | str) -> list[tuple]:
    con = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return con.execute("SELECT id, host, v FROM t ORDER BY id").fetchall()
    finally:
        con.close()


def refused_text(waiting: Path, url: str, holder: Writer) -> str:
    return (
        f"{waiting}: replica {url}/{NAME} is written by another writer "
        f"(host {holder.host}, pid {holder.pid}, database {holder.path}); "
        "not replicating until its lease ends"
    )


def versions(url: str) -> dict[str, object]:
    """Every object's version (file: inode and mtime; S3: ETag), the lease aside: a key whose
    version changes between two looks was overwritten."""
    if url.startswith("file:"):
        root = Path(urlsplit(url).path)
        found = {}
        for p in root.rglob("*"):
            if p.is_file() and not p.name.endswith(".walsync-tmp"):
                st = p.stat()
                found[str(p.relative_to(root))] = (st.st_ino, st.st_mtime_ns)
    else:
        import boto3

        s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
        bucket = urlsplit(url).netloc
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        found = {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}
    return {k: v for k, v in found.items() if ".walsync-lease" not in k}


def overwritten(before: dict[str, object], after: dict[str, object]) -> list[str]:
    return [k for k, v in before.items() if k in after and after[k] != v]


def until_replicating(w: Writer, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (answer := w.flush()) != {"flush": "ok"}:
        assert time.monotonic() < deadline, answer
        time.sleep(0.2)


def check_history(url: str, tmp: Path, holder_rows: list[tuple], old_rows: list[tuple]) -> None:
    """verify passes; every restore point is a state of one writer's database (a prefix of
    the old writer's final rows or of the lease holder's), the old writer's final database is
    one of them, and the latest restore is the lease holder's database."""
    client = storage.open_replica(url)
    assert report.verify(client, NAME).problems == []
    out = str(tmp / "restored.db")
    states = []
    for g in catalog.generations(client, NAME):
        for txid in range(g.first_txid, g.last_txid + 1):
            restore(f"{url}/{NAME}", out, txid=txid, force=True)
            got = rows(out)
            assert got in (old_rows[: len(got)], holder_rows[: len(got)]), f"txid {txid}"
            states.append(got)
    assert old_rows in states
    restore(f"{url}/{NAME}", out, force=True)
    assert rows(out) == holder_rows == states[-1]


@pytest.fixture
def two_copies(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a" / NAME, tmp_path / "b" / NAME
    a.parent.mkdir()
    b.parent.mkdir()
    return a, b


@contextlib.contextmanager
def old_and_new(
    url: str, copies: tuple[Path, Path]
) -> Iterator[tuple[Writer, Writer, dict[str, object]]]:
    """A replicating 20 commits, then B started on a copy restored from the replica, as in a
    rolling deploy: (A, B, every object's version when B started); both killed at the end."""
    a_path, b_path = copies
    create(a_path)
    writers: list[Writer] = []
    try:
        a = Writer(a_path, url, "host-a")
        writers.append(a)
        a.ask("write 20")
        assert a.flush() == {"flush": "ok"}
        restore(f"{url}/{NAME}", str(b_path))
        seen = versions(url)
        b = Writer(b_path, url, "host-b")
        writers.append(b)
        yield a, b, seen
    finally:
        for w in writers:
            w.kill()


def test_rolling_deploy(replica_url: str, two_copies: tuple[Path, Path]) -> None:
    """A writes; B restores the replica and writes under the same name; A exits; B takes
    over in a new generation; nothing was overwritten and every restore point is one
    writer's history."""
    with old_and_new(replica_url, two_copies) as (a, b, seen):
        for _ in range(3):
            a.ask("write 10")
            b.ask("write 10")
            assert a.flush() == {"flush": "ok"}
            answer = b.flush()
            assert answer == {"flush": "error", "text": refused_text(b.path, replica_url, a)}
        assert b.ask("stats")["fenced"] == answer["text"]
        a_final = rows(a.path)
        a.exit()
        until_replicating(b)
        assert b.ask("stats")["fenced"] == ""
        b.ask("write 5")
        assert b.flush() == {"flush": "ok"}
        now = versions(replica_url)
        assert overwritten(seen, now) == []
        b.exit()
        check_history(replica_url, b.path.parent.parent, rows(b.path), a_final)
        assert overwritten(now, versions(replica_url)) == []


FENCED_FROM_THE_START = """
import json, sys, time, apsw, walsync_vfs
walsync_vfs.configure(replica=sys.argv[2])
con = apsw.Connection(sys.argv[1], vfs="walsync")
con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, host TEXT, v BLOB)")
for i in range(20):
    con.execute("INSERT INTO t(host) VALUES('b')")
deadline = time.monotonic() + 30
while not walsync_vfs.stats()[0]["fenced"] and time.monotonic() < deadline:
    time.sleep(0.05)
first = walsync_vfs.stats()[0]
time.sleep(0.2)
print(json.dumps([first["fenced"], first["lag_seconds"], walsync_vfs.stats()[0]["lag_seconds"]]))
"""


def test_a_writer_fenced_from_its_start_reports_its_commits_waiting(
    replica_url: str, two_copies: tuple[Path, Path]
) -> None:
    """Its commits never reach the replica: its lag grows, it does not read 0."""
    create(two_copies[0])
    a = Writer(two_copies[0], replica_url, "host-a")
    try:
        a.ask("write 1")
        assert a.flush() == {"flush": "ok"}
        env = dict(os.environ, WALSYNC_HOST_ID="host-b")
        b = subprocess.run(
            [sys.executable, "-c", FENCED_FROM_THE_START, str(two_copies[1]), replica_url],
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
        assert b.returncode == 0, b.stderr
        fenced, first, later = json.loads(b.stdout)
        assert fenced and 0 < first < later
    finally:
        a.kill()


def test_paused_holder_is_fenced(replica_url: str, two_copies: tuple[Path, Path]) -> None:
    """A frozen past its lease (SIGSTOP) loses it to B; resumed, A's flush raises, and what
    it may still write is ignored: verify passes and the latest restore is B's database."""
    with old_and_new(replica_url, two_copies) as (a, b, seen):
        b.ask("write 10")
        a.ask("write 10")
        assert a.flush() == {"flush": "ok"}
        a_rows = rows(a.path)
        os.kill(a.pid, signal.SIGSTOP)
        try:
            until_replicating(b, timeout=LEASE_TIME * 6)
        finally:
            os.kill(a.pid, signal.SIGCONT)
        a.ask("write 10")  # after the takeover: never part of the history
        answer = a.flush()
        assert answer == {"flush": "error", "text": refused_text(a.path, replica_url, b)}
        b.ask("write 5")
        assert b.flush() == {"flush": "ok"}
        a.exit()
        b.exit()
        assert overwritten(seen, versions(replica_url)) == []
        check_history(replica_url, b.path.parent.parent, rows(b.path), a_rows)


def test_two_hosts_start_at_once(replica_url: str, two_copies: tuple[Path, Path]) -> None:
    """Two hosts with equal copies start together: exactly one wins; the other waits and,
    once the winner has closed, continues the same generation (its database equals the
    replica's head)."""
    a_path, b_path = two_copies
    create(a_path)
    b_path.write_bytes(a_path.read_bytes())
    writers = [Writer(a_path, replica_url, "host-a"), Writer(b_path, replica_url, "host-b")]
    try:
        answers = [w.flush() for w in writers]
        winners = [w for w, a in zip(writers, answers, strict=True) if a == {"flush": "ok"}]
        assert len(winners) == 1, answers
        (winner,) = winners
        (loser,) = [w for w in writers if w is not winner]
        assert loser.flush() == {
            "flush": "error",
            "text": refused_text(loser.path, replica_url, winner),
        }
        generation = winner.ask("stats")["generation"]
        epoch = winner.ask("stats")["epoch"]
        winner.exit()
        until_replicating(loser)
        after = loser.ask("stats")
        assert after["generation"] == generation and after["epoch"] > epoch
        loser.exit()
    finally:
        for w in writers:
            w.kill()


def test_lease_refuses_a_live_holder_and_takes_an_expired_one(file_url: str) -> None:
    """The lease itself: a second claimant is refused while the lease is live, takes it with
    a higher epoch once it expired, and the first one's renewal is then refused."""
    client = storage.open_replica(file_url)
    first = lease.Lease(client, NAME, "/x/app.db", ttl=1.0)
    first.acquire()
    os.environ[lease.ENV_HOST_ID] = "other-host"
    try:
        second = lease.Lease(client, NAME, "/y/app.db", ttl=1.0)
        with pytest.raises(lease.Refused):
            second.acquire()
        time.sleep(1.1)
        second.acquire()
        assert second.epoch == first.epoch + 1
        with pytest.raises(lease.Refused):
            first.renew()
    finally:
        del os.environ[lease.ENV_HOST_ID]


@pytest.mark.parametrize("damage", ["garbage", "deleted"])
def test_a_lost_lease_object_is_taken_above_every_epoch_in_the_replica(
    replica_url: str, tmp_path: Path, damage: str
) -> None:
    """A lease object that is unreadable (or gone) says nothing of the epochs used: the next
    writer must take one above every epoch in the replica's keys, or its segments would be
    fenced leftovers that restore ignores although flush() reported them stored."""
    path = tmp_path / NAME
    create(path)
    for _ in range(2):  # two holdings: epochs 1 and 2
        w = Writer(path, replica_url, "host-a")
        w.ask("write 5")
        assert w.flush() == {"flush": "ok"}
        w.exit()
    client = storage.open_replica(replica_url)
    key = format.lease_key(NAME)
    if damage == "garbage":
        client.put(key, b"garbage")
    else:
        client.delete([key])
    w = Writer(path, replica_url, "host-a")
    w.ask("write 5")
    assert w.flush() == {"flush": "ok"}
    assert w.ask("stats")["epoch"] == 3
    w.exit()
    out = tmp_path / "restored.db"
    restore(f"{replica_url}/{NAME}", str(out))
    assert rows(out) == rows(path) and len(rows(path)) == 15


def test_a_file_replica_holds_only_objects_and_leases(file_url: str, tmp_path: Path) -> None:
    """Each writer process starting on a local-directory replica leaves nothing in it but
    the database's objects and its lease (no probe of conditional writes, nor its lock)."""
    path = tmp_path / NAME
    create(path)
    for _ in range(2):
        w = Writer(path, file_url, "host-a")
        w.ask("write 1")
        assert w.flush() == {"flush": "ok"}
        w.exit()
    root = Path(urlsplit(file_url).path)
    assert sorted(p.name for p in root.iterdir()) == [".walsync-lease", NAME]


def test_a_renewal_whose_reply_was_lost_is_still_ours(
    file_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that stalled past a renewal's timeout may still apply it: the next renewal
    then finds the lease object changed, by this very holding (its token), not by another
    writer, and goes on holding it rather than fencing itself."""
    client = storage.open_replica(file_url)
    held = lease.Lease(client, NAME, "/x/app.db", ttl=5.0)
    held.acquire()
    swap = client.swap

    def applied_then_timed_out(key: str, data: bytes, tag: str | None) -> str:
        swap(key, data, tag)
        raise storage.StorageError("timed out waiting for the store")

    monkeypatch.setattr(client, "swap", applied_then_timed_out)
    with pytest.raises(storage.StorageError, match="timed out"):
        held.renew()
    monkeypatch.setattr(client, "swap", swap)
    held.renew()
    assert held.held and held.valid()
    current = lease.Holder.decode(client.get(held.key))
    assert current.epoch == held.epoch == 1 and current.expires > time.time()


def test_renewals_of_one_store_go_together_and_each_stands_alone(replica_url: str) -> None:
    """lease.renew_all: every lease still held is renewed (a later expiry in its object),
    one another writer took meanwhile is refused, and one released meanwhile is left be."""
    client = storage.open_replica(replica_url)
    leases = [lease.Lease(client, name, f"/x/{name}") for name in ("a.db", "b.db", "c.db", "d.db")]
    for held in leases:
        held.acquire()
    before = [lease.Holder.decode(client.get(held.key)) for held in leases]
    # Another writer's compare-and-swap on b's lease object; d is released.
    _, tag = client.get_tagged(leases[1].key)
    other = lease.Holder(before[1].epoch + 1, "other-host", 1, "/y/b.db", time.time() + 60, "t")
    client.swap(leases[1].key, other.encode(), tag)
    leases[3].release()
    errors = lease.renew_all(leases)
    assert errors[0] is None and errors[2] is None and errors[3] is None
    assert isinstance(errors[1], lease.Refused) and "other-host" in str(errors[1])
    assert [held.held for held in leases] == [True, False, True, False]
    after = [lease.Holder.decode(client.get(held.key)) for held in leases]
    assert after[0].expires > before[0].expires and after[2].expires > before[2].expires
    assert after[1] == other and after[3].expires == 0.0
    assert leases[0].valid() and leases[2].valid()
    leases[0].renew()  # one alone goes the same way, over the version the batch left
    assert lease.Holder.decode(client.get(leases[0].key)).expires >= after[0].expires


def test_leftovers_after_a_takeover() -> None:
    """Objects a lower epoch wrote at or after the txid where a higher one took over are
    leftovers; what it wrote before stays history."""
    g = "0000000000000001-00000001"
    keys = [
        format.parse_key(format.snapshot_key(NAME, g, 1, 1)),
        format.parse_key(format.segment_key(NAME, g, 2, 5, 1)),
        format.parse_key(format.segment_key(NAME, g, 6, 7, 1)),  # after B took over at 6
        format.parse_key(format.segment_key(NAME, g, 6, 9, 2)),
    ]
    assert all(keys)
    assert catalog.leftovers(keys) == {keys[2]}  # type: ignore[arg-type]


def test_objects_of_an_epoch_no_lease_granted_fence_nothing(file_replica, tmp_path) -> None:
    """A segment copied under a key with an epoch above the lease's (no writer was ever
    granted it) would make every object of the real epoch from its txid on a leftover: a
    restore short of the history, and the holder's retention deleting its own objects.  It
    fences nothing: restore and retention go by the lease's epoch, verify names it."""
    import walsync_vfs
    from walsync_vfs.compactor import expired

    path = tmp_path / "s.db"
    con = apsw.Connection(str(path), vfs="walsync")
    con.execute("CREATE TABLE t(x)")
    for i in range(5):
        con.execute("INSERT INTO t VALUES(?)", (i,))
        walsync_vfs.flush(timeout=30)
    client = storage.open_replica(file_replica)
    epoch = catalog.granted_epoch(client, "s.db")
    assert epoch is not None and epoch >= 1
    (gen,) = catalog.generations(client, "s.db")
    first = gen.segments[0]
    stray = format.segment_key("s.db", gen.id, first.first_txid, first.last_txid, epoch + 1)
    client.put(stray, client.get(catalog.object_key(first)))

    assert catalog.generations(client, "s.db")[-1].last_txid == gen.last_txid
    out = tmp_path / "out.db"
    assert restore(f"{file_replica}/s.db", str(out)).txid == gen.last_txid
    assert apsw.Connection(str(out)).execute("SELECT count(*) FROM t").fetchone() == (5,)
    assert report.verify(client, "s.db").problems == [
        f"{stray}: keyed with lease epoch {epoch + 1}, which no writer was granted (the lease "
        f"is at {epoch}); not part of the history"
    ]
    listing = client.list("s.db/")
    keep = 10**9  # nothing is old enough for retention: only leftovers could go
    assert expired(listing, keep, epoch=epoch) == []
    assert expired(listing, keep) != []  # what a holder going by every key would delete
    con.close()


class Unconditional:
    """A store that ignores conditional writes (as an old MinIO does): every swap writes."""

    def __init__(self, client: storage.ReplicaClient) -> None:
        self.client = client
        self.conditional_checked = False  # a foreign store: probed (a file store is not)

    def __getattr__(self, name: str) -> object:
        return getattr(self.client, name)

    def swap(self, key: str, data: bytes, tag: str | None) -> str:
        self.client.put(key, data)
        return "any"


class Failing(Unconditional):
    """A store whose swaps fail with ``error``."""

    def __init__(self, client: storage.ReplicaClient, error: storage.StorageError) -> None:
        super().__init__(client)
        self.error = error

    def swap(self, key: str, data: bytes, tag: str | None) -> str:
        raise self.error


def test_a_store_without_conditional_writes_is_refused_at_start_up(
    file_url: str, tmp_path: Path
) -> None:
    """The first sync says the store cannot fence, in flush() and stats(); nothing of the
    database is written.  A store that rejects the header is refused the same way, while an
    ordinary failure of the store is only that (retried)."""
    import walsync_vfs

    url = file_url + "-unconditional"
    plain = storage.open_replica(url)
    walsync_vfs._engine_instance()._clients[url] = Unconditional(plain)
    walsync_vfs.configure(replica=url)
    path = tmp_path / "plain.db"
    con = apsw.Connection(str(path), vfs="walsync")
    try:
        con.execute("CREATE TABLE t(x)")
        with pytest.raises(walsync_vfs.ReplicationError) as raised:
            walsync_vfs.flush(timeout=30)
        expected = (
            f"{url} does not support conditional writes (a create-only PUT overwrote an "
            "existing object), so two writers of one replica name could overwrite each "
            "other's history; use a store that supports If-None-Match/If-Match, or set "
            "fencing=False to replicate unfenced"
        )
        assert str(raised.value) == expected
        (s,) = [s for s in walsync_vfs.stats() if s["path"] == str(path)]
        assert s["fenced"] == expected
        assert [o.key for o in plain.list("")] == []
    finally:
        con.close()
        walsync_vfs.configure(replica="")
    engine = walsync_vfs._engine_instance()
    deadline = time.monotonic() + 30
    while engine.database(str(path)) is not None:  # given up once its retry is refused
        assert time.monotonic() < deadline, "a closed, fenced database is still retried"
        time.sleep(0.05)

    rejecting = Failing(plain, storage.Unsupported("S3 put: not implemented (NotImplemented)"))
    with pytest.raises(lease.Unfenceable, match="does not support conditional writes"):
        lease.check_conditional(rejecting)  # type: ignore[arg-type]
    down = Failing(plain, storage.StorageError("cannot reach the store"))
    with pytest.raises(storage.StorageError, match="cannot reach the store") as failed:
        lease.check_conditional(down)  # type: ignore[arg-type]
    assert not isinstance(failed.value, lease.Unfenceable)


class Gated(Unconditional):
    """The real store, whose segment PUTs wait while the gate is shut."""

    put_many = None  # put_all then goes through put

    def __init__(self, client: storage.ReplicaClient) -> None:
        super().__init__(client)
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()

    def swap(self, key: str, data: bytes, tag: str | None) -> str:
        return self.client.swap(key, data, tag)  # type: ignore[attr-defined]

    def put(self, key: str, data: bytes) -> None:
        if key.endswith(".wseg") and not self.open.is_set():
            self.entered.set()
            assert self.open.wait(30)
        self.client.put(key, data)


def test_a_segment_landing_after_a_takeover_is_not_durable(file_url: str, tmp_path: Path) -> None:
    """A segment whose PUT was under way when the lease passed to another writer lands, but
    its commits are not acknowledged: flush() raises naming the new holder."""
    import walsync_vfs

    url = file_url + "-gated"
    gated = Gated(storage.open_replica(url))
    engine = walsync_vfs._engine_instance()
    engine._clients[url] = gated
    walsync_vfs.configure(replica=url, upload_interval=0.0)
    path = tmp_path / "late.db"
    con = apsw.Connection(str(path), vfs="walsync")
    try:
        con.execute("CREATE TABLE t(x)")
        walsync_vfs.flush(timeout=30)
        db = engine.database(str(path))
        assert db is not None and db.lease is not None
        acknowledged = db.upload.durable_txid
        gated.open.clear()
        con.execute("INSERT INTO t VALUES (1)")
        assert gated.entered.wait(30)
        # Meanwhile the holder's clock passed its lease and another host took it over.
        data, tag = gated.get_tagged(db.lease.key)  # type: ignore[attr-defined]
        holder = lease.Holder.decode(data)
        taker = lease.Holder(holder.epoch + 1, "host-b", 1, "/b/late.db", time.time() + 60, "b")
        gated.swap(db.lease.key, taker.encode(), tag)
        with engine._lock:
            db.lease._valid_until = db.lease._renew_at = 0.0
        gated.open.set()
        with pytest.raises(walsync_vfs.ReplicationError, match="host host-b, pid 1"):
            walsync_vfs.flush(timeout=30)
        assert db.upload.durable_txid == acknowledged  # the INSERT's segment landed, unconfirmed
        stored = [format.parse_key(o.key) for o in gated.list("late.db/")]  # type: ignore[attr-defined]
        assert any(k and k.first_txid == acknowledged + 1 for k in stored)
    finally:
        gated.open.set()
        con.close()
        walsync_vfs.configure(replica="", upload_interval=1.0)
    deadline = time.monotonic() + 30
    while engine.database(str(path)) is not None:  # fenced and closed: given up
        assert time.monotonic() < deadline
        time.sleep(0.05)
