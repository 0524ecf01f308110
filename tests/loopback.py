"""A forward proxy or TCP relay on loopback that can throttle, stall and count: the network
faults and measurements tests need between a client and SeaweedFS."""

from __future__ import annotations

import socket
import threading
import time

from walsync_vfs.storage.wire import address


class LoopbackProxy:
    """A forward proxy on loopback: CONNECT tunnels and absolute-form requests, each piped
    to the host it names; with ``upstream``, a plain TCP relay to that address instead.

    ``rate``: bytes per second it passes on from the client; ``stall_after``: it stops
    reading from the client after that many bytes; ``auth``: the Proxy-Authorization value
    it requires (407 otherwise).  ``heads`` holds each connection's first request line and
    its Proxy-Authorization; ``received`` counts the bytes passed back to clients (what they
    really downloaded), ``sent`` the bytes passed on from them."""

    PIECE = 64 << 10

    def __init__(
        self,
        upstream: str | None = None,
        rate: float | None = None,
        stall_after: int | None = None,
        auth: str | None = None,
    ) -> None:
        self.upstream, self.rate, self.stall_after, self.auth = upstream, rate, stall_after, auth
        self.heads: list[tuple[str, str]] = []
        self.received = self.sent = 0
        self._count = threading.Lock()
        self.stalled = threading.Event()
        self._stop = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        # Small buffers, so a throttled or stalled relay soon holds the sender back.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.PIECE)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            if self.upstream is not None:
                upstream = socket.create_connection(address(self.upstream, False))
                preface = b""
            else:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    byte = client.recv(1)
                    if not byte:
                        return
                    head += byte
                lines = head.decode("latin-1").split("\r\n")
                fields = {
                    name.lower(): value
                    for name, _, value in (line.partition(": ") for line in lines[1:] if line)
                }
                self.heads.append((lines[0], fields.get("proxy-authorization", "")))
                if self.auth is not None and fields.get("proxy-authorization") != self.auth:
                    client.sendall(
                        b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                        b"Content-Length: 0\r\nConnection: close\r\n\r\n"
                    )
                    client.close()
                    return
                method, target, _ = lines[0].split(" ")
                if method == "CONNECT":
                    upstream = socket.create_connection(address(target, False))
                    client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    preface = b""
                else:
                    host = target.removeprefix("http://").split("/", 1)[0]
                    upstream = socket.create_connection(address(host, False))
                    preface = head
        except OSError:
            client.close()
            return
        threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()
        self._forward(client, upstream, preface)

    def _forward(self, client: socket.socket, upstream: socket.socket, preface: bytes) -> None:
        moved = 0
        try:
            upstream.sendall(preface)
            while not self._stop.is_set():
                if self.stall_after is not None and moved >= self.stall_after:
                    self.stalled.set()
                    self._stop.wait()  # holds the connection open, reads nothing more
                    return
                data = client.recv(self.PIECE)
                if not data:
                    return
                if self.rate:
                    time.sleep(len(data) / self.rate)
                upstream.sendall(data)
                moved += len(data)
                with self._count:
                    self.sent += len(data)
        except OSError:
            return
        finally:
            client.close()
            upstream.close()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                with self._count:
                    self.received += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                s.close()
