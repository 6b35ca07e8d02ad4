"""The outbox table's store: write events, lock or lease batches, record results, requeue, purge.

``OutboxStore`` is synchronous database code (the ORM, and plain SQL from ``sql`` on the hot
paths); the relay and the fast path call it from threads, never from the event loop. What is
"due" is defined once, in ``models.outbox_due``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from django.apps import apps
from django.db import IntegrityError, connections, models, router, transaction
from django.db.models import Exists, F, OuterRef
from django.utils import timezone

from .core.errors import JetStreamBridgeError
from .core.settings import BridgeConfig, Problem
from .exceptions import ConfigurationError
from .models import OutboxStatus, field_names, outbox_due
from .outbox_rows import (
    ClaimedRow,
    NewEvent,
    Outcome,
    Recorded,
    Requeued,
    claimed_rows,
    error_text,
    readable,
    row_columns,
)
from .purge import DEFAULT_BATCH_SIZE, Purged, delete_in_batches
from .sql import case_by_pk, insert_rows, postgresql

logger = logging.getLogger(__name__)

LEASE_FIELDS = ("locked_by", "locked_until")

__all__ = ["ClaimedRow", "LeaseFieldsMissing", "NewEvent", "OutboxStore", "Outcome", "Recorded"]


def outbox_model(config: BridgeConfig) -> type[models.Model]:
    return apps.get_model(config.outbox_model)


class LeaseFieldsMissing(ConfigurationError):
    """A custom outbox model lacks the columns the relay leases rows with."""

    def __init__(self, model: type[models.Model], missing: Sequence[str]) -> None:
        super().__init__(
            [
                Problem(
                    "E013",
                    f"{model._meta.label} has no {', '.join(missing)} field(s); the relay "
                    "needs them to lease rows.",
                    "Add locked_by = CharField(max_length=64, null=True) and locked_until = "
                    "DateTimeField(null=True) to the model, or publish with the fast path only.",
                )
            ]
        )


class OutboxStore:
    """The outbox table (``OUTBOX_MODEL``) on one database alias, one method per operation.

    Writes go to ``using`` or the router's write database, reads of the backlog and of the
    ordering check to ``using`` or its read database. Three fences keep writers apart when
    results are recorded: a lease ``token`` (rows this relay still leases), ``locked`` (the
    caller holds the rows' locks, ``lock``), or neither (the fast path: it never overrides a
    relay).
    """

    def __init__(self, config: BridgeConfig, *, using: str | None = None) -> None:
        self.config = config
        self.model = outbox_model(config)
        self.names = field_names(self.model)
        self.alias = using or router.db_for_write(self.model)
        self.read_alias = using or router.db_for_read(self.model)
        self.manager = self.model._default_manager.db_manager(self.alias)

    @property
    def vendor(self) -> str:
        return str(connections[self.alias].vendor)

    @property
    def can_lock_rows(self) -> bool:
        """Whether relays hold row locks while publishing (``lock``) or take leases (``claim``).

        Locks need ``SKIP LOCKED`` (PostgreSQL, MySQL 8, MariaDB 10.6); SQLite has one
        database-wide write lock, so holding it while publishing would stall every writer.
        """
        return bool(connections[self.alias].features.has_select_for_update_skip_locked)

    # -- writing ------------------------------------------------------------------------------

    def write(self, event: NewEvent) -> tuple[Any, bool]:
        """Insert the event's row in the caller's transaction; return ``(pk, created)``.

        A generated event id cannot collide, so it is a single INSERT. A caller-supplied id
        may repeat: then the insert runs in a savepoint and a duplicate is reported, not
        raised. The row is written with one plain INSERT (``sql.insert_rows``), not
        ``Model.objects.create()``: a custom model's field defaults apply, its ``save()`` and
        model signals do not run.
        """
        _notify(self)
        return _insert(self, event)

    def write_many(self, events: Sequence[NewEvent]) -> list[tuple[Any, bool]]:
        """Insert one event's copies (one per destination), all or none; ``(pk, created)`` each.

        Inside the caller's transaction they join it; outside one they commit together. With
        generated ids it is one multi-row INSERT; a caller-supplied id is inserted copy by
        copy, so a repeat is a duplicate for each copy already there and a new row for a
        destination that has none yet.
        """
        if len(events) == 1:
            return [self.write(events[0])]
        with transaction.atomic(using=self.alias):
            _notify(self)
            if not any(event.explicit_id for event in events):
                rows = [event.row_values(self.names) for event in events]
                return [
                    (pk, True) for pk in insert_rows(self.model, self.alias, rows, returning=True)
                ]
            return [_insert(self, event) for event in events]

    # -- taking batches -----------------------------------------------------------------------

    def due(self, now: datetime | None = None, *, after: Any = None) -> models.QuerySet[Any]:
        """Rows a relay may take now, in key order, readable as ``ClaimedRow``s.

        With ``after``, only rows with a greater key (see ``Relay.drain``). With
        OUTBOX_ORDERING, a row waits while an earlier one of its resource is unsent; with
        several peers, only one for the same subject (peer): one peer's order never waits
        for another peer's copies.
        """
        queryset = self.manager.filter(outbox_due(now or timezone.now(), self.names))
        if after is not None:
            queryset = queryset.filter(pk__gt=after)
        if self.config.outbox_ordering and {"resource_type", "resource_id"} <= self.names:
            queryset = _in_resource_order(self, queryset)
        return readable(queryset, self.names)

    def lock(
        self, limit: int, *, now: datetime | None = None, after: Any = None
    ) -> list[ClaimedRow]:
        """Lock up to ``limit`` due rows for the caller's transaction; return them in key order.

        Must run inside ``transaction.atomic()``. The caller publishes the rows and records the
        results before committing: a relay that dies rolls back and its rows are due again at
        once, and each row is written once (sent or failed) instead of twice (leased, then
        sent), which doubled a relay's database throughput on PostgreSQL (docs/benchmarks.md).
        Other relays skip the locked rows (``SKIP LOCKED``).
        """
        connection = connections[self.alias]
        if not connection.in_atomic_block:
            raise RuntimeError("OutboxStore.lock() must run inside transaction.atomic()")
        if connection.vendor == "postgresql":
            # Never less than a batch may take against a server that stopped answering (two
            # rounds of publish timeouts), or a slow but live relay would be cut off.
            lease = max(self.config.relay_lease, 2 * self.config.request_timeout + 1.0)
            postgresql.relay_transaction_settings(connection, int(lease * 1000))
        rows = _for_update(self.due(now, after=after), self.alias).values_list(
            *row_columns(self.names)
        )
        return claimed_rows(list(rows[:limit]), self.names, counted=False)

    def claim(
        self, limit: int, *, now: datetime | None = None, after: Any = None
    ) -> tuple[str, list[ClaimedRow]]:
        """Lease up to ``limit`` due rows for this relay; return the lease token and the rows.

        The transaction is short: ``SELECT ... FOR UPDATE SKIP LOCKED`` then one UPDATE (on
        SQLite, a single UPDATE). The network I/O happens after it commits, protected by the
        lease instead of a lock. Relays use this where ``can_lock_rows`` is false.
        """
        missing = [name for name in LEASE_FIELDS if name not in self.names]
        if missing:
            raise LeaseFieldsMissing(self.model, missing)
        now = now or timezone.now()
        token = uuid.uuid4().hex
        queryset = self.due(now, after=after)
        columns = row_columns(self.names)
        update: dict[str, Any] = {
            "status": OutboxStatus.PUBLISHING,
            "locked_by": token,
            "locked_until": now + timedelta(seconds=self.config.relay_lease),
        }
        if "attempts" in self.names:
            update["attempts"] = F("attempts") + 1
        with transaction.atomic(using=self.alias):
            if self.vendor == "sqlite":
                # A SELECT first would hold a shared lock that SQLite refuses to upgrade while
                # another process writes ("database is locked"); a single UPDATE waits for the
                # write lock instead, and the database-wide lock makes SKIP LOCKED unnecessary.
                picked = queryset.values("pk")[:limit]
                if not self.manager.filter(pk__in=picked).update(**update):
                    return token, []
                leased = readable(self.manager.filter(locked_by=token), self.names)
                return token, claimed_rows(
                    list(leased.values_list(*columns)), self.names, counted=True
                )
            rows = list(_for_update(queryset, self.alias).values_list(*columns)[:limit])
            if not rows:
                return token, []
            self.manager.filter(pk__in=[row[0] for row in rows]).update(**update)
        return token, claimed_rows(rows, self.names, counted=False)

    def has_older_unsent(
        self, pk: Any, resource_type: str, resource_id: str, subject: str | None = None
    ) -> bool:
        """Tell whether an earlier event of the same resource (and subject) is still unsent."""
        manager = self.model._default_manager.db_manager(self.read_alias)
        earlier = manager.filter(resource_type=resource_type, resource_id=resource_id, pk__lt=pk)
        if subject is not None:
            earlier = earlier.filter(subject=subject)
        return bool(earlier.exclude(status=OutboxStatus.SENT).exists())

    # -- recording results --------------------------------------------------------------------

    def record(
        self, outcomes: Iterable[Outcome], *, token: str | None = None, locked: bool = False
    ) -> Recorded:
        """Mark each row sent or failed by its publish outcome, fenced (see the class).

        The one place a publish result reaches the table, for the relay and the fast path.
        """
        sent: list[tuple[Any, int | None]] = []
        failed: list[tuple[Any, int, str]] = []
        for outcome in outcomes:
            if isinstance(outcome.result, BaseException):
                failed.append((outcome.pk, outcome.attempts, error_text(outcome.result)))
            else:
                sent.append((outcome.pk, outcome.result.seq))
        recorded = self.mark_sent(sent, token=token, locked=locked)
        if (token is not None or locked) and recorded < len(sent):
            # Our lease expired and another relay took these rows; it will record them. (The
            # fast path finding a row a relay sent meanwhile is no news.)
            logger.warning("lease lost before recording", extra={"rows": len(sent) - recorded})
        if failed:
            self.mark_failed(failed, token=token, locked=locked)
        return Recorded(recorded, len(failed), failed[0][2] if failed else None)

    def mark_sent(
        self,
        sent: Iterable[tuple[Any, int | None]],
        *,
        token: str | None = None,
        locked: bool = False,
    ) -> int:
        """Mark rows sent ``(pk, stream_seq)`` in one UPDATE; return how many it changed.

        With ``locked`` the attempt is counted here (a lock took no lease that counted it).
        """
        pairs = list(sent)
        if not pairs:
            return 0
        values: dict[str, Any] = {"status": OutboxStatus.SENT, "sent_at": timezone.now()}
        values.update(dict.fromkeys(("last_error", *LEASE_FIELDS)))
        values = {key: value for key, value in values.items() if key in self.names}
        count = "attempts" if locked and "attempts" in self.names else None
        fence = _fence(token, locked, unclaimed=("<>", OutboxStatus.SENT))
        if self.vendor == "postgresql":
            seq = "stream_seq" if "stream_seq" in self.names else None
            update = postgresql.SentUpdate(pairs, values, seq, count, fence)
            return postgresql.mark_sent(self.model, self.alias, update)
        known = [(pk, seq) for pk, seq in pairs if seq is not None]
        if known and "stream_seq" in self.names:
            values["stream_seq"] = case_by_pk(self.model, self.alias, "stream_seq", known)
        if count:
            values[count] = F(count) + 1
        queryset = _fenced(self.manager.filter(pk__in=[pk for pk, _ in pairs]), fence)
        return int(queryset.update(**values))

    def mark_failed(
        self,
        failed: Iterable[tuple[Any, int, str]],
        *,
        token: str | None = None,
        locked: bool = False,
    ) -> int:
        """Record failures ``(pk, attempts, error)``; each row is due again after its backoff.

        The fast path (no fence) counts the attempt here, and only on rows still pending.
        """
        now = timezone.now()
        schedule = self.config.relay_retry_backoff or (1.0,)
        groups: dict[tuple[float, str], list[Any]] = {}
        for pk, attempts, error in failed:
            delay = schedule[min(max(attempts, 1), len(schedule)) - 1]
            groups.setdefault((delay, error[:2000]), []).append(pk)
        fence = _fence(token, locked, unclaimed=("=", OutboxStatus.PENDING))
        counted = token is None and "attempts" in self.names
        changed = 0
        for (delay, error), pks in groups.items():
            values: dict[str, Any] = {
                "status": OutboxStatus.FAILED,
                "last_error": error,
                "available_at": now + timedelta(seconds=delay),
                **dict.fromkeys(LEASE_FIELDS),
            }
            values = {key: value for key, value in values.items() if key in self.names}
            if counted:
                values["attempts"] = F("attempts") + 1
            changed += int(_fenced(self.manager.filter(pk__in=pks), fence).update(**values))
        return changed

    # -- the admin, the relay command, health and metrics -------------------------------------

    def requeue(self, pks: Iterable[Any], *, now: datetime | None = None) -> Requeued:
        """Make the given rows due now, those not sent nor being sent by a relay (*Retry*)."""
        now = now or timezone.now()
        retryable = outbox_due(now, self.names, any_time=True)
        found = list(
            self.manager.filter(pk__in=list(pks)).filter(retryable).values_list("pk", flat=True)
        )
        values: dict[str, Any] = {
            "status": OutboxStatus.PENDING,
            "available_at": now,
            **dict.fromkeys(LEASE_FIELDS),
        }
        values = {key: value for key, value in values.items() if key in self.names}
        # Filtered again: a relay may have claimed a row since it was read.
        count = self.manager.filter(pk__in=found).filter(retryable).update(**values)
        return Requeued(found, int(count))

    def purge_sent(
        self, older_than: float, *, batch_size: int = DEFAULT_BATCH_SIZE, dry_run: bool = False
    ) -> Purged:
        """Delete sent rows whose ``sent_at`` is older than ``older_than`` seconds, in batches."""
        if "sent_at" not in self.names:
            raise JetStreamBridgeError(
                f"{self.model._meta.label} has no sent_at column: the purge cannot tell a sent "
                "row's age; add sent_at = DateTimeField(null=True)"
            )
        sent = self.manager.filter(
            status=OutboxStatus.SENT, sent_at__lt=timezone.now() - timedelta(seconds=older_than)
        )
        return delete_in_batches(sent, batch_size=batch_size, dry_run=dry_run)

    def backlog(self, *, by_subject: bool = False) -> dict[str, Any]:
        """Count rows by status, the age in seconds of the oldest unsent row and, with
        ``by_subject``, the unsent rows per subject (one per destination: per-peer backlog)."""
        manager = self.model._default_manager.db_manager(self.read_alias)
        counts = {
            row["status"]: row["n"]
            for row in manager.values("status").annotate(n=models.Count("pk")).order_by()
        }
        unsent = manager.exclude(status=OutboxStatus.SENT)
        oldest_age = None
        if "enqueued_at" in self.names:
            oldest = unsent.order_by("enqueued_at").values_list("enqueued_at", flat=True).first()
            if oldest is not None:
                oldest_age = (timezone.now() - oldest).total_seconds()
        grouped = unsent.values("subject").annotate(n=models.Count("pk")).order_by()
        per_subject = {str(row["subject"]): int(row["n"]) for row in grouped} if by_subject else {}
        return {"counts": counts, "oldest_unsent_age": oldest_age, "unsent_by_subject": per_subject}


def _for_update(queryset: models.QuerySet[Any], alias: str) -> models.QuerySet[Any]:
    """``SELECT ... FOR UPDATE`` of the outbox rows only, skipping locked ones if possible."""
    features = connections[alias].features
    lock: dict[str, Any] = {"skip_locked": features.has_select_for_update_skip_locked}
    if features.has_select_for_update_of:
        lock["of"] = ("self",)
    locked: models.QuerySet[Any] = queryset.select_for_update(**lock)
    return locked


def _fence(
    token: str | None, locked: bool, *, unclaimed: tuple[str, Any]
) -> tuple[str, str, Any] | None:
    """``(field, operator, value)`` a recorded row must match; None under row locks."""
    if locked:
        return None
    if token is not None:
        return ("locked_by", "=", token)
    return ("status", *unclaimed)


def _fenced(
    queryset: models.QuerySet[Any], fence: tuple[str, str, Any] | None
) -> models.QuerySet[Any]:
    """``queryset`` limited to the rows ``fence`` lets a writer record."""
    if fence is None:
        return queryset
    name, operator, value = fence
    match = {name: value}
    fenced: models.QuerySet[Any] = (
        queryset.filter(**match) if operator == "=" else queryset.exclude(**match)
    )
    return fenced


def _notify(store: OutboxStore) -> None:
    if not store.config.outbox_fast_path and store.vendor == "postgresql":
        # Delivered at commit (and dropped on rollback): wakes a LISTENing relay at once.
        postgresql.notify_outbox(connections[store.alias])


def _insert(store: OutboxStore, event: NewEvent) -> tuple[Any, bool]:
    """``OutboxStore.write`` for one row, after the relay was notified."""
    row = event.row_values(store.names)
    if not event.explicit_id:
        return insert_rows(store.model, store.alias, [row], returning=True)[0], True
    try:
        with transaction.atomic(using=store.alias):
            return insert_rows(store.model, store.alias, [row], returning=True)[0], True
    except IntegrityError:
        existing = store.manager.filter(event_id=event.event_id).values_list("pk", flat=True)
        pk = existing.first()
        if pk is None:
            raise
        return pk, False


def _in_resource_order(store: OutboxStore, queryset: models.QuerySet[Any]) -> models.QuerySet[Any]:
    """The rows of ``queryset`` with no earlier unsent row of their resource (and peer)."""
    older_unsent = store.manager.filter(
        resource_type=OuterRef("resource_type"),
        resource_id=OuterRef("resource_id"),
        pk__lt=OuterRef("pk"),
    ).exclude(status=OutboxStatus.SENT)
    if len(store.config.destinations) > 1:
        older_unsent = older_unsent.filter(subject=OuterRef("subject"))
    # Events without a resource id have nothing to be ordered against.
    ordered: models.QuerySet[Any] = queryset.filter(
        models.Q(resource_id="") | ~Exists(older_unsent)
    )
    return ordered
