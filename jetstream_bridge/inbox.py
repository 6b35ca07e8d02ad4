"""The inbox table's side of consuming: find what was already handled, record outcomes.

Called inside the batch processor's transaction (``processing.py``), so an inbox row and the
handler's own writes commit (or roll back) together.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from django.apps import apps
from django.core.exceptions import FieldDoesNotExist
from django.db import IntegrityError, connections, models
from django.utils import timezone

from .core.envelope import FieldLimits
from .core.settings import BridgeConfig
from .models import InboxStatus, field_names, only_fields
from .outcomes import ReceivedMessage
from .sql import RawJson, insert_rows, postgresql


def inbox_model(config: BridgeConfig) -> type[models.Model]:
    return apps.get_model(config.inbox_model)


def field_limits(model: type[models.Model]) -> FieldLimits:
    """The longest event id, event type and resource type ``model``'s columns store."""

    def longest(name: str) -> int | None:
        try:
            field = model._meta.get_field(name)
        except FieldDoesNotExist:
            return None  # a custom model without the column stores anything
        return getattr(field, "max_length", None)

    return FieldLimits(
        event_id=longest("event_id"),
        event_type=longest("event_type"),
        resource_type=longest("resource_type"),
    )


@dataclass(frozen=True)
class Seen:
    pk: Any
    status: str


class Inbox:
    """Inbox access for one consumer (durable) on one database alias."""

    def __init__(self, config: BridgeConfig, consumer: str, using: str) -> None:
        self.model = inbox_model(config)
        self.names = field_names(self.model)
        self.consumer = consumer
        self.manager = self.model._default_manager.db_manager(using)
        self._deferred: list[dict[str, Any]] = []
        self._payload_is_json = "payload" in self.names and isinstance(
            self.model._meta.get_field("payload"), models.JSONField
        )

    def _scoped(self) -> models.QuerySet[Any]:
        queryset: models.QuerySet[Any] = self.manager.all()
        if "consumer" in self.names:
            queryset = queryset.filter(consumer=self.consumer)
        return queryset

    def seen(
        self, event_ids: Sequence[str], seqs: Sequence[tuple[str, int]]
    ) -> tuple[dict[str, Seen], dict[tuple[str, int], Seen]]:
        """Return the rows already recorded for these event ids and stream sequences."""
        by_id: dict[str, Seen] = {}
        by_seq: dict[tuple[str, int], Seen] = {}
        columns = ["pk", "status"]
        ids = set(event_ids) if "event_id" in self.names else set()
        if ids:
            columns.append("event_id")
        wanted = set(seqs) if {"stream", "stream_seq"} <= self.names else set()
        by_stream: dict[str, list[int]] = {}
        for stream, seq in wanted:
            by_stream.setdefault(stream, []).append(seq)
        if wanted:
            columns += ["stream", "stream_seq"]
        if not ids and not wanted:
            return by_id, by_seq
        rows: Iterable[dict[str, Any]]
        if connections[self.manager.db].vendor == "postgresql":
            scope = {"consumer": self.consumer} if "consumer" in self.names else {}
            rows = postgresql.inbox_seen(
                self.model, self.manager.db, postgresql.SeenQuery(ids, by_stream, columns, scope)
            )
        else:
            # One query, and sequences as ``stream = s AND stream_seq IN (...)``: an OR of one
            # (stream, seq) pair per message cost ~1 ms to plan per batch of 25, more than the
            # batch's inserts together (benchmarks/).
            query = models.Q(event_id__in=ids) if ids else models.Q()
            for stream, numbers in by_stream.items():
                query |= models.Q(stream=stream, stream_seq__in=numbers)
            rows = self._scoped().filter(query).values(*columns)
        for row in rows:
            seen = Seen(row["pk"], row["status"])
            if row.get("event_id") in ids:
                by_id[row["event_id"]] = seen
            if (row.get("stream"), row.get("stream_seq")) in wanted:
                by_seq[(row["stream"], row["stream_seq"])] = seen
        return by_id, by_seq

    def record(
        self,
        *,
        existing: Seen | None,
        status: str,
        message: ReceivedMessage,
        event: dict[str, Any] | None,
        error: str | None = None,
        defer: bool = False,
    ) -> None:
        """Insert or update the row for one received message with its outcome.

        With ``defer`` a new row waits for ``flush()``: one multi-row INSERT per batch instead
        of one per message (per-message ORM inserts took ~40% of a consumer batch). When
        ``event`` was decoded from the message's body, that text is stored as the payload as
        is instead of encoding ``event`` to JSON again.
        """
        now = timezone.now()
        values: dict[str, Any] = {
            "status": status,
            "deliveries": message.deliveries,
            "last_error": error,
            "processed_at": now if status == InboxStatus.PROCESSED else None,
        }
        if existing is not None:
            # Never move a row out of "processed": another worker may have handled the same
            # event (a second stream copy, a redelivery) since this batch read the row. The
            # UPDATE waits for that worker's commit and then matches nothing.
            changed = (
                self.manager.filter(pk=existing.pk)
                .exclude(status=InboxStatus.PROCESSED)
                .update(**only_fields(self.model, values))
            )
            if not changed and status == InboxStatus.PROCESSED:
                # Roll back this handler run's writes with the savepoint: the effect is
                # already applied. The message is retried and then acked as a duplicate.
                raise IntegrityError(f"inbox row {existing.pk} was processed concurrently")
            return
        payload: Any = {}
        if event is not None:
            payload = event
            if self._payload_is_json:
                payload = _received_json(message.data) or event
        values.update(
            consumer=self.consumer,
            event_id=(event or {}).get("event_id"),
            subject=message.subject,
            payload=payload,
            headers=message.headers,
            event_type=str((event or {}).get("event_type") or ""),
            resource_type=str((event or {}).get("resource_type") or ""),
            stream=message.stream,
            stream_seq=message.stream_seq,
            received_at=now,
        )
        row = {key: value for key, value in values.items() if key in self.names}
        if defer:
            self._deferred.append(row)
        else:
            self._insert([row])

    def deferred(self) -> int:
        """How many rows wait for ``flush()`` (a mark for ``forget_deferred``)."""
        return len(self._deferred)

    def forget_deferred(self, mark: int) -> None:
        """Drop the rows deferred since ``deferred()`` returned ``mark`` (a rolled-back run)."""
        del self._deferred[mark:]

    def flush(self) -> None:
        """Insert the deferred rows in one statement (inside the batch transaction).

        A unique-key conflict here means another worker handled one of these events
        concurrently: the error rolls the whole batch back, handler writes included, and the
        messages come back to be recognised as duplicates.
        """
        if self._deferred:
            rows, self._deferred = self._deferred, []
            self._insert(rows)

    def _insert(self, rows: list[dict[str, Any]]) -> None:
        """One INSERT for ``rows``; a unique-key conflict raises ``IntegrityError``."""
        insert_rows(self.model, self.manager.db, rows)


def _received_json(body: bytes) -> RawJson | None:
    """The body as JSON text, or None when it is not plain UTF-8 (``json.loads`` also takes
    UTF-16/32 and a byte-order mark; those are stored re-encoded instead)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if text.startswith("\ufeff"):
        return None
    return RawJson(text)
