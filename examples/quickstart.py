"""Quickstart: write through the walsync VFS, restore from the replica, verify.

Uses the embedded default replica (a local directory) unless WALSYNC_REPLICA is set.
"""

import os
import subprocess
import sys
import tempfile

import apsw

import walsync_vfs

work = tempfile.mkdtemp(prefix="walsync-quickstart-")
name = f"quickstart-{os.getpid()}.db"
path = os.path.join(work, name)

con = apsw.Connection(path, vfs="walsync")  # WAL mode and replication switch on here
con.execute("CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)")
for i in range(1000):
    con.execute("INSERT INTO notes(body) VALUES(?)", (f"note {i}",))
with con:  # one bigger transaction too
    con.executemany("INSERT INTO notes(body) VALUES(?)", [(f"bulk {i}",) for i in range(5000)])
walsync_vfs.flush(timeout=60)  # every commit above is now in the replica

replica = walsync_vfs.stats()[0]
root = (
    walsync_vfs.config.default_replica()
    if not os.environ.get("WALSYNC_REPLICA")
    else (os.environ["WALSYNC_REPLICA"])
)
restored = os.path.join(work, "restored.db")
subprocess.run(
    [sys.executable, "-m", "walsync_vfs", "restore", f"{root}/{name}", "-o", restored],
    check=True,
    cwd=work,  # not the source tree: there `-m walsync_vfs` would find the unbuilt sources
)

copy = apsw.Connection(restored)
want = con.execute("SELECT id, body FROM notes ORDER BY id").fetchall()
got = copy.execute("SELECT id, body FROM notes ORDER BY id").fetchall()
assert got == want, "restored rows differ from the source"
assert copy.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
print(
    f"OK: {len(got)} rows replicated to {root}/{name} (txid {replica['replicated_txid']}), "
    f"restored to {restored} and verified"
)
