"""Issue: ``import walsync_vfs`` starts no thread and reads no config file.  Replication (the
settings, the engine, the capture dispatcher) starts on the first ``vfs="walsync"`` open, where
a bad walsync.toml is one line naming the file and key; the CLI never reads walsync.toml.

Each case runs in a fresh interpreter: in this one an earlier test has started replication.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import apsw
import pytest

BAD_TOML = '[defaults]\nupload_interval = "fast"\n'


def bad_message(path: Path) -> str:
    return (
        f"{path} [defaults]: upload_interval must be a number, got 'fast'; "
        "fix that file, or set $WALSYNC_CONFIG to another one"
    )


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    """A working directory holding an invalid walsync.toml."""
    d = tmp_path / "app"
    d.mkdir()
    (d / "walsync.toml").write_text(BAD_TOML)
    return d


def environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This environment without walsync's variables (the default replica under tmp_path)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALSYNC_")}
    return {**env, "XDG_DATA_HOME": str(tmp_path / "xdg"), **extra}


def run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


IMPORT_ONLY = """
import json, sys, threading
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" else None)
import walsync_vfs
print(json.dumps({
    "threads": [t.name for t in threading.enumerate()],
    "toml": [p for p in opened if p.endswith(".toml")],
}))
"""


@pytest.mark.parametrize("source", ["cwd", "env"])
def test_import_starts_no_thread_and_reads_no_config(app_dir, tmp_path, source):
    extra = {"WALSYNC_CONFIG": str(app_dir / "walsync.toml")} if source == "env" else {}
    proc = run(["-c", IMPORT_ONLY], app_dir, environment(tmp_path, **extra))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"threads": ["MainThread"], "toml": []}


FIRST_OPEN = """
import json, sys, threading
import apsw, walsync_vfs
before = [t.name for t in threading.enumerate()]
con = apsw.Connection(sys.argv[1], vfs="walsync")
con.execute("CREATE TABLE t(x)")
con.execute("INSERT INTO t VALUES ('first'), ('second')")
walsync_vfs.flush(timeout=60)
(state,) = walsync_vfs.stats()
threads = {t.name for t in threading.enumerate()}
print(json.dumps({
    "before": before,
    "started": sorted({"walsync-capture", "walsync-upload"} & threads),
    "txids": [state["last_txid"], state["replicated_txid"]],
}))
"""


@pytest.fixture
def replica(tmp_path: Path) -> str:
    """A local-directory replica of app.db, written by a fresh process whose first open
    started replication (its OPEN, queued before the engine existed, was not lost)."""
    root = (tmp_path / "replica").as_uri()
    work = tmp_path / "writer"
    work.mkdir()
    proc = run(
        ["-c", FIRST_OPEN, str(work / "app.db")], work, environment(tmp_path, WALSYNC_REPLICA=root)
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "before": ["MainThread"],
        "started": ["walsync-capture", "walsync-upload"],
        "txids": [3, 3],  # the empty database at open, then the two commits
    }
    return root


@pytest.mark.parametrize("source", ["cwd", "env"])
def test_cli_ignores_walsync_toml(replica, app_dir, tmp_path, source):
    extra = {"WALSYNC_CONFIG": str(app_dir / "walsync.toml")} if source == "env" else {}
    env = environment(tmp_path, **extra)
    url = f"{replica}/app.db"

    listed = run(["-m", "walsync_vfs", "list", replica, "--json"], app_dir, env)
    assert listed.returncode == 0, listed.stderr
    (db,) = json.loads(listed.stdout)["databases"]
    assert db["generations"][-1]["last_txid"] == 3

    out = app_dir / "restored.db"
    restored = run(["-m", "walsync_vfs", "restore", url, "-o", str(out)], app_dir, env)
    assert restored.returncode == 0, restored.stderr
    con = apsw.Connection(str(out))
    assert con.execute("SELECT x FROM t ORDER BY rowid").fetchall() == [("first",), ("second",)]
    con.close()

    verified = run(["-m", "walsync_vfs", "verify", url], app_dir, env)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith(
        f"{url}: every object, txid chain and database checksum verified; restorable: txids 1.."
    )
    assert "" == listed.stderr == restored.stderr == verified.stderr


BAD_OPEN = """
import json, threading
import apsw, walsync_vfs
try:
    apsw.Connection("app.db", vfs="walsync")
except walsync_vfs.ConfigError:
    print(json.dumps([t.name for t in threading.enumerate()]))
    raise
"""


def test_first_open_with_a_bad_walsync_toml_is_one_line(app_dir, tmp_path):
    proc = run(["-c", BAD_OPEN], app_dir, environment(tmp_path))
    assert proc.returncode == 1
    assert json.loads(proc.stdout) == ["MainThread"]  # nothing started
    last = proc.stderr.splitlines()[-1]
    assert last == f"walsync_vfs.config.ConfigError: {bad_message(app_dir / 'walsync.toml')}"
    assert "During handling" not in proc.stderr
    assert "direct cause" not in proc.stderr


RETRY = """
import sys
import apsw, walsync_vfs
try:
    apsw.Connection("app.db", vfs="walsync")
except walsync_vfs.ConfigError as exc:
    print(exc)
open("walsync.toml", "w").write(f'[defaults]\\nreplica = "{sys.argv[1]}"\\n')
con = apsw.Connection("app.db", vfs="walsync")
con.execute("CREATE TABLE t(x)")
walsync_vfs.flush(timeout=60)
(state,) = walsync_vfs.stats()
print(state["replicated_txid"])
"""


def test_a_fixed_walsync_toml_applies_at_the_next_open(app_dir, tmp_path):
    root = (tmp_path / "replica").as_uri()
    proc = run(["-c", RETRY, root], app_dir, environment(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [bad_message(app_dir / "walsync.toml"), "2"]
    assert (tmp_path / "replica" / "app.db").is_dir()


# ``python -m walsync_vfs`` as a non-editable install runs it: the package is looked up on
# sys.path, where the current directory comes first.  (This suite's editable install finds
# the package by a finder of its own, ahead of sys.path: taken out here.)
CLI_IN_A_CLONE = """
import runpy, sys
sys.meta_path[:] = [
    f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")
]
sys.path.insert(0, "")
sys.argv[0] = "-m"  # as while `python -m` looks for the module
runpy.run_module("walsync_vfs", run_name="__main__", alter_sys=True)
"""


def test_a_source_tree_without_the_compiled_shim_says_how_to_build_it(tmp_path):
    """``python -m walsync_vfs`` run inside a clone whose package was installed (not in
    place) imports the clone's sources, which have no compiled shim: the error says so and
    what to do, whichever module needs the shim first."""
    import walsync_vfs

    clone = tmp_path / "clone"
    shutil.copytree(
        Path(walsync_vfs.__file__).parent,
        clone / "walsync_vfs",
        ignore=shutil.ignore_patterns("_shim*.so", "__pycache__"),
    )
    args = ["-c", CLI_IN_A_CLONE, "list", f"file://{tmp_path}"]
    why = (
        f"walsync_vfs at {clone / 'walsync_vfs'} has no compiled shim (_shim): build it with "
        "`pip install -e .` there, or run from outside that source directory"
    )
    out = run(args, clone, environment(tmp_path))
    assert (out.returncode, out.stderr) == (1, f"walsync: error: {why}\n")
    # Imported by an application instead, it is an ImportError like any other.
    imported = CLI_IN_A_CLONE.split("sys.argv[0]")[0] + "import walsync_vfs\n"
    out = run(["-c", imported], clone, environment(tmp_path))
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1] == f"ImportError: {why}"
