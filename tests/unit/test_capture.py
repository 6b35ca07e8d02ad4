"""The testing kit's broker-free modes: capture what is published, deliver to a handler.

NATS_URLS points at a closed port: a publish that reached for the broker would fail.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from django.db import transaction

from jetstream_bridge import Publisher, publisher
from jetstream_bridge.core import dead_letter
from jetstream_bridge.core.envelope import build_envelope
from jetstream_bridge.core.errors import RejectMessage
from jetstream_bridge.models import InboxEvent, OutboxEvent
from jetstream_bridge.testing.capture import Capture, capture_published
from tests.testapp import handlers
from tests.testapp.models import Effect


def publish(**overrides: Any) -> Any:
    fields: dict[str, Any] = {
        "resource_type": "order",
        "event_type": "created",
        "payload": {"id": 7, "number": "A-7"},
    }
    return Publisher().publish(**{**fields, **overrides})


# -- capturing ------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_capture__records_the_exact_envelope_subject_and_headers(
    no_outbox: Any, jetstream_capture: Capture
) -> None:
    result = publish(
        event_id="evt-1",
        trace_id="trace-1",
        occurred_at="2025-01-02T03:04:05.000Z",
        headers={"X-Tenant": "acme"},
    )
    assert (result.status, result.event_id, result.stream, result.stream_seq) == (
        "sent",
        "evt-1",
        no_outbox.stream_name,
        1,
    )
    assert jetstream_capture.events == [
        {
            "event_id": "evt-1",
            "schema_version": 1,
            "event_type": "created",
            "producer": "alpha",
            "resource_type": "order",
            "resource_id": "7",
            "occurred_at": "2025-01-02T03:04:05.000Z",
            "trace_id": "trace-1",
            "payload": {"id": 7, "number": "A-7"},
        }
    ]
    [message] = jetstream_capture.messages
    assert message.subject == "unit.data.sync.alpha.beta"
    assert message.headers == {"X-Tenant": "acme", "Nats-Msg-Id": "evt-1"}


@pytest.mark.django_db(transaction=True)
def test_capture__rolled_back_publish_is_not_captured(
    no_outbox: Any, jetstream_capture: Capture
) -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        assert publish().status == "deferred"
        raise RuntimeError("the order could not be saved")
    jetstream_capture.assert_nothing_published()


@pytest.mark.django_db(transaction=True)
def test_capture__deferred_publish_is_captured_when_the_transaction_commits(
    no_outbox: Any, jetstream_capture: Capture
) -> None:
    with transaction.atomic():
        publish()
        assert jetstream_capture.events == []
    jetstream_capture.assert_published(resource_type="order", event_type="created")


@pytest.mark.django_db(transaction=True)
def test_capture__outbox_row_is_written_and_the_send_captured_after_commit(
    bridge: Any, jetstream_capture: Capture
) -> None:
    with transaction.atomic():
        result = publish()
        assert result.status == "queued"
        assert OutboxEvent.objects.filter(event_id=result.event_id).exists()
        assert jetstream_capture.events == []
    event = jetstream_capture.assert_published(payload_contains={"number": "A-7"})
    assert event["event_id"] == result.event_id
    # Nothing left the process, so the row waits for a relay, as with a broker outage.
    assert OutboxEvent.objects.get().status == "pending"


@pytest.mark.django_db(transaction=True)
def test_capture__outbox_rollback_leaves_no_row_and_captures_nothing(
    bridge: Any, jetstream_capture: Capture
) -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        publish()
        raise RuntimeError("rolled back")
    assert OutboxEvent.objects.count() == 0
    jetstream_capture.assert_nothing_published()


@pytest.mark.django_db(transaction=True)
def test_capture__outbox_without_fast_path_is_captured_too(
    bridge: Any, settings: Any, jetstream_capture: Capture
) -> None:
    settings.JETSTREAM_BRIDGE = {**settings.JETSTREAM_BRIDGE, "OUTBOX_FAST_PATH": False}
    publish()
    jetstream_capture.assert_published(event_type="created", count=1)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("use_outbox", [True, False])
def test_capture__publish_async_is_captured(
    bridge: Any, settings: Any, jetstream_capture: Capture, use_outbox: bool
) -> None:
    settings.JETSTREAM_BRIDGE = {**settings.JETSTREAM_BRIDGE, "USE_OUTBOX": use_outbox}
    result = asyncio.run(
        Publisher().publish_async(resource_type="order", event_type="paid", payload={"id": 1})
    )
    assert result.status == ("queued" if use_outbox else "sent")
    assert [e["event_id"] for e in jetstream_capture.events] == [result.event_id]


@pytest.mark.django_db(transaction=True)
def test_capture__same_event_id_twice_is_a_duplicate_like_on_the_stream(
    no_outbox: Any, jetstream_capture: Capture
) -> None:
    assert publish(event_id="same").status == "sent"
    assert publish(event_id="same").status == "duplicate"
    assert len(jetstream_capture.events) == 1


def test_capture__django_db_test_sees_events_through_captured_on_commit_callbacks(
    db: None, bridge: Any, jetstream_capture: Capture, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        publish()
    jetstream_capture.assert_published(resource_type="order")
    assert OutboxEvent.objects.count() == 1


def test_capture__restores_the_real_sender_on_exit() -> None:
    real = publisher.current_sender()
    with capture_published() as capture:
        assert publisher.current_sender() is capture
    assert publisher.current_sender() is real


@pytest.mark.django_db(transaction=True)
def test_capture__clear_forgets_what_was_captured(
    no_outbox: Any, jetstream_capture: Capture
) -> None:
    publish()
    jetstream_capture.clear()
    jetstream_capture.assert_nothing_published()


# -- assertion messages ---------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_assert_published__says_nothing_was_published(
    no_outbox: Any, jetstream_capture: Capture
) -> None:
    with pytest.raises(AssertionError) as failure:
        jetstream_capture.assert_published(resource_type="order", event_type="created")
    assert str(failure.value) == (
        "expected an event matching resource_type='order', event_type='created'; found none. "
        "Nothing was published."
    )


@pytest.mark.django_db(transaction=True)
def test_assert_published__lists_what_was_published_when_nothing_matches(
    no_outbox: Any, jetstream_capture: Capture
) -> None:
    publish()
    publish(event_type="shipped", payload={"id": 8, "carrier": "ups"})
    with pytest.raises(AssertionError) as failure:
        jetstream_capture.assert_published(event_type="created", payload_contains={"id": 8})
    assert str(failure.value) == (
        "expected an event matching event_type='created', payload_contains={'id': 8}; "
        "found none. 2 event(s) were published:\n"
        "  1. order/created resource_id='7' payload={'id': 7, 'number': 'A-7'}\n"
        "  2. order/shipped resource_id='8' payload={'carrier': 'ups', 'id': 8}"
    )


@pytest.mark.django_db(transaction=True)
def test_assert_published__checks_the_count(no_outbox: Any, jetstream_capture: Capture) -> None:
    publish()
    publish()
    jetstream_capture.assert_published(resource_type="order", count=2)
    with pytest.raises(AssertionError, match=r"^expected 1 event\(s\) matching .*; found 2\. "):
        jetstream_capture.assert_published(resource_type="order", count=1)


@pytest.mark.django_db(transaction=True)
def test_assert_published__matches_nested_payload_subsets(
    no_outbox: Any, jetstream_capture: Capture
) -> None:
    publish(payload={"id": 1, "customer": {"id": 5, "tier": "gold"}, "lines": [1, 2]})
    jetstream_capture.assert_published(payload_contains={"customer": {"tier": "gold"}})
    jetstream_capture.assert_published(payload_contains={"lines": [1, 2]})
    with pytest.raises(AssertionError):
        jetstream_capture.assert_published(payload_contains={"customer": {"tier": "silver"}})


@pytest.mark.django_db(transaction=True)
def test_assert_nothing_published__lists_the_events(
    no_outbox: Any, jetstream_capture: Capture
) -> None:
    publish()
    with pytest.raises(AssertionError) as failure:
        jetstream_capture.assert_nothing_published()
    assert str(failure.value) == (
        "expected no events to be published. 1 event(s) were published:\n"
        "  1. order/created resource_id='7' payload={'id': 7, 'number': 'A-7'}"
    )


def test_assert_published__inside_an_uncommitted_test_transaction_says_how_to_commit(
    db: None, bridge: Any, jetstream_capture: Capture
) -> None:
    publish()  # queued in the outbox; the django_db test transaction never commits
    with pytest.raises(AssertionError) as failure:
        jetstream_capture.assert_published(resource_type="order")
    message = str(failure.value)
    assert message.startswith(
        "expected an event matching resource_type='order'; found none. Nothing was published. "
        "Events are captured when their transaction commits"
    )
    assert "django_capture_on_commit_callbacks(execute=True)" in message
    assert "@pytest.mark.django_db(transaction=True)" in message


# -- delivering -----------------------------------------------------------------------------


def incoming(**payload: Any) -> dict[str, Any]:
    return build_envelope(
        producer="beta", resource_type="order", event_type="created", payload={"id": 1, **payload}
    )


@pytest.mark.django_db(transaction=True)
def test_deliver__runs_the_handler_and_records_the_inbox_row(
    bridge: Any, jetstream_deliver: Any
) -> None:
    envelope = incoming()
    result = jetstream_deliver(envelope, handlers.record_effect)
    assert result.processed
    assert list(Effect.objects.values_list("event_id", flat=True)) == [envelope["event_id"]]
    row = InboxEvent.objects.get()
    assert (row.event_id, row.status, row.consumer) == (envelope["event_id"], "processed", "tests")


def test_deliver__works_inside_a_django_db_test_transaction(
    db: None, bridge: Any, jetstream_deliver: Any
) -> None:
    assert jetstream_deliver(incoming(), handlers.record_effect).processed
    assert Effect.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_deliver__the_same_event_twice_is_a_duplicate(bridge: Any, jetstream_deliver: Any) -> None:
    envelope = incoming()
    jetstream_deliver(envelope, handlers.record_effect)
    again = jetstream_deliver(envelope, handlers.record_effect)
    assert (again.verdict, again.duplicate, again.processed) == ("ack", True, False)
    assert Effect.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_deliver__a_failure_is_retried_with_the_backoff_then_dead_lettered(
    bridge: Any, settings: Any, jetstream_deliver: Any
) -> None:
    settings.JETSTREAM_BRIDGE = {**settings.JETSTREAM_BRIDGE, "MAX_DELIVER": 2, "BACKOFF": ["3s"]}
    envelope = incoming(poison=True)
    first = jetstream_deliver(envelope, handlers.always_fails)
    assert (first.verdict, first.retry_delay) == ("retry", 3.0)
    last = jetstream_deliver(envelope, handlers.always_fails, deliveries=2)
    assert last.dead_lettered
    assert last.dead_letter is not None
    assert (last.dead_letter.reason, last.dead_letter.error_message) == (
        dead_letter.MAX_DELIVER,
        "cannot handle this one",
    )
    assert InboxEvent.objects.get().status == "failed"
    assert Effect.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_deliver__reject_message_dead_letters_at_once(bridge: Any, jetstream_deliver: Any) -> None:
    def reject(event: dict[str, Any], subject: str, deliveries: int) -> None:
        raise RejectMessage("customer does not exist")

    result = jetstream_deliver(incoming(), reject)
    assert result.dead_letter is not None
    assert result.dead_letter.reason == dead_letter.REJECTED


@pytest.mark.django_db(transaction=True)
def test_deliver__malformed_bytes_are_dead_lettered(bridge: Any, jetstream_deliver: Any) -> None:
    result = jetstream_deliver(b"{not json", handlers.record_effect)
    assert result.dead_letter is not None
    assert result.dead_letter.reason == dead_letter.MALFORMED
