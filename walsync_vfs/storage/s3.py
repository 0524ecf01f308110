"""S3 replica backend (AWS or any S3-compatible server), built on botocore.

Endpoint, region and credentials come from boto3's own conventions (``AWS_ENDPOINT_URL_S3``,
``AWS_ACCESS_KEY_ID``, profiles, instance roles, ...), so walsync needs no settings of its own
and behaves like every other AWS tool on the machine.  Those conventions live in botocore;
boto3's session adds only resources and s3transfer's upload helpers, which walsync does not
use and which cost a restore about 0.1 s to import and hook in.
"""

from __future__ import annotations

import ipaddress
import os
import re
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import botocore.session
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectionError,
    ConnectTimeoutError,
    NoCredentialsError,
    ReadTimeoutError,
)

from walsync_vfs.storage import (
    ObjectInfo,
    ObjectNotFound,
    StorageError,
    bad_url,
    check_key,
    check_prefix,
)

CONNECT_TIMEOUT = 5
READ_TIMEOUT = 15  # seconds; a frozen store must surface as an error, not a hang
DELETE_BATCH = 1000  # the DeleteObjects limit
ENV_PATH_STYLE = "WALSYNC_S3_PATH_STYLE"

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\"()]+)")

# One client per process and endpoint: a botocore client owns a connection pool and resolves
# credentials once, so sharing it across databases keeps sockets and credential lookups flat.
_clients: dict[tuple[str | None, str | None, bool | None], BaseClient] = {}
_clients_lock = threading.Lock()

T = TypeVar("T")


def shared_client(
    endpoint_url: str | None = None, region: str | None = None, path_style: bool | None = None
) -> BaseClient:
    """The process-wide S3 client for these options, created on first use.

    ``path_style=None`` defers to ``$WALSYNC_S3_PATH_STYLE`` (1/true or 0/false), and failing
    that uses path-style for any endpoint that is not AWS's own.
    """
    if path_style is None:
        path_style = _env_flag(ENV_PATH_STYLE)
    key = (endpoint_url, region, path_style)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = _new_client(endpoint_url, region, path_style)
        return client


def _new_client(
    endpoint_url: str | None, region: str | None, path_style: bool | None
) -> BaseClient:
    session = botocore.session.Session()  # the default session is not safe to share across threads

    def make(addressing: str | None) -> BaseClient:
        config = Config(
            max_pool_connections=32,
            retries={"mode": "standard"},
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            s3={"addressing_style": addressing} if addressing else None,
        )
        return session.create_client(
            "s3", endpoint_url=endpoint_url, region_name=region, config=config
        )

    if path_style is not None:
        return make("path" if path_style else "virtual")
    client = make(None)
    # S3-compatible servers (MinIO, SeaweedFS, ...) rarely have wildcard DNS for bucket
    # subdomains, so any endpoint that is not AWS's own gets path-style addressing.
    if _is_aws(client.meta.endpoint_url):
        return client
    return make("path")


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


class S3ReplicaClient:
    """Objects live at ``s3://bucket/prefix/<key>``; the prefix never shows in keys."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        path_style: bool | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self.client = shared_client(endpoint_url, region, path_style)
        self.requests = 0
        self._root = prefix + "/" if prefix else ""
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> S3ReplicaClient:
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
        return cls(bucket, prefix, **options)

    def put(self, key: str, data: bytes) -> None:
        full = self._root + check_key(key)
        self._call(
            "put",
            f"{self.url}/{key}",
            lambda: self.client.put_object(Bucket=self.bucket, Key=full, Body=data),
        )

    def get(self, key: str) -> bytes:
        full = self._root + check_key(key)

        def fetch() -> bytes:
            # The body streams after the headers arrive, so its errors must be mapped too.
            return self.client.get_object(Bucket=self.bucket, Key=full)["Body"].read()

        return self._call("get", f"{self.url}/{key}", fetch)

    def list(self, prefix: str) -> list[ObjectInfo]:
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._root + check_prefix(prefix)}
        found: list[ObjectInfo] = []
        strip = len(self._root)
        while True:
            page = self._call(
                "list", f"{self.url}/{prefix}", lambda: self.client.list_objects_v2(**args)
            )
            found.extend(
                ObjectInfo(o["Key"][strip:], o["Size"], o["LastModified"].timestamp())
                for o in page.get("Contents", ())
            )
            if not page.get("IsTruncated"):
                break
            args["ContinuationToken"] = page["NextContinuationToken"]
        found.sort(key=lambda info: info.key)
        return found

    def delete(self, keys: Iterable[str]) -> None:
        full = [self._root + check_key(key) for key in keys]  # validate all before deleting any
        for start in range(0, len(full), DELETE_BATCH):
            batch = [{"Key": k} for k in full[start : start + DELETE_BATCH]]
            reply = self._call(
                "delete",
                f"of {len(batch)} objects under {self.url}",
                lambda batch=batch: self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                ),
            )
            failed = [e for e in reply.get("Errors", ()) if e.get("Code") != "NoSuchKey"]
            if failed:
                err = failed[0]
                if err.get("Code") in _DENIED:
                    raise StorageError(self._denied())
                raise StorageError(
                    f"S3 delete of s3://{self.bucket}/{err.get('Key')} failed: "
                    f"{err.get('Code')}: {err.get('Message')}"
                )

    def _call(self, op: str, target: str, fn: Callable[[], T]) -> T:
        """Run one request, counted, with botocore's errors turned into one-line messages."""
        with self._lock:
            self.requests += 1
        try:
            return fn()
        except (ClientError, BotoCoreError) as exc:
            raise self._error(op, target, exc) from exc

    def _error(self, op: str, target: str, exc: Exception) -> StorageError:
        """Say what failed and what to do; botocore's own text is often neither."""
        endpoint = self.client.meta.endpoint_url
        if isinstance(exc, NoCredentialsError):
            return StorageError(
                "no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                "or an AWS profile"
            )
        if isinstance(exc, ConnectionError | ReadTimeoutError | ConnectionClosedError):
            return StorageError(f"cannot reach {endpoint}: {_unreachable_reason(exc)}")
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                return StorageError(
                    f"bucket '{self.bucket}' does not exist at {endpoint}: "
                    "create it or fix the replica URL"
                )
            if code == "NoSuchKey" or (op == "get" and status == 404):
                return ObjectNotFound(f"object {target} does not exist")
            if code in _DENIED or status == 403:
                return StorageError(self._denied())
            message = str(error.get("Message") or exc).splitlines()[0]
            return StorageError(f"S3 {op} {target} failed at {endpoint}: {code}: {message}")
        return StorageError(f"S3 {op} {target} failed: {str(exc).splitlines()[0]}")

    def _denied(self) -> str:
        return f"access denied to {self.url}: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"


def _unreachable_reason(exc: BotoCoreError) -> str:
    if isinstance(exc, ConnectTimeoutError):
        return f"no connection within {CONNECT_TIMEOUT}s; check the endpoint URL and network"
    if isinstance(exc, ReadTimeoutError):
        return f"no response within {READ_TIMEOUT}s; the server is up but not answering"
    if isinstance(exc, ConnectionClosedError):
        return "connection closed before a response; is the server overloaded or restarting?"
    match = _ERRNO.search(str(getattr(exc, "kwargs", {}).get("error", exc)))
    why = match.group(1).strip().lower() if match else str(exc).splitlines()[0]
    return f"{why}; check the endpoint URL and that the server is running"
