"""Replica storage: a small object-store protocol with one module per backend.

Modelled on Litestream's ReplicaClient: the replication engine needs whole-object put/get,
a sorted listing and batch delete, and for big objects a streaming put, ranged reads and a
sweep of abandoned uploads, so every backend (a local directory, S3) fits behind the same
calls and the engine never branches on where replicas live.  :mod:`.transfer` holds what
both backends share for big objects (:func:`.transfer.read_ranges`: a parallel download).
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote, unquote, urlsplit

if TYPE_CHECKING:
    from walsync_vfs.storage.transfer import Source

__all__ = [
    "Conflict",
    "ObjectInfo",
    "ObjectNotFound",
    "ReplicaClient",
    "StorageError",
    "Unsupported",
    "check_key",
    "check_prefix",
    "open_replica",
    "redact_url",
]

_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")
ACCEPTED_FORMS = "file:///absolute/dir, a directory path, or s3://bucket/optional/prefix"


class StorageError(Exception):
    """One-line, user-facing message saying what failed and what to do.

    Never contains credentials, so callers may log or print it as is.
    """


class ObjectNotFound(StorageError):
    """The key does not exist; restore and head reads treat this as a normal outcome."""


class Conflict(StorageError):
    """A conditional write lost: the key already exists (create-only), or the object is no
    longer the version named (compare-and-swap)."""


class Unsupported(StorageError):
    """The store does not implement what the request asked for (a conditional write)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the client's root, '/'-separated
    size: int
    # Unix seconds the object was written: retention's conservative clock (an object is never
    # older than this).  Not part of identity, so listings compare by key and size.
    modified: float = field(default=0.0, compare=False)


class ReplicaClient(Protocol):
    """What the engine needs from a replica store; every call is safe from any thread."""

    url: str  # the root URL it was opened with, without credentials
    requests: int  # calls/pages sent to the store, so tests can prove idle databases cost 0
    # Every put creates its key or fails with Conflict (never overwrites): set by a writer
    # that fences (lease.py), so an old writer can never replace another's object.
    create_only: bool

    def put(self, key: str, data: bytes | memoryview) -> None:
        """Store ``data`` atomically: readers see all of it or the previous state."""
        ...

    def get(self, key: str) -> bytes:
        """Return the object's bytes; :class:`ObjectNotFound` if it does not exist."""
        ...

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix`` ("" = all), sorted by key."""
        ...

    def delete(self, keys: Iterable[str]) -> None:
        """Remove the objects; keys that do not exist are not an error."""
        ...

    def put_stream(self, key: str, source: Source, size_hint: int | None = None) -> int:
        """Store what ``source`` yields (byte chunks, or a binary file read to its end)
        without holding it in memory; returns the bytes stored.  Atomic and create-only
        like :meth:`put`.  ``size_hint``: the expected size, if known, so S3 picks parts
        big enough for its 10,000-part limit.  A failed upload leaves nothing behind but,
        after a crash, what :meth:`abort_stale_uploads` removes."""
        ...

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Up to ``length`` bytes from offset ``start``: fewer only at the object's end, b""
        from its end on; :class:`ObjectNotFound` if it does not exist."""
        ...

    def head(self, key: str) -> ObjectInfo:
        """The object's size and write time without its bytes; :class:`ObjectNotFound`."""
        ...

    def abort_stale_uploads(self, prefix: str, older_than: float) -> int:
        """Discard unfinished uploads under ``prefix`` started more than ``older_than``
        seconds ago (a crash mid-upload leaves them: S3 keeps and bills their parts), except
        this process's own; returns how many.  One listing request when there are none."""
        ...


class Swapping(Protocol):
    """Compare-and-swap on one object, for the writer lease (lease.py): both backends."""

    def get_tagged(self, key: str) -> tuple[bytes, str]:
        """The object's bytes and a tag naming this version of it."""
        ...

    def swap(self, key: str, data: bytes, tag: str | None) -> str:
        """Write ``data`` if the object is still version ``tag`` (None: if it does not
        exist), else raise :class:`Conflict`; returns the new version's tag."""
        ...


def put_all(
    client: ReplicaClient,
    objects: Sequence[tuple[str, bytes | memoryview]],
    sha256: Sequence[str | None] | None = None,
) -> list[Exception | None]:
    """PUT several objects; per object, None or the exception its put raised.  ``sha256[i]``,
    if given, is the SHA-256 (hex) of object ``i``'s bytes as its maker had it: a store that
    signs payloads then need not hash them again, and refuses bytes that differ from it.

    A backend whose requests can overlap offers ``put_many`` with this contract (S3: every
    request is sent before any reply is read); the others get one put after another.  Not
    part of :class:`ReplicaClient`: a store needs only the four calls.
    """
    many = getattr(client, "put_many", None)
    if many is not None:
        return many(objects, sha256)
    results: list[Exception | None] = []
    for key, data in objects:
        try:
            client.put(key, data)
        except Exception as exc:  # noqa: BLE001 - handed back per object
            results.append(exc)
        else:
            results.append(None)
    return results


def swap_all(
    client: Swapping, items: Sequence[tuple[str, bytes, str | None]]
) -> list[str | Exception]:
    """Several compare-and-swaps (:meth:`Swapping.swap`) of different objects: per (key,
    data, tag), the new version's tag or the exception its swap raised.  Like
    :func:`put_all`: a backend whose requests can overlap offers ``swap_many``; the others
    get one swap after another."""
    many = getattr(client, "swap_many", None)
    if many is not None:
        return many(items)  # type: ignore[no-any-return]
    results: list[str | Exception] = []
    for key, data, tag in items:
        try:
            results.append(client.swap(key, data, tag))
        except Exception as exc:  # noqa: BLE001 - handed back per object
            results.append(exc)
    return results


def stored_before(
    client: ReplicaClient, key: str, data: bytes | memoryview, error: Exception | None
) -> bool:
    """Whether a create-only PUT of ``data`` that raised ``error`` finds it stored: its key
    taken by that very object, an earlier attempt whose reply was lost (a fencing writer's
    keys are its own: no other writer's object is ever there).  An object of other bytes
    there is damaged (or planted): it is removed and the PUT counts as failed, to be sent
    again."""
    if not isinstance(error, Conflict):
        return False
    try:
        if client.get(key) == data:
            return True
        client.delete([key])
    except StorageError:
        pass  # the PUT is retried, and this looked at again
    return False


def check_key(key: str) -> str:
    """Reject keys that could escape the root or mean different objects on different backends.

    A key like ``a//b`` is one S3 object but the file ``a/b``; ``..`` or a leading ``/`` would
    leave the root directory.  Refusing them everywhere keeps both backends equivalent.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"invalid object key {key!r}: must be a non-empty string")
    if "\\" in key or "\0" in key:
        raise ValueError(f"invalid object key {key!r}: backslash and NUL are not allowed")
    if key.startswith("/"):
        raise ValueError(f"invalid object key {key!r}: must be relative (no leading '/')")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(f"invalid object key {key!r}: empty, '.' or '..' segment")
    return key


def check_prefix(prefix: str) -> str:
    """Like :func:`check_key`, but "" and a trailing '/' are allowed (listing a "directory")."""
    if prefix:
        check_key(prefix.removesuffix("/"))
    return prefix


def redact_url(url: str) -> str:
    """The URL with any ``user:secret@`` part masked, so error messages can quote it."""
    return _USERINFO.sub(r"\1***@", url)


def bad_url(url: str, reason: str) -> StorageError:
    return StorageError(f"invalid replica URL {redact_url(url)!r}: {reason}; use {ACCEPTED_FORMS}")


def replica_location(url: str) -> tuple[str, str, str]:
    """(scheme, directory or bucket, key prefix) of a replica root URL, checked without any
    I/O, so a mistyped URL fails where it was written (StorageError says what is wrong)."""
    if not isinstance(url, str) or not url.strip():
        raise bad_url(str(url), "empty")
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unbalanced '[' in the host
        raise bad_url(url, str(exc)) from None
    scheme = parts.scheme.lower()
    if scheme == "":
        return "file", os.path.abspath(url), ""
    if scheme == "file":
        path = unquote(parts.path)
        if parts.netloc or not Path(path).is_absolute():
            raise bad_url(url, "file URLs need an absolute path (three slashes)")
        if parts.query or parts.fragment:
            raise bad_url(url, "file URLs take no query or fragment")
        return "file", os.path.normpath(path), ""
    if scheme == "s3":
        from walsync_vfs.storage.s3 import url_location

        return ("s3", *url_location(url))
    raise bad_url(url, f"unsupported scheme {parts.scheme!r}")


def database_url(client: ReplicaClient, name: str) -> str:
    """The URL of database ``name`` under ``client``'s root, spelled as restore reads it: a
    file URL is percent-encoded whole, as its root already is."""
    if not client.url.startswith("file:"):
        return f"{client.url}/{name}"
    return client.url.rstrip("/") + "/" + quote(name)


def open_replica(url: str, **options: Any) -> ReplicaClient:
    """Open the replica root named by ``url``; ``options`` go to an S3 backend (see
    :func:`client_option_names`) and a file root, which takes none, ignores them: one set of
    options serves the roots of either kind a process replicates to.  Backends are imported
    lazily so file-only users never load botocore."""
    scheme, where, prefix = replica_location(url)
    if scheme == "file":
        from walsync_vfs.storage.file import FileReplicaClient

        return FileReplicaClient(where)
    from walsync_vfs.storage.s3 import S3ReplicaClient

    return S3ReplicaClient(where, prefix, **options)


def client_option_names() -> list[str]:
    """The options :func:`open_replica` takes (an S3 client's keyword arguments)."""
    from walsync_vfs.storage.s3 import S3ReplicaClient

    parameters = inspect.signature(S3ReplicaClient).parameters.values()
    return sorted(p.name for p in parameters if p.kind is p.KEYWORD_ONLY)
