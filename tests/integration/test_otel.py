"""OpenTelemetry end to end: trace context in the outbox and on the wire, producer and consumer
spans, one trace from the request to the handler (the relay in another process), and nothing
at all without an active span or without OpenTelemetry installed.

The SDK's in-memory exporter collects this process's spans (``tests/otel_spans.py``); a relay
subprocess writes its spans to a JSON-lines file named by ``JSB_OTEL_SPANS_FILE``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.db import transaction
from opentelemetry import trace

from jetstream_bridge import Publisher, RejectMessage
from jetstream_bridge.conf import get_config
from jetstream_bridge.consumer import Consumer
from jetstream_bridge.core.envelope import build_envelope
from jetstream_bridge.fast_path import fast_path
from jetstream_bridge.models import OutboxEvent
from jetstream_bridge.testing.deliver import deliver
from jetstream_bridge.topology import ensure_topology
from tests.helpers import manage, stream_messages
from tests.otel_spans import finished, memory_exporter, read_file
from tests.testapp.models import Effect

pytestmark = pytest.mark.django_db(transaction=True)

EVENT = {"resource_type": "order", "event_type": "created", "payload": {"id": "o-1"}}


@pytest.fixture
def spans() -> Any:
    exporter = memory_exporter()
    exporter.clear()
    yield exporter
    exporter.clear()


@pytest.fixture
def bridge(jetstream_bridge: Any, settings: Any) -> Any:
    ensure_topology()
    return jetstream_bridge


def _tracer() -> Any:
    return trace.get_tracer("tests")


def _ids(span: Any) -> tuple[str, str]:
    context = span.get_span_context()
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def _traceparent(trace_id: str, span_id: str, flags: str = "01") -> str:
    return f"00-{trace_id}-{span_id}-{flags}"


def _context_of(traceparent: str) -> tuple[str, str]:
    """(trace id, span id) of a ``traceparent`` (its flags vary with the SDK's version)."""
    version, trace_id, span_id, _flags = traceparent.split("-")
    assert version == "00"
    return trace_id, span_id


def _wire(config: Any) -> list[Any]:
    return stream_messages(config.stream_name)


def _no_fast_path(settings: Any) -> None:
    settings.JETSTREAM_BRIDGE = {**settings.JETSTREAM_BRIDGE, "OUTBOX_FAST_PATH": False}


def test_publish__without_an_active_span_adds_no_header_and_no_span(
    bridge: Any, spans: Any
) -> None:
    with transaction.atomic():
        result = Publisher().publish(**EVENT)
    assert fast_path().wait_idle()
    row = OutboxEvent.objects.get()
    assert row.headers == {}
    [message] = _wire(bridge)
    assert dict(message.headers) == {"Nats-Msg-Id": result.event_id}
    assert finished(spans) == []
    # The trace id is a fresh random one, as before: no trace to take it from.
    assert len(json.loads(message.data)["trace_id"]) == 32


def test_publish__stores_the_active_context_in_the_row_and_the_trace_id_in_the_envelope(
    bridge: Any, settings: Any, spans: Any
) -> None:
    _no_fast_path(settings)
    with _tracer().start_as_current_span("request") as request:
        result = Publisher().publish(**EVENT)
    trace_id, span_id = _ids(request)
    row = OutboxEvent.objects.get()
    assert list(row.headers) == ["traceparent"]
    assert _context_of(row.headers["traceparent"]) == (trace_id, span_id)
    assert row.payload["trace_id"] == trace_id
    assert result.status == "queued"


def test_publish__the_callers_trace_id_and_traceparent_win(
    bridge: Any, settings: Any, spans: Any
) -> None:
    _no_fast_path(settings)
    mine = _traceparent("ab" * 16, "cd" * 8)
    with _tracer().start_as_current_span("request"):
        Publisher().publish(**EVENT, trace_id="t-mine", headers={"Traceparent": mine})
    row = OutboxEvent.objects.get()
    assert row.headers == {"Traceparent": mine}
    assert row.payload["trace_id"] == "t-mine"


def test_publish__otel_tracing_off_adds_nothing(bridge: Any, settings: Any, spans: Any) -> None:
    settings.JETSTREAM_BRIDGE = {**settings.JETSTREAM_BRIDGE, "OTEL_TRACING": False}
    with _tracer().start_as_current_span("request") as request, transaction.atomic():
        Publisher().publish(**EVENT)
    assert fast_path().wait_idle()
    [message] = _wire(bridge)
    assert "traceparent" not in message.headers
    assert json.loads(message.data)["trace_id"] != _ids(request)[0]
    assert [span["name"] for span in finished(spans)] == ["request"]


def test_fast_path__publishes_in_a_producer_span_child_of_the_request(
    bridge: Any, spans: Any
) -> None:
    with _tracer().start_as_current_span("request") as request, transaction.atomic():
        result = Publisher().publish(**EVENT)
    assert fast_path().wait_idle()
    trace_id, request_id = _ids(request)
    [producer] = [span for span in finished(spans) if span["kind"] == "PRODUCER"]
    subject = bridge.subjects.publish
    assert producer["name"] == f"{subject} publish"
    assert producer["trace_id"] == trace_id
    assert producer["parent_id"] == request_id
    assert producer["attributes"] == {
        "messaging.system": "nats",
        "messaging.operation": "publish",
        "messaging.operation.type": "send",
        "messaging.destination.name": subject,
        "messaging.message.id": result.event_id,
    }
    assert producer["status"] == "UNSET"
    # What goes on the wire is the producer span's context, not the request's.
    [message] = _wire(bridge)
    assert _context_of(message.headers["traceparent"]) == (trace_id, producer["span_id"])
    assert OutboxEvent.objects.get().status == "sent"


def test_direct_publish__without_outbox_also_publishes_in_a_producer_span(
    bridge: Any, settings: Any, spans: Any
) -> None:
    settings.JETSTREAM_BRIDGE = {**settings.JETSTREAM_BRIDGE, "USE_OUTBOX": False}
    with _tracer().start_as_current_span("request") as request:
        Publisher().publish(**EVENT)
    [producer] = [span for span in finished(spans) if span["kind"] == "PRODUCER"]
    assert producer["parent_id"] == _ids(request)[1]
    [message] = _wire(bridge)
    assert _context_of(message.headers["traceparent"]) == (_ids(request)[0], producer["span_id"])


def test_relay__in_another_process_continues_the_stored_trace(
    bridge: Any, settings: Any, spans: Any, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    _no_fast_path(settings)
    with _tracer().start_as_current_span("request") as request:
        result = Publisher().publish(**EVENT)
    trace_id, request_id = _ids(request)
    exported = tmp_path / "relay-spans.jsonl"
    relay = manage(
        "jetstream_relay", "--once", env={**subprocess_env, "JSB_OTEL_SPANS_FILE": str(exported)}
    )
    assert relay.returncode == 0, relay.stderr
    [producer] = read_file(exported)
    assert producer["kind"] == "PRODUCER"
    assert producer["trace_id"] == trace_id
    assert producer["parent_id"] == request_id
    assert producer["attributes"]["messaging.message.id"] == result.event_id
    [message] = _wire(bridge)
    assert _context_of(message.headers["traceparent"]) == (trace_id, producer["span_id"])


def test_relay__without_a_tracer_provider_passes_the_stored_context_on(
    bridge: Any, settings: Any, spans: Any, subprocess_env: dict[str, str]
) -> None:
    _no_fast_path(settings)
    with _tracer().start_as_current_span("request") as request:
        Publisher().publish(**EVENT)
    # The API is installed in that process, but no SDK is set up: its no-op span passes the
    # stored context on.
    relay = manage("jetstream_relay", "--once", env=subprocess_env)
    assert relay.returncode == 0, relay.stderr
    [message] = _wire(bridge)
    assert _context_of(message.headers["traceparent"]) == _ids(request)


def test_relay__a_failed_publish_is_recorded_on_its_producer_span(
    bridge: Any, settings: Any, spans: Any
) -> None:
    from jetstream_bridge.relay import Relay

    _no_fast_path(settings)
    with _tracer().start_as_current_span("request"):
        Publisher().publish(**EVENT)
    # A stream that refuses the message: one whose limit is smaller than it.
    settings.JETSTREAM_BRIDGE = {**settings.JETSTREAM_BRIDGE, "AUTO_PROVISION": False}
    from tests.helpers import nats

    nats(lambda conn: conn.jsm.delete_stream(bridge.stream_name))
    stats = Relay().run(once=True)
    assert stats.failed == 1
    [producer] = [span for span in finished(spans) if span["kind"] == "PRODUCER"]
    assert producer["status"] == "ERROR"
    assert [event["name"] for event in producer["events"]] == ["exception"]


_WITHOUT_OTEL = """
import sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, Blocked())
import django
django.setup()
from django.core.management import call_command
from jetstream_bridge import otel
assert not otel.available()
call_command("jetstream_relay", "--once")
from jetstream_bridge import Publisher, RejectMessage
from jetstream_bridge.conf import get_config
from jetstream_bridge.consumer import Consumer
from jetstream_bridge.core.envelope import build_envelope
from jetstream_bridge.fast_path import fast_path
Publisher().publish(resource_type="order", event_type="created", payload={"id": "o-2"})
assert fast_path().wait_idle()
from jetstream_bridge.core.envelope import build_envelope
from jetstream_bridge.testing.deliver import deliver
envelope = build_envelope(
    producer="beta", resource_type="order", event_type="created", payload={"id": "o-3"}
)
traced = {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}
assert deliver(envelope, lambda event, subject, deliveries: None, headers=traced).processed
loaded = sorted(name for name in sys.modules if name.startswith("opentelemetry"))
assert not loaded, loaded
print("ok")
"""


def test_without_opentelemetry__the_bridge_imports_publishes_relays_and_handles(
    bridge: Any, settings: Any, spans: Any, subprocess_env: dict[str, str]
) -> None:
    _no_fast_path(settings)
    with _tracer().start_as_current_span("request") as request:
        Publisher().publish(**EVENT)
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_OTEL],
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    relayed, ok = done.stdout.splitlines()
    assert relayed.startswith("relayed 1 event(s), 0 failed")
    assert ok == "ok"
    first, second = _wire(bridge)
    # The stored context is published as stored (no producer span there); the event
    # published in that process, with nothing to trace, has no trace header.
    assert _context_of(first.headers["traceparent"]) == _ids(request)
    assert "traceparent" not in second.headers


# -- the consumer side ------------------------------------------------------------------------

RECEIVER = "beta-events"


def _receive(settings: Any) -> Any:
    """Become the receiving service (beta, fed by alpha) on the same stream."""
    settings.JETSTREAM_BRIDGE = {
        **settings.JETSTREAM_BRIDGE,
        "APP_NAME": "beta",
        "DESTINATION_APP": "alpha",
    }
    ensure_topology(durable=RECEIVER)
    return get_config()


def _consume(handler: Any) -> Any:
    consumer = Consumer(
        durable_name=RECEIVER, handler=handler, stop_when_idle=True, idle_timeout=1.0
    )
    return asyncio.run(consumer.run_async())


def _working_handler(seen: list[str]) -> Any:
    def handle(event: dict[str, Any], subject: str, deliveries: int) -> None:
        with _tracer().start_as_current_span("handler work"):
            Effect.objects.create(event_id=event["event_id"], consumer="traced")
        seen.append(event["trace_id"])

    return handle


def _one(spans: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [span] = [span for span in spans if span["kind"] == kind]
    return span


def test_one_trace__request_outbox_relay_in_another_process_consumer_handler(
    bridge: Any, settings: Any, spans: Any, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    _no_fast_path(settings)
    with _tracer().start_as_current_span("request", kind=trace.SpanKind.SERVER) as request:
        result = Publisher().publish(**EVENT)
    trace_id, request_id = _ids(request)
    exported = tmp_path / "relay-spans.jsonl"
    relay = manage(
        "jetstream_relay", "--once", env={**subprocess_env, "JSB_OTEL_SPANS_FILE": str(exported)}
    )
    assert relay.returncode == 0, relay.stderr
    producer = _one(read_file(exported), "PRODUCER")

    receiving = _receive(settings)
    seen: list[str] = []
    stats = _consume(_working_handler(seen))
    assert stats.processed == 1
    assert seen == [trace_id]  # the envelope's trace_id is the request's trace
    local = finished(spans)
    consumer = _one(local, "CONSUMER")
    [work] = [span for span in local if span["name"] == "handler work"]

    # One trace, linked parent to child: request -> producer (relay process) -> consumer ->
    # the handler's own span.
    assert {producer["trace_id"], consumer["trace_id"], work["trace_id"]} == {trace_id}
    assert producer["parent_id"] == request_id
    assert consumer["parent_id"] == producer["span_id"]
    assert work["parent_id"] == consumer["span_id"]

    subject = bridge.subjects.publish  # alpha -> beta: what beta receives on
    assert producer["name"] == f"{subject} publish"
    assert consumer["name"] == f"{subject} process"
    assert consumer["status"] == "UNSET"
    attributes = consumer["attributes"]
    assert {key: attributes[key] for key in attributes if key.startswith("messaging.")} == {
        "messaging.system": "nats",
        "messaging.operation": "process",
        "messaging.operation.type": "process",
        "messaging.destination.name": subject,
        "messaging.message.id": result.event_id,
        "messaging.consumer.group.name": RECEIVER,
        "messaging.destination.subscription.name": RECEIVER,
    }
    assert attributes["jetstream_bridge.outcome"] == "processed"
    assert attributes["jetstream_bridge.event_id"] == result.event_id
    assert attributes["jetstream_bridge.deliveries"] == 1
    assert attributes["jetstream_bridge.stream"] == receiving.stream_name
    assert Effect.objects.filter(consumer="traced").count() == 1


def test_one_trace__fast_path_in_process_to_the_consumer(
    bridge: Any, settings: Any, spans: Any
) -> None:
    with _tracer().start_as_current_span("request") as request, transaction.atomic():
        Publisher().publish(**EVENT)
    assert fast_path().wait_idle()
    _receive(settings)
    assert _consume(_working_handler([])).processed == 1
    local = finished(spans)
    producer, consumer = _one(local, "PRODUCER"), _one(local, "CONSUMER")
    trace_id, request_id = _ids(request)
    assert (producer["trace_id"], producer["parent_id"]) == (trace_id, request_id)
    assert (consumer["trace_id"], consumer["parent_id"]) == (trace_id, producer["span_id"])


def test_consumer__a_failing_handler_records_the_error_and_the_dead_letter(
    bridge: Any, settings: Any, spans: Any
) -> None:
    with _tracer().start_as_current_span("request"), transaction.atomic():
        Publisher().publish(**EVENT)
    assert fast_path().wait_idle()
    _receive(settings)

    def refuse(event: dict[str, Any], subject: str, deliveries: int) -> None:
        raise RejectMessage("order o-1 cannot be invoiced")

    assert _consume(refuse).dead_lettered == 1
    consumer = _one(finished(spans), "CONSUMER")
    assert consumer["status"] == "ERROR"
    [error] = consumer["events"]
    assert error["name"] == "exception"
    assert error["attributes"]["exception.type"].endswith("RejectMessage")
    assert error["attributes"]["exception.message"] == "order o-1 cannot be invoiced"
    assert consumer["attributes"]["jetstream_bridge.outcome"] == "dead_lettered"


def test_deliver__a_retried_failure_and_a_duplicate_are_traced_with_their_outcome(
    jetstream_bridge: Any, spans: Any
) -> None:
    envelope = build_envelope(
        producer="beta", resource_type="order", event_type="created", payload={"id": 1}
    )
    parent = _traceparent("12" * 16, "34" * 8)

    def flaky(event: dict[str, Any], subject: str, deliveries: int) -> None:
        if deliveries == 1:
            raise ValueError("the invoice service is down")

    assert deliver(envelope, flaky, headers={"traceparent": parent}).retried
    assert deliver(envelope, flaky, deliveries=2, headers={"traceparent": parent}).processed
    assert deliver(envelope, flaky, deliveries=3, headers={"traceparent": parent}).duplicate
    retried, processed, duplicate = finished(spans)
    for span in (retried, processed, duplicate):
        assert (span["kind"], span["trace_id"], span["parent_id"]) == (
            "CONSUMER",
            "12" * 16,
            "34" * 8,
        )
    assert (retried["status"], retried["attributes"]["jetstream_bridge.outcome"]) == (
        "ERROR",
        "retried",
    )
    assert retried["events"][0]["attributes"]["exception.message"] == "the invoice service is down"
    assert (processed["status"], processed["attributes"]["jetstream_bridge.outcome"]) == (
        "UNSET",
        "processed",
    )
    # A duplicate never reaches the handler; its settle is traced all the same.
    assert duplicate["attributes"]["jetstream_bridge.outcome"] == "duplicate"
    assert duplicate["events"] == []


def test_consumer__hostile_trace_headers_start_a_new_trace(
    jetstream_bridge: Any, spans: Any
) -> None:
    envelope = build_envelope(
        producer="beta", resource_type="order", event_type="created", payload={"id": 2}
    )
    hostile = {"TRACEPARENT": "00-" + "0" * 32 + "-" + "1" * 16 + "-01", "tracestate": "x" * 9000}
    assert deliver(envelope, lambda event, subject, deliveries: None, headers=hostile).processed
    [span] = finished(spans)
    assert span["parent_id"] is None  # an all-zero trace id is invalid: not a parent
    assert span["trace_id"] != "0" * 32


def test_otel_tracing_off__no_consumer_span(
    jetstream_bridge: Any, settings: Any, spans: Any
) -> None:
    settings.JETSTREAM_BRIDGE = {**settings.JETSTREAM_BRIDGE, "OTEL_TRACING": False}
    envelope = build_envelope(
        producer="beta", resource_type="order", event_type="created", payload={"id": 3}
    )
    headers = {"traceparent": _traceparent("12" * 16, "34" * 8)}
    assert deliver(envelope, lambda event, subject, deliveries: None, headers=headers).processed
    assert finished(spans) == []


def test_consumer__a_batch_redone_with_savepoints_ends_the_rolled_back_span_as_redone(
    bridge: Any, settings: Any, spans: Any
) -> None:
    with _tracer().start_as_current_span("request"), transaction.atomic():
        good = Publisher().publish(**EVENT)
        bad = Publisher().publish(**{**EVENT, "payload": {"id": "o-2"}})
    assert fast_path().wait_idle()
    _receive(settings)

    def second_fails(event: dict[str, Any], subject: str, deliveries: int) -> None:
        if event["event_id"] == bad.event_id:
            raise ValueError("o-2 is broken")

    consumer = Consumer(durable_name=RECEIVER, handler=second_fails, batch_size=10, max_messages=2)
    stats = asyncio.run(consumer.run_async())
    assert (stats.processed, stats.retried, stats.redone) == (1, 1, 1)
    processed = [span for span in finished(spans) if span["kind"] == "CONSUMER"]
    outcomes = sorted(
        (span["attributes"]["messaging.message.id"], span["attributes"]["jetstream_bridge.outcome"])
        for span in processed
    )
    # The good event ran twice (its first run rolled back with the batch), the bad one once.
    assert outcomes == sorted(
        [(good.event_id, "redone"), (good.event_id, "processed"), (bad.event_id, "retried")]
    )


def test_middleware__a_batch_call_links_every_message_and_counts_them(
    jetstream_bridge: Any, spans: Any
) -> None:
    from jetstream_bridge import otel
    from jetstream_bridge.context import Invocation, MessageContext

    tracing = otel.middleware(get_config())
    assert tracing is not None
    contexts = tuple(
        MessageContext(
            event={"event_id": f"e-{seq}"},
            payload={},
            subject="t.data.sync.beta.alpha",
            headers={"traceparent": _traceparent("12" * 16, f"{seq:016x}")},
            stream="S",
            stream_seq=seq,
            deliveries=1,
            consumer="alpha-events",
            event_id=f"e-{seq}",
        )
        for seq in (1, 2)
    )
    invocation = Invocation(contexts, lambda messages: None, batch=True)
    assert tracing(invocation, lambda inv: "done") == "done"
    tracing.settled(contexts[0], "processed")
    assert finished(spans) == []  # waits for every message of the batch
    tracing.settled(contexts[1], "retried")
    [span] = finished(spans)
    assert span["kind"] == "CONSUMER"
    assert span["links"] == [f"{1:016x}", f"{2:016x}"]
    assert span["attributes"]["messaging.batch.message_count"] == 2
    assert span["attributes"]["messaging.consumer.group.name"] == "alpha-events"
    assert span["attributes"]["jetstream_bridge.outcome"] == "mixed"
    assert [event["attributes"] for event in span["events"]] == [
        {"messaging.message.id": "e-1", "jetstream_bridge.outcome": "processed"},
        {"messaging.message.id": "e-2", "jetstream_bridge.outcome": "retried"},
    ]
