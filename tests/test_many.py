"""Issue: many databases in one process — one uploader, idle databases cost nothing."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import apsw
from seaweedfs import free_ports

import walsync_vfs
from walsync_vfs.restore import restore


def test_220_databases_replicate_and_restore(file_replica, tmp_path):
    cons = []
    for i in range(220):
        con = apsw.Connection(str(tmp_path / f"tenant-{i:03d}.db"), vfs="walsync")
        con.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT)")
        cons.append(con)
    for round_ in range(3):
        for i, con in enumerate(cons):
            con.execute("INSERT INTO t(v) VALUES(?)", (f"{i}:{round_}",))
    for con in cons[::2]:  # tenants come and go
        con.close()
    walsync_vfs.flush(timeout=120)
    for i in range(220):
        out = tmp_path / f"r{i}.db"
        restore(f"{file_replica}/tenant-{i:03d}.db", str(out))
        got = apsw.Connection(str(out)).execute("SELECT v FROM t ORDER BY k").fetchall()
        assert got == [(f"{i}:{r}",) for r in range(3)]
    for con in cons[1::2]:
        con.close()


def test_idle_databases_make_no_requests(file_replica, tmp_path):
    cons = [apsw.Connection(str(tmp_path / f"idle{i}.db"), vfs="walsync") for i in range(20)]
    for con in cons:
        con.execute("CREATE TABLE t(x); INSERT INTO t VALUES(1)")
    walsync_vfs.flush(timeout=60)
    client = walsync_vfs._engine_instance()._clients[file_replica]
    before = client.requests
    time.sleep(2.5)  # more than upload_interval: a poller would have shown up
    assert client.requests == before
    cons[0].execute("INSERT INTO t VALUES(2)")
    walsync_vfs.flush(timeout=60)
    assert client.requests == before + 1  # exactly one PUT for one commit
    for con in cons:
        con.close()


def test_stats_and_prometheus_endpoint(file_replica, tmp_path):
    con = apsw.Connection(str(tmp_path / "metered.db"), vfs="walsync")
    con.execute("CREATE TABLE t(x)")
    for i in range(5):
        con.execute("INSERT INTO t VALUES(?)", (i,))
    walsync_vfs.flush(timeout=30)
    (s,) = [s for s in walsync_vfs.stats() if s["name"] == "metered.db"]
    assert s["last_txid"] == s["replicated_txid"] == 7  # snapshot, CREATE, 5 inserts
    assert s["lag_seconds"] == 0 and s["pending_commits"] == 0 and s["errors"] == 0
    assert s["bytes_uploaded"] > 0
    (port,) = free_ports(1)
    walsync_vfs.configure(metrics_port=port)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    labels = f'database="metered.db",path="{tmp_path / "metered.db"}"'
    assert f"walsync_replicated_txid{{{labels}}} 7.0" in body
    assert f"walsync_lag_seconds{{{labels}}} 0.0" in body
    con.close()


PREFORK_METRICS = """
import os, sys, time, urllib.request, apsw, walsync_vfs
walsync_vfs.configure(replica=sys.argv[2], metrics_port=int(sys.argv[3]))  # the master
child = os.fork()
if child == 0:  # a worker: the first to open a database serves the port
    con = apsw.Connection(sys.argv[1], vfs="walsync")
    con.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
    walsync_vfs.flush(timeout=30)
    url = f"http://127.0.0.1:{sys.argv[3]}/metrics"
    print(urllib.request.urlopen(url, timeout=10).read().decode(), flush=True)
    os._exit(0)
os.waitpid(child, 0)
"""


def test_metrics_of_a_pre_fork_server_are_served_by_the_worker_that_replicates(
    tmp_path: Path, file_url: str
) -> None:
    """A master that configures metrics_port and forks never opens a database: the port is
    left to the worker that replicates one, not served empty by the master."""
    (port,) = free_ports(1)
    path = tmp_path / "a.db"
    out = subprocess.run(
        [sys.executable, "-c", PREFORK_METRICS, str(path), file_url, str(port)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f'walsync_replicated_txid{{database="a.db",path="{path}"}} 3.0' in out.stdout


FOLLOWER_METRICS = """
import json, sys, urllib.request, apsw, walsync_vfs
walsync_vfs.configure(replica=sys.argv[2], metrics_port=int(sys.argv[3]))
con = apsw.Connection(sys.argv[1], vfs="walsync")  # another process leads it
con.execute("INSERT INTO t VALUES (2)")
walsync_vfs.flush(timeout=30)
print(json.dumps(walsync_vfs.stats()))
url = f"http://127.0.0.1:{sys.argv[3]}/metrics"
print(urllib.request.urlopen(url, timeout=10).read().decode(), flush=True)
"""


def test_a_worker_serving_metrics_reports_databases_another_worker_leads(
    file_replica: str, tmp_path: Path
) -> None:
    """Of a server's workers only one serves the metrics port, and it need not lead every
    database: for one another process leads, its stats() and metrics give the leader's
    figures, asked of the leader when read."""
    path = tmp_path / "a.db"
    con = apsw.Connection(str(path), vfs="walsync")  # this process leads
    con.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
    walsync_vfs.flush(timeout=30)
    (port,) = free_ports(1)
    out = subprocess.run(
        [sys.executable, "-c", FOLLOWER_METRICS, str(path), file_replica, str(port)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    stats, body = out.stdout.split("\n", 1)
    (state,) = json.loads(stats)
    assert state["leader"] is False
    assert state["last_txid"] == state["replicated_txid"] == 4  # snapshot, CREATE, 2 INSERTs
    assert state["lag_seconds"] == 0 and state["errors"] == 0 and state["fenced"] == ""
    assert f'walsync_replicated_txid{{database="a.db",path="{path}"}} 4.0' in body
    con.close()


METRICS_APP = """
import sys, apsw, walsync_vfs
walsync_vfs.configure(replica=sys.argv[2], metrics_port=int(sys.argv[3]))
con = apsw.Connection(sys.argv[1], vfs="walsync")
con.execute("CREATE TABLE IF NOT EXISTS t(x); INSERT INTO t VALUES (1)")
walsync_vfs.flush(timeout=30)
print("leader" if walsync_vfs.stats()[0]["leader"] else "follower", flush=True)
sys.stdin.readline()
"""


def scraped_txid(port: int, path: Path) -> float | None:
    """walsync_last_txid of ``path`` on the endpoint (None: not reported, or not served)."""
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    except OSError:
        return None
    series = f'walsync_last_txid{{database="{path.name}",path="{path}"}} '
    lines = [line for line in body.decode().splitlines() if line.startswith(series)]
    return float(lines[0].removeprefix(series)) if lines else None


def scraped_within(port: int, path: Path, seconds: float) -> float:
    deadline = time.monotonic() + seconds
    while (txid := scraped_txid(port, path)) is None:
        assert time.monotonic() < deadline, f"no walsync_last_txid of {path} on port {port}"
        time.sleep(0.2)
    return txid


def test_the_metrics_port_passes_to_a_process_that_can_serve_it(
    tmp_path: Path, file_url: str
) -> None:
    """The process serving metrics_port goes away (the leader killed): another that has the
    database open takes the port within a few seconds, instead of having warned once at its
    start and never tried again."""
    port, path = free_ports(1)[0], tmp_path / "a.db"
    cmd = [sys.executable, "-c", METRICS_APP, str(path), file_url, str(port)]
    first = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    second = None
    try:
        assert first.stdout is not None and first.stdout.readline() == "leader\n"
        second = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert second.stdout is not None and second.stdout.readline() == "follower\n"
        assert scraped_within(port, path, 10) == 4  # snapshot, CREATE, 2 INSERTs
        first.kill()
        first.wait()
        assert scraped_within(port, path, 20) == 4
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.kill()
                proc.wait()


PREFORK_CLOSED = """
import os, sys, apsw, walsync_vfs
walsync_vfs.configure(replica=sys.argv[2], metrics_port=int(sys.argv[3]))
con = apsw.Connection(sys.argv[1], vfs="walsync")  # the master's migrations
con.execute("CREATE TABLE t(x)")
walsync_vfs.flush(timeout=30)
con.close()
if os.fork() == 0:  # a worker, which replicates from now on
    worker = apsw.Connection(sys.argv[1], vfs="walsync")
    worker.execute("INSERT INTO t VALUES (1)")
    walsync_vfs.flush(timeout=30)
    print("worker", flush=True)
    sys.stdin.readline()
    os._exit(0)
sys.stdin.readline()
"""


def test_a_pre_fork_master_that_closed_its_database_leaves_metrics_to_a_worker(
    tmp_path: Path, file_url: str
) -> None:
    """A master that opened the database (migrations), closed it and forked took the port:
    it gives it up, having no database to report, and a worker serves it; a worker holds
    no copy of the master's listening socket, which would hang scrapes once the master
    exits."""
    port, path = free_ports(1)[0], tmp_path / "a.db"
    master = subprocess.Popen(
        [sys.executable, "-c", PREFORK_CLOSED, str(path), file_url, str(port)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert master.stdout is not None and master.stdout.readline() == "worker\n"
        assert scraped_within(port, path, 20) == 3  # snapshot, CREATE, INSERT
        master.kill()  # the worker keeps running: it has the master's stdin
        master.wait()
        assert scraped_within(port, path, 20) == 3
    finally:
        master.kill()
        master.wait()
        with contextlib.suppress(OSError):
            master.stdin.close()  # type: ignore[union-attr]


PER_REQUEST = """
import sys, urllib.request, apsw, walsync_vfs
walsync_vfs.configure(replica=sys.argv[2], metrics_port=int(sys.argv[3]))
url = f"http://127.0.0.1:{sys.argv[3]}/metrics"
for i in range(3):  # each request opens the database, writes, and closes it
    con = apsw.Connection(sys.argv[1], vfs="walsync")
    con.execute("CREATE TABLE IF NOT EXISTS t(x); INSERT INTO t VALUES (1)")
    walsync_vfs.flush(timeout=30)
    con.close()
    print(urllib.request.urlopen(url, timeout=10).status, flush=True)
"""


def test_a_process_that_opens_a_database_per_request_keeps_serving_metrics(
    tmp_path: Path, file_url: str
) -> None:
    """A lone process with no database open between requests is asked for the port by no
    one, so it keeps serving it: scrapes between requests are answered, not refused."""
    port = free_ports(1)[0]
    out = subprocess.run(
        [sys.executable, "-c", PER_REQUEST, str(tmp_path / "a.db"), file_url, str(port)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout == "200\n200\n200\n"


METRICS_CHILD = """
import logging, sys, apsw, walsync_vfs
logging.basicConfig(level=logging.WARNING, format="%(message)s")
walsync_vfs.configure(replica=sys.argv[2])
con = apsw.Connection(sys.argv[1], vfs="walsync")
con.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
walsync_vfs.flush(timeout=30)
print(walsync_vfs.stats()[0]["replicated_txid"])
"""


def test_a_metrics_port_another_process_serves_leaves_replication_going(
    tmp_path: Path, file_url: str
) -> None:
    """Every worker of a server reads the same walsync.toml: the first serves the metrics
    port, the others warn and replicate as usual."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "walsync.toml").write_text(f"metrics_port = {port}\n")
        out = subprocess.run(
            [sys.executable, "-c", METRICS_CHILD, str(tmp_path / "a.db"), file_url],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout == "3\n"  # snapshot, CREATE, INSERT
    assert f"walsync: metrics not served by this process: port {port}: " in out.stderr
    assert "Traceback" not in out.stderr
