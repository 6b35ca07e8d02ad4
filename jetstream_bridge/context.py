"""What a handler or a middleware sees of a message: ``MessageContext`` and ``Invocation``.

Plain values, no database and no broker. ``outcomes.ReceivedMessage.context`` builds the one
``MessageContext`` of a received message (the consumer, ``testing.deliver`` and the admin's
*Re-run handler* all go through it), and ``middleware.Chain`` passes an ``Invocation`` along.

Everything in a context came off the wire except ``consumer`` (the durable's name) and
``producer`` (read from the subject the message arrived on, ``core.subjects.producer_of``,
never from a header): headers, envelope fields and payload are hostile input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

__all__ = ["Invocation", "MessageContext"]


@dataclass(frozen=True)
class MessageContext:
    """One received message, as a ``context=True`` (or ``schema=``) handler receives it.

    ``event`` is the envelope (a copy of its top level); ``payload`` its ``payload``, or the
    validated object when the handler declares a ``schema``; ``headers`` a read-only mapping;
    ``deliveries`` counts from 1; ``consumer`` is the durable's name; ``producer`` the peer
    whose subject it arrived on (``None`` when the subject names no peer of this app).
    """

    event: Mapping[str, Any]
    payload: Any
    subject: str
    headers: Mapping[str, str]
    stream: str
    stream_seq: int
    deliveries: int
    consumer: str
    producer: str | None = None
    event_id: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.headers, MappingProxyType):
            object.__setattr__(self, "headers", MappingProxyType(dict(self.headers)))
        # The inbox records the envelope's event id and types after the handler ran: a
        # middleware or handler changing ``ctx.event`` changes its own copy, not those.
        object.__setattr__(self, "event", dict(self.event))

    @property
    def resource_type(self) -> str | None:
        value = self.event.get("resource_type")
        return value if isinstance(value, str) else None

    @property
    def event_type(self) -> str | None:
        value = self.event.get("event_type")
        return value if isinstance(value, str) else None


@dataclass(frozen=True)
class Invocation:
    """One call of a handler, as a middleware sees it.

    ``messages`` holds the one message of a single handler, or the group of a ``batch=True``
    handler; ``handler`` is the user's function; ``message`` the single message.
    """

    messages: tuple[MessageContext, ...]
    handler: Callable[..., Any]
    batch: bool = False

    @property
    def message(self) -> MessageContext:
        """The message of a single handler's call (a batch call has several: read ``messages``)."""
        if self.batch or len(self.messages) != 1:
            raise ValueError(
                f"a batch invocation holds {len(self.messages)} messages: read .messages"
            )
        return self.messages[0]
