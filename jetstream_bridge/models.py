"""Outbox and inbox tables.

Column names follow the Ruby gem's generator so data and dashboards carry over. Unique keys on
nullable columns are plain (not partial) constraints on purpose: PostgreSQL, SQLite and
MySQL/MariaDB all treat NULLs as distinct there, which gives the seed's ``WHERE ... IS NOT NULL``
semantics on every backend, including MySQL, which has no partial indexes.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Any, cast

from django.db import models
from django.db.backends.base.base import BaseDatabaseWrapper
from django.utils import timezone


class OutboxStatus(models.TextChoices):
    PENDING = "pending"
    PUBLISHING = "publishing"
    SENT = "sent"
    FAILED = "failed"


class InboxStatus(models.TextChoices):
    RECEIVED = "received"
    PROCESSING = "processing"
    PROCESSED = "processed"
    FAILED = "failed"


UNSENT = (OutboxStatus.PENDING, OutboxStatus.FAILED)


def outbox_due(now: datetime, names: Collection[str], *, any_time: bool = False) -> models.Q:
    """The outbox rows a relay may take at ``now``: the one definition of "due".

    A row is due when it is unsent and its retry time (``available_at``) has come, or when a
    relay left it "publishing" and its lease (``locked_until``) lapsed or was never set: a
    live lease means a relay is sending the row right now. ``names`` are the model's fields
    (a custom model may lack these columns). With ``any_time`` (the admin's *Retry
    publishing*), unsent rows count whatever their retry time.
    """
    unsent = models.Q(status__in=UNSENT)
    if "available_at" in names and not any_time:
        unsent &= models.Q(available_at__lte=now)
    if "locked_until" not in names:
        return unsent
    lapsed = models.Q(locked_until__lt=now) | models.Q(locked_until__isnull=True)
    return unsent | (models.Q(status=OutboxStatus.PUBLISHING) & lapsed)


class ExactCharField(models.CharField):  # type: ignore[type-arg]
    """A ``CharField`` compared byte for byte on every database: for ids in unique keys.

    PostgreSQL and SQLite compare text exactly already. MySQL and MariaDB compare by the
    column's collation, and their default ``utf8mb4`` collations fold case (and pad trailing
    spaces), so ids ``"A"`` and ``"a"`` would collide in a unique key and the second event
    be taken for a duplicate. There the column gets a binary collation, without padding on
    MariaDB (``utf8mb4_nopad_bin``); ``COLLATE`` alone also makes the column ``utf8mb4``.
    An explicit ``db_collation`` wins.
    """

    def db_parameters(self, connection: BaseDatabaseWrapper) -> dict[str, Any]:
        params: dict[str, Any] = super().db_parameters(connection)
        if connection.vendor == "mysql" and not self.db_collation:
            mariadb = getattr(connection, "mysql_is_mariadb", False)
            params["collation"] = "utf8mb4_nopad_bin" if mariadb else "utf8mb4_bin"
        return params


class OutboxQuerySet(models.QuerySet["OutboxEvent"]):
    def unsent(self) -> OutboxQuerySet:
        """Rows that still have to reach the stream."""
        return cast(OutboxQuerySet, self.filter(status__in=UNSENT))

    def due(self, now: datetime | None = None) -> OutboxQuerySet:
        """Rows a relay may take now (``outbox_due``)."""
        due = outbox_due(now or timezone.now(), field_names(self.model))
        return cast(OutboxQuerySet, self.filter(due))


class OutboxEvent(models.Model):
    """An event written in the business transaction, published after commit."""

    event_id = ExactCharField(max_length=255)
    subject = models.CharField(max_length=255)
    payload = models.JSONField(default=dict, help_text="The full envelope as published.")
    headers = models.JSONField(default=dict, blank=True)
    resource_type = models.CharField(max_length=100, blank=True, default="")
    resource_id = models.CharField(max_length=255, blank=True, default="")
    event_type = models.CharField(max_length=100, blank=True, default="")
    status = models.CharField(
        max_length=16, choices=OutboxStatus.choices, default=OutboxStatus.PENDING
    )
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(null=True, blank=True)
    enqueued_at = models.DateTimeField(default=timezone.now)
    available_at = models.DateTimeField(
        default=timezone.now, help_text="Not published before this time (retries)."
    )
    locked_by = models.CharField(
        max_length=64,
        null=True,
        blank=True,
        help_text="Lease token of the relay publishing this row.",
    )
    locked_until = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    stream_seq = models.BigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = OutboxQuerySet.as_manager()

    class Meta:
        db_table = "jetstream_outbox_events"
        verbose_name = "outbox event"
        permissions = [("retry_outboxevent", "Can retry publishing outbox events")]
        # Every index is written again each time a row changes status, so only the ones that
        # queries use: a constraint rather than unique=True (on PostgreSQL that also added a
        # LIKE index nothing searches with), and no index on status alone (the due index
        # leads with it).
        constraints = [
            models.UniqueConstraint(fields=["event_id"], name="jsb_outbox_event_id_uniq")
        ]
        indexes = [
            models.Index(fields=["status", "available_at"], name="jsb_outbox_due_idx"),
            models.Index(
                fields=["resource_type", "resource_id", "id"], name="jsb_outbox_resource_idx"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.event_id} {self.subject} [{self.status}]"


class InboxEvent(models.Model):
    """A received event and what became of it, per consumer (durable)."""

    consumer = ExactCharField(
        max_length=255, default="", help_text="Durable name that processed the event."
    )
    event_id = ExactCharField(max_length=255, null=True, blank=True)
    subject = models.CharField(max_length=255)
    payload = models.JSONField(default=dict, help_text="The envelope as received.")
    headers = models.JSONField(default=dict, blank=True)
    event_type = models.CharField(max_length=100, blank=True, default="")
    resource_type = models.CharField(max_length=100, blank=True, default="")
    stream = ExactCharField(max_length=255, null=True, blank=True)
    stream_seq = models.BigIntegerField(null=True, blank=True)
    deliveries = models.PositiveIntegerField(default=0)
    status = models.CharField(
        max_length=16, choices=InboxStatus.choices, default=InboxStatus.RECEIVED
    )
    last_error = models.TextField(null=True, blank=True)
    received_at = models.DateTimeField(default=timezone.now)
    processed_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "jetstream_inbox_events"
        verbose_name = "inbox event"
        permissions = [("rerun_inboxevent", "Can re-run the handler of inbox events")]
        constraints = [
            models.UniqueConstraint(
                fields=["consumer", "event_id"], name="jsb_inbox_consumer_event_uniq"
            ),
            models.UniqueConstraint(
                fields=["consumer", "stream", "stream_seq"], name="jsb_inbox_consumer_seq_uniq"
            ),
        ]
        indexes = [models.Index(fields=["status"], name="jsb_inbox_status_idx")]

    def __str__(self) -> str:
        return f"{self.event_id or self.stream_seq} {self.subject} [{self.status}]"


# The fields the bridge cannot work without; anything else is set only when the model has it.
OUTBOX_REQUIRED_FIELDS = ("event_id", "subject", "payload", "status")
INBOX_REQUIRED_FIELDS = ("subject", "status")


def field_names(model: type[models.Model]) -> frozenset[str]:
    return frozenset(f.name for f in model._meta.concrete_fields)


def only_fields(model: type[models.Model], values: dict[str, Any]) -> dict[str, Any]:
    """Keep the values the model has columns for (custom models may be minimal)."""
    names = field_names(model)
    return {key: value for key, value in values.items() if key in names}


class DeadLetter(models.Model):
    """No table: the admin's *Dead letters* entry and the permissions of its actions.

    Dead letters live on the DLQ subject of a NATS stream (``jetstream_bridge.dlq``), not in
    the database; this model only gives the admin an index entry, a content type for its log
    entries, and permissions to grant.
    """

    class Meta:
        managed = False
        verbose_name = "dead letter"
        default_permissions = ("view",)
        permissions = [
            ("replay_deadletter", "Can replay dead letters"),
            ("purge_deadletter", "Can purge dead letters"),
        ]

    def __str__(self) -> str:
        return f"dead letter {self.pk}"
