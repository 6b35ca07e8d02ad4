"""What to do with a delivery that failed: retry after a delay, or give up."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for failed deliveries, the same schedule the durable consumer is created with."""

    max_deliver: int
    backoff: Sequence[float]

    def delay_for(self, deliveries: int) -> float:
        """Return how long to wait before delivery ``deliveries + 1``.

        ``deliveries`` counts from 1 (the first delivery). The last backoff value repeats once
        the schedule runs out, as the JetStream server does.
        """
        if not self.backoff:
            return 0.0
        index = min(max(deliveries, 1), len(self.backoff)) - 1
        return float(self.backoff[index])

    def is_last(self, deliveries: int) -> bool:
        """Tell whether delivery number ``deliveries`` is the last one the server will make."""
        return deliveries >= self.max_deliver


def reconnect_delays(
    first: float = 1.0, cap: float = 30.0, *, jitter: Callable[[], float] = random.random
) -> Iterator[float]:
    """Yield the waits between attempts to reach a server that is down, endlessly.

    The ceiling doubles from ``first`` up to ``cap``; each wait is drawn between half the
    ceiling and the ceiling (never below ``first``), so workers started together do not
    knock on a recovering server in lockstep.
    """
    ceiling = first
    while True:
        yield max(first, ceiling * (0.5 + jitter() / 2))
        ceiling = min(cap, ceiling * 2)
