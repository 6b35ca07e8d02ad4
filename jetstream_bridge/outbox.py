"""The outbox table's side of publishing: write, lock or lease batches, record results, purge.

All functions are synchronous database code (the ORM, and plain SQL from ``sql.py`` on the hot
paths); the relay and the publisher's fast path call them from threads, never from the event
loop.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.apps import apps
from django.db import IntegrityError, connections, models, router, transaction
from django.db.models import Exists, F, OuterRef, TextField
from django.db.models.expressions import RawSQL
from django.db.models.functions import Cast
from django.utils import timezone

from .core.config import BridgeConfig, Problem
from .core.envelope import MSG_ID_HEADER
from .exceptions import ConfigurationError
from .models import OutboxStatus, field_names, only_fields
from .sql import RawJson, array_literal, insert_rows, quoted_column

logger = logging.getLogger(__name__)

LEASE_FIELDS = ("locked_by", "locked_until")
NOTIFY_CHANNEL = "jetstream_bridge_outbox"


def outbox_model(config: BridgeConfig) -> type[models.Model]:
    return apps.get_model(config.outbox_model)


@dataclass(frozen=True)
class ClaimedRow:
    """A row a relay holds (a row lock or a lease), ready to publish."""

    pk: Any
    event_id: str
    subject: str
    body: bytes
    headers: dict[str, str]
    attempts: int


def write_event(
    config: BridgeConfig,
    *,
    using: str | None,
    event_id: str,
    subject: str,
    envelope: dict[str, Any],
    headers: dict[str, str],
    explicit_id: bool,
    encoded: str | None = None,
) -> tuple[Any, bool]:
    """Insert the outbox row in the caller's transaction; return ``(pk, created)``.

    A generated event id cannot collide, so it is a single INSERT. A caller-supplied id may
    repeat: then the insert runs in a savepoint and a duplicate is reported, not raised.
    ``encoded`` is the envelope's JSON when the caller has it already (it is stored as is).

    The row is written with one plain INSERT (``sql.insert_rows``), not ``Model.objects.create()``:
    a custom outbox model's field defaults apply, its ``save()`` and model signals do not run.
    """
    model = outbox_model(config)
    alias = using or router.db_for_write(model)
    values = only_fields(
        model,
        {
            "event_id": event_id,
            "subject": subject,
            "payload": RawJson(encoded if encoded is not None else json.dumps(envelope)),
            "headers": headers,
            "resource_type": envelope.get("resource_type") or "",
            "resource_id": envelope.get("resource_id") or "",
            "event_type": envelope.get("event_type") or "",
            "status": OutboxStatus.PENDING,
            "enqueued_at": timezone.now(),
        },
    )
    connection = connections[alias]
    if not config.outbox_fast_path and connection.vendor == "postgresql":
        # Delivered at commit (and dropped on rollback): wakes a LISTENing relay at once.
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, '')", [NOTIFY_CHANNEL])
    if not explicit_id:
        return insert_rows(model, alias, [values], returning=True)[0], True
    try:
        with transaction.atomic(using=alias):
            return insert_rows(model, alias, [values], returning=True)[0], True
    except IntegrityError:
        manager = model._default_manager.db_manager(alias)
        existing = manager.filter(event_id=event_id).values_list("pk", flat=True).first()
        if existing is None:
            raise
        return existing, False


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


def _due_rows(
    config: BridgeConfig, model: type[models.Model], alias: str, now: datetime, after: Any
) -> models.QuerySet[Any]:
    """Rows a relay may take now, in key order: unsent and due, or leased with the lease gone."""
    names = field_names(model)
    manager = model._default_manager.db_manager(alias)
    due = models.Q(status__in=[OutboxStatus.PENDING, OutboxStatus.FAILED])
    if "available_at" in names:
        due &= models.Q(available_at__lte=now)
    if "locked_until" in names:
        due |= models.Q(status=OutboxStatus.PUBLISHING, locked_until__lt=now)
    queryset: models.QuerySet[Any] = manager.filter(due)
    if after is not None:
        queryset = queryset.filter(pk__gt=after)
    if config.outbox_ordering and {"resource_type", "resource_id"} <= names:
        older_unsent = manager.filter(
            resource_type=OuterRef("resource_type"),
            resource_id=OuterRef("resource_id"),
            pk__lt=OuterRef("pk"),
        ).exclude(status=OutboxStatus.SENT)
        # Events without a resource id have nothing to be ordered against.
        queryset = queryset.filter(models.Q(resource_id="") | ~Exists(older_unsent))
    return _readable(queryset, names)


def _readable(queryset: models.QuerySet[Any], names: frozenset[str]) -> models.QuerySet[Any]:
    """Rows in key order with what ``_row_columns`` reads.

    Text, not decoded JSON: the body is published as it is, and the headers (almost always
    "{}") are decoded only when there are some (``_claimed_rows``).
    """
    ordered: models.QuerySet[Any] = queryset.order_by("pk").annotate(
        body=Cast("payload", TextField())
    )
    if "headers" in names:
        ordered = ordered.annotate(headers_text=Cast("headers", TextField()))
    return ordered


def _row_columns(names: frozenset[str]) -> tuple[str, ...]:
    """What a relay reads of a row; headers and attempts only where the model has them."""
    columns = ["pk", "event_id", "subject", "body"]
    if "headers" in names:
        columns.append("headers_text")  # see _readable
    if "attempts" in names:
        columns.append("attempts")
    return tuple(columns)


def _claimed_rows(
    rows: Iterable[Sequence[Any]], names: frozenset[str], *, counted: bool
) -> list[ClaimedRow]:
    """``ClaimedRow``s from tuples read with ``_row_columns(names)``.

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


def can_lock_rows(config: BridgeConfig, using: str | None) -> bool:
    """Whether relays hold row locks while publishing (``lock_batch``) or take leases.

    Locks need ``SKIP LOCKED`` (PostgreSQL, MySQL 8, MariaDB 10.6); SQLite has one database-wide
    write lock, so holding it while publishing would stall every writer: it uses leases.
    """
    model = outbox_model(config)
    alias = using or router.db_for_write(model)
    return bool(connections[alias].features.has_select_for_update_skip_locked)


def lock_batch(
    config: BridgeConfig,
    *,
    using: str | None,
    limit: int,
    now: datetime | None = None,
    after: Any = None,
) -> list[ClaimedRow]:
    """Lock up to ``limit`` due rows for the caller's transaction; return them in key order.

    Must run inside ``transaction.atomic()``. The caller publishes the rows and records the
    results before committing: a relay that dies rolls back and its rows are due again at
    once, and each row is written once (sent or failed) instead of twice (leased, then
    sent), which doubled a relay's database throughput on PostgreSQL (docs/benchmarks.md).
    Other relays skip the locked rows (``SKIP LOCKED``).
    """
    model = outbox_model(config)
    alias = using or router.db_for_write(model)
    connection = connections[alias]
    if not connection.in_atomic_block:
        raise RuntimeError("lock_batch() must run inside transaction.atomic()")
    if connection.vendor == "postgresql":
        # A relay that stalls while publishing (a stopped process, a hung network) must not
        # hold its rows forever: PostgreSQL ends the session once it has sat idle in the
        # transaction for RELAY_LEASE, which releases the locks, and another relay sends the
        # rows. Never less than a batch may take against a server that stopped answering
        # (two rounds of publish timeouts), or a slow but live relay would be cut off.
        limit_ms = int(max(config.relay_lease, 2 * config.request_timeout + 1.0) * 1000)
        # And a transaction of the relay's own need not wait for its WAL flush at commit:
        # should PostgreSQL crash right after it, the rows it recorded as sent are pending
        # again and published once more, which the stream drops as duplicates (Nats-Msg-Id)
        # and an inbox would too. Not inside a caller's transaction (savepoint_ids is empty in
        # the outermost atomic block only): the caller's writes keep their durability.
        sql = "SELECT set_config('idle_in_transaction_session_timeout', %s, true)"
        if not connection.savepoint_ids:
            sql += ", set_config('synchronous_commit', 'off', true)"
        with connection.cursor() as cursor:
            cursor.execute(sql, [str(limit_ms)])
    names = field_names(model)
    queryset = _for_update(_due_rows(config, model, alias, now or timezone.now(), after), alias)
    rows = list(queryset.values_list(*_row_columns(names))[:limit])
    return _claimed_rows(rows, names, counted=False)


def _for_update(queryset: models.QuerySet[Any], alias: str) -> models.QuerySet[Any]:
    """``SELECT ... FOR UPDATE`` of the outbox rows only, skipping locked ones where possible."""
    features = connections[alias].features
    lock: dict[str, Any] = {"skip_locked": features.has_select_for_update_skip_locked}
    if features.has_select_for_update_of:
        lock["of"] = ("self",)
    locked: models.QuerySet[Any] = queryset.select_for_update(**lock)
    return locked


def claim_batch(
    config: BridgeConfig,
    *,
    using: str | None,
    limit: int,
    now: datetime | None = None,
    after: Any = None,
) -> tuple[str, list[ClaimedRow]]:
    """Lease up to ``limit`` due rows for this relay; return the lease token and the rows.

    The transaction is short: ``SELECT ... FOR UPDATE SKIP LOCKED`` then one UPDATE (on
    SQLite, a single UPDATE). The network I/O happens after it commits, protected by the lease
    instead of a lock. With ``after``, only rows with a greater primary key are considered
    (see ``Relay.drain``). Relays use this where ``can_lock_rows()`` is false.
    """
    model = outbox_model(config)
    names = field_names(model)
    missing = [name for name in LEASE_FIELDS if name not in names]
    if missing:
        raise LeaseFieldsMissing(model, missing)
    alias = using or router.db_for_write(model)
    now = now or timezone.now()
    token = uuid.uuid4().hex
    manager = model._default_manager.db_manager(alias)
    queryset = _due_rows(config, model, alias, now, after)
    columns = _row_columns(names)
    update: dict[str, Any] = {
        "status": OutboxStatus.PUBLISHING,
        "locked_by": token,
        "locked_until": now + timedelta(seconds=config.relay_lease),
    }
    if "attempts" in names:
        update["attempts"] = F("attempts") + 1
    with transaction.atomic(using=alias):
        if connections[alias].vendor == "sqlite":
            # A SELECT first would hold a shared lock that SQLite refuses to upgrade while
            # another process writes ("database is locked"); a single UPDATE waits for the
            # write lock instead, and the database-wide lock makes SKIP LOCKED unnecessary.
            picked = queryset.values("pk")[:limit]
            if not manager.filter(pk__in=picked).update(**update):
                return token, []
            rows = list(_readable(manager.filter(locked_by=token), names).values_list(*columns))
            return token, _claimed_rows(rows, names, counted=True)
        rows = list(_for_update(queryset, alias).values_list(*columns)[:limit])
        if not rows:
            return token, []
        manager.filter(pk__in=[row[0] for row in rows]).update(**update)
    return token, _claimed_rows(rows, names, counted=False)


def has_older_unsent(
    config: BridgeConfig, *, using: str | None, pk: Any, resource_type: str, resource_id: str
) -> bool:
    """Tell whether an earlier event of the same resource is still unsent (ordering)."""
    model = outbox_model(config)
    manager = model._default_manager.db_manager(using or router.db_for_read(model))
    return bool(
        manager.filter(resource_type=resource_type, resource_id=resource_id, pk__lt=pk)
        .exclude(status=OutboxStatus.SENT)
        .exists()
    )


def _case_by_pk(
    model: type[models.Model], alias: str, field: str, mapping: Sequence[tuple[Any, Any]]
) -> RawSQL:
    """``CASE pk WHEN .. THEN .. ELSE field END`` as raw SQL.

    The ORM's ``Case(When(...))`` costs about 0.2 ms of Python per branch to build; a relay
    batch of 500 rows spent ~100 ms there against ~10 ms in the database.
    """
    column = quoted_column(model, alias, field)
    branches = " ".join(["WHEN %s THEN %s"] * len(mapping))
    params = [value for pair in mapping for value in pair]
    # Only quoted column names are interpolated; every value is a bound parameter.
    return RawSQL(  # noqa: S611
        f"CASE {quoted_column(model, alias, 'pk')} {branches} ELSE {column} END",
        params,
        output_field=models.BigIntegerField(),
    )


def mark_sent(
    config: BridgeConfig,
    *,
    using: str | None,
    sent: Iterable[tuple[Any, int | None]],
    token: str | None = None,
    locked: bool = False,
) -> int:
    """Mark rows sent ``(pk, stream_seq)`` in one UPDATE, fenced three ways.

    With ``token``, only rows this relay still leases. With ``locked``, the caller holds the
    rows' locks (``lock_batch``) and the attempt is counted here. Otherwise (the fast path) a
    row already sent is left alone: the fast path never overrides a relay.
    """
    pairs = list(sent)
    if not pairs:
        return 0
    model = outbox_model(config)
    names = field_names(model)
    alias = using or router.db_for_write(model)
    if connections[alias].vendor == "postgresql":
        return _mark_sent_postgresql(model, names, alias, pairs, token, locked)
    values: dict[str, Any] = {"status": OutboxStatus.SENT}
    if "sent_at" in names:
        values["sent_at"] = timezone.now()
    if "last_error" in names:
        values["last_error"] = None
    if "stream_seq" in names:
        known = [(pk, seq) for pk, seq in pairs if seq is not None]
        if known:
            values["stream_seq"] = _case_by_pk(model, alias, "stream_seq", known)
    if "locked_by" in names:
        values.update(locked_by=None, locked_until=None)
    queryset = model._default_manager.db_manager(alias).filter(pk__in=[pk for pk, _ in pairs])
    if locked:
        if "attempts" in names:
            values["attempts"] = F("attempts") + 1
    elif token is not None:
        queryset = queryset.filter(locked_by=token)
    else:
        queryset = queryset.exclude(status=OutboxStatus.SENT)
    return int(queryset.update(**values))


def _mark_sent_postgresql(
    model: type[models.Model],
    names: frozenset[str],
    alias: str,
    pairs: list[tuple[Any, int | None]],
    token: str | None,
    locked: bool,
) -> int:
    """``mark_sent`` as one statement joining two arrays (keys, stream sequences).

    The ORM's ``pk IN (...)`` plus a ``CASE`` per row sent ~1,500 parameters per 500-row
    batch, and psycopg parsed that query text anew each time: recording took a third of a
    relay's time (docs/benchmarks.md). Two array parameters keep the query text constant.
    """
    connection = connections[alias]
    quote = connection.ops.quote_name
    pk_column = quoted_column(model, alias, "pk")
    pk_type = model._meta.pk.rel_db_type(connection)
    assignments = [f"{quoted_column(model, alias, 'status')} = %s"]
    params: list[Any] = [OutboxStatus.SENT]
    if "sent_at" in names:
        assignments.append(f"{quoted_column(model, alias, 'sent_at')} = %s")
        params.append(timezone.now())
    for name in ("last_error", "locked_by", "locked_until"):
        if name in names:
            assignments.append(f"{quoted_column(model, alias, name)} = NULL")
    if "stream_seq" in names:
        column = quoted_column(model, alias, "stream_seq")
        assignments.append(f"{column} = COALESCE(v.seq, t.{column})")
    fence_params: list[Any] = []
    if locked:
        fence = "TRUE"
        if "attempts" in names:
            column = quoted_column(model, alias, "attempts")
            assignments.append(f"{column} = t.{column} + 1")
    elif token is not None:
        fence = f"t.{quoted_column(model, alias, 'locked_by')} = %s"
        fence_params = [token]
    else:
        fence = f"t.{quoted_column(model, alias, 'status')} <> %s"
        fence_params = [OutboxStatus.SENT]
    # Only quoted column names and the key's type are interpolated; values are parameters.
    table = quote(model._meta.db_table)
    sql = (
        f"UPDATE {table} AS t SET {', '.join(assignments)} "  # noqa: S608
        f"FROM unnest(%s::{pk_type}[], %s::bigint[]) AS v(pk, seq) "
        f"WHERE t.{pk_column} = v.pk AND {fence}"
    )
    # Array literals as text: psycopg's list adaptation ran in Python, ~1 ms per 500 keys.
    keys = array_literal(pk for pk, _ in pairs)
    seqs = array_literal(seq for _, seq in pairs)
    with connection.cursor() as cursor:
        cursor.execute(sql, [*params, keys, seqs, *fence_params])
        return int(cursor.rowcount)


def mark_failed(
    config: BridgeConfig,
    *,
    using: str | None,
    failed: Iterable[tuple[Any, int, str]],
    token: str | None = None,
    locked: bool = False,
) -> int:
    """Record failures ``(pk, attempts, error)``; each row becomes due again after backoff.

    Fenced like ``mark_sent``: ``token``, ``locked`` or (the fast path) only pending rows.
    """
    model = outbox_model(config)
    names = field_names(model)
    alias = using or router.db_for_write(model)
    now = timezone.now()
    groups: dict[tuple[float, str], list[Any]] = {}
    for pk, attempts, error in failed:
        schedule = config.relay_retry_backoff or (1.0,)
        delay = schedule[min(max(attempts, 1), len(schedule)) - 1]
        groups.setdefault((delay, error[:2000]), []).append(pk)
    changed = 0
    manager = model._default_manager.db_manager(alias)
    for (delay, error), pks in groups.items():
        values: dict[str, Any] = {"status": OutboxStatus.FAILED}
        if "last_error" in names:
            values["last_error"] = error
        if "available_at" in names:
            values["available_at"] = now + timedelta(seconds=delay)
        if "locked_by" in names:
            values.update(locked_by=None, locked_until=None)
        queryset = manager.filter(pk__in=pks)
        if locked:
            if "attempts" in names:
                values["attempts"] = F("attempts") + 1
        elif token is not None:
            queryset = queryset.filter(locked_by=token)
        else:
            # The fast path never overrides a relay that has taken the row meanwhile.
            queryset = queryset.filter(status=OutboxStatus.PENDING)
            if "attempts" in names:
                values["attempts"] = F("attempts") + 1
        changed += int(queryset.update(**values))
    return changed


def purge_sent(
    config: BridgeConfig, *, using: str | None, older_than: float, chunk: int = 5000
) -> int:
    """Delete sent rows older than ``older_than`` seconds, ``chunk`` rows per statement."""
    model = outbox_model(config)
    alias = using or router.db_for_write(model)
    cutoff = timezone.now() - timedelta(seconds=older_than)
    field = "sent_at" if "sent_at" in field_names(model) else None
    manager = model._default_manager.db_manager(alias)
    total = 0
    while True:
        queryset = manager.filter(status=OutboxStatus.SENT)
        if field:
            queryset = queryset.filter(**{f"{field}__lt": cutoff})
        pks = list(queryset.order_by("pk").values_list("pk", flat=True)[:chunk])
        if not pks:
            return total
        deleted, _ = manager.filter(pk__in=pks).delete()
        total += deleted


def backlog(config: BridgeConfig, *, using: str | None = None) -> dict[str, Any]:
    """Count rows by status and the age in seconds of the oldest unsent row."""
    model = outbox_model(config)
    alias = using or router.db_for_read(model)
    manager = model._default_manager.db_manager(alias)
    counts = {
        row["status"]: row["n"]
        for row in manager.values("status").annotate(n=models.Count("pk")).order_by()
    }
    oldest_age = None
    if "enqueued_at" in field_names(model):
        oldest = (
            manager.exclude(status=OutboxStatus.SENT)
            .order_by("enqueued_at")
            .values_list("enqueued_at", flat=True)
            .first()
        )
        if oldest is not None:
            oldest_age = (timezone.now() - oldest).total_seconds()
    return {"counts": counts, "oldest_unsent_age": oldest_age}
