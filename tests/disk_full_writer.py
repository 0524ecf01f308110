"""Child process of test_faults.test_disk_full_spool_*: an app whose spool disk is really full.

Runs in its own mount namespace (``unshare --mount``, with ``--user --map-root-user`` when not
root), so the tiny tmpfs it mounts as the spool directory is seen by nobody else and vanishes
with it.  Talks to the test over stdin/stdout, one JSON object per line:

1. mounts the tmpfs, fills it but for ``FREE`` bytes, opens the database, flushes,
   says ``{"ready": ...}`` (or ``{"skip": reason}`` when it cannot mount);
2. on ``go`` (the store is frozen now) commits steadily until the engine reports that it
   could not spool, and says what it saw: slowest commit, stats, the spool directory;
3. on ``resume`` (the store is back) commits a little more, flushes, says ``{"done": ...}``.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import time

TMPFS_BYTES = 256 << 10
FREE = 16 << 10  # less than one spilled segment: the first spill fails half-written
FILLER = "filler"
ERROR_WAIT = 30.0


def say(**obj: object) -> None:
    print(json.dumps(obj), flush=True)


def expect(word: str) -> None:
    line = sys.stdin.readline().strip()
    if line != word:
        raise SystemExit(f"expected {word!r} from the test, got {line!r}")


def held_record(path: str) -> bool:
    """Whether ``path`` is a whole commit held during a sync (``SyncState.hold_spooled``): the
    engine may be holding some when the error is seen, and rightly so."""
    if not path.endswith(".wheld"):
        return False
    try:
        with open(path, "rb") as f:
            pickle.load(f)
    except Exception:  # noqa: BLE001 - cut short, or still being written
        return False
    return True


def spool_state(spool: str) -> dict[str, object]:
    """Spool files, and the free space as if no local copies of recently uploaded segments
    (kept in a subdirectory, and dropped when a lineage breaks) and no whole held commits
    were there: any other file is one the engine should not have left."""
    from walsync_vfs import recent  # imported by main() once the tmpfs is mounted

    st = os.statvfs(spool)
    free = st.f_bavail * st.f_frsize
    files = []
    for name in sorted(os.listdir(spool)):
        path = os.path.join(spool, name)
        if held_record(path):
            free += os.stat(path).st_blocks * 512
            continue
        if not name.startswith(recent.DIR_PREFIX):
            files.append(name)
            continue
        for copies in os.scandir(os.path.join(spool, name)):
            free += copies.stat().st_blocks * 512
    return {"files": files, "free": free}


def main(db_path: str, replica: str, spool: str) -> None:
    try:
        mount = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", spool],
            capture_output=True,
            text=True,
        )
        failure = (
            (mount.stderr.strip() or f"exit status {mount.returncode}") if mount.returncode else ""
        )
    except OSError as exc:  # no mount(8)
        failure = str(exc)
    if failure:
        say(skip=f"cannot mount a tmpfs: {failure}")
        return
    with open(os.path.join(spool, FILLER), "wb") as f:
        f.write(b"\0" * (TMPFS_BYTES - FREE))

    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(message)s")
    import apsw

    import walsync_vfs

    walsync_vfs.configure(
        replica=replica, upload_interval=0.0, memory_cap=64 << 10, spool_dir=spool
    )
    con = apsw.Connection(db_path, vfs="walsync")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    con.execute("INSERT INTO t(v) VALUES(randomblob(3000))")
    walsync_vfs.flush(timeout=30)
    say(ready=spool_state(spool))

    expect("go")
    (name,) = [s["name"] for s in walsync_vfs.stats()]
    slowest, commits, seen = 0.0, 0, None
    deadline = time.monotonic() + ERROR_WAIT
    while seen is None and time.monotonic() < deadline:
        t0 = time.monotonic()
        con.execute("INSERT INTO t(v) VALUES(randomblob(3000))")
        slowest = max(slowest, time.monotonic() - t0)
        commits += 1
        time.sleep(0.01)
        seen = next((s for s in walsync_vfs.stats() if s["last_error"].startswith("spool: ")), None)
    say(outage={"commits": commits, "slowest": slowest, "stats": seen, **spool_state(spool)})

    expect("resume")
    for _ in range(20):
        con.execute("INSERT INTO t(v) VALUES(randomblob(3000))")
    walsync_vfs.flush(timeout=120)
    engine = walsync_vfs._engine_instance()
    (after,) = [s for s in walsync_vfs.stats() if s["name"] == name]
    say(done={"spool_used": engine._spool.used, "stats": after, **spool_state(spool)})
    con.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
