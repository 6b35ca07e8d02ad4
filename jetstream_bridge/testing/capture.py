"""Capture what your code publishes, in memory, so its unit tests need no broker.

    from jetstream_bridge.testing.capture import capture_published

    with capture_published() as capture:
        place_order()
    capture.assert_published(resource_type="order", event_type="created",
                             payload_contains={"number": "A-1"})

or, with the pytest plugin, the ``jetstream_capture`` fixture. With several peers in
``DESTINATION_APP`` each destination's copy is captured on its own, with its ``destination``:
``capture.assert_published(event_type="created", destination="billing")``.

Only the send is replaced: envelopes are built and validated as usual, the outbox row is
still written in your transaction (and stays ``pending``: nothing left the process), and an
event is captured when it would be sent: at once outside a transaction, after commit inside
one, never after a rollback.

Events are captured on commit, and pytest-django's ``django_db`` tests never commit. There,
wrap the code in ``django_capture_on_commit_callbacks(execute=True)`` or use
``django_db(transaction=True)``.
"""

from __future__ import annotations

import json
import pprint
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from django.db import connections

from ..core.envelope import MSG_ID_HEADER
from ..publisher import PreparedEvent, PubAck, Sender, use_sender


@dataclass(frozen=True)
class CapturedMessage:
    """One message as it would have gone over the wire (``destination``: the peer it is for)."""

    subject: str
    envelope: dict[str, Any]
    headers: dict[str, str]
    data: bytes
    destination: str = ""


class Capture(Sender):
    """Record sends instead of publishing them; the assertion helpers read the record.

    Like the stream, it drops a second message with a ``Nats-Msg-Id`` it already holds (the
    publish then reports ``duplicate``): the ``event_id`` for the default peer's copy,
    ``{event_id}~{peer}`` for another peer's.
    """

    def __init__(self) -> None:
        self._messages: list[CapturedMessage] = []
        self._lock = threading.Lock()

    # -- the Sender side (called by the publisher) --------------------------------------------

    def _record(self, event: PreparedEvent) -> PubAck:
        with self._lock:
            duplicate = any(m.headers[MSG_ID_HEADER] == event.msg_id for m in self._messages)
            if not duplicate:
                self._messages.append(
                    CapturedMessage(
                        event.subject,
                        json.loads(event.data),
                        dict(event.headers),
                        event.data,
                        event.destination,
                    )
                )
            return PubAck(event.config.stream_name, len(self._messages), duplicate)

    def send(self, event: PreparedEvent) -> PubAck:
        return self._record(event)

    async def send_async(self, event: PreparedEvent) -> PubAck:
        return self._record(event)

    def after_commit(self, event: PreparedEvent, using: str | None, pk: Any = None) -> None:
        self._record(event)

    # -- the test side ------------------------------------------------------------------------

    @property
    def messages(self) -> list[CapturedMessage]:
        """Every captured message (subject, envelope, headers, bytes), in order."""
        with self._lock:
            return list(self._messages)

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every captured envelope, in the order it would have reached the stream.

        One per message: an event published to several peers appears once per destination.
        """
        return [message.envelope for message in self.messages]

    def clear(self) -> None:
        """Forget everything captured so far."""
        with self._lock:
            self._messages.clear()

    def filter(
        self,
        *,
        resource_type: str | None = None,
        event_type: str | None = None,
        resource_id: str | None = None,
        payload_contains: Mapping[str, Any] | None = None,
        destination: str | None = None,
    ) -> list[dict[str, Any]]:
        """Return the captured envelopes that match every given criterion.

        ``destination`` keeps the copies for that peer only.
        """
        wanted = {
            key: value
            for key, value in (
                ("resource_type", resource_type),
                ("event_type", event_type),
                ("resource_id", resource_id),
            )
            if value is not None
        }
        return [
            message.envelope
            for message in self.messages
            if all(message.envelope.get(key) == value for key, value in wanted.items())
            and (destination is None or message.destination == destination)
            and (
                payload_contains is None
                or _contains(message.envelope.get("payload"), payload_contains)
            )
        ]

    def assert_published(
        self,
        *,
        resource_type: str | None = None,
        event_type: str | None = None,
        resource_id: str | None = None,
        payload_contains: Mapping[str, Any] | None = None,
        count: int | None = None,
        destination: str | None = None,
    ) -> dict[str, Any]:
        """Assert a matching event was published (exactly ``count`` of them, if given).

        ``payload_contains`` matches a subset of the payload, recursively for nested dicts;
        ``destination`` counts only the copies for that peer. Return the first matching
        envelope.
        """
        criteria = {
            "resource_type": resource_type,
            "event_type": event_type,
            "resource_id": resource_id,
            "payload_contains": payload_contains,
            "destination": destination,
        }
        matches = self.filter(
            resource_type=resource_type,
            event_type=event_type,
            resource_id=resource_id,
            payload_contains=payload_contains,
            destination=destination,
        )
        wanted = ", ".join(f"{key}={value!r}" for key, value in criteria.items() if value)
        wanted = wanted or "any event"
        if not matches or (count is not None and len(matches) != count):
            expected = "an event" if count is None else f"{count} event(s)"
            found = f"found {len(matches)}" if matches else "found none"
            raise AssertionError(
                f"expected {expected} matching {wanted}; {found}. {self._describe()}"
            )
        return matches[0]

    def assert_nothing_published(self) -> None:
        """Assert no event was published."""
        if self.messages:
            raise AssertionError(f"expected no events to be published. {self._describe()}")

    def _describe(self) -> str:
        events = self.events
        if not events:
            text = "Nothing was published."
            if any(conn.in_atomic_block for conn in connections.all(initialized_only=True)):
                text += (
                    " Events are captured when their transaction commits, and this code is "
                    "still inside one (a `django_db` test never commits): wrap the code in "
                    "`django_capture_on_commit_callbacks(execute=True)` or use "
                    "`@pytest.mark.django_db(transaction=True)`."
                )
            return text
        lines = [f"{len(events)} event(s) were published:"]
        messages = self.messages
        several = len({message.destination for message in messages}) > 1
        for number, message in enumerate(messages, 1):
            envelope = message.envelope
            to = f" to {message.destination}" if several else ""
            lines.append(
                f"  {number}. {envelope.get('resource_type')}/{envelope.get('event_type')}{to} "
                f"resource_id={envelope.get('resource_id')!r} "
                f"payload={pprint.pformat(envelope.get('payload'), compact=True, width=200)}"
            )
        return "\n".join(lines)


def _contains(actual: Any, expected: Mapping[str, Any]) -> bool:
    if not isinstance(actual, Mapping):
        return False
    for key, value in expected.items():
        if key not in actual:
            return False
        if isinstance(value, Mapping):
            if not _contains(actual[key], value):
                return False
        elif actual[key] != value:
            return False
    return True


@contextmanager
def capture_published() -> Iterator[Capture]:
    """Capture every publish made while the block runs (commits after it are captured too)."""
    with use_sender(Capture()) as capture:
        yield capture
