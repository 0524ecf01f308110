"""Optional Prometheus endpoint: per-database replication gauges, computed at scrape time.

A custom collector reads :meth:`Engine.stats` when scraped, so no metric objects exist per
database and an idle process does no metrics work at all.
"""

from __future__ import annotations

import logging
import threading
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
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        stats = self.engine.stats()
        for key, text in _GAUGES.items():
            family = GaugeMetricFamily(f"walsync_{key}", text, labels=["database"])
            for s in stats:
                if not s["leader"]:
                    continue  # the leader's process reports it
                value = bool(s[key]) if key == "fenced" else s[key]  # fenced: the reason
                family.add_metric([s["name"] or s["path"]], float(value))
            yield family


def serve(port: int, engine: Engine) -> None:
    """Start the endpoint once per port (idempotent).  A port another process serves (the
    first of a server's workers took it) is only a warning: replication goes on."""
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
            REGISTRY.register(_Collector(engine))
            _registered = True
