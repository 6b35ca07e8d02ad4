"""The inbox table's side of consuming: find what was already handled, record outcomes.

Called inside the batch processor's transaction (``processing.py``), so an inbox row and the
handler's own writes commit (or roll back) together.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.apps import apps
from django.core.exceptions import FieldDoesNotExist
from django.db import IntegrityError, connections, models, router
from django.utils import timezone

from .core.envelope import FieldLimits
from .core.errors import JetStreamBridgeError
from .core.retention import inbox_horizon_floor, inbox_horizon_problem
from .core.settings import BridgeConfig
from .models import InboxStatus, field_names, only_fields
from .outcomes import ReceivedMessage
from .purge import DEFAULT_BATCH_SIZE, Purged, delete_in_batches
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


# A row's age for the purge: the first of these columns the model has and the row has set.
# Processed rows age from when they were processed, not received: the later of the two, so a
# row outlives by at least the horizon the moment its event was last handled (an event retried
# for days is remembered from its success, not its first delivery). Failed rows record no time
# of their last failure (``updated_at`` is not kept by the bulk updates), so they age from
# their first delivery.
PROCESSED_AGE = ("processed_at", "received_at", "created_at")
FAILED_AGE = ("received_at", "created_at")


class InboxStore:
    """The whole inbox table (``INBOX_MODEL``) on one database alias: retention."""

    def __init__(self, config: BridgeConfig, *, using: str | None = None) -> None:
        self.config = config
        self.model = inbox_model(config)
        self.names = field_names(self.model)
        self.manager = self.model._default_manager.db_manager(
            using or router.db_for_write(self.model)
        )

    def purge_processed(
        self,
        older_than: float,
        *,
        include_failed: bool = False,
        consumer: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        dry_run: bool = False,
        force: bool = False,
    ) -> Purged:
        """Delete processed rows older than ``older_than`` seconds, in batches (``purge.py``).

        Failed rows (the record of a dead-lettered event, what the admin re-runs) are kept
        unless ``include_failed``; rows still being received are always kept. ``consumer``
        limits the purge to one durable's rows. A purged event that comes back is handled
        again: see the README's *Retention*. A horizon shorter than the bridge's own
        redelivery and re-send window (``core.retention.inbox_horizon_floor``) is refused
        unless ``force``.
        """
        problem = inbox_horizon_problem(older_than, self.horizon_floor)
        if problem and not force:
            raise JetStreamBridgeError(problem)
        if consumer is not None and "consumer" not in self.names:
            raise JetStreamBridgeError(
                f"{self.model._meta.label} has no consumer column: a purge for one durable "
                "cannot tell its rows apart; purge without a consumer"
            )
        cutoff = timezone.now() - timedelta(seconds=older_than)
        doomed = models.Q(status=InboxStatus.PROCESSED) & self._older(cutoff, PROCESSED_AGE)
        if include_failed:
            doomed |= models.Q(status=InboxStatus.FAILED) & self._older(cutoff, FAILED_AGE)
        queryset = self.manager.filter(doomed)
        if consumer is not None:
            queryset = queryset.filter(consumer=consumer)
        return delete_in_batches(queryset, batch_size=batch_size, dry_run=dry_run)

    @property
    def horizon_floor(self) -> float:
        """Seconds within which the bridge itself may bring a handled event back."""
        config = self.config
        return inbox_horizon_floor(
            duplicate_window=config.duplicate_window,
            ack_wait=config.ack_wait,
            max_deliver=config.max_deliver,
            backoff=config.backoff,
        )

    def _older(self, cutoff: datetime, columns: Sequence[str]) -> models.Q:
        """Rows whose first set column among ``columns`` is before ``cutoff``."""
        present = [name for name in columns if name in self.names]
        if not present:
            raise JetStreamBridgeError(
                f"{self.model._meta.label} has none of the columns {', '.join(columns)}: the "
                "purge cannot tell a row's age; add processed_at = DateTimeField(null=True)"
            )
        older = models.Q()
        for index, name in enumerate(present):
            unset_before = {f"{earlier}__isnull": True for earlier in present[:index]}
            clause = models.Q(**unset_before, **{f"{name}__lt": cutoff})
            older = clause if index == 0 else older | clause
        return older


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
