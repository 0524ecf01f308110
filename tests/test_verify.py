"""Issue 4, item 4: ``verify`` checks every object and names each broken one; restore agrees.

The replica is a real one (written through the VFS, two generations); each test then breaks it
the way a store, a bug or an operator could, and checks verify's exact report and exit status.
"""

from __future__ import annotations

import dataclasses
import io
import os
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import apsw
import pytest
from foreign import write_while_closed

import walsync_vfs
from walsync_vfs import catalog, format, storage
from walsync_vfs.restore import restore


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "walsync_vfs", *args], capture_output=True, text=True, timeout=120
    )


@dataclass
class Replica:
    url: str  # root + '/' + name
    client: storage.ReplicaClient
    gens: list[catalog.Generation]
    tmp: Path
    restorable: str = ""  # what the last failing verify said can be restored

    def segments(self, gen: int) -> list[str]:
        return [catalog.object_key(k) for k in self.gens[gen].segments]

    def epoch(self, gen: int) -> int:
        """The lease epoch its writer keyed the generation's objects with."""
        return self.gens[gen].segments[-1].epoch

    def snapshot(self, gen: int) -> str:
        return catalog.object_key(self.gens[gen].snapshots[0])

    def decoded(self, key: str) -> tuple[format.SegmentHeader, list[format.Commit]]:
        return format.decode_segment(self.client.get(key), key)

    def problems(self) -> list[str]:
        """verify's problem lines, after checking its exit status and last line (which
        ``self.restorable`` keeps the end of)."""
        proc = cli("verify", self.url)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        lines = proc.stderr.splitlines()
        head = f"walsync: error: {self.url}: {len(lines) - 1} problem(s) found; restorable: "
        assert lines[-1].startswith(head), lines[-1]
        self.restorable = lines[-1].removeprefix(head)
        assert proc.stdout == ""
        return [line.removeprefix("walsync: problem: ") for line in lines[:-1]]

    def restore_error(self, *args: str) -> str:
        proc = cli("restore", self.url, "-o", str(self.tmp / "restored.db"), "--force", *args)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("walsync: error: ")
        return proc.stderr.removeprefix("walsync: error: ").rstrip("\n")

    def restored_pages(self, txid: int) -> list[bytes]:
        out = self.tmp / f"at-{txid}.db"
        result = restore(self.url, str(out), txid=txid, force=True)
        data = out.read_bytes()
        return [data[i : i + result.page_size] for i in range(0, len(data), result.page_size)]


@pytest.fixture
def replica(replica_url, tmp_path):
    """``v.db``: generation 0 with a snapshot and 7 one-commit segments, then a foreign write
    while it is closed, and generation 1 with a snapshot and 4 one-commit segments."""
    walsync_vfs.configure(replica=replica_url, upload_interval=0.0)
    path = tmp_path / "v.db"
    con = apsw.Connection(str(path), vfs="walsync")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    walsync_vfs.flush(timeout=30)
    for i in range(6):
        con.execute("INSERT INTO t(v) VALUES(randomblob(?))", (500 + 1000 * i,))
        walsync_vfs.flush(timeout=30)
    con.close()
    write_while_closed(path, "DELETE FROM t")
    con = apsw.Connection(str(path), vfs="walsync")
    for _ in range(4):
        con.execute("INSERT INTO t(v) VALUES(randomblob(3000))")
        walsync_vfs.flush(timeout=30)
    client = storage.open_replica(replica_url)
    gens = catalog.generations(client, "v.db")
    assert [len(g.snapshots) for g in gens] == [1, 1]
    assert len(gens[0].segments) == 7
    after_snapshot = gens[1].last_txid - gens[1].snapshots[0].last_txid
    assert len(gens[1].segments) == after_snapshot == 4
    yield Replica(f"{replica_url}/v.db", client, gens, tmp_path)
    con.close()
    walsync_vfs.configure(replica="", upload_interval=1.0)


def test_a_sound_replica_verifies_with_overlaps_and_later_snapshots(replica):
    # A compacted segment beside the ones it merges (compaction writes before it deletes) and
    # a later snapshot: both must agree with the replayed history, and they do.
    a, b = replica.segments(0)[2:4]
    (ha, ca), (_, cb) = replica.decoded(a), replica.decoded(b)
    merged = format.segment_key(
        "v.db", replica.gens[0].id, ca[0].txid, cb[-1].txid, replica.epoch(0)
    )
    replica.client.put(merged, format.encode_segment(ha.page_size, ca + cb).data)
    txid = cb[-1].txid
    replica.client.put(*snapshot_at(replica, txid, replica.restored_pages(txid)))

    proc = cli("verify", replica.url)
    assert (proc.returncode, proc.stderr) == (0, "")
    ranges = [r for g in catalog.generations(replica.client, "v.db") for r in g.restorable()]
    assert proc.stdout == (
        f"{replica.url}: every object, txid chain and database checksum verified; restorable: "
        f"{catalog.spell_ranges(ranges)}\n"
    )


def snapshot_at(replica: Replica, txid: int, pages: list[bytes]) -> tuple[str, bytes]:
    """A snapshot of generation 0 at ``txid`` holding ``pages``: (key, object)."""
    out = io.BytesIO()
    writer = format.SnapshotWriter(out, len(pages[0]), txid, 0, len(pages))
    for page in pages:
        writer.add_page(page)
    writer.finish()
    key = format.snapshot_key("v.db", replica.gens[0].id, txid, replica.epoch(0))
    return key, out.getvalue()


def test_every_broken_object_is_named(replica):
    """Corrupted, truncated, from a newer version, missing segment, missing snapshot: one run
    names them all, in order, and keeps checking objects after the replay has stopped."""
    segs, client = replica.segments(0), replica.client
    flipped = bytearray(client.get(segs[1]))
    flipped[len(flipped) // 2] ^= 0x40
    client.put(segs[1], bytes(flipped))
    truncated = client.get(segs[3])
    client.put(segs[3], truncated[:-100])
    newer = bytearray(client.get(segs[4]))
    newer[8:10] = (format.SEGMENT_VERSION + 1).to_bytes(2, "big")
    client.put(segs[4], bytes(newer))
    client.delete([segs[5]])
    after_hole = format.parse_key(segs[6])
    client.delete([replica.snapshot(1)])

    assert replica.problems() == [
        f"{segs[1]}: sha256 mismatch",
        f"{segs[3]}: object is {len(truncated) - 100} bytes, header implies {len(truncated)}",
        f"{segs[4]}: written by a newer format version {format.SEGMENT_VERSION + 1}; "
        "upgrade walsync_vfs",
        f"{segs[6]}: txids {after_hole.first_txid - 1}..{after_hole.first_txid - 1} missing "
        "before it",
        f"v.db/{replica.gens[1].id}: generation has no snapshot",
    ]
    # Only what comes before the first damaged object can be restored.
    first = replica.gens[0].snapshots[0].last_txid
    assert replica.restorable == f"txids {first}..{format.parse_key(segs[0]).last_txid}"
    # Restore refuses rather than hand back an older database, and names what is broken.
    g1 = replica.gens[1]
    assert replica.restore_error() == (
        f"v.db: generation {g1.id} has no snapshot, so txids {g1.first_txid}..{g1.last_txid} "
        "cannot be restored; choose an earlier --txid or --timestamp"
    )
    assert replica.restore_error("--txid", str(format.parse_key(segs[1]).last_txid)) == (
        f"{segs[1]}: sha256 mismatch"
    )
    assert replica.restore_error("--txid", str(after_hole.last_txid)) == (
        f"v.db: segments for txids {after_hole.first_txid - 1}..{after_hole.first_txid - 1} are "
        f"missing in generation {replica.gens[0].id}"
    )


def test_an_object_under_another_object_s_name_is_named_not_restored(replica):
    """A snapshot copied under a later txid's key, a segment under a key claiming more
    commits than it holds: both would restore another state than asked, or skip commits."""
    gen, epoch, client = replica.gens[0], replica.epoch(0), replica.client
    snap = replica.snapshot(0)
    late = format.snapshot_key("v.db", gen.id, gen.last_txid, epoch)
    last_seg = f"{gen.last_txid:016x}.e{epoch:08x}.wseg"
    client.delete([k for k in replica.segments(0) if k.endswith(last_seg)])
    client.put(late, client.get(snap))
    first = gen.snapshots[0].last_txid
    assert replica.problems()[0] == (
        f"{late}: holds txid {first}, its name says txid {gen.last_txid}"
    )
    assert replica.restore_error("--txid", str(gen.last_txid)) == (
        f"{late}: holds txid {first}, its name says txid {gen.last_txid}"
    )
    client.delete([late])
    seg = replica.segments(1)[0]
    (header, _) = replica.decoded(seg)
    wide = format.segment_key(
        "v.db", replica.gens[1].id, header.first_txid, header.last_txid + 1, replica.epoch(1)
    )
    client.put(wide, client.get(seg))
    client.delete([seg])
    said = f"txids {header.first_txid}..{header.last_txid + 1}"
    wrong = f"{wide}: holds txid {header.first_txid}, its name says {said}"
    assert replica.problems()[0] == wrong
    assert replica.restore_error() == wrong


def test_a_corrupt_snapshot_is_named_and_its_segments_still_checked(replica):
    snap, segs = replica.snapshot(1), replica.segments(1)
    data = bytearray(replica.client.get(snap))
    data[40] ^= 1
    replica.client.put(snap, bytes(data))
    replica.client.put(segs[2], b"not a segment")
    assert replica.problems() == [
        f"{snap}: sha256 mismatch",
        f"{segs[2]}: bad magic: not a walsync_vfs segment",
    ]
    assert replica.restore_error() == f"{snap}: sha256 mismatch"


def test_a_damaged_later_snapshot_is_restored_around(replica):
    """A periodic snapshot that fails its checks: the earlier snapshot and the segments after
    it rebuild the same states, so restores past it still succeed (and equal)."""
    gen = replica.gens[0]
    txid = gen.snapshots[0].last_txid + 3
    pages = replica.restored_pages(txid)
    key, data = snapshot_at(replica, txid, pages)
    damaged = bytearray(data)
    damaged[40] ^= 1
    replica.client.put(key, bytes(damaged))
    assert replica.problems() == [f"{key}: sha256 mismatch"]
    assert replica.restored_pages(txid) == pages
    out = replica.tmp / "latest-gen0.db"
    assert restore(replica.url, str(out), txid=gen.last_txid, force=True).txid == gen.last_txid


def test_a_wrong_database_checksum_names_segment_and_txid(replica):
    """An intact object (right SHA-256) whose commit does not produce the recorded database."""
    key = replica.segments(1)[1]
    header, commits = replica.decoded(key)
    bad = [dataclasses.replace(c, checksum=c.checksum ^ 1) for c in commits]
    replica.client.put(key, format.encode_segment(header.page_size, bad).data)
    txid = commits[0].txid
    assert replica.problems() == [f"{key}: whole-database checksum mismatch after txid {txid}"]
    assert replica.restore_error() == f"{key}: whole-database checksum mismatch after txid {txid}"


def test_objects_that_contradict_the_replayed_history_are_named(replica):
    """A later snapshot and a compacted segment, each intact on its own, that disagree with the
    database the segments replay to (restore from that snapshot would differ)."""
    segs = replica.segments(0)
    (ha, ca), (_, cb) = replica.decoded(segs[2]), replica.decoded(segs[3])
    liar = [dataclasses.replace(ca[0], checksum=ca[0].checksum ^ 1), *cb]
    merged = format.segment_key(
        "v.db", replica.gens[0].id, ca[0].txid, cb[-1].txid, replica.epoch(0)
    )
    replica.client.put(merged, format.encode_segment(ha.page_size, liar).data)
    txid = cb[-1].txid
    pages = replica.restored_pages(txid)
    pages[-1] = bytes(len(pages[-1]))  # one page zeroed
    snap, data = snapshot_at(replica, txid, pages)
    replica.client.put(snap, data)
    # Sorted by (first, last) txid, the merged segment comes after segs[2] has been replayed.
    assert replica.problems() == [
        f"{merged}: txid {ca[0].txid} differs from the replayed history",
        f"{snap}: snapshot differs from the replayed history",
    ]


def test_a_database_sqlite_rejects_fails_verify_and_restore(replica):
    """Every checksum right, but the pages are not a valid database: integrity_check decides."""
    key = replica.segments(1)[-1]
    header, (commit,) = replica.decoded(key)
    before = format.DbChecksum.from_pages(replica.restored_pages(commit.txid - 1))
    pages = tuple((pgno, bytes(len(page)) if pgno > 1 else page) for pgno, page in commit.pages)
    before.apply(commit.db_size, pages)
    forged = dataclasses.replace(commit, pages=pages, checksum=before.value)
    replica.client.put(key, format.encode_segment(header.page_size, [forged]).data)

    (problem,) = replica.problems()
    prefix = f"v.db/{replica.gens[1].id}: database replayed to txid {commit.txid} fails "
    assert problem.startswith(prefix + "integrity_check: ") and len(problem) > len(prefix) + 18
    error = replica.restore_error()
    assert error == "restored database fails integrity_check: " + problem.removeprefix(
        prefix + "integrity_check: "
    )


def test_verify_of_nothing_fails(tmp_path):
    url = f"{tmp_path.as_uri()}/none.db"
    proc = cli("verify", url)
    assert (proc.returncode, proc.stderr) == (
        1,
        f"walsync: error: no replica of 'none.db' found at {tmp_path.as_uri()}\n",
    )


@pytest.mark.parametrize("command", ["verify", "restore"])
def test_a_command_given_a_root_asks_for_a_database(file_replica, tmp_path, command):
    import walsync_vfs

    con = apsw.Connection(str(tmp_path / "a.db"), vfs="walsync")
    con.execute("CREATE TABLE t(x)")
    walsync_vfs.flush(timeout=30)
    con.close()
    output = ["-o", str(tmp_path / "out.db")] if command == "restore" else []
    proc = cli(command, file_replica, *output)
    assert (proc.returncode, proc.stderr) == (
        1,
        f"walsync: error: {file_replica} is a replica root; {command} one of its databases, "
        f"{file_replica}/<name> (list names them)\n",
    )


def test_a_restore_that_cannot_write_names_its_output(file_replica, tmp_path):
    """A write error that names no file (a full disk, a file size limit) says where."""
    import walsync_vfs

    con = apsw.Connection(str(tmp_path / "a.db"), vfs="walsync")
    con.execute("CREATE TABLE t(x); INSERT INTO t VALUES(randomblob(300000))")
    walsync_vfs.flush(timeout=30)
    con.close()
    out = tmp_path / "out.db"

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))

    proc = subprocess.run(
        [sys.executable, "-m", "walsync_vfs", "restore", f"{file_replica}/a.db", "-o", str(out)],
        capture_output=True, text=True, timeout=60, preexec_fn=small_files,
    )  # fmt: skip
    assert (proc.returncode, proc.stderr) == (1, f"walsync: error: {out}: File too large\n")
    assert list(tmp_path.glob("out.db*")) == []


def test_a_segment_gone_from_the_middle_leaves_what_is_before_it_and_later_generations(replica):
    segs = replica.segments(0)
    gone = format.parse_key(segs[3])
    replica.client.delete([segs[3]])

    assert replica.problems() == [
        f"{segs[4]}: txids {gone.first_txid}..{gone.last_txid} missing before it"
    ]
    first, g1 = replica.gens[0].snapshots[0].last_txid, replica.gens[1]
    assert replica.restorable == (
        f"txids {first}..{gone.first_txid - 1}, {g1.snapshots[0].last_txid}..{g1.last_txid}"
    )


def restore_with_stdout(file_replica: str, tmp_path: Path, stdout: int) -> tuple[int, str, Path]:
    """``restore`` of a small replica with standard output on the descriptor ``stdout``:
    (exit status, stderr, the output path)."""
    con = apsw.Connection(str(tmp_path / "a.db"), vfs="walsync")
    con.execute("CREATE TABLE t(x); INSERT INTO t VALUES(1)")
    walsync_vfs.flush(timeout=30)
    con.close()
    assert last_txid(file_replica, "a.db") == 3  # what the restore's summary line says
    out = tmp_path / "out.db"
    proc = subprocess.run(
        [sys.executable, "-m", "walsync_vfs", "restore", f"{file_replica}/a.db", "-o", str(out)],
        stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=60,
    )  # fmt: skip
    return proc.returncode, proc.stderr, out


def last_txid(root: str, name: str) -> int:
    return catalog.generations(storage.open_replica(root), name)[-1].last_txid


def test_a_reader_gone_from_standard_output_fails_nothing(file_replica, tmp_path):
    """``restore ... | head -0``: the restore is done, and nothing says otherwise."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        status, err, out = restore_with_stdout(file_replica, tmp_path, write_end)
    finally:
        os.close(write_end)
    assert (status, err) == (0, "")
    assert apsw.Connection(str(out)).execute("SELECT x FROM t").fetchall() == [(1,)]


def test_standard_output_that_cannot_be_written_is_named(file_replica, tmp_path):
    """A full disk under standard output: restore's work is done all the same (status 0, a
    warning); verify's output is its work (status 1).  Neither blames a file of its own."""
    with open("/dev/full", "w") as full:
        status, err, out = restore_with_stdout(file_replica, tmp_path, full.fileno())
        assert status == 0
        assert err == (
            "walsync: warning: standard output: No space left on device; restored "
            f"{file_replica}/a.db to {out} at txid 3 (2 pages of 4096 bytes)\n"
        )
        proc = subprocess.run(
            [sys.executable, "-m", "walsync_vfs", "verify", f"{file_replica}/a.db"],
            stdout=full, stderr=subprocess.PIPE, text=True, timeout=60,
        )  # fmt: skip
    assert (proc.returncode, proc.stderr) == (
        1,
        "walsync: error: standard output: No space left on device\n",
    )
