"""Writes by a process without the shim, for tests that need the replica to start a new
generation: the one way that always does is a foreign write, its WAL truncated, while no
walsync connection has the database open (a resync in the process that still holds the
lineage would ship the changed pages as one commit instead); and the wait for the engine to
let go of a closed database that it takes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import walsync_vfs

WRITE_AND_TRUNCATE = """
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute(sys.argv[2])
c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
c.close()
"""


def wait_until_forgotten(path: str) -> None:
    """Until the engine has let go of the closed database at ``path`` (its uploads and its
    maintenance pass, if one was running, are over)."""
    deadline = time.monotonic() + 30
    while walsync_vfs._engine_instance().database(path) is not None:
        assert time.monotonic() < deadline, f"{path} is still replicating after its close"
        time.sleep(0.01)


def write_while_closed(path: Path, sql: str) -> None:
    """Once walsync has let go of the closed database at ``path``, run ``sql`` on it in a
    process without the shim and truncate the WAL: its next open starts a new generation."""
    wait_until_forgotten(str(path))
    write_foreign(path, sql)


def write_foreign(path: Path | str, sql: str) -> None:
    """Run ``sql`` on ``path`` in a process without the shim, then truncate the WAL (if
    walsync has the database open, its next commit reveals the gap: a resync)."""
    subprocess.run([sys.executable, "-c", WRITE_AND_TRUNCATE, str(path), sql], check=True)
