"""Issue: point-in-time restore, list and verify."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import time

import apsw
import pytest

import walsync_vfs
from walsync_vfs import catalog, format, storage


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "walsync_vfs", *args], capture_output=True, text=True, timeout=120
    )


def content_hash(con: apsw.Connection) -> str:
    h = hashlib.sha256()
    for row in con.execute("SELECT id, v FROM t ORDER BY id"):
        h.update(repr(row).encode())
    return h.hexdigest()


@pytest.fixture
def history(file_replica, tmp_path):
    """A database with 60 commits, and per commit: (txid, commit time, content hash)."""
    con = apsw.Connection(str(tmp_path / "pit.db"), vfs="walsync")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    log = []
    rng = random.Random(7)
    for i in range(60):
        if i % 10 == 9:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        with con:  # every iteration changes the database: exactly one commit each
            con.execute("INSERT INTO t(v) VALUES(randomblob(?))", (rng.randint(10, 9000),))
            if i % 3 == 2:
                con.execute("DELETE FROM t WHERE id % 5 = ?", (i % 5,))
        log.append((time.time_ns(), content_hash(con)))
        time.sleep(0.002)
    walsync_vfs.flush(timeout=30)
    url = f"{file_replica}/pit.db"
    # Map each logged commit to its txid: txids are consecutive and end at the last one.
    last = next(s for s in walsync_vfs.stats() if s["name"] == "pit.db")["replicated_txid"]
    log = [(last - len(log) + 1 + i, t, h) for i, (t, h) in enumerate(log)]
    yield url, log, con
    con.close()


def restored_hash(path) -> str:
    con = apsw.Connection(str(path))
    assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    return content_hash(con)


def test_every_sampled_txid_restores_exactly(history, tmp_path):
    url, log, _ = history
    for i, (txid, _, want) in enumerate(random.Random(1).sample(log, 8)):
        out = tmp_path / f"tx{i}.db"
        proc = cli("restore", url, "-o", str(out), "--txid", str(txid))
        assert proc.returncode == 0, proc.stderr
        assert f"at txid {txid} " in proc.stdout
        assert restored_hash(out) == want


def test_timestamps_restore_the_last_commit_at_or_before(history, tmp_path):
    url, log, _ = history
    for i, (txid, t, want) in enumerate(random.Random(2).sample(log[1:], 6)):
        out = tmp_path / f"ts{i}.db"
        # Halfway between this commit's log time and the next commit: this commit is the last.
        proc = cli("restore", url, "-o", str(out), "--timestamp", f"{(t + 500_000) / 1e9:.6f}")
        assert proc.returncode == 0, proc.stderr
        assert restored_hash(out) == want
        assert f"at txid {txid} " in proc.stdout


def test_targets_outside_history_name_the_available_range(history, tmp_path):
    url, log, _ = history
    proc = cli("restore", url, "-o", str(tmp_path / "x.db"), "--txid", str(log[-1][0] + 5))
    assert proc.returncode == 1
    assert proc.stderr == (
        f"walsync: error: pit.db: txid {log[-1][0] + 5} is not in the retained history "
        f"(available: 1..{log[-1][0]})\n"
    )
    proc = cli("restore", url, "-o", str(tmp_path / "x.db"), "--timestamp", "2001-01-01T00:00:00Z")
    assert proc.returncode == 1
    assert "is not in the retained history (available: 1.." in proc.stderr
    proc = cli("restore", url, "-o", str(tmp_path / "x.db"), "--timestamp", "2001-01-01T00:00:00")
    assert proc.returncode == 2
    assert "has no timezone" in proc.stderr


def test_list_shows_generations_and_json(history):
    url, log, _ = history
    proc = cli("list", url, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    (gen,) = info["generations"]
    assert gen["last_txid"] == log[-1][0]
    assert gen["snapshots"][0]["txid"] == 1
    assert gen["segments"]["last_txid"] == log[-1][0]
    assert gen["segments"]["first_time"] <= gen["segments"]["last_time"]
    root = url.rsplit("/", 1)[0]
    proc = cli("list", root, "--json")
    assert [d["name"] for d in json.loads(proc.stdout)["databases"]] == ["pit.db"]
    proc = cli("list", root)
    assert "generation " in proc.stdout and "segments" in proc.stdout


def test_verify_passes_then_names_each_broken_object(history):
    url, _, _ = history
    proc = cli("verify", url)
    assert proc.returncode == 0, proc.stderr
    client = storage.open_replica(url.rsplit("/", 1)[0])
    objs = [o.key for o in client.list("pit.db/")]
    seg = next(k for k in objs if "/seg/" in k)
    data = client.get(seg)
    client.put(seg, data[: len(data) // 2])  # truncated
    proc = cli("verify", url)
    assert proc.returncode == 1
    assert f"walsync: problem: {seg}: " in proc.stderr
    proc = cli("restore", url, "-o", url.replace("file://", "") + "-r.db")
    assert proc.returncode == 1 and proc.stderr.startswith(f"walsync: error: {seg}: ")
    client.delete([seg])  # missing
    proc = cli("verify", url)
    assert proc.returncode == 1
    parsed = format.parse_key(seg)
    assert f"txids {parsed.first_txid}..{parsed.last_txid} missing before it" in proc.stderr
    proc = cli("restore", url, "-o", url.replace("file://", "") + "-r.db")
    assert proc.returncode == 1
    assert f"segments for txids {parsed.first_txid}..{parsed.last_txid} are missing" in proc.stderr
    assert catalog.databases(client) == {"pit.db": len(objs) - 1}
