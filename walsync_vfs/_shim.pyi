"""The cffi extension built from csrc/walsync.c (see setup.py): its ffi and lib objects."""

from typing import Any

ffi: Any
lib: Any
