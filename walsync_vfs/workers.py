"""A small pool of daemon threads for replication work.

``concurrent.futures`` joins its pool threads when the interpreter exits, after running
everything still queued.  With a store that accepts connections but never answers, each
queued upload takes its 3 attempts of 15 s, one queued per database: an application's exit
could wait for many minutes.  Replication work is never a reason for a process to stay
alive: what is not uploaded yet is in the database file, the next open ships it, and
``flush()`` is how an application waits for it.  So these threads are daemons.

Nor does an idle pool keep threads: each ends after ``IDLE_EXIT`` seconds without work, so
none outlives the last database's work, and the next call starts one again.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

log = logging.getLogger("walsync_vfs")

IDLE_EXIT = 2.0  # seconds a worker waits for work before it ends


class Workers:
    """Up to ``n`` daemon threads named ``name_0`` ... running submitted calls in order.

    Threads start as the work needs them: a call submitted while every started thread is busy
    starts another, up to ``n``.  With a fast store one or two upload threads do; a slow one
    (or a busy machine) brings up the rest.
    """

    def __init__(self, n: int, name: str) -> None:
        self._max = n
        self._name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []  # running now
        self._started = itertools.count()
        self._idle = 0  # running threads waiting for work
        self._stopped = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` on a worker; the future holds its result or exception."""
        future: Future = Future()
        self._put((future, fn, args))
        return future

    def spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on a worker, for work nobody waits on: no future to make (the
        engine starts a hundred uploads a second), and an exception is logged rather than
        kept in a future nobody reads."""
        self._put((None, fn, args))

    def _put(self, item: tuple) -> None:
        self._queue.put(item)
        with self._lock:
            if (
                not self._stopped
                and self._queue.qsize() > self._idle
                and len(self._threads) < self._max
            ):
                thread = threading.Thread(
                    target=self._run, name=f"{self._name}_{next(self._started)}", daemon=True
                )
                self._threads.append(thread)
                self._idle += 1  # counted before it runs: the next submit must not start one
                thread.start()

    @property
    def started(self) -> int:
        """Threads running now."""
        return len(self._threads)

    def shutdown(self, wait: bool = True, cancel: bool = False) -> None:
        """Stop the workers after what is queued (``cancel``: drop what has not started)."""
        if cancel:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None and item[0] is not None:
                    item[0].cancel()
        with self._lock:
            self._stopped = True
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)
        if wait:
            for thread in threads:
                thread.join()

    def _next(self) -> tuple | None:
        """The next call to run; None to end this thread (shut down, or idle too long)."""
        while True:
            try:
                return self._queue.get(timeout=IDLE_EXIT)  # type: ignore[no-any-return]
            except queue.Empty:
                with self._lock:
                    # Under the lock _put() counts idle threads: a call queued before this
                    # check keeps the thread, one queued after it starts a new one.
                    if self._queue.empty():
                        self._idle -= 1
                        self._threads.remove(threading.current_thread())
                        return None

    def _run(self) -> None:
        # Each call runs in _execute's frame, which ends with it: a thread waiting for work
        # keeps nothing of its last call alive (a multipart upload's part, say).
        while self._execute(self._next()):
            pass

    def _execute(self, item: tuple | None) -> bool:
        """Run one queued call; False for the end of this thread."""
        if item is None:
            return False
        with self._lock:
            self._idle -= 1
        future, fn, args = item
        try:
            if future is None:
                try:
                    fn(*args)
                except Exception:  # a bug in the work must not end the thread unseen
                    log.exception("walsync: %s failed", getattr(fn, "__name__", fn))
            elif future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 - handed to the future's holder
                    future.set_exception(exc)
        finally:
            with self._lock:
                self._idle += 1
        return True
