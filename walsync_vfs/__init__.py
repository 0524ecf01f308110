"""walsync_vfs: continuous replication of SQLite databases, captured at the source.

``import walsync_vfs`` registers the ``walsync`` VFS in apsw's SQLite and starts the
replication engine.  Every database opened with ``apsw.Connection(path, vfs="walsync")`` is
switched to WAL mode and replicated to the configured replica root.
"""

from __future__ import annotations

import dataclasses
import os

import apsw

from walsync_vfs import capture, metrics, storage
from walsync_vfs.capture import CaptureError
from walsync_vfs.config import Settings, check_knob, initial_settings, load_file
from walsync_vfs.engine import Engine, ReplicationError

__all__ = ["CaptureError", "ReplicationError", "configure", "flush", "stats"]

DEFAULT_BUSY_TIMEOUT_MS = 5000
SYNC_POINT_WAIT_S = 10.0
_settings = initial_settings()
_engine: Engine | None = None


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
    new = load_file(config) if config is not None else dataclasses.replace(_settings)
    knobs = {}
    for key, value in options.items():
        if key in _PROCESS_OPTIONS:
            setattr(new, key, value)
        else:
            try:
                knobs[key] = check_knob("configure()", key, value)
            except ValueError as exc:
                raise (TypeError if "unknown key" in str(exc) else ValueError)(str(exc)) from None
    if replica is not None:
        if replica:  # "" goes back to $WALSYNC_REPLICA or the default
            storage.open_replica(replica, **new.client_options)  # malformed URLs fail here
        knobs["replica"] = replica
    new.defaults = dataclasses.replace(new.defaults, **knobs)
    for f in dataclasses.fields(Settings):
        setattr(_settings, f.name, getattr(new, f.name))
    if _settings.metrics_port is not None:
        metrics.serve(_settings.metrics_port, _engine_instance())


def flush(timeout: float | None = None) -> None:
    """Block until every transaction committed in this process before the call is durable in
    its replica.  Raises ``TimeoutError`` on timeout and :class:`ReplicationError` when a
    replica keeps failing."""
    _engine_instance().flush(timeout)


def stats() -> list[dict]:
    """Per database: last and replicated txid, lag, pending and uploaded bytes, errors."""
    return _engine_instance().stats()


def _engine_instance() -> Engine:
    global _engine
    if _engine is None:
        _engine = Engine(_settings)
        capture.dispatcher().default = _engine.on_records
    return _engine


def _forget_engine_in_child() -> None:
    """A forked child (a pre-fork server's worker) starts its own engine at its first
    open: the parent's threads did not come along."""
    global _engine
    if _engine is not None:
        _engine.forget_after_fork()
    _engine = None


os.register_at_fork(after_in_child=_forget_engine_in_child)


def _ensure_wal(con: apsw.Connection) -> None:
    """apsw connection hook: a walsync database must be in WAL mode, or capture sees nothing."""
    if con.open_vfs != capture.VFS_NAME or capture.opening_internally():
        return
    # Sync points hold the write lock for microseconds; without a busy timeout a writer that
    # collides with one would fail at once.  The application may set its own afterwards.
    con.set_busy_timeout(DEFAULT_BUSY_TIMEOUT_MS)
    mode = con.execute("PRAGMA journal_mode").fetchone()[0]
    if mode != "wal":
        mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode != "wal":
        raise CaptureError(
            f"{con.filename or ':memory:'}: walsync needs journal_mode=WAL but SQLite kept "
            f"{mode!r}; open an on-disk database file"
        )
    _engine_instance().await_sync_point(capture.db_id_of(con), SYNC_POINT_WAIT_S)


capture.load()
_engine_instance()  # before any database opens, so no OPEN record finds no sink
if _settings.metrics_port is not None:
    metrics.serve(_settings.metrics_port, _engine_instance())
if _ensure_wal not in apsw.connection_hooks:
    apsw.connection_hooks.append(_ensure_wal)
