"""walsync_vfs: continuous replication of SQLite databases, captured at the source.

``import walsync_vfs`` registers the ``walsync`` VFS in apsw's SQLite, and nothing more: no
thread, no file read.  Replication starts on the first ``apsw.Connection(path,
vfs="walsync")`` (or ``configure()``, ``flush()``, ``stats()``): the settings are loaded
then (``$WALSYNC_CONFIG`` or ``./walsync.toml``) and the engine starts.  Every database
opened through the VFS is switched to WAL mode and replicated to the configured replica root.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import sys
import threading
from typing import Any
from urllib.parse import urlsplit

import apsw

try:  # first: every module below needs it
    from walsync_vfs import _shim  # noqa: F401
except ImportError as exc:  # a source tree without the compiled shim shadows the installed one
    _here = os.path.dirname(__file__)
    _built = [n for n in os.listdir(_here) if n.startswith("_shim.") and n.endswith(".so")]
    _why = (
        f"walsync_vfs at {_here} cannot load its compiled shim: {exc}"
        if _built
        else f"walsync_vfs at {_here} has no compiled shim (_shim): build it with "
        "`pip install -e .` there, or run from outside that source directory"
    )
    if sys.argv[:1] == ["-m"]:  # `python -m walsync_vfs`: the CLI's one line, not a traceback
        print(f"walsync: error: {_why}", file=sys.stderr)
        raise SystemExit(1) from None
    raise ImportError(_why) from (exc if _built else None)

from walsync_vfs import capture, metrics, storage
from walsync_vfs.capture import CaptureError
from walsync_vfs.config import (
    ConfigError,
    Settings,
    check_knob,
    check_process_option,
    initial_settings,
    load_file,
)
from walsync_vfs.engine import Engine, ReplicationError
from walsync_vfs.errors import FlushTimeoutError, one_line
from walsync_vfs.storage import StorageError

__all__ = [
    "CaptureError",
    "ConfigError",
    "FlushTimeoutError",
    "ReplicationError",
    "StorageError",
    "configure",
    "flush",
    "stats",
]

DEFAULT_BUSY_TIMEOUT_MS = 5000
SYNC_POINT_WAIT_S = 10.0
# The engine keeps this object: configure() and the start update it in place.
_settings = Settings()
# The config file is read once: a forked child keeps what its parent configured.
_settings_loaded = False
_engine: Engine | None = None
_start_lock = threading.Lock()


_PROCESS_OPTIONS = (
    "name",
    "upload_workers",
    "metrics_port",
    "client_options",
    "memory_cap",
    "spool_dir",
    "spool_cap",
)


def configure(
    replica: str | None = None, *, config: str | os.PathLike | None = None, **options: object
) -> None:
    """Configure replication for databases opened from now on.

    ``replica`` is the root URL (``file:///abs/dir`` or ``s3://bucket/prefix``); without it,
    ``$WALSYNC_REPLICA`` or the local default.  ``config`` loads a walsync.toml file (its
    settings replace the current ones).  Other keywords set defaults for every database
    (``upload_interval``, ``upload_burst``, ``max_segment_bytes``, ``snapshot_interval``,
    ``retention``, ``compact_segments``) or process-wide options (``name``: a function from
    database path to replica name, ``upload_workers``, ``metrics_port``, ``client_options``).
    """
    _engine_instance()  # the file's settings first: what follows overrides them
    new = load_file(config) if config is not None else dataclasses.replace(_settings)
    knobs: dict[str, Any] = {}
    for key, value in options.items():
        if key in _PROCESS_OPTIONS:
            setattr(new, key, check_process_option("configure()", key, value))
        else:
            knobs[key] = check_knob("configure()", key, value, (*_PROCESS_OPTIONS, "config"))
    if isinstance(replica, os.PathLike):
        replica = os.fspath(replica)
    if replica is not None and not isinstance(replica, str):
        raise ConfigError(f"configure(): replica must be a URL or a path, got {replica!r}")
    if replica is not None:
        if replica:  # "" goes back to $WALSYNC_REPLICA or the default
            storage.open_replica(replica, **new.client_options)  # malformed URLs fail here
            if not urlsplit(replica).scheme:  # a directory path: here, not after a chdir
                replica = os.path.abspath(replica)
        knobs["replica"] = replica
    new.defaults = dataclasses.replace(new.defaults, **knobs)
    _adopt(new)
    _serve_metrics()


def flush(timeout: float | None = None) -> None:
    """Block until every transaction committed in this process before the call is durable in
    its replica.  Raises ``TimeoutError`` on timeout and :class:`ReplicationError` when a
    replica keeps failing.  ``timeout``: seconds (None or infinity: no limit; 0 or less: no
    time but the capture thread's hand-over)."""
    if timeout is not None:
        number = isinstance(timeout, numbers.Real) and not isinstance(timeout, bool)
        if not number or math.isnan(timeout):
            raise ValueError(f"flush timeout must be a number of seconds or None, got {timeout!r}")
        if timeout >= threading.TIMEOUT_MAX:  # longer than any wait can be: no limit
            timeout = None
    _engine_instance().flush(timeout)


def stats() -> list[dict]:
    """Per database: last and replicated txid, lag, pending and uploaded bytes, errors."""
    return _engine_instance().stats()


def _engine_instance() -> Engine:
    """The process's engine, started on first use with the settings of the config file
    (a :class:`ConfigError` then leaves nothing started: the next call tries again)."""
    global _engine, _settings_loaded
    if _engine is None:
        with _start_lock:
            if _engine is None:
                if not _settings_loaded:
                    _adopt(initial_settings())
                    _settings_loaded = True
                engine = Engine(_settings)
                # The dispatcher starts with the engine as its default sink: an OPEN queued
                # by the connection being opened reaches the engine, not nowhere.
                capture.dispatcher(default=engine.on_records)
                _engine = engine
    return _engine


def _adopt(new: Settings) -> None:
    """Make ``new`` the settings, in place: the engine holds the object."""
    for f in dataclasses.fields(Settings):
        setattr(_settings, f.name, getattr(new, f.name))


def _serve_metrics() -> None:
    """Serve metrics_port once this process has a database open: a pre-fork server's master
    that only configures leaves the port to the first worker that replicates."""
    if _settings.metrics_port is not None and _has_databases():
        metrics.serve(_settings.metrics_port, lambda: _engine, _has_databases)


def _has_databases() -> bool:
    return capture.lib.ws_open_count() > 0


def _forget_engine_in_child() -> None:
    """A forked child (a pre-fork server's worker) starts its own engine at its first
    open, with the parent's settings: the parent's threads did not come along."""
    global _engine, _start_lock
    if _engine is not None:
        _engine.forget_after_fork()
    _engine = None
    _start_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_engine_in_child)


def _ensure_wal(con: apsw.Connection) -> None:
    """apsw connection hook: a walsync database must be in WAL mode, or capture sees nothing.

    Replication does not depend on it (an application may clear ``apsw.connection_hooks``:
    the shim starts the engine, whose first sync point switches the database to WAL); it
    raises errors where the application opens the database and holds the opener until the
    sync point is pinned.  In-memory and temporary databases pass through unreplicated.
    The test is the shim's answer, not ``con.open_vfs``: a VFS stacked on walsync has a
    name of its own.
    """
    db_id = capture.db_id_of(con)
    if not db_id or con.readonly("main"):
        return  # a read-only connection (immutable=1 too) commits nothing: nothing to wait for
    engine = _engine_instance()  # before anything changes the database: a ConfigError stops it
    # Sync points hold the write lock for microseconds; without a busy timeout a writer that
    # collides with one would fail at once.  The application may set its own afterwards.
    con.set_busy_timeout(DEFAULT_BUSY_TIMEOUT_MS)
    mode = con.pragma("journal_mode")
    if mode != "wal":
        mode = capture.switch_to_wal(
            lambda: str(con.pragma("journal_mode", "WAL")),
            DEFAULT_BUSY_TIMEOUT_MS / 1000,
            apsw.BusyError,
        )
    if mode != "wal":
        raise CaptureError(
            f"{one_line(con.filename or ':memory:')}: walsync needs journal_mode=WAL but SQLite "
            f"kept {mode!r} (it refuses WAL to a file opened with nolock=1); open it without"
        )
    engine.await_sync_point(db_id, SYNC_POINT_WAIT_S)


@capture.ffi.callback("void(void)")
def _on_first_open() -> None:
    """Called by the shim after a database's first open: start the engine (if the connection
    hook was cleared, nothing else would) and the consumer, which ends while no database is
    open.  A bad config file is logged here and raised by the hook, or by the next flush(),
    stats() or configure()."""
    try:
        _engine_instance()
    except Exception as exc:  # noqa: BLE001 - C cannot take it: say it loudly
        capture.log.error("walsync: replication not started: %s", exc)
        return
    _serve_metrics()
    capture.dispatcher()


capture.load()
capture.lib.ws_on_open(_on_first_open)
if _ensure_wal not in apsw.connection_hooks:
    apsw.connection_hooks.append(_ensure_wal)
