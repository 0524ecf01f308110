"""Optional Prometheus endpoint: per-database replication gauges, computed at scrape time.

A custom collector reads :meth:`Engine.stats` when scraped, so no metric objects exist per
database and an idle process does no metrics work at all.  It reads the process's engine of
the moment: a forked child's, not the one its parent had when it registered the collector.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

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
_started: set[int] = set()
_registered = False
_lock = threading.Lock()
log = logging.getLogger("walsync_vfs")


class _Collector:
    def __init__(self, current: Callable[[], Engine | None]) -> None:
        self.current = current

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


def serve(port: int, current: Callable[[], Engine | None]) -> None:
    """Start the endpoint once per port (idempotent), reporting ``current()``'s databases.  A
    port another process serves (the first of a server's workers took it) is only a warning:
    replication goes on."""
    global _registered
    from prometheus_client import start_http_server
    from prometheus_client.core import REGISTRY

    with _lock:
        if port in _started:
            return
        try:
            start_http_server(port, addr="127.0.0.1")
        except OSError as exc:
            _started.add(port)  # warned once
            log.warning("walsync: metrics not served by this process: port %d: %s", port, exc)
            return
        _started.add(port)
        if not _registered:
            REGISTRY.register(_Collector(current))
            _registered = True


def _forget_served_in_child() -> None:
    """A forked child has none of its parent's server threads: it may serve the port itself
    (or learn that the parent does)."""
    _started.clear()


os.register_at_fork(after_in_child=_forget_served_in_child)
