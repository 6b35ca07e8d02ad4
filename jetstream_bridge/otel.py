"""OpenTelemetry tracing, end to end: every use of OpenTelemetry in the bridge is here.

Optional twice over: without ``opentelemetry-api`` installed (the ``otel`` extra), or with
``OTEL_TRACING`` off, every function here does nothing and ``opentelemetry`` is never
imported. With both:

* ``outgoing``/``trace_id_of_current`` — ``publish()`` stores the caller's active context as
  W3C ``traceparent``/``tracestate`` headers (through the configured propagator) in the
  outbox row, and fills the envelope's ``trace_id`` from the active trace. Without an active
  span nothing is added: the message stays byte for byte what it was.
* ``producing``/``ProducerSpans`` — the fast path, a direct publish and the relay (in any
  process: it reads the stored headers) publish inside a PRODUCER span ``<subject> publish``,
  a child of the stored context, and the headers on the wire carry that span's context.
  A row stored without a trace context is published untouched, with no span.
* ``TracingMiddleware`` — the consumer side, as a handler middleware the bridge registers
  itself (``middleware.py``): each handler runs in a CONSUMER span ``<subject> process``, a
  child of the context the message carries; exceptions are recorded on it; the span ends when
  the message is settled (``settled``), with the outcome as ``jetstream_bridge.outcome``.

Headers received are hostile input: only the propagator reads them (it validates what it
takes), and names are matched case-insensitively.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .core.envelope import MSG_ID_HEADER
from .core.settings import BridgeConfig

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer

    from .broker import PubAck
    from .context import Invocation, MessageContext

SYSTEM = "nats"
OUTCOME = "jetstream_bridge.outcome"
# Spans of handled messages wait for their settle; past this many (settles that never came),
# the oldest is ended as "unsettled" so memory stays bounded.
MAX_PENDING = 10_000


@dataclass(frozen=True)
class _Api:
    """The OpenTelemetry API modules, imported once and only when tracing is wanted."""

    trace: Any
    propagate: Any
    tracer: Tracer
    empty: Callable[[], Context]  # a context with no span: what a consumer span starts from


_UNLOADED: Any = object()
_api: Any = _UNLOADED
_api_lock = threading.Lock()


def _load() -> _Api | None:
    global _api
    if _api is _UNLOADED:
        with _api_lock:
            if _api is _UNLOADED:
                try:
                    from opentelemetry import propagate, trace
                    from opentelemetry.context import Context as EmptyContext
                except ImportError:
                    _api = None
                else:
                    from . import __version__

                    tracer = trace.get_tracer("jetstream_bridge", __version__)
                    _api = _Api(trace, propagate, tracer, EmptyContext)
    return _api  # type: ignore[no-any-return]


def available() -> bool:
    """Tell whether ``opentelemetry-api`` is installed (imports it on the first call)."""
    return _load() is not None


def _active(config: BridgeConfig) -> _Api | None:
    """The API when ``OTEL_TRACING`` is on and OpenTelemetry is installed, else None."""
    return _load() if config.otel_tracing else None


def _lowered(headers: Mapping[str, str]) -> dict[str, str]:
    """Received headers with lower-case names: the W3C names are lower case, senders vary."""
    return {str(name).lower(): str(value) for name, value in headers.items()}


def _valid(api: _Api, context: Context | None) -> bool:
    span_context = api.trace.get_current_span(context).get_span_context()
    return bool(span_context.is_valid)


# -- publishing -----------------------------------------------------------------------------


TRACE_HEADERS = frozenset({"traceparent", "tracestate"})


def outgoing(config: BridgeConfig, headers: Mapping[str, str]) -> dict[str, str]:
    """The trace headers ``publish()`` adds for the active span; {} when there is none.

    A header the caller set (any case) is theirs and stays as given.
    """
    api = _active(config)
    if api is None or not _valid(api, None):
        return {}
    carrier: dict[str, str] = {}
    api.propagate.inject(carrier)
    taken = {name.lower() for name in headers}
    # Only the W3C trace context travels: a propagator's ``baggage`` may carry what an HTTP
    # client sent the request, which is not for every peer of this service.
    return {
        name: value
        for name, value in carrier.items()
        if name.lower() in TRACE_HEADERS and name.lower() not in taken
    }


def trace_id_of_current(config: BridgeConfig) -> str | None:
    """The active trace's id as 32 hex digits (the envelope's ``trace_id``), or None."""
    api = _active(config)
    if api is None:
        return None
    span_context = api.trace.get_current_span().get_span_context()
    return f"{span_context.trace_id:032x}" if span_context.is_valid else None


def _producer_span(
    api: _Api, subject: str, message_id: str, headers: Mapping[str, str]
) -> tuple[Span | None, dict[str, str]]:
    """Start the PRODUCER span of a stored message; return it and the headers to send.

    Without a valid stored context: no span, the headers as stored.
    """
    parent = api.propagate.extract(_lowered(headers))
    if not _valid(api, parent):
        return None, dict(headers)
    span = api.tracer.start_span(
        f"{subject} publish",
        context=parent,
        kind=api.trace.SpanKind.PRODUCER,
        attributes={
            "messaging.system": SYSTEM,
            "messaging.operation": "publish",
            "messaging.operation.type": "send",
            "messaging.destination.name": subject,
            "messaging.message.id": message_id,
        },
    )
    fields = {name.lower() for name in api.propagate.get_global_textmap().fields}
    wire = {name: value for name, value in headers.items() if name.lower() not in fields}
    # The producer span's own context goes on the wire: the consumer's span is its child.
    api.propagate.inject(wire, context=api.trace.set_span_in_context(span, parent))
    return span, wire


def _end_producer(api: _Api, span: Span, result: PubAck | BaseException | None) -> None:
    if isinstance(result, BaseException):
        _record_error(api, span, result)
    elif result is not None and result.duplicate:
        span.set_attribute("jetstream_bridge.duplicate", True)
    span.end()


@contextmanager
def producing(
    config: BridgeConfig, subject: str, headers: Mapping[str, str]
) -> Iterator[dict[str, str]]:
    """Publish one stored message in its PRODUCER span; yield the headers to send."""
    api = _active(config)
    if api is None:
        yield dict(headers)
        return
    span, wire = _producer_span(api, subject, headers.get(MSG_ID_HEADER, ""), headers)
    if span is None:
        yield wire
        return
    try:
        yield wire
    except BaseException as exc:
        _end_producer(api, span, exc)
        raise
    _end_producer(api, span, None)


class ProducerSpans:
    """The relay's PRODUCER spans for one pipelined batch: ``start`` each, then ``end`` all."""

    def __init__(self, config: BridgeConfig) -> None:
        self._api = _active(config)
        self._spans: list[Span | None] = []

    def start(self, subject: str, headers: Mapping[str, str]) -> dict[str, str]:
        """Start the span of one message; return the headers to send it with."""
        if self._api is None:
            return dict(headers)
        span, wire = _producer_span(self._api, subject, headers.get(MSG_ID_HEADER, ""), headers)
        self._spans.append(span)
        return wire

    def end(self, results: Sequence[PubAck | BaseException]) -> None:
        """End each span with its message's result (an error is recorded on its span)."""
        api = self._api
        if api is None:
            return
        for span, result in zip(self._spans, results, strict=True):
            if span is not None:
                _end_producer(api, span, result)
        self._spans = []


# -- consuming -------------------------------------------------------------------------------


def _record_error(api: _Api, span: Span, error: BaseException) -> None:
    span.record_exception(error)
    span.set_status(api.trace.Status(api.trace.StatusCode.ERROR, type(error).__name__))


def _message_id(message: MessageContext) -> str:
    return message.headers.get(MSG_ID_HEADER) or message.event_id or ""


def _key(message: MessageContext) -> tuple[str, str, int]:
    return (message.consumer, message.stream, message.stream_seq)


@dataclass
class _Pending:
    """A consumer span waiting for the settle of its messages."""

    span: Span
    keys: list[tuple[str, str, int]]
    outcomes: list[str] = field(default_factory=list)


class TracingMiddleware:
    """Run each handler in a CONSUMER span; end it when the message is settled.

    Registered by the bridge itself when tracing is on (``middleware.py``). A batch handler's
    span links to every message's context (its parent is the current context) and counts them
    in ``messaging.batch.message_count``. A message settled without its handler running (a
    duplicate, a replay for another durable, a malformed one) gets a span at its settle.
    """

    def __init__(self, api: _Api) -> None:
        self._api = api
        self._pending: OrderedDict[tuple[str, str, int], _Pending] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, invocation: Invocation, call_next: Callable[[Invocation], Any]) -> Any:
        api = self._api
        span = self._start(invocation.messages, batch=invocation.batch)
        try:
            with api.trace.use_span(
                span, end_on_exit=False, record_exception=False, set_status_on_exception=False
            ):
                return call_next(invocation)
        except Exception as exc:
            _record_error(api, span, exc)
            raise
        finally:
            self._hold(span, invocation.messages)

    def settled(self, message: MessageContext, outcome: str) -> None:
        """Record ``outcome`` on the message's span and end it once its messages are settled."""
        with self._lock:
            pending = self._pending.pop(_key(message), None)
        if pending is None:  # its handler did not run: the settle is all there is to trace
            span = self._start((message,), batch=False)
            span.set_attribute(OUTCOME, outcome)
            span.end()
            return
        pending.outcomes.append(outcome)
        if len(pending.keys) > 1:
            pending.span.add_event(
                "settled",
                {"messaging.message.id": _message_id(message), OUTCOME: outcome},
            )
        if len(pending.outcomes) >= len(pending.keys):
            self._finish(pending, outcome if len(set(pending.outcomes)) == 1 else "mixed")

    def _start(self, messages: Sequence[MessageContext], *, batch: bool) -> Span:
        api, first = self._api, messages[0]
        attributes: dict[str, Any] = {
            "messaging.system": SYSTEM,
            "messaging.operation": "process",
            "messaging.operation.type": "process",
            "messaging.destination.name": first.subject,
            "messaging.consumer.group.name": first.consumer,
            "messaging.destination.subscription.name": first.consumer,
        }
        links = []
        # Never the caller's current span (a test's, a re-run's): the message's own trace only.
        parent = api.empty()
        if batch:
            attributes["messaging.batch.message_count"] = len(messages)
            for message in messages:
                context = api.propagate.extract(_lowered(message.headers))
                if _valid(api, context):
                    span_context = api.trace.get_current_span(context).get_span_context()
                    links.append(api.trace.Link(span_context))
        else:
            parent = api.propagate.extract(_lowered(first.headers), context=api.empty())
            attributes["messaging.message.id"] = _message_id(first)
            attributes["jetstream_bridge.stream"] = first.stream
            attributes["jetstream_bridge.stream_seq"] = first.stream_seq
            attributes["jetstream_bridge.deliveries"] = first.deliveries
            if first.event_id:
                attributes["jetstream_bridge.event_id"] = first.event_id
        span: Span = api.tracer.start_span(
            f"{first.subject} process",
            context=parent,
            kind=api.trace.SpanKind.CONSUMER,
            attributes=attributes,
            links=links,
        )
        return span

    def _hold(self, span: Span, messages: Sequence[MessageContext]) -> None:
        """Keep ``span`` until its messages are settled; end spans the settle will not reach."""
        pending = _Pending(span, [_key(message) for message in messages])
        ended: list[tuple[_Pending, str]] = []
        with self._lock:
            for key in pending.keys:
                earlier = self._pending.pop(key, None)
                if earlier is not None:
                    # Run again in a batch redone with savepoints: the earlier run rolled back.
                    ended.append((earlier, "redone"))
                self._pending[key] = pending
            while len(self._pending) > MAX_PENDING:
                _, oldest = self._pending.popitem(last=False)
                ended.append((oldest, "unsettled"))
        for earlier, outcome in ended:
            self._finish(earlier, outcome)

    def _finish(self, pending: _Pending, outcome: str) -> None:
        with self._lock:
            for key in pending.keys:
                if self._pending.get(key) is pending:
                    del self._pending[key]
        if pending.span.is_recording():
            pending.span.set_attribute(OUTCOME, outcome)
            pending.span.end()


_middleware: TracingMiddleware | None = None


def middleware(config: BridgeConfig) -> TracingMiddleware | None:
    """The process's tracing middleware; None when tracing is off, not installed, or no tracer
    provider is configured yet (the API's default records nothing: spare every message the
    cost of a context and a span).
    """
    global _middleware
    api = _active(config)
    if api is None or isinstance(
        api.trace.get_tracer_provider(),
        (api.trace.ProxyTracerProvider, api.trace.NoOpTracerProvider),
    ):
        return None
    with _api_lock:
        if _middleware is None:
            _middleware = TracingMiddleware(api)
    return _middleware


__all__ = [
    "ProducerSpans",
    "TracingMiddleware",
    "available",
    "middleware",
    "outgoing",
    "producing",
    "trace_id_of_current",
]
