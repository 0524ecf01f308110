"""Build hook: cffi compiles csrc/walsync.c into walsync_vfs._shim (one shared object that is both
a Python extension and a SQLite loadable extension)."""

from setuptools import setup

setup(cffi_modules=["csrc/build_shim.py:ffibuilder"])
