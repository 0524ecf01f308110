"""The one retry policy: exponential, capped, optionally jittered."""

from __future__ import annotations

import pytest

from walsync_vfs import uploader
from walsync_vfs.backoff import Backoff
from walsync_vfs.storage import s3


def test_delays_double_from_the_first_up_to_the_cap() -> None:
    policy = Backoff(first=0.1, cap=5.0)
    delays = [policy.delay(n) for n in range(1, 10)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0])


def test_any_number_of_failures_waits_the_cap() -> None:
    """Arithmetic on 2**attempt overflows a float after about a thousand failures; the
    policy keeps waiting the cap however long an outage lasts."""
    assert Backoff(first=0.1, cap=5.0).delay(5000) == 5.0
    assert Backoff(first=1.0, cap=20.0, factor=3.0).delay(10**6) == 20.0


def test_the_factor_sets_the_growth() -> None:
    policy = Backoff(first=1.0, cap=100.0, factor=3.0)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5)] == [1.0, 3.0, 9.0, 27.0, 81.0]


def test_jitter_waits_a_random_part_of_the_delay() -> None:
    policy = Backoff(first=1.0, cap=20.0, jitter=True)
    assert policy.delay(3, rand=lambda: 0.5) == 2.0  # half of 4 s
    assert policy.delay(9, rand=lambda: 0.25) == 5.0  # a quarter of the 20 s cap
    assert policy.delay(1, rand=lambda: 0.0) == 0.0


def test_the_engine_and_s3_policies() -> None:
    """Engine: 0.1 s doubling to 5 s (a recovered store is noticed quickly).  S3: botocore's
    standard mode, a jittered 1, 2, 4, ... s capped at 20 s."""
    assert [uploader.RETRY.delay(n) for n in (1, 2, 6, 7)] == pytest.approx([0.1, 0.2, 3.2, 5.0])
    full = [s3.RETRY.delay(n, rand=lambda: 1.0) for n in range(1, 8)]
    assert full == [1.0, 2.0, 4.0, 8.0, 16.0, 20.0, 20.0]
    assert 0.0 <= s3.RETRY.delay(3) <= 4.0
