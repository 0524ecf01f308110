"""heap.release() gives freed page copies back to the OS (glibc's malloc_trim)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

PROBE = """
from walsync_vfs import heap

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) // 1024

pages, kept = [], []
for i in range(20_000):  # 80 MiB of page copies in runs of 10, each run followed by a survivor
    pages.append(bytes([i % 251]) * 4096)
    if i % 10 == 9:
        kept.append(bytes(600))
del pages
before = rss()
heap.release()
print(before, rss())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="only glibc has malloc_trim")
def test_release_returns_freed_page_copies() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    before, after = map(int, out.stdout.split())
    assert before - after >= 40, (before, after)  # MiB: held by the allocator, then returned
