"""walsync_vfs: continuous replication of SQLite databases, captured at the source.

``import walsync_vfs`` registers the ``walsync`` VFS in apsw's SQLite.  Databases opened with
``apsw.Connection(path, vfs="walsync")`` are switched to WAL mode and every committed
transaction is captured by the shim.
"""

from __future__ import annotations

import apsw

from walsync_vfs import capture
from walsync_vfs.capture import CaptureError

__all__ = ["CaptureError"]


def _ensure_wal(con: apsw.Connection) -> None:
    """apsw connection hook: a walsync database must be in WAL mode, or capture sees nothing."""
    if con.open_vfs != capture.VFS_NAME:
        return
    mode = con.execute("PRAGMA journal_mode").fetchone()[0]
    if mode != "wal":
        mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode != "wal":
        raise CaptureError(
            f"{con.filename or ':memory:'}: walsync needs journal_mode=WAL but SQLite kept "
            f"{mode!r}; open an on-disk database file"
        )


capture.load()
if _ensure_wal not in apsw.connection_hooks:
    apsw.connection_hooks.append(_ensure_wal)
