"""Open-file limits: replication holds several descriptors per database, so an application
that fit under a low soft limit without walsync must still fit with it, and a limit that
cannot be raised is reported before the opens start failing."""

from __future__ import annotations

import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Opens `n` databases through walsync, one commit each, flushes, then prints the soft
# limit and how many databases the replica holds.
CHILD = textwrap.dedent(
    """
    import logging, os, resource, sys
    import apsw, walsync_vfs
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work, n = sys.argv[1], int(sys.argv[2])
    walsync_vfs.configure(replica="file://" + os.path.join(work, "replica"))
    cons = []
    for i in range(n):
        con = apsw.Connection(os.path.join(work, f"d{i}.db"), vfs="walsync")
        con.execute("CREATE TABLE t(a); INSERT INTO t VALUES (1)")
        cons.append(con)
    walsync_vfs.flush(timeout=60)
    done = sum(s["replicated_txid"] >= 2 for s in walsync_vfs.stats())
    print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], done)
    """
)


def run_child(tmp_path: Path, n: int, soft: int, hard: int) -> subprocess.CompletedProcess[str]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), str(n)],
        preexec_fn=limit, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_a_low_soft_limit_is_raised_as_needed_so_an_application_that_fit_still_fits(
    tmp_path: Path,
) -> None:
    """60 databases hold ~180 descriptors under plain SQLite, under a soft limit of 256;
    through walsync they need ~480, so the engine doubles the soft limit as they open: to 512
    at the 25th database (25 x 8 past 3/4 of 256), to 1,024 at the 49th, and no further."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip(f"hard open-file limit {hard}: no room to raise the soft one to 1,024")
    out = run_child(tmp_path, 60, 256, hard)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1024", "60"]
    raised = [line for line in out.stderr.splitlines() if "raised the open-file limit" in line]
    assert raised == [
        "walsync: raised the open-file limit from 256 to 512 for 25 databases (about 8"
        " descriptors each)",
        "walsync: raised the open-file limit from 512 to 1024 for 49 databases (about 8"
        " descriptors each)",
    ]
    assert "databases open" not in out.stderr  # no warning: the limit made room


def test_a_few_databases_leave_the_limit_alone(tmp_path: Path) -> None:
    """A child process inherits the limit: it is raised only when walsync needs the room."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    out = run_child(tmp_path, 5, 256, hard)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["256", "5"]
    assert "open-file limit" not in out.stderr


def test_a_limit_that_cannot_be_raised_is_reported_once_before_opens_fail(
    tmp_path: Path,
) -> None:
    """With soft = hard = 320, the warning comes at the 31st database (31 x 8 past 3/4 of
    the limit), once, while the opens still succeed."""
    out = run_child(tmp_path, 34, 320, 320)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["320", "34"]
    warnings = [line for line in out.stderr.splitlines() if "databases open" in line]
    assert warnings == [
        "walsync: 31 databases open, and replication holds about 8 file descriptors for each:"
        " this process may open 320 (hard limit 320); raise the limit (ulimit -n, or"
        " ulimit -Hn as root) before opening more"
    ]
