"""How long to wait before retrying something that failed: one policy for every retry loop."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: ``first`` seconds before the first retry, ``factor`` times more
    before each next one, never more than ``cap``.  With ``jitter``, a uniformly random part
    of that ("full jitter"), so clients failing together do not retry together."""

    first: float
    cap: float
    factor: float = 2.0
    jitter: bool = False

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number ``attempt`` (1 = the first retry)."""
        wait = self.first
        for _ in range(attempt - 1):
            if wait >= self.cap:
                break  # no overflow however long the failures go on
            wait *= self.factor
        wait = min(wait, self.cap)
        return rand() * wait if self.jitter else wait
