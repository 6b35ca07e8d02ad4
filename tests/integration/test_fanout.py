"""Publishing to several peers (``DESTINATION_APP`` a list) against a real nats-server and DB.

One copy per destination: its own outbox row and stream message on its own subject, the same
envelope (one ``event_id``), and a ``Nats-Msg-Id`` of its own (the bare ``event_id`` for the
first peer, ``{event_id}~{peer}`` for the others) because the stream dedupes across subjects.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import timedelta
from typing import Any

import pytest
from django.db import transaction
from django.utils import timezone

from jetstream_bridge import Publisher, PublishResult
from jetstream_bridge.conf import get_config
from jetstream_bridge.core.errors import InvalidEvent, UnknownDestination
from jetstream_bridge.fast_path import fast_path
from jetstream_bridge.models import OutboxEvent, OutboxStatus
from jetstream_bridge.outbox import OutboxStore
from jetstream_bridge.publisher import FanOutResult
from jetstream_bridge.relay import Relay
from jetstream_bridge.testing.capture import Capture
from jetstream_bridge.topology import ensure_topology
from tests.helpers import nats, stream_messages

pytestmark = pytest.mark.django_db(transaction=True)

PEERS = ["beta", "billing", "shipping"]
EVENT: dict[str, Any] = {
    "resource_type": "order",
    "event_type": "created",
    "payload": {"id": "o-1", "total": 3},
}


def configure(settings: Any, **overrides: Any) -> Any:
    settings.JETSTREAM_BRIDGE = {**settings.JETSTREAM_BRIDGE, **overrides}
    return get_config()


@pytest.fixture
def three_peers(jetstream_bridge: Any, settings: Any) -> Any:
    """``alpha`` with beta, billing and shipping as peers, every peer's subjects provisioned."""
    for peer in PEERS:  # one peer at a time: the stream captures each peer's subjects
        configure(settings, DESTINATION_APP=peer)
        ensure_topology()
    return configure(settings, DESTINATION_APP=PEERS)


def wire(config: Any) -> list[dict[str, Any]]:
    """The stream's messages: subject, Nats-Msg-Id, headers, body bytes and decoded envelope."""
    return [
        {
            "subject": m.subject,
            "msg_id": m.headers["Nats-Msg-Id"],
            "headers": dict(m.headers),
            "data": m.data,
            "envelope": json.loads(m.data),
        }
        for m in stream_messages(config.stream_name)
    ]


def wait_for_messages(config: Any, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while len(messages := wire(config)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return messages


def assert_one_copy_per_peer(
    config: Any, messages: list[dict[str, Any]], event_id: str, *, one_publish: bool = True
) -> None:
    """Three messages: one event_id, three subjects, three message ids (one envelope)."""
    env = config.env
    assert sorted(m["subject"] for m in messages) == [
        f"{env}.data.sync.alpha.beta",
        f"{env}.data.sync.alpha.billing",
        f"{env}.data.sync.alpha.shipping",
    ]
    by_subject = {m["subject"].rsplit(".", 1)[1]: m for m in messages}
    assert {peer: m["msg_id"] for peer, m in by_subject.items()} == {
        "beta": event_id,
        "billing": f"{event_id}~billing",
        "shipping": f"{event_id}~shipping",
    }
    assert {m["envelope"]["event_id"] for m in messages} == {event_id}
    if one_publish:
        assert len({m["data"] for m in messages}) == 1  # the very same body in every copy


def test_fanout__one_publish_to_three_peers_makes_three_messages_with_one_event_id(
    three_peers: Any,
) -> None:
    with transaction.atomic():
        result = Publisher().publish(**EVENT)
        assert OutboxEvent.objects.count() == 3
    assert fast_path().wait_idle()
    assert isinstance(result, FanOutResult)
    assert list(result.copies) == PEERS
    assert [copy.status for copy in result.copies.values()] == ["queued"] * 3
    assert {copy.event_id for copy in result.copies.values()} == {result.event_id}
    assert result.copies["billing"].subject == f"{three_peers.env}.data.sync.alpha.billing"
    assert (result.subject, result.status) == (result.copies["beta"].subject, "queued")
    messages = wait_for_messages(three_peers, 3)
    assert len(messages) == 3
    assert_one_copy_per_peer(three_peers, messages, result.event_id)
    rows = OutboxEvent.objects.order_by("pk")
    assert [row.event_id for row in rows] == [m["msg_id"] for m in messages]
    assert {row.status for row in rows} == {OutboxStatus.SENT}
    assert {row.payload["event_id"] for row in rows} == {result.event_id}


def test_fanout__rollback_of_the_business_transaction_leaves_no_copy(three_peers: Any) -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        Publisher().publish(**EVENT)
        assert OutboxEvent.objects.count() == 3
        raise RuntimeError("business logic failed")
    assert fast_path().wait_idle()
    assert OutboxEvent.objects.count() == 0
    assert wire(three_peers) == []


def test_fanout__a_relay_dying_mid_fan_out_still_sends_every_copy_exactly_once(
    three_peers: Any, settings: Any
) -> None:
    config = configure(
        settings,
        OUTBOX_FAST_PATH=False,
        RELAY_LEASE="1s",
        DUPLICATE_WINDOW="2m",
        RELAY_RETRY_BACKOFF=["100ms"],
    )
    result = Publisher().publish(**EVENT, event_id="evt-crash-1")
    assert isinstance(result, FanOutResult)
    # A relay leases the three copies, publishes the first, and dies before recording it.
    _, claimed = OutboxStore(config).claim(10)
    assert len(claimed) == 3
    first = claimed[0]
    ack = nats(lambda c: c.publish(first.subject, first.body, first.headers))
    assert len(wire(config)) == 1
    time.sleep(1.2)  # the dead relay's lease runs out
    stats = Relay().run(once=True)
    assert (stats.sent, stats.failed) == (3, 0)
    messages = wire(config)
    assert len(messages) == 3
    assert_one_copy_per_peer(config, messages, "evt-crash-1")
    # The first copy's re-send was dropped by the stream: its row keeps the original sequence.
    assert OutboxEvent.objects.get(pk=first.pk).stream_seq == ack.seq
    assert set(OutboxEvent.objects.values_list("status", flat=True)) == {OutboxStatus.SENT}


def test_fanout__destination_sends_only_that_peers_copy(three_peers: Any) -> None:
    result = Publisher().publish(**EVENT, destination="billing")
    assert fast_path().wait_idle()
    assert type(result) is PublishResult
    assert result.subject == f"{three_peers.env}.data.sync.alpha.billing"
    assert result.status == "queued"
    [message] = wait_for_messages(three_peers, 1)
    assert message["subject"] == result.subject
    assert message["msg_id"] == f"{result.event_id}~billing"
    assert message["envelope"]["event_id"] == result.event_id
    assert list(OutboxEvent.objects.values_list("event_id", flat=True)) == [message["msg_id"]]


def test_fanout__a_list_of_destinations_reports_each_in_settings_order(three_peers: Any) -> None:
    result = Publisher().publish(**EVENT, destination=["shipping", "beta", "shipping"])
    assert fast_path().wait_idle()
    assert isinstance(result, FanOutResult)
    assert list(result.copies) == ["beta", "shipping"]
    messages = wait_for_messages(three_peers, 2)
    assert sorted(m["msg_id"] for m in messages) == [
        result.event_id,
        f"{result.event_id}~shipping",
    ]


def test_fanout__repeating_an_explicit_event_id_is_a_duplicate_for_every_copy(
    three_peers: Any,
) -> None:
    first = Publisher().publish(**EVENT, event_id="evt-7", destination="billing")
    assert first.status == "queued"
    # Later to every peer: billing already has its copy, the others get theirs.
    second = Publisher().publish(**EVENT, event_id="evt-7")
    assert isinstance(second, FanOutResult)
    assert {p: r.status for p, r in second.copies.items()} == {
        "beta": "queued",
        "billing": "duplicate",
        "shipping": "queued",
    }
    third = Publisher().publish(**EVENT, event_id="evt-7")
    assert isinstance(third, FanOutResult)
    assert [r.status for r in third.copies.values()] == ["duplicate"] * 3
    assert fast_path().wait_idle()
    assert OutboxEvent.objects.count() == 3
    messages = wait_for_messages(three_peers, 3)
    assert len(messages) == 3
    # billing's copy is the first publish's envelope (its own occurred_at and trace_id).
    assert_one_copy_per_peer(three_peers, messages, "evt-7", one_publish=False)


def test_fanout__without_the_outbox_the_direct_publish_fans_out_too(
    three_peers: Any, settings: Any
) -> None:
    config = configure(settings, USE_OUTBOX=False)
    sent = Publisher().publish(**EVENT)
    assert isinstance(sent, FanOutResult)
    assert [r.status for r in sent.copies.values()] == ["sent"] * 3
    assert len({r.stream_seq for r in sent.copies.values()}) == 3
    assert_one_copy_per_peer(config, wire(config), sent.event_id)
    with transaction.atomic():
        deferred = Publisher().publish(**EVENT)
        assert isinstance(deferred, FanOutResult)
        assert [r.status for r in deferred.copies.values()] == ["deferred"] * 3
        assert len(wire(config)) == 3  # nothing leaves before the commit
    messages = wait_for_messages(config, 6)
    assert_one_copy_per_peer(
        config,
        [m for m in messages if m["envelope"]["event_id"] == deferred.event_id],
        deferred.event_id,
    )
    assert OutboxEvent.objects.count() == 0


@pytest.mark.parametrize("use_outbox", [True, False])
def test_fanout__publish_async_fans_out_the_same_way(
    three_peers: Any, settings: Any, use_outbox: bool
) -> None:
    config = configure(settings, USE_OUTBOX=use_outbox)
    result = asyncio.run(Publisher().publish_async(**EVENT))
    single = asyncio.run(Publisher().publish_async(**EVENT, destination="shipping"))
    assert fast_path().wait_idle()
    assert isinstance(result, FanOutResult)
    assert list(result.copies) == PEERS
    assert type(single) is PublishResult
    messages = wait_for_messages(config, 4)
    assert len(messages) == 4
    assert_one_copy_per_peer(
        config,
        [m for m in messages if m["envelope"]["event_id"] == result.event_id],
        result.event_id,
    )
    [alone] = [m for m in messages if m["envelope"]["event_id"] == single.event_id]
    assert (alone["subject"], alone["msg_id"]) == (single.subject, f"{single.event_id}~shipping")
    assert OutboxEvent.objects.count() == (4 if use_outbox else 0)


def test_fanout__an_unknown_destination_is_refused_naming_the_configured_ones(
    three_peers: Any,
) -> None:
    with pytest.raises(UnknownDestination) as refused:
        Publisher().publish(**EVENT, destination=["billing", "invoicing"])
    assert str(refused.value) == (
        "destination 'invoicing' is not in DESTINATION_APP (beta, billing, shipping); no stream "
        "subject is provisioned for it. Publish to one of those, or add the peer to "
        "DESTINATION_APP and run jetstream_ensure_topology."
    )
    with pytest.raises(UnknownDestination):
        asyncio.run(Publisher().publish_async(**EVENT, destination="invoicing"))
    with pytest.raises(InvalidEvent, match="empty list"):
        Publisher().publish(**EVENT, destination=[])
    with pytest.raises(InvalidEvent, match="reserves"):
        Publisher().publish(**EVENT, event_id="a~billing")
    assert fast_path().wait_idle()
    assert OutboxEvent.objects.count() == 0
    assert wire(three_peers) == []


def test_fanout__a_single_peer_service_keeps_ids_with_a_tilde(jetstream_bridge: Any) -> None:
    ensure_topology()
    result = Publisher().publish(**EVENT, event_id="a~billing")
    assert fast_path().wait_idle()
    assert type(result) is PublishResult
    [message] = wait_for_messages(jetstream_bridge, 1)
    assert message["msg_id"] == "a~billing"


def test_fanout__the_capture_records_each_copys_destination(
    three_peers: Any, jetstream_capture: Capture
) -> None:
    Publisher().publish(**EVENT)
    Publisher().publish(**{**EVENT, "event_type": "paid"}, destination="billing")
    assert [m.destination for m in jetstream_capture.messages] == [*PEERS, "billing"]
    jetstream_capture.assert_published(event_type="created", destination="shipping", count=1)
    jetstream_capture.assert_published(event_type="paid", destination="billing", count=1)
    with pytest.raises(AssertionError, match="paid to billing"):
        jetstream_capture.assert_published(event_type="paid", destination="shipping")
    assert [m.headers["Nats-Msg-Id"] for m in jetstream_capture.messages[:3]] == [
        jetstream_capture.events[0]["event_id"],
        f"{jetstream_capture.events[0]['event_id']}~billing",
        f"{jetstream_capture.events[0]['event_id']}~shipping",
    ]


def test_fanout__ordering_is_per_peer_so_no_copy_waits_for_another_peers(
    three_peers: Any, settings: Any
) -> None:
    config = configure(settings, OUTBOX_ORDERING=True)
    first = Publisher().publish(**EVENT)
    assert fast_path().wait_idle()
    # Every copy went out through the fast path: none was held for another peer's copy.
    assert set(OutboxEvent.objects.values_list("status", flat=True)) == {OutboxStatus.SENT}
    second = Publisher().publish(**{**EVENT, "event_type": "paid"})
    assert fast_path().wait_idle()
    assert set(OutboxEvent.objects.values_list("status", flat=True)) == {OutboxStatus.SENT}
    messages = wait_for_messages(config, 6)
    for peer in PEERS:
        subject = f"{config.env}.data.sync.alpha.{peer}"
        assert [m["envelope"]["event_id"] for m in messages if m["subject"] == subject] == [
            first.event_id,
            second.event_id,
        ]


def test_fanout__a_peer_whose_copy_keeps_failing_does_not_hold_the_others_in_order(
    three_peers: Any, settings: Any
) -> None:
    config = configure(settings, OUTBOX_ORDERING=True, OUTBOX_FAST_PATH=False)
    first = Publisher().publish(**EVENT)
    second = Publisher().publish(**{**EVENT, "event_type": "paid"})
    # billing's copy of the first event failed and is not due for an hour.
    later = timezone.now() + timedelta(hours=1)
    OutboxEvent.objects.filter(event_id=f"{first.event_id}~billing").update(
        status=OutboxStatus.FAILED, attempts=1, available_at=later
    )
    stats = Relay().run(once=True)
    assert (stats.sent, stats.failed) == (4, 0)
    # billing's second event still waits behind its first; beta and shipping have both, in order.
    unsent = OutboxEvent.objects.exclude(status=OutboxStatus.SENT)
    assert sorted(unsent.values_list("event_id", flat=True)) == sorted(
        [f"{first.event_id}~billing", f"{second.event_id}~billing"]
    )
    messages = wire(config)
    for peer in ("beta", "shipping"):
        subject = f"{config.env}.data.sync.alpha.{peer}"
        assert [m["envelope"]["event_id"] for m in messages if m["subject"] == subject] == [
            first.event_id,
            second.event_id,
        ]
    assert not [m for m in messages if m["subject"].endswith(".billing")]
