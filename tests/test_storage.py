"""Storage backends against a real directory and a real SeaweedFS S3 server."""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from walsync_vfs.storage import ObjectInfo, ObjectNotFound, StorageError, open_replica
from walsync_vfs.storage import s3 as s3_backend
from walsync_vfs.storage.file import TMP_SUFFIX

FORMS = "use file:///absolute/dir, a directory path, or s3://bucket/optional/prefix"
BUCKET_RULE = "is not a valid S3 bucket name (3-63 lowercase letters, digits, '.' or '-')"


def closed_port() -> int:
    """A loopback port nothing listens on (it was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fresh_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty boto3 client cache, so env changes made by the test take effect."""
    monkeypatch.setattr(s3_backend, "_clients", {})


def test_round_trip(replica_url: str) -> None:
    client = open_replica(replica_url)
    big = random.Random(1).randbytes(5 * 1024 * 1024 + 3)
    objects = {
        "db/b-empty": b"",
        "db/a/small": bytes(range(256)),
        "db/c/big": big,
        "other": b"\x00\xff\x00",
    }
    for key, data in objects.items():
        client.put(key, data)

    for key, data in objects.items():
        assert client.get(key) == data
    expected = [ObjectInfo(k, len(objects[k])) for k in sorted(objects)]
    assert client.list("") == expected
    assert client.list("db/") == [i for i in expected if i.key.startswith("db/")]

    client.put("db/a/small", b"replaced")
    assert client.get("db/a/small") == b"replaced"

    client.delete(["db/c/big", "db/b-empty"])
    assert [i.key for i in client.list("")] == ["db/a/small", "other"]
    with pytest.raises(ObjectNotFound):
        client.get("db/c/big")


def test_list_is_a_string_prefix(replica_url: str) -> None:
    client = open_replica(replica_url)
    for key in ["a/b/c", "a/bc", "ab", "b", "a/b/d/e"]:
        client.put(key, key.encode())

    def keys(prefix: str) -> list[str]:
        return [i.key for i in client.list(prefix)]

    assert keys("") == ["a/b/c", "a/b/d/e", "a/bc", "ab", "b"]
    assert keys("a/") == ["a/b/c", "a/b/d/e", "a/bc"]
    assert keys("a/b") == ["a/b/c", "a/b/d/e", "a/bc"]
    assert keys("a/b/") == ["a/b/c", "a/b/d/e"]
    assert keys("a") == ["a/b/c", "a/b/d/e", "a/bc", "ab"]
    assert keys("zz") == []
    assert keys("a/b/c") == ["a/b/c"]


def test_missing_objects(replica_url: str) -> None:
    client = open_replica(replica_url)
    assert client.list("") == []
    with pytest.raises(ObjectNotFound, match=r"object .*/nothing/here does not exist"):
        client.get("nothing/here")
    client.put("dir/obj", b"x")
    with pytest.raises(ObjectNotFound):
        client.get("dir")  # a "directory" is not an object on either backend
    client.delete(["nothing/here", "dir/obj/deeper", "missing"])  # not an error
    assert client.list("") == [ObjectInfo("dir/obj", 1)]
    assert abs(client.list("")[0].modified - time.time()) < 60  # write time, for retention


def test_requests_are_counted(replica_url: str) -> None:
    client = open_replica(replica_url)
    assert client.requests == 0
    client.put("k", b"v")
    client.get("k")
    client.list("")
    client.delete(["k"])
    assert client.requests == 4
    client.delete([])
    with pytest.raises(ValueError):
        client.put("../k", b"")  # rejected before any request
    assert client.requests == 4


@pytest.mark.parametrize(
    "key", ["../x", "/abs", "a//b", "a/../b", "a/./b", "a/", "", "a\\b", "a\0b", ".."]
)
def test_keys_cannot_escape_the_root(replica_url: str, key: str) -> None:
    client = open_replica(replica_url)
    with pytest.raises(ValueError, match="invalid object key"):
        client.put(key, b"x")
    with pytest.raises(ValueError, match="invalid object key"):
        client.get(key)
    with pytest.raises(ValueError, match="invalid object key"):
        client.delete(["fine", key])
    assert client.requests == 0


@pytest.mark.parametrize("prefix", ["../", "/", "a//", "a/../"])
def test_list_prefix_is_validated(replica_url: str, prefix: str) -> None:
    with pytest.raises(ValueError, match="invalid object key"):
        open_replica(replica_url).list(prefix)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://example/x", "unsupported scheme 'ftp'"),
        ("http://bucket/x", "unsupported scheme 'http'"),
        ("file://relative/dir", "file URLs need an absolute path (three slashes)"),
        ("file:relative", "file URLs need an absolute path (three slashes)"),
        ("file:///tmp/x?y=1", "file URLs take no query or fragment"),
        ("s3://", "no bucket name"),
        ("s3:///prefix", "no bucket name"),
        ("s3:bucket", "no bucket name"),
        ("s3://Bad_Bucket/x", f"'Bad_Bucket' {BUCKET_RULE}"),
        ("s3://ab", f"'ab' {BUCKET_RULE}"),
        ("s3://192.168.0.1/x", f"'192.168.0.1' {BUCKET_RULE}"),
        ("s3://bucket:9000/x", f"'bucket:9000' {BUCKET_RULE}"),
        ("s3://-bucket", f"'-bucket' {BUCKET_RULE}"),
        ("s3://a..b", f"'a..b' {BUCKET_RULE}"),
        ("s3://bucket/a//b", "invalid key prefix 'a//b'"),
        ("s3://bucket/a/../b", "invalid key prefix 'a/../b'"),
        ("s3://bucket/x?versionId=1", "s3 URLs take no query or fragment"),
        ("s3://[bucket/x", "Invalid IPv6 URL"),
        ("", "empty"),
    ],
)
def test_malformed_urls_are_rejected(url: str, reason: str) -> None:
    with pytest.raises(StorageError) as info:
        open_replica(url)
    assert str(info.value) == f"invalid replica URL {url!r}: {reason}; {FORMS}"


def test_credentials_in_a_url_are_never_echoed() -> None:
    url = "s3://AKIAEXAMPLE:hunter2-secret@bucket/x"
    with pytest.raises(StorageError) as info:
        open_replica(url)
    assert str(info.value) == (
        "invalid replica URL 's3://***@bucket/x': credentials do not belong in the URL, "
        f"set AWS_ACCESS_KEY_ID; {FORMS}"
    )


def test_file_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert open_replica("rel/dir").url == (tmp_path / "rel" / "dir").as_uri()
    assert open_replica(str(tmp_path / "abs")).url == (tmp_path / "abs").as_uri()
    spaced = open_replica((tmp_path / "with space").as_uri())
    spaced.put("k", b"v")
    assert (tmp_path / "with space" / "k").read_bytes() == b"v"
    assert open_replica(f"file://{tmp_path}/a/../b").url == (tmp_path / "b").as_uri()


def test_file_put_leaves_no_temp_files_under_concurrency(file_url: str) -> None:
    client = open_replica(file_url)
    payloads = [bytes([i]) * (1000 + i) for i in range(32)]

    def work(i: int) -> None:
        client.put("db/shared", payloads[i])  # same key from every thread: last rename wins
        client.put(f"db/n/{i}", payloads[i])
        client.delete([f"db/n/{i}"])  # prunes db/n while others create files in it

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(work, range(len(payloads))))

    assert client.get("db/shared") in payloads
    assert client.list("") == [ObjectInfo("db/shared", len(client.get("db/shared")))]
    root = Path(file_url.removeprefix("file://"))
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == ["db", "db/shared"]
    assert client.requests == 3 * len(payloads) + 3


def test_file_list_ignores_leftover_temp_files(file_url: str) -> None:
    client = open_replica(file_url)
    client.put("db/obj", b"data")
    root = Path(file_url.removeprefix("file://"))
    (root / "db" / f".obj.dead{TMP_SUFFIX}").write_bytes(b"half")  # a put killed mid-write
    assert client.list("") == [ObjectInfo("db/obj", 4)]
    with pytest.raises(ValueError, match="is reserved"):
        client.put(f"db/x{TMP_SUFFIX}", b"")


def test_file_delete_prunes_empty_directories(file_url: str) -> None:
    client = open_replica(file_url)
    client.put("a/b/c", b"1")
    client.put("a/d", b"2")
    root = Path(file_url.removeprefix("file://"))
    client.delete(["a/b/c"])
    assert not (root / "a" / "b").exists()
    assert (root / "a" / "d").exists()
    client.delete(["a/d"])
    assert root.is_dir()
    assert list(root.iterdir()) == []


def test_file_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_bytes(b"")
    client = open_replica(str(tmp_path / "blocker"))
    with pytest.raises(StorageError) as info:
        client.put("k", b"v")
    assert str(info.value) == f"cannot write {(tmp_path / 'blocker').as_uri()}/k: Not a directory"


def test_prefixes_isolate_clients(s3_server) -> None:
    bucket = s3_server.new_bucket()
    one, two = open_replica(f"s3://{bucket}/p"), open_replica(f"s3://{bucket}/p2/")
    one.put("x", b"1")
    two.put("x", b"22")
    assert one.list("") == [ObjectInfo("x", 1)]
    assert two.list("") == [ObjectInfo("x", 2)]
    assert two.url == f"s3://{bucket}/p2"
    one.delete(["x"])
    assert two.get("x") == b"22"
    assert open_replica(f"s3://{bucket}").list("") == [ObjectInfo("p2/x", 2)]


def test_s3_pagination_and_batch_delete(s3_url: str) -> None:
    client = open_replica(s3_url)
    keys = [f"db/{i:05d}" for i in range(1100)]
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda k: client.put(k, k.encode()), keys))
    client.requests = 0
    listed = client.list("db/")
    assert listed == [ObjectInfo(k, len(k)) for k in keys]
    assert client.requests == 2  # two pages of at most 1000
    client.delete(keys + ["db/never-existed"])
    assert client.requests == 4  # two DeleteObjects batches
    assert client.list("") == []


def test_missing_bucket(s3_server) -> None:
    client = open_replica("s3://walsync-no-such-bucket/x")
    expected = (
        f"bucket 'walsync-no-such-bucket' does not exist at {s3_server.endpoint}: "
        "create it or fix the replica URL"
    )
    for call in (lambda: client.put("k", b"v"), lambda: client.get("k"), lambda: client.list("")):
        with pytest.raises(StorageError) as info:
            call()
        assert str(info.value) == expected
        assert not isinstance(info.value, ObjectNotFound)


@pytest.mark.usefixtures("fresh_clients")
@pytest.mark.parametrize("known_key", [True, False], ids=["bad-secret", "unknown-key"])
def test_wrong_credentials(s3_url: str, monkeypatch: pytest.MonkeyPatch, known_key: bool) -> None:
    if not known_key:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWN")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    client = open_replica(s3_url)
    with pytest.raises(StorageError) as info:
        client.put("k", b"v")
    message = str(info.value)
    assert message == f"access denied to {s3_url}: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
    assert "wrong-secret-value" not in message


@pytest.mark.usefixtures("fresh_clients")
def test_no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    client = open_replica("s3://bucket/x", endpoint_url=f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(StorageError) as info:
        client.list("")
    assert str(info.value) == (
        "no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an AWS profile"
    )


def test_unreachable_endpoint_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    endpoint = f"http://127.0.0.1:{closed_port()}"  # nothing listens there
    client = open_replica("s3://bucket/x", endpoint_url=endpoint)
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        client.get("k")
    assert time.monotonic() - started < 2
    assert str(info.value) == (
        f"cannot reach {endpoint}: connection refused; "
        "check the endpoint URL and that the server is running"
    )


def test_one_boto3_client_per_endpoint(s3_server) -> None:
    a = open_replica(f"s3://{s3_server.new_bucket()}/a")
    b = open_replica(f"s3://{s3_server.new_bucket()}")
    assert a.client is b.client
    assert a.client.meta.endpoint_url == s3_server.endpoint
    assert a.client.meta.config.max_pool_connections == 32
    other = open_replica("s3://bucket", endpoint_url="http://127.0.0.1:9")
    assert other.client is not a.client

    clients: list[object] = []
    barrier = threading.Barrier(8)

    def race() -> None:
        barrier.wait()
        clients.append(open_replica("s3://bucket", region="eu-west-3").client)

    threads = [threading.Thread(target=race) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(c) for c in clients}) == 1


@pytest.mark.usefixtures("fresh_clients")
def test_addressing_style(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", s3_backend.ENV_PATH_STYLE):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")

    def style(**options: object) -> str | None:
        config = open_replica("s3://bucket", **options).client.meta.config
        return (config.s3 or {}).get("addressing_style")

    assert style() is None  # AWS itself: botocore's default, virtual-hosted
    assert style(endpoint_url="http://minio.internal:9000") == "path"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://seaweed.internal:8333")
    assert style(region="eu-west-2") == "path"
    assert style(endpoint_url="http://minio.internal:9000", path_style=False) == "virtual"
    monkeypatch.setenv(s3_backend.ENV_PATH_STYLE, "true")
    assert style(region="us-west-1") == "path"
