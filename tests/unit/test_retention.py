"""The purge horizon against the stream's age limit (``core/retention.py``)."""

from __future__ import annotations

from jetstream_bridge.core.retention import inbox_horizon_warning

DAY = 86400.0


def test_inbox_horizon_warning__a_horizon_shorter_than_the_streams_age_says_what_runs_again() -> (
    None
):
    warning = inbox_horizon_warning(3 * DAY, 7 * DAY)

    assert warning is not None
    assert warning.startswith("the inbox horizon 3d is shorter than STREAM_MAX_AGE 7d: ")
    assert "more than 3d after it was handled runs its handler again" in warning


def test_inbox_horizon_warning__nothing_to_say_when_the_row_outlives_the_message() -> None:
    assert inbox_horizon_warning(7 * DAY, 7 * DAY) is None
    assert inbox_horizon_warning(30 * DAY, 7 * DAY) is None
    assert inbox_horizon_warning(DAY, None) is None  # no age limit: the README's advice
