"""Big objects: streaming puts (S3 multipart uploads, counted on SeaweedFS itself), ranged and
parallel reads, and abandoned uploads swept away."""

from __future__ import annotations

import io
import logging
import os
import random
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from walsync_vfs.storage import Conflict, ObjectNotFound, StorageError, open_replica
from walsync_vfs.storage import s3 as s3_backend
from walsync_vfs.storage.s3 import S3ReplicaClient
from walsync_vfs.storage.transfer import pieces, read_ranges

MIB = 1 << 20
PART = 5 * MIB  # S3's smallest part: keeps the multipart tests small


def data(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def odd_chunks(blob: bytes) -> Iterator[bytes]:
    """The bytes in chunks of sizes no part boundary lines up with."""
    sizes = [1, 4095, 3 * MIB + 17, 65536, 1]
    at = i = 0
    while at < len(blob):
        yield blob[at : at + sizes[i % len(sizes)]]
        at += sizes[i % len(sizes)]
        i += 1


def small_parts(client) -> S3ReplicaClient:
    assert isinstance(client, S3ReplicaClient)
    client.part_size = client.multipart_threshold = PART
    client.transfer_workers = 3
    return client


@pytest.fixture
def listed_parts(s3_server, monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """Per multipart upload completed (or refused) meanwhile, the sizes of the parts
    SeaweedFS holds for it just before CompleteMultipartUpload (its ListParts)."""
    seen: list[list[int]] = []
    complete = S3ReplicaClient._complete

    def counting(self, key, full, upload_id, etags, total):
        listed = s3_server.admin.list_parts(Bucket=self.bucket, Key=full, UploadId=upload_id)
        seen.append([p["Size"] for p in listed["Parts"]])
        return complete(self, key, full, upload_id, etags, total)

    monkeypatch.setattr(S3ReplicaClient, "_complete", counting)
    return seen


def open_uploads(s3_server, client: S3ReplicaClient) -> list[str]:
    listed = s3_server.admin.list_multipart_uploads(Bucket=client.bucket)
    return [u["Key"] for u in listed.get("Uploads", [])]


def test_pieces_are_exact_whatever_the_chunks() -> None:
    blob = data(3 * MIB + 5)
    cut = [b"".join(part) for part in pieces(odd_chunks(blob), MIB)]
    assert [len(p) for p in cut] == [MIB, MIB, MIB, 5] and b"".join(cut) == blob
    whole = [b"".join(part) for part in pieces(io.BytesIO(blob), 2 * MIB)]
    assert whole == [blob[: 2 * MIB], blob[2 * MIB :]]
    assert list(pieces([], MIB)) == [] and list(pieces(io.BytesIO(b""), MIB)) == []


def test_pieces_copy_nothing_and_keep_nothing_handed_out() -> None:
    """A part is views of the source's own chunks, and the generator keeps none of a part
    it handed out: cutting 32 MiB into 4 MiB parts, each dropped once seen, never has more
    than one part and the chunk being cut alive."""
    source = [data(MIB, seed=i) for i in range(3)]
    first = next(pieces(iter(source), 2 * MIB + 3))
    assert [view.obj for view in first] == source  # the very chunks, the last one cut

    def fresh_chunks() -> Iterator[bytes]:
        for i in range(32):
            yield os.urandom(MIB - 1 + i % 3)

    tracemalloc.start()
    try:
        for part in pieces(fresh_chunks(), 4 * MIB):
            assert sum(map(len, part)) <= 4 * MIB
            del part
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MIB + 2 * MIB + (256 << 10), f"{peak / MIB:.1f} MiB at once"


def test_multipart_upload_goes_up_in_parts(s3_url: str, s3_server, listed_parts) -> None:
    client = small_parts(open_replica(s3_url))
    blob = data(2 * PART + PART // 2)
    before = client.requests
    assert client.put_stream("db/snap", odd_chunks(blob), size_hint=len(blob)) == len(blob)
    assert listed_parts == [[PART, PART, PART // 2]]  # as SeaweedFS holds them
    assert client.requests - before == 1 + 3 + 1  # create, three parts, complete
    assert open_uploads(s3_server, client) == []
    assert client.get("db/snap") == blob
    assert client.head("db/snap").size == len(blob)
    etag = s3_server.admin.head_object(Bucket=client.bucket, Key="some/prefix/db/snap")["ETag"]
    assert etag.endswith('-3"')  # a multipart object of three parts
    pieces_read = list(read_ranges(client, "db/snap", part_size=2 * MIB, workers=3))
    assert [len(p) for p in pieces_read] == [2 * MIB] * 6 + [MIB // 2]
    assert b"".join(pieces_read) == blob


def test_below_the_threshold_one_put(s3_url: str, listed_parts) -> None:
    client = small_parts(open_replica(s3_url))
    blob = data(PART - 1)
    before = client.requests
    assert client.put_stream("small", io.BytesIO(blob)) == len(blob)
    assert client.requests - before == 1 and listed_parts == []
    assert client.get("small") == blob


def test_create_only_multipart_upload_is_refused_and_aborted(
    s3_url: str, s3_server, listed_parts
) -> None:
    client = small_parts(open_replica(s3_url))
    client.create_only = True
    blob = data(PART + 1)
    client.put_stream("taken", io.BytesIO(blob))
    with pytest.raises(Conflict, match=r"the object exists or changed \(412\)$"):
        client.put_stream("taken", io.BytesIO(data(PART + 1, seed=2)))
    assert len(listed_parts) == 2  # the second upload reached CompleteMultipartUpload
    assert client.get("taken") == blob  # not overwritten
    assert open_uploads(s3_server, client) == []  # the refused upload was aborted
    with pytest.raises(Conflict):
        client.put_stream("taken", [b"small"])  # one PUT: refused the same way


def test_a_failing_source_aborts_the_upload(s3_url: str, s3_server) -> None:
    client = small_parts(open_replica(s3_url))

    def broken() -> Iterator[bytes]:
        yield data(2 * PART)
        raise OSError("disk read error")

    with pytest.raises(OSError, match="disk read error"):
        client.put_stream("broken", broken())
    assert open_uploads(s3_server, client) == []
    with pytest.raises(ObjectNotFound):
        client.head("broken")


def test_streams_and_ranges_on_both_backends(replica_url: str) -> None:
    client = open_replica(replica_url)
    blob = data(3 * MIB + 7)
    assert client.put_stream("a/big", odd_chunks(blob)) == len(blob)
    assert client.put_stream("a/empty", iter([])) == 0
    assert client.get("a/big") == blob and client.get("a/empty") == b""
    assert client.get_range("a/big", 10, 100) == blob[10:110]
    assert client.get_range("a/big", len(blob) - 3, 100) == blob[-3:]  # short at the end
    assert client.get_range("a/big", len(blob), 10) == b""  # from the end on: nothing
    assert client.get_range("a/big", 5, 0) == b""
    assert client.head("a/big").size == len(blob) and client.head("a/empty").size == 0
    assert b"".join(read_ranges(client, "a/big", part_size=MIB, workers=2)) == blob
    assert list(read_ranges(client, "a/empty")) == []
    for call in (lambda: client.get_range("a/none", 0, 1), lambda: client.head("a/none")):
        with pytest.raises(ObjectNotFound, match="a/none does not exist$"):
            call()
    with pytest.raises(ObjectNotFound):
        list(read_ranges(client, "a/none"))
    assert [o.key for o in client.list("a/")] == ["a/big", "a/empty"]


def test_file_put_stream_failure_leaves_nothing(file_url: str) -> None:
    client = open_replica(file_url)

    def broken() -> Iterator[bytes]:
        yield b"x" * 1000
        raise ValueError("compressor failed")

    with pytest.raises(ValueError, match="compressor failed"):
        client.put_stream("db/snap", broken())
    root = Path(client.url.removeprefix("file://"))
    assert [p for p in root.rglob("*") if p.is_file()] == []


def test_part_size_below_the_s3_minimum_is_refused(s3_url: str) -> None:
    with pytest.raises(StorageError, match=r"^part_size 1048576 is below S3's minimum part size"):
        open_replica(s3_url, part_size=MIB)


# ----------------------------------------------------------------------- abandoned uploads


def test_s3_stale_uploads_are_aborted(s3_url: str, s3_server) -> None:
    client = small_parts(open_replica(s3_url))
    admin = s3_server.admin
    for key in ("db/snap", "db/other", "elsewhere/snap"):
        upload = admin.create_multipart_upload(Bucket=client.bucket, Key=f"some/prefix/{key}")
        admin.upload_part(
            Bucket=client.bucket, Key=f"some/prefix/{key}", UploadId=upload["UploadId"],
            PartNumber=1, Body=b"part",
        )  # fmt: skip
    assert client.abort_stale_uploads("db/", 3600) == 0  # too young
    assert client.abort_stale_uploads("db/", 0) == 2
    assert open_uploads(s3_server, client) == ["some/prefix/elsewhere/snap"]
    before = client.requests
    assert client.abort_stale_uploads("db/", 0) == 0
    assert client.requests - before == 1  # one listing when there is nothing to abort


def test_own_uploads_in_progress_are_not_stale(
    s3_url: str, s3_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = small_parts(open_replica(s3_url))
    swept: list[int] = []
    upload_part = S3ReplicaClient._call

    def sweeping_meanwhile(self, op, target, method, key, **kw):
        if kw.get("query", {}).get("partNumber") == "2":
            swept.append(client.abort_stale_uploads("", 0))
        return upload_part(self, op, target, method, key, **kw)

    monkeypatch.setattr(S3ReplicaClient, "_call", sweeping_meanwhile)
    blob = data(2 * PART)
    client.put_stream("mine", io.BytesIO(blob))
    assert swept == [0] and client.get("mine") == blob


def test_file_own_puts_in_progress_are_not_stale(file_url: str) -> None:
    client = open_replica(file_url)
    swept: list[int] = []

    def sweeping_meanwhile() -> Iterator[bytes]:
        yield b"first half "
        swept.append(client.abort_stale_uploads("", 0))
        yield b"second half"

    client.put_stream("db/snap", sweeping_meanwhile())
    assert swept == [0] and client.get("db/snap") == b"first half second half"


def test_file_stale_temp_files_are_removed(file_url: str) -> None:
    client = open_replica(file_url)
    client.put("db/seg", b"1")
    root = Path(client.url.removeprefix("file://"))
    orphan = root / "db" / ".snap.0123456789ab.walsync-tmp"
    lock = root / "db" / ".lease.lock.walsync-tmp"  # a swap's lock file: never removed
    other = root / "elsewhere" / ".snap.0123456789ab.walsync-tmp"
    for path in (orphan, lock, other):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"partial")
    assert client.abort_stale_uploads("db/", 3600) == 0
    old = time.time() - 7200
    for path in (orphan, lock, other):
        os.utime(path, (old, old))
    assert client.abort_stale_uploads("db/", 3600) == 1
    assert not orphan.exists() and lock.exists() and other.exists()
    assert client.get("db/seg") == b"1"


def test_skewed_clock_is_reported_as_a_clock_problem(
    s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SeaweedFS refuses requests signed more than 15 minutes off (RequestTimeTooSkewed)."""
    monkeypatch.setattr(s3_backend, "_services", {})
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    client = open_replica(s3_url)
    client.put("k", b"v")
    for shift, text in ((7200, "2 h 0 min (ahead of"), (-1200, "20 min (behind")):
        monkeypatch.setattr(s3_backend, "_clock", lambda shift=shift: time.time() + shift)
        with pytest.raises(StorageError) as info:
            client.get("k")
        assert str(info.value) == (
            f"S3 refused the request (RequestTimeTooSkewed): this machine's clock is off by "
            f"{text} the store's); fix the clock (NTP)"
        )
    monkeypatch.setattr(s3_backend, "_clock", lambda: time.time() + 60)
    assert client.get("k") == b"v"  # within the store's allowance


def plant_orphan(client, s3_server, key: str) -> None:
    """An upload a crash abandoned: a multipart upload with one part (S3), a put's temp file
    (directory)."""
    if isinstance(client, S3ReplicaClient):
        full = f"{client.prefix}/{key}"
        upload = s3_server.admin.create_multipart_upload(Bucket=client.bucket, Key=full)
        s3_server.admin.upload_part(
            Bucket=client.bucket, Key=full, UploadId=upload["UploadId"], PartNumber=1, Body=b"p"
        )
    else:
        path = Path(client.url.removeprefix("file://"), key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_name(f".{path.name}.0123456789ab.walsync-tmp").write_bytes(b"partial")


def orphans(client, s3_server) -> list[str]:
    if isinstance(client, S3ReplicaClient):
        return [k.removeprefix(f"{client.prefix}/") for k in open_uploads(s3_server, client)]
    root = Path(client.url.removeprefix("file://"))
    return sorted(
        str(p.relative_to(root)).replace(".0123456789ab.walsync-tmp", "").replace("/.", "/")
        for p in root.rglob("*.walsync-tmp")
        if ".lock." not in p.name
    )


def test_maintenance_aborts_abandoned_uploads(
    replica_url: str,
    s3_server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import apsw

    import walsync_vfs
    from walsync_vfs import compactor

    monkeypatch.setattr(compactor, "STALE_UPLOAD_AGE", 0.0)
    client = open_replica(replica_url)
    plant_orphan(client, s3_server, "app.db/snapshot-of-a-crash")
    plant_orphan(client, s3_server, "other.db/snapshot-of-a-crash")
    swept = threading.Event()

    class Sweeps(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "app.db aborted 1 abandoned uploads" in record.getMessage():
                swept.set()

    handler = Sweeps()
    caplog.set_level(logging.INFO, logger="walsync_vfs")
    logging.getLogger("walsync_vfs").addHandler(handler)
    walsync_vfs.configure(replica=replica_url, upload_interval=0.0, retention=2.0)
    try:
        con = apsw.Connection(str(tmp_path / "app.db"), vfs="walsync")
        con.execute("CREATE TABLE t(x)")
        for _ in range(60):  # retention passes fall due after uploads
            con.execute("INSERT INTO t VALUES (1)")
            walsync_vfs.flush(timeout=10)
            if swept.wait(0.5):
                break
        assert swept.is_set(), "no maintenance pass aborted the upload"
        assert orphans(client, s3_server) == ["other.db/snapshot-of-a-crash"]  # not its own
        con.close()
    finally:
        logging.getLogger("walsync_vfs").removeHandler(handler)
        walsync_vfs.flush(timeout=30)
        walsync_vfs.configure(replica="", upload_interval=1.0, retention=86400.0)
