"""Issue 14: snapshots stream up and restores stream down in memory that does not grow with
the database, and what needs only a header (``list``, the engine's start-up, restore
planning) downloads only header bytes, counted on the wire."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import apsw
import pytest
from loopback import LoopbackProxy
from test_transfer import listed_parts  # noqa: F401 (a fixture)

import walsync_vfs
from walsync_vfs import catalog, format, objects, storage
from walsync_vfs.lineage import read_head
from walsync_vfs.report import describe_database
from walsync_vfs.restore import plan, restore
from walsync_vfs.storage.s3 import S3ReplicaClient
from walsync_vfs.storage.transfer import PART_SIZE, TRANSFER_WORKERS

MIB = 1 << 20
WORKER = str(Path(__file__).with_name("big_worker.py"))
ROW = 3000  # bytes of random blob per row: the database does not compress


def build(path: Path, size: int) -> Path:
    """A WAL database of about ``size`` bytes of random rows, checkpointed."""
    con = apsw.Connection(str(path))
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE t(v)")
    with con:
        con.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
            "INSERT INTO t SELECT randomblob(?) FROM n",
            (size // ROW, ROW),
        )
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return path


def digest(path: Path) -> str:
    """What the database holds, row by row."""
    con = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    sha = hashlib.sha256()
    for rowid, v in con.execute("SELECT rowid, v FROM t ORDER BY rowid"):
        sha.update(rowid.to_bytes(8, "big") + (v if isinstance(v, bytes) else str(v).encode()))
    con.close()
    return sha.hexdigest()


def peak_rss(*args: str) -> int:
    """Peak RSS of a fresh child process doing one replication or restore."""
    proc = subprocess.run(
        [sys.executable, WORKER, *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return int(json.loads(proc.stdout.splitlines()[-1])["peak_rss"])


# A database several times the bounds: memory that grew with it could not stay under.
BIG = 200 * MIB
RSS_BOUND = 64 * MIB  # issue 14's goal for the app's extra peak and for a restore's
# What a snapshot upload may hold beyond its encoder: the parts in flight and the one being
# cut, with room for the allocator.
UPLOAD_BOUND = (TRANSFER_WORKERS + 1) * PART_SIZE + 24 * MIB


def test_snapshot_and_restore_memory_does_not_grow_with_the_database(
    tmp_path: Path, replica_url: str
) -> None:
    """On S3 a snapshot of the big database goes up as a multipart upload of 25 parts.

    Restore is held to the bound as the CLI runs it.  Called as a library function it
    cannot set the process-wide allocator option the CLI sets (heap.map_big_blocks), and
    glibc's arenas then keep freed MiB-sized buffers of the transfer and prefetch threads:
    its peak varies from run to run (20-80 MiB over the small database's on the 2-core CI
    machine), so there it is only held to not growing with the database."""
    small, big = build(tmp_path / "small.db", MIB), build(tmp_path / "big.db", BIG)
    assert os.path.getsize(big) >= 3 * RSS_BOUND
    plain = peak_rss("plain", str(big))  # the same write without walsync
    # The same run on a 1 MiB database is the baseline: interpreter, imports, threads.
    replicate = {p.name: peak_rss("replicate", str(p), replica_url) for p in (small, big)}
    extra_restore = {}
    for how in ("cli", "library"):
        outs = {p.name: tmp_path / f"restored-{how}-{p.name}" for p in (small, big)}
        peaks = {
            name: peak_rss("restore", f"{replica_url}/{name}", str(out), how)
            for name, out in outs.items()
        }
        assert digest(outs["big.db"]) == digest(big)
        extra_restore[how] = peaks["big.db"] - peaks["small.db"]
    extra_app = replicate["big.db"] - plain
    grown = replicate["big.db"] - replicate["small.db"]
    assert extra_app < RSS_BOUND, f"the app took {extra_app / MIB:.0f} MiB over plain apsw"
    assert grown < UPLOAD_BOUND, f"snapshot upload took {grown / MIB:.0f} MiB more"
    cli, library = extra_restore["cli"], extra_restore["library"]
    assert cli < RSS_BOUND, f"restore took {cli / MIB:.0f} MiB more"
    assert library < BIG // 2, f"restore() took {library / MIB:.0f} MiB more"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc arenas")
def test_a_stream_of_mib_commits_leaves_no_mib_buffers_in_the_heap(
    tmp_path: Path, s3_url: str
) -> None:
    """Commits of 1 MiB, 30 a second for 10 s, replicated to S3.  Every buffer of a MiB or
    more on the way (frames read from the WAL, a segment made, a spilled one read back) is a
    mapping of its own: glibc raises its mmap threshold to the size of each mapped chunk
    freed, after which such buffers came from the malloc arenas of the threads that freed
    them and stayed there (before, the arenas reached 31-79 MiB in this run and the median
    RSS grew by 24-27 MiB; a longer stream held 200 MiB of arenas).  Now the arenas stay
    under 16 MiB and the median RSS grows by less than 24 MiB."""
    proc = subprocess.run(
        [sys.executable, WORKER, "stream", str(tmp_path / "a.db"), s3_url, "300", "30"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.splitlines()[-1])
    heap, grown = seen["heap_max"], seen["rss_median"] - seen["rss_before"]
    assert heap < 16 * MIB, f"the malloc arenas reached {heap / MIB:.1f} MiB"
    assert grown < 24 * MIB, f"the median RSS grew by {grown / MIB:.1f} MiB"


def test_headers_alone_go_over_the_wire(
    s3_server, s3_url: str, tmp_path: Path, listed_parts: list[list[int]]  # noqa: F811
) -> None:
    """A snapshot above the multipart threshold goes up in parts (SeaweedFS lists them) and
    restores; ``list``, the head a writer reads at start-up and timestamp planning then fetch
    a few KiB through a counting relay, a restore the whole snapshot."""
    path = build(tmp_path / "app.db", 24 * MIB)
    walsync_vfs.configure(replica=s3_url)
    try:
        con = apsw.Connection(str(path), vfs="walsync")
        for i in range(3):
            con.execute("INSERT INTO t(v) VALUES (?)", (i,))
            walsync_vfs.flush(timeout=60)
        con.close()
    finally:
        walsync_vfs.configure(replica="")
    assert len(listed_parts) == 1 and len(listed_parts[0]) >= 3, listed_parts
    assert set(listed_parts[0][:-1]) == {PART_SIZE}

    relay = LoopbackProxy(upstream=s3_server.endpoint.removeprefix("http://"))
    try:
        client = storage.open_replica(s3_url, endpoint_url=relay.url)
        (g,) = catalog.generations(client, "app.db")
        snap_key = catalog.object_key(g.snapshots[0])
        snap_size = g.sizes[snap_key]
        assert snap_size > 20 * MIB and len(g.segments) >= 3
        listed = relay.received

        head = read_head(client, "app.db")
        info = describe_database(client, "app.db")
        now = time.time_ns()
        by_time = plan(client, "app.db", timestamp_ns=now)
        headers_only = relay.received - listed
        assert headers_only < 64 << 10, f"{headers_only} bytes fetched for headers"

        out = tmp_path / "restored.db"
        restore(s3_url + "/app.db", str(out), client_options={"endpoint_url": relay.url})
        assert relay.received - listed - headers_only > snap_size  # the counter sees real GETs
    finally:
        relay.stop()
    last = g.segments[-1]
    assert head.txid == last.last_txid and head.generation == g.id
    snapshots = info["generations"][0]["snapshots"]
    assert snapshots == [{"txid": g.snapshots[0].last_txid, "bytes": snap_size}]
    assert info["generations"][0]["segments"]["last_time"] is not None
    assert by_time.snapshot == g.snapshots[0] and by_time.segments[-1] == last
    assert digest(out) == digest(path)


def snapshot_pages(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(4096) for _ in range(n)]


def test_a_conflicting_snapshot_is_ours_only_if_its_bytes_are(replica_url: str) -> None:
    """A create-only upload finding its key taken (its reply was lost) counts as stored only
    when the object there is, byte for byte by its SHA-256, the same snapshot; otherwise the
    object is removed and the Conflict raised for a retry.  Over S3's multipart threshold."""
    client = storage.open_replica(replica_url)
    client.create_only = True
    if isinstance(client, S3ReplicaClient):
        client.part_size = client.multipart_threshold = 5 * MIB
    pages = snapshot_pages(1600, seed=1)  # 6.25 MiB, above the threshold
    key = format.snapshot_key("db", format.new_generation_id(1), 1)

    def put(time_ns: int) -> int:
        return objects.put_snapshot(client, key, iter(pages), 4096, 1, time_ns, len(pages))

    size = put(100)
    assert put(100) == size  # the same snapshot again: an earlier attempt stored it
    header, got = objects.open_snapshot(client, key)
    assert (header.txid, header.time_ns) == (1, 100) and list(map(bytes, got)) == pages

    with pytest.raises(storage.Conflict):
        put(200)  # same key, other bytes (same size, another footer)
    with pytest.raises(storage.ObjectNotFound):
        client.head(key)
    assert put(200) == size

    # Same size and same footer, one body byte changed: damaged, not ours.
    client.delete([key])
    whole = bytearray(b"".join(format.encode_snapshot(iter(pages), 4096, 1, 300, len(pages))))
    whole[len(whole) // 2] ^= 1
    client.put(key, bytes(whole))
    with pytest.raises(storage.Conflict):
        put(300)
    with pytest.raises(storage.ObjectNotFound):
        client.head(key)
