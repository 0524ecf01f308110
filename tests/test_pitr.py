"""Issue: point-in-time restore, list and verify."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import random
import re
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import apsw
import pytest
from foreign import write_while_closed
from replicas import replicate

import walsync_vfs
from walsync_vfs import catalog, compactor, format, objects, storage
from walsync_vfs.restore import (
    RESTORE_ATTEMPTS,
    RestoreError,
    iso_time,
    plan,
    restore_from,
)
from walsync_vfs.storage.file import FileReplicaClient


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "walsync_vfs", *args], capture_output=True, text=True, timeout=120
    )


def content_hash(con: apsw.Connection) -> str:
    h = hashlib.sha256()
    for row in con.execute("SELECT id, v FROM t ORDER BY id"):
        h.update(repr(row).encode())
    return h.hexdigest()


@pytest.fixture
def history(file_replica, tmp_path):
    """A database with 60 commits, and per commit: (txid, commit time, content hash)."""
    con = apsw.Connection(str(tmp_path / "pit.db"), vfs="walsync")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    log = []
    rng = random.Random(7)
    for i in range(60):
        if i % 10 == 9:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        with con:  # every iteration changes the database: exactly one commit each
            con.execute("INSERT INTO t(v) VALUES(randomblob(?))", (rng.randint(10, 9000),))
            if i % 3 == 2:
                con.execute("DELETE FROM t WHERE id % 5 = ?", (i % 5,))
        log.append((time.time_ns(), content_hash(con)))
        time.sleep(0.002)
    walsync_vfs.flush(timeout=30)
    url = f"{file_replica}/pit.db"
    # Map each logged commit to its txid: txids are consecutive and end at the last one.
    last = next(s for s in walsync_vfs.stats() if s["name"] == "pit.db")["replicated_txid"]
    log = [(last - len(log) + 1 + i, t, h) for i, (t, h) in enumerate(log)]
    yield url, log, con
    con.close()


def restored_hash(path) -> str:
    con = apsw.Connection(str(path))
    assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    return content_hash(con)


def test_every_sampled_txid_restores_exactly(history, tmp_path):
    url, log, _ = history
    for i, (txid, _, want) in enumerate(random.Random(1).sample(log, 8)):
        out = tmp_path / f"tx{i}.db"
        proc = cli("restore", url, "-o", str(out), "--txid", str(txid))
        assert proc.returncode == 0, proc.stderr
        assert f"at txid {txid} " in proc.stdout
        assert restored_hash(out) == want


def segment_per_commit(
    path: Path, root: str, sizes: Sequence[int], after: Callable[[apsw.Connection], None]
) -> list[str]:
    """A table of one row per size at ``path``, each commit flushed in a segment of its own
    (one generation); ``after(con)`` runs after each commit.  The segments' keys, sorted."""
    con = apsw.Connection(str(path), vfs="walsync")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    for size in sizes:
        con.execute("INSERT INTO t(v) VALUES(randomblob(?))", (size,))
        after(con)
        walsync_vfs.flush(timeout=30)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    prefix = f"{path.name}/"
    return sorted(o.key for o in FileReplicaClient(root).list(prefix) if "/seg/" in o.key)


def record(hashes: list[str]) -> Callable[[apsw.Connection], None]:
    """An ``after`` for segment_per_commit that keeps each commit's content hash."""
    return lambda con: hashes.append(content_hash(con))


class ListingRace(FileReplicaClient):
    """A local replica whose next ``misses`` listings miss one segment, as a LIST taken while
    compaction swaps segments can (the originals deleted, the merged one not seen yet)."""

    def __init__(self, root: str, hidden: str, misses: int) -> None:
        super().__init__(root)
        self.hidden, self.misses, self.listings = hidden, misses, 0

    def list(self, prefix: str) -> list[storage.ObjectInfo]:
        self.listings += 1
        found = super().list(prefix)
        if self.misses:
            self.misses -= 1
            found = [o for o in found if o.key != self.hidden]
        return found


@pytest.mark.parametrize("misses", [1, RESTORE_ATTEMPTS])
def test_a_listing_with_a_hole_is_taken_again(file_replica, tmp_path, misses):
    root = file_replica.removeprefix("file://")
    hashes: list[str] = []
    segs = segment_per_commit(tmp_path / "hole.db", root, range(100, 105), record(hashes))
    want = hashes[-1]
    assert len(segs) >= 3
    client = ListingRace(root, segs[len(segs) // 2], misses)
    out = tmp_path / "raced.db"
    if misses < RESTORE_ATTEMPTS:
        restore_from(client, "hole.db", str(out))
        assert restored_hash(out) == want
    else:  # a hole in every listing is one in the replica
        with pytest.raises(RestoreError, match=r"segments for txids \d+\.\.\d+ are missing"):
            restore_from(client, "hole.db", str(out))
        assert not out.exists()
    assert client.listings == misses + (misses < RESTORE_ATTEMPTS)


class CompactedAhead(FileReplicaClient):
    """A local replica where each listing arms one real compaction (the merged segment put,
    then the originals deleted, by a client of its own, as the engine's compactor does), run
    the moment a restore first GETs the first segment of the earliest of ``groups`` still
    there: whatever a restore has listed, segments it has not read yet are merged away
    under it, the newest ones last, as on a busy replica.  With ``unlisted_once``, the
    listing right after a compaction misses the merged segment as well as the originals, as
    a LIST taken while compaction swaps them can."""

    def __init__(self, root: str, groups: list[list[str]], unlisted_once: bool = False) -> None:
        super().__init__(root)
        self.compactor = FileReplicaClient(root)
        self.groups = groups
        self.unlisted_once = unlisted_once
        self.unlisted: set[str] = set()  # merged segments the next listing misses
        self.lock = threading.Lock()  # prefetch threads GET at once
        self.armed = False
        self.listings = self.compactions = self.snapshot_downloads = 0

    def list(self, prefix: str) -> list[storage.ObjectInfo]:
        with self.lock:
            self.listings += 1
            self.armed = True
            unlisted, self.unlisted = self.unlisted, set()
        return [o for o in super().list(prefix) if o.key not in unlisted]

    def get(self, key: str) -> bytes:
        with self.lock:
            if self.armed and self.groups and key == self.groups[0][0]:
                self.armed = False
                merged = [format.parse_key(k) for k in self.groups.pop(0)]
                puts, doomed = compactor.merge_plan(self.compactor, merged, 1 << 30)
                for merged_key, data in puts:  # the merged segment first, as the engine does
                    self.compactor.put(merged_key, data)
                    if self.unlisted_once:
                        self.unlisted.add(merged_key)
                self.compactor.delete(doomed)
                self.compactions += 1
        return super().get(key)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        # A download's first piece (planning by timestamp reads a snapshot's header alone).
        if "/snapshot/" in key and start == 0 and length > format.SNAPSHOT_HEADER_SIZE:
            with self.lock:
                self.snapshot_downloads += 1
        return super().get_range(key, start, length)


@pytest.mark.parametrize("target", ["newest", "txid", "timestamp"])
def test_a_restore_carries_on_from_its_image_when_what_it_has_not_read_is_compacted(
    file_replica, tmp_path, target
):
    """Every listing is followed by a compaction of segments the restore listed and has not
    read yet: the restore keeps the image it has built and plans only the rest, so it reads
    the snapshot once and gets further each time, past RESTORE_ATTEMPTS tries.  A txid or
    timestamp inside the last merged segment is still where the replay ends."""
    source = tmp_path / "busy.db"
    root = file_replica.removeprefix("file://")
    log: list[tuple[int, str]] = []  # per commit: a time between it and the next, and the content
    segs = segment_per_commit(
        source, root, range(300, 312), lambda con: log.append((time.time_ns(), content_hash(con)))
    )
    late = segs[-2 * RESTORE_ATTEMPTS :]
    last = format.parse_key(segs[-1]).last_txid
    assert [format.parse_key(k).last_txid for k in late] == list(
        range(last - len(late) + 1, last + 1)
    )
    # The target: the first commit of the last group to be compacted, or the newest.
    txid = format.parse_key(late[-2]).last_txid if target != "newest" else last
    when, want = log[len(log) - 1 - (last - txid)]
    client = CompactedAhead(root, [late[i : i + 2] for i in range(0, len(late), 2)])
    out = tmp_path / "restored.db"
    result = restore_from(
        client,
        "busy.db",
        str(out),
        txid=txid if target == "txid" else None,
        timestamp_ns=when if target == "timestamp" else None,
    )
    assert result.txid == txid
    assert restored_hash(out) == want
    if target == "newest":
        assert out.read_bytes() == source.read_bytes()
    assert client.compactions == RESTORE_ATTEMPTS  # each try met one, and got past it
    assert client.listings == RESTORE_ATTEMPTS + 1
    assert client.snapshot_downloads == 1  # never started over
    assert not set(late) & {o.key for o in FileReplicaClient(root).list("busy.db/")}


def test_a_listing_that_misses_the_newest_segments_does_not_end_the_restore_early(
    file_replica, tmp_path
):
    """The listing taken to carry on misses the last segments (compacted, merged one not
    seen yet): the restore lists again rather than end older than it planned."""
    root = file_replica.removeprefix("file://")
    hashes: list[str] = []
    segs = segment_per_commit(tmp_path / "tail.db", root, range(300, 306), record(hashes))
    want = hashes[-1]
    client = CompactedAhead(root, [segs[-3:]], unlisted_once=True)
    out = tmp_path / "restored.db"
    result = restore_from(client, "tail.db", str(out))
    assert result.txid == format.parse_key(segs[-1]).last_txid
    assert restored_hash(out) == want
    assert (client.compactions, client.listings, client.snapshot_downloads) == (1, 3, 1)


def test_timestamps_restore_the_last_commit_at_or_before(history, tmp_path):
    url, log, _ = history
    for i, (txid, t, want) in enumerate(random.Random(2).sample(log[1:], 6)):
        out = tmp_path / f"ts{i}.db"
        # Halfway between this commit's log time and the next commit: this commit is the last.
        proc = cli("restore", url, "-o", str(out), "--timestamp", f"{(t + 500_000) / 1e9:.6f}")
        assert proc.returncode == 0, proc.stderr
        assert restored_hash(out) == want
        assert f"at txid {txid} " in proc.stdout


def test_iso_timestamps_with_any_timezone_restore_the_same_commit(history, tmp_path):
    url, log, _ = history
    txid, t, want = log[len(log) // 2]
    when = datetime.fromtimestamp((t + 500_000) / 1e9, UTC)
    for i, text in enumerate(
        [
            when.isoformat(),  # +00:00
            when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            when.astimezone(timezone(timedelta(hours=-7, minutes=-30))).isoformat(),
        ]
    ):
        out = tmp_path / f"iso{i}.db"
        proc = cli("restore", url, "-o", str(out), "--timestamp", text)
        assert proc.returncode == 0, proc.stderr
        assert f"at txid {txid} " in proc.stdout
        assert restored_hash(out) == want


def test_targets_outside_history_name_the_available_range(history, tmp_path):
    url, log, _ = history
    out = str(tmp_path / "x.db")
    last = log[-1][0]
    proc = cli("restore", url, "-o", out, "--txid", str(last + 5))
    assert proc.returncode == 1
    assert proc.stderr == (
        f"walsync: error: pit.db: txid {last + 5} is not in the retained history "
        f"(available: txids 1..{last})\n"
    )
    client = storage.open_replica(url.rsplit("/", 1)[0])
    (gen,) = catalog.generations(client, "pit.db")
    key = catalog.object_key(gen.snapshots[0])
    since = iso_time(format.read_snapshot(client.get(key), key)[0].time_ns)
    proc = cli("restore", url, "-o", out, "--timestamp", "2001-01-01T00:00:00Z")
    assert proc.returncode == 1
    assert proc.stderr == (
        "walsync: error: pit.db: timestamp 2001-01-01T00:00:00.000000000+00:00 is before the "
        f"retained history (available: {since} onwards, txids 1..{last})\n"
    )
    assert not (tmp_path / "x.db").exists()
    proc = cli("restore", url, "-o", out, "--timestamp", since)  # the time it names works
    assert proc.returncode == 0, proc.stderr


def test_a_restore_at_a_printed_commit_time_includes_that_commit(history, tmp_path):
    """Times are printed to the nanosecond: restoring at list's time of the last commit
    restores that commit, not the one before it."""
    url, log, con = history
    listed = json.loads(cli("list", url, "--json").stdout)
    last_time = listed["generations"][-1]["segments"]["last_time"]
    out = str(tmp_path / "at.db")
    proc = cli("restore", url, "-o", out, "--timestamp", last_time)
    assert proc.returncode == 0, proc.stderr
    assert restored_hash(out) == log[-1][2]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "2001-01-01T00:00:00",
            "timestamp '2001-01-01T00:00:00' has no timezone: add one, e.g. "
            "2001-01-01T00:00:00+00:00",
        ),
        (
            "2001-01-01",
            "timestamp '2001-01-01' has no timezone: add one, e.g. 2001-01-01T00:00:00+00:00",
        ),
        (
            "yesterday",
            "invalid timestamp 'yesterday': use ISO 8601 with a timezone or unix seconds",
        ),
        ("inf", "invalid timestamp 'inf': use ISO 8601 with a timezone or unix seconds"),
    ],
)
def test_bad_timestamps_are_one_line_errors(text, error, tmp_path):
    proc = cli(
        "restore", f"{tmp_path.as_uri()}/x.db", "-o", str(tmp_path / "x.db"), "--timestamp", text
    )
    assert proc.returncode == 2
    assert proc.stderr == (
        f"walsync: error: argument --timestamp: {error} "
        "(see python -m walsync_vfs restore --help)\n"
    )


def test_timestamps_in_every_rfc_3339_spelling_name_one_time():
    from walsync_vfs.cli import parse_timestamp

    utc = parse_timestamp("2001-01-01T05:30:00Z")
    for text in ("2001-01-01t05:30:00z", "2001-01-01T11:00:00+05:30", "2001-01-01 05:30:00+00:00"):
        assert parse_timestamp(text) == utc, text
    assert utc == 978327000 * 1_000_000_000


def expected_listing(client: storage.ReplicaClient, name: str) -> dict:
    """What ``list --json`` must say about ``name``, worked out from the store directly."""
    sizes = {o.key: o.size for o in client.list(name + "/")}
    gens = []
    for gen_id in sorted({k.split("/")[1] for k in sizes}):
        keys = sorted(k for k in sizes if k.split("/")[1] == gen_id)
        snaps = [format.parse_key(k) for k in keys if "/snapshot/" in k]
        segs = [k for k in keys if "/seg/" in k]
        first = format.read_segment_header(client.get(segs[0]), segs[0]).index[0]
        last = format.read_segment_header(client.get(segs[-1]), segs[-1]).index[-1]
        gens.append(
            {
                "generation": gen_id,
                "first_txid": snaps[0].last_txid,
                "last_txid": last.txid,
                "restorable": [[snaps[0].last_txid, last.txid]],
                "snapshots": [
                    {"txid": s.last_txid, "bytes": sizes[catalog.object_key(s)]} for s in snaps
                ],
                "segments": {
                    "count": len(segs),
                    "first_txid": format.parse_key(segs[0]).first_txid,
                    "last_txid": last.txid,
                    "first_time": iso_time(first.time_ns),
                    "last_time": iso_time(last.time_ns),
                    "bytes": sum(sizes[k] for k in segs),
                },
            }
        )
    return {"url": f"{client.url}/{name}", "name": name, "generations": gens}


def test_list_a_database_and_every_database_under_a_root(history, tmp_path):
    url, log, _ = history
    root = url.rsplit("/", 1)[0]
    other = apsw.Connection(str(tmp_path / "other.db"), vfs="walsync")
    other.execute("CREATE TABLE t(x)")
    other.execute("INSERT INTO t VALUES(1)")
    walsync_vfs.flush(timeout=30)
    client = storage.open_replica(root)
    want = {name: expected_listing(client, name) for name in ("other.db", "pit.db")}
    assert want["pit.db"]["generations"][0]["last_txid"] == log[-1][0]

    proc = cli("list", url, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == want["pit.db"]
    proc = cli("list", root, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"url": root, "databases": list(want.values())}

    proc = cli("list", root)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for info in want.values():
        (g,) = info["generations"]
        segs = g["segments"]
        at = lines.index(info["url"])
        assert lines[at + 1 : at + 4] == [
            f"  generation {g['generation']}  txids {g['first_txid']}..{g['last_txid']}",
            f"    snapshot  txid {g['first_txid']}  {g['snapshots'][0]['bytes']} bytes",
            f"    segments  {segs['count']}  txids {segs['first_txid']}..{segs['last_txid']}"
            f"  {segs['first_time']} .. {segs['last_time']}  {segs['bytes']} bytes",
        ]
    at = lines.index(url)
    assert cli("list", url).stdout == "\n".join(lines[at : at + 4]) + "\n"

    empty = tmp_path / "empty"
    empty.mkdir()
    proc = cli("list", empty.as_uri())
    assert proc.returncode == 1
    assert proc.stderr == f"walsync: error: nothing replicated at {empty.as_uri()}\n"
    other.close()


def test_progress_bar_on_a_terminal_only(history, tmp_path):
    url, log, _ = history
    p = plan(storage.open_replica(url.rsplit("/", 1)[0]), "pit.db")
    objects = len(p.segments) + 1
    quiet = cli("restore", url, "-o", str(tmp_path / "quiet.db"))
    assert quiet.returncode == 0 and quiet.stderr == ""

    controller, terminal = pty.openpty()  # stderr is a real terminal, stdout a pipe
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    cmd = [sys.executable, "-m", "walsync_vfs", "restore", url, "-o", str(tmp_path / "tty.db")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=terminal)
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO: the child is gone and with it the terminal's last writer
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    assert proc.wait(timeout=60) == 0
    assert proc.stdout.read().decode().startswith(f"restored {url} to ")
    *_, last = filter(None, re.split(r"[\r\n]+", shown.decode()))  # tqdm redraws with \r
    assert last.startswith("pit.db: 100%|") and f"| {objects}/{objects} [" in last
    assert last.rstrip().endswith("obj/s]")


def test_the_recorded_checksum_is_that_of_the_source_file(history, tmp_path):
    """Item 2 at the source: the checksum the capture recorded with the last commit equals one
    computed from scratch over the database file's pages (read in a child process: closing an
    fd of a database this process has open would drop its POSIX locks)."""
    url, log, con = history
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every page in the main file
    client = storage.open_replica(url.rsplit("/", 1)[0])
    (gen,) = catalog.generations(client, "pit.db")
    key = catalog.object_key(gen.segments[-1])
    last = format.read_segment_header(client.get(key), key).index[-1]
    assert last.txid == log[-1][0]
    page_size = con.execute("PRAGMA page_size").fetchone()[0]
    scratch = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from walsync_vfs.format import DbChecksum as C; d = open(sys.argv[1], "
            "'rb').read(); n = int(sys.argv[2]); "
            "print(C.from_pages(d[i : i + n] for i in range(0, len(d), n)).value)",
            str(tmp_path / "pit.db"),
            str(page_size),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(scratch.stdout) == last.checksum


def test_a_name_with_a_space_round_trips_through_list_and_restore(tmp_path):
    """A file URL is percent-encoded whole: ``list`` prints the name the way it prints the
    root, and ``restore`` reads either spelling back."""
    root = tmp_path / "back ups"
    walsync_vfs.configure(replica=root.as_uri())
    try:
        con = apsw.Connection(str(tmp_path / "my db.db"), vfs="walsync")
        con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
        con.execute("INSERT INTO t(v) VALUES(x'01')")
        walsync_vfs.flush(timeout=30)
        listed = json.loads(cli("list", root.as_uri(), "--json").stdout)
        urls = [db["url"] for db in listed["databases"]]
        assert urls == [f"{root.as_uri()}/my%20db.db"]
        for i, url in enumerate((urls[0], f"{root.as_uri()}/my db.db")):
            out = tmp_path / f"out{i}.db"
            done = cli("restore", url, "-o", str(out))
            assert done.returncode == 0, done.stderr
            assert restored_hash(out) == content_hash(con)
        con.close()
    finally:
        walsync_vfs.flush(timeout=30)
        walsync_vfs.configure(replica="")


def test_a_root_one_directory_below_slash_is_listed_as_a_root():
    """``file:///backups`` is a root, not database ``backups`` under a root ``file://``."""
    from walsync_vfs import report

    client, name = report.open_target("file:///tmp")
    assert (client.url, name) == ("file:///tmp", None)


def test_a_generation_with_only_a_part_of_a_commit_is_refused_in_one_line(file_url, tmp_path):
    """A later generation whose snapshot never landed and whose only object is one part of a
    cut-short commit: no time can be read from it, and it holds no whole commit."""
    replicate(file_url, tmp_path / "a.db", "CREATE TABLE t(x); INSERT INTO t VALUES(1)")
    seg = tmp_path / "replica" / "a.db" / "00000000000000aa-deadbeef" / "seg"
    seg.mkdir(parents=True)
    (seg / "00000000000000aa-00000000000000aa.p00000000of00000002.e00000001.wseg").write_bytes(b"x")
    for at in (["--timestamp", "2030-01-01T00:00:00+00:00"], []):
        proc = cli("restore", f"{file_url}/a.db", "-o", str(tmp_path / "out.db"), *at)
        assert (proc.returncode, proc.stderr) == (
            1,
            "walsync: error: a.db: generation 00000000000000aa-deadbeef has no snapshot, so its "
            "state at txid 170 cannot be restored; choose an earlier --txid or --timestamp\n",
        )


def test_unix_seconds_are_read_to_the_nanosecond():
    """A float has ~240 ns of resolution at today's epoch: a commit's own time given as
    unix seconds must not land before it, nor 100 ns before it after it."""
    from walsync_vfs.cli import parse_timestamp

    commit = 1_796_647_105_169_901_846
    for ns in (commit, commit - 100, commit + 1):
        assert parse_timestamp(f"{ns // 10**9}.{ns % 10**9:09d}") == ns
    assert parse_timestamp("1_796_647_105.5") == 1_796_647_105_500_000_000


def snapshots_of(url: str, name: str) -> list[int]:
    return [s.last_txid for g in catalog.generations(storage.open_replica(url), name)
            for s in g.snapshots]  # fmt: skip


@pytest.fixture
def lost_tail(file_url, tmp_path):
    """A generation with two snapshots, the segments after the older one deleted (the newer
    one still holds the end state): (url, commit time by txid, older and newer snapshot's
    txids).  Snapshots come from snapshot_interval; the test waits for them to land."""
    # No compaction: it would delete the segments the fixture reads.
    walsync_vfs.configure(
        replica=file_url, upload_interval=0.0, snapshot_interval=0.3, compact_segments=10**6
    )
    try:
        con = apsw.Connection(str(tmp_path / "tail.db"), vfs="walsync")
        con.execute("CREATE TABLE t(x)")
        deadline = time.monotonic() + 60
        while len(snapshots_of(file_url, "tail.db")) < 3:  # the first, then two periodic
            assert time.monotonic() < deadline, "no periodic snapshots"
            con.execute("INSERT INTO t VALUES(randomblob(100))")
            walsync_vfs.flush(timeout=30)
        con.close()
        walsync_vfs.flush(timeout=30)
    finally:
        walsync_vfs.configure(
            replica="", upload_interval=1.0, snapshot_interval=86400.0, compact_segments=32
        )
    client = storage.open_replica(file_url)
    (gen,) = catalog.generations(client, "tail.db")
    older, newer = (s.last_txid for s in gen.snapshots[-2:])
    times: dict[int, int] = {}
    for seg in gen.segments:
        key = catalog.object_key(seg)
        for entry in format.read_segment_header(client.get(key), key).index:
            times[entry.txid] = entry.time_ns
        if seg.last_txid > older:
            client.delete([key])
    return f"{file_url}/tail.db", times, older, newer


def test_a_timestamp_whose_commits_are_missing_is_refused(lost_tail, tmp_path):
    """The state at a time after the older snapshot's commits comes from commits whose
    segments are gone: refused, as --txid is, not the older snapshot's state."""
    url, times, older, newer = lost_tail
    assert newer > older + 1
    when = times[older + 1] + 1000  # just after the first commit the older one lacks
    proc = cli("restore", url, "-o", str(tmp_path / "o.db"), "--timestamp", f"{when / 1e9:.9f}")
    assert proc.returncode == 1, proc.stdout
    assert "missing" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "o.db").exists()


def test_the_newest_state_is_refused_when_only_an_older_one_can_be_rebuilt(lost_tail, tmp_path):
    """The newest snapshot is damaged and the segments that lead to it from the one before
    are gone: a restore of the latest state fails, not the older state with exit 0."""
    url, *_ = lost_tail
    client = storage.open_replica(url.rsplit("/", 1)[0])
    (gen,) = catalog.generations(client, "tail.db")
    path = Path(client.root) / catalog.object_key(gen.snapshots[-1])
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    proc = cli("restore", url, "-o", str(tmp_path / "o.db"))
    assert proc.returncode == 1, proc.stdout
    key = catalog.object_key(gen.snapshots[-1])
    assert proc.stderr == f"walsync: error: {key}: sha256 mismatch\n"
    assert not (tmp_path / "o.db").exists()


def test_a_time_a_generation_without_its_snapshot_may_hold_is_refused(file_url, tmp_path):
    """The second generation's snapshot is lost: a time after the first generation's last
    commit but before the second's first may be after that snapshot, so it is refused
    rather than restored as the first generation's end."""
    path = tmp_path / "gens.db"
    replicate(file_url, path, "CREATE TABLE t(x); INSERT INTO t VALUES (1)")
    write_while_closed(path, "INSERT INTO t VALUES (2)")  # the next open: a new generation
    replicate(file_url, path, "INSERT INTO t VALUES (3)")
    client = storage.open_replica(file_url)
    first, second = catalog.generations(client, "gens.db")
    began, ended = (
        objects.segment_header(client, key, g.sizes[key]).index[i].time_ns
        for g, i in ((second, 0), (first, -1))
        for key in [catalog.object_key(g.segments[i])]
    )
    when = (ended + began) // 2
    client.delete([catalog.object_key(s) for s in second.snapshots])
    url, out = f"{file_url}/gens.db", tmp_path / "o.db"
    proc = cli("restore", url, "-o", str(out), "--timestamp", f"{when / 1e9:.9f}")
    assert proc.returncode == 1, proc.stdout
    assert proc.stderr == (
        f"walsync: error: gens.db: generation {second.id} has no snapshot, so txids "
        f"{second.first_txid}..{second.last_txid} cannot be restored; choose an earlier "
        "--txid or --timestamp\n"
    )


def test_iso_timestamps_are_read_to_the_nanosecond():
    """Commit times are nanoseconds: an ISO time with nine digits names the same instant as
    the same time in unix seconds, not the microsecond before it."""
    from walsync_vfs.cli import parse_timestamp

    assert parse_timestamp("2001-01-01T05:30:00.123456789Z") == 978327000_123456789
    assert parse_timestamp("2001-01-01T11:00:00,5+05:30") == 978327000_500000000
    assert parse_timestamp("978327000.123456789") == 978327000_123456789


def test_a_file_restore_makes_beside_output_is_named_as_output_in_errors():
    """The staging copy beside OUTPUT is restore's own: a directory the user cannot write
    is reported for OUTPUT, with the directory, not as a raw error about that file."""
    import errno

    from walsync_vfs.cli import described

    denied = PermissionError(errno.EACCES, "Permission denied", "/ro/app.db.walsync-tmp")
    assert described(denied, "/ro/app.db") == "/ro/app.db: Permission denied (in /ro)"
    other = PermissionError(errno.EACCES, "Permission denied", "/elsewhere/file")
    assert described(other, "/ro/app.db") == "[Errno 13] Permission denied: '/elsewhere/file'"


def test_verify_shows_the_history_gone_from_the_store(lost_tail):
    """Objects deleted from the store leave nothing to check, but not nothing to see: verify
    says which txids can be restored, and the deleted segments show as a gap."""
    url, _, older, newer = lost_tail
    proc = cli("verify", url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (
        f"{url}: every object, txid chain and database checksum verified; restorable: "
        f"txids 1..{older}, {newer}\n"
    )


def test_an_unknown_option_points_at_its_command_s_help(tmp_path):
    proc = cli("list", "--jsno", tmp_path.as_uri())
    assert (proc.returncode, proc.stderr) == (
        2,
        "walsync: error: unrecognized arguments: --jsno (see python -m walsync_vfs list --help)\n",
    )
