"""Issue 14: a transaction much bigger than memory_cap and max_segment_bytes replicates in
parts (FORMAT.md §4.5) with the application's memory bounded, and restores as one commit."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import apsw
import pytest

from walsync_vfs import catalog, format, report, restore, storage
from walsync_vfs.restore import RestoreError, Vanished, plan, replay, restore_from, split_url
from walsync_vfs.storage.file import FileReplicaClient
from walsync_vfs.workers import Workers

WRITER = Path(__file__).with_name("giant_writer.py")
RECOVERY = Path(__file__).with_name("giant_recovery.py")
BIG_WORKER = Path(__file__).with_name("big_worker.py")
MIB = 1 << 20
# What a process replicating through walsync holds beyond plain apsw whatever the size of
# its transactions: the package and its imports, threads' stacks, zstd contexts, the S3
# client, the shim's copy and verify buffers and the read buffer of a part (1 MiB each), and
# the allocator's slack.
FIXED_ALLOWANCE = 24 * MIB


def run_writer(db: Path, mib: int, *replica: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(WRITER), str(db), str(mib), *replica],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def digest_of(path: Path) -> tuple[str, int]:
    sys.path.insert(0, str(WRITER.parent))
    from giant_writer import digest

    con = apsw.Connection(str(path))
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return digest(con)
    finally:
        con.close()


def giant_parts(url: str) -> list[format.ParsedKey]:
    root, name = split_url(url)
    (g,) = catalog.generations(storage.open_replica(root), name)
    return [k for k in g.segments if k.parts]


def check_giant(replica_url: str, tmp_path: Path, mib: int, max_segment: int, cap: int) -> int:
    """Write ``mib`` MiB in one transaction with plain apsw and through walsync (child
    processes), compare their peak RSS, and restore the replica at and before the commit.
    Returns the peak RSS walsync added (bytes)."""
    plain = run_writer(tmp_path / "plain.db", mib)
    url = f"{replica_url}/app.db"
    replicated = run_writer(tmp_path / "app.db", mib, replica_url, str(max_segment), str(cap))

    parts = giant_parts(url)
    assert len(parts) == parts[0].parts >= mib * MIB // max_segment
    assert {k.first_txid for k in parts} == {parts[0].first_txid}
    giant = parts[0].first_txid

    root, name = split_url(url)
    client = storage.open_replica(root)
    restore_from(client, name, str(tmp_path / "latest.db"))
    assert digest_of(tmp_path / "latest.db") == (replicated["digest"], replicated["rows"])
    assert replicated["rows"] == plain["rows"]
    restore_from(client, name, str(tmp_path / "before.db"), txid=giant - 1)
    assert digest_of(tmp_path / "before.db")[1] == 1  # the row committed before it, only

    # One part at a time: its object is made in one buffer while its pages stream through
    # the compressor, sent, and let go of before the next part is encoded.  What grows with
    # the transaction is per page: the shim's index of its frames and the Python arrays of
    # page numbers, frames and page hashes (under 48 bytes a page together).
    extra = replicated["maxrss"] * 1024 - plain["maxrss"] * 1024
    bound = max_segment + FIXED_ALLOWANCE + 48 * (mib * MIB // 4096)
    assert extra <= bound, f"walsync added {extra / MIB:.1f} MiB, bound {bound / MIB:.1f} MiB"
    print(f"peak RSS: plain {plain['maxrss'] / 1024:.1f} MiB, walsync +{extra / MIB:.1f} MiB")
    return extra


def test_transaction_far_bigger_than_memory_cap(replica_url, tmp_path):
    check_giant(replica_url, tmp_path, 64, 4 * MIB, 8 * MIB)


def restore_peak(url: str, out: Path) -> int:
    """Peak RSS of a fresh child process restoring ``url`` into ``out``."""
    proc = subprocess.run(
        [sys.executable, str(BIG_WORKER), "restore", url, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return int(json.loads(proc.stdout.splitlines()[-1])["peak_rss"])


def test_a_giant_commit_restores_in_bounded_memory(file_url, tmp_path):
    """Parts of a giant commit are applied as they download, not held whole: restoring a
    96 MiB commit stored in 16 MiB parts takes about what restoring the same rows from a
    snapshot takes."""
    knobs = (file_url, str(16 * MIB), str(64 * MIB))
    run_writer(tmp_path / "snap.db", 96)  # written without walsync: its replica snapshots it
    snap = run_writer(tmp_path / "snap.db", 0, *knobs)
    parts = run_writer(tmp_path / "parts.db", 96, *knobs)
    assert len(giant_parts(f"{file_url}/parts.db")) >= 6
    assert not giant_parts(f"{file_url}/snap.db")
    peaks = {
        name: restore_peak(f"{file_url}/{name}", tmp_path / f"restored-{name}")
        for name in ("snap.db", "parts.db")
    }
    assert digest_of(tmp_path / "restored-snap.db") == (snap["digest"], snap["rows"])
    assert digest_of(tmp_path / "restored-parts.db") == (parts["digest"], parts["rows"])
    extra = peaks["parts.db"] - peaks["snap.db"]
    assert extra < 24 * MIB, f"restoring the parts took {extra / MIB:.1f} MiB more"


def test_a_commit_missing_a_part_is_never_restored(file_url, tmp_path):
    """A part lost (a writer that died between parts) makes its commit absent: the commit
    after it cannot be reached across the hole, and nothing before it changes."""
    url = f"{file_url}/app.db"
    run_writer(tmp_path / "app.db", 12, file_url, str(4 * MIB), str(8 * MIB))
    parts = giant_parts(url)
    assert len(parts) >= 3
    root, name = split_url(url)
    client = storage.open_replica(root)
    client.delete([catalog.object_key(parts[1])])

    (g,) = catalog.generations(client, name)
    assert [k.part for k in g.partial] == [k.part for k in parts if k.part != 1]
    assert not any(k.parts for k in g.segments)
    with pytest.raises(RestoreError, match=f"txids {parts[0].first_txid}..{parts[0].first_txid}"):
        restore_from(client, name, str(tmp_path / "latest.db"))
    restore_from(client, name, str(tmp_path / "before.db"), txid=parts[0].first_txid - 1)
    assert digest_of(tmp_path / "before.db")[1] == 1
    assert any("never restored" in line for line in report.ignored(client, name))


def test_a_part_removed_while_it_downloads_makes_the_restore_plan_again(file_url, tmp_path):
    """A part that vanishes while it streams (retention of a live replica) is named as
    vanished, so restore plans again from a fresh listing rather than failing."""
    url = f"{file_url}/app.db"
    run_writer(tmp_path / "app.db", 24, file_url, str(8 * MIB), str(8 * MIB))
    parts = giant_parts(url)
    gone = catalog.object_key(parts[1])
    root, name = split_url(url)
    client = storage.open_replica(root)
    read_range = client.get_range

    def get_range(key: str, start: int, length: int) -> bytes:
        data = read_range(key, start, length)
        if key == gone and start == 0:  # its first piece is out: the rest are not
            client.delete([key])
        return data

    client.get_range = get_range  # type: ignore[method-assign]
    with pytest.raises(Vanished, match=f"{gone}: object listed but missing"):
        replay(client, plan(client, name), str(tmp_path / "out.db"))


class PartGoneForAWhile(FileReplicaClient):
    """A local replica where one part of a commit is deleted the moment a restore first reads
    it and put back by the restore's next listing (a store whose reads and listings briefly
    disagree); counts the first-piece reads of every object."""

    def __init__(self, root: str, key: str) -> None:
        super().__init__(root)
        self.key = key
        self.taken: bytes | None = None  # the part while it is gone
        self.reads: Counter[str] = Counter()

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if start == 0:
            self.reads[key] += 1
            if key == self.key and self.reads[key] == 1:
                self.taken = self.get(key)
                self.delete([key])
        return super().get_range(key, start, length)

    def list(self, prefix: str) -> list[storage.ObjectInfo]:
        if self.taken is not None:
            self.put(self.key, self.taken)
            self.taken = None
        return super().list(prefix)


def test_a_commit_half_applied_when_its_next_part_vanishes_is_applied_again(file_url, tmp_path):
    """The restore drops the parts it has applied of the commit (the file gets back the pages
    they overwrote), keeps the image as of the commit before, and applies the commit again
    from its first part: the snapshot is read once, the first part twice."""
    url = f"{file_url}/app.db"
    written = run_writer(tmp_path / "app.db", 2, file_url, str(256 << 10), str(8 * MIB))
    parts = giant_parts(url)
    assert len(parts) >= 4
    root, name = split_url(url)
    gone = catalog.object_key(parts[len(parts) // 2])
    client = PartGoneForAWhile(root.removeprefix("file://"), gone)
    restore_from(client, name, str(tmp_path / "latest.db"))
    assert digest_of(tmp_path / "latest.db") == (written["digest"], written["rows"])
    assert client.reads[gone] == 2
    assert client.reads[catalog.object_key(parts[0])] == 2
    assert [n for key, n in client.reads.items() if "/snapshot/" in key] == [1]


def test_a_giant_commit_past_the_spool_cap_goes_into_a_snapshot(file_url, tmp_path):
    """The shim's copy of a giant commit's frames counts against spool_cap: one bigger than
    the cap loses its restore point, and the next generation's snapshot holds it."""
    url = f"{file_url}/app.db"
    out = run_writer(tmp_path / "app.db", 24, file_url, str(4 * MIB), str(8 * MIB), str(8 * MIB))
    assert out["lost"] == 1
    root, name = split_url(url)
    client = storage.open_replica(root)
    gens = catalog.generations(client, name)
    assert len(gens) == 2 and not any(k.parts for g in gens for k in g.segments)
    restore_from(client, name, str(tmp_path / "latest.db"))
    assert digest_of(tmp_path / "latest.db") == (out["digest"], out["rows"])


def test_a_transaction_bigger_than_memory_cap_is_recovered_from_the_wal(file_url, tmp_path):
    """A writer killed after committing a transaction it never uploaded: the next process
    ships it from the WAL as the generation's next commit, in parts, reading its pages from
    the WAL a part at a time rather than holding them."""
    db, mib, max_segment, cap = tmp_path / "app.db", 48, 2 * MIB, 8 * MIB
    writer = subprocess.Popen(
        [sys.executable, str(RECOVERY), "write", str(db), file_url, str(mib)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None
        ready = writer.stdout.readline().split()
    finally:
        writer.send_signal(signal.SIGKILL)
        err = writer.communicate(timeout=30)[1]
    assert ready[:1] == ["READY"], err[-3000:]
    url = f"{file_url}/app.db"
    root, name = split_url(url)
    client = storage.open_replica(root)
    (g,) = catalog.generations(client, name)
    acked = g.last_txid
    assert not any(k.parts for k in g.segments)  # nothing of the transaction shipped

    proc = subprocess.run(
        [sys.executable, str(RECOVERY), "recover", str(db), file_url, str(max_segment), str(cap)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    recovered = json.loads(proc.stdout.splitlines()[-1])
    assert (recovered["digest"], recovered["rows"]) == (ready[1], int(ready[2]))

    (after,) = catalog.generations(client, name)
    assert (after.id, after.last_txid, len(after.snapshots)) == (g.id, acked + 1, 1)
    parts = giant_parts(url)
    assert len(parts) == parts[0].parts >= mib * MIB // max_segment
    assert {k.first_txid for k in parts} == {acked + 1}
    restore_from(client, name, str(tmp_path / "latest.db"))
    assert digest_of(tmp_path / "latest.db") == (ready[1], int(ready[2]))
    restore_from(client, name, str(tmp_path / "before.db"), txid=acked)
    assert digest_of(tmp_path / "before.db")[1] == 1

    # What grows with the transaction is per page (its number and frame in arrays, the
    # checksum's hashes); its pages are copied from the WAL to a file and read back a part
    # at a time.
    extra = (recovered["maxrss"] - recovered["base"]) * 1024
    bound = max_segment + FIXED_ALLOWANCE + 48 * (mib * MIB // 4096)
    assert extra <= bound, f"recovery added {extra / MIB:.1f} MiB, bound {bound / MIB:.1f} MiB"


@pytest.mark.slow
def test_256_mib_transaction_with_default_settings(replica_url, tmp_path):
    assert check_giant(replica_url, tmp_path, 256, 16 * MIB, 64 * MIB) <= 64 * MIB  # issue 14


def test_segments_of_very_compressible_pages_are_decoded_one_ahead(tmp_path):
    """A segment of zero pages is almost nothing of what it decompresses to.  Restore's
    prefetch estimates what each comes to from the ones decoded before it (and fetches one
    alone until then), so with segments past its byte budget it decodes one ahead of the
    one applied, as for big segments of any kind.  Counted as fetches started: the listed
    sizes alone would have started a window of them at once."""
    client = FileReplicaClient(str(tmp_path / "replica"))
    gen = format.new_generation_id(1)
    zero, pages = bytes(4096), 3000  # 12 MB of pages a segment: past the 8 MiB budget
    keys, sizes = [], {}
    for txid in range(2, 8):
        commit = format.Commit(txid, txid, pages, 0, tuple((p, zero) for p in range(1, pages + 1)))
        key = format.segment_key("z.db", gen, txid, txid)
        data = bytes(format.encode_segment(4096, [commit]).data)
        client.put(key, data)
        keys.append(format.parse_key(key))
        sizes[key] = len(data)
    started = []

    class Counted(Workers):
        def submit(self, fn, *args):
            started.append(args[0])
            return super().submit(fn, *args)

    pool = Counted(4, "test-prefetch")
    try:
        decoded = restore._decoded(pool, client, keys, sizes)
        assert len(started) == 1  # nothing decoded yet: one alone
        seen = [next(decoded)[0] for _ in range(3)]
        assert seen == [catalog.object_key(k) for k in keys[:3]]
        assert len(started) == 4  # the three handed over, one more decoding
        assert [c.txid for *_, commits in decoded for c in commits] == [5, 6, 7]
    finally:
        pool.shutdown()
