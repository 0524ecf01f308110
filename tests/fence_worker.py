"""One writer of a replica name for the fencing tests: its own engine, host id and database.

Usage: fence_worker.py DB REPLICA LEASE_TIME   (the host id comes from $WALSYNC_HOST_ID)

Prints ``{"pid": ...}`` once the database is open, then obeys one command per stdin line,
answering each with one JSON line: ``write N`` (N commits of a row tagged with the host id),
``flush`` (``{"flush": "ok"}`` or ``{"flush": "error", "text": ...}``), ``stats`` (the
database's fenced reason, generation and lease epoch) and ``exit`` (close the database and
exit; replication releases the lease).
"""

from __future__ import annotations

import json
import logging
import os
import sys

import apsw

import walsync_vfs


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def main() -> None:
    path, replica, lease_time = sys.argv[1], sys.argv[2], float(sys.argv[3])
    logging.basicConfig(level=os.environ.get("WALSYNC_TEST_LOG", "WARNING"))
    walsync_vfs.configure(replica=replica, lease_time=lease_time, upload_interval=0.05)
    con = apsw.Connection(path, vfs="walsync")
    con.set_busy_timeout(10_000)
    host = os.environ["WALSYNC_HOST_ID"]
    say(pid=os.getpid())
    for line in sys.stdin:
        command, *args = line.split()
        if command == "write":
            for _ in range(int(args[0])):
                con.execute("INSERT INTO t(host, v) VALUES (?, randomblob(200))", (host,))
            say(wrote=int(args[0]))
        elif command == "flush":
            try:
                walsync_vfs.flush(timeout=60)
                say(flush="ok")
            except walsync_vfs.ReplicationError as exc:
                say(flush="error", text=str(exc))
        elif command == "stats":
            (s,) = walsync_vfs.stats()
            say(fenced=s["fenced"], generation=s["generation"], epoch=s["lease_epoch"])
        elif command == "exit":
            con.close()
            say(bye=True)
            return


if __name__ == "__main__":
    main()
