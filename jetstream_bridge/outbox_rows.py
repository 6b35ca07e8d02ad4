"""The values ``outbox.OutboxStore`` takes and gives: a new event, a claimed row, a publish outcome.

Also how a relay reads a row (as text, in key order) and turns it into a ``ClaimedRow``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from django.db import models
from django.db.models import TextField
from django.db.models.functions import Cast
from django.utils import timezone

from .core.envelope import MSG_ID_HEADER
from .models import OutboxStatus
from .sql import RawJson

if TYPE_CHECKING:
    from .broker import PubAck


@dataclass(frozen=True)
class NewEvent:
    """An event to write to the outbox in the caller's transaction."""

    event_id: str
    subject: str
    envelope: dict[str, Any]
    headers: dict[str, str]  # without Nats-Msg-Id (the relay adds it from event_id)
    explicit_id: bool  # the caller chose the id, so it may repeat
    encoded: str | None = None  # the envelope's JSON when the caller has it already

    def row_values(self, names: frozenset[str]) -> dict[str, Any]:
        """The new row's values, for the fields a (possibly minimal) model has."""
        envelope = self.envelope
        values = {
            "event_id": self.event_id,
            "subject": self.subject,
            "payload": RawJson(self.encoded if self.encoded is not None else json.dumps(envelope)),
            "headers": self.headers,
            "resource_type": envelope.get("resource_type") or "",
            "resource_id": envelope.get("resource_id") or "",
            "event_type": envelope.get("event_type") or "",
            "status": OutboxStatus.PENDING,
            "enqueued_at": timezone.now(),
        }
        return {key: value for key, value in values.items() if key in names}


@dataclass(frozen=True)
class ClaimedRow:
    """A row a relay holds (a row lock or a lease), ready to publish."""

    pk: Any
    event_id: str
    subject: str
    body: bytes
    headers: dict[str, str]
    attempts: int


@dataclass(frozen=True)
class Outcome:
    """How publishing one row ended: the stream's ack, or the error."""

    pk: Any
    attempts: int  # this attempt's number (it sets the retry backoff)
    result: PubAck | BaseException


@dataclass(frozen=True)
class Recorded:
    """What recording a batch of outcomes changed."""

    sent: int  # rows marked sent (fewer than sent outcomes when a lease was lost)
    failed: int  # failed outcomes
    first_error: str | None = None


@dataclass(frozen=True)
class Requeued:
    """Rows the admin's *Retry publishing* made due again."""

    pks: list[Any] = field(default_factory=list)  # the selected rows found retryable
    count: int = 0  # of those, the rows updated (a relay may have taken one meanwhile)


def error_text(error: BaseException) -> str:
    """The ``last_error`` of a failed publish."""
    return f"{type(error).__name__}: {error}"


def readable(queryset: models.QuerySet[Any], names: frozenset[str]) -> models.QuerySet[Any]:
    """Rows in key order with what ``row_columns`` reads.

    Text, not decoded JSON: the body is published as it is, and the headers (almost always
    "{}") are decoded only when there are some (``claimed_rows``).
    """
    ordered: models.QuerySet[Any] = queryset.order_by("pk").annotate(
        body=Cast("payload", TextField())
    )
    if "headers" in names:
        ordered = ordered.annotate(headers_text=Cast("headers", TextField()))
    return ordered


def row_columns(names: frozenset[str]) -> tuple[str, ...]:
    """What a relay reads of a row; headers and attempts only where the model has them."""
    columns = ["pk", "event_id", "subject", "body"]
    if "headers" in names:
        columns.append("headers_text")  # see readable
    if "attempts" in names:
        columns.append("attempts")
    return tuple(columns)


def claimed_rows(
    rows: Iterable[Sequence[Any]], names: frozenset[str], *, counted: bool
) -> list[ClaimedRow]:
    """``ClaimedRow``s from tuples read with ``row_columns(names)``.

    ``counted`` says whether the attempts read already include this claim.
    """
    has_headers, has_attempts = "headers" in names, "attempts" in names
    claimed = []
    for row in rows:
        pk, event_id, subject, body = row[:4]
        text = row[4] if has_headers else None
        headers = json.loads(text) if text and text != "{}" else None
        merged = {str(k): str(v) for k, v in headers.items()} if headers else {}
        merged[MSG_ID_HEADER] = event_id
        tries = int(row[-1]) + (0 if counted else 1) if has_attempts else 1
        claimed.append(ClaimedRow(pk, event_id, subject, body.encode("utf-8"), merged, tries))
    return claimed
