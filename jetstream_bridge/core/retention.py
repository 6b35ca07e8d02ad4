"""How long the inbox must remember an event: the purge horizon against the stream's age limit.

An inbox row is what recognises an event that comes back (a redelivery, a replay from the
DLQ, a producer publishing it again after the duplicate window). Once the row is purged, the
event runs its handler again. While the stream still holds the message (``STREAM_MAX_AGE``),
a durable created or reset to deliver everything, or a replay, can bring it back; a horizon
shorter than that age leaves a window in which the event is still in the stream but no longer
recognised.
"""

from __future__ import annotations

from .durations import format_duration


def inbox_horizon_warning(horizon: float, stream_max_age: float | None) -> str | None:
    """Say what a purge with ``horizon`` seconds gives up, or None when it outlives the stream.

    With no ``STREAM_MAX_AGE`` the stream's age is unknown and nothing is said: the README's
    *Retention* covers that case.
    """
    if stream_max_age is None or horizon >= stream_max_age:
        return None
    text = format_duration(horizon)
    return (
        f"the inbox horizon {text} is shorter than STREAM_MAX_AGE "
        f"{format_duration(stream_max_age)}: an event still in the stream that comes back "
        f"(redelivered, replayed from the DLQ) more than {text} after it was handled runs its "
        "handler again"
    )
