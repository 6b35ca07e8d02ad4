"""The outbox store's own operations on a real database, without a broker."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from jetstream_bridge.conf import get_config
from jetstream_bridge.models import OutboxEvent, OutboxStatus
from jetstream_bridge.outbox import OutboxStore
from tests.admin_data import outbox_row

pytestmark = pytest.mark.django_db(transaction=True)


def _publishing(number: int, locked_until: Any) -> OutboxEvent:
    row = outbox_row(get_config(), status="pending", number=number)
    OutboxEvent.objects.filter(pk=row.pk).update(
        status=OutboxStatus.PUBLISHING,
        locked_by=None if locked_until is None else f"relay-{number}",
        locked_until=locked_until,
    )
    return row


def test_outbox_store__due_is_the_queryset_due_and_includes_a_lease_never_set() -> None:
    now = timezone.now()
    outbox_row(get_config(), status="failed", number=1)  # retry in an hour
    pending = outbox_row(get_config(), status="pending", number=2)
    outbox_row(get_config(), status="sent", number=3)
    _publishing(4, now + timedelta(minutes=1))  # a relay sends it right now
    lapsed = _publishing(5, now - timedelta(minutes=1))
    abandoned = _publishing(6, None)

    due = set(OutboxStore(get_config()).due(now).values_list("pk", flat=True))

    assert due == {pending.pk, lapsed.pk, abandoned.pk}
    assert set(OutboxEvent.objects.due(now).values_list("pk", flat=True)) == due


def test_outbox_store__requeue_makes_unsent_rows_due_now_and_leaves_sent_and_leased_ones() -> None:
    now = timezone.now()
    failed = outbox_row(get_config(), status="failed", number=1, attempts=3)
    sent = outbox_row(get_config(), status="sent", number=2)
    live = _publishing(3, now + timedelta(minutes=1))
    lapsed = _publishing(4, now - timedelta(minutes=1))

    requeued = OutboxStore(get_config()).requeue([failed.pk, sent.pk, live.pk, lapsed.pk])

    assert (sorted(requeued.pks), requeued.count) == (sorted([failed.pk, lapsed.pk]), 2)
    rows = {row.pk: row for row in OutboxEvent.objects.all()}
    for pk in (failed.pk, lapsed.pk):
        assert rows[pk].status == OutboxStatus.PENDING
        assert rows[pk].available_at <= timezone.now()
        assert (rows[pk].locked_by, rows[pk].locked_until) == (None, None)
    assert rows[failed.pk].attempts == 3  # a retry from the admin is not an attempt
    assert rows[sent.pk].status == OutboxStatus.SENT
    assert (rows[live.pk].status, rows[live.pk].locked_by) == (OutboxStatus.PUBLISHING, "relay-3")
    assert set(OutboxEvent.objects.due().values_list("pk", flat=True)) == {failed.pk, lapsed.pk}


def test_outbox_store__purge_sent_deletes_only_old_sent_rows() -> None:
    old = outbox_row(get_config(), status="sent", number=1, age=timedelta(days=8))
    recent = outbox_row(get_config(), status="sent", number=2, age=timedelta(hours=1))
    unsent = outbox_row(get_config(), status="failed", number=3, age=timedelta(days=8))

    purged = OutboxStore(get_config()).purge_sent(timedelta(days=7).total_seconds(), batch_size=1)
    assert purged.rows == 1

    assert set(OutboxEvent.objects.values_list("pk", flat=True)) == {recent.pk, unsent.pk}
    assert not OutboxEvent.objects.filter(pk=old.pk).exists()


def test_outbox_store__backlog_counts_rows_and_ages_the_oldest_unsent() -> None:
    outbox_row(get_config(), status="sent", number=1, age=timedelta(hours=5))
    outbox_row(get_config(), status="failed", number=2, age=timedelta(hours=2))
    outbox_row(get_config(), status="pending", number=3, age=timedelta(minutes=1))

    backlog = OutboxStore(get_config()).backlog()

    assert backlog["counts"] == {"sent": 1, "failed": 1, "pending": 1}
    assert 2 * 3600 - 60 < backlog["oldest_unsent_age"] < 2 * 3600 + 60
