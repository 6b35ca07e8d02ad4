"""Which peers one publish goes to, and the ``Nats-Msg-Id`` of each copy.

A service with several peers (``DESTINATION_APP`` a list) publishes one copy of an event per
destination, each on its own subject. Every copy carries the same envelope, so each peer's
inbox dedupes by the shared ``event_id``. The stream, though, dedupes by ``Nats-Msg-Id``
across all its subjects, so the copies need distinct message ids: the default (first) peer's
copy keeps the bare ``event_id`` — a single-destination service publishes exactly as before —
and every other peer's copy is ``{event_id}~{peer}``. The outbox stores that id in its
``event_id`` column (whose unique key then holds one row per event and destination).

``~`` appears in no id the bridge or the Ruby gem generates (UUIDs). So that a derived id can
never equal another event's id, a service with several destinations refuses caller-chosen
event ids containing it.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import InvalidEvent, UnknownDestination

COPY_SEPARATOR = "~"
MAX_MESSAGE_ID_LENGTH = 255  # the outbox's event_id column

Requested = str | Sequence[str] | None


def resolve(requested: Requested, configured: Sequence[str]) -> tuple[str, ...]:
    """The destinations of one publish, in settings order; raise on a peer not configured.

    ``None`` means every configured destination (a domain event is for every peer). A
    repeated name counts once.
    """
    if requested is None:
        return tuple(configured)
    names = [requested] if isinstance(requested, str) else requested
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise InvalidEvent(
            "destination must be a peer name, a list of peer names, or None (every peer); "
            f"got {type(requested).__name__}"
        )
    if not names:
        raise InvalidEvent(
            "destination is an empty list; name at least one peer, or leave it out to "
            "publish to every peer in DESTINATION_APP"
        )
    unknown = [name for name in names if name not in configured]
    if unknown:
        raise UnknownDestination(
            f"destination {', '.join(map(repr, unknown))} is not in DESTINATION_APP "
            f"({', '.join(configured)}); no stream subject is provisioned for it. Publish to "
            "one of those, or add the peer to DESTINATION_APP and run jetstream_ensure_topology."
        )
    return tuple(peer for peer in configured if peer in names)


def message_id(event_id: str, destination: str, configured: Sequence[str]) -> str:
    """The ``Nats-Msg-Id`` (and outbox key) of ``event_id``'s copy for ``destination``."""
    if not configured or destination == configured[0]:
        return event_id
    return f"{event_id}{COPY_SEPARATOR}{destination}"


def copy_id_problem(
    event_id: str, destinations: Sequence[str], configured: Sequence[str]
) -> str | None:
    """Say why ``event_id`` cannot be copied to ``destinations``, or return ``None``."""
    if len(configured) > 1 and COPY_SEPARATOR in event_id:
        return (
            f"event_id contains {COPY_SEPARATOR!r}, which this service (several peers in "
            "DESTINATION_APP) reserves for the message ids of an event's copies; choose an id "
            f"without {COPY_SEPARATOR!r}"
        )
    for destination in destinations:
        length = len(message_id(event_id, destination, configured))
        if length > MAX_MESSAGE_ID_LENGTH:
            return (
                f"the message id of the copy for {destination!r} would be {length} characters "
                f"(event_id{COPY_SEPARATOR}{destination}); the outbox holds at most "
                f"{MAX_MESSAGE_ID_LENGTH}. Use a shorter event_id"
            )
    return None
