"""Replicas for tests that restore, verify or damage one: a database written through walsync."""

from __future__ import annotations

from pathlib import Path

import apsw


def replicate(replica: str, path: Path, sql: str) -> None:
    """Run ``sql`` on the database at ``path`` through walsync, replicating to ``replica``,
    and return once it is in the replica (the suite's own replica root again after)."""
    import walsync_vfs

    walsync_vfs.configure(replica=replica)
    try:
        con = apsw.Connection(str(path), vfs="walsync")
        con.execute(sql)
        walsync_vfs.flush(timeout=60)
        con.close()
    finally:
        walsync_vfs.configure(replica="")
