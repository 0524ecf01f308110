"""S3 replica backend (AWS or any S3-compatible server): signed HTTP on pooled connections.

Endpoint, region and credentials come from the AWS conventions every other tool on the
machine follows (``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, profiles, config and
credentials files, instance roles, ...), resolved by :mod:`~walsync_vfs.storage.awsconfig`.
The requests themselves -- PUT, GET (whole or a range), HEAD, ListObjectsV2, DeleteObjects
and the multipart upload calls -- are a few fixed REST calls, so they are made here
(:mod:`~walsync_vfs.storage.wire`, :mod:`~walsync_vfs.storage.sigv4`) instead of a botocore
client: that client loads S3's large service model and spends most of a commit's
replication CPU on its per-request machinery, while walsync PUTs about once per database per
second.  Proxies come from the environment (:mod:`~walsync_vfs.storage.proxy`).
"""

from __future__ import annotations

import base64
import calendar
import contextlib
import hashlib
import ipaddress
import itertools
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from http import HTTPStatus
from typing import Any, TypeVar
from urllib.parse import unquote_plus, urlsplit
from xml.etree import ElementTree

from walsync_vfs.backoff import Backoff
from walsync_vfs.storage import (
    Conflict,
    ObjectInfo,
    ObjectNotFound,
    StorageError,
    Unsupported,
    awsconfig,
    bad_url,
    check_key,
    check_prefix,
    transfer,
)
from walsync_vfs.storage.proxy import Proxy, proxy_for
from walsync_vfs.storage.sigv4 import (
    EMPTY_SHA256,
    Credentials,
    Signer,
    canonical_query,
    uri_path,
)
from walsync_vfs.storage.wire import (
    Body,
    Connection,
    Disconnected,
    Progress,
    ProtocolError,
    ProxyRefused,
    Stalled,
    address,
    body_length,
)

T = TypeVar("T")
CONNECT_TIMEOUT = 5
# Seconds without a byte moving (not a total: a big body takes what it takes); a frozen
# store must surface as an error, not a hang.
READ_TIMEOUT = 15
DELETE_BATCH = 1000  # the DeleteObjects limit
ENV_PATH_STYLE = "WALSYNC_S3_PATH_STYLE"
DEFAULT_REGION = "us-east-1"  # botocore's too, when nothing names one
DEFAULT_ATTEMPTS = 3  # botocore's "standard" retry mode
# botocore's standard retry mode: a jittered 1, 2, 4, ... s backoff, capped at 20 s.
RETRY = Backoff(first=1.0, cap=20.0, jitter=True)
MAX_IDLE = 64  # keep-alive connections kept per host: 4 put threads x 16 PUTs at once

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
# botocore's standard retry mode: transient and throttling errors are retried.
_RETRY_STATUS = {429, 500, 502, 503, 504}
_RETRY_CODES = {
    "RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete", "Throttling",
    "ThrottlingException", "ThrottledException", "RequestThrottledException", "SlowDown",
    "TooManyRequestsException", "RequestLimitExceeded", "BandwidthLimitExceeded",
    "RequestThrottled", "InternalError", "ServiceUnavailable",
    "ConditionalRequestConflict",  # a concurrent conditional write: the retry decides
}  # fmt: skip
CREATE_ONLY = {"if-none-match": "*"}
_CODE = re.compile(rb"<Code>([^<]{1,200})</Code>")
_MESSAGE = re.compile(rb"<Message>([^<]{0,500})</Message>")
_UPLOAD_ID = re.compile(rb"<UploadId>([^<]{1,1024})</UploadId>")
# A 403 from a store whose clock differs this much from ours is blamed on the clock (AWS
# refuses requests signed more than 15 minutes off; some stores say SignatureDoesNotMatch).
SKEW_SUSPECT = 300.0
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")

# Multipart uploads this process is running (upload ids): never stale, whatever their age.
_uploading: set[str] = set()
_uploading_lock = threading.Lock()

# One service per process and endpoint options: it owns the connection pools and resolves
# credentials once, so sharing it across databases keeps sockets and lookups flat.
_services: dict[tuple[str | None, str | None, bool | None], S3Service] = {}
_services_lock = threading.Lock()


class _Unreachable(Exception):
    """No HTTP response: the text says why (one line, no credentials)."""


class _Failed(Exception):
    """An HTTP error response from the store."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        bucket_region: str = "",
        skew: float | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.status, self.code, self.message = status, code, message
        self.bucket_region = bucket_region  # S3 names it when we sign for the wrong one
        self.skew = skew  # seconds this machine's clock is behind the store's (Date header)

    @property
    def retryable(self) -> bool:
        return self.status in _RETRY_STATUS or self.code in _RETRY_CODES


class _NoCredentials(Exception):
    pass


def shared_service(
    endpoint_url: str | None = None, region: str | None = None, path_style: bool | None = None
) -> S3Service:
    """The process-wide :class:`S3Service` for these options, created on first use."""
    key = (endpoint_url, region, path_style)
    with _services_lock:
        service = _services.get(key)
        if service is None:
            service = _services[key] = S3Service(endpoint_url, region, path_style)
        return service


class S3Service:
    """One S3 endpoint as configured for this process: addressing, signing, credentials,
    retries and keep-alive connections.  Every call is safe from any thread.

    ``path_style=None`` defers to ``$WALSYNC_S3_PATH_STYLE`` (1/true or 0/false), and failing
    that uses path-style for any endpoint that is not AWS's own: S3-compatible servers
    (MinIO, SeaweedFS, ...) rarely have wildcard DNS for bucket subdomains.
    """

    def __init__(
        self, endpoint_url: str | None, region: str | None, path_style: bool | None
    ) -> None:
        try:
            aws = awsconfig.resolve()
        except awsconfig.ConfigError as exc:
            raise StorageError(f"AWS configuration: {exc}") from None
        region = region or aws.region or DEFAULT_REGION
        endpoint_url = endpoint_url if endpoint_url is not None else aws.endpoint_url
        attempts = aws.max_attempts
        self._ca_bundle = aws.ca_bundle
        self._current_credentials = aws.credentials
        self.endpoint_url = (endpoint_url or _aws_endpoint(region)).rstrip("/")
        try:
            parts = urlsplit(self.endpoint_url)
            valid = parts.scheme in ("http", "https") and bool(parts.hostname)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError as exc:  # "Invalid IPv6 URL", "Port out of range 0-65535"
            raise StorageError(f"invalid S3 endpoint URL {self.endpoint_url!r}: {exc}") from None
        if not valid:
            raise StorageError(f"invalid S3 endpoint URL {self.endpoint_url!r}: use http(s)://host")
        self.region = region
        if path_style is None:
            path_style = _env_flag(ENV_PATH_STYLE)
        self.path_style = not _is_aws(self.endpoint_url) if path_style is None else path_style
        self.max_attempts = max(1, int(attempts or DEFAULT_ATTEMPTS))
        self.signer = Signer(region)
        self._https = parts.scheme == "https"
        self._host = parts.netloc
        self._base = parts.path.rstrip("/")
        self._pools: dict[str, _Pool] = {}
        self._lock = threading.Lock()

    # -------------------------------------------------------------- the request path

    def request(
        self,
        method: str,
        bucket: str,
        key: str,
        query: Mapping[str, str] | None = None,
        body: Body = b"",
        headers: Mapping[str, str] | None = None,
        attempt: int = 1,
        reply: dict[str, str] | None = None,
        sha256: str | None = None,
    ) -> bytes:
        """Sign and send one request, retrying transient failures with jittered backoff;
        returns the body of a 2xx response.  Raises _Unreachable, _Failed or _NoCredentials.
        ``attempt`` > 1 goes on from a failed attempt made elsewhere (see put_many): it
        backs off first, and counts toward the attempts allowed.

        ``reply``, if given, receives the response's headers.

        Payloads are always SHA-256 signed (never UNSIGNED-PAYLOAD): the store then refuses a
        body damaged in transit even without TLS, for the price of hashing it (none if the
        caller knows the ``sha256`` of the body already).
        """
        host, path = self._address(bucket, key)
        qs = canonical_query(query) if query else ""
        target = f"{path}?{qs}" if qs else path
        payload = sha256 or _sha256(body)
        pool = self._pool(host)
        while True:
            if attempt > 1:
                time.sleep(RETRY.delay(attempt - 1))
            signed = {"host": host, **(headers or {})}
            self.signer.sign(method, path, qs, signed, payload, self._credentials(), _amz_date())
            try:
                status, data, replied = pool.exchange(method, target, body, signed)
            except _Unreachable as exc:
                failure: Exception = exc
            else:
                if status < 300:
                    if reply is not None:
                        reply.update(replied)
                    return data
                failure = _failure(status, data, replied)
                if not failure.retryable:
                    raise failure
            if attempt >= self.max_attempts:
                raise failure
            attempt += 1

    def put_many(
        self,
        bucket: str,
        objects: Sequence[tuple[str, bytes | memoryview]],
        headers: Mapping[str, str] | None = None,
        *,
        each: Sequence[Mapping[str, str]] | None = None,
        replies: Sequence[dict[str, str]] | None = None,
        sha256: Sequence[str | None] | None = None,
    ) -> list[Exception | None]:
        """PUT several objects at once, one connection each: every request is sent before
        any reply is read, so the thread wakes up once per batch instead of once per object
        (waking up for each reply is most of the CPU cost of a small PUT).  ``each[i]``: more
        headers for object ``i`` (a condition, say); ``replies[i]`` receives the headers of
        the reply that stored object ``i``; ``sha256[i]``, if known, its body's SHA-256.

        Per object: None, or what :meth:`request` would raise.  A failure of one object or
        connection (a kept-alive connection the server had closed, a 503) sends that object
        again through :meth:`request`, as the rest of its attempts.  A store that cannot be
        reached or stopped answering fails what is left of the batch at once: sends and
        replies share one stall deadline (pushed on by every byte moved on any of them), so
        that costs one read timeout, and the caller retries later (the engine with its own
        backoff).
        """
        results: list[Exception | None] = [None] * len(objects)
        # Each body's SHA-256: as given, or hashed once here, and signed again by a retry.
        payloads: list[str | None] = list(sha256) if sha256 else [None] * len(objects)
        retry: list[tuple[int, int]] = []  # (object, attempt it goes on with)
        sent: list[tuple[int, _Pool, Connection, bool]] = []
        try:
            creds = self._credentials()
        except _NoCredentials as exc:
            return [exc] * len(objects)
        amz_date = _amz_date()
        progress = Progress(READ_TIMEOUT)

        def failed(i: int, conn: Connection, reused: bool, exc: Exception) -> Exception | None:
            """Settle a send or reply that failed; the error if the store stopped answering."""
            conn.close()
            if isinstance(exc, TimeoutError):
                results[i] = _no_reply(exc)
                return results[i]
            results[i] = _lost(exc)
            retry.append((i, 1 if reused and _closed(exc) else 2))
            return None

        down: Exception | None = None  # the store is unreachable: the rest fail with this
        for i, (key, body) in enumerate(objects):
            if down is not None:
                results[i] = down
                continue
            host, path = self._address(bucket, key)
            signed = {"host": host, **(headers or {}), **(each[i] if each else {})}
            payload = payloads[i] = payloads[i] or hashlib.sha256(body).hexdigest()
            self.signer.sign("PUT", path, "", signed, payload, creds, amz_date)
            pool = self._pool(host)
            try:
                conn, reused = pool.take(fresh=False)
            except _Unreachable as exc:
                results[i] = down = exc
                continue
            try:
                conn.send("PUT", path, signed, body, progress)
            except (ProtocolError, OSError) as exc:
                down = failed(i, conn, reused, exc) or down
                continue
            sent.append((i, pool, conn, reused))
        for i, pool, conn, reused in sent:  # past the deadline, only replies already here
            try:
                status, reply, data = conn.receive("PUT", progress.left())
            except (ProtocolError, OSError) as exc:
                down = failed(i, conn, reused, exc) or down
                continue
            progress.moved()
            if conn.open:
                pool.give(conn)
            if status >= 300:
                failure = _failure(status, data, reply)
                results[i] = failure
                if failure.retryable:
                    retry.append((i, 2))
            elif replies is not None:
                replies[i].update(reply)
        for i, attempt in sorted(retry):
            if down is not None:
                results[i] = down
                continue
            if attempt > self.max_attempts:
                continue  # its failure stands
            key, body = objects[i]
            more = {**(headers or {}), **(each[i] if each else {})}
            got = replies[i] if replies is not None else None
            try:
                self.request(
                    "PUT", bucket, key, body=body, headers=more, attempt=attempt, reply=got,
                    sha256=payloads[i],
                )  # fmt: skip
                results[i] = None
            except (_Unreachable, _Failed, _NoCredentials) as exc:
                results[i] = exc
        return results

    def _address(self, bucket: str, key: str) -> tuple[str, str]:
        """(Host header, encoded path): path-style, or virtual-hosted where DNS and TLS allow
        (a dotted bucket name would not match the wildcard certificate)."""
        if self.path_style or (self._https and "." in bucket):
            path = f"{self._base}/{bucket}/{key}" if key else f"{self._base}/{bucket}"
            return self._host, uri_path(path)
        return f"{bucket}.{self._host}", uri_path(f"{self._base}/{key}")

    def _pool(self, host: str) -> _Pool:
        pool = self._pools.get(host)
        if pool is None:
            with self._lock:
                pool = self._pools.get(host)
                if pool is None:
                    scheme = "https" if self._https else "http"
                    name, port = address(host, self._https)
                    try:
                        proxy = proxy_for(scheme, name, port)
                    except StorageError as exc:  # a malformed proxy variable
                        raise _Unreachable(str(exc)) from None
                    pool = self._pools[host] = _Pool(host, self._https, self._ca_bundle, proxy)
        return pool

    def _credentials(self) -> Credentials:
        """The current credentials; a refreshing provider (role, SSO) renews them itself."""
        try:
            creds = self._current_credentials()
        except awsconfig.CredentialsError as exc:  # a broken profile, an expired SSO token
            raise _NoCredentials(str(exc)) from None
        if creds is None:
            raise _NoCredentials()
        return creds


class _Pool:
    """Idle keep-alive connections to one host (through ``proxy`` if set), shared by all
    threads."""

    def __init__(
        self, host: str, https: bool, ca_bundle: str | None, proxy: Proxy | None = None
    ) -> None:
        self.host = host
        self.proxy = proxy
        self._idle: list[Connection] = []
        self._lock = threading.Lock()
        self._context: Any = None
        if https:
            import ssl  # only for https endpoints: plain http never loads OpenSSL's tables

            try:
                self._context = ssl.create_default_context(cafile=ca_bundle)
            except (OSError, ssl.SSLError) as exc:
                raise StorageError(
                    f"cannot use the CA bundle {ca_bundle} (AWS_CA_BUNDLE or ca_bundle in the "
                    f"AWS config): {exc.strerror or exc}; point it at a PEM file of CA "
                    "certificates"
                ) from None

    def exchange(
        self, method: str, target: str, body: Body, headers: dict[str, str]
    ) -> tuple[int, bytes, dict[str, str]]:
        """One request: status, whole body and the reply's headers.

        A kept-alive connection the server has closed meanwhile fails on first use; the request
        then goes once more on a new one (every request here is idempotent)."""
        for fresh in (False, True):
            conn, reused = self.take(fresh)
            try:
                status, reply, data = conn.exchange(method, target, headers, body)
            except TimeoutError as exc:
                conn.close()
                raise _no_reply(exc) from None
            except (ProtocolError, OSError) as exc:
                conn.close()
                if reused and _closed(exc):
                    continue
                raise _lost(exc) from None
            if conn.open:
                self.give(conn)
            return status, data, reply
        raise AssertionError("unreachable")  # the fresh connection's attempt always returns

    def take(self, fresh: bool) -> tuple[Connection, bool]:
        with self._lock:
            if fresh:  # the idle ones are as old as the one that just failed
                idle, self._idle = self._idle, []
            elif self._idle:
                return self._idle.pop(), True
            else:
                idle = []
        for conn in idle:
            conn.close()
        return self._connect(), False

    def give(self, conn: Connection) -> None:
        with self._lock:
            if len(self._idle) < MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    def _connect(self) -> Connection:
        via = f" via proxy {self.proxy.url}" if self.proxy else ""
        check = "the proxy (HTTPS_PROXY, HTTP_PROXY, NO_PROXY)" if via else "the endpoint URL"
        try:
            return Connection(self.host, self._context, CONNECT_TIMEOUT, READ_TIMEOUT, self.proxy)
        except TimeoutError:
            raise _Unreachable(
                f"no connection{via} within {CONNECT_TIMEOUT}s; check {check} and network"
            ) from None
        except ProxyRefused as exc:
            raise _Unreachable(f"{exc}{via}; check {check}") from None
        except (ProtocolError, OSError) as exc:
            if self._context is not None and type(exc).__module__ == "ssl":
                raise _Unreachable(
                    f"TLS handshake failed ({_reason(exc)}); check the endpoint URL, "
                    "or point AWS_CA_BUNDLE at the CA that signed its certificate"
                ) from None
            if self.proxy is not None:
                raise _Unreachable(f"{_reason(exc)}{via}; check {check}") from None
            raise _Unreachable(
                f"{_reason(exc)}; check the endpoint URL and that the server is running"
            ) from None


def _no_reply(exc: TimeoutError) -> _Unreachable:
    if isinstance(exc, Stalled):
        return _Unreachable(
            f"sending stalled ({exc}); the server, or a proxy on the way, stopped reading"
        )
    return _Unreachable(f"no response within {READ_TIMEOUT}s; the server is up but not answering")


def _sha256(body: Body) -> str:
    if isinstance(body, (bytes, memoryview)):
        return hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256
    digest = hashlib.sha256()
    for chunk in body:
        digest.update(chunk)
    return digest.hexdigest()


def _failure(status: int, body: bytes, reply: Mapping[str, str]) -> _Failed:
    """The error a reply describes; its Date header tells how far off our clock is."""
    server_time = _http_date(reply.get("date", ""))
    return _Failed(
        status,
        *_error_fields(status, body),
        reply.get("x-amz-bucket-region", ""),
        None if server_time is None else server_time - _clock(),
    )


def _http_date(text: str) -> float | None:
    """Unix time of an HTTP date (``Sun, 06 Nov 1994 08:49:37 GMT``), None if it is not one
    (parsed here: ``email.utils`` would import the email package)."""
    try:
        _, day, month, year, clock, _ = text.split()
        hour, minute, second = (int(n) for n in clock.split(":"))
        fields = (int(year), _MONTHS.index(month.lower()) + 1, int(day), hour, minute, second)
    except ValueError:
        return None
    return float(calendar.timegm((*fields, 0, 0, 0)))


def _skewed(exc: _Failed) -> str:
    if exc.skew is None:
        off = "off by more than the store allows"
    else:
        side = "behind" if exc.skew > 0 else "ahead of"
        off = f"off by {_duration(exc.skew)} ({side} the store's)"
    return (
        f"S3 refused the request ({exc.code}): this machine's clock is {off}; fix the clock (NTP)"
    )


def _duration(seconds: float) -> str:
    """'2 h 5 min', '20 min', '45 s' (a Date header has whole seconds)."""
    whole = round(abs(seconds))
    if whole < 60:
        return f"{whole} s"
    hours, minutes = divmod(round(whole / 60), 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"


def _lost(exc: BaseException) -> _Unreachable:
    """A request that got no reply because its connection failed."""
    return _Unreachable(
        "connection closed before a response; is the server overloaded or restarting?"
        if _closed(exc)
        else f"{_reason(exc)}; check the endpoint URL and that the server is running"
    )


def _closed(exc: BaseException) -> bool:
    """The peer dropped the connection (rather than refusing or timing out)."""
    return isinstance(
        exc,
        Disconnected | ConnectionResetError | ConnectionAbortedError | BrokenPipeError,
    )


def _reason(exc: BaseException) -> str:
    """'connection refused', 'name or service not known', ...: the OS's words, lower case."""
    text = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
    return str(text).splitlines()[0].strip().lower() if str(text).strip() else type(exc).__name__


def _error_fields(status: int, body: bytes) -> tuple[str, str]:
    """(code, message) of an S3 error reply; error bodies are tiny, so a regex will do."""
    code = _CODE.search(body)
    message = _MESSAGE.search(body)
    return (
        code[1].decode(errors="replace") if code else f"HTTP {status}",
        (message[1].decode(errors="replace") if message else "") or _phrase(status),
    )


def _xml_text(text: str) -> str:
    """``text`` as XML character data (xml.sax.saxutils.escape would import urllib.request,
    http.client and ssl)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _phrase(status: int) -> str:
    """'Not Found', 'Service Unavailable', ...; 'error' for a status HTTP does not define."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "error"


def _clock() -> float:
    """This machine's time, which requests are signed with (tests shift it)."""
    return time.time()


def _amz_date() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(_clock()))


def _aws_endpoint(region: str) -> str:
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"https://s3.{region}.{suffix}"


def _is_aws(endpoint_url: str) -> bool:
    host = urlsplit(endpoint_url).hostname or ""
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn"))


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return None


def url_location(url: str) -> tuple[str, str]:
    """(bucket, key prefix) of an ``s3://`` replica URL, checked as S3 would check them."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        raise bad_url(url, "credentials do not belong in the URL, set AWS_ACCESS_KEY_ID")
    if parts.query or parts.fragment:
        raise bad_url(url, "s3 URLs take no query or fragment")
    bucket = check_bucket(url, parts.netloc)
    prefix = parts.path.strip("/")
    if prefix:
        try:
            check_key(prefix)
        except ValueError:
            raise bad_url(url, f"invalid key prefix '{prefix}'") from None
    return bucket, prefix


def check_bucket(url: str, bucket: str) -> str:
    """Reject names S3 would refuse, so a typo fails at configuration and not on first upload."""
    if not bucket:
        raise bad_url(url, "no bucket name")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket or _is_ip(bucket):
        raise bad_url(
            url,
            f"'{bucket}' is not a valid S3 bucket name "
            "(3-63 lowercase letters, digits, '.' or '-')",
        )
    return bucket


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]  # S3 replies are namespaced, some compatible servers' not


def _first_parts(
    parts: Iterator[transfer.Part], threshold: int
) -> tuple[list[transfer.Part], int]:
    """Parts from the start of a stream until they reach ``threshold`` bytes or the stream
    ends, and how many bytes they hold (under ``threshold``: the whole stream)."""
    held: list[transfer.Part] = []
    total = 0
    while total < threshold and (part := next(parts, None)) is not None:
        held.append(part)
        total += body_length(part)
    return held, total


def _handed_on(held: list[transfer.Part]) -> Iterator[transfer.Part]:
    """``held``'s parts in order, each dropped from the list as it is handed on: a part
    sent is freed, not kept by the list until the whole upload ends."""
    held.reverse()
    while held:
        yield held.pop()


class _RangeNotSatisfiable(StorageError):
    """A ranged GET starting at or past the object's end (416)."""


class S3ReplicaClient:
    """Objects live at ``s3://bucket/prefix/<key>``; the prefix never shows in keys.

    Streams (:meth:`put_stream`) of ``multipart_threshold`` bytes or more go up as multipart
    uploads of ``part_size`` parts, ``transfer_workers`` parts at once; smaller ones in one
    PUT.  A stream holds at most about ``max(multipart_threshold, (transfer_workers + 1) *
    part_size)`` bytes in memory.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        path_style: bool | None = None,
        part_size: int = transfer.PART_SIZE,
        multipart_threshold: int = transfer.MULTIPART_THRESHOLD,
        transfer_workers: int = transfer.TRANSFER_WORKERS,
    ) -> None:
        if part_size < transfer.MIN_PART_SIZE:
            raise StorageError(
                f"part_size {part_size} is below S3's minimum part size: "
                f"use at least {transfer.MIN_PART_SIZE} (5 MiB)"
            )
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self.service = shared_service(endpoint_url, region, path_style)
        self.requests = 0
        self.create_only = False
        self.part_size = part_size
        self.multipart_threshold = multipart_threshold
        self.transfer_workers = max(1, transfer_workers)
        self._root = prefix + "/" if prefix else ""
        self._lock = threading.Lock()

    def put(self, key: str, data: bytes | memoryview) -> None:
        full = self._root + check_key(key)
        headers = CREATE_ONLY if self.create_only else None
        self._call("put", f"{self.url}/{key}", "PUT", full, body=data, headers=headers)

    def get_tagged(self, key: str) -> tuple[bytes, str]:
        full = self._root + check_key(key)
        reply: dict[str, str] = {}
        data = self._call("get", f"{self.url}/{key}", "GET", full, reply=reply)
        return data, reply.get("etag", "")

    def swap(self, key: str, data: bytes, tag: str | None) -> str:
        full = self._root + check_key(key)
        headers = CREATE_ONLY if tag is None else {"if-match": tag}
        reply: dict[str, str] = {}
        self._call("put", f"{self.url}/{key}", "PUT", full, body=data, headers=headers, reply=reply)
        return reply.get("etag") or self.get_tagged(key)[1]

    def swap_many(self, items: Sequence[tuple[str, bytes, str | None]]) -> list[str | Exception]:
        """Several swaps at once (see :func:`storage.swap_all`): per (key, data, tag), the
        new version's tag, or the StorageError its swap would raise."""
        for key, _, _ in items:
            check_key(key)
        with self._lock:
            self.requests += len(items)
        conditions = [CREATE_ONLY if tag is None else {"if-match": tag} for _, _, tag in items]
        replies: list[dict[str, str]] = [{} for _ in items]
        errors = self.service.put_many(
            self.bucket, [(self._root + key, data) for key, data, _ in items], each=conditions,
            replies=replies,
        )  # fmt: skip
        out: list[str | Exception] = []
        for (key, _, _), error, reply in zip(items, errors, replies, strict=True):
            if error is not None:
                out.append(self._error("put", f"{self.url}/{key}", error))
                continue
            try:
                out.append(reply.get("etag") or self.get_tagged(key)[1])
            except StorageError as exc:
                out.append(exc)
        return out

    def put_many(
        self,
        objects: Sequence[tuple[str, bytes | memoryview]],
        sha256: Sequence[str | None] | None = None,
    ) -> list[Exception | None]:
        """Several PUTs at once (see :func:`storage.put_all`); per object None or the
        StorageError its put would raise."""
        results: list[Exception | None] = [None] * len(objects)
        valid: list[int] = []
        for i, (key, _) in enumerate(objects):
            try:
                check_key(key)
                valid.append(i)
            except ValueError as exc:  # as put would raise it, for this object alone
                results[i] = exc
        with self._lock:
            self.requests += len(valid)
        errors = self.service.put_many(
            self.bucket,
            [(self._root + objects[i][0], objects[i][1]) for i in valid],
            CREATE_ONLY if self.create_only else None,
            sha256=[sha256[i] for i in valid] if sha256 else None,
        )
        for i, error in zip(valid, errors, strict=True):
            if error is not None:
                results[i] = self._error("put", f"{self.url}/{objects[i][0]}", error)
        return results

    def get(self, key: str) -> bytes:
        full = self._root + check_key(key)
        return self._call("get", f"{self.url}/{key}", "GET", full)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        full = self._root + check_key(key)
        if start < 0 or length < 0:
            raise ValueError(f"invalid range: start {start}, length {length}")
        if length == 0:
            return b""
        reply: dict[str, str] = {}
        try:
            data = self._call(
                "get",
                f"{self.url}/{key}",
                "GET",
                full,
                headers={"range": f"bytes={start}-{start + length - 1}"},
                reply=reply,
            )
        except _RangeNotSatisfiable:
            return b""
        if "content-range" not in reply:  # a store that ignores Range sends it all
            return data[start : start + length]
        return data

    def head(self, key: str) -> ObjectInfo:
        full = self._root + check_key(key)
        reply: dict[str, str] = {}
        self._call("get", f"{self.url}/{key}", "HEAD", full, reply=reply)
        try:
            size = int(reply["content-length"])
        except (KeyError, ValueError):
            raise StorageError(
                f"S3 head {self.url}/{key} failed at {self.service.endpoint_url}: "
                "reply without a Content-Length"
            ) from None
        return ObjectInfo(key, size, _http_date(reply.get("last-modified", "")) or 0.0)

    def put_stream(self, key: str, source: transfer.Source, size_hint: int | None = None) -> int:
        """See :meth:`ReplicaClient.put_stream`.  Create-only (``If-None-Match: *``) applies
        to the PUT or to CompleteMultipartUpload, which AWS and SeaweedFS both check; a
        failed multipart upload is aborted, so none of its parts stays billed."""
        full = self._root + check_key(key)
        parts = transfer.pieces(source, transfer.part_size_for(self.part_size, size_hint))
        held, total = _first_parts(parts, self.multipart_threshold)
        if total < self.multipart_threshold:
            headers = CREATE_ONLY if self.create_only else None
            body = [piece for part in held for piece in part]
            self._call("put", f"{self.url}/{key}", "PUT", full, body=body, headers=headers)
            return total
        return self._multipart(key, full, itertools.chain(_handed_on(held), parts))

    def _multipart(self, key: str, full: str, parts: Iterator[transfer.Part]) -> int:
        """CreateMultipartUpload, the parts (a few at once), CompleteMultipartUpload; abort
        on any failure."""
        target = f"{self.url}/{key}"
        created = self._call("put", target, "POST", full, query={"uploads": ""})
        found = _UPLOAD_ID.search(created)
        if not found:
            raise StorageError(
                f"S3 put {target} failed at {self.service.endpoint_url}: "
                "CreateMultipartUpload reply without an UploadId"
            )
        upload_id = found[1].decode()
        with _uploading_lock:
            _uploading.add(upload_id)
        sizes: list[int] = []

        def upload(numbered: tuple[int, transfer.Part]) -> str:
            number, data = numbered
            size = body_length(data)
            if number > transfer.MAX_PARTS:
                raise StorageError(
                    f"S3 put {target}: more than {transfer.MAX_PARTS} parts of "
                    f"{size} bytes; pass size_hint (or a larger part_size)"
                )
            reply: dict[str, str] = {}
            query = {"partNumber": str(number), "uploadId": upload_id}
            self._call("put", target, "PUT", full, query=query, body=data, reply=reply)
            sizes.append(size)
            return reply.get("etag", "")

        try:
            etags = list(transfer.ordered_map(upload, enumerate(parts, 1), self.transfer_workers))
            total = sum(sizes)
            self._complete(key, full, upload_id, etags, total)
            return total
        except BaseException:
            self._abort(full, upload_id)
            raise
        finally:
            with _uploading_lock:
                _uploading.discard(upload_id)

    def _complete(self, key: str, full: str, upload_id: str, etags: list[str], total: int) -> None:
        target = f"{self.url}/{key}"
        body = (
            "<CompleteMultipartUpload>"
            + "".join(
                f"<Part><PartNumber>{n}</PartNumber><ETag>{_xml_text(tag)}</ETag></Part>"
                for n, tag in enumerate(etags, 1)
            )
            + "</CompleteMultipartUpload>"
        ).encode()
        headers = {"content-type": "application/xml"}
        if self.create_only:
            headers.update(CREATE_ONLY)
        try:
            reply = self._call(
                "put", target, "POST", full, query={"uploadId": upload_id}, body=body,
                headers=headers,
            )  # fmt: skip
        except ObjectNotFound:
            # NoSuchUpload: a retry after a reply that got lost finds it completed.
            with contextlib.suppress(ObjectNotFound):
                if self.head(key).size == total:
                    return
            raise StorageError(
                f"S3 put {target} failed at {self.service.endpoint_url}: the multipart "
                "upload was gone before it completed (aborted by another process?)"
            ) from None
        if b"<Error>" in reply:  # S3 may report a failed completion in a 200 reply
            raise self._error("put", target, _Failed(200, *_error_fields(200, reply)))

    def _abort(self, full: str, upload_id: str) -> None:
        """AbortMultipartUpload, as a best effort: an upload this misses stays until an
        :meth:`abort_stale_uploads` pass."""
        with contextlib.suppress(StorageError):
            self._call("put", full, "DELETE", full, query={"uploadId": upload_id})

    def abort_stale_uploads(self, prefix: str, older_than: float) -> int:
        cutoff = time.time() - older_than
        stale = [
            (key, upload_id)
            for key, upload_id, started in self._uploads(prefix)
            if started < cutoff
        ]
        with _uploading_lock:
            stale = [(key, upload_id) for key, upload_id in stale if upload_id not in _uploading]
        for key, upload_id in stale:
            self._abort(self._root + key, upload_id)
        return len(stale)

    def _uploads(self, prefix: str) -> Iterator[tuple[str, str, float]]:
        """ListMultipartUploads: (key, upload id, start time) of the unfinished uploads."""
        query = {"uploads": "", "prefix": self._root + check_prefix(prefix)}
        yield from self._listing(
            prefix,
            query,
            "ListMultipartUploads",
            "Upload",
            lambda f: (f["Key"], f["UploadId"], datetime.fromisoformat(f["Initiated"]).timestamp()),
            {"NextKeyMarker": "key-marker", "NextUploadIdMarker": "upload-id-marker"},
        )

    def list(self, prefix: str) -> list[ObjectInfo]:
        query = {"list-type": "2", "prefix": self._root + check_prefix(prefix)}
        found = list(
            self._listing(
                prefix,
                query,
                "ListObjectsV2",
                "Contents",
                lambda f: ObjectInfo(
                    f["Key"], int(f["Size"]), datetime.fromisoformat(f["LastModified"]).timestamp()
                ),
                {"NextContinuationToken": "continuation-token"},
            )
        )
        found.sort(key=lambda info: info.key)
        return found

    def _listing(
        self,
        prefix: str,
        query: dict[str, str],
        what: str,
        entry: str,
        make: Callable[[dict[str, str]], T],
        markers: Mapping[str, str],
    ) -> Iterator[T]:
        """``make`` of each ``entry`` element (a dict of its fields, its Key decoded and
        relative to the replica root) of a paged listing; ``markers`` maps the reply fields
        that say where the next page starts to the query parameters that ask for it.

        encoding-type=url, as botocore sends it: keys come back percent-encoded, so any key
        survives XML (which cannot carry some characters a key may hold)."""
        query = {**query, "encoding-type": "url"}
        target = f"{self.url}/{prefix}"
        strip = len(self._root)
        while True:
            page = self._call("list", target, "GET", "", query=query)
            try:
                root = ElementTree.fromstring(page)
                top = {_local(node.tag): node.text or "" for node in root}
                items = []
                for node in root:
                    if _local(node.tag) == entry:
                        fields = {_local(f.tag): f.text or "" for f in node}
                        key = fields["Key"]
                        key = unquote_plus(key) if top.get("EncodingType") == "url" else key
                        fields["Key"] = key[strip:]
                        items.append(make(fields))
            except (ElementTree.ParseError, KeyError, ValueError) as exc:
                raise StorageError(
                    f"S3 list {target} failed at {self.service.endpoint_url}: "
                    f"malformed {what} reply ({exc})"
                ) from None
            yield from items
            if top.get("IsTruncated") != "true":
                return
            for field, parameter in markers.items():
                if not top.get(field):
                    raise StorageError(
                        f"S3 list {target} failed at {self.service.endpoint_url}: "
                        "truncated listing without a continuation token"
                    )
                query[parameter] = top[field]

    def delete(self, keys: Iterable[str]) -> None:
        full = [self._root + check_key(key) for key in keys]  # validate all before deleting any
        for start in range(0, len(full), DELETE_BATCH):
            batch = full[start : start + DELETE_BATCH]
            body = (
                "<Delete><Quiet>true</Quiet>"
                + "".join(f"<Object><Key>{_xml_text(k)}</Key></Object>" for k in batch)
                + "</Delete>"
            ).encode()
            # DeleteObjects is the one call S3 refuses without a Content-MD5.
            md5 = base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()
            reply = self._call(
                "delete",
                f"of {len(batch)} objects under {self.url}",
                "POST",
                "",
                query={"delete": ""},
                body=body,
                headers={"content-md5": md5, "content-type": "application/xml"},
            )
            self._check_deleted(reply)

    def _check_deleted(self, reply: bytes) -> None:
        """DeleteObjects answers 200 and lists per-key failures; missing keys are fine."""
        try:
            errors = [
                {_local(f.tag): f.text or "" for f in node}
                for node in ElementTree.fromstring(reply)
                if _local(node.tag) == "Error"
            ]
        except ElementTree.ParseError as exc:
            raise StorageError(
                f"S3 delete under {self.url} failed at {self.service.endpoint_url}: "
                f"malformed DeleteObjects reply ({exc})"
            ) from None
        failed = [e for e in errors if e.get("Code") != "NoSuchKey"]
        if failed:
            err = failed[0]
            if err.get("Code") in _DENIED:
                raise StorageError(self._denied())
            raise StorageError(
                f"S3 delete of s3://{self.bucket}/{err.get('Key')} failed: "
                f"{err.get('Code')}: {err.get('Message')}"
            )

    def _call(
        self,
        op: str,
        target: str,
        method: str,
        key: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Body = b"",
        headers: Mapping[str, str] | None = None,
        reply: dict[str, str] | None = None,
    ) -> bytes:
        """One counted request, with failures turned into one-line messages."""
        with self._lock:
            self.requests += 1
        try:
            return self.service.request(method, self.bucket, key, query, body, headers, reply=reply)
        except (_Unreachable, _Failed, _NoCredentials) as exc:
            raise self._error(op, target, exc) from None

    def _error(self, op: str, target: str, exc: Exception) -> StorageError:
        """Say what failed and what to do."""
        endpoint = self.service.endpoint_url
        if isinstance(exc, _NoCredentials):
            if str(exc):  # botocore's words: they name the profile or file, never a secret
                return StorageError(f"cannot get AWS credentials: {exc}")
            return StorageError(
                "no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                "or an AWS profile"
            )
        if isinstance(exc, _Unreachable):
            return StorageError(f"cannot reach {endpoint}: {exc}")
        assert isinstance(exc, _Failed)
        if exc.bucket_region and exc.bucket_region != self.service.region:
            return StorageError(
                f"bucket '{self.bucket}' is in region {exc.bucket_region}, not "
                f"{self.service.region}: set AWS_REGION={exc.bucket_region} (or region=)"
            )
        if exc.code == "NoSuchBucket":
            return StorageError(
                f"bucket '{self.bucket}' does not exist at {endpoint}: "
                "create it or fix the replica URL"
            )
        if exc.code in ("NoSuchKey", "NoSuchUpload") or (op == "get" and exc.status == 404):
            return ObjectNotFound(f"object {target} does not exist")
        if exc.status == 416 or exc.code == "InvalidRange":
            return _RangeNotSatisfiable(f"S3 get {target}: range past the object's end")
        if exc.status == 412 or exc.code == "PreconditionFailed":
            return Conflict(f"S3 {op} {target}: the object exists or changed (412)")
        if exc.status == 501 or exc.code == "NotImplemented":
            return Unsupported(f"S3 {op} {target}: not implemented by {endpoint} ({exc.code})")
        if exc.code == "RequestTimeTooSkewed" or (
            exc.status == 403 and exc.skew is not None and abs(exc.skew) >= SKEW_SUSPECT
        ):
            return StorageError(_skewed(exc))
        if exc.code in _DENIED or exc.status == 403:
            return StorageError(self._denied())
        if exc.status == 407:
            return StorageError(
                f"S3 {op} {target}: the proxy wants credentials (407); put them in the proxy "
                "URL: HTTPS_PROXY/HTTP_PROXY=http://user:password@host:port"
            )
        message = exc.message.splitlines()[0] if exc.message else ""
        return StorageError(f"S3 {op} {target} failed at {endpoint}: {exc.code}: {message}")

    def _denied(self) -> str:
        return f"access denied to {self.url}: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
