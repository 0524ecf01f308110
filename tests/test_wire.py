"""The S3 client's HTTP/1.1 layer: reply framing against a scripted server, TLS against a real
TLS front for SeaweedFS."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from walsync_vfs.storage import StorageError, open_replica
from walsync_vfs.storage import s3 as s3_backend
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

    def pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                s.close()

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
