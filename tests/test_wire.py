"""The S3 client's HTTP/1.1 layer: reply framing against a scripted server, TLS against a real
TLS front for SeaweedFS, stall timeouts and proxies through loopback proxies of our own."""

from __future__ import annotations

import base64
import hashlib
import os
import select
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from loopback import LoopbackProxy

from walsync_vfs.storage import StorageError, open_replica, put_all
from walsync_vfs.storage import s3 as s3_backend
from walsync_vfs.storage.proxy import bypassed, proxy_for
from walsync_vfs.storage.wire import Connection, Disconnected, ProtocolError, address


class Scripted:
    """A loopback server that answers each request on one connection with the next reply
    (``None``: close without one), then closes the connection."""

    def __init__(self, replies: list[bytes | None]) -> None:
        self.replies = replies
        self.requests: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn, conn.makefile("rb") as reader:
            for reply in self.replies:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = reader.readline()
                    if not line:
                        return
                    head += line
                length = next(
                    (
                        int(h.split(b":")[1])
                        for h in head.split(b"\r\n")
                        if h.startswith(b"content-length")
                    ),
                    0,
                )
                self.requests.append(head + reader.read(length))
                if reply is None:
                    return
                conn.sendall(reply)


def exchange(server: Scripted, method: str = "GET", body: bytes = b"") -> tuple[Connection, tuple]:
    conn = Connection(server.host, None, 5, 5)
    return conn, conn.exchange(method, "/b/k", {"host": server.host}, body)


def test_one_request_is_one_head_and_body() -> None:
    server = Scripted([b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])
    conn, (status, headers, body) = exchange(server, "PUT", b"payload")
    assert (status, headers, body, conn.open) == (200, {"content-length": "0"}, b"", True)
    assert server.requests == [
        f"PUT /b/k HTTP/1.1\r\nhost: {server.host}\r\ncontent-length: 7\r\n\r\npayload".encode()
    ]


def test_chunked_reply_and_keep_alive() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\n"
    )
    server = Scripted([chunked, b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nnope"])
    conn, (status, _, body) = exchange(server)
    assert (status, body, conn.open) == (200, b"hello world", True)
    status, _, body = conn.exchange("GET", "/b/k", {"host": server.host}, b"")
    assert (status, body) == (404, b"nop")  # exactly Content-Length bytes


def test_reply_framed_by_close_and_continue_preface() -> None:
    server = Scripted([b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\n\r\nall of it"])
    conn, (status, _, body) = exchange(server)
    assert (status, conn.open) == (200, False)
    assert body == b"all of it"


def test_connection_close_header_and_truncated_bodies() -> None:
    server = Scripted([b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"])
    conn, (_, _, body) = exchange(server)
    assert (body, conn.open) == (b"ok", False)
    server = Scripted([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"])
    with pytest.raises(Disconnected, match="^reply body ended after 5 of 10 bytes$"):
        exchange(server)
    server = Scripted([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"])
    with pytest.raises(Disconnected, match="^chunked reply body ended early$"):
        exchange(server)  # a dropped connection, so retried on a fresh one, not a bad reply
    server = Scripted([None])  # reads the request, then closes without a reply
    with pytest.raises(Disconnected, match="^Remote end closed connection without response$"):
        exchange(server)
    server = Scripted([b"SMTP ready\r\n"])
    with pytest.raises(ProtocolError, match="^bad status line 'SMTP ready'$"):
        exchange(server)


@pytest.mark.parametrize(
    ("host", "tls", "expected"),
    [
        ("example.com", False, ("example.com", 80)),
        ("example.com", True, ("example.com", 443)),
        ("s3.local:9000", True, ("s3.local", 9000)),
        ("[::1]:9000", False, ("::1", 9000)),
        ("[::1]", True, ("::1", 443)),
    ],
)
def test_host_header_to_address(host: str, tls: bool, expected: tuple[str, int]) -> None:
    assert address(host, tls) == expected


# ------------------------------------------------------------------------------------- TLS


def pipe(src: socket.socket, dst: socket.socket) -> None:
    """Copy bytes from src to dst until either side closes; then close both."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            s.close()


def make_cert(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (and its key), made by the openssl CLI."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def tls_front(s3_server, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A TLS-terminating proxy in front of SeaweedFS: (https endpoint, CA bundle)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    cert, key = make_cert(tmp_path, "front")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    backend = s3_server.endpoint.removeprefix("http://").split(":")

    def serve() -> None:
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            try:
                client = context.wrap_socket(raw, server_side=True)
            except (OSError, ssl.SSLError):
                raw.close()
                continue
            upstream = socket.create_connection((backend[0], int(backend[1])))
            threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield f"https://127.0.0.1:{listener.getsockname()[1]}", cert
    listener.close()


def test_s3_over_tls(tls_front, s3_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint, ca = tls_front
    monkeypatch.setattr(s3_backend, "_services", {})
    monkeypatch.setenv("AWS_CA_BUNDLE", str(ca))
    client = open_replica(f"s3://{s3_server.new_bucket()}/tls", endpoint_url=endpoint)
    client.put("a/one", b"1" * 100_000)  # past wire.BIG_BODY: head and body sent apart
    client.put("a/two", b"2")
    assert client.get("a/one") == b"1" * 100_000
    assert [o.key for o in client.list("a/")] == ["a/one", "a/two"]
    client.delete(["a/one", "a/two"])
    assert client.list("") == []

    other, _ = make_cert(tmp_path, "other")  # a CA that did not sign the front's certificate
    monkeypatch.setattr(s3_backend, "_services", {})
    monkeypatch.setenv("AWS_CA_BUNDLE", str(other))
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    client = open_replica("s3://whatever/tls", endpoint_url=endpoint)
    with pytest.raises(StorageError) as info:
        client.get("a/two")
    assert str(info.value).startswith(f"cannot reach {endpoint}: TLS handshake failed (")
    assert str(info.value).endswith(
        "); check the endpoint URL, or point AWS_CA_BUNDLE at the CA that signed its certificate"
    )
    assert "certificate verify failed" in str(info.value)


def test_a_line_break_in_a_header_value_is_refused() -> None:
    server = Scripted([b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])
    conn = Connection(server.host, None, 5, 5)
    for value in ("a\r\nx-evil: 1", "a\nb", "a\rb"):
        with pytest.raises(ProtocolError, match="^line break inside the request head$"):
            conn.exchange("GET", "/b/k", {"host": server.host, "x-amz-meta": value}, b"")
    status, _, _ = conn.exchange("GET", "/b/k", {"host": server.host}, b"")
    assert status == 200 and len(server.requests) == 1


def test_receive_timeout_is_for_that_reply_only() -> None:
    """send on two connections, then read the replies in the other order; a receive with a
    timeout gives up after it and leaves the connection's own read timeout in place."""
    first = Scripted([b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1"])
    second = Scripted([b"HTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\n2"])
    a, b = Connection(first.host, None, 5, 5), Connection(second.host, None, 5, 5)
    a.send("PUT", "/b/1", {"host": first.host}, b"x" * 100_000)
    b.send("PUT", "/b/2", {"host": second.host}, b"y")
    assert b.receive("PUT", 2.0)[::2] == (201, b"2")
    assert b.sock.gettimeout() == 5
    assert a.receive("PUT")[::2] == (200, b"1")

    silent = FakeS3(lambda *_: HANG)
    conn = Connection(silent.host, None, 5, 5)
    conn.send("PUT", "/b/k", {"host": silent.host}, b"z")
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        conn.receive("PUT", 0.3)
    assert 0.25 < time.monotonic() - started < 2
    assert conn.open and conn.sock.gettimeout() == 5
    silent.stop()


# ---------------------------------------------------------- put_many against a fake store

HANG = object()  # FakeS3 answer: keep the connection open and never reply
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


def s3_error(status: int, phrase: str, code: str, message: str) -> bytes:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        "<Resource>/bucket/x</Resource><RequestId>4442587FB7D0A2F9</RequestId></Error>"
    ).encode()
    head = f"HTTP/1.1 {status} {phrase}\r\nContent-Type: application/xml\r\n"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


class FakeS3:
    """A loopback stand-in for an S3 endpoint: every connection on its own thread, each
    request answered by ``answer(method, path, body)``: reply bytes; None to close without
    a reply; HANG to never answer; (reply, "fin"/"rst") to reply and then drop the
    connection (a FIN, or a RST) without having said Connection: close."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.requests: list[tuple[str, str, bytes]] = []
        self.payload_sha256: list[str] = []  # each request's x-amz-content-sha256
        self.connections = 0
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.host = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.endpoint = f"http://{self.host}"
        threading.Thread(target=self._accept, daemon=True).start()

    def paths(self) -> list[str]:
        with self._lock:
            return [path for _, path, _ in self.requests]

    def stop(self) -> None:
        self._stopped.set()
        self.sock.close()
        with self._lock:
            for conn in self._open:
                conn.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._open.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn, conn.makefile("rb") as reader:
                while read := self._read(reader):
                    request, signed = read
                    with self._lock:
                        self.requests.append(request)
                        self.payload_sha256.append(signed)
                    reply = self.answer(*request)
                    if reply is HANG:
                        self._stopped.wait()
                        return
                    if reply is None:
                        return
                    if isinstance(reply, tuple):
                        reply, how = reply
                        conn.sendall(reply)
                        if how == "rst":  # SO_LINGER 0: close() sends a RST
                            conn.setsockopt(
                                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                            )
                        return
                    conn.sendall(reply)
        except OSError:
            return

    @staticmethod
    def _read(reader) -> tuple[tuple[str, str, bytes], str] | None:
        """The next request as (method, path, body), and the payload hash it was signed with."""
        line = reader.readline()
        if not line:
            return None
        method, path, _ = line.decode("latin-1").split(" ", 2)
        headers = {}
        while (header := reader.readline()) not in (b"\r\n", b""):
            name, _, value = header.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = reader.read(int(headers.get("content-length", 0)))
        return (method, path, body), headers.get("x-amz-content-sha256", "")


@pytest.fixture
def fake_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """make(answer) -> (FakeS3, client of s3://bucket/x there); the AWS env points at it."""
    servers: list[FakeS3] = []
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFAKE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")

    def make(answer):
        server = FakeS3(answer)
        servers.append(server)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.endpoint)
        monkeypatch.setattr(s3_backend, "_services", {})
        return server, open_replica("s3://bucket/x")

    yield make
    for server in servers:
        server.stop()


def objects(n: int) -> list[tuple[str, bytes]]:
    return [(f"k{i}", f"body {i}".encode() * (i + 1)) for i in range(n)]


def test_put_many_retries_a_slow_down_through_the_request_path(fake_s3) -> None:
    slow_down = s3_error(503, "Slow Down", "SlowDown", "Please reduce your request rate.")
    answered: dict[str, int] = {}

    def answer(method: str, path: str, body: bytes):
        answered[path] = answered.get(path, 0) + 1
        return slow_down if path == "/bucket/x/k1" and answered[path] == 1 else OK

    server, client = fake_s3(answer)
    batch = objects(4)
    assert client.put_many(batch) == [None] * 4
    assert client.requests == 4
    assert sorted(server.paths()) == [
        "/bucket/x/k0", "/bucket/x/k1", "/bucket/x/k1", "/bucket/x/k2", "/bucket/x/k3"
    ]  # fmt: skip
    bodies = [(p, b) for _, p, b in server.requests if p == "/bucket/x/k1"]
    assert bodies == [("/bucket/x/k1", batch[1][1])] * 2  # the same object, sent again


def test_a_known_payload_hash_is_what_a_put_signs(fake_s3) -> None:
    """A digest handed to put_all (the uploader's, made with the segment's trailer) is signed
    as the payload's SHA-256 instead of hashing the body again, on the first attempt and on
    a retry alike; objects without one are hashed.  A store that checks (AWS does) thus
    refuses bytes that differ from what was encoded."""
    slow_down = s3_error(503, "Slow Down", "SlowDown", "Please reduce your request rate.")
    answered: set[str] = set()

    def answer(method: str, path: str, body: bytes):
        first = path not in answered
        answered.add(path)
        return slow_down if path == "/bucket/x/k2" and first else OK

    server, client = fake_s3(answer)
    batch = objects(4)
    told = ["a" * 64, None, "b" * 64, "c" * 64]
    batch[3] = ("../k3", batch[3][1])  # refused before sending: the digests after it keep order
    results = put_all(client, batch, told)
    assert results[:3] == [None] * 3 and isinstance(results[3], ValueError)
    signed = sorted(zip(server.paths(), server.payload_sha256, strict=True))
    assert signed == [
        ("/bucket/x/k0", "a" * 64),
        ("/bucket/x/k1", hashlib.sha256(batch[1][1]).hexdigest()),
        ("/bucket/x/k2", "b" * 64),
        ("/bucket/x/k2", "b" * 64),  # the retry, through request()
    ]


def test_put_many_gives_up_on_a_store_that_keeps_throttling(
    fake_s3, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # put_many's own attempt and one more
    slow_down = s3_error(503, "Slow Down", "SlowDown", "Please reduce your request rate.")
    server, client = fake_s3(lambda m, path, b: slow_down if path.endswith("/k2") else OK)
    results = client.put_many(objects(3))
    assert results[:2] == [None, None]
    assert str(results[2]) == (
        f"S3 put s3://bucket/x/k2 failed at {server.endpoint}: "
        "SlowDown: Please reduce your request rate."
    )
    # put_many's own attempt, then request()'s for the rest of AWS_MAX_ATTEMPTS
    assert server.paths().count("/bucket/x/k2") == 2


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (
            s3_error(403, "Forbidden", "AccessDenied", "Access Denied"),
            "access denied to s3://bucket/x: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY",
        ),
        (
            s3_error(404, "Not Found", "NoSuchBucket", "The specified bucket does not exist"),
            "bucket 'bucket' does not exist at {endpoint}: create it or fix the replica URL",
        ),
        (
            s3_error(400, "Bad Request", "EntityTooLarge", "Your proposed upload exceeds\nthe"),
            "S3 put s3://bucket/x/k2 failed at {endpoint}: EntityTooLarge: Your proposed "
            "upload exceeds",
        ),
    ],
    ids=["AccessDenied", "NoSuchBucket", "EntityTooLarge"],
)
def test_put_many_refusal_is_that_objects_error(fake_s3, reply: bytes, expected: str) -> None:
    server, client = fake_s3(lambda m, path, b: reply if path.endswith("/k2") else OK)
    results = client.put_many(objects(5))
    assert [r is None for r in results] == [True, True, False, True, True]
    assert type(results[2]) is StorageError
    assert str(results[2]) == expected.format(endpoint=server.endpoint)
    assert server.paths().count("/bucket/x/k2") == 1  # not retried
    assert len(server.requests) == 5
    assert all(m == "PUT" for m, _, _ in server.requests)


def no_reply(seconds: float) -> str:
    return f"no response within {seconds}s; the server is up but not answering"


def stalled(seconds: float) -> str:
    return (
        f"sending stalled (no byte accepted for {seconds}s); "
        "the server, or a proxy on the way, stopped reading"
    )


def test_put_many_to_a_hung_store_costs_one_read_timeout(
    fake_s3, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3_backend, "READ_TIMEOUT", 1.0)  # the deadline and each socket's
    server, client = fake_s3(lambda *_: HANG)
    n = 8
    started = time.monotonic()
    results = client.put_many(objects(n))
    elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 2.5  # one timeout for all, not n x 1 s (nor n x attempts x 1 s)
    assert [str(r) for r in results] == [f"cannot reach {server.endpoint}: {no_reply(1.0)}"] * n
    assert all(type(r) is StorageError for r in results)
    assert sorted(server.paths()) == [f"/bucket/x/k{i}" for i in range(n)]  # all sent first
    assert server.connections == n  # one connection each, and a timeout is not retried
    (pool,) = client.service._pools.values()
    assert pool._idle == []  # the timed-out connections were closed, not pooled


def test_put_many_one_hung_reply_does_not_fail_the_answered_ones(
    fake_s3, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3_backend, "READ_TIMEOUT", 0.5)
    server, client = fake_s3(lambda m, path, b: HANG if path.endswith("/k0") else OK)
    started = time.monotonic()
    results = client.put_many(objects(5))  # k0's reply is read first and never comes
    assert time.monotonic() - started < 2
    assert str(results[0]) == f"cannot reach {server.endpoint}: {no_reply(0.5)}"
    assert results[1:] == [None] * 4  # their replies were waiting when the deadline passed


def test_put_many_to_a_store_that_stopped_reading_costs_one_timeout(
    fake_s3, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3_backend, "READ_TIMEOUT", 0.5)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    server, client = fake_s3(lambda *_: HANG)
    server._read = lambda reader: server._stopped.wait() and None  # accepts, never reads
    big = [(f"k{i}", bytes(16 << 20)) for i in range(3)]  # more than the socket buffers take
    started = time.monotonic()
    results = client.put_many(big)
    elapsed = time.monotonic() - started
    assert [str(r) for r in results] == [f"cannot reach {server.endpoint}: {stalled(0.5)}"] * 3
    assert elapsed < 1.5


@pytest.mark.parametrize("drop", ["fin", "rst"])
def test_put_many_replaces_a_kept_alive_connection_the_server_closed(fake_s3, drop) -> None:
    """fin: the request goes out and reading its reply fails; rst: sending it fails."""
    server, client = fake_s3(lambda m, path, b: (OK, drop) if path.endswith("/warm") else OK)
    client.put("warm", b"w")  # leaves its connection in the pool; the server then drops it
    (pool,) = client.service._pools.values()
    (stale,) = pool._idle
    assert select.select([stale.sock], [], [], 5)[0]  # the FIN/RST has arrived
    batch = objects(3)
    assert client.put_many(batch) == [None] * 3  # k0 goes out on the stale connection first
    assert client.requests == 4
    assert sorted(server.requests) == sorted(
        [("PUT", "/bucket/x/warm", b"w")] + [("PUT", f"/bucket/x/{k}", d) for k, d in batch]
    )  # k0 arrived once: the server never read what was sent on the dead connection
    assert not stale.open and stale not in pool._idle
    # warm, k1, k2: k0's retry went out on a connection k1 or k2 had given back
    assert server.connections == 3


def test_put_many_to_a_closed_port_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3_backend, "_services", {})
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    client = open_replica("s3://bucket/x", endpoint_url=endpoint)
    started = time.monotonic()
    results = client.put_many(objects(3))
    assert time.monotonic() - started < 2
    assert [str(r) for r in results] == [
        f"cannot reach {endpoint}: connection refused; "
        "check the endpoint URL and that the server is running"
    ] * 3


# ------------------------------------------------- stalls, not totals; proxies on loopback


@pytest.fixture
def proxies() -> Iterator:
    made: list[LoopbackProxy] = []

    def make(**options) -> LoopbackProxy:
        made.append(LoopbackProxy(**options))
        return made[-1]

    yield make
    for proxy in made:
        proxy.stop()


@pytest.fixture
def direct(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy variable of the machine's; services made afresh; one attempt per call."""
    for name in ("http_proxy", "https_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setattr(s3_backend, "_services", {})
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")


STALL = 0.4  # seconds: the stall timeout in these tests
BIG = 16 << 20  # more than loopback socket buffers hold, so the relay's pace shows


def test_a_slow_put_that_moves_is_not_timed_out(
    s3_server, proxies, direct, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3_backend, "READ_TIMEOUT", STALL)
    relay = proxies(upstream=s3_server.endpoint.removeprefix("http://"), rate=8 << 20)
    client = open_replica(f"s3://{s3_server.new_bucket()}/slow", endpoint_url=relay.url)
    blob = os.urandom(BIG)
    started = time.monotonic()
    client.put("one", blob)
    assert time.monotonic() - started > 2 * STALL  # a total timeout would have failed it
    started = time.monotonic()
    assert client.put_many([("a", blob[: BIG // 2]), ("b", blob[BIG // 2 :])]) == [None, None]
    assert time.monotonic() - started > 2 * STALL  # so would the batch's old deadline
    assert client.get("one") == blob and client.get("a") + client.get("b") == blob


def test_a_stalled_put_fails_after_the_stall_timeout(
    s3_server, proxies, direct, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3_backend, "READ_TIMEOUT", STALL)
    relay = proxies(upstream=s3_server.endpoint.removeprefix("http://"), stall_after=1 << 20)
    client = open_replica(f"s3://{s3_server.new_bucket()}/stall", endpoint_url=relay.url)
    expected = f"cannot reach {relay.url}: {stalled(STALL)}"
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        client.put("one", bytes(BIG))
    assert str(info.value) == expected
    assert relay.stalled.is_set() and time.monotonic() - started < STALL + 2
    assert [str(r) for r in client.put_many([("a", bytes(BIG)), ("b", b"x")])] == [expected] * 2


def test_https_endpoint_through_a_connect_proxy(
    tls_front, s3_server, proxies, direct, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint, ca = tls_front
    front = endpoint.removeprefix("https://")
    credentials = "Basic " + base64.b64encode(b"walsync:p@ss word").decode()
    proxy = proxies(auth=credentials)
    monkeypatch.setenv("AWS_CA_BUNDLE", str(ca))
    monkeypatch.setenv("HTTPS_PROXY", f"http://walsync:p%40ss%20word@127.0.0.1:{proxy.port}")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:1")  # for http only: never used here
    client = open_replica(f"s3://{s3_server.new_bucket()}/tunnel", endpoint_url=endpoint)
    client.put("k", b"through the tunnel" * 10_000)
    assert client.get("k") == b"through the tunnel" * 10_000
    assert proxy.heads == [(f"CONNECT {front} HTTP/1.1", credentials)]  # one kept-alive tunnel

    monkeypatch.setenv("HTTPS_PROXY", f"http://walsync:wrong@127.0.0.1:{proxy.port}")
    monkeypatch.setattr(s3_backend, "_services", {})
    client = open_replica(client.url, endpoint_url=endpoint)
    with pytest.raises(StorageError) as info:
        client.get("k")
    assert str(info.value) == (
        f"cannot reach {endpoint}: the proxy refused the tunnel to {front}: 407 Proxy "
        f"Authentication Required via proxy http://***@127.0.0.1:{proxy.port}; check the "
        "proxy (HTTPS_PROXY, HTTP_PROXY, NO_PROXY)"
    )


def test_http_endpoint_through_a_proxy_unless_no_proxy_says_so(
    s3_server, proxies, direct, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = proxies()
    host = s3_server.endpoint.removeprefix("http://")
    bucket = s3_server.new_bucket()
    monkeypatch.setenv("http_proxy", proxy.url)
    monkeypatch.setenv("no_proxy", "example.com,.internal")
    client = open_replica(f"s3://{bucket}/via")
    client.put("k", b"v")
    assert client.get("k") == b"v"
    assert [line for line, _ in proxy.heads] == [f"PUT http://{host}/{bucket}/via/k HTTP/1.1"]

    for no_proxy in ("127.0.0.1", f"localhost, 127.0.0.0/8:{host.split(':')[1]}", "*"):
        monkeypatch.setenv("NO_PROXY", no_proxy)
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.setattr(s3_backend, "_services", {})
        assert open_replica(f"s3://{bucket}/via").get("k") == b"v"
    assert len(proxy.heads) == 1  # bypassed every time


@pytest.mark.parametrize(
    ("env", "scheme", "expected"),
    [
        ({"https_proxy": "http://p:1"}, "https", ("p", 1)),
        ({"HTTPS_PROXY": "p:8080"}, "https", ("p", 8080)),
        ({"HTTPS_PROXY": "http://p"}, "https", ("p", 3128)),
        ({"https_proxy": "http://a:1", "HTTPS_PROXY": "http://b:2"}, "https", ("a", 1)),
        ({"https_proxy": "http://p:1"}, "http", None),
        ({"HTTP_PROXY": "http://p:1"}, "http", ("p", 1)),
        ({"HTTP_PROXY": "http://p:1", "REQUEST_METHOD": "GET"}, "http", None),  # CGI
        ({"http_proxy": "http://p:1", "no_proxy": "s3.example.com"}, "http", None),
        ({"http_proxy": "http://p:1", "no_proxy": ".example.com"}, "http", None),
        ({"http_proxy": "http://p:1", "no_proxy": "example.com:9000"}, "http", None),
        ({"http_proxy": "http://p:1", "no_proxy": "example.com:80"}, "http", ("p", 1)),
        ({"http_proxy": "http://p:1", "no_proxy": "ample.com"}, "http", ("p", 1)),
        ({"http_proxy": "http://p:1", "NO_PROXY": "*"}, "http", None),
        ({"http_proxy": "http://p:1", "no_proxy": "", "NO_PROXY": "*"}, "http", ("p", 1)),
    ],
)
def test_proxy_variables(env: dict[str, str], scheme: str, expected) -> None:
    proxy = proxy_for(scheme, "s3.example.com", 9000, env)
    assert (proxy.address if proxy else None) == expected


def test_proxy_ip_rules_and_bad_urls() -> None:
    assert bypassed("10.1.2.3", 80, "10.0.0.0/8")
    assert bypassed("::1", 80, "::1") and bypassed("::1", 80, "[::1]:80")
    assert not bypassed("11.1.2.3", 80, "10.0.0.0/8, localhost")
    with pytest.raises(StorageError) as info:
        proxy_for("https", "h", 443, {"HTTPS_PROXY": "socks5://user:secret@p:1080"})
    assert str(info.value) == (
        "unsupported proxy URL 'socks5://***@p:1080' in $HTTPS_PROXY: "
        "use http://[user:password@]host:port"
    )
    proxy = proxy_for("http", "h", 80, {"http_proxy": "http://u:secret@p:1"})
    assert proxy is not None and "secret" not in repr(proxy) and proxy.url == "http://***@p:1"
