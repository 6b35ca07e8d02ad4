"""The publisher's sender seam: ``use_sender()`` routes what leaves the process.

NATS_URLS points at a closed port: a publish that reached for the broker would fail.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from django.db import transaction

from jetstream_bridge import Publisher
from jetstream_bridge.broker import PubAck
from jetstream_bridge.core.envelope import MSG_ID_HEADER, encode
from jetstream_bridge.models import OutboxEvent
from jetstream_bridge.publisher import NatsSender, PreparedEvent, current_sender, use_sender


class Recorder:
    """A ``Sender`` that keeps what it is given, and how."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, PreparedEvent, Any]] = []

    def send(self, event: PreparedEvent) -> PubAck:
        self.calls.append(("send", event, None))
        return PubAck("RECORDED", len(self.calls), False)

    async def send_async(self, event: PreparedEvent) -> PubAck:
        self.calls.append(("send_async", event, None))
        return PubAck("RECORDED", len(self.calls), False)

    def after_commit(self, event: PreparedEvent, using: str | None, pk: Any = None) -> None:
        self.calls.append(("after_commit", event, pk))


def publish(**overrides: Any) -> Any:
    fields = {"resource_type": "order", "event_type": "created", "payload": {"id": 7}}
    return Publisher().publish(**{**fields, **overrides})


@pytest.mark.django_db(transaction=True)
def test_use_sender__sends_the_prepared_event_through_the_given_sender(no_outbox: Any) -> None:
    recorder = Recorder()
    with use_sender(recorder) as used:
        assert used is recorder
        assert current_sender() is recorder
        result = publish(event_id="evt-1", headers={"X-Tenant": "acme"})

    assert (result.status, result.stream, result.stream_seq) == ("sent", "RECORDED", 1)
    [(how, event, _)] = recorder.calls
    assert how == "send"
    assert (event.event_id, event.subject, event.explicit_id) == (
        "evt-1",
        no_outbox.subjects.publish,
        True,
    )
    assert event.data == encode(event.envelope)
    assert event.headers == {"X-Tenant": "acme", MSG_ID_HEADER: "evt-1"}


@pytest.mark.django_db(transaction=True)
def test_use_sender__async_publish_uses_send_async(no_outbox: Any) -> None:
    recorder = Recorder()
    with use_sender(recorder):
        result = asyncio.run(
            Publisher().publish_async(resource_type="order", event_type="created", payload={})
        )
    assert result.status == "sent"
    assert [how for how, _, _ in recorder.calls] == ["send_async"]


@pytest.mark.django_db(transaction=True)
def test_use_sender__outbox_row_is_handed_over_after_commit_with_its_key(bridge: Any) -> None:
    recorder = Recorder()
    with use_sender(recorder):
        with transaction.atomic():
            result = publish()
            assert recorder.calls == []  # nothing leaves before the commit
    assert result.status == "queued"
    [(how, event, pk)] = recorder.calls
    assert (how, event.event_id) == ("after_commit", result.event_id)
    assert OutboxEvent.objects.get(pk=pk).event_id == result.event_id


@pytest.mark.django_db(transaction=True)
def test_use_sender__a_commit_after_the_block_still_goes_to_the_sender_of_the_publish(
    no_outbox: Any,
) -> None:
    recorder = Recorder()
    with transaction.atomic():
        with use_sender(recorder):
            assert publish().status == "deferred"
        assert isinstance(current_sender(), NatsSender)
    assert [how for how, _, _ in recorder.calls] == ["after_commit"]


def test_use_sender__nests_and_restores_the_previous_sender_even_on_error() -> None:
    real = current_sender()
    outer, inner = Recorder(), Recorder()
    with use_sender(outer):
        with pytest.raises(RuntimeError), use_sender(inner):
            assert current_sender() is inner
            raise RuntimeError("boom")
        assert current_sender() is outer
    assert current_sender() is real
