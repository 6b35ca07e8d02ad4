"""What to do with a delivery that failed: retry after a delay, or give up."""

from __future__ import annotations

from collections.abc import Sequence
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
