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


def inbox_horizon_floor(
    *, duplicate_window: float, ack_wait: float, max_deliver: int, backoff: tuple[float, ...]
) -> float:
    """The shortest horizon that still covers the bridge's own comebacks.

    A message is redelivered for as long as its deliveries last (``ACK_WAIT`` each, plus the
    ``BACKOFF`` delays between them), and a relay may publish an event again within the
    ``DUPLICATE_WINDOW``; a row purged sooner lets such a copy run its handler twice.
    """
    deliveries = ack_wait * max_deliver + sum(backoff[: max(0, max_deliver - 1)])
    return max(duplicate_window, deliveries)


def inbox_horizon_problem(horizon: float, floor: float) -> str | None:
    """Say why ``horizon`` is too short to purge with, or None."""
    if horizon >= floor:
        return None
    return (
        f"an inbox horizon of {format_duration(horizon)} is shorter than "
        f"{format_duration(floor)}, the longest the bridge itself may bring an event back "
        "(redeliveries: ACK_WAIT x MAX_DELIVER plus BACKOFF; a relay re-send: DUPLICATE_WINDOW); "
        "rows purged sooner let a redelivered event run its handler twice. Use a longer age "
        "(30d is typical), or `jetstream_purge --force` if you accept that"
    )
