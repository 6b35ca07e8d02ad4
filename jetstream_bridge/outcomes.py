"""A received message, what becomes of it, and the rules that decide between retry and the DLQ.

No database and no broker here: ``processing.BatchProcessor`` runs handlers and records rows,
then asks ``Decisions`` what a failure means; ``consumer.Consumer`` settles the ``Outcome``.
"""

from __future__ import annotations

import enum
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .context import MessageContext
from .core.dead_letter import MAX_DELIVER, DeadLetter, replay_target, signing_key
from .core.envelope import decode
from .core.errors import InvalidPayload, MalformedEnvelope
from .core.retry import RetryPolicy
from .core.schemas import errors_header
from .core.settings import BridgeConfig

logger = logging.getLogger(__name__)

# How long a message waits before coming back when its batch failed on the database.
DATABASE_RETRY_DELAY = 1.0


@dataclass(frozen=True, kw_only=True)
class ReceivedMessage:
    """A message as a durable consumer received it, without the means to settle it.

    ``stream``/``stream_seq`` say where the stream stored it (the inbox also recognises a
    message by them); ``deliveries`` counts from 1 (the first delivery); ``consumer`` is the
    durable's name.
    """

    subject: str
    data: bytes
    stream: str
    stream_seq: int
    consumer: str
    deliveries: int = 1
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def stored(cls, row: Any, durable: str) -> ReceivedMessage:
        """The inbox row ``row`` as the message it was received as (the admin's re-run)."""
        return cls(
            subject=row.subject,
            data=json.dumps(row.payload).encode(),
            headers=dict(getattr(row, "headers", None) or {}),
            stream=getattr(row, "stream", None) or "",
            stream_seq=getattr(row, "stream_seq", None) or 0,
            deliveries=getattr(row, "deliveries", None) or 1,
            consumer=durable,
        )

    def context(
        self, event: Mapping[str, Any], producer: str | None, *, payload: Any = None
    ) -> MessageContext:
        """This message as a handler's ``MessageContext`` (the one place one is built).

        ``event`` is its decoded envelope, ``producer`` the peer read from its subject;
        ``payload`` the validated object of a typed handler (default: the envelope's).
        """
        event_id = event.get("event_id")
        return MessageContext(
            event=event,
            payload=event.get("payload") if payload is None else payload,
            subject=self.subject,
            headers=self.headers,
            stream=self.stream,
            stream_seq=self.stream_seq,
            deliveries=self.deliveries,
            consumer=self.consumer,
            producer=producer,
            event_id=event_id if isinstance(event_id, str) else None,
        )


class Verdict(enum.Enum):
    """How to settle a message: ack it, have it redelivered later, or dead-letter it."""

    ACK = "ack"
    RETRY = "retry"
    DEAD = "dead"


@dataclass(frozen=True)
class Outcome:
    """What becomes of ``message``: its verdict, the retry ``delay``, or the ``dead`` letter.

    ``duplicate`` marks an ack for a message the inbox had already processed; ``skipped`` an
    ack, without handler or inbox row, for a replay meant for another durable.
    """

    message: ReceivedMessage
    verdict: Verdict
    delay: float = 0.0
    dead: DeadLetter | None = None
    duplicate: bool = False
    skipped: bool = False

    @property
    def applied(self) -> bool:
        """Tell whether the event is handled for this durable (now or before)."""
        return self.verdict is Verdict.ACK and not self.skipped

    @property
    def settled_as(self) -> str:
        """The outcome settling this reports to ``settled()`` observers (``middleware``)."""
        if self.verdict is not Verdict.ACK:
            return "retried" if self.verdict is Verdict.RETRY else "dead_lettered"
        return "skipped" if self.skipped else "duplicate" if self.duplicate else "processed"


def dead_letter(
    message: ReceivedMessage, reason: str, error: BaseException, event_id: str | None
) -> DeadLetter:
    """Describe ``message`` for the DLQ: where it came from and why it failed for good."""
    return DeadLetter(
        reason=reason,
        error_class=type(error).__name__,
        error_message=storable_text(str(error)),
        original_subject=message.subject,
        stream=message.stream,
        stream_seq=message.stream_seq,
        deliveries=message.deliveries,
        consumer=message.consumer,
        event_id=event_id,
        validation_errors=(
            errors_header(error.errors) if isinstance(error, InvalidPayload) else None
        ),
    )


def describe(error: BaseException) -> str:
    """Return the error as the inbox's ``last_error`` and the logs show it."""
    return storable_text(f"{type(error).__name__}: {error}")


# Control characters but tab and line breaks, and lone surrogates.
_UNSAFE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def storable_text(text: str) -> str:
    """Return ``text`` with what a column or a header cannot hold escaped (``\\x00``, ``\\ud800``).

    An error about a hostile message quotes it: ``UnicodeEncodeError`` holds the surrogate it
    could not encode, and storing or publishing that text would fail the same way.
    """
    return _UNSAFE.sub(lambda match: ascii(match.group())[1:-1], text)


class Decisions:
    """Decide between a retry (after the backoff) and the DLQ, by the configured policy.

    The server gives up on a message after ``MAX_DELIVER`` deliveries, so a NAK on the last
    one would drop it silently: a failure on the last delivery becomes a dead letter.
    """

    def __init__(self, config: BridgeConfig) -> None:
        self.policy = RetryPolicy(config.max_deliver, config.backoff)
        self.replay_key = signing_key(config.dlq_signing_key)

    def replay_for_another(self, message: ReceivedMessage) -> Outcome | None:
        """Return an ack without handling for a replay meant for another durable, else ``None``.

        ``jetstream_dlq replay`` marks a replay with the durable that dead-lettered it
        (``Jsb-Replay-For``); a mark that does not hold (``core.dead_letter.replay_target``)
        is ignored and the message handled as any other, so a forged one cannot make a
        durable drop an event.
        """
        target, ignored = replay_target(message.headers, message.data, self.replay_key)
        if ignored:
            logger.warning(
                "%s: handled as usual",
                ignored,
                extra={"durable": message.consumer, "stream_seq": message.stream_seq},
            )
        if target is None or target == message.consumer:
            return None
        return Outcome(message, Verdict.ACK, skipped=True)

    def failed(
        self,
        message: ReceivedMessage,
        error: BaseException,
        *,
        reason: str | None,
        event_id: str | None,
    ) -> Outcome:
        """Decide for a message that failed; ``reason`` names a failure retries cannot fix."""
        if reason is not None:
            return Outcome(
                message, Verdict.DEAD, dead=dead_letter(message, reason, error, event_id)
            )
        return self._retry_or_dead(message, error, event_id, self.retry_delay(message))

    def database_unavailable(self, message: ReceivedMessage, error: BaseException) -> Outcome:
        """Decide for a message whose batch failed on the database: nothing was committed.

        The DLQ needs no database, so the last delivery is kept there for a replay.
        """
        return self._retry_or_dead(message, error, _event_id(message), DATABASE_RETRY_DELAY)

    def unexpected(self, message: ReceivedMessage, error: BaseException) -> Outcome:
        """Decide for a message that failed with an error nothing expected, as for a handler's."""
        return self._retry_or_dead(message, error, None, self.retry_delay(message))

    def retry_delay(self, message: ReceivedMessage) -> float:
        """Return how long the server should wait before delivering ``message`` again."""
        return self.policy.delay_for(message.deliveries)

    def _retry_or_dead(
        self, message: ReceivedMessage, error: BaseException, event_id: str | None, delay: float
    ) -> Outcome:
        if not self.policy.is_last(message.deliveries):
            return Outcome(message, Verdict.RETRY, delay=delay)
        dead = dead_letter(message, MAX_DELIVER, error, event_id)
        return Outcome(message, Verdict.DEAD, dead=dead)


def _event_id(message: ReceivedMessage) -> str | None:
    try:
        return str(decode(message.data)["event_id"])
    except MalformedEnvelope:
        return None
