"""Batch handlers (``batch=True``): one call per consumer batch, against a real nats-server and
a real database; the failure rules at the processor level on the same database."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from typing import Any

import pytest
from django.db import connection

from jetstream_bridge.consumer import Consumer
from jetstream_bridge.context import MessageContext
from jetstream_bridge.core import dead_letter
from jetstream_bridge.core.envelope import build_envelope, encode
from jetstream_bridge.core.errors import RejectMessage
from jetstream_bridge.handlers import HandlerRegistry
from jetstream_bridge.models import InboxEvent
from jetstream_bridge.processing import BatchProcessor, ReceivedMessage, Verdict
from tests.helpers import fast_retry_bridge, nats, publish_incoming, publish_raw
from tests.testapp import handlers
from tests.testapp.models import Effect

pytestmark = pytest.mark.django_db(transaction=True)
DURABLE = "alpha-events"


@pytest.fixture
def bridge(jetstream_bridge: Any, settings: Any) -> Any:
    return fast_retry_bridge(settings, DURABLE)


def consume(registry: HandlerRegistry, **kwargs: Any) -> Any:
    kwargs.setdefault("stop_when_idle", True)
    kwargs.setdefault("idle_timeout", 1.0)
    consumer = Consumer(durable_name=DURABLE, registry=registry, **kwargs)
    return asyncio.run(consumer.run_async())


def effects() -> list[str]:
    return sorted(Effect.objects.exclude(consumer="attempt").values_list("event_id", flat=True))


def processed_rows() -> dict[str, InboxEvent]:
    return {
        row.event_id: row for row in InboxEvent.objects.filter(consumer=DURABLE, status="processed")
    }


class BulkWriter:
    """A batch handler: one ``bulk_create`` per call; records each call's contexts.

    ``fail(ctx)`` says which messages to report as failed (their rows are not written);
    ``raise_on(call_number)`` raises after writing an "attempt" row (that must roll back).
    """

    def __init__(self, fail: Any = None, raise_on: set[int] | None = None) -> None:
        self.calls: list[list[MessageContext]] = []
        self.fail = fail or (lambda ctx: False)
        self.raise_on = raise_on or set()

    def __call__(self, contexts: list[MessageContext]) -> list[MessageContext]:
        self.calls.append(list(contexts))
        if len(self.calls) in self.raise_on:
            Effect.objects.create(event_id="whole-group", consumer="attempt")
            raise RuntimeError("the bulk insert failed")
        failed = [ctx for ctx in contexts if self.fail(ctx)]
        Effect.objects.bulk_create(
            [
                Effect(event_id=ctx.event_id, consumer=ctx.subject, payload=_plain(ctx.payload))
                for ctx in contexts
                if ctx not in failed
            ]
        )
        return failed

    def seen(self, event_id: str) -> list[int]:
        """The delivery numbers with which ``event_id`` reached the handler."""
        return [c.deliveries for call in self.calls for c in call if c.event_id == event_id]


def _plain(payload: Any) -> Any:
    return dataclasses.asdict(payload) if dataclasses.is_dataclass(payload) else dict(payload)


def batch_registry(fn: Any, **more: Any) -> HandlerRegistry:
    registry = HandlerRegistry()
    registry.register("order", "created", fn, batch=True)
    for key, single in more.items():
        resource, event = key.split("__")
        registry.register(resource, event, single)
    return registry


# -- against a real nats-server ---------------------------------------------------------------


def test_batch__one_call_per_batch_and_its_bulk_create_commits_with_the_inbox_rows(
    bridge: Any,
) -> None:
    ids = publish_incoming(bridge, 20)
    writer = BulkWriter()
    stats = consume(batch_registry(writer), batch_size=25)
    assert [len(call) for call in writer.calls] == [20]  # the batch, in one call
    [call] = writer.calls
    assert [ctx.event_id for ctx in call] == ids  # in stream order
    assert [ctx.deliveries for ctx in call] == [1] * 20
    assert all(ctx.consumer == DURABLE and ctx.stream == bridge.stream_name for ctx in call)
    assert [ctx.payload["id"] for ctx in call] == list(range(20))
    assert effects() == sorted(ids)
    rows = processed_rows()
    assert sorted(rows) == sorted(ids)
    assert {rows[ctx.event_id].stream_seq for ctx in call} == {ctx.stream_seq for ctx in call}
    assert (stats.processed, stats.retried, stats.batches) == (20, 0, 1)
    assert consume(batch_registry(writer)).handled == 0  # every message was acked


def test_batch__a_message_reported_failed_is_the_only_one_retried(bridge: Any) -> None:
    ids = publish_incoming(bridge, 6)
    flaky = ids[2]
    writer = BulkWriter(fail=lambda ctx: ctx.event_id == flaky and ctx.deliveries == 1)
    stats = consume(batch_registry(writer), batch_size=25)
    assert writer.seen(flaky) == [1, 2]  # retried once, after the backoff
    for other in set(ids) - {flaky}:
        assert writer.seen(other) == [1]  # acked with the first call
    assert [len(call) for call in writer.calls] == [6, 1]
    assert effects() == sorted(ids)  # every effect exactly once
    rows = processed_rows()
    assert sorted(rows) == sorted(ids)
    assert rows[flaky].deliveries == 2
    assert {rows[i].deliveries for i in set(ids) - {flaky}} == {1}
    assert (stats.processed, stats.retried) == (6, 1)
    info = nats(lambda c: c.jsm.consumer_info(bridge.stream_name, DURABLE))
    assert (info.num_ack_pending, info.num_pending) == (0, 0)


def test_batch__a_message_failed_on_every_delivery_is_dead_lettered_alone(bridge: Any) -> None:
    ids = publish_incoming(bridge, 4)
    poison = ids[1]
    writer = BulkWriter(fail=lambda ctx: ctx.event_id == poison)
    stats = consume(batch_registry(writer), batch_size=25)
    assert writer.seen(poison) == [1, 2, 3]  # MAX_DELIVER 3
    assert effects() == sorted(set(ids) - {poison})
    assert (stats.processed, stats.dead_lettered) == (3, 1)
    row = InboxEvent.objects.get(event_id=poison)
    assert (row.status, row.deliveries) == ("failed", 3)
    assert row.last_error == (
        "BatchMessageFailed: the batch handler reported this message as failed"
    )


def test_batch__an_exception_retries_the_whole_group(bridge: Any) -> None:
    ids = publish_incoming(bridge, 5)
    writer = BulkWriter(raise_on={1})
    stats = consume(batch_registry(writer), batch_size=25)
    assert [[c.deliveries for c in call] for call in writer.calls] == [[1] * 5, [2] * 5]
    assert effects() == sorted(ids)
    assert not Effect.objects.filter(consumer="attempt").exists()  # rolled back
    assert {row.deliveries for row in processed_rows().values()} == {2}
    assert (stats.processed, stats.retried) == (5, 5)


def test_batch__a_duplicate_never_reaches_the_batch_handler(bridge: Any) -> None:
    envelope = build_envelope(
        producer="beta", resource_type="order", event_type="created", payload={"id": 1}
    )
    # Two stream messages of one event (different Nats-Msg-Id): only the inbox dedupes them.
    publish_raw(bridge, encode(envelope), {"Nats-Msg-Id": "first"})
    publish_raw(bridge, encode(envelope), {"Nats-Msg-Id": "second"})
    writer = BulkWriter()
    stats = consume(batch_registry(writer), batch_size=25)  # both in one batch
    assert [[c.event_id for c in call] for call in writer.calls] == [[envelope["event_id"]]]
    assert (stats.processed, stats.duplicates) == (1, 1)
    # A third copy in a later batch: recognised by the inbox, the handler is not called.
    publish_raw(bridge, encode(envelope), {"Nats-Msg-Id": "third"})
    stats = consume(batch_registry(writer), batch_size=25)
    assert len(writer.calls) == 1
    assert (stats.processed, stats.duplicates) == (0, 1)
    assert effects() == [envelope["event_id"]]


def test_batch__single_and_batch_handlers_share_one_batch(bridge: Any) -> None:
    created = publish_incoming(bridge, 3)
    updates = []
    for n in range(3):
        updated = build_envelope(
            producer="beta", resource_type="order", event_type="updated", payload={"n": n}
        )
        publish_raw(bridge, encode(updated), {"Nats-Msg-Id": updated["event_id"]})
        updates.append(updated["event_id"])
    created += publish_incoming(bridge, 2, start=10)
    writer = BulkWriter()
    singles: list[str] = []

    def updated_handler(event: dict[str, Any], subject: str, deliveries: int) -> None:
        singles.append(event["event_id"])
        handlers.record_effect(event, subject, deliveries)

    registry = batch_registry(writer, order__updated=updated_handler)
    stats = consume(registry, batch_size=25)
    assert stats.batches == 1
    assert [[c.event_id for c in call] for call in writer.calls] == [created]
    assert singles == updates
    assert effects() == sorted(created + updates)
    assert sorted(processed_rows()) == sorted(created + updates)


# -- the failure rules, on the processor ------------------------------------------------------

STREAM = "batch-test"
_seqs = itertools.count(1)


@pytest.fixture
def offline(settings: Any) -> Any:
    settings.JETSTREAM_BRIDGE = {
        **settings.JETSTREAM_BRIDGE,
        "NATS_URLS": ["nats://127.0.0.1:9"],  # nothing here may reach a broker
        "ENV": "unit",
        "MAX_DELIVER": 3,
        "BACKOFF": ["1s", "2s"],
    }


def received(envelope: dict[str, Any], *, deliveries: int = 1) -> ReceivedMessage:
    return ReceivedMessage(
        subject="unit.data.sync.beta.alpha",
        data=encode(envelope),
        stream=STREAM,
        stream_seq=next(_seqs),
        deliveries=deliveries,
        consumer=DURABLE,
    )


def order(event_type: str = "created", **payload: Any) -> dict[str, Any]:
    return build_envelope(
        producer="beta", resource_type="order", event_type=event_type, payload=payload
    )


def processor(registry: HandlerRegistry) -> BatchProcessor:
    return BatchProcessor(durable=DURABLE, registry=registry)


@pytest.mark.parametrize("savepoints", ["on_failure", "always"])
def test_batch__a_failing_single_handler_keeps_the_group_exactly_once(
    offline: Any, settings: Any, savepoints: str
) -> None:
    settings.JETSTREAM_BRIDGE = {**settings.JETSTREAM_BRIDGE, "HANDLER_SAVEPOINTS": savepoints}
    writer = BulkWriter()

    def updated_handler(event: dict[str, Any], subject: str, deliveries: int) -> None:
        handlers.record_effect(event, subject, deliveries)
        if event["payload"].get("poison"):
            raise ValueError("cannot handle this one")

    events = [order(n=0), order("updated", poison=True), order(n=1), order("updated")]
    processing = processor(batch_registry(writer, order__updated=updated_handler))
    outcomes = processing.process([received(e) for e in events])
    assert [o.verdict for o in outcomes] == [Verdict.ACK, Verdict.RETRY, Verdict.ACK, Verdict.ACK]
    ids = [e["event_id"] for e in events]
    assert effects() == sorted([ids[0], ids[2], ids[3]])  # each once, the poison's rolled back
    assert sorted(processed_rows()) == sorted([ids[0], ids[2], ids[3]])
    # Groups run after the single handlers: the redo comes before, the group runs once.
    assert [[c.event_id for c in call] for call in writer.calls] == [[ids[0], ids[2]]]
    assert processing.redone == (1 if savepoints == "on_failure" else 0)


def test_batch__event_ids_name_the_failed_messages_too(offline: Any) -> None:
    events = [order(n=n) for n in range(3)]

    def by_id(contexts: list[MessageContext]) -> list[str]:
        return [str(contexts[1].event_id)]

    outcomes = processor(batch_registry(by_id)).process([received(e) for e in events])
    assert [o.verdict for o in outcomes] == [Verdict.ACK, Verdict.RETRY, Verdict.ACK]
    assert sorted(processed_rows()) == sorted([events[0]["event_id"], events[2]["event_id"]])
    assert InboxEvent.objects.get(event_id=events[1]["event_id"]).status == "failed"


@pytest.mark.parametrize(
    "answer", ["not-a-list", 3, ["unknown-event-id"], [None]], ids=["str", "int", "id", "none"]
)
def test_batch__an_answer_that_names_no_message_of_the_group_fails_it_whole(
    offline: Any, answer: Any
) -> None:
    def confused(contexts: list[MessageContext]) -> Any:
        Effect.objects.create(event_id="written", consumer="attempt")
        return answer

    events = [order(n=n) for n in range(2)]
    outcomes = processor(batch_registry(confused)).process([received(e) for e in events])
    assert [o.verdict for o in outcomes] == [Verdict.RETRY, Verdict.RETRY]
    assert not Effect.objects.exists()  # the group's writes rolled back
    errors = set(InboxEvent.objects.values_list("last_error", flat=True))
    [error] = errors
    assert error.startswith("BatchResultError: a batch handler ")


def test_batch__reject_message_dead_letters_the_whole_group(offline: Any) -> None:
    def rejects(contexts: list[MessageContext]) -> None:
        raise RejectMessage("these customers do not exist")

    outcomes = processor(batch_registry(rejects)).process([received(order(n=n)) for n in (1, 2)])
    assert [o.verdict for o in outcomes] == [Verdict.DEAD, Verdict.DEAD]
    assert {o.dead.reason for o in outcomes if o.dead} == {dead_letter.REJECTED}


def test_batch__an_inbox_row_taken_meanwhile_reruns_the_group_without_it(offline: Any) -> None:
    """Another worker processes one event of the group while the handler runs: the group's
    savepoint rolls back and it runs again without that message, so its effect is not kept."""
    events = [order(n=n) for n in range(3)]
    taken = events[1]["event_id"]
    processing = processor(batch_registry(BulkWriter(fail=lambda ctx: True)))
    processing.process([received(e) for e in events])  # three failed rows
    writer = BulkWriter()

    def racing(contexts: list[MessageContext]) -> Any:
        if len(writer.calls) == 0:
            InboxEvent.objects.filter(event_id=taken).update(status="processed")
        return writer(contexts)

    outcomes = processor(batch_registry(racing)).process(
        [received(e, deliveries=2) for e in events]
    )
    assert [o.verdict for o in outcomes] == [Verdict.ACK, Verdict.RETRY, Verdict.ACK]
    assert [[c.event_id for c in call] for call in writer.calls] == [
        [e["event_id"] for e in events],
        [events[0]["event_id"], events[2]["event_id"]],
    ]
    assert effects() == sorted([events[0]["event_id"], events[2]["event_id"]])


def test_batch__a_producer_registration_gets_its_own_group(offline: Any) -> None:
    ours, anyone = BulkWriter(), BulkWriter()
    registry = HandlerRegistry()
    registry.register("order", "created", ours, batch=True, producer="beta")
    registry.register("order", "created", anyone, batch=True)
    beta = received(order(n=1))
    other = ReceivedMessage(
        subject="unit.data.sync.gamma.alpha",
        data=encode(order(n=2)),
        stream=STREAM,
        stream_seq=next(_seqs),
        consumer=DURABLE,
    )
    outcomes = processor(registry).process([beta, other])
    assert [o.verdict for o in outcomes] == [Verdict.ACK, Verdict.ACK]
    assert [[c.producer for c in call] for call in ours.calls] == [["beta"]]
    assert [len(call) for call in anyone.calls] == [1]
    assert connection.in_atomic_block is False


def test_batch__middleware_wraps_the_group_call_once(offline: Any) -> None:
    invocations: list[Any] = []

    def spy(invocation: Any, call_next: Any) -> Any:
        invocations.append(invocation)
        return call_next(invocation)

    writer = BulkWriter()
    registry = batch_registry(writer, order__updated=lambda e, s, d: None)
    events = [order(n=0), order("updated"), order(n=1), order(n=2)]
    processing = BatchProcessor(durable=DURABLE, registry=registry, middleware=[spy])
    outcomes = processing.process([received(e) for e in events])
    assert [o.verdict for o in outcomes] == [Verdict.ACK] * 4
    assert [(i.batch, len(i.messages)) for i in invocations] == [(False, 1), (True, 3)]
    group = invocations[1]
    assert group.handler is writer
    assert [ctx.event_id for ctx in group.messages] == [events[n]["event_id"] for n in (0, 2, 3)]
    with pytest.raises(ValueError, match=r"read \.messages"):
        group.message  # the property raises


@dataclasses.dataclass
class Created:
    n: int


def test_batch__a_typed_group_gets_valid_payloads_and_invalid_ones_are_dead_lettered(
    offline: Any,
) -> None:
    writer = BulkWriter()
    registry = HandlerRegistry()
    registry.register("order", "created", writer, batch=True, schema=Created)
    events = [order(n=1), order(n="two"), order(n=3)]
    outcomes = processor(registry).process([received(e) for e in events])
    assert [o.verdict for o in outcomes] == [Verdict.ACK, Verdict.DEAD, Verdict.ACK]
    assert outcomes[1].dead is not None
    assert outcomes[1].dead.reason == dead_letter.INVALID
    [call] = writer.calls
    assert [ctx.payload for ctx in call] == [Created(1), Created(3)]


def test_batch__each_peer_loop_calls_the_handler_with_its_own_batches(
    jetstream_bridge: Any, settings: Any
) -> None:
    from tests.integration.test_consume_peers import configure, publish_from

    config = configure(settings, ["billing", "shipping"])
    billing = publish_from(config, "billing", 3)
    shipping = publish_from(config, "shipping", 2)
    writer = BulkWriter()
    stats = consume(batch_registry(writer), batch_size=25)
    assert stats.processed == 5
    # Loops in threads on PostgreSQL: the calls may come in either order.
    calls = {tuple({c.producer for c in call}): [c.event_id for c in call] for call in writer.calls}
    assert calls == {("billing",): billing, ("shipping",): shipping}
    assert {c.consumer for call in writer.calls for c in call} == {
        DURABLE,
        f"{DURABLE}-shipping",
    }
    assert effects() == sorted(billing + shipping)


def test_batch__testing_deliver_and_the_admin_rerun_call_it_with_a_group_of_one(
    offline: Any,
) -> None:
    from jetstream_bridge.testing.deliver import deliver

    writer = BulkWriter(fail=lambda ctx: ctx.deliveries == 1)
    registry = batch_registry(writer)
    envelope = order(n=7)
    result = deliver(envelope, handlers=registry, durable=DURABLE)
    assert result.retried  # reported failed on its first delivery
    row = InboxEvent.objects.get(event_id=envelope["event_id"])
    assert row.status == "failed"
    writer.fail = lambda ctx: False
    outcome = processor(registry).process_stored(row.pk)  # the admin's "Re-run handler"
    assert outcome.verdict is Verdict.ACK
    assert [[c.event_id for c in call] for call in writer.calls] == [[envelope["event_id"]]] * 2
    assert InboxEvent.objects.get(pk=row.pk).status == "processed"
    assert effects() == [envelope["event_id"]]


@pytest.mark.parametrize("savepoints", ["on_failure", "always"])
def test_batch__a_raising_group_keeps_the_single_handlers_work(
    offline: Any, settings: Any, savepoints: str
) -> None:
    settings.JETSTREAM_BRIDGE = {**settings.JETSTREAM_BRIDGE, "HANDLER_SAVEPOINTS": savepoints}
    writer = BulkWriter(raise_on={1})
    registry = batch_registry(writer, order__updated=handlers.record_effect)
    events = [order(n=0), order("updated"), order(n=1)]
    processing = processor(registry)
    outcomes = processing.process([received(e) for e in events])
    assert [o.verdict for o in outcomes] == [Verdict.RETRY, Verdict.ACK, Verdict.RETRY]
    assert effects() == [events[1]["event_id"]]  # the single handler's write is kept
    assert not Effect.objects.filter(consumer="attempt").exists()  # the group's rolled back
    assert sorted(processed_rows()) == [events[1]["event_id"]]
    failed = InboxEvent.objects.filter(status="failed").values_list("last_error", flat=True)
    assert list(failed) == ["RuntimeError: the bulk insert failed"] * 2
    assert processing.redone == 0  # a group's failure never redoes the batch
