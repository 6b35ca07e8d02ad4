"""Handlers: what runs for each received event.

Register per ``resource_type``/``event_type`` in a ``jetstream_handlers.py`` module of any
installed app (imported when a consumer starts), or pass one handler to ``Consumer`` /
``--handler dotted.path``. Only code named in your project is imported; nothing a message says
is ever used to find code.

    from jetstream_bridge import handler

    @handler("order", "created")
    def create_invoice(event, subject, deliveries):
        Invoice.objects.create(order_number=event["payload"]["number"])

    @handler("order", "created", producer="billing")  # only billing's order/created
    def billing_order(event, subject, deliveries): ...

    @handler("order", "shipped", context=True)  # one argument: a MessageContext
    def ship(ctx): ...

    @handler("order", "paid", schema=OrderPaid)  # ctx.payload is an OrderPaid (validated)
    def paid(ctx): ...

A handler's style is said once, where it is registered (``context=True``, ``schema=``,
``batch=True``); it is never guessed from its parameters. A function passed on its own
(``Consumer(handler=...)``, ``testing.deliver``) keeps the style its ``@handler`` gave it, or
is wrapped in a ``Registration`` to give one: ``Registration(fn, context=True)``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import Any

from django.apps import apps
from django.utils.module_loading import import_string, module_has_submodule

from .core.schemas import schema_problem

logger = logging.getLogger(__name__)

HANDLERS_MODULE = "jetstream_handlers"
ANY = "*"

Handler = Callable[..., Any]

# The attribute ``@handler`` leaves on a function with its registration (its style).
REGISTRATION_ATTRIBUTE = "jetstream_registration"


@dataclass(frozen=True)
class Registration:
    """A handler and how it is called.

    Default: ``fn(event, subject, deliveries)``. ``context=True``: ``fn(ctx)`` with a
    ``MessageContext``. ``schema`` (a pydantic model or a dataclass; implies ``context``):
    ``ctx.payload`` is the validated object, and a payload that does not validate is
    dead-lettered at once with reason ``invalid``. ``batch=True``: ``fn(list_of_contexts)``
    once per consumer batch.
    """

    fn: Handler
    context: bool = False
    schema: type | None = None
    batch: bool = False

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"a handler must be callable, not {self.fn!r}")
        if self.schema is not None:
            problem = schema_problem(self.schema)
            if problem:
                raise TypeError(f"schema={self.schema!r} {problem}")
            object.__setattr__(self, "context", True)

    @property
    def plain(self) -> bool:
        """Called as ``fn(event, subject, deliveries)``, today's style."""
        return not (self.context or self.batch)


def registration_of(fn: Handler | Registration) -> Registration:
    """Return how ``fn`` is called: its own ``Registration``, the one ``@handler`` gave it, or
    today's style."""
    if isinstance(fn, Registration):
        return fn
    found = getattr(fn, REGISTRATION_ATTRIBUTE, None)
    return found if isinstance(found, Registration) else Registration(fn)


class HandlerRegistry:
    """Handlers keyed by ``(producer, resource_type, event_type)``; ``"*"`` matches anything.

    ``producer`` is the peer whose subject the event arrived on; registrations without one
    (``"*"``) serve every peer, as in a single-peer service.
    """

    def __init__(self) -> None:
        self._handlers: dict[tuple[str, str, str], Handler] = {}
        self._styles: dict[Handler, Registration] = {}

    def register(  # noqa: PLR0913 (keyword-only style flags)
        self,
        resource_type: str,
        event_type: str,
        fn: Handler | Registration,
        *,
        producer: str = ANY,
        context: bool = False,
        schema: type | None = None,
        batch: bool = False,
    ) -> Handler:
        """Register ``fn`` (or a ``Registration``) for ``resource_type``/``event_type``."""
        if isinstance(fn, Registration):
            style = fn
        else:
            style = Registration(fn, context=context, schema=schema, batch=batch)
        fn = style.fn
        earlier = self._styles.get(fn)
        if earlier is not None and earlier != style:
            raise ValueError(
                f"{fn.__module__}.{fn.__qualname__} is registered twice with different "
                f"styles ({earlier} and {style}); register a separate function per style"
            )
        key = (producer, resource_type, event_type)
        existing = self._handlers.get(key)
        if existing is not None and existing is not fn:
            source = "" if producer == ANY else f" from {producer}"
            raise ValueError(
                f"a handler for {resource_type}/{event_type}{source} is already "
                f"registered: {existing.__module__}.{existing.__qualname__}"
            )
        self._handlers[key] = fn
        self._styles[fn] = style
        return fn

    def resolve(
        self, resource_type: str, event_type: str, producer: str | None = None
    ) -> Handler | None:
        """Return the most specific handler.

        With ``producer``, that peer's registrations come first (exact, any event type, any
        resource type, catch-all); then, as without it, exact, any event type, any resource
        type, catch-all.
        """
        kinds = (
            (resource_type, event_type),
            (resource_type, ANY),
            (ANY, event_type),
            (ANY, ANY),
        )
        producers = (producer, ANY) if producer and producer != ANY else (ANY,)
        for source in producers:
            for resource, event in kinds:
                found = self._handlers.get((source, resource, event))
                if found is not None:
                    return found
        return None

    def lookup(
        self, resource_type: str, event_type: str, producer: str | None = None
    ) -> Registration | None:
        """Return the most specific handler (as ``resolve``) with how it is called."""
        fn = self.resolve(resource_type, event_type, producer)
        if fn is None:
            return None
        return self._styles.get(fn) or registration_of(fn)

    def __len__(self) -> int:
        return len(self._handlers)

    def clear(self) -> None:
        self._handlers.clear()
        self._styles.clear()


registry = HandlerRegistry()


def handler(
    resource_type: str = ANY,
    event_type: str = ANY,
    *,
    producer: str = ANY,
    context: bool = False,
    schema: type | None = None,
    batch: bool = False,
) -> Callable[[Handler], Handler]:
    """Register the decorated function for events of ``resource_type``/``event_type``.

    ``producer`` limits it to events from that peer (the service named in DESTINATION_APP
    whose subject they arrive on); without it the function serves every peer. ``context``,
    ``schema`` and ``batch`` say how it is called (``Registration``).
    """

    def decorate(fn: Handler) -> Handler:
        style = Registration(fn, context=context, schema=schema, batch=batch)
        registry.register(resource_type, event_type, style, producer=producer)
        if not style.plain:
            # Not on a bound method or a builtin: the registry knows its style anyway.
            with contextlib.suppress(AttributeError):
                setattr(fn, REGISTRATION_ATTRIBUTE, style)
        return fn

    return decorate


def autodiscover() -> list[str]:
    """Import ``<app>.jetstream_handlers`` for every installed app that has one."""
    imported = []
    for app_config in apps.get_app_configs():
        if module_has_submodule(app_config.module, HANDLERS_MODULE):
            name = f"{app_config.name}.{HANDLERS_MODULE}"
            import_module(name)
            imported.append(name)
    logger.debug("handler modules imported", extra={"modules": imported})
    return imported


def load_handler(path: str) -> Handler:
    """Import a handler named on the command line or in settings (``pkg.module.func``)."""
    try:
        fn = import_string(path)
    except ImportError as exc:
        raise ImportError(f"cannot import handler {path!r}: {exc}") from exc
    if not callable(fn):
        raise TypeError(f"handler {path!r} is not callable")
    return fn  # type: ignore[no-any-return]
