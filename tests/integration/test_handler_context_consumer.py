"""Handler styles, typed payloads and middleware on a real nats-server and a real database.

The same consumer serves today's ``(event, subject, deliveries)`` handlers next to
``context=True`` and ``schema=`` ones; invalid typed payloads go to the DLQ's stream with
reason ``invalid`` on their first delivery; middleware wraps every call and observes every
settle. ``testing.deliver`` and the admin's *Re-run handler* hand out the same context.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import pydantic
import pytest
from django.test import Client

from jetstream_bridge import MessageContext, RejectMessage, middleware
from jetstream_bridge.consumer import Consumer
from jetstream_bridge.context import Invocation
from jetstream_bridge.core import dead_letter
from jetstream_bridge.core.envelope import build_envelope, encode
from jetstream_bridge.handlers import HandlerRegistry, Registration, registry
from jetstream_bridge.models import InboxEvent
from jetstream_bridge.testing.deliver import deliver
from tests.admin_data import inbox_row
from tests.helpers import fast_retry_bridge, manage, publish_raw, stream_messages
from tests.testapp.models import Effect

pytestmark = pytest.mark.django_db(transaction=True)
DURABLE = "alpha-events"


@pytest.fixture
def bridge(jetstream_bridge: Any, settings: Any) -> Any:
    return fast_retry_bridge(settings, DURABLE)


@dataclasses.dataclass(frozen=True)
class OrderPaid:
    number: str
    cents: int


class OrderShipped(pydantic.BaseModel):
    number: str
    parcels: int


def consume(registry: HandlerRegistry, **kwargs: Any) -> Any:
    kwargs.setdefault("stop_when_idle", True)
    kwargs.setdefault("idle_timeout", 1.0)
    consumer = Consumer(durable_name=DURABLE, registry=registry, **kwargs)
    return asyncio.run(consumer.run_async())


def send(config: Any, event_type: str, payload: Any, **headers: str) -> tuple[str, int]:
    envelope = build_envelope(
        producer=config.destination_app,
        resource_type="order",
        event_type=event_type,
        payload=payload,
    )
    seq = publish_raw(config, encode(envelope), {"Nats-Msg-Id": envelope["event_id"], **headers})
    return envelope["event_id"], seq


def letters(config: Any) -> list[Any]:
    return [m for m in stream_messages(config.dlq_stream_name) if m.subject == config.subjects.dlq]


def test_old_style_and_context_handler_side_by_side_on_one_consumer(bridge: Any) -> None:
    old_calls: list[tuple[Any, ...]] = []
    contexts: list[MessageContext] = []
    handlers = HandlerRegistry()

    @handlers_register(handlers, "created")
    def old(event: dict[str, Any], subject: str, deliveries: int) -> None:
        old_calls.append((event["event_id"], subject, deliveries))
        Effect.objects.create(event_id=event["event_id"], consumer="old")

    def with_context(ctx: MessageContext) -> None:
        contexts.append(ctx)
        Effect.objects.create(event_id=ctx.event_id, consumer="ctx")

    handlers.register("order", "shipped", with_context, context=True)
    old_id, _ = send(bridge, "created", {"number": "A-1"})
    new_id, new_seq = send(bridge, "shipped", {"number": "A-2"}, **{"X-Tenant": "acme"})

    stats = consume(handlers)

    assert (stats.processed, stats.retried, stats.dead_lettered) == (2, 0, 0)
    assert old_calls == [(old_id, bridge.subjects.subscribe, 1)]
    [ctx] = contexts
    assert (ctx.event_id, ctx.event["event_id"], ctx.payload) == (new_id, new_id, {"number": "A-2"})
    assert ctx.headers["X-Tenant"] == "acme"
    assert ctx.headers["Nats-Msg-Id"] == new_id
    assert (ctx.stream, ctx.stream_seq) == (bridge.stream_name, new_seq)
    assert (ctx.deliveries, ctx.consumer, ctx.producer) == (1, DURABLE, bridge.destination_app)
    assert ctx.subject == bridge.subjects.subscribe
    assert sorted(Effect.objects.values_list("consumer", flat=True)) == ["ctx", "old"]
    assert InboxEvent.objects.filter(consumer=DURABLE, status="processed").count() == 2


def handlers_register(handlers: HandlerRegistry, event_type: str) -> Any:
    def decorate(fn: Any) -> Any:
        handlers.register("order", event_type, fn)
        return fn

    return decorate


def test_invalid_typed_payload_is_dead_lettered_at_once_and_valid_ones_arrive_typed(
    bridge: Any, subprocess_env: dict[str, str]
) -> None:
    paid: list[Any] = []
    shipped: list[Any] = []
    handlers = HandlerRegistry()
    handlers.register("order", "paid", lambda ctx: paid.append(ctx.payload), schema=OrderPaid)
    handlers.register(
        "order", "shipped", lambda ctx: shipped.append(ctx.payload), schema=OrderShipped
    )
    send(bridge, "paid", {"number": "A-1", "cents": 1990})
    send(bridge, "shipped", {"number": "A-1", "parcels": "2"})  # pydantic's lax mode: 2
    bad_dc, bad_dc_seq = send(bridge, "paid", {"number": "A-2", "cents": "12", "x\u001b[31m": 1})
    bad_pd, bad_pd_seq = send(bridge, "shipped", {"number": ["A-3"]})

    stats = consume(handlers)

    assert paid == [OrderPaid(number="A-1", cents=1990)]
    assert shipped == [OrderShipped(number="A-1", parcels=2)]
    assert (stats.processed, stats.retried, stats.dead_lettered) == (2, 0, 2)
    found = {m.headers[dead_letter.EVENT_ID]: m.headers for m in letters(bridge)}
    assert set(found) == {bad_dc, bad_pd}
    for event_id, seq in ((bad_dc, bad_dc_seq), (bad_pd, bad_pd_seq)):
        headers = found[event_id]
        assert headers[dead_letter.REASON] == dead_letter.INVALID
        assert headers[dead_letter.ERROR_CLASS] == "InvalidPayload"
        assert headers[dead_letter.DELIVERIES] == "1"  # never retried
        assert headers[dead_letter.STREAM_SEQ] == str(seq)
    assert json.loads(found[bad_dc][dead_letter.VALIDATION_ERRORS]) == [
        {"loc": "x\\x1b[31m", "msg": "unexpected field"},
        {"loc": "cents", "msg": "expected integer, got string"},
    ]
    pydantic_errors = json.loads(found[bad_pd][dead_letter.VALIDATION_ERRORS])
    assert [error["loc"] for error in pydantic_errors] == ["number", "parcels"]
    assert "\x1b" not in found[bad_dc][dead_letter.ERROR_MESSAGE]

    listed = manage("jetstream_dlq", "list", "--json", "--reason", "invalid", env=subprocess_env)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)["messages"]
    assert sorted(row["event_id"] for row in rows) == sorted([bad_dc, bad_pd])
    assert {row["reason"] for row in rows} == {"invalid"}


class Observer:
    """A middleware with a ``settled`` observer: records calls and settles, fails on demand."""

    def __init__(self, name: str, order: list[str], fail_first: bool = False) -> None:
        self.name, self.order, self.fail_first = name, order, fail_first
        self.settles: list[tuple[str | None, int, str]] = []
        self.failed: set[str] = set()

    def __call__(self, invocation: Invocation, call_next: Any) -> Any:
        ctx = invocation.message
        self.order.append(f"{self.name}>")
        result = call_next(invocation)
        self.order.append(f"<{self.name}")
        if self.fail_first and ctx.event_id not in self.failed:
            self.failed.add(ctx.event_id or "")
            raise RuntimeError(f"{self.name} failed after the handler")
        return result

    def settled(self, ctx: MessageContext, outcome: str) -> None:
        self.settles.append((ctx.event_id, ctx.deliveries, outcome))


def test_middleware_wraps_each_call_and_a_failing_one_is_the_handlers_failure(
    bridge: Any,
) -> None:
    order: list[str] = []
    outer, inner = Observer("used", order), Observer("own", order, fail_first=True)
    handlers = HandlerRegistry()

    def record(event: dict[str, Any], subject: str, deliveries: int) -> None:
        order.append("handler")
        Effect.objects.create(event_id=event["event_id"], consumer=f"try-{deliveries}")

    handlers.register("order", "created", record)
    event_id, _ = send(bridge, "created", {"n": 1})
    middleware.use(outer)
    try:
        stats = consume(handlers, middleware=[inner])
    finally:
        middleware.unuse(outer)

    # Delivery 1: the handler ran, the middleware failed after it: its write rolled back,
    # the message was retried; delivery 2 applied it.
    first = ["used>", "own>", "handler", "<own"]  # own raised: used saw the exception
    second = ["used>", "own>", "handler", "<own", "<used"]
    assert order == [*first, *second]
    assert (stats.processed, stats.retried) == (1, 1)
    assert list(Effect.objects.values_list("consumer", flat=True)) == ["try-2"]
    row = InboxEvent.objects.get(consumer=DURABLE, event_id=event_id)
    assert (row.status, row.deliveries) == ("processed", 2)
    assert outer.settles == [(event_id, 1, "retried"), (event_id, 2, "processed")]
    assert inner.settles == outer.settles


def test_settled_sees_duplicates_and_dead_letters_too(bridge: Any) -> None:
    observer = Observer("obs", [])
    handlers = HandlerRegistry()

    def handle(event: dict[str, Any], subject: str, deliveries: int) -> None:
        if event["payload"].get("reject"):
            raise RejectMessage("not for us")

    handlers.register("order", "created", handle)
    envelope = build_envelope(
        producer=bridge.destination_app, resource_type="order", event_type="created", payload={}
    )
    publish_raw(bridge, encode(envelope), {"Nats-Msg-Id": "first"})
    publish_raw(bridge, encode(envelope), {"Nats-Msg-Id": "second"})  # the same event again
    rejected, _ = send(bridge, "created", {"reject": True})
    publish_raw(bridge, b"not json", {"Nats-Msg-Id": "garbage"})

    stats = consume(handlers, middleware=[observer], batch_size=1)

    assert (stats.processed, stats.duplicates, stats.dead_lettered) == (1, 1, 2)
    assert observer.settles == [
        (envelope["event_id"], 1, "processed"),
        (envelope["event_id"], 1, "duplicate"),
        (rejected, 1, "dead_lettered"),
        (None, 1, "dead_lettered"),  # malformed: a context without an envelope
    ]


@pytest.fixture
def global_handlers() -> Iterator[HandlerRegistry]:
    saved, styles = dict(registry._handlers), dict(registry._styles)
    try:
        yield registry
    finally:
        registry._handlers.clear()
        registry._handlers.update(saved)
        registry._styles.clear()
        registry._styles.update(styles)


def test_testing_deliver_gives_a_context_and_runs_the_middleware(bridge: Any) -> None:
    contexts: list[MessageContext] = []
    calls: list[str] = []

    def mw(invocation: Invocation, call_next: Any) -> Any:
        calls.append(invocation.message.event_id or "")
        return call_next(invocation)

    envelope = build_envelope(
        producer=bridge.destination_app,
        resource_type="order",
        event_type="paid",
        payload={"number": "A-1", "cents": 5},
    )
    result = deliver(
        envelope,
        Registration(contexts.append, schema=OrderPaid),
        deliveries=2,
        headers={"X-Tenant": "acme"},
        middleware=[mw],
    )
    assert result.processed
    [ctx] = contexts
    assert ctx.payload == OrderPaid(number="A-1", cents=5)
    assert (ctx.deliveries, ctx.consumer, ctx.headers["X-Tenant"]) == (2, "tests", "acme")
    assert ctx.producer == bridge.destination_app
    assert calls == [envelope["event_id"]]

    wrong = build_envelope(
        producer=bridge.destination_app,
        resource_type="order",
        event_type="paid",
        payload={"number": "A-1"},
    )
    invalid = deliver(wrong, Registration(contexts.append, schema=OrderPaid))
    assert invalid.dead_lettered
    assert invalid.dead_letter is not None
    assert invalid.dead_letter.reason == "invalid"
    assert len(contexts) == 1  # the handler never saw it


def test_admin_rerun_gives_the_stored_message_as_a_context(
    bridge: Any, admin_client: Client, global_handlers: HandlerRegistry
) -> None:
    contexts: list[MessageContext] = []

    def rerun(ctx: MessageContext) -> None:
        contexts.append(ctx)
        Effect.objects.create(event_id=ctx.event_id, consumer="rerun")

    global_handlers.register("invoice", "created", rerun, context=True)
    row = inbox_row(bridge, status="failed", deliveries=4, seq=77)
    admin_client.post(
        "/admin/jetstream_bridge/inboxevent/",
        {"action": "rerun_handler", "_selected_action": [row.pk]},
    )
    [ctx] = contexts
    assert (ctx.event_id, ctx.stream, ctx.stream_seq) == (row.event_id, bridge.stream_name, 77)
    assert (ctx.deliveries, ctx.consumer, ctx.producer) == (
        4,
        "alpha-events",
        bridge.destination_app,
    )
    assert ctx.headers["Nats-Msg-Id"] == row.event_id
    row.refresh_from_db()
    assert row.status == "processed"
