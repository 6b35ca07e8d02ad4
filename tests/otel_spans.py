"""The OpenTelemetry SDK as the tests use it: spans kept in memory here, in a file elsewhere.

``memory_exporter()`` installs the SDK's tracer provider once per test process with the
in-memory exporter. A worker subprocess started with ``JSB_OTEL_SPANS_FILE`` set (see
``tests/settings.py``) writes each span it ends to that file as one JSON line, so a test can
join the spans of its own process and of a relay's into one trace.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

_memory: InMemorySpanExporter | None = None


def describe(span: ReadableSpan) -> dict[str, Any]:
    """A span as plain data: the same shape from memory and from a subprocess's file."""
    context = span.get_span_context()
    assert context is not None
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
        "attributes": dict(span.attributes or {}),
        "status": span.status.status_code.name,
        "events": [
            {"name": event.name, "attributes": dict(event.attributes or {})}
            for event in span.events
        ],
        "links": [f"{link.context.span_id:016x}" for link in span.links],
    }


class JsonLinesExporter(SpanExporter):
    """Append each ended span to ``path`` as one line of JSON (``describe``)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self.path.open("a", encoding="utf-8") as out:
            for span in spans:
                out.write(json.dumps(describe(span), default=list) + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def export_to_file(path: str) -> None:
    """Install the SDK in this (worker) process, writing its spans to ``path``."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(path)))
    trace.set_tracer_provider(provider)


def read_file(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def memory_exporter() -> InMemorySpanExporter:
    """The in-memory exporter of this test process (installed on the first call)."""
    global _memory
    if _memory is None:
        _memory = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_memory))
        trace.set_tracer_provider(provider)
    return _memory


def finished(exporter: InMemorySpanExporter) -> list[dict[str, Any]]:
    return [describe(span) for span in exporter.get_finished_spans()]
