"""Handler styles and middleware through the batch processor, on the real test database.

Context handlers (``context=True``), typed payloads (``schema=``) and the middleware chain,
next to today's ``(event, subject, deliveries)`` handlers. The consumer-level proofs (a real
nats-server, the DLQ stream) are in ``test_handler_context_consumer.py``.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
from typing import Any

import pydantic
import pytest

from jetstream_bridge import MessageContext, middleware
from jetstream_bridge.conf import get_config
from jetstream_bridge.context import Invocation
from jetstream_bridge.core import dead_letter
from jetstream_bridge.core.envelope import build_envelope, encode
from jetstream_bridge.core.errors import InvalidEvent
from jetstream_bridge.handlers import HandlerRegistry, Registration
from jetstream_bridge.models import InboxEvent
from jetstream_bridge.processing import BatchProcessor, ReceivedMessage, Verdict
from jetstream_bridge.publisher import Publisher
from jetstream_bridge.testing.capture import capture_published
from tests.testapp.models import Effect

pytestmark = pytest.mark.django_db(transaction=True)

DURABLE = "alpha-events"
STREAM = "styles-test"
SUBJECT = "unit.data.sync.beta.alpha"
_seqs = itertools.count(1)


@pytest.fixture
def bridge(settings: Any) -> Any:
    settings.JETSTREAM_BRIDGE = {
        **settings.JETSTREAM_BRIDGE,
        "NATS_URLS": ["nats://127.0.0.1:9"],  # nothing here may reach a broker
        "ENV": "unit",
        "APP_NAME": "alpha",
        "DESTINATION_APP": "beta",
        "MAX_DELIVER": 3,
        "BACKOFF": ["1s", "2s"],
    }
    return get_config()


@dataclasses.dataclass
class OrderCreated:
    number: str
    total: int
    note: str | None = None


def envelope(resource: str = "order", event: str = "created", **payload: Any) -> dict[str, Any]:
    return build_envelope(
        producer="beta", resource_type=resource, event_type=event, payload=payload
    )


def received(body: dict[str, Any], *, deliveries: int = 1, **headers: str) -> ReceivedMessage:
    return ReceivedMessage(
        subject=SUBJECT,
        data=encode(body),
        stream=STREAM,
        stream_seq=next(_seqs),
        deliveries=deliveries,
        consumer=DURABLE,
        headers={"Nats-Msg-Id": body["event_id"], **headers},
    )


def run(registry: HandlerRegistry, *messages: ReceivedMessage, **kwargs: Any) -> list[Any]:
    processor = BatchProcessor(durable=DURABLE, registry=registry, config=get_config(), **kwargs)
    return processor.process(list(messages))


def test_old_and_context_handlers_side_by_side(bridge: Any) -> None:
    calls: list[Any] = []
    registry = HandlerRegistry()
    registry.register(
        "order", "created", lambda e, s, d: calls.append(("old", e["event_id"], s, d))
    )

    def with_context(ctx: MessageContext) -> None:
        calls.append(("ctx", ctx))
        Effect.objects.create(event_id=ctx.event_id, consumer="ctx")

    registry.register("order", "shipped", with_context, context=True)
    old, new = envelope(number="1"), envelope(event="shipped", number="2")
    outcomes = run(registry, received(old), received(new, deliveries=2, Traceparent="00-abc"))

    assert [o.verdict for o in outcomes] == [Verdict.ACK, Verdict.ACK]
    assert calls[0] == ("old", old["event_id"], SUBJECT, 1)
    kind, ctx = calls[1]
    assert kind == "ctx"
    assert len(calls) == 2
    assert (ctx.event_id, ctx.payload, ctx.subject) == (new["event_id"], {"number": "2"}, SUBJECT)
    assert (ctx.stream, ctx.deliveries, ctx.consumer, ctx.producer) == (STREAM, 2, DURABLE, "beta")
    assert ctx.stream_seq == outcomes[1].message.stream_seq
    assert ctx.headers["Traceparent"] == "00-abc"
    assert (ctx.resource_type, ctx.event_type) == ("order", "shipped")
    with pytest.raises(TypeError):
        ctx.headers["Traceparent"] = "forged"  # type: ignore[index]
    assert InboxEvent.objects.filter(consumer=DURABLE).count() == 2
    assert Effect.objects.filter(consumer="ctx").count() == 1


def test_typed_payload__valid_reaches_the_handler_as_the_dataclass(bridge: Any) -> None:
    seen: list[Any] = []
    registry = HandlerRegistry()
    registry.register("order", "created", lambda ctx: seen.append(ctx.payload), schema=OrderCreated)
    [outcome] = run(registry, received(envelope(number="A-1", total=3)))
    assert outcome.verdict is Verdict.ACK
    assert seen == [OrderCreated(number="A-1", total=3)]


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"number": "A-1"}, [{"loc": "total", "msg": "field required"}]),
        (
            {"number": "A-1", "total": "3"},
            [{"loc": "total", "msg": "expected integer, got string"}],
        ),
        (
            {"number": 1, "total": True},
            [
                {"loc": "number", "msg": "expected string, got integer"},
                {"loc": "total", "msg": "expected integer, got boolean"},
            ],
        ),
        (
            {"number": "A", "total": 1, "evil\u0007\n\u2028\u00e9": 1},
            [{"loc": "evil\\x07\\n\\u2028\\xe9", "msg": "unexpected field"}],
        ),
    ],
)
def test_typed_payload__invalid_is_dead_lettered_at_once_without_the_handler(
    bridge: Any, payload: dict[str, Any], expected: list[dict[str, str]]
) -> None:
    called: list[Any] = []
    registry = HandlerRegistry()
    registry.register("order", "created", called.append, schema=OrderCreated)
    [outcome] = run(registry, received(envelope(**payload)))  # first delivery: no retry
    assert called == []
    assert outcome.verdict is Verdict.DEAD
    assert outcome.dead is not None
    assert outcome.dead.reason == dead_letter.INVALID
    headers = outcome.dead.headers(b"{}")
    assert headers[dead_letter.REASON] == "invalid"
    assert json.loads(headers[dead_letter.VALIDATION_ERRORS]) == expected
    assert headers[dead_letter.VALIDATION_ERRORS].isascii()
    [row] = InboxEvent.objects.filter(consumer=DURABLE)
    assert row.status == "failed"
    assert "InvalidPayload" in row.last_error


def test_middleware__order_setting_then_use_then_own_and_the_invocation(
    bridge: Any, settings: Any
) -> None:
    order: list[str] = []
    settings.JETSTREAM_BRIDGE = {
        **settings.JETSTREAM_BRIDGE,
        "MIDDLEWARE": ["tests.integration.test_handler_styles.from_settings"],
    }

    def used(invocation: Invocation, call_next: Any) -> Any:
        order.append("use")
        return call_next(invocation)

    def own(invocation: Invocation, call_next: Any) -> Any:
        order.append(f"own:{invocation.message.event_id}:{invocation.batch}")
        result = call_next(invocation)
        order.append("own-after")
        return result

    registry = HandlerRegistry()
    registry.register("order", "created", lambda e, s, d: order.append("handler"))
    event = envelope(number="1")
    middleware.use(used)
    try:
        SETTINGS_SEEN.clear()
        [outcome] = run(registry, received(event), middleware=[own])
    finally:
        middleware.unuse(used)
    assert outcome.verdict is Verdict.ACK
    assert SETTINGS_SEEN == [event["event_id"]]
    assert order == ["use", f"own:{event['event_id']}:False", "handler", "own-after"]


def test_middleware__an_exception_is_the_handlers_failure_and_is_retried(bridge: Any) -> None:
    ran: list[str] = []

    def broken(invocation: Invocation, call_next: Any) -> Any:
        call_next(invocation)
        raise RuntimeError("middleware broke")

    def handler(event: dict[str, Any], subject: str, deliveries: int) -> None:
        ran.append(event["event_id"])
        Effect.objects.create(event_id=event["event_id"], consumer="mw")

    [outcome] = run(registry_of(handler), received(envelope(n=1)), middleware=[broken])
    assert outcome.verdict is Verdict.RETRY
    assert outcome.delay == 1.0
    assert len(ran) == 1
    # Inside the handler's savepoint: its write rolled back with the failure.
    assert not Effect.objects.filter(consumer="mw").exists()
    [row] = InboxEvent.objects.filter(consumer=DURABLE)
    assert row.status == "failed"
    assert "middleware broke" in row.last_error


def registry_of(fn: Any) -> HandlerRegistry:
    registry = HandlerRegistry()
    registry.register("order", "created", Registration(fn))
    return registry


SETTINGS_SEEN: list[str] = []


def from_settings(invocation: Invocation, call_next: Any) -> Any:
    SETTINGS_SEEN.append(invocation.message.event_id or "")
    return call_next(invocation)


class Shipped(pydantic.BaseModel):
    number: str
    sent_at: datetime.datetime


@dataclasses.dataclass
class Paid:
    number: str
    cents: int


def test_publish_takes_a_pydantic_model_or_a_dataclass_as_the_payload(bridge: Any) -> None:
    at = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    with capture_published() as capture:
        Publisher().publish(
            resource_type="order", event_type="shipped", payload=Shipped(number="A", sent_at=at)
        )
        Publisher().publish(resource_type="order", event_type="paid", payload=Paid("B", 5))
    shipped, paid = capture.events
    assert shipped["payload"] == {"number": "A", "sent_at": "2026-01-02T03:04:05Z"}
    assert paid["payload"] == {"number": "B", "cents": 5}
    # The same validation as for a dict: a dataclass holding what JSON cannot carry is refused.
    with pytest.raises(InvalidEvent):
        Publisher().publish(resource_type="order", event_type="paid", payload=Paid("C", at))  # type: ignore[arg-type]


def test_middleware_setting__a_path_that_does_not_import_stops_the_start(
    bridge: Any, settings: Any
) -> None:
    settings.JETSTREAM_BRIDGE = {
        **settings.JETSTREAM_BRIDGE,
        "MIDDLEWARE": ["tests.integration.test_handler_styles.no_such_middleware"],
    }
    with pytest.raises(ImportError, match=r"cannot import middleware .*named in MIDDLEWARE"):
        BatchProcessor(durable=DURABLE, config=get_config())


def test_async_context_handler_and_a_decorated_function_passed_on_its_own(bridge: Any) -> None:
    seen: list[tuple[str, Any]] = []

    async def typed(ctx: MessageContext) -> None:
        seen.append(("async", ctx.payload))

    processor = BatchProcessor(
        durable=DURABLE, handler=Registration(typed, schema=OrderCreated), config=get_config()
    )
    [outcome] = processor.process([received(envelope(number="A", total=1))])
    assert outcome.verdict is Verdict.ACK
    assert seen == [("async", OrderCreated(number="A", total=1))]

    # A function keeps the style its @handler gave it when it is passed on its own.
    from jetstream_bridge.handlers import handler, registry

    saved, styles = dict(registry._handlers), dict(registry._styles)
    try:

        @handler("order", "boxed", context=True)
        def boxed(ctx: MessageContext) -> None:
            seen.append(("boxed", ctx.event_type))

    finally:
        registry._handlers.clear()
        registry._handlers.update(saved)
        registry._styles.clear()
        registry._styles.update(styles)
    [outcome] = BatchProcessor(durable=DURABLE, handler=boxed, config=get_config()).process(
        [received(envelope(event="boxed"))]
    )
    assert outcome.verdict is Verdict.ACK
    assert seen[-1] == ("boxed", "boxed")
