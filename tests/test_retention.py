"""Issue: periodic snapshots, compaction and retention never break a restore in the window."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time

import apsw
import pytest

import walsync_vfs
from walsync_vfs import catalog, format, storage
from walsync_vfs.restore import RestoreError, restore

RETENTION = 2.0


@pytest.fixture
def replica(file_url):
    walsync_vfs.configure(
        replica=file_url,
        upload_interval=0.0,
        snapshot_interval=0.7,
        retention=RETENTION,
        compact_segments=4,
    )
    yield file_url
    walsync_vfs.flush(timeout=30)
    walsync_vfs.configure(
        replica="",
        upload_interval=1.0,
        snapshot_interval=86400.0,
        retention=86400.0,
        compact_segments=32,
    )


def digest(con: apsw.Connection) -> str:
    return hashlib.sha256(
        repr(con.execute("SELECT * FROM t ORDER BY rowid").fetchall()).encode()
    ).hexdigest()


def test_restore_points_inside_the_window_survive_maintenance(replica, tmp_path):
    path = tmp_path / "kept.db"
    con = apsw.Connection(str(path), vfs="walsync")
    con.execute("CREATE TABLE t(x)")
    log: list[tuple[float, str]] = []
    end = time.time() + 6.0
    i = 0
    while time.time() < end:
        i += 1
        con.execute("INSERT INTO t VALUES(randomblob(200))")
        log.append((time.time(), digest(con)))
        if i == 40:  # a foreign writer: the lineage continues in a new generation
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    "import sqlite3,sys; c=sqlite3.connect(sys.argv[1], isolation_level=None)"
                    "; c.execute('INSERT INTO t VALUES(0)')",
                    str(path),
                ],
                check=True,
            )
            log.append((time.time(), None))  # state not attributable to one of our commits
        time.sleep(0.03)
    walsync_vfs.flush(timeout=30)  # maintenance ran meanwhile, once a second

    client = storage.open_replica(replica)
    gens = catalog.generations(client, "kept.db")
    first_txid = min(g.first_txid for g in gens)
    assert first_txid > 1, "retention removed nothing"
    assert any(s.last_txid - s.first_txid >= 3 for g in gens for s in g.segments), "no compaction"
    assert sum(len(g.snapshots) for g in gens) >= 2, "no periodic snapshot"

    now = time.time()
    last = next(s for s in walsync_vfs.stats() if s["name"] == "kept.db")["replicated_txid"]
    in_window = [(t, h) for t, h in log if t >= now - RETENTION + 0.3 and h is not None]
    assert len(in_window) > 10
    for n, (t, want) in enumerate(in_window[:: max(1, len(in_window) // 8)]):
        out = tmp_path / f"w{n}.db"
        result = restore(f"{replica}/kept.db", str(out), timestamp_ns=int((t + 0.001) * 1e9))
        assert result.txid <= last
        got = apsw.Connection(str(out))
        assert got.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert digest(got) == want
    with pytest.raises(RestoreError, match="is not in the retained history"):
        restore(f"{replica}/kept.db", str(tmp_path / "old.db"), txid=2)
    assert [format.parse_key(o.key) for o in client.list("kept.db/")]  # sanity: still listed
    con.close()
