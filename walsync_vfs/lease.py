"""The writer lease: at most one replicator per database name in a store, fenced by epochs.

A lease object ``.walsync-lease/<name>`` names its holder (epoch, host, pid, database path) and
when it expires; it changes only by compare-and-swap (create-only when absent, else ``If-Match``
its version), so two writers can never both think they acquired it. Every acquisition takes a
higher epoch, and every data object's key carries its writer's epoch and is written create-only,
so a holder that was paused past its lease and wakes up cannot overwrite the new holder's
objects; readers ignore what it writes after the takeover (catalog.leftovers).

Clocks: a lease is expired once the wall clock passes its ``expires``; the holder stops
uploading well before that by its own monotonic clock (:meth:`Lease.valid`), so hosts' clocks
need only agree to within a fraction of the lease time."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from walsync_vfs import format, storage
from walsync_vfs.errors import ReplicationError

ENV_HOST_ID = "WALSYNC_HOST_ID"
LEASE_TIME = 15.0  # default seconds a lease lasts without renewal
VALID_FRACTION = 0.7  # the holder uploads only within this part of the lease after a renewal
RENEW_FRACTION = 1 / 3  # renew when this part of the lease has passed
SWAP_ATTEMPTS = 3  # reads and swaps of the lease object before a busy lease counts as refused
PROBE_KEY = ".walsync-conditional-probe"  # not a key of ours: foreign files are ignored


def host_id() -> str:
    """Who this machine is in a lease: ``$WALSYNC_HOST_ID``, else the host name."""
    return os.environ.get(ENV_HOST_ID) or socket.gethostname()


@dataclass(frozen=True)
class Holder:
    """The content of a lease object."""

    epoch: int
    host: str
    pid: int
    path: str
    expires: float  # Unix seconds; 0 = released
    token: str  # random per acquisition: tells our own write from another's

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, database {self.path}"

    def encode(self) -> bytes:
        return json.dumps(vars(self), sort_keys=True).encode()  # its fields: asdict, faster

    @classmethod
    def decode(cls, data: bytes) -> Holder:
        try:
            fields = json.loads(data)
            return cls(**{k: fields[k] for k in cls.__dataclass_fields__})
        except (ValueError, TypeError, KeyError):
            return UNREADABLE


# A lease object that cannot be decoded: treated as expired, and its epoch as unknown.
UNREADABLE = Holder(0, "?", 0, "?", 0.0, "")


class Refused(ReplicationError):
    """Another writer holds the lease of this database name."""

    def __init__(self, path: str, name: str, url: str, holder: Holder) -> None:
        super().__init__(
            f"{path}: replica {url}/{name} is written by another writer "
            f"({holder.describe()}); not replicating until its lease ends"
        )
        self.holder = holder


class Unfenceable(ReplicationError):
    """The store cannot do conditional writes, so writers cannot be fenced."""


def check_conditional(client: storage.ReplicaClient) -> None:
    """Refuse a store that ignores create-only writes (an old MinIO, some S3-compatible
    servers): a second create-only PUT of one key must fail.  Once per client."""
    if getattr(client, "conditional_checked", False):
        return
    swapping: storage.Swapping = client  # type: ignore[assignment]
    key = f"{PROBE_KEY}-{secrets.token_hex(6)}"
    try:
        swapping.swap(key, b"probe", None)
        try:
            swapping.swap(key, b"probe", None)
        except storage.Conflict:
            client.conditional_checked = True  # type: ignore[attr-defined]
            return
    except storage.Conflict:  # pragma: no cover - a fresh random key cannot exist
        return
    except storage.Unsupported as exc:  # other errors are the store's, and retried
        raise Unfenceable(_unfenceable(client, str(exc))) from None
    finally:
        client.delete([key])
    raise Unfenceable(_unfenceable(client, "a create-only PUT overwrote an existing object"))


def _unfenceable(client: storage.ReplicaClient, why: str) -> str:
    return (
        f"{client.url} does not support conditional writes ({why}), so two writers of one "
        "replica name could overwrite each other's history; use a store that supports "
        "If-None-Match/If-Match, or set fencing=False to replicate unfenced"
    )


class Lease:
    """This process's claim on one database name (see the module docstring)."""

    def __init__(
        self, client: storage.ReplicaClient, name: str, path: str, ttl: float = LEASE_TIME
    ) -> None:
        self.client = client
        self.name = name
        self.path = path
        self.ttl = ttl
        self.key = format.lease_key(name)
        self.epoch = 0  # of the current holding; 0 = never held
        self.held = False
        self._tag: str | None = None
        self._mine: Holder | None = None
        self._valid_until = 0.0  # monotonic
        self._renew_at = 0.0  # monotonic
        self.renewing = False  # a renewal is under way (engine lock)
        self._lock = threading.Lock()  # one store exchange at a time

    @property
    def swapping(self) -> storage.Swapping:
        return self.client  # type: ignore[return-value]

    def valid(self, now: float | None = None) -> bool:
        """Whether this process may write now (held, and renewed recently enough)."""
        return self.held and (time.monotonic() if now is None else now) < self._valid_until

    def renew_due(self, now: float) -> bool:
        return self.held and now >= self._renew_at

    def acquire(self) -> None:
        """Hold the lease (renew it if held): raises :class:`Refused` while another writer
        holds it, :class:`Unfenceable` for a store without conditional writes."""
        with self._lock:
            self._acquire()

    def _acquire(self) -> None:
        check_conditional(self.client)
        for _ in range(SWAP_ATTEMPTS):
            current, tag = self._read()
            if current is not None and self._mine is not None and current.token == self._mine.token:
                holder, epoch = current, current.epoch
            elif current is not None and current.expires > time.time() and not self._stale(current):
                self.held = False
                raise Refused(self.path, self.name, self.client.url, current)
            else:
                if current is None or current == UNREADABLE:
                    epoch = self._highest_epoch() + 1
                else:
                    epoch = current.epoch + 1
                holder = Holder(epoch, host_id(), os.getpid(), self.path, 0.0, secrets.token_hex(8))
            try:
                self._write(holder, tag, epoch)
                return
            except storage.Conflict:
                continue  # changed since the read (released, say): decide again
        self.held = False
        raise Refused(self.path, self.name, self.client.url, current or holder)

    def renew(self) -> None:
        """Extend the lease; :class:`Refused` if another writer took it meanwhile."""
        error = renew_all([self])[0]
        if error is not None:
            raise error

    def confirm(self) -> bool:
        """Whether the lease object still names this holding."""
        current, _ = self._read()
        return self._mine is not None and current is not None and current.token == self._mine.token

    def release(self) -> None:
        """Let the next writer take over at once (a clean close)."""
        with self._lock:
            if not self.held or self._mine is None:
                return
            self.held = False
            # Taken already, or the store is away: then it expires by itself.
            with contextlib.suppress(storage.StorageError):
                self.swapping.swap(self.key, replace(self._mine, expires=0.0).encode(), self._tag)

    def _write(self, holder: Holder, tag: str | None, epoch: int) -> None:
        """Swap ``holder`` in over version ``tag``; :class:`storage.Conflict` if the object
        changed meanwhile (unless the change was this very write, retried)."""
        start, holder = self._stamped(holder)
        try:
            result: str | Exception = self.swapping.swap(self.key, holder.encode(), tag)
        except storage.Conflict as exc:
            result = exc
        self._settle(start, holder, epoch, result)

    def _stamped(self, holder: Holder) -> tuple[float, Holder]:
        """A write about to be sent: when it starts (monotonic), and ``holder`` expiring a
        lease time from now."""
        start, wall = time.monotonic(), time.time()
        return start, replace(holder, expires=wall + self.ttl)

    def _settle(self, start: float, holder: Holder, epoch: int, result: str | Exception) -> None:
        """Hold the lease as ``holder`` after its write, sent at ``start``, gave ``result``:
        the new version's tag, or the error (raised; but a :class:`storage.Conflict` over
        this holding's own version is not another writer: this very write, retried, is a
        success, and one an earlier write whose reply was lost made is written over)."""
        if isinstance(result, storage.Conflict):
            current, current_tag = self._read()
            if current is None or current_tag is None or current.token != holder.token:
                raise result
            if current == holder:  # this very write, retried
                result = current_tag
            else:  # an earlier write of this holding whose reply was lost: write again
                result = self.swapping.swap(self.key, holder.encode(), current_tag)
        elif isinstance(result, Exception):
            raise result
        self._tag = result
        self._mine, self.epoch, self.held = holder, epoch, True
        self._valid_until = start + self.ttl * VALID_FRACTION
        self._renew_at = start + self.ttl * RENEW_FRACTION

    def _taken(self, holder: Holder) -> Exception:
        """A renewal found the lease object changed by someone else: :class:`Refused`
        naming who holds it now (or the error reading it, the lease still counted held)."""
        try:
            current, _ = self._read()
        except storage.StorageError as exc:
            return exc
        self.held = False
        return Refused(self.path, self.name, self.client.url, current or holder)

    def _read(self) -> tuple[Holder | None, str | None]:
        try:
            data, tag = self.swapping.get_tagged(self.key)
        except storage.ObjectNotFound:
            return None, None
        return Holder.decode(data), tag

    def _stale(self, holder: Holder) -> bool:
        """A lease no live writer uses: left by this very process (a database of this name
        it no longer replicates: the engine replicates one database per name at a time), or
        by a process of this host that is gone (the host-local leader lock, leader.py, makes
        this process the only one replicating this database here)."""
        if holder.host != host_id():
            return False
        return holder.pid == os.getpid() or holder.path == self.path

    def _highest_epoch(self) -> int:
        """Without a readable lease object (a replica written before fencing, one that lost
        it or whose object was damaged), the epoch must still exceed every epoch in the
        replica's keys."""
        keys = (format.parse_key(o.key) for o in self.client.list(self.name + "/"))
        return max((k.epoch for k in keys if k is not None), default=0)


def renew_all(leases: Sequence[Lease]) -> list[Exception | None]:
    """Renew leases held in one store, their writes overlapping (storage.swap_all: the
    thread wakes up once for all the replies), each as :meth:`Lease.renew` alone would: per
    lease None, or what renew would raise (:class:`Refused` if another writer took it)."""
    errors: dict[int, Exception] = {}
    with contextlib.ExitStack() as locks:
        # A lease is in one renewal at a time (the engine's lease.renewing): no two callers
        # can wait for each other's locks.
        for lease in leases:
            locks.enter_context(lease._lock)
        writes = [
            (lease, *lease._stamped(lease._mine))
            for lease in leases
            if lease.held and lease._mine is not None  # else released or lost meanwhile
        ]
        if not writes:
            return [None] * len(leases)
        store = writes[0][0]
        assert all(lease.client is store.client for lease, _, _ in writes), "leases of one store"
        items = [(lease.key, holder.encode(), lease._tag) for lease, _, holder in writes]
        results = storage.swap_all(store.swapping, items)
        for (lease, start, holder), result in zip(writes, results, strict=True):
            try:
                lease._settle(start, holder, lease.epoch, result)
            except storage.Conflict:
                errors[id(lease)] = lease._taken(holder)
            except Exception as exc:  # noqa: BLE001 - handed back per lease
                errors[id(lease)] = exc
    return [errors.get(id(lease)) for lease in leases]
