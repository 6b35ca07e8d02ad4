"""The inbox table's side of consuming: find what was already handled, record outcomes.

Called inside the consumer's batch transaction, so an inbox row and the handler's own writes
commit (or roll back) together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from django.apps import apps
from django.db import models
from django.utils import timezone

from .core.config import BridgeConfig
from .models import InboxStatus, field_names, only_fields


def inbox_model(config: BridgeConfig) -> type[models.Model]:
    return apps.get_model(config.inbox_model)


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
        if event_ids and "event_id" in self.names:
            for pk, event_id, status in (
                self._scoped()
                .filter(event_id__in=event_ids)
                .values_list("pk", "event_id", "status")
            ):
                by_id[event_id] = Seen(pk, status)
        if seqs and {"stream", "stream_seq"} <= self.names:
            query = models.Q()
            for stream, seq in seqs:
                query |= models.Q(stream=stream, stream_seq=seq)
            for pk, stream, seq, status in (
                self._scoped().filter(query).values_list("pk", "stream", "stream_seq", "status")
            ):
                by_seq[(stream, seq)] = Seen(pk, status)
        return by_id, by_seq

    def record(
        self,
        *,
        existing: Seen | None,
        status: str,
        subject: str,
        stream: str,
        stream_seq: int,
        deliveries: int,
        event: dict[str, Any] | None,
        headers: dict[str, str],
        error: str | None = None,
    ) -> None:
        """Insert or update the row for one delivery with its outcome."""
        now = timezone.now()
        values: dict[str, Any] = {
            "status": status,
            "deliveries": deliveries,
            "last_error": error,
            "processed_at": now if status == InboxStatus.PROCESSED else None,
        }
        if existing is not None:
            self.manager.filter(pk=existing.pk).update(**only_fields(self.model, values))
            return
        values.update(
            consumer=self.consumer,
            event_id=(event or {}).get("event_id"),
            subject=subject,
            payload=event if event is not None else {},
            headers=headers,
            event_type=str((event or {}).get("event_type") or ""),
            resource_type=str((event or {}).get("resource_type") or ""),
            stream=stream,
            stream_seq=stream_seq,
            received_at=now,
        )
        self.manager.create(**only_fields(self.model, values))
