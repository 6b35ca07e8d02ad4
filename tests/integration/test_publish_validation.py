"""Bad publish input is refused with ``InvalidEvent`` before anything is written, and ids are
compared byte for byte on every database.

Runs on whichever database ``DATABASE_URL`` names; the MariaDB run (test database in the
server's case-folding ``utf8mb4_general_ci``) is the one that proves the id columns' collation.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from jetstream_bridge.consumer import Consumer
from jetstream_bridge.core.envelope import MAX_DEPTH, build_envelope, encode
from jetstream_bridge.core.errors import InvalidEvent
from jetstream_bridge.models import InboxEvent, OutboxEvent
from jetstream_bridge.publisher import Publisher
from jetstream_bridge.relay import Relay
from jetstream_bridge.topology import ensure_topology
from tests.helpers import publish_raw, stream_msg_ids
from tests.testapp import handlers
from tests.testapp.models import Effect

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.nats]
DURABLE = "alpha-exact"


@pytest.fixture
def bridge(jetstream_bridge: Any, settings: Any) -> Any:
    # The relay alone sends, so each test knows when everything is out.
    settings.JETSTREAM_BRIDGE = {**settings.JETSTREAM_BRIDGE, "OUTBOX_FAST_PATH": False}
    from jetstream_bridge.conf import get_config

    config = get_config()
    ensure_topology(durable=DURABLE)
    return config


def nested(levels: int, innermost: Any) -> dict[str, Any]:
    """A payload of ``levels - 1`` objects around ``innermost``.

    The bridge counts the innermost value as a level, and an empty list or object as two
    (MariaDB refuses 32 nested empty arrays as it refuses 31 around a number).
    """
    node: Any = innermost
    for _ in range(levels - 1):
        node = {"x": node}
    return node if isinstance(node, dict) else {"x": node}


def publish(**overrides: Any) -> Any:
    fields: dict[str, Any] = {
        "resource_type": "order",
        "event_type": "created",
        "payload": {"id": 1},
        **overrides,
    }
    return Publisher().publish(**fields)


BAD_INPUT = {
    # ids the wire would alter or a database cannot hold
    "id-trailing-space": {"event_id": "order-1 "},
    "id-leading-space": {"event_id": " order-1"},
    "id-nbsp": {"event_id": "order-1\u00a0"},
    "id-crlf": {"event_id": "order-1\r\nX-Forged: 1"},
    "id-empty": {"event_id": ""},
    "id-nul": {"event_id": "order\x00-1"},
    "id-surrogate": {"event_id": "order-\ud800"},
    "id-too-long": {"event_id": "x" * 256},
    "id-not-text": {"event_id": 42},
    # fields longer than their columns
    "resource-type-too-long": {"resource_type": "r" * 101},
    "event-type-too-long": {"event_type": "e" * 101},
    "resource-id-too-long": {"resource_id": "1" * 256},
    "resource-id-from-payload-too-long": {"payload": {"id": "1" * 256}},
    # text no database can store, deep JSON MariaDB refuses
    "nul-in-payload-value": {"payload": {"note": "a\x00b"}},
    "nul-in-payload-key": {"payload": {"a\x00b": 1}},
    "surrogate-in-payload": {"payload": {"note": "\udc80"}},
    "surrogate-in-type": {"event_type": "created\ud800"},
    "nul-in-trace-id": {"trace_id": "t\x00"},
    "too-deep": {"payload": nested(MAX_DEPTH + 1, 1)},
    "too-deep-empty-innermost": {"payload": nested(MAX_DEPTH, {})},
    # headers nats-py refuses or NATS alters: the row would fail forever
    "header-name-empty": {"headers": {"": "v"}},
    "header-name-colon": {"headers": {"X:Y": "v"}},
    "header-name-space": {"headers": {"X Tenant": "v"}},
    "header-name-crlf": {"headers": {"X\r\nY": "v"}},
    "header-name-non-ascii": {"headers": {"X-Tënant": "v"}},
    "header-name-reserved": {"headers": {"Nats-Expected-Last-Sequence": "1"}},
    "header-value-crlf": {"headers": {"X-Tenant": "acme\r\nX-Forged: 1"}},
    "header-value-nul": {"headers": {"X-Tenant": "ac\x00me"}},
    "header-value-not-text": {"headers": {"X-Tenant": 7}},
    "header-value-trailing-space": {"headers": {"X-Tenant": "acme "}},
}


@pytest.mark.parametrize("overrides", list(BAD_INPUT.values()), ids=list(BAD_INPUT))
def test_publish__bad_input_is_invalid_event_and_nothing_is_written(
    bridge: Any, overrides: dict[str, Any]
) -> None:
    with pytest.raises(InvalidEvent):
        publish(**overrides)
    assert OutboxEvent.objects.count() == 0


@pytest.mark.parametrize("innermost", [1, {}, []], ids=["scalar", "empty-object", "empty-list"])
def test_publish__payload_at_the_depth_limit_is_stored_and_sent(
    bridge: Any, innermost: Any
) -> None:
    payload = nested(MAX_DEPTH if innermost == 1 else MAX_DEPTH - 1, innermost)
    result = publish(event_id=f"deep-{type(innermost).__name__}", payload=payload)
    assert result.status == "queued"
    Relay().run(once=True)
    row = OutboxEvent.objects.get(event_id=result.event_id)
    assert row.status == "sent"
    assert row.payload["payload"] == payload


def test_publish__good_headers_travel_unchanged(bridge: Any) -> None:
    headers = {"X-Tenant": "acme corp", "traceparent": "00-abc-def-01", "X-Ünicode": "no"}
    with pytest.raises(InvalidEvent):
        publish(event_id="h-0", headers=headers)
    headers.pop("X-Ünicode")
    publish(event_id="h-1", headers={**headers, "X-Value": "naïve ✓"})
    Relay().run(once=True)
    assert stream_msg_ids(bridge.stream_name) == ["h-1"]


def test_ids__differing_only_by_case_are_two_events_in_outbox_stream_and_inbox(
    bridge: Any,
) -> None:
    # On MySQL/MariaDB the default collation folds case: "Order-1" was a duplicate of
    # "order-1" in the outbox's unique key, reported "duplicate" and never sent.
    ids = ["order-1", "Order-1", "ORDER-1"]
    results = [publish(event_id=event_id) for event_id in ids]
    assert [r.status for r in results] == ["queued"] * 3
    Relay().run(once=True)
    assert sorted(OutboxEvent.objects.values_list("event_id", "status")) == sorted(
        (event_id, "sent") for event_id in ids
    )
    assert sorted(stream_msg_ids(bridge.stream_name)) == sorted(ids)

    # Received: the inbox's (consumer, event_id) key tells them apart too; a redelivery of
    # one of them (another stream message, same event id) is still a duplicate. (Other ids
    # than above: the stream would drop a message id it has just stored.)
    ids = ["evt-a", "EVT-A", "Evt-A"]
    for event_id in ids:
        envelope = build_envelope(
            producer="beta",
            resource_type="order",
            event_type="created",
            payload={"id": 1},
            event_id=event_id,
        )
        publish_raw(bridge, encode(envelope), {"Nats-Msg-Id": event_id})
    publish_raw(bridge, encode({**envelope}), {"Nats-Msg-Id": "again"})
    consumer = Consumer(
        durable_name=DURABLE,
        handler=handlers.record_effect,
        stop_when_idle=True,
        idle_timeout=1.0,
    )
    stats = asyncio.run(consumer.run_async())
    assert (stats.processed, stats.duplicates) == (3, 1)
    assert sorted(Effect.objects.values_list("event_id", flat=True)) == sorted(ids)
    assert sorted(
        InboxEvent.objects.filter(consumer=DURABLE, status="processed").values_list(
            "event_id", flat=True
        )
    ) == sorted(ids)


def test_limits__match_the_outbox_and_inbox_columns() -> None:
    from jetstream_bridge.core.envelope import MAX_ID_LENGTH, MAX_TYPE_LENGTH

    for model in (OutboxEvent, InboxEvent):
        assert model._meta.get_field("event_id").max_length == MAX_ID_LENGTH
        assert model._meta.get_field("event_type").max_length == MAX_TYPE_LENGTH
        assert model._meta.get_field("resource_type").max_length == MAX_TYPE_LENGTH
    assert OutboxEvent._meta.get_field("resource_id").max_length == MAX_ID_LENGTH


def test_nats_py__a_crlf_in_a_header_value_cannot_forge_a_header(bridge: Any) -> None:
    # The floor in pyproject.toml: nats-py 2.9 wrote the value as is, so "\r\n" started a
    # header of the caller's choosing (here one that would make the stream drop events).
    from tests.helpers import nats, stream_messages

    forged = {"X-Note": "v\r\nNats-Msg-Id: forged"}
    nats(lambda c: c.publish(bridge.subjects.subscribe, b"{}", forged))
    [message] = stream_messages(bridge.stream_name)
    assert "forged" not in (message.headers or {}).get("Nats-Msg-Id", "")
    assert "X-Note" in (message.headers or {})
