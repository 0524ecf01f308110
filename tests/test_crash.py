"""Issue 6: crash torture, the short CI variant of benchmarks/crash_torture.py.

A writer replicating through the VFS is SIGKILLed at random moments; after every kill the
replica must restore to a sound state that holds every acknowledged commit.  The checker is
tested first on states it must reject, so a passing torture run means something.
"""

from __future__ import annotations

import importlib
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import apsw
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPT = BENCHMARKS / "crash_torture.py"


@pytest.fixture(scope="module")
def torture() -> ModuleType:
    """The benchmark module (it lives outside the package, in benchmarks/)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module("crash_torture")
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture
def workload_db(torture: ModuleType, tmp_path: Path) -> str:
    """A database after 80 random workload steps (plain SQLite: the checker is what's tested)."""
    path = str(tmp_path / "w.db")
    con = apsw.Connection(path)
    con.execute("PRAGMA journal_mode=WAL")
    w = torture.Writer(con, random.Random(6))
    for _ in range(80):
        w.step(w.next_kind())
    w.step("insert")  # the last step touches kv, so dropping its log row must be noticed
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return path


def _damaged(src: str, dst: Path, sql: str) -> str:
    shutil.copyfile(src, dst)
    con = apsw.Connection(str(dst))
    con.execute(sql)
    con.close()
    return str(dst)


def test_checker_accepts_workload_states_and_rejects_impossible_ones(
    torture: ModuleType, workload_db: str, tmp_path: Path
) -> None:
    state = torture.read_state(workload_db)
    assert state["k"] > 80  # mixed steps log several rows
    assert state["rows"]["bulk"], "the workload never ran a big transaction"
    impossible = {
        "hole in seqs": "DELETE FROM log WHERE seq = 10",
        "effect without its log row": "DELETE FROM log WHERE seq = (SELECT max(seq) FROM log)",
        "rolled-back rows": f"INSERT INTO bulk(tag, v) VALUES({torture.ROLLBACK_TAG}, x'00')",
        "torn bulk batch": "DELETE FROM bulk WHERE id = (SELECT max(id) FROM bulk)",
        "changed value": "UPDATE kv SET v = v || '!' WHERE k = (SELECT min(k) FROM kv)",
    }
    for i, (what, sql) in enumerate(impossible.items()):
        bad = _damaged(workload_db, tmp_path / f"bad{i}.db", sql)
        with pytest.raises(torture.Unsound):
            torture.read_state(bad)
            pytest.fail(f"the checker accepted a state with a {what}")


def test_short_crash_torture_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    proc = subprocess.run(
        [
            *(sys.executable, str(SCRIPT), "--cycles", "8", "--final-txns", "30"),
            *("--json", str(out), "--dir", str(tmp_path / "work")),  # kept by pytest on failure
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["failures"] == 0, proc.stdout[-5000:]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert summary["cycles"] == summary["kills"] == 8
    assert summary["restores"] >= 1  # after each kill once a replica exists, and at the end
    assert summary["acked_txns"] > 0
    assert summary["final_rows"]["log"] == summary["acked_seq"]  # the final flush acked all
    assert summary["verify_exit"] == 0
    assert summary["generations"] >= 1
