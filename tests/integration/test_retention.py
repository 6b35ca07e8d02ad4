"""Retention: purging old outbox and inbox rows in batches, on a real database."""

from __future__ import annotations

import io
from datetime import timedelta
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from jetstream_bridge.conf import get_config
from jetstream_bridge.core.envelope import MSG_ID_HEADER, build_envelope, encode
from jetstream_bridge.core.errors import JetStreamBridgeError
from jetstream_bridge.inbox import InboxStore
from jetstream_bridge.models import InboxEvent, InboxStatus, OutboxEvent
from jetstream_bridge.outbox import OutboxStore
from jetstream_bridge.purge import Purged
from tests.admin_data import outbox_row
from tests.helpers import fast_retry_bridge, nats, publish_incoming
from tests.testapp.models import Effect

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


def purge(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("jetstream_purge", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_purge_command__reports_rows_per_table_and_dry_run_deletes_nothing() -> None:
    config = get_config()
    for i in range(3):
        outbox_row(config, status="sent", number=i, age=timedelta(days=8))
    outbox_row(config, status="pending", number=9, age=timedelta(days=8))
    mixed_inbox()
    args = ("--outbox-sent-after", "7d", "--inbox-processed-after", "30d", "--batch-size", "2")

    out, _ = purge(*args, "--include-failed", "--dry-run")

    assert out.splitlines() == [
        "outbox: would delete 3 sent row(s) older than 7d in 2 batch(es)",
        "inbox: would delete 3 processed or failed row(s) older than 30d in 2 batch(es)",
    ]
    assert (OutboxEvent.objects.count(), InboxEvent.objects.count()) == (4, 7)

    out, _ = purge(*args)

    assert out.splitlines() == [
        "outbox: deleted 3 sent row(s) older than 7d in 2 batch(es)",
        "inbox: deleted 2 processed row(s) older than 30d in 1 batch(es)",
    ]
    assert list(OutboxEvent.objects.values_list("status", flat=True)) == ["pending"]
    assert "old-failed" in remaining()


def test_purge_command__one_table_alone() -> None:
    mixed_inbox()

    out, _ = purge("--inbox-processed-after", "30d")

    assert out.splitlines() == ["inbox: deleted 2 processed row(s) older than 30d in 1 batch(es)"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "nothing to purge: give --outbox-sent-after AGE and/or --inbox-processed-after AGE"),
        (("--outbox-sent-after", "7d", "--include-failed"), "need --inbox-processed-after AGE"),
        (("--inbox-processed-after", "soon"), "'soon' is not a duration"),
        (("--inbox-processed-after", "30d", "--batch-size", "0"), "from 1 to 10000"),
    ],
)
def test_purge_command__bad_arguments_say_what_to_write(
    args: tuple[str, ...], message: str
) -> None:
    inbox("old", InboxStatus.PROCESSED, received=40, processed=40)

    with pytest.raises(CommandError, match=message.replace("(", r"\(").replace(")", r"\)")):
        purge(*args)

    assert remaining() == {"old"}


def test_purge_command__warns_when_the_horizon_is_shorter_than_the_streams_age(
    settings: Any,
) -> None:
    settings.JETSTREAM_BRIDGE = {**settings.JETSTREAM_BRIDGE, "STREAM_MAX_AGE": "7d"}

    _, err = purge("--inbox-processed-after", "1d", "--dry-run")
    assert "the inbox horizon 1d is shorter than STREAM_MAX_AGE 7d" in err
    assert "runs its handler again" in err

    _, err = purge("--inbox-processed-after", "7d", "--dry-run")
    assert err == ""


DURABLE = "billing"


def test_consume_command__purges_its_durables_old_rows_then_consumes(
    jetstream_bridge: Any, settings: Any
) -> None:
    config = fast_retry_bridge(settings, DURABLE)
    mixed_inbox()
    fresh = publish_incoming(config, 2)
    out = io.StringIO()

    call_command(
        "jetstream_consume",
        "--durable",
        DURABLE,
        "--handler",
        "tests.testapp.handlers.record_effect",
        "--stop-when-idle",
        "--idle-timeout",
        "0.5",
        "--purge-processed-after",
        "30d",
        "--purge-failed",
        stdout=out,
    )

    lines = out.getvalue().splitlines()
    assert lines[0] == "inbox: deleted 2 processed or failed row(s) older than 30d in 1 batch(es)"
    assert lines[-1].startswith("processed 2,")
    # The other durable's old row stays; this durable's old processed and failed rows went.
    assert remaining() == {
        "old-processed-2",
        "retried-then-processed",
        "new-processed",
        "new-failed",
        "old-received",
        *fresh,
    }


def test_consume_command__purge_failed_needs_the_horizon() -> None:
    with pytest.raises(CommandError, match="--purge-failed needs --purge-processed-after AGE"):
        call_command("jetstream_consume", "--durable", DURABLE, "--purge-failed")


def test_inbox_purge__an_event_that_comes_back_after_its_row_was_purged_runs_again(
    jetstream_bridge: Any, settings: Any
) -> None:
    """The consequence the README spells out, shown: the purge horizon is the dedupe horizon."""
    config = fast_retry_bridge(settings, DURABLE)
    event = publish_incoming(config, 1)[0]
    run = ("--durable", DURABLE, "--handler", "tests.testapp.handlers.record_effect")
    idle = ("--stop-when-idle", "--idle-timeout", "0.5")
    call_command("jetstream_consume", *run, *idle, stdout=io.StringIO())
    body = encode(InboxEvent.objects.get(event_id=event).payload)

    # The same event again after the stream's duplicate window (a new Nats-Msg-Id stands for
    # that: a producer publishing it again, a replay): its row recognises it.
    nats(lambda c: c.publish(config.subjects.subscribe, body, {MSG_ID_HEADER: f"{event}-2"}))
    call_command("jetstream_consume", *run, *idle, stdout=io.StringIO())
    assert Effect.objects.filter(event_id=event).count() == 1

    InboxEvent.objects.update(processed_at=timezone.now() - timedelta(days=40))
    purge("--inbox-processed-after", "30d")
    nats(lambda c: c.publish(config.subjects.subscribe, body, {MSG_ID_HEADER: f"{event}-3"}))
    call_command("jetstream_consume", *run, *idle, stdout=io.StringIO())

    assert Effect.objects.filter(event_id=event).count() == 2


def test_purge_command__refuses_a_horizon_inside_the_bridges_own_redelivery_window(
    settings: Any,
) -> None:
    # 30s x 5 deliveries plus 1+5+15+30s of backoff: 201s; the duplicate window is 2m.
    inbox("an-hour-old", InboxStatus.PROCESSED, received=1 / 24, processed=1 / 24)
    with pytest.raises(CommandError, match=r"shorter than 201s.*--force"):
        purge("--inbox-processed-after", "60s")
    assert remaining() == {"an-hour-old"}

    out, _ = purge("--inbox-processed-after", "60s", "--force")
    assert "inbox: deleted 1 processed row(s)" in out
    assert remaining() == set()


def test_inbox_purge__for_one_consumer_needs_a_consumer_column() -> None:
    store = InboxStore(get_config())
    store.names = store.names - {"consumer"}  # as a custom INBOX_MODEL without the column
    inbox("old", InboxStatus.PROCESSED, received=40, processed=40)
    with pytest.raises(JetStreamBridgeError, match="no consumer column"):
        store.purge_processed(30 * DAY, consumer="billing")
    assert remaining() == {"old"}


def test_outbox_purge__refuses_a_model_without_sent_at_instead_of_deleting_every_sent_row() -> None:
    store = OutboxStore(get_config())
    store.names = store.names - {"sent_at"}  # as a custom OUTBOX_MODEL without the column
    outbox_row(get_config(), status="sent")
    with pytest.raises(JetStreamBridgeError, match="no sent_at column"):
        store.purge_sent(7 * DAY)
    assert OutboxEvent.objects.count() == 1
