"""Optional Prometheus endpoint: per-database replication gauges, computed at scrape time.

A custom collector reads :meth:`Engine.stats` when scraped, so no metric objects exist per
database and an idle process does no metrics work at all.  It reads the process's engine of
the moment: a forked child's, not the one its parent had when it registered the collector.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from walsync_vfs.engine import Engine

_GAUGES = {
    "last_txid": "Last txid committed through the walsync VFS",
    "replicated_txid": "Last txid durable in the replica",
    "lag_seconds": "Age of the oldest commit not yet in the replica",
    "pending_bytes": "Page bytes waiting for upload",
    "bytes_uploaded": "Segment bytes uploaded since the database was opened",
    "errors": "Failed store requests since the database was opened",
    "fenced": "1 while another writer holds the database's lease (see the ERROR log)",
    "stopped": "1 while the database is out of WAL mode and not replicated",
    "lost_restore_points": (
        "Commits whose restore points were lost: given up past the spool cap, or erased "
        "unread from the WAL by a process without the shim"
    ),
}
RETRY_EVERY = 2.0  # s between a process's attempts at a port another process serves
_served: dict[int, _Served] = {}  # port -> what this process runs for it
_retrying: set[int] = set()  # ports another process serves, tried again now and then
_registered = False
_lock = threading.Lock()
log = logging.getLogger("walsync_vfs")


@dataclass
class _Served:
    """A port this process serves: the HTTP server, and the socket on which a process that
    wants the port asks for it (an abstract unix name per port, so nothing is left on
    disk)."""

    server: Any
    asks: socket.socket


def _ask_address(port: int) -> str:
    return f"\0walsync-metrics-{port}"


class _Collector:
    def __init__(self, current: Callable[[], Engine | None]) -> None:
        self.current = current

    def describe(self) -> list:
        return []  # registering must not collect: the series come and go with databases

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        engine = self.current()
        stats = engine.stats() if engine is not None else []
        for key, text in _GAUGES.items():
            # The path too: two databases may share a name in two replica roots.
            family = GaugeMetricFamily(f"walsync_{key}", text, labels=["database", "path"])
            for s in stats:
                if s["last_txid"] is None:
                    continue  # another process leads it and did not answer
                value = bool(s[key]) if key == "fenced" else s[key]  # fenced: the reason
                family.add_metric([s["name"] or s["path"], s["path"]], float(value))
            yield family


def serve(
    port: int, current: Callable[[], Engine | None], has_databases: Callable[[], bool]
) -> None:
    """Serve the endpoint on ``port`` (idempotent), reporting ``current()``'s databases.  A
    port another process serves (another of a server's workers) is only a warning: every
    RETRY_EVERY seconds while ``has_databases()``, this process asks the one serving it to
    let go if it has no database open (a pre-fork master that closed its own), and tries
    the port again (the other one may also have exited)."""
    with _lock:
        if port in _served or port in _retrying:
            return
        error = _start(port, current, has_databases)
        if error is None:
            return
        _retrying.add(port)
    log.warning(
        "walsync: metrics not served by this process: port %d: %s; trying again every %.0f s",
        port, error, RETRY_EVERY,
    )  # fmt: skip
    threading.Thread(
        target=_retry, args=(port, current, has_databases), name="walsync-metrics", daemon=True
    ).start()


def _start(
    port: int, current: Callable[[], Engine | None], has_databases: Callable[[], bool]
) -> OSError | None:
    """Serve ``port`` now (lock held); the error if it is taken."""
    global _registered
    from prometheus_client import start_http_server
    from prometheus_client.core import REGISTRY

    try:
        server, _ = start_http_server(port, addr="127.0.0.1")
    except OSError as exc:
        return exc
    asks = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with contextlib.suppress(OSError):  # held by a process on its way out: asked in vain
        asks.bind(_ask_address(port))
    _served[port] = _Served(server, asks)
    threading.Thread(
        target=_answer, args=(port, asks, has_databases), name="walsync-metrics", daemon=True
    ).start()
    if not _registered:
        REGISTRY.register(_Collector(current))
        _registered = True
    return None


def _answer(port: int, asks: socket.socket, has_databases: Callable[[], bool]) -> None:
    """Let go of ``port`` when another process asks for it and this one has no database
    open: it has nothing to report."""
    while True:
        try:
            asks.recv(16)
        except OSError:
            return  # closed: the port was let go of
        if not has_databases():
            _let_go(port)
            return


def _let_go(port: int) -> None:
    with _lock:
        served = _served.get(port)
    if served is None:
        return
    served.server.shutdown()  # waits for a scrape under way
    served.server.server_close()
    served.asks.close()
    with _lock:  # listed until closed: a child forked meanwhile closes its copies
        _served.pop(port, None)
    log.info("walsync: metrics port %d left to another process (no database open here)", port)


def _retry(
    port: int, current: Callable[[], Engine | None], has_databases: Callable[[], bool]
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ask:
        while True:
            with contextlib.suppress(OSError):  # nobody to ask: it is exiting, or not ours
                ask.sendto(b"let go", _ask_address(port))
            time.sleep(RETRY_EVERY)
            with _lock:
                if port not in _retrying:
                    return  # forked: the child's own first open starts anew
                if not has_databases() or _start(port, current, has_databases) is None:
                    _retrying.discard(port)  # the next first open tries again
                    served = port in _served
                    break
    if served:
        log.info("walsync: metrics served by this process now: port %d", port)


def _forget_served_in_child() -> None:
    """A forked child has none of its parent's server threads: it closes its copies of their
    sockets (a listening one left open would have scrapes wait on it for no one once the
    parent is gone) and may serve the port itself."""
    for served in _served.values():
        served.server.socket.close()
        served.asks.close()
    _served.clear()
    _retrying.clear()


os.register_at_fork(after_in_child=_forget_served_in_child)
