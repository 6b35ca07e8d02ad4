"""OpenTelemetry end to end: trace context in the outbox and on the wire, producer and consumer
spans, one trace from the request to the handler (the relay in another process), and nothing
at all without an active span or without OpenTelemetry installed.

The SDK's in-memory exporter collects this process's spans (``tests/otel_spans.py``); a relay
subprocess writes its spans to a JSON-lines file named by ``JSB_OTEL_SPANS_FILE``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.db import transaction
from opentelemetry import trace

from jetstream_bridge import Publisher
from jetstream_bridge.fast_path import fast_path
from jetstream_bridge.models import OutboxEvent
from jetstream_bridge.topology import ensure_topology
from tests.helpers import manage, stream_messages
from tests.otel_spans import finished, memory_exporter, read_file

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
from jetstream_bridge import Publisher
from jetstream_bridge.fast_path import fast_path
Publisher().publish(resource_type="order", event_type="created", payload={"id": "o-2"})
assert fast_path().wait_idle()
loaded = sorted(name for name in sys.modules if name.startswith("opentelemetry"))
assert not loaded, loaded
print("ok")
"""


def test_without_opentelemetry__the_bridge_imports_publishes_and_relays(
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
