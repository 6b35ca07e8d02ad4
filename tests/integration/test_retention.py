"""Retention: purging old outbox and inbox rows in batches, on a real database."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from jetstream_bridge.conf import get_config
from jetstream_bridge.core.envelope import MSG_ID_HEADER, build_envelope
from jetstream_bridge.inbox import InboxStore
from jetstream_bridge.models import InboxEvent, InboxStatus, OutboxEvent
from jetstream_bridge.outbox import OutboxStore
from jetstream_bridge.purge import Purged
from tests.admin_data import outbox_row

pytestmark = pytest.mark.django_db(transaction=True)
DAY = 86400.0


def inbox(
    name: str,
    status: str,
    *,
    received: float,
    processed: float | None = None,
    consumer: str = "billing",
) -> InboxEvent:
    """An inbox row received ``received`` days ago and processed ``processed`` days ago."""
    now = timezone.now()
    envelope = build_envelope(
        producer="peer", resource_type="order", event_type="created", payload={"id": name}
    )
    return InboxEvent.objects.create(
        consumer=consumer,
        event_id=name,
        subject="test.data.sync.peer.app",
        payload=envelope,
        headers={MSG_ID_HEADER: name},
        status=status,
        received_at=now - timedelta(days=received),
        processed_at=None if processed is None else now - timedelta(days=processed),
    )


def remaining() -> set[str]:
    return set(InboxEvent.objects.values_list("event_id", flat=True))


def deletes(queries: CaptureQueriesContext) -> list[str]:
    return [
        q["sql"] for q in queries.captured_queries if q["sql"].lstrip().upper().startswith("DELETE")
    ]


def mixed_inbox() -> None:
    inbox("old-processed-1", InboxStatus.PROCESSED, received=40, processed=40)
    inbox("old-processed-2", InboxStatus.PROCESSED, received=31, processed=31, consumer="audit")
    # Received long ago, retried for weeks, handled yesterday: remembered from its success.
    inbox("retried-then-processed", InboxStatus.PROCESSED, received=45, processed=1)
    inbox("new-processed", InboxStatus.PROCESSED, received=2, processed=2)
    inbox("old-failed", InboxStatus.FAILED, received=40)
    inbox("new-failed", InboxStatus.FAILED, received=2)
    inbox("old-received", InboxStatus.RECEIVED, received=40)


def test_inbox_purge__deletes_only_processed_rows_older_than_the_horizon() -> None:
    mixed_inbox()

    purged = InboxStore(get_config()).purge_processed(30 * DAY)

    assert purged == Purged(rows=2, batches=1)
    assert remaining() == {
        "retried-then-processed",
        "new-processed",
        "old-failed",
        "new-failed",
        "old-received",
    }


def test_inbox_purge__include_failed_also_deletes_old_failed_rows_and_keeps_the_rest() -> None:
    mixed_inbox()

    purged = InboxStore(get_config()).purge_processed(30 * DAY, include_failed=True)

    assert purged.rows == 3
    assert remaining() == {"retried-then-processed", "new-processed", "new-failed", "old-received"}


def test_inbox_purge__a_processed_row_without_processed_at_ages_from_its_receipt() -> None:
    inbox("imported-old", InboxStatus.PROCESSED, received=40)
    inbox("imported-new", InboxStatus.PROCESSED, received=3)

    assert InboxStore(get_config()).purge_processed(30 * DAY).rows == 1
    assert remaining() == {"imported-new"}


def test_inbox_purge__consumer_limits_it_to_one_durable() -> None:
    mixed_inbox()

    purged = InboxStore(get_config()).purge_processed(30 * DAY, consumer="audit")

    assert purged.rows == 1
    assert "old-processed-2" not in remaining()
    assert "old-processed-1" in remaining()


def test_inbox_purge__deletes_in_batches_of_batch_size_rows_each_its_own_statement() -> None:
    for i in range(7):
        inbox(f"old-{i}", InboxStatus.PROCESSED, received=40, processed=40)
    inbox("new", InboxStatus.PROCESSED, received=1, processed=1)
    inbox("failed", InboxStatus.FAILED, received=40)

    with CaptureQueriesContext(connection) as queries:
        purged = InboxStore(get_config()).purge_processed(30 * DAY, batch_size=3)

    assert purged == Purged(rows=7, batches=3)
    statements = deletes(queries)
    assert len(statements) == 3  # 3 + 3 + 1 rows
    # Keys were read first and deleted by key: no LIMIT inside a DELETE (MySQL refuses it in
    # a subquery on the same table), no DELETE without a key list.
    assert all(" IN (" in sql.upper() for sql in statements)
    assert not [sql for sql in statements if "LIMIT" in sql.upper() or "SELECT" in sql.upper()]
    # Each batch: read up to 3 keys outside any transaction, then delete them in a
    # transaction of their own; the last read finds nothing.
    kinds = [q["sql"].split()[0].upper() for q in queries.captured_queries]
    assert kinds == ["SELECT", "BEGIN", "DELETE", "COMMIT"] * 3 + ["SELECT"]
    assert remaining() == {"new", "failed"}


def test_inbox_purge__dry_run_counts_and_deletes_nothing() -> None:
    mixed_inbox()

    with CaptureQueriesContext(connection) as queries:
        purged = InboxStore(get_config()).purge_processed(
            30 * DAY, include_failed=True, batch_size=2, dry_run=True
        )

    assert purged == Purged(rows=3, batches=2, dry_run=True)
    assert deletes(queries) == []
    assert len(remaining()) == 7


def test_outbox_purge__deletes_old_sent_rows_in_batches_and_keeps_recent_and_unsent() -> None:
    config = get_config()
    old = [outbox_row(config, status="sent", number=i, age=timedelta(days=8)) for i in range(5)]
    recent = outbox_row(config, status="sent", number=10, age=timedelta(hours=1))
    unsent = [
        outbox_row(config, status=status, number=20 + i, age=timedelta(days=30))
        for i, status in enumerate(("pending", "failed"))
    ]

    with CaptureQueriesContext(connection) as queries:
        purged = OutboxStore(config).purge_sent(7 * DAY, batch_size=2)

    assert purged == Purged(rows=5, batches=3)
    assert len(deletes(queries)) == 3
    kept = set(OutboxEvent.objects.values_list("pk", flat=True))
    assert kept == {recent.pk, *(row.pk for row in unsent)}
    assert not kept & {row.pk for row in old}
