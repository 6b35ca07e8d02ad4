from __future__ import annotations

import itertools

from jetstream_bridge.core.retry import reconnect_delays


def take(n: int, jitter: float) -> list[float]:
    return list(itertools.islice(reconnect_delays(1.0, 30.0, jitter=lambda: jitter), n))


def test_reconnect_delays__double_up_to_the_cap() -> None:
    assert take(8, jitter=1.0) == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_reconnect_delays__jitter_takes_at_most_half_and_never_goes_below_the_first() -> None:
    assert take(7, jitter=0.0) == [1.0, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0]


def test_reconnect_delays__random_jitter_spreads_within_the_bounds() -> None:
    delays = list(itertools.islice(reconnect_delays(), 200))
    assert all(1.0 <= d <= 30.0 for d in delays)
    assert len({round(d, 3) for d in delays[10:]}) > 100  # not in lockstep
