"""Child process of test_follow and benchmarks/bigdata.py: reads a ``restore --follow`` output
over and over, checking an invariant its source's writer keeps, until SIGTERM.

``follow_reader.py OUT [LOG [PAUSE]]``: every read is ``SELECT max(rowid) FROM t`` and
``SELECT n FROM head`` in one read transaction, which must be equal (the writer sets
``head.n`` to the newest rowid in the transaction that inserts it) and never go back.  One
connection is held open throughout (its page cache must notice every update); every 20th
read also opens a fresh one.  Plain SQLite, read-only, rollback-journal mode, with a busy
timeout.  On SIGTERM it prints one JSON line: reads, reads started while an update was open
(``OUT-journal`` present), violations (a count and the first few), distinct values seen.
With LOG, each new value is logged as "value unix-time" when first seen; PAUSE seconds
between reads (default none: as many reads as one core allows).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import apsw

QUERY = "SELECT (SELECT max(rowid) FROM t), (SELECT n FROM head)"
BUSY_MS = 20_000


def open_reader(path: str) -> apsw.Connection:
    con = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY, vfs="unix")
    con.setbusytimeout(BUSY_MS)
    return con


def main() -> None:
    path, *options = sys.argv[1:]
    log = open(options[0], "w", buffering=1) if options else None  # noqa: SIM115 (closed at the end)
    pause = float(options[1]) if len(options) > 1 else 0.0
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    held = open_reader(path)
    reads = during = 0
    violations: list[str] = []
    count = 0
    last = 0
    seen: set[int] = set()
    print("ready", flush=True)
    while not stop:
        busy = os.path.exists(path + "-journal")
        cons = [held] if reads % 20 else [held, open_reader(path)]
        for con in cons:
            try:
                rowid, head = con.execute(QUERY).fetchone()
            except apsw.Error as exc:
                rowid, head = None, f"{type(exc).__name__}: {exc}"
            if rowid is None or rowid != head or rowid < last:
                count += 1
                if len(violations) < 5:
                    violations.append(f"max(rowid) {rowid}, head {head}, after {last}")
            else:
                if log is not None and rowid != last:
                    log.write(f"{rowid} {time.time()}\n")
                last = rowid
                seen.add(rowid)
            reads += 1
            during += busy
        if con is not held:
            con.close()
        time.sleep(pause)
    if log is not None:
        log.close()
    result = {"reads": reads, "during_apply": during, "violations": count,
              "first_violations": violations, "values": len(seen)}  # fmt: skip
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
