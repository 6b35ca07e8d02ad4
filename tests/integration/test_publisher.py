"""Publishing against a real nats-server and a real database."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from django.db import transaction
from django.test import override_settings

from jetstream_bridge import Publisher
from jetstream_bridge.core.errors import InvalidEvent, PayloadTooLarge
from jetstream_bridge.fast_path import fast_path
from jetstream_bridge.models import OutboxEvent
from jetstream_bridge.topology import ensure_topology
from tests.helpers import stream_messages

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def topology(jetstream_bridge: Any) -> Any:
    ensure_topology()
    return jetstream_bridge


def published(config: Any) -> list[dict[str, Any]]:
    return [
        {"subject": m.subject, "msg_id": m.headers.get("Nats-Msg-Id"), **json.loads(m.data)}
        for m in stream_messages(config.stream_name)
    ]


def test_outbox__rollback_leaves_no_row_and_no_message(topology: Any) -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        Publisher().publish(resource_type="user", event_type="created", payload={"id": 1})
        raise RuntimeError("business logic failed")
    assert fast_path().wait_idle()
    assert OutboxEvent.objects.count() == 0
    assert published(topology) == []


def test_outbox__commit_produces_exactly_one_message_with_the_envelope(topology: Any) -> None:
    with transaction.atomic():
        result = Publisher().publish(
            resource_type="user",
            event_type="created",
            payload={"id": "u-1", "name": "Ada"},
            trace_id="t-1",
        )
        assert result.status == "queued"
        assert OutboxEvent.objects.get().status == "pending"
    assert fast_path().wait_idle()
    [message] = published(topology)
    assert message["subject"] == topology.subjects.publish
    assert message["msg_id"] == result.event_id
    assert message["event_id"] == result.event_id
    assert message["resource_id"] == "u-1"
    assert message["producer"] == "alpha"
    assert message["trace_id"] == "t-1"
    assert message["payload"] == {"id": "u-1", "name": "Ada"}
    row = OutboxEvent.objects.get()
    assert row.status == "sent"
    assert row.sent_at is not None
    assert row.stream_seq == 1


def test_outbox__second_publish_of_the_same_event_id_is_a_no_op(topology: Any) -> None:
    first = Publisher().publish(
        resource_type="user", event_type="created", payload={"id": 1}, event_id="fixed-1"
    )
    second = Publisher().publish(
        resource_type="user", event_type="created", payload={"id": 1}, event_id="fixed-1"
    )
    assert (first.status, second.status) == ("queued", "duplicate")
    assert fast_path().wait_idle()
    assert OutboxEvent.objects.count() == 1
    assert len(published(topology)) == 1


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"payload": {"when": object()}}, "not JSON-serialisable"),
        ({"event_type": ""}, "event_type must be a non-empty string"),
        ({"payload": {"blob": "x" * (2 * 1024 * 1024)}}, "the server accepts at most"),
    ],
)
def test_publish__bad_input_raises_and_writes_nothing(
    topology: Any, kwargs: dict[str, Any], error: str
) -> None:
    arguments = {"resource_type": "user", "event_type": "created", "payload": {"id": 1}}
    arguments.update(kwargs)
    with pytest.raises(InvalidEvent, match=error):
        Publisher().publish(**arguments)
    assert OutboxEvent.objects.count() == 0
    assert published(topology) == []


def test_publish__payload_limit_is_the_servers(topology: Any) -> None:
    Publisher().publish(resource_type="user", event_type="created", payload={"id": 1})
    assert fast_path().wait_idle()
    with pytest.raises(PayloadTooLarge):
        Publisher().publish(
            resource_type="user", event_type="created", payload={"blob": "x" * (1024 * 1024)}
        )


@pytest.fixture
def no_outbox(settings: Any, topology: Any) -> Any:
    settings.JETSTREAM_BRIDGE = {**settings.JETSTREAM_BRIDGE, "USE_OUTBOX": False}
    return topology


def test_no_outbox__publish_inside_a_transaction_waits_for_commit(no_outbox: Any) -> None:
    with transaction.atomic():
        result = Publisher().publish(resource_type="user", event_type="created", payload={"id": 7})
        assert result.status == "deferred"
        assert published(no_outbox) == []
    deadline = asyncio.run(_wait_for(lambda: len(published(no_outbox)) == 1))
    assert deadline
    assert published(no_outbox)[0]["event_id"] == result.event_id


def test_no_outbox__rolled_back_publish_is_never_sent(no_outbox: Any) -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        Publisher().publish(resource_type="user", event_type="created", payload={"id": 7})
        raise RuntimeError
    assert not asyncio.run(_wait_for(lambda: len(published(no_outbox)) > 0, timeout=0.5))


def test_no_outbox__publish_outside_a_transaction_is_sent_at_once(no_outbox: Any) -> None:
    result = Publisher().publish(
        resource_type="user", event_type="created", payload={"id": 7}, event_id="same"
    )
    again = Publisher().publish(
        resource_type="user", event_type="created", payload={"id": 7}, event_id="same"
    )
    assert (result.status, result.stream_seq) == ("sent", 1)
    assert again.status == "duplicate"  # the server deduplicated on Nats-Msg-Id
    assert len(published(no_outbox)) == 1


def test_publish_async__from_a_foreign_event_loop(no_outbox: Any) -> None:
    async def publish() -> Any:
        return await Publisher().publish_async(
            resource_type="user", event_type="created", payload={"id": 9}
        )

    result = asyncio.run(publish())
    assert result.status == "sent"
    assert published(no_outbox)[0]["event_id"] == result.event_id


async def _wait_for(predicate: Any, timeout: float = 5.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return bool(predicate())


@override_settings(ROOT_URLCONF="tests.testapp.urls")
def test_views__sync_and_async_views_publish_on_one_shared_connection(
    topology: Any,
    client: Any,
    async_client: Any,
) -> None:
    from jetstream_bridge.runtime import get_runtime

    sync_response = client.post("/orders/", {"id": "o-1"})
    assert sync_response.status_code == 201
    connection_after_sync = get_runtime()._connection
    async_response = asyncio.run(async_client.post("/orders-async/", {"id": "o-2"}))
    assert async_response.status_code == 201
    assert get_runtime()._connection is connection_after_sync
    assert fast_path().wait_idle()
    ids = sorted(m["resource_id"] for m in published(topology))
    assert ids == ["o-1", "o-2"]
    assert set(OutboxEvent.objects.values_list("status", flat=True)) == {"sent"}
