"""Optional Prometheus endpoint: per-database replication gauges, computed at scrape time.

A custom collector reads :meth:`Engine.stats` when scraped, so no metric objects exist per
database and an idle process does no metrics work at all.  It reads the process's engine of
the moment: a forked child's, not the one its parent had when it registered the collector.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
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
    "lost_restore_points": "Commits whose restore points were given up past the spool cap",
}
RETRY_EVERY = 2.0  # s between a process's attempts at a port another process serves
_servers: dict[int, Any] = {}  # port -> the server this process runs on it
_retrying: set[int] = set()  # ports another process serves, tried again now and then
_registered = False
_lock = threading.Lock()
log = logging.getLogger("walsync_vfs")


class _Collector:
    def __init__(
        self, current: Callable[[], Engine | None], has_databases: Callable[[], bool]
    ) -> None:
        self.current = current
        self.has_databases = has_databases

    def describe(self) -> list:
        return []  # registering must not collect: the series come and go with databases

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        if not self.has_databases():  # nothing to report: leave the port to one that has
            threading.Thread(target=_give_up_ports, name="walsync-metrics", daemon=True).start()
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
    port another process serves (another of a server's workers) is only a warning, and is
    tried again every RETRY_EVERY seconds while ``has_databases()``: that process may exit,
    or give the port up having no database to report."""
    with _lock:
        if port in _servers or port in _retrying:
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
    _servers[port] = server
    if not _registered:
        REGISTRY.register(_Collector(current, has_databases))
        _registered = True
    return None


def _retry(
    port: int, current: Callable[[], Engine | None], has_databases: Callable[[], bool]
) -> None:
    while True:
        time.sleep(RETRY_EVERY)
        with _lock:
            if port not in _retrying:
                return  # forked: the child's own first open starts anew
            if not has_databases() or _start(port, current, has_databases) is None:
                _retrying.discard(port)  # the next first open tries again
                served = port in _servers
                break
    if served:
        log.info("walsync: metrics served by this process now: port %d", port)


def _give_up_ports() -> None:
    """Stop serving: this process has no database to report (shutdown waits for the serving
    thread to finish the scrape that found that out).  A server stays listed until its
    socket is closed, for a child forked meanwhile to close its copy."""
    with _lock:
        servers = list(_servers.items())
    for port, server in servers:
        server.shutdown()
        server.server_close()
        with _lock:
            _servers.pop(port, None)


def _forget_served_in_child() -> None:
    """A forked child has none of its parent's server threads: it closes its copies of their
    listening sockets (left open, a scrape would wait on them for no one once the parent is
    gone) and may serve the port itself."""
    for server in _servers.values():
        server.socket.close()
    _servers.clear()
    _retrying.clear()


os.register_at_fork(after_in_child=_forget_served_in_child)
