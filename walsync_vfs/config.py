"""Where and how databases replicate: the replica root, per-database names, upload knobs."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ENV_REPLICA = "WALSYNC_REPLICA"


def default_replica() -> str:
    """The embedded default: a local directory, so replication works with no setup at all.

    ``$XDG_DATA_HOME/walsync/replica`` (``~/.local/share/walsync/replica`` when unset).
    """
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return (Path(base) / "walsync" / "replica").as_uri()


def default_name(path: str) -> str:
    """A database replicates under its file's base name unless a name function says otherwise."""
    return os.path.basename(path)


_BAD_NAME = re.compile(r"[/\\\x00-\x1f\x7f]")


def check_name(name: str) -> str:
    """Names are one path component: they must never reach outside the replica root."""
    if not name or name in (".", "..") or _BAD_NAME.search(name):
        raise ValueError(
            f"invalid database name {name!r}: use one path component without '/', '\\' or "
            "control characters"
        )
    return name


@dataclass
class Settings:
    """Replication knobs; see README "Configuration" for what each one trades."""

    replica: str = ""  # root URL; "" = $WALSYNC_REPLICA or the local default
    name: Callable[[str], str] = default_name  # db path -> name under the root
    # Per database, uploads follow a token bucket: a burst ships at once (the first commit
    # after an idle spell goes immediately), sustained writes ship once per upload_interval.
    upload_interval: float = 1.0
    upload_burst: int = 4
    max_segment_bytes: int = 16 << 20  # ship at once past this, and split segments at it
    upload_workers: int = 4  # uploads in flight at once, across all databases
    client_options: dict = field(default_factory=dict)  # passed to storage.open_replica

    def replica_root(self) -> str:
        return self.replica or os.environ.get(ENV_REPLICA) or default_replica()

    def validate(self) -> None:
        if self.upload_interval < 0:
            raise ValueError(f"upload_interval must be >= 0, got {self.upload_interval}")
        if self.upload_burst < 1:
            raise ValueError(f"upload_burst must be >= 1, got {self.upload_burst}")
        if self.max_segment_bytes < 4096:
            raise ValueError(f"max_segment_bytes must be >= 4096, got {self.max_segment_bytes}")
        if self.upload_workers < 1:
            raise ValueError(f"upload_workers must be >= 1, got {self.upload_workers}")
