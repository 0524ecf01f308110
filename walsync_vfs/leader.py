"""One replicator per database per host, chosen among the processes that open it.

Every process that opens a database through walsync takes part.  The one holding an exclusive
``flock`` on ``<db>-walsync`` is the database's *leader*: it replicates every commit in the WAL,
whoever made it (the shim reads other processes' frames, see ``ws_tail`` in csrc/walsync.c).
The others are *followers*: they upload nothing, and their shim sends the leader a datagram
after their commits so it reads them at once.  The kernel drops the lock when the leader
exits or dies, and a follower that finds it free takes over.

Each process has one unix datagram socket (an abstract name, so nothing is left on disk).  It
receives the shim's notifications (an 8-byte database id) when the process leads, and requests
and replies: a follower's ``flush()`` asks the leader to make everything in the WAL durable and
waits for the answer; a follower's ``stats()`` asks the leader for its figures.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from walsync_vfs.capture import ffi, lib
from walsync_vfs.errors import FlushTimeoutError

log = logging.getLogger("walsync_vfs")

ROLE_NONE, ROLE_LEAD, ROLE_FOLLOW = 0, 1, 2
TAKEOVER_CHECK = 0.25  # s between a follower's attempts at the lock: takeover well within 2 s
RETAIL_AFTER = 0.02  # s: after a read that found commits, read again (notifications coalesce)
FOREIGN_POLL = 1.0  # s between looks at the WAL for writers without the shim (no notifications)
REPLY_WAIT = 1.0  # s a follower waits for the leader's answer before asking again

# The shim's datagram: the leader's id for the database, negative when a restart waits.
_NOTIFY = struct.Struct("=q")
_REQUEST = struct.Struct("=cQqd")  # b"F" or b"S", request id, leader's db id, seconds it may take
_REPLY = struct.Struct("=cQB")  # b"R", request id, status; then the error text or the stats
_DATAGRAM_MAX = 65536
_TEXT_MAX = 2000  # characters of a text field a leader's stats carry
_OK, _TIMEOUT, _FAILED = 0, 1, 2
# The leader writes where it replicates the database into the side file, past the shim's
# shared page (WsShared in csrc/walsync.c): a follower configured otherwise is told so.
_REPLICA_AT = 2048
_REPLICA_HEAD = struct.Struct("=IH")  # crc32 of the text, its length; then the UTF-8 text
_REPLICA_MAX = 2048 - _REPLICA_HEAD.size


class LeaderError(RuntimeError):
    """The leader answered a flush request with an error (its text says why)."""


@dataclass
class _Db:
    path: str
    replica: str = ""  # where this process would replicate it ("" unknown)
    lock_fd: int = -1  # the side file (flock'ed while this process leads)
    role: int = ROLE_NONE
    wal_seen: tuple[int, int] = (0, 0)  # (size, mtime) of the WAL at the last look
    retail_at: float = 0.0  # when to read the WAL again (0: not scheduled)


@dataclass
class _Waiter:
    done: threading.Event = field(default_factory=threading.Event)
    status: int = _TIMEOUT
    text: str = ""


class Host:
    """This process's part in choosing leaders and talking to them.

    Called on the host thread: ``on_promote(db_id)`` when this process took the lead of a
    database it followed.  ``on_flush(db_id, timeout)``
    runs on a thread of its own when a follower asks for everything in the WAL to be made
    durable: it returns None or an error text.  ``on_stats(db_id)`` runs on a thread of its
    own when a follower asks for a database's stats: the leader's, or None if it does not
    lead it.
    """

    def __init__(
        self,
        on_promote: Callable[[int], None],
        on_flush: Callable[[int, float], str | None],
        on_stats: Callable[[int], dict[str, Any] | None],
    ) -> None:
        self._on_promote = on_promote
        self._on_flush = on_flush
        self._on_stats = on_stats
        self._lock = threading.Lock()
        self._dbs: dict[int, _Db] = {}
        self._waiters: dict[int, _Waiter] = {}
        self._ids = itertools.count(1)
        self.addr = f"walsync-{os.getpid()}-{os.urandom(4).hex()}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + self.addr)
        self._stopped = False
        self._thread: threading.Thread | None = None  # runs while a database is joined

    def _ensure_thread(self) -> None:
        """Start the thread if it ended (lock held)."""
        if self._thread is None and not self._stopped:
            self._thread = threading.Thread(target=self._run, name="walsync-host", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ roles

    def join(self, db_id: int, path: str, replica: str = "") -> bool:
        """Take part for a newly opened database, which this process would replicate to
        ``replica`` (its URL; "" if unknown); True if this process leads it."""
        with self._lock:
            db = self._dbs.setdefault(db_id, _Db(path, replica))
            self._ensure_thread()
        return db.role == ROLE_LEAD or self._try_lead(db_id, db)

    def leads(self, db_id: int) -> bool:
        db = self._dbs.get(db_id)
        return db is None or db.role != ROLE_FOLLOW

    def leave(self, db_id: int) -> None:
        """The database is closed here and everything it committed is replicated: give up
        the lead (a follower takes over) and forget it."""
        with self._lock:
            db = self._dbs.pop(db_id, None)
        if db is not None:
            lib.ws_role(db_id, ROLE_NONE, ffi.NULL)
            if db.lock_fd >= 0:
                os.close(db.lock_fd)  # releases the flock

    def _try_lead(self, db_id: int, db: _Db) -> bool:
        """Try the side file's lock (its descriptor stays open while this process has the
        database: a follower tries again on it, and closing it releases a lead).  A process
        that only reads the database never leads it: it could replicate an old copy as the
        newest state, or take the writer lease of its name from the real writer."""
        if not lib.ws_app_writable(db_id):
            if db.role != ROLE_FOLLOW:
                db.role = ROLE_FOLLOW
                lib.ws_role(db_id, ROLE_FOLLOW, ffi.NULL)
            return False  # tried again when it is opened for writing
        if db.lock_fd < 0:
            side = db.path + "-walsync"
            try:
                db.lock_fd = os.open(side, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:  # no coordination possible: behave as the only process
                log.warning(
                    "walsync: %s: cannot open %s (%s); replicating alone", db.path, side, exc
                )
                db.role = ROLE_LEAD
                return True
        try:
            fcntl.flock(db.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if db.role != ROLE_FOLLOW:
                db.role = ROLE_FOLLOW
                lib.ws_role(db_id, ROLE_FOLLOW, ffi.NULL)
                log.info("walsync: %s is replicated by another process; following", db.path)
            return False
        db.role = ROLE_LEAD
        lib.ws_role(db_id, ROLE_LEAD, self.addr.encode())
        text = db.replica.encode()[:_REPLICA_MAX]
        with contextlib.suppress(OSError):  # then followers cannot compare: nothing worse
            os.pwrite(db.lock_fd, _REPLICA_HEAD.pack(zlib.crc32(text), len(text)) + text,
                      _REPLICA_AT)  # fmt: skip
        return True

    def other_replica(self, db_id: int) -> tuple[str, str] | None:
        """(where the leader replicates it, where this process would) for a database this
        process follows, if the two differ; None if they agree or either is unknown (the
        leader's not written yet, or caught half-written)."""
        db = self._dbs.get(db_id)
        if db is None or db.lock_fd < 0 or not db.replica:
            return None
        try:
            raw = os.pread(db.lock_fd, _REPLICA_HEAD.size + _REPLICA_MAX, _REPLICA_AT)
            crc, size = _REPLICA_HEAD.unpack_from(raw)
        except (OSError, struct.error):
            return None
        text = raw[_REPLICA_HEAD.size : _REPLICA_HEAD.size + size]
        if not size or zlib.crc32(text) != crc:
            return None
        theirs = text.decode(errors="replace")
        return None if theirs == db.replica else (theirs, db.replica)

    def after_fork_in_child(self) -> None:
        """The parent's locks stay the parent's: drop this copy of their descriptors."""
        for db in self._dbs.values():
            if db.lock_fd >= 0:
                os.close(db.lock_fd)
        self._dbs.clear()
        self._sock.close()

    # ------------------------------------------------------------------ flush

    def ask_flush(self, db_id: int, deadline: float | None) -> bool:
        """Follower: ask the leader to make every commit in the WAL durable and wait for its
        answer.  Returns False if this process leads the database now (flush it locally);
        raises TimeoutError or :class:`LeaderError`."""
        while True:
            if self.leads(db_id):
                return False
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise FlushTimeoutError(
                    "flush timed out waiting for the process that replicates the database; "
                    "give flush() more time"
                )
            asked = self._ask(b"F", db_id, left if left is not None else 3600.0)
            if asked is None:
                time.sleep(min(TAKEOVER_CHECK, left or TAKEOVER_CHECK))  # between leaders
                continue
            req, waiter = asked
            try:
                waiter.done.wait(REPLY_WAIT if left is None else min(left, REPLY_WAIT))
            finally:
                self._forget(req)
            if not waiter.done.is_set():
                continue  # no answer: ask again (perhaps another leader)
            if waiter.status == _OK:
                return True
            if waiter.status == _TIMEOUT:
                raise FlushTimeoutError(waiter.text)
            raise LeaderError(waiter.text)

    def ask_stats(self, db_ids: list[int], timeout: float) -> dict[int, dict[str, Any]]:
        """Follower: the leaders' stats of these databases, asked all at once; one whose
        leader does not answer within ``timeout`` seconds is left out."""
        asked = {db_id: a for db_id in db_ids if (a := self._ask(b"S", db_id, 0.0)) is not None}
        deadline = time.monotonic() + timeout
        out = {}
        for db_id, (req, waiter) in asked.items():
            answered = waiter.done.wait(max(deadline - time.monotonic(), 0.0))
            self._forget(req)
            if answered and waiter.status == _OK:
                with contextlib.suppress(ValueError):
                    out[db_id] = json.loads(waiter.text)
        return out

    def _ask(self, kind: bytes, db_id: int, timeout: float) -> tuple[int, _Waiter] | None:
        """Send the database's leader a request; its id and the waiter its reply will set,
        or None if no leader can be asked now (none, or it just went away)."""
        leader_db = ffi.new("int64_t *")
        addr = ffi.new("char[64]")
        if not lib.ws_leader(db_id, leader_db, addr):
            return None
        waiter = _Waiter()
        req = next(self._ids)
        with self._lock:
            self._waiters[req] = waiter
        try:
            self._sock.sendto(
                _REQUEST.pack(kind, req, leader_db[0], timeout), b"\0" + ffi.string(addr)
            )
        except OSError:
            self._forget(req)
            return None
        return req, waiter

    def _forget(self, req: int) -> None:
        with self._lock:
            self._waiters.pop(req, None)

    def _answer(self, req: int, db_id: int, timeout: float, sender: bytes) -> None:
        try:
            error = self._on_flush(db_id, timeout)
            status = _OK if error is None else _FAILED
        except TimeoutError as exc:
            status, error = _TIMEOUT, str(exc)
        except Exception as exc:  # noqa: BLE001 - the asker gets the text
            status, error = _FAILED, str(exc)
        self._reply(req, status, error or "", sender)

    def _answer_stats(self, req: int, db_id: int, sender: bytes) -> None:
        stats = self._on_stats(db_id)
        if stats is None:
            self._reply(req, _FAILED, "", sender)
            return
        shown = {k: v[:_TEXT_MAX] if isinstance(v, str) else v for k, v in stats.items()}
        self._reply(req, _OK, json.dumps(shown), sender)

    def _reply(self, req: int, status: int, text: str, sender: bytes) -> None:
        with contextlib.suppress(OSError):  # the asker is gone
            self._sock.sendto(_REPLY.pack(b"R", req, status) + text.encode(), sender)

    # ------------------------------------------------------------- the thread

    def _run(self) -> None:
        next_takeover = next_poll = 0.0
        while not self._stopped:
            with self._lock:
                if not self._dbs and not self._waiters:
                    self._thread = None  # nothing joined: the next join starts another
                    return
            now = time.monotonic()
            if now >= next_takeover:
                next_takeover = now + TAKEOVER_CHECK
                self._take_over()
            if now >= next_poll:
                next_poll = now + FOREIGN_POLL
                self._poll_wal()
            self._retail(now)
            if self._dbs:
                wake = min([next_takeover, next_poll] + [d.retail_at for d in self._leading()])
                self._sock.settimeout(max(wake - time.monotonic(), 0.0005))
            else:  # nothing open here, only flush replies to wait for
                self._sock.settimeout(None)
            try:
                msg, sender = self._sock.recvfrom(_DATAGRAM_MAX)
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            self._receive(msg, sender)

    def _leading(self) -> list[_Db]:
        return [d for d in list(self._dbs.values()) if d.role == ROLE_LEAD and d.retail_at]

    def _receive(self, msg: bytes, sender: bytes) -> None:
        if len(msg) == _NOTIFY.size:
            (db_id,) = _NOTIFY.unpack(msg)
            self._tail(db_id)  # a follower committed, or waits to restart the WAL
        elif msg[:1] in (b"F", b"S") and len(msg) == _REQUEST.size:
            kind, req, db_id, timeout = _REQUEST.unpack(msg)
            answer, args = (
                (self._answer, (req, db_id, timeout, sender))
                if kind == b"F"
                else (self._answer_stats, (req, db_id, sender))
            )
            threading.Thread(target=answer, args=args, name="walsync-answer", daemon=True).start()
        elif msg[:1] == b"R" and len(msg) >= _REPLY.size:
            _, req, status = _REPLY.unpack_from(msg)
            with self._lock:
                waiter = self._waiters.get(req)
            if waiter is not None:
                waiter.status, waiter.text = status, msg[_REPLY.size :].decode(errors="replace")
                waiter.done.set()

    def _tail(self, db_id: int) -> None:
        """Publish what other processes committed; look again shortly if there was some
        (the shim notifies at most once a millisecond, so the last commits of a burst may
        come without a notification)."""
        db = self._dbs.get(db_id)
        if db is None or db.role != ROLE_LEAD:
            return
        found = lib.ws_tail(db_id)
        db.retail_at = time.monotonic() + RETAIL_AFTER if found == 1 else 0.0

    def _retail(self, now: float) -> None:
        for db_id, db in list(self._dbs.items()):
            if db.role == ROLE_LEAD and db.retail_at and now >= db.retail_at:
                self._tail(db_id)

    def _poll_wal(self) -> None:
        """Writers without the shim send no notification: look at the WAL's size and time."""
        for db_id, db in list(self._dbs.items()):
            if db.role != ROLE_LEAD:
                continue
            try:
                st = os.stat(db.path + "-wal")  # stat opens no descriptor
            except OSError:
                continue
            seen = (st.st_size, st.st_mtime_ns)
            if seen != db.wal_seen:
                db.wal_seen = seen
                self._tail(db_id)

    def _take_over(self) -> None:
        """Followers try the lock; leaders say they are still here (the shim protects the
        WAL's unread frames for a while after the last sign, see restartAllowed)."""
        for db_id, db in list(self._dbs.items()):
            if db.role == ROLE_LEAD:
                lib.ws_beat(db_id)
            elif db.role == ROLE_FOLLOW and self._try_lead(db_id, db):
                log.info("walsync: %s: the previous leader went away; leading now", db.path)
                self._on_promote(db_id)

    def stop(self) -> None:
        self._stopped = True
        self._sock.close()
