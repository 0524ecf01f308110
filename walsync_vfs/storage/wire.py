"""One keep-alive HTTP/1.1 connection, as much of the protocol as S3's REST calls use.

walsync PUTs a small segment per database per second, so the per-request cost of the HTTP
layer is replication CPU the application pays.  ``http.client`` builds a request header by
header with its checks, sends it with two ``sendall`` calls (two packets under
``TCP_NODELAY``) and makes a new buffered reader per response; this module builds the request
as one string, sends head and body with one ``sendall``, and keeps one buffered reader with
the socket.

Timeouts are for stalls, never for totals: every send and every read may wait the timeout
for the next byte to move, so a large body over a slow link takes as long as it takes.

Through an HTTP proxy (:class:`~walsync_vfs.storage.proxy.Proxy`), an https endpoint is
reached by a CONNECT tunnel and TLS inside it; a plain http request goes to the proxy in
absolute form (``PUT http://host/path HTTP/1.1``).

Replies: status line, header block (http.client's limits), body framed by Content-Length or
chunked transfer coding, or by the end of the connection.  Errors are :class:`ProtocolError`,
:class:`Disconnected` or OSError, so callers can tell a dropped keep-alive connection from a
refused one.  Not importing http.client at all keeps ``ssl`` (OpenSSL's tables) and
``email`` out of the process, which an http:// endpoint never needs.
"""

from __future__ import annotations

import contextlib
import fcntl
import select
import socket
import struct
import termios
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ssl

    from walsync_vfs.storage.proxy import Proxy

MAX_LINE = 65536  # http.client's own limits on a reply's header block
MAX_HEADERS = 100
BIG_BODY = 1 << 16  # larger bodies are sent after the head, not copied into one buffer
SEND_PIECE = 1 << 20  # bytes handed to one send(): each may wait the stall timeout
# A socket timeout within this share of the one wanted is kept: each change is a system call
# made without the GIL, and an application thread may then wait for it to come back.
TIMEOUT_SLACK = 0.1

# A request body: one buffer, or several sent back to back (a multipart part never joined).
Body = bytes | memoryview | Sequence[bytes | memoryview]


class ProtocolError(Exception):
    """The exchange is not HTTP/1.1 as this module speaks it (the request head included)."""


class Disconnected(ProtocolError):
    """The server closed the connection before its whole reply."""


class Stalled(TimeoutError):
    """Sending stopped moving: the peer (or a proxy on the way) took no byte for a timeout."""


class ProxyRefused(OSError):
    """The proxy answered CONNECT with an error status (the text says which)."""


class Progress:
    """A stall deadline shared by several transfers (a batch of PUTs): each byte moved on
    any of them pushes it ``stall`` seconds on, so only a batch where nothing moves times
    out, however long the whole takes."""

    def __init__(self, stall: float) -> None:
        self.stall = stall
        self.deadline = time.monotonic() + stall

    def moved(self) -> None:
        self.deadline = time.monotonic() + self.stall

    def left(self) -> float:
        """Seconds to the deadline, for a socket timeout (which must be positive)."""
        return max(self.deadline - time.monotonic(), 0.001)


def body_length(body: Body) -> int:
    return len(body) if isinstance(body, (bytes, memoryview)) else sum(map(len, body))


def address(host: str, tls: bool) -> tuple[str, int]:
    """(name, port) of a Host header: ``example.com``, ``example.com:9000``, ``[::1]:9000``."""
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit() and not name.endswith(":"):
        return name.strip("[]"), int(port)
    return host.strip("[]"), 443 if tls else 80


class Connection:
    """A connected socket (TLS if ``context``) with its reader; used by one thread at a time.

    ``read_timeout`` is the stall timeout: the longest any send or read waits for a byte.
    With ``proxy``, the socket goes to the proxy: a tunnel for TLS, absolute-form requests
    without."""

    def __init__(
        self,
        host: str,
        context: ssl.SSLContext | None,
        connect_timeout: float,
        read_timeout: float,
        proxy: Proxy | None = None,
    ) -> None:
        name, port = address(host, context is not None)
        sock = socket.create_connection(
            proxy.address if proxy else (name, port), timeout=connect_timeout
        )
        self._target_prefix = ""  # "http://host" when requests go to a proxy in absolute form
        self._proxy_headers: dict[str, str] = {}
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if proxy is not None and context is not None:
                _tunnel(sock, f"{_bracketed(name)}:{port}", proxy)
            elif proxy is not None:
                self._target_prefix = f"http://{host}"
                self._proxy_headers = proxy.headers()
            if context is not None:
                sock = context.wrap_socket(sock, server_hostname=name)
            sock.settimeout(read_timeout)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.read_timeout = read_timeout
        self.reader = sock.makefile("rb")
        self.open = True
        self._draining = False  # a large body may still be leaving the send buffer

    def close(self) -> None:
        self.open = False
        self.reader.close()
        self.sock.close()

    def exchange(
        self, method: str, target: str, headers: dict[str, str], body: Body
    ) -> tuple[int, dict[str, str], bytes]:
        """Send one request and read its whole reply: (status, headers, body).  Afterwards
        ``open`` says whether the connection can carry another request."""
        self.send(method, target, headers, body)
        return self.receive(method)

    def send(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        body: Body,
        progress: Progress | None = None,
    ) -> None:
        """The request half of :meth:`exchange`: a caller may send on several connections
        before it reads any reply (``progress``: a stall deadline shared with them instead
        of this connection's own).  :class:`Stalled` if the peer stops taking bytes."""
        try:
            self._send(method, target, headers, body, progress)
        finally:
            if progress is not None and self.open:
                self._set_timeout(self.read_timeout)

    def _send(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        body: Body,
        progress: Progress | None,
    ) -> None:
        head = [f"{method} {self._target_prefix}{target} HTTP/1.1"]
        head += [f"{name}: {value}" for name, value in headers.items()]
        head += [f"{name}: {value}" for name, value in self._proxy_headers.items()]
        length = body_length(body)
        if length or method in ("PUT", "POST"):
            head.append(f"content-length: {length}")
        text = "\r\n".join(head)
        breaks = len(head) - 1  # only the ones joining the lines: no value may start a header
        if text.count("\r") != breaks or text.count("\n") != breaks:
            raise ProtocolError("line break inside the request head")
        data = (text + "\r\n\r\n").encode("latin-1")
        chunks = [body] if isinstance(body, (bytes, memoryview)) else body
        self._draining = length > BIG_BODY
        if not self._draining:
            self._send_all(data + b"".join(chunks), progress)
            return
        self._send_all(data, progress)
        for chunk in chunks:
            self._send_all(chunk, progress)

    def _send_all(self, data: bytes | memoryview, progress: Progress | None) -> None:
        """``sendall`` with a stall timeout: ``socket.sendall``'s timeout bounds the whole
        buffer, so a large body over a slow link would fail however well it moves."""
        with memoryview(data) as view:
            sent = 0
            while sent < len(view):
                if progress is not None:
                    self._set_timeout(progress.left())
                try:
                    sent += self.sock.send(view[sent : sent + SEND_PIECE])
                except TimeoutError:
                    waited = progress.stall if progress else self.read_timeout
                    raise Stalled(f"no byte accepted for {waited:g}s") from None
                if progress is not None:
                    progress.moved()

    def _set_timeout(self, seconds: float) -> None:
        """The socket's timeout, unless it is within TIMEOUT_SLACK of ``seconds`` already."""
        current = self.sock.gettimeout()
        if current is None or abs(current - seconds) > TIMEOUT_SLACK * max(current, seconds):
            self.sock.settimeout(seconds)

    def receive(
        self, method: str, timeout: float | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """The reply half of :meth:`exchange` (``timeout``: seconds for this reply instead
        of the connection's read timeout)."""
        with self._timeout(timeout):
            if self._draining:
                self._await_reply(self.sock.gettimeout() or self.read_timeout)
            return self._reply(method)

    def _await_reply(self, stall: float) -> None:
        """Wait for the reply to begin.  The last send returns once the body is in the
        kernel's send buffer, which on a slow link takes long to empty: while it keeps
        emptying, bytes still move and the wait goes on."""
        self._draining = False
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        queued = _unsent(self.sock)
        while not poller.poll(stall * 1000) and not _pending(self.sock):
            now = _unsent(self.sock)
            if now is None or queued is None or now >= queued:
                raise TimeoutError("no reply")
            queued = now

    @contextlib.contextmanager
    def _timeout(self, timeout: float | None) -> Iterator[None]:
        """``timeout`` seconds for what runs inside, then the read timeout again."""
        if timeout is None:
            yield
            return
        self.sock.settimeout(timeout)
        try:
            yield
        finally:
            if self.open:
                self.sock.settimeout(self.read_timeout)

    def _reply(self, method: str) -> tuple[int, dict[str, str], bytes]:
        while True:
            status, version = self._status_line()
            reply = self._header_block()
            if status != 100:  # Continue: the real reply follows
                break
        length = reply.get("content-length", "")
        chunked = reply.get("transfer-encoding", "").lower() == "chunked"
        keep = version == b"HTTP/1.1" and reply.get("connection", "").lower() != "close"
        if method == "HEAD" or status in (204, 304) or status < 200:
            content = b""
        elif chunked:
            content = self._chunked()
        elif length.isdigit():
            content = self._exactly(int(length))
        else:  # framed by the end of the connection
            content, keep = self.reader.read(), False
        if not keep:
            self.close()
        return status, reply, content

    def _line(self) -> bytes:
        line = self.reader.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise ProtocolError(f"reply line longer than {MAX_LINE} bytes")
        return line

    def _status_line(self) -> tuple[int, bytes]:
        line = self._line()
        if not line:
            raise Disconnected("Remote end closed connection without response")
        version, _, rest = line.partition(b" ")
        code = rest[:3]
        if not version.startswith(b"HTTP/1.") or not code.isdigit():
            raise ProtocolError(f"bad status line {line.decode('latin-1').strip()!r}")
        return int(code), version

    def _header_block(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS + 1):
            line = self._line()
            if line in (b"\r\n", b"\n", b""):
                return headers
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        raise ProtocolError(f"got more than {MAX_HEADERS} headers")

    def _exactly(self, n: int) -> bytes:
        data = self.reader.read(n)
        if len(data) < n:
            raise Disconnected(f"reply body ended after {len(data)} of {n} bytes")
        return data

    def _chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            size_line = self._chunk_line().split(b";", 1)[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size {size_line!r}") from None
            if size == 0:
                self._header_block()  # trailers
                return b"".join(parts)
            parts.append(self._exactly(size))
            if self._chunk_line() not in (b"\r\n", b"\n"):
                raise ProtocolError("no line break after a chunk")

    def _chunk_line(self) -> bytes:
        line = self._line()
        if not line:
            raise Disconnected("chunked reply body ended early")
        return line


def _bracketed(name: str) -> str:
    return f"[{name}]" if ":" in name else name


def _tunnel(sock: socket.socket, authority: str, proxy: Proxy) -> None:
    """Ask the proxy for a TCP tunnel to ``authority`` (CONNECT, RFC 9110 9.3.6); raises
    :class:`ProxyRefused` naming its answer.  The reply is read a byte at a time: whatever
    follows it belongs to the TLS handshake, not to a buffer here."""
    head = [f"CONNECT {authority} HTTP/1.1", f"host: {authority}"]
    head += [f"{name}: {value}" for name, value in proxy.headers().items()]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
    reply = b""
    while not reply.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        if not byte:
            raise Disconnected("the proxy closed the connection instead of answering CONNECT")
        reply += byte
        if len(reply) > MAX_LINE:
            raise ProtocolError(f"proxy reply to CONNECT longer than {MAX_LINE} bytes")
    status_line = reply.split(b"\r\n", 1)[0].decode("latin-1")
    version, _, rest = status_line.partition(" ")
    if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
        raise ProtocolError(f"bad status line from the proxy {status_line!r}")
    if not 200 <= int(rest[:3]) < 300:
        raise ProxyRefused(f"the proxy refused the tunnel to {authority}: {rest.strip()}")


def _unsent(sock: socket.socket) -> int | None:
    """Bytes in the socket's send queue the peer has not acknowledged (Linux; None where
    the system cannot say)."""
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (AttributeError, OSError):
        return None
    return int(struct.unpack("i", raw)[0])


def _pending(sock: socket.socket) -> bool:
    """Whether TLS holds decrypted bytes a poll of the socket cannot see."""
    pending = getattr(sock, "pending", None)
    return bool(pending and pending())
