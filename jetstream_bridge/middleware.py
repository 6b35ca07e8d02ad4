"""Middleware: code around every handler call, and observers of every settled message.

A middleware is a callable ``mw(invocation, call_next)`` returning ``call_next(invocation)``
(or raising: an exception from the chain is the handler's failure, retried or dead-lettered
by the usual rules). It runs inside the transaction (or savepoint) the handler runs in, so its
database writes commit or roll back with the handler's.

    import sentry_sdk
    import jetstream_bridge

    def report_errors(invocation, call_next):
        try:
            return call_next(invocation)
        except Exception as exc:
            sentry_sdk.capture_exception(exc)
            raise

    jetstream_bridge.use(report_errors)

Registered three ways, called in this order (the first is the outermost): the ``MIDDLEWARE``
setting (dotted paths, imported once), ``use()`` (process-wide, e.g. in a
``jetstream_handlers`` module), ``Consumer(middleware=[...])``. A middleware object may also
define ``settled(ctx, outcome)``: called once each message is settled by a consumer, with
``"processed"``, ``"duplicate"``, ``"retried"``, ``"dead_lettered"`` or ``"skipped"``
(duplicates and skipped replays never reach a handler, but are reported here).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from asgiref.sync import async_to_sync, iscoroutinefunction
from django.utils.module_loading import import_string

from . import otel
from .context import Invocation, MessageContext
from .core.envelope import decode
from .core.errors import MalformedEnvelope
from .core.schemas import validate
from .core.settings import BridgeConfig
from .core.subjects import producer_of
from .handlers import Registration
from .outcomes import ReceivedMessage

__all__ = [
    "OUTCOMES",
    "Chain",
    "Middleware",
    "Prepared",
    "chain_for",
    "load_middleware",
    "prepare",
    "use",
]

logger = logging.getLogger(__name__)

Middleware = Callable[[Invocation, Callable[[Invocation], Any]], Any]
OUTCOMES = ("processed", "duplicate", "retried", "dead_lettered", "skipped")

_used: list[Middleware] = []
_loaded: dict[tuple[str, ...], tuple[Middleware, ...]] = {}


def use(middleware: Middleware) -> Middleware:
    """Add ``middleware`` around every handler call in this process (after the setting's)."""
    if not callable(middleware):
        raise TypeError(
            f"a middleware must be callable as mw(invocation, call_next), not {middleware!r}"
        )
    if middleware not in _used:
        _used.append(middleware)
    return middleware


def unuse(middleware: Middleware) -> None:
    """Remove a middleware ``use()`` added (tests)."""
    if middleware in _used:
        _used.remove(middleware)


def load_middleware(paths: Sequence[str]) -> tuple[Middleware, ...]:
    """Import the ``MIDDLEWARE`` setting's dotted paths, once per process."""
    key = tuple(paths)
    if key not in _loaded:
        loaded = []
        for path in key:
            try:
                found = import_string(path)
            except ImportError as exc:
                raise ImportError(
                    f"cannot import middleware {path!r} named in MIDDLEWARE: {exc}"
                ) from exc
            if not callable(found):
                raise TypeError(f"middleware {path!r} in MIDDLEWARE is not callable")
            loaded.append(found)
        _loaded[key] = tuple(loaded)
    return _loaded[key]


def chain_for(config: BridgeConfig, own: Iterable[Middleware] = ()) -> Chain:
    """The chain of a processor: the setting's middleware, then ``use()``'s, then ``own``.

    The bridge's own tracing (``otel.middleware``: OpenTelemetry installed and configured,
    ``OTEL_TRACING`` on) comes first, so its span covers every other middleware.
    """
    tracing = otel.middleware(config)
    builtin: tuple[Middleware, ...] = (tracing,) if tracing is not None else ()
    return Chain((*builtin, *load_middleware(config.middleware)), tuple(own))


@dataclass(frozen=True)
class Prepared:
    """One handler call ready to run: the handler, the message, its envelope and payload."""

    registration: Registration
    message: ReceivedMessage
    event: dict[str, Any]
    payload: Any
    producer: str | None

    def context(self) -> MessageContext:
        return self.message.context(self.event, self.producer, payload=self.payload)


def prepare(
    registration: Registration,
    message: ReceivedMessage,
    event: dict[str, Any],
    producer: str | None,
) -> Prepared:
    """Validate the payload against the handler's schema (``InvalidPayload``) and get ready."""
    payload = event.get("payload")
    if registration.schema is not None:
        payload = validate(registration.schema, payload)
    return Prepared(registration, message, event, payload, producer)


class Chain:
    """The middleware around one processor's handler calls, in order (first = outermost)."""

    def __init__(self, configured: Sequence[Middleware] = (), own: Sequence[Middleware] = ()):
        self.configured = tuple(configured)
        self.own = tuple(own)

    @property
    def layers(self) -> tuple[Middleware, ...]:
        return (*self.configured, *_used, *self.own)

    def call(self, prepared: Prepared) -> Any:
        """Run a single handler through the chain."""
        layers = self.layers
        style = prepared.registration
        if not layers and style.plain:
            # No middleware and today's style: no context to build.
            message = prepared.message
            return _call(style.fn, prepared.event, message.subject, message.deliveries)
        invocation = Invocation((prepared.context(),), style.fn, batch=style.batch)
        return self.run(invocation, lambda inv: _call_single(style, inv), layers)

    def run(
        self,
        invocation: Invocation,
        final: Callable[[Invocation], Any],
        layers: tuple[Middleware, ...] | None = None,
    ) -> Any:
        """Pass ``invocation`` through every middleware, then to ``final`` (the handler)."""
        layers = self.layers if layers is None else layers

        def step(index: int, current: Invocation) -> Any:
            if index == len(layers):
                return final(current)
            return layers[index](current, lambda following: step(index + 1, following))

        return step(0, invocation)

    @property
    def observes(self) -> bool:
        """Whether any middleware has a ``settled(ctx, outcome)`` observer."""
        return any(callable(getattr(mw, "settled", None)) for mw in self.layers)

    def settled(self, message: ReceivedMessage, outcome: str, config: BridgeConfig) -> None:
        """Tell every middleware with a ``settled(ctx, outcome)`` how ``message`` was settled.

        An observer that raises is logged and ignored: the message is settled already.
        """
        found = (getattr(mw, "settled", None) for mw in self.layers)
        observers: list[Callable[[MessageContext, str], Any]] = [
            observer for observer in found if callable(observer)
        ]
        if not observers:
            return
        ctx = received_context(message, config)
        for observer in observers:
            try:
                observer(ctx, outcome)
            except Exception:
                logger.exception("a middleware's settled() failed", extra={"outcome": outcome})


def received_context(message: ReceivedMessage, config: BridgeConfig) -> MessageContext:
    """The context of a message as received (a malformed body gives an empty ``event``)."""
    try:
        event: dict[str, Any] = decode(message.data)
    except MalformedEnvelope:
        event = {}
    return message.context(event, producer_of(message.subject, config.env, config.app_name))


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    if iscoroutinefunction(fn):
        return async_to_sync(fn)(*args)
    return fn(*args)


def _call_single(style: Registration, invocation: Invocation) -> Any:
    if style.batch:
        # A batch handler outside a consumer batch (testing.deliver, a re-run): a group of one.
        return _call(invocation.handler, list(invocation.messages))
    ctx = invocation.message
    if style.context:
        return _call(invocation.handler, ctx)
    return _call(invocation.handler, ctx.event, ctx.subject, ctx.deliveries)
