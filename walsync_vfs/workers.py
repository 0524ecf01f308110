"""A small pool of daemon threads for replication work.

``concurrent.futures`` joins its pool threads when the interpreter exits, after running
everything still queued.  With a store that accepts connections but never answers, each
queued upload takes its 3 attempts of 15 s, one queued per database: an application's exit
could wait for many minutes.  Replication work is never a reason for a process to stay
alive: what is not uploaded yet is in the database file, the next open ships it, and
``flush()`` is how an application waits for it.  So these threads are daemons.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class Workers:
    """``n`` daemon threads named ``name_0`` ... running submitted calls in order."""

    def __init__(self, n: int, name: str) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}_{i}", daemon=True) for i in range(n)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` on a worker; the future holds its result or exception."""
        future: Future = Future()
        self._queue.put((future, fn, args))
        return future

    def shutdown(self, wait: bool = True, cancel: bool = False) -> None:
        """Stop the workers after what is queued (``cancel``: drop what has not started)."""
        if cancel:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for thread in self._threads:
                thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever holds the future
                future.set_exception(exc)
