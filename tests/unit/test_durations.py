from __future__ import annotations

import pytest

from jetstream_bridge.core.durations import format_age, format_duration, parse_duration, to_nanos
from jetstream_bridge.core.retry import RetryPolicy


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("7d", 604800.0),
        ("1.5s", 1.5),
        (" 2 s ", 2.0),
        ("10", 10.0),
        (10, 10.0),
        (0.25, 0.25),
        (0, 0.0),
    ],
)
def test_parse_duration__accepts_units_and_numbers(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value", ["", "5x", "s", "-1s", "1 hour", None, True, [], float("nan"), -3]
)
def test_parse_duration__rejects_garbage(value: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


def test_to_nanos__is_what_the_jetstream_api_expects() -> None:
    assert to_nanos(30.0) == 30_000_000_000
    assert to_nanos(0.5) == 500_000_000


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(30.0, "30s"), (300.0, "5m"), (0.5, "500ms"), (7200.0, "2h"), (1.25, "1.25s")],
)
def test_format_duration__round_trips(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


def test_retry_policy__uses_backoff_per_delivery_and_repeats_the_last() -> None:
    policy = RetryPolicy(max_deliver=6, backoff=(1.0, 5.0, 15.0))
    assert [policy.delay_for(n) for n in (1, 2, 3, 4, 5)] == [1.0, 5.0, 15.0, 15.0, 15.0]
    assert not policy.is_last(5)
    assert policy.is_last(6)
    assert RetryPolicy(max_deliver=3, backoff=()).delay_for(1) == 0.0


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.7, "0s"),
        (45, "45s"),
        (61, "1m1s"),
        (3600, "1h"),
        (3661, "1h1m"),
        (90000, "1d1h"),
        (86400 * 3 + 60, "3d"),
        (-5, "0s"),
    ],
)
def test_format_age__two_adjacent_units_at_most(seconds: float, text: str) -> None:
    assert format_age(seconds) == text
