"""Where and how databases replicate: replica root, names, and knobs, per database.

Settings come from ``walsync_vfs.configure(...)``, a TOML file (``configure(config=...)``,
``$WALSYNC_CONFIG`` or ``./walsync.toml``) and ``$WALSYNC_REPLICA``.  A TOML file has
``[defaults]`` and any number of ``[[databases]]`` tables whose ``match`` glob (on the file's
base name or full path) applies per-database overrides; later tables win::

    [defaults]
    replica = "s3://bucket/prefix"
    upload_interval = 1.0

    [[databases]]
    match = "tenant-*.db"
    retention = 604800

Unknown keys and bad values raise :class:`ConfigError`, naming the file, table and key.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from walsync_vfs.errors import one_line
from walsync_vfs.format import check_name
from walsync_vfs.storage import StorageError, client_option_names, replica_location
from walsync_vfs.storage.file import check_root

ENV_REPLICA = "WALSYNC_REPLICA"
ENV_CONFIG = "WALSYNC_CONFIG"
DEFAULT_CONFIG_FILE = "walsync.toml"


class ConfigError(ValueError):
    """A setting is invalid; the message names where it came from (file, table) and the key."""


class UnknownKeyError(ConfigError, TypeError):
    """A key no setting has (a ``TypeError`` too, as for an unknown keyword argument)."""


def default_replica() -> str:
    """The embedded default: a local directory, so replication works with no setup at all.

    ``$XDG_DATA_HOME/walsync/replica`` (``~/.local/share/walsync/replica`` when unset).
    """
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return (Path(base) / "walsync" / "replica").as_uri()


@dataclass(frozen=True)
class DbConfig:
    """The knobs one database replicates with (defaults, then matching overrides)."""

    replica: str = ""  # root URL; "" = $WALSYNC_REPLICA or the local default
    name: str = ""  # "" = the database file's base name
    # Uploads follow a token bucket: a burst ships at once (the first commit after an idle
    # spell goes immediately), sustained writes ship once per upload_interval seconds.
    upload_interval: float = 1.0
    upload_burst: int = 4
    max_segment_bytes: int = 16 << 20  # ship at once past this, and split segments at it
    snapshot_interval: float = 86400.0  # new snapshot after this many seconds (0 = never)
    retention: float = 86400.0  # keep every restore point this many seconds back (0 = all)
    compact_segments: int = 32  # merge a generation's segments once this many are small
    # One writer per replica name (lease.py): a writer that stops renewing loses the lease
    # after lease_time seconds.  fencing=False replicates unfenced, for stores without
    # conditional writes.
    lease_time: float = 15.0
    fencing: bool = True

    def replica_root(self) -> str:
        if self.replica:
            return self.replica
        env = os.environ.get(ENV_REPLICA)
        if env:
            check_replica(f"${ENV_REPLICA}", env)
        return env or default_replica()


# Checks per knob: (type, minimum).  Shared by configure() keywords and TOML tables.
_KNOBS: dict[str, tuple[type, float | None]] = {
    "replica": (str, None),
    "name": (str, None),
    "upload_interval": (float, 0.0),
    "upload_burst": (int, 1),
    "max_segment_bytes": (int, 4096),
    "snapshot_interval": (float, 0.0),
    "retention": (float, 0.0),
    "compact_segments": (int, 2),
    "lease_time": (float, 1.0),
    "fencing": (bool, None),
}
MAX_LEASE_TIME = 30.0


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def check_knob(
    where: str, key: str, value: object, also: tuple[str, ...] = (), without: tuple[str, ...] = ()
) -> Any:
    """Validate one knob and return its value as the knob's type (an int given for a float
    becomes a float); errors name where it came from and the key (and list the knobs, with
    the other keys ``also`` known there, less those ``without`` it)."""
    if key not in _KNOBS or key in without:
        known = ", ".join(sorted({*_KNOBS, *also} - set(without)))
        raise UnknownKeyError(f"{where}: unknown key {key!r}; known: {known}")
    kind, low = _KNOBS[key]
    accepted = (int, float) if kind is float else (kind,)
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, accepted):
        raise ConfigError(f"{where}: {key} must be {_KIND_NAMES[kind]}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):  # nan passes every comparison
        raise ConfigError(f"{where}: {key} must be a finite number, got {value!r}")
    if key == "lease_time" and isinstance(value, int | float) and value > MAX_LEASE_TIME:
        raise ConfigError(f"{where}: lease_time must be <= {MAX_LEASE_TIME}, got {value!r}")
    if isinstance(value, int | float) and kind is not bool:
        value = float(value) if kind is float else value
        if low is not None and value < low:
            raise ConfigError(f"{where}: {key} must be >= {low}, got {value!r}")
    elif isinstance(value, str) and key == "name":
        try:
            check_name(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    elif isinstance(value, str) and key == "replica" and value:  # "": the env or the default
        check_replica(where, value)
    return value


def check_replica(where: str, url: str) -> None:
    """A replica root URL that cannot work fails where it was written, not at every upload."""
    try:
        scheme, root, _ = replica_location(url)
        if scheme == "file":
            check_root(root)
    except StorageError as exc:
        raise ConfigError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class Override:
    match: str  # glob on the database file's base name or full path
    values: dict[str, Any]  # knob -> value, as check_knob returns them


@dataclass
class Settings:
    """Process-wide settings: defaults, per-database overrides, and shared resources."""

    defaults: DbConfig = field(default_factory=DbConfig)
    overrides: list[Override] = field(default_factory=list)
    name: Callable[[str], str] | None = None  # db path -> name, before overrides' names
    upload_workers: int = 4  # upload threads, across all databases (16 PUTs at once each)
    metrics_port: int | None = None  # serve Prometheus metrics on this port
    # Unsent data while the store is away: in memory up to memory_cap, then in spool_dir
    # (default: a private temp directory) up to spool_cap; see spool.py for what happens past it.
    memory_cap: int = 64 << 20
    spool_dir: str | None = None
    spool_cap: int = 1 << 30
    client_options: dict[str, Any] = field(default_factory=dict)  # to storage.open_replica

    def for_db(self, path: str) -> DbConfig:
        """The effective knobs for the database at ``path``."""
        cfg = self.defaults
        if self.name is not None:
            try:
                cfg = dataclasses.replace(cfg, name=check_name(self.name(path)))
            except ValueError as exc:
                raise ConfigError(f"configure(name=...) for {one_line(path)}: {exc}") from None
            except Exception as exc:  # noqa: BLE001 - the application's function: say what it raised
                raise ConfigError(
                    f"configure(name=...) for {one_line(path)} raised "
                    f"{type(exc).__name__}: {one_line(str(exc))}"
                ) from None
        base = os.path.basename(path)
        for o in self.overrides:
            if fnmatch.fnmatchcase(base, o.match) or fnmatch.fnmatchcase(path, o.match):
                cfg = dataclasses.replace(cfg, **o.values)
        if cfg.name:
            return cfg
        try:
            return dataclasses.replace(cfg, name=check_name(base))
        except ValueError as exc:
            raise ConfigError(
                f"{one_line(path)}: {exc}; give it a replica name (configure(name=...), or "
                "name in a [[databases]] table)"
            ) from None


def load_toml(text: str, where: str) -> Settings:
    """Parse a walsync.toml document into :class:`Settings` (errors name file and key)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    settings = Settings()
    for key, value in doc.items():
        if key == "defaults" and isinstance(value, dict):
            if "name" in value:
                raise ConfigError(
                    f"{where} [defaults]: name is per database; set it in a [[databases]] table"
                )
            here = f"{where} [defaults]"
            knobs = {k: check_knob(here, k, v, without=("name",)) for k, v in value.items()}
            settings.defaults = dataclasses.replace(settings.defaults, **knobs)
        elif key == "databases" and isinstance(value, list):
            for i, table in enumerate(value):
                here = f"{where} [[databases]] #{i + 1}"
                if not isinstance(table, dict) or not isinstance(table.get("match"), str):
                    raise ConfigError(f'{here}: needs match = "<glob>"')
                knobs = {k: check_knob(here, k, v) for k, v in table.items() if k != "match"}
                settings.overrides.append(Override(table["match"], knobs))
        elif key == "upload_workers":
            settings.upload_workers = _positive_int(where, key, value)
        elif key == "metrics_port":
            settings.metrics_port = _port(where, key, value)
        elif key in ("defaults", "databases"):
            table = "[defaults]" if key == "defaults" else "[[databases]]"
            raise ConfigError(f"{where}: {key} must be written as {table} tables, got {value!r}")
        else:
            raise ConfigError(
                f"{where}: unknown key {key!r}; known: defaults, databases, metrics_port, "
                "upload_workers"
            )
    return settings


def check_process_option(where: str, key: str, value: object) -> Any:
    """Validate one of ``configure()``'s process-wide options; errors name the key."""
    if key in ("upload_workers", "memory_cap", "spool_cap"):
        return _positive_int(where, key, value)
    if value is None and key in ("metrics_port", "spool_dir", "name"):
        return None
    if key == "metrics_port":
        return _port(where, key, value)
    if key == "spool_dir" and isinstance(value, str | os.PathLike):
        path = os.path.abspath(os.fspath(value))  # here, not after a chdir
        if not os.path.isdir(path):
            raise ConfigError(
                f"{where}: spool_dir {one_line(path)} is not a directory; create it or name one"
            )
        return path
    if key == "name" and callable(value):
        return value
    if key == "client_options" and isinstance(value, dict):
        known = client_option_names()
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise UnknownKeyError(
                f"{where}: client_options: unknown key {unknown[0]!r}; known: {', '.join(known)}"
            )
        return value
    wanted = {
        "spool_dir": "a directory path",
        "name": "a function of the database path",
        "client_options": "a dict",
    }[key]
    raise ConfigError(f"{where}: {key} must be {wanted}, got {value!r}")


def _port(where: str, key: str, value: object) -> int:
    port = _positive_int(where, key, value)
    if port > 65535:
        raise ConfigError(f"{where}: {key} must be a TCP port (1-65535), got {value!r}")
    return port


def _positive_int(where: str, key: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def load_file(path: str | os.PathLike[str]) -> Settings:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    return load_toml(text, str(path))


def initial_settings() -> Settings:
    """Settings when replication starts: ``$WALSYNC_CONFIG``, else ``./walsync.toml`` if
    present.  Errors say which file to fix: the application may not know it reads one."""
    path = os.environ.get(ENV_CONFIG) or (
        os.path.abspath(DEFAULT_CONFIG_FILE) if os.path.exists(DEFAULT_CONFIG_FILE) else None
    )
    if path is None:
        return Settings()
    try:
        return load_file(path)
    except ConfigError as exc:
        raise ConfigError(f"{exc}; fix that file, or set ${ENV_CONFIG} to another one") from None
